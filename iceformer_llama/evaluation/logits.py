"""Teacher-forced logits for the scored positions only.

llama_cpp.Llama(logits_all=True) keeps an n_ctx x n_vocab float32 array and asks llama.cpp for every
position's logits: 20 GB at 32k tokens for a 152k vocabulary. Eval scores only positions
[first, n-1) (row i predicts token i+1), so this module prefills with its own llama_batch whose
`logits` flags are set for those positions alone: llama.cpp's output buffer then holds one ubatch's
scored rows at a time, and what is kept is n_scored x n_vocab (or nothing, with a `sink`).

    rows, seconds = scored_logits(llm, tokens, first)     # rows[j] = logits at position first + j
"""

from __future__ import annotations

import time

import numpy as np


def scored_range(n_tokens: int, first: int) -> range:
    """Positions whose logits are scored: [first, n_tokens - 1), each predicting the token after it."""
    if n_tokens < 2 or not 0 <= first < n_tokens - 1:
        raise ValueError(f"no position to score: {n_tokens} tokens from position {first}")
    return range(first, n_tokens - 1)


def scored_logits(llm, tokens, first: int, *, sink=None) -> tuple[np.ndarray | None, float]:
    """Prefills `tokens` from an empty cache in ubatches of the context's n_batch; returns (rows, seconds).

    rows: float32 [n_tokens - 1 - first, n_vocab], the logits at positions first .. n_tokens-2; with
    `sink`, None instead, and sink(offset, block) is called with each decode call's scored rows (block
    [k, n_vocab], only valid during the call; offset = its first row's index in the full rows).
    seconds: time spent in llama_decode and reading the logits back (not in the sink)."""
    from ..runtime import backend

    lib = backend.load()
    inner = getattr(llm, "llama", llm)            # iceformer_llama.Llama or llama_cpp.Llama
    ctx = inner._ctx
    n, wanted = len(tokens), scored_range(len(tokens), first)
    n_vocab, n_batch = inner.n_vocab(), inner.n_batch
    if n > inner._n_ctx:
        raise ValueError(f"{n} tokens do not fit the context of {inner._n_ctx}")
    out = None if sink is not None else np.empty((len(wanted), n_vocab), dtype=np.float32)
    inner.reset()
    ctx.kv_cache_seq_rm(-1, 0, -1)                # what Llama.eval does from an empty history
    batch = lib.llama_batch_init(n_batch, 0, 1)
    seconds, row = 0.0, 0
    try:
        for lo in range(0, n, n_batch):
            hi = min(n, lo + n_batch)
            batch.n_tokens = hi - lo
            k = 0
            for i, pos in enumerate(range(lo, hi)):
                batch.token[i] = tokens[pos]
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                flag = pos in wanted
                batch.logits[i] = flag
                k += flag
            t0 = time.perf_counter()
            rc = lib.llama_decode(ctx.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at position {lo}")
            block = None
            if k:
                block = np.ctypeslib.as_array(lib.llama_get_logits(ctx.ctx), shape=(k * n_vocab,)).reshape(k, n_vocab)
                if out is not None:
                    out[row:row + k] = block
            seconds += time.perf_counter() - t0
            if block is not None and sink is not None:
                sink(row, block)
            row += k
    finally:
        lib.llama_batch_free(batch)
    inner.input_ids[:n] = tokens
    inner.n_tokens = n
    return out, seconds
