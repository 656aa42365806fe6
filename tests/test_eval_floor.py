"""eval's floor-relative figures on fixed logits (a known answer): run_documents with a stand-in model whose
scored rows are fixed per attention mode, through the summaries and the printed table."""

import math

import numpy as np
import pytest

from iceformer_llama.evaluation import accuracy, evaluate, floor
from iceformer_llama.evaluation.documents import Document
from iceformer_llama.evaluation.eval_output import format_report

# Two scored rows over a vocabulary of 3; the tokens that follow them are 0 and 2.
P = {
    "dense": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]],
    "flipped": [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]],      # the floor: top-1 differs on row 1
    "same": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]],         # a setting equal to dense
    "worse": [[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]],        # a setting that misses row 0
}
TOKENS = [-1, 7, 0, 2]        # n = 4; score_from 0.25 -> first position 1: rows 1, 2 predict tokens 0, 2


class FixedModel:
    def __init__(self, dense_name):
        self.dense_name, self.mode = dense_name, None

    def set_attention(self, attention, settings=None):
        self.mode = self.dense_name if attention == "dense" else settings

    def attention_counts(self):
        # as if each setting had attended half the visible keys of one row
        self.calls = getattr(self, "calls", 0) + 1
        return {"n_rows": self.calls, "n_attended": 50 * self.calls, "n_visible": 100 * self.calls}

    def iceformer_memory(self):
        return 100

    def kv_cache_bytes(self):
        return 800


def fixed_scored_logits(llm, tokens, first, *, sink=None):
    assert (list(tokens), first) == (TOKENS, 1)
    rows = np.log(np.array(P[llm.mode], dtype=np.float32))
    if sink is None:
        return rows, 2.0
    sink(0, rows[:1])        # as llama.cpp hands them over: one decode call's rows at a time
    sink(1, rows[1:])
    return None, 1.0


@pytest.fixture
def result(monkeypatch):
    monkeypatch.setattr(accuracy, "scored_logits", fixed_scored_logits)

    class Bar:
        def update(self, n):
            pass

    doc = Document("man:test", "prose", "report", "GPL-3+", TOKENS)
    docs, texts = evaluate.run_documents(FixedModel("dense"), [doc], [("same", "same"), ("worse", "worse")],
                                         score_from=0.25, bar=Bar(), floor_llm=FixedModel("flipped"))
    labels = ["same", "worse"]
    return {"texts": texts, "documents": docs, "class_summary": floor.class_summary(docs, labels),
            "summary": evaluate.overall_summary(docs, [], labels), "task_summary": [], "variants": [],
            "flash_attn": "auto", "score_from": 0.25, "corpus": {"sources": [{"id": "man:test", "licence": "GPL-3+"}]}}


def test_floor_figures_on_fixed_logits(result):
    (text,) = result["texts"]
    ppl_dense = math.sqrt(8)              # exp(mean(-ln 0.5, -ln 0.25))
    assert text["first_position"] == 1 and text["ppl_dense"] == pytest.approx(ppl_dense)
    f = text["floor"]
    assert f["top1_agreement"] == 0.5
    assert f["mean_kl"] == pytest.approx(0.125 * math.log(2))       # (0 + 0.25 ln 2) / 2
    assert f["ppl"] == pytest.approx(2.0)                           # both tokens at p = 0.5
    assert f["ppl_vs_dense"] == pytest.approx(2.0 / ppl_dense - 1)


def test_settings_beside_the_floor_and_the_targets(result):
    same, worse = result["documents"]
    assert (same["variant"], same["document"], same["class"], same["n_tokens"]) == ("same", "man:test", "prose", 4)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0, abs=1e-7)
    assert same["ppl_vs_dense"] == pytest.approx(0, abs=1e-7) and same["within_target"] is True
    assert same["floor"] == result["texts"][0]["floor"]
    # worse: row 0 puts 0.25 on the token (dense 0.5), top-1 0.5 = the floor's, but ppl 4 against 2.83
    assert worse["top1_agreement"] == 0.5
    assert worse["mean_kl"] == pytest.approx(0.125 * math.log(2))
    assert worse["ppl_iceformer"] == pytest.approx(4.0) and worse["ppl_vs_dense"] == pytest.approx(4 / math.sqrt(8) - 1)
    assert worse["within_target"] is False


def test_within_target_edges():
    f = {"top1_agreement": 0.90}
    assert floor.within_target(0.885, 0.01, f) is True           # exactly 1.5 points below, exactly +1%
    assert floor.within_target(0.884, 0.0, f) is False
    assert floor.within_target(0.99, 0.0101, f) is False
    assert floor.within_target(0.99, 0.0, None) is None           # no floor measured: not judged


def test_class_summary_and_table(result):
    rows = {r["setting"]: r for r in result["class_summary"]}
    assert rows["same"]["class"] == "all" and rows["same"]["within_target"] == 1 and rows["same"]["judged"] == 1
    assert rows["worse"]["top1_minus_floor_min"] == 0.0 and rows["worse"]["within_target"] == 0
    assert rows["same"]["keys_attended_share"] == 0.5    # the counts' delta over the setting's prefill
    same = next(d for d in result["documents"] if d["variant"] == "same")
    assert same["state_vs_kv_cache"] == 0.125    # the kernel's state over the KV cache's bytes
    text = format_report(result)
    for column in ("top-1 (floor)", "KL (floor)", "ppl vs dense (floor)", "keys attended", "within target", "floor top-1", "ppl dense"):
        assert column in text
    line = next(ln for ln in text.splitlines() if "man:test" in ln and " worse " in ln)
    assert "0.500 (0.500)" in line and f"{100 * (4 / math.sqrt(8) - 1):+.2f}% (-29.29%)" in line and " no " in line
    assert "2.828" in next(ln for ln in text.splitlines() if "man:test" in ln and "GPL-3+" in ln)


def test_without_a_floor_dense_perplexity_is_still_reported(monkeypatch):
    monkeypatch.setattr(accuracy, "scored_logits", fixed_scored_logits)

    class Bar:
        def update(self, n):
            pass

    doc = Document("man:test", "prose", "report", "GPL-3+", TOKENS)
    docs, texts = evaluate.run_documents(FixedModel("dense"), [doc], [("worse", "worse")], score_from=0.25, bar=Bar())
    assert texts[0]["floor"] is None and texts[0]["ppl_dense"] == pytest.approx(math.sqrt(8))
    assert docs[0]["within_target"] is None and docs[0]["ppl_iceformer"] == pytest.approx(4.0)
