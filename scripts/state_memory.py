#!/usr/bin/env python3
"""Memory of the IceFormer kernel's state beside the KV cache it indexes, by length and thread count.

    .venv/bin/python scripts/state_memory.py --lengths 2048,8192 --threads 1,2 --out results/state-memory.json

For each length and thread count: a fresh context of the patched build at the default setting prefills
a corpus document of that many tokens (ubatches of 512) and decodes one token; then prints the state's
bytes (`Llama.iceformer_memory()`: summaries, indices, per-thread scratch) over the sequence's KV cache
(`Llama.kv_cache_bytes()`). Issue 21 asks for at most 25%. The state does not depend on the text, only
on the sizes, so one document serves. Threads beyond the machine's cores are slow but measure the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def thread_counts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return values


def main() -> int:
    from iceformer_llama.evaluation.bench import parse_lengths

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path or alias (default: the bundled model)")
    ap.add_argument("--lengths", type=parse_lengths, default=[8192])
    ap.add_argument("--threads", type=thread_counts, default=[2])
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    import iceformer_llama
    from iceformer_llama.evaluation.corpus import document_tokens

    iceformer_llama.use_backend("patched")
    rows = []
    for length in args.lengths:
        for threads in args.threads:
            llm = iceformer_llama.Llama(args.model, attention="iceformer", n_ctx=length + 64, n_batch=512,
                                        n_ubatch=512, n_threads=threads, n_threads_batch=threads, flash_attn=True)
            tokens = document_tokens(llm, length + 1)
            llm.eval(tokens[:length])
            llm.eval(tokens[length:])   # one decode step: its rows size the decode path's scratch
            row = {"length": length, "threads": threads, "state_bytes": llm.iceformer_memory(),
                   "kv_cache_bytes": llm.kv_cache_bytes()}
            row["state_vs_kv_cache"] = row["state_bytes"] / row["kv_cache_bytes"]
            rows.append(row)
            print(f"{length:6d} tokens  {threads:2d} threads  state {row['state_bytes'] / 2**20:8.1f} MiB  "
                  f"KV cache {row['kv_cache_bytes'] / 2**20:8.1f} MiB  {100 * row['state_vs_kv_cache']:5.1f}%",
                  flush=True)
            llm.close()
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model or "bundled",
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
