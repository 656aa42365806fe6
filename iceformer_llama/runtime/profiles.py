"""Per-layer block budgets measured for known models (the layer_budget knob's defaults).

Attention error is not spread evenly over a model's layers. On the bundled model, keeping one layer
exact and the rest at the default removed over a third of the KL divergence from dense when that layer
was 18, about a fifth for layer 7, and little or nothing for most others (README, "Per-layer budgets").
A profile gives each layer a percentage of top_blocks, so a speed level spends its blocks where the
model needs them; it applies at every level. A model without a profile attends top_blocks in every
layer. Profiles are keyed by what identifies the weights across quantisations: architecture,
general.name and the attention shape.
"""

from __future__ import annotations

from .gguf_check import GGUFInfo


def _budget(n_layers: int, rest: int, **layers: int) -> tuple[int, ...]:
    """`rest` percent everywhere except the named layers (`l7=250`)."""
    out = [rest] * n_layers
    for name, percent in layers.items():
        out[int(name[1:])] = percent
    return tuple(out)


# (architecture, general.name, layers, query heads, KV heads, embedding width) -> layer_budget
PROFILES: dict[tuple, tuple[int, ...]] = {
    # SmolLM2-135M-Instruct (the bundled model; any quantisation). Chosen from eval at 4k and 8k tokens
    # (README, "Per-layer budgets"): at the default level, 48 blocks in most layers and 120 / 90 / 180 in
    # layers 7 / 8 / 18 (70% of 80 everywhere) kept top-1 and perplexity at 80 everywhere's level.
    ("llama", "Smollm2 135M 8k Lc100K Mix1 Ep2", 30, 9, 3, 576): _budget(30, 60, l7=150, l8=113, l18=225),
}


def layer_budget_for(info: GGUFInfo) -> tuple[int, ...] | None:
    """The measured per-layer budget of this model, or None when there is none."""
    return PROFILES.get((info.architecture, info.name, info.n_layers, info.n_head, info.n_head_kv,
                         info.embedding_length))
