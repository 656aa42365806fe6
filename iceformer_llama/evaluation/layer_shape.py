"""Where a model's attention error comes from, layer by layer, and a per-layer budget shaped by it.

Sensitivity of layer l: the mean KL(dense || sparse) of the next-token distributions when layer l alone
runs a cheap sparse setting and every other layer runs dense attention (the same scored positions as
calibration). Small models mix sharp layers (local, positional heads: a few blocks capture them) with
diffuse ones, and a uniform budget pays the diffuse layers' price in every layer.

The shape gives layer l a share of the block budget proportional to sensitivity_l ** EXPONENT: if a
layer's error falls as (cheap budget / budget), minimising the summed error sum_l s_l / b_l at a fixed
total sum_l b_l gives b_l proportional to sqrt(s_l). The shares are percentages of top_blocks with mean
100, so a shaped rung costs about what the uniform rung with the same top_blocks costs (less where a
layer's share exceeds the blocks it can see).
"""

from __future__ import annotations

import math

EXPONENT = 0.5
MIN_PERCENT = 25    # the least sensitive layer still attends a quarter of the uniform budget
MAX_PERCENT = 400   # at most 4x: a noisy sensitivity must not starve the other layers


def layer_shape(sensitivity, *, exponent: float = EXPONENT, lo: int = MIN_PERCENT, hi: int = MAX_PERCENT) -> tuple[int, ...]:
    """Percent of top_blocks per layer (llama_iceformer_params.layer_budget), mean 100 (to rounding):
    proportional to sensitivity ** exponent, clipped to [lo, hi]. Sensitivities are KLs, >= 0."""
    if not all(math.isfinite(float(x)) for x in sensitivity):
        raise ValueError("layer sensitivities must be finite")
    s = [max(0.0, float(x)) for x in sensitivity]
    if not s:
        return ()
    top = max(s)
    if top <= 0.0:
        return tuple(100 for _ in s)
    # a layer that measured no error at all still gets the floor share, never zero blocks
    w = [max(x, top * 1e-6) ** exponent for x in s]

    def mean_share(scale: float) -> float:
        return sum(min(hi, max(lo, x * scale)) for x in w) / len(w)

    # the clipped mean grows with the scale: bisect (in log space) for the scale that gives 100
    a, b = 1e-9, 1e12
    for _ in range(200):
        mid = math.sqrt(a * b)
        a, b = (mid, b) if mean_share(mid) < 100.0 else (a, mid)
    return tuple(round(min(hi, max(lo, x * b))) for x in w)


def exact_blocks(n_tokens: int, block_size: int) -> int:
    """A top_blocks that covers every key of n_tokens: the kernel then attends everything."""
    return -(-n_tokens // block_size) + 1


def measure_sensitivity(llm, refs, knobs: dict, *, on_layer=None) -> tuple[list[float], int]:
    """Per layer, the mean KL over refs ((document, first scored position) pairs) between the kernel with
    every layer exact and the kernel with that layer alone at knobs' top_blocks (IceformerSettings fields,
    block_size and window included). The reference is the kernel, not llama.cpp's dense attention: the
    kernel's exact rows sum in another order than llama.cpp's, and in early layers that difference alone,
    amplified through the later layers, measured as much KL as a cheap budget (0.003 of 0.011 for layer 8
    of the bundled model at 4k); against the exact kernel only the selection differs. Budgets are set as
    layer_budget percentages of an exact top_blocks, so the cheap layer's blocks round to whole percents:
    returns (KLs, the blocks the cheap layer attended). on_layer(il) after each layer."""
    from ..runtime.settings import IceformerSettings
    from .accuracy import against
    from .logits import scored_logits

    n_layer = llm.n_layer()
    longest = max(len(doc.tokens) for doc, _ in refs)
    total = exact_blocks(longest, knobs["block_size"])
    percent = max(1, round(100 * knobs["top_blocks"] / total))
    exact = IceformerSettings(**{**knobs, "top_blocks": total, "layer_budget": ()})
    llm.set_attention("iceformer", exact)
    references = [scored_logits(llm, doc.tokens, first)[0] for doc, first in refs]
    out = []
    for il in range(n_layer):
        shaped = tuple(percent if j == il else 100 for j in range(n_layer))
        llm.set_attention("iceformer", IceformerSettings(**{**knobs, "top_blocks": total, "layer_budget": shaped}))
        kls = [against(llm, doc.tokens, first, ref)[0].mean_kl for (doc, first), ref in zip(refs, references)]
        out.append(sum(kls) / len(kls))
        if on_layer is not None:
            on_layer(il)
    return out, (total * percent + 50) // 100
