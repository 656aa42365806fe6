#!/usr/bin/env python3
"""Each layer's sensitivity as `calibrate --layer-shape on` measures it (evaluation/layer_shape.py), and the
per-layer budget shape it gives: one layer at a cheap budget, the others exact, against the exact kernel;
prints the table, writes JSON and a PNG beside it.

    .venv/bin/python scripts/layer_shape.py [--model M] [--length 4096] [--top-blocks 40] [--window 64] \
        [--docs tune] [--out results/layer-shape.json]
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iceformer_llama.evaluation.calibrate import (
    DEFAULT_POSITIONS,
    SHAPE_KNOBS,
    shaping_documents,
)
from iceformer_llama.evaluation.evaluate import _CTX_SLACK, _open, corpus_documents
from iceformer_llama.evaluation.layer_shape import layer_shape, measure_sensitivity
from iceformer_llama.runtime.models import resolve_model
from iceformer_llama.runtime.settings import IceformerSettings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--top-blocks", type=int, default=SHAPE_KNOBS["top_blocks"])
    ap.add_argument("--window", type=int, default=SHAPE_KNOBS["window"])
    ap.add_argument("--docs", choices=("tune", "report"), default="tune")
    ap.add_argument("--positions", type=int, default=DEFAULT_POSITIONS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/layer-shape.json")
    a = ap.parse_args()
    ns = argparse.Namespace(model=str(resolve_model(a.model)), threads=a.threads, batch_size=512, flash_attn="auto",
                            classes=["prose", "code"], docs=a.docs, docs_per_class=None, text_file=None, verbose=False,
                            **{f"ice_{f.name}": None for f in dataclasses.fields(IceformerSettings)})
    llm = _open(ns, a.length + _CTX_SLACK)
    llm.profile = None
    docs, _ = corpus_documents(llm, [a.length], ns)
    docs = [docs[i] for i in shaping_documents(docs)]
    knobs = {**SHAPE_KNOBS, "top_blocks": a.top_blocks, "window": a.window}
    t0 = time.time()
    kl, blocks = measure_sensitivity(llm, [(d, len(d.tokens) - 1 - a.positions) for d in docs], knobs,
                                     on_layer=lambda il: print(f"layer {il} done, {time.time() - t0:.0f} s", flush=True))
    shape = layer_shape(kl)
    print("layer  KL vs exact kernel  budget share")
    for il, (k, p) in enumerate(zip(kl, shape)):
        print(f"{il:5d}  {k:18.5f}  {p:11d}%")
    out = {"command": " ".join(sys.argv), "model": ns.model, "length": a.length, "docs": [d.describe()["document"] for d in docs],
           "knobs": knobs, "cheap_blocks": blocks, "sensitivity_kl": kl, "layer_budget": list(shape),
           "seconds": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(kl)), kl, color="tab:blue")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"KL, this layer alone at {blocks} blocks")
    ax2 = ax.twinx()
    ax2.plot(range(len(shape)), shape, color="tab:red", marker=".")
    ax2.set_ylabel("budget share, % of top_blocks", color="tab:red")
    fig.tight_layout()
    fig.savefig(Path(a.out).with_suffix(".png"), dpi=100)
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
