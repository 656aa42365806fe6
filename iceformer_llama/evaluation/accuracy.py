"""Teacher-forced accuracy of IceFormer attention against dense, in one process (patched backend).

For a token sequence, both modes see the same prompt; at every scored position we compare the
next-token distributions: top-1 agreement, mean KL(dense || other) and each mode's perplexity. Only the
scored positions' logits are requested (logits.py); the other mode's rows are compared as they arrive.
"""

from __future__ import annotations

import math

import numpy as np

from .logits import scored_logits

_CHUNK = 256


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class RowStats:
    """Running top-1 agreement, KL(ref || other) and both NLLs over aligned logit rows."""

    keys_share: float | None = None   # compare(): the share of visible keys attended
    state_vs_kv: float | None = None  # compare(): the kernel's state / the KV cache, bytes

    def __init__(self):
        self.n = 0
        self.agree = self.kl = self.nll_ref = self.nll_other = 0.0

    def add(self, ref: np.ndarray, other: np.ndarray, targets) -> None:
        """ref, other: [k, vocab] logits at the same positions; targets[j]: the token that follows row j."""
        targets = np.asarray(targets)
        for lo in range(0, len(ref), _CHUNK):
            hi = min(lo + _CHUNK, len(ref))
            la, lb = _log_softmax(ref[lo:hi]), _log_softmax(other[lo:hi])
            rows, nxt = np.arange(hi - lo), targets[lo:hi]
            self.agree += float((la.argmax(-1) == lb.argmax(-1)).sum())
            self.kl += float((np.exp(la) * (la - lb)).sum())
            self.nll_ref -= float(la[rows, nxt].sum())
            self.nll_other -= float(lb[rows, nxt].sum())
            self.n += hi - lo

    def _mean(self, x: float) -> float:
        return x / max(1, self.n)

    @property
    def top1(self) -> float:
        return self._mean(self.agree)

    @property
    def mean_kl(self) -> float:
        return self._mean(self.kl)

    @property
    def ppl_ref(self) -> float:
        return math.exp(self._mean(self.nll_ref))

    @property
    def ppl_other(self) -> float:
        return math.exp(self._mean(self.nll_other))


def compare_logits(a: np.ndarray, b: np.ndarray, first: int = 0, tokens=None) -> tuple[float, float, float, float]:
    """(top-1 agreement, mean KL(a || b), mean NLL of a, mean NLL of b) over rows [first, n-1) of two
    full logit arrays (positions x vocab); the NLLs score tokens[i+1] at row i (0.0 without tokens)."""
    n = len(a)
    stats = RowStats()
    targets = np.asarray(tokens[first + 1:n]) if tokens is not None else np.zeros(max(0, n - 1 - first), dtype=int)
    stats.add(a[first:n - 1], b[first:n - 1], targets)
    nll = (stats._mean(stats.nll_ref), stats._mean(stats.nll_other)) if tokens is not None else (0.0, 0.0)
    return stats.top1, stats.mean_kl, *nll


def dense_rows(llm, tokens, first: int) -> tuple[np.ndarray, float]:
    """Dense logits at the scored positions [first, n-1) and the prefill seconds."""
    llm.set_attention("dense")
    return scored_logits(llm, tokens, first)


def against(llm, tokens, first: int, reference: np.ndarray) -> tuple[RowStats, float]:
    """Prefills tokens with llm's current attention and compares each scored row with `reference`
    (dense_rows' rows) as it arrives: nothing but the reference is kept."""
    stats = RowStats()
    targets = np.asarray(tokens[first + 1:])

    def sink(offset, block):
        stats.add(reference[offset:offset + len(block)], block, targets[offset:offset + len(block)])

    _, seconds = scored_logits(llm, tokens, first, sink=sink)
    return stats, seconds


def compare(llm, tokens, settings, reference, *, first: int) -> tuple[RowStats, float]:
    """IceFormer (with `settings`) against dense rows on the same tokens: (stats, prefill seconds).
    stats.keys_share: the share of visible keys the kernel attended over the prefill (its cost in keys);
    stats.state_vs_kv: the kernel's state in bytes over the KV cache's, after the prefill."""
    llm.set_attention("iceformer", settings)
    before = llm.attention_counts()
    stats, seconds = against(llm, tokens, first, reference)
    after = llm.attention_counts()
    visible = after["n_visible"] - before["n_visible"]
    stats.keys_share = (after["n_attended"] - before["n_attended"]) / visible if visible else None
    kv = llm.kv_cache_bytes()   # the kernel's state beside the KV cache it indexes, both over the whole prompt
    stats.state_vs_kv = llm.iceformer_memory() / kv if kv else None
    return stats, seconds
