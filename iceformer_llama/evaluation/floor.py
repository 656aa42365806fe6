"""Accuracy relative to llama.cpp's own floor: pure functions over eval's per-document records.

The floor is llama.cpp's two exact kernels against each other (dense with flash attention flipped
against dense) on the same document and positions. A setting is within target on a document when
its perplexity is at most PPL_TOLERANCE above dense and its top-1 agreement at most TOP1_MARGIN below
the floor's (issue #21's targets: the default speed level's promise, settings.LEVEL_PROMISES).
"""

from __future__ import annotations

from ..runtime.settings import DEFAULT_SPEED, LEVEL_PROMISES

PPL_TOLERANCE = LEVEL_PROMISES[DEFAULT_SPEED]["ppl_tolerance"]  # ppl(setting) <= (1 + PPL_TOLERANCE) * ppl(dense)
TOP1_MARGIN = LEVEL_PROMISES[DEFAULT_SPEED]["top1_margin"]      # top-1(setting) >= top-1(floor) - TOP1_MARGIN


def floor_figures(stats) -> dict:
    """The floor's figures from its RowStats (ref = dense, other = dense with flash attention flipped)."""
    return {"top1_agreement": stats.top1, "mean_kl": stats.mean_kl, "ppl": stats.ppl_other,
            "ppl_vs_dense": stats.ppl_other / stats.ppl_ref - 1.0}


def within_target(top1: float, ppl_vs_dense: float, floor: dict | None, *, ppl_tolerance: float = PPL_TOLERANCE,
                  top1_margin: float = TOP1_MARGIN) -> bool | None:
    """Both targets met (by default the default level's; a speed level's promise with the keywords);
    None without a floor (the top-1 target is relative to it)."""
    if floor is None:
        return None
    return bool(ppl_vs_dense <= ppl_tolerance + 1e-12 and top1 >= floor["top1_agreement"] - top1_margin - 1e-12)


def document_record(label: str, doc: dict, first: int, stats, dense_seconds: float, ice_seconds: float,
                    floor: dict | None) -> dict:
    """One setting on one document: its figures against dense beside the floor's on the same positions."""
    ppl_vs = stats.ppl_other / stats.ppl_ref - 1.0
    return {"variant": label, **doc, "first_position": first, "top1_agreement": stats.top1,
            "mean_kl": stats.mean_kl, "ppl_dense": stats.ppl_ref, "ppl_iceformer": stats.ppl_other,
            "ppl_vs_dense": ppl_vs, "prefill_seconds_dense": dense_seconds, "prefill_seconds_iceformer": ice_seconds,
            "keys_attended_share": stats.keys_share, "state_vs_kv_cache": stats.state_vs_kv,
            "floor": floor, "within_target": within_target(stats.top1, ppl_vs, floor)}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(records: list[dict]) -> dict:
    """Means over documents, the spread of top-1 minus the floor's, and how many are within target."""
    floors = [r["floor"] for r in records if r.get("floor")]
    gaps = [r["top1_agreement"] - r["floor"]["top1_agreement"] for r in records if r.get("floor")]
    judged = [r["within_target"] for r in records if r.get("within_target") is not None]
    return {
        "n_documents": len(records),
        "top1_agreement": _mean(r["top1_agreement"] for r in records),
        "mean_kl": _mean(r["mean_kl"] for r in records),
        "ppl_vs_dense": _mean(r["ppl_vs_dense"] for r in records),
        "ppl_vs_dense_max": max((r["ppl_vs_dense"] for r in records), default=None),
        "keys_attended_share": _mean(r.get("keys_attended_share") for r in records),
        "floor_top1_agreement": _mean(f["top1_agreement"] for f in floors),
        "floor_mean_kl": _mean(f["mean_kl"] for f in floors),
        "floor_ppl_vs_dense": _mean(f["ppl_vs_dense"] for f in floors),
        "top1_minus_floor_min": min(gaps) if gaps else None,
        "top1_minus_floor_max": max(gaps) if gaps else None,
        "within_target": sum(judged) if judged else None,
        "judged": len(judged),
    }


def class_summary(records: list[dict], labels: list[str]) -> list[dict]:
    """Per setting: all documents, then each class (in order of appearance), aggregated."""
    classes = list(dict.fromkeys(r["class"] for r in records))
    rows = []
    for label in labels:
        mine = [r for r in records if r["variant"] == label]
        if not mine:
            continue
        rows.append({"setting": label, "class": "all", **aggregate(mine)})
        if len(classes) > 1:
            rows += [{"setting": label, "class": c, **aggregate([r for r in mine if r["class"] == c])}
                     for c in classes if any(r["class"] == c for r in mine)]
    return rows
