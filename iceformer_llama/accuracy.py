"""Teacher-forced accuracy of IceFormer attention against dense, in one process (patched backend).

For a token sequence, both modes see the same prompt; at every position we compare the next-token
distributions: top-1 agreement, mean KL(dense || iceformer) and each mode's perplexity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

_CHUNK = 256


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Comparison:
    n_tokens: int
    first_position: int       # positions [first_position, n_tokens) are scored
    top1_agreement: float
    mean_kl: float
    ppl_dense: float
    ppl_iceformer: float
    prefill_seconds_dense: float
    prefill_seconds_iceformer: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _prefill_logits(llm, tokens) -> tuple[np.ndarray, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    seconds = time.perf_counter() - t0
    return np.array(llm.scores[: len(tokens)], dtype=np.float32), seconds


def dense_reference(llm, tokens):
    llm.set_attention("dense")
    return _prefill_logits(llm, tokens)


def compare(llm, tokens, settings, dense, dense_seconds, *, first_position: int = 0) -> Comparison:
    """IceFormer (with `settings`) against precomputed dense logits on the same tokens."""
    llm.set_attention("iceformer", settings)
    ice, ice_seconds = _prefill_logits(llm, tokens)
    n = len(tokens)
    agree = kl = nll_d = nll_i = 0.0
    count = 0
    for lo in range(first_position, n - 1, _CHUNK):
        hi = min(lo + _CHUNK, n - 1)
        ld, li = _log_softmax(dense[lo:hi]), _log_softmax(ice[lo:hi])
        nxt = np.asarray(tokens[lo + 1:hi + 1])
        agree += float((ld.argmax(-1) == li.argmax(-1)).sum())
        kl += float((np.exp(ld) * (ld - li)).sum())
        rows = np.arange(hi - lo)
        nll_d -= float(ld[rows, nxt].sum())
        nll_i -= float(li[rows, nxt].sum())
        count += hi - lo
    return Comparison(n_tokens=n, first_position=first_position, top1_agreement=agree / count,
                      mean_kl=kl / count, ppl_dense=float(np.exp(nll_d / count)),
                      ppl_iceformer=float(np.exp(nll_i / count)), prefill_seconds_dense=dense_seconds,
                      prefill_seconds_iceformer=ice_seconds)
