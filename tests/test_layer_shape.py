"""calibrate's layer stage: the budget shape from per-layer sensitivities (known answers), and the
sensitivity measurement on the bundled model (one layer sparse per pass, the others dense)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from iceformer_llama.evaluation.layer_shape import MAX_PERCENT, MIN_PERCENT, layer_shape


def test_the_shape_follows_the_square_root_of_the_sensitivity_with_mean_100():
    assert layer_shape([0.01, 0.04]) == (67, 133)            # sqrt ratio 1:2, mean 100
    assert layer_shape([0.002] * 5) == (100,) * 5
    assert layer_shape([0.0, 0.0]) == (100, 100)              # nothing measured: uniform
    assert layer_shape([]) == ()


def test_the_shape_is_clipped_and_the_others_share_what_is_left():
    shape = layer_shape([1.0] + [1e-6] * 9)       # unclipped: 1000 times the others' share
    assert shape == (MAX_PERCENT,) + (67,) * 9       # 400 + 9 x 66.7 = 10 x 100
    # one layer that measured no error still gets the floor share, never zero blocks
    shape = layer_shape([0.0, 0.01, 0.01, 0.01])
    assert shape[0] == MIN_PERCENT and shape[1] == shape[2] == shape[3] == 125
    with pytest.raises(ValueError, match="finite"):
        layer_shape([0.1, float("nan")])


_CODE = """
import json, sys
import iceformer_llama as il
from iceformer_llama.evaluation import corpus
from iceformer_llama.evaluation.layer_shape import layer_shape, measure_sensitivity

class Doc:
    pass

llm = il.Llama(sys.argv[1], n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2)
doc = Doc()
doc.tokens = corpus.document_tokens(llm, 768)
done = []
kl, blocks = measure_sensitivity(llm, [(doc, 768 - 1 - 256)],
                                 {"block_size": 16, "top_blocks": 2, "window": 16, "min_n_kv": 0}, on_layer=done.append)
n = llm.n_layer()
print(json.dumps({"kl": kl, "blocks": blocks, "done": done, "shape": layer_shape(kl), "n_layer": n,
                  "layers": [llm.attention_counts(il) for il in range(n)]}))
"""


def test_sensitivity_runs_each_layer_alone_and_measures_its_error(builds, bundled_model):
    """768 tokens, min_n_kv 0, 2 blocks of 16 and a 16-key window in one layer, the kernel exact in the others:
    every layer's selection error is measurable, and layers differ. The kernel's counts show the isolation:
    each layer skipped keys in exactly one of the n_layer + 1 passes (the exact reference is one)."""
    proc = subprocess.run([sys.executable, "-c", _CODE, str(bundled_model)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    n = out["n_layer"]
    assert out["done"] == list(range(n)) and len(out["kl"]) == n and out["blocks"] == 2
    assert all(k >= 0 for k in out["kl"]) and max(out["kl"]) > 1e-4
    assert max(out["kl"]) > 5 * min(out["kl"])        # layers differ: the point of shaping
    for counts in out["layers"]:
        assert counts["n_rows"] == (n + 1) * 768 * 9                  # tokens x query heads, every pass
        one_pass = counts["n_visible"] // (n + 1)
        assert 0 < counts["n_visible"] - counts["n_attended"] < one_pass
    assert len(out["shape"]) == n and abs(sum(out["shape"]) / n - 100) <= 1


class _Doc:
    def __init__(self, klass, n):
        self.klass, self.tokens = klass, [0] * n

    def describe(self):
        return {"class": self.klass}


def test_calibrate_measures_layers_on_the_first_document_of_each_class_at_the_shortest_length():
    from iceformer_llama.evaluation.calibrate import shaping_documents

    docs = [_Doc("prose", 4096), _Doc("prose", 4096), _Doc("code", 4096), _Doc("prose", 8192), _Doc("code", 8192),
            _Doc("user", 4096)]
    assert shaping_documents(docs) == [0, 2, 5]
