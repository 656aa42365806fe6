"""Llama.attention_counts() through the patched llama.h (llama_iceformer_counts): what the kernel read."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CODE = """
import json, sys
import iceformer_llama as il
from iceformer_llama.evaluation import corpus
llm = il.Llama(sys.argv[1], n_ctx=1600, n_batch=512, n_ubatch=512, n_threads=2)
tokens = corpus.document_tokens(llm, 1536)
out = {}
fixed = dict(window=64, min_n_kv=0, block_share=0.0)   # a fixed count of blocks, whatever the default share
for name, settings in (("dense", None), ("fixed", il.IceformerSettings(top_blocks=8, **fixed)),
                       ("top_p", il.IceformerSettings(top_blocks=8, top_p=1e-6, min_blocks=2, **fixed)),
                       ("share", il.IceformerSettings(top_blocks=8, block_share=0.5, window=64, min_n_kv=0))):
    llm.reset()
    llm.set_attention("dense" if settings is None else "iceformer", settings)
    before = llm.attention_counts()
    llm.eval(tokens)
    after = llm.attention_counts()
    out[name] = {k: after[k] - before[k] for k in before}
    out[name + "_params"] = llm.attention_params()
out["layer0"] = llm.attention_counts(0)
out["all"] = llm.attention_counts()
out["n_layer"] = llm.n_layer()
try:
    llm.attention_counts(999)
except Exception as e:
    out["bad_layer"] = str(e)
print(json.dumps(out))
"""


def test_counts_follow_the_settings(builds, bundled_model):
    """1536 tokens, min_n_kv 0: every row is answered by the kernel. Dense attention counts nothing; 8
    blocks of 16 with a window of 64 read at most 4 + 64 + 128 keys a row (rows that see fewer run dense
    over what they see); the top-p budget at its minimum (2 blocks) reads fewer; every layer answers the
    same rows."""
    proc = subprocess.run([sys.executable, "-c", _CODE, str(bundled_model)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dense"] == {"n_rows": 0, "n_attended": 0, "n_visible": 0}
    fixed, top_p = out["fixed"], out["top_p"]
    assert fixed["n_rows"] > 0 and fixed["n_rows"] == top_p["n_rows"] and fixed["n_visible"] == top_p["n_visible"]
    assert fixed["n_attended"] <= fixed["n_rows"] * (4 + 64 + 8 * 16)
    assert fixed["n_rows"] == 1536 * 9 * out["n_layer"]          # tokens x query heads x layers
    assert fixed["n_visible"] == 1536 * 1537 // 2 * 9 * out["n_layer"]   # causal: row t sees t + 1 keys
    assert top_p["n_attended"] < fixed["n_attended"]
    # block_share 0.5: every row past the union attends at least half the blocks it can choose, so the
    # share of keys read is about half (more: the union, blocks rounded up), where 8 blocks read far less
    share = out["share"]
    assert out["share_params"]["block_share"] == 0.5 and out["fixed_params"]["block_share"] == 0.0
    assert share["n_visible"] == fixed["n_visible"]
    assert 0.5 <= share["n_attended"] / share["n_visible"] <= 0.7
    assert fixed["n_attended"] / fixed["n_visible"] < 0.3
    assert 0 < out["layer0"]["n_rows"] * out["n_layer"] == out["all"]["n_rows"]   # every layer answers the same rows
    assert "no layer 999" in out["bad_layer"]
