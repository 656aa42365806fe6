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


def compare_logits(a: np.ndarray, b: np.ndarray, first: int = 0, tokens=None) -> tuple[float, float, float, float]:
    """(top-1 agreement, mean KL(a || b), mean NLL of a, mean NLL of b) over rows [first, n-1) of two
    logit arrays (positions x vocab); the NLLs score tokens[i+1] at row i (0.0 without tokens)."""
    n = len(a)
    agree = kl = nll_a = nll_b = 0.0
    for lo in range(first, n - 1, _CHUNK):
        hi = min(lo + _CHUNK, n - 1)
        la, lb = _log_softmax(a[lo:hi]), _log_softmax(b[lo:hi])
        agree += float((la.argmax(-1) == lb.argmax(-1)).sum())
        kl += float((np.exp(la) * (la - lb)).sum())
        if tokens is not None:
            rows, nxt = np.arange(hi - lo), np.asarray(tokens[lo + 1:hi + 1])
            nll_a -= float(la[rows, nxt].sum())
            nll_b -= float(lb[rows, nxt].sum())
    count = max(1, n - 1 - first)
    return agree / count, kl / count, nll_a / count, nll_b / count


def compare(llm, tokens, settings, dense, dense_seconds, *, first_position: int = 0) -> Comparison:
    """IceFormer (with `settings`) against precomputed dense logits on the same tokens."""
    llm.set_attention("iceformer", settings)
    ice, ice_seconds = _prefill_logits(llm, tokens)
    n = len(tokens)
    agree, kl, nll_d, nll_i = compare_logits(dense, ice, first_position, tokens)
    return Comparison(n_tokens=n, first_position=first_position, top1_agreement=agree,
                      mean_kl=kl, ppl_dense=float(np.exp(nll_d)),
                      ppl_iceformer=float(np.exp(nll_i)), prefill_seconds_dense=dense_seconds,
                      prefill_seconds_iceformer=ice_seconds)
