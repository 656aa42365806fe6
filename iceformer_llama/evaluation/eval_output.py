"""eval's printed tables and its PNG: each setting beside llama.cpp's own floor, per document and class."""

from __future__ import annotations

from pathlib import Path

from .floor import PPL_TOLERANCE, TOP1_MARGIN


def _f(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _times(x):
    return "-" if x is None else f"{x:.2f}x"


def _pct(x):
    return "-" if x is None else f"{100 * x:+.2f}%"


def _pct0(x):
    """A share as a plain percentage (keys attended)."""
    return "-" if x is None else f"{100 * x:.0f}%"


def _pair(x, floor, fmt):
    return f"{fmt(x)} ({fmt(floor)})"


def _yes(x):
    return "-" if x is None else ("yes" if x else "no")


def _table(head, rows) -> str:
    lines = [tuple(head)] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _speedup(d):
    return d["prefill_seconds_dense"] / d["prefill_seconds_iceformer"] if d["prefill_seconds_iceformer"] else None


def format_texts(result: dict) -> str:
    fa = "off" if result["flash_attn"] != "off" else "on"
    licences = {s["id"]: s["licence"] for s in result["corpus"].get("sources", [])}
    head = (f"documents, scored from {result['score_from']:.0%} of each; floor: dense with flash attention {fa} "
            "against dense, same positions")
    rows = [(t["n_tokens"], t["class"], t["split"], t["document"], licences.get(t["document"], "-"),
             _f(t["ppl_dense"], ".3f"), _f((t["floor"] or {}).get("top1_agreement")),
             _f((t["floor"] or {}).get("mean_kl"), ".4f"), _pct((t["floor"] or {}).get("ppl_vs_dense")))
            for t in result["texts"]]
    out = [head, _table(("length", "class", "split", "document", "licence", "ppl dense", "floor top-1", "floor KL",
                         "floor ppl vs dense"), rows)]
    for s in result["corpus"].get("skipped", []):
        out.append(f"skipped {s['document']} at {s['n_tokens']}: {s['reason']}")
    for s in result["corpus"].get("sources", []):
        if s.get("missing"):
            out.append(f"missing on this machine: {s['id']} ({s['missing']})")
    return "\n".join(out)


def format_documents(result: dict) -> str:
    target = (f"within target: ppl at most +{PPL_TOLERANCE:.0%} over dense and top-1 at most "
              f"{100 * TOP1_MARGIN:.1f} points below the floor's")
    rows = [(d["n_tokens"], d["class"], d["document"], d["variant"],
             _pair(d["top1_agreement"], (d["floor"] or {}).get("top1_agreement"), _f),
             _pair(d["mean_kl"], (d["floor"] or {}).get("mean_kl"), lambda x: _f(x, ".4f")),
             _pair(d["ppl_vs_dense"], (d["floor"] or {}).get("ppl_vs_dense"), _pct),
             _pct0(d.get("keys_attended_share")), _pct0(d.get("state_vs_kv_cache")), _yes(d["within_target"]),
             _times(_speedup(d)))
            for d in result["documents"]]
    return "\n".join([f"\neach setting against dense, the floor's figure in brackets; {target}", _table(
        ("length", "class", "document", "setting", "top-1 (floor)", "KL (floor)", "ppl vs dense (floor)",
         "keys attended", "state / KV cache", "within target", "speed-up"), rows)])


def format_classes(result: dict) -> str:
    def spread(r):
        lo, hi = r["top1_minus_floor_min"], r["top1_minus_floor_max"]
        return "-" if lo is None else f"{100 * lo:+.1f}..{100 * hi:+.1f}"

    rows = [(r["setting"], r["class"], r["n_documents"], _pair(r["top1_agreement"], r["floor_top1_agreement"], _f),
             spread(r), _pair(r["mean_kl"], r["floor_mean_kl"], lambda x: _f(x, ".4f")),
             _pair(r["ppl_vs_dense"], r["floor_ppl_vs_dense"], _pct), _pct0(r.get("keys_attended_share")),
             "-" if r["within_target"] is None else f"{r['within_target']}/{r['judged']}")
            for r in result["class_summary"]]
    return "\n".join(["\nby class: means over documents (floor in brackets); spread of top-1 minus the floor's, "
                      "in points", _table(("setting", "class", "docs", "top-1 (floor)", "top-1 - floor",
                                           "KL (floor)", "ppl vs dense (floor)", "keys attended",
                                           "within target"), rows)])


def format_report(result: dict) -> str:
    parts = []
    if result["texts"]:
        parts += [format_texts(result), format_documents(result), format_classes(result)]
    if result["task_summary"]:
        labels = [v["label"] for v in result["variants"]]
        parts.append("\nretrieval accuracy (exact match), dense | each setting (ratio to dense)")
        parts.append(_table(("task", "length", "n", "dense", *labels),
                            [(r["task"], r["length"], r["n"], _f(r["dense"], ".2f"),
                              *(f"{_f(r['variants'][l]['accuracy'], '.2f')} ({_f(r['variants'][l]['ratio'], '.2f')})"
                                for l in labels)) for r in result["task_summary"]]))
    tasks = sorted({t for s in result["summary"] for t in s["tasks"]})
    parts.append("\nsummary")
    parts.append(_table(("setting", "top-1", "KL", "prefill tok/s", "speed-up", *tasks),
                        [(s["mode"], _f(s["top1_agreement"]), _f(s["mean_kl"], ".4f"),
                          _f(s["prefill_tokens_per_second"], ".1f"), _times(s["prefill_speedup"]),
                          *(_f(s["tasks"].get(t), ".2f") for t in tasks)) for s in result["summary"]]))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Plot


_MARKERS = {"prose": "o", "code": "s", "copy-heavy": "^", "user": "D"}


def _speed_panel(ax, result, number):
    docs = result["documents"]
    for n in sorted({d["n_tokens"] for d in docs}):
        pts = []
        for label in number:
            mine = [d for d in docs if d["n_tokens"] == n and d["variant"] == label]
            if mine:
                speed = sum(d["prefill_seconds_dense"] for d in mine) / sum(d["prefill_seconds_iceformer"] for d in mine)
                pts.append((speed, sum(d["top1_agreement"] for d in mine) / len(mine), label))
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{n} tokens")
        for x, y, label in pts:
            ax.annotate(number[label], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    floors = [t["floor"]["top1_agreement"] for t in result["texts"] if t.get("floor")]
    if floors:
        ax.axhline(sum(floors) / len(floors), color="grey", lw=1, ls=":", label="floor (mean over documents)")
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set(xlabel="prefill speed-up over dense (same run)", ylabel="top-1 agreement with dense (mean of documents)",
           title="teacher-forced agreement against speed")
    ax.grid(alpha=0.3)
    if docs:
        ax.legend(fontsize=8)


def _floor_panel(ax, result, number, key, scale, title, target):
    """Each setting's figure (colour) on each document (marker: class) against the floor's on the same positions."""
    from matplotlib.lines import Line2D

    docs = [d for d in result["documents"] if d.get("floor")]
    colours = {label: f"C{i % 10}" for i, label in enumerate(number)}
    markers = {cls: _MARKERS.get(cls, "x") for cls in dict.fromkeys(d["class"] for d in docs)}
    for d in docs:
        ax.scatter(scale * d["floor"][key], scale * d[key], color=colours[d["variant"]], marker=markers[d["class"]],
                   alpha=0.8)
    if docs:
        values = [scale * d["floor"][key] for d in docs] + [scale * d[key] for d in docs]
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo or 1)
        xs = [lo - pad, hi + pad]
        handles = [ax.plot(xs, xs, color="grey", lw=1, ls="--", label="equal to the floor")[0], target(ax, xs)]
        handles += [Line2D([], [], color=colours[label], marker="o", ls="", label=f"setting {number[label]}")
                    for label in number]
        handles += [Line2D([], [], color="grey", marker=m, ls="", label=cls) for cls, m in markers.items()]
        ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="floor: dense with flash attention flipped", ylabel="setting", title=title)
    ax.grid(alpha=0.3)


def _tasks_panel(ax, result, number):
    summary = result["summary"]
    variants = [s for s in summary if s["mode"] != "dense"]
    tasks = sorted({t for s in summary for t in s["tasks"]})
    for task, style in zip(tasks, ("o-", "s-", "^-")):
        pts = sorted((s["prefill_speedup"], s["tasks"][task], s["mode"]) for s in variants
                     if s["prefill_speedup"] is not None and s["tasks"].get(task) is not None)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{task} (iceformer)")
        for x, y, label in pts:
            ax.annotate(number[label], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        dense = summary[0]["tasks"].get(task)
        if dense is not None:
            ax.axhline(dense, color=line.get_color(), lw=1, ls="--", label=f"{task} (dense)")
    ax.set_ylim(-0.05, 1.05)
    ax.set(xlabel="prefill speed-up over dense (documents)", ylabel="retrieval accuracy", title="passkey / line retrieval")
    ax.grid(alpha=0.3)
    if tasks:
        ax.legend(fontsize=8)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [s for s in result["summary"] if s["mode"] != "dense"]
    number = {s["mode"]: str(i + 1) for i, s in enumerate(variants)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    _speed_panel(axes[0][0], result, number)
    _floor_panel(axes[0][1], result, number, "top1_agreement", 1.0, "top-1 agreement with dense, per document",
                 lambda ax, xs: ax.plot(xs, [x - TOP1_MARGIN for x in xs], color="red", lw=1, ls=":",
                                        label=f"target: floor - {100 * TOP1_MARGIN:.1f} points")[0])
    _floor_panel(axes[1][0], result, number, "ppl_vs_dense", 100.0, "perplexity against dense (%), per document",
                 lambda ax, xs: ax.axhline(100 * PPL_TOLERANCE, color="red", lw=1, ls=":",
                                           label=f"target: +{PPL_TOLERANCE:.0%}"))
    if result["task_summary"]:
        _tasks_panel(axes[1][1], result, number)
    else:
        axes[1][1].axis("off")
        axes[1][1].text(0.5, 0.5, "no retrieval tasks (--tasks none)", ha="center", va="center")
    legend = "\n".join(f"{i + 1}: {s['mode']}" for i, s in enumerate(variants))
    fig.text(0.01, 0.01, legend, fontsize=7, va="bottom")
    fig.suptitle(f"{Path(result['model']).name}: IceFormer settings against dense, beside llama.cpp's own floor")
    fig.tight_layout(rect=(0, 0.02 + 0.015 * len(variants), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
