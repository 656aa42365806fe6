"""The compute buffer llama.cpp reserves up front covers every graph an IceFormer context runs.

llama.cpp compares, when a context closes, the compute buffer it ended with against the size sched_reserve
reserved, and warns on stderr ("... compute buffer size of X MiB, does not match expectation of Y MiB"),
even with verbose=False. The buffer grows past the reservation when a graph is re-planned by ggml-alloc at
a ubatch's own sizes: in iceformer mode the graph's topology changes with the routes the layers take
(upstream below min_n_kv, the kernel above, upstream + state update with dense_prefill), so a plan made at
a small n_kv could need more than the worst case (a Gemma 3 270M-shaped model: 515.75 against 514.50 MiB).

The model: tests/tiny_gemma3.py, a random-weight gemma3 GGUF with sliding-window and global layers, whose 32k
vocabulary makes the logits (all requested) the largest tensor, like Gemma's 262k. Each iceformer case failed
on the build before patch 0002 (sizes from that build in the comments).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_gemma3  # noqa: E402  (standalone generator beside this file)

MISMATCH = "does not match expectation"

CHILD = r"""
import json, random, sys
import iceformer_llama as il
model, n_ctx, attention, settings, lengths, n_decode = sys.argv[1:7]
llm = il.Llama(model, attention=attention, iceformer=il.IceformerSettings(**json.loads(settings)),
               n_ctx=int(n_ctx), logits_all=True, verbose=False, n_threads=1, n_threads_batch=1)
rng = random.Random(0)
for n in map(int, lengths.split(",")):
    llm.reset()                       # a new prompt from position 0 (the cache is cut back)
    llm.eval([2] + [rng.randrange(4, 300) for _ in range(n - 1)])
    for _ in range(int(n_decode)):
        llm.eval([rng.randrange(4, 300)])
llm.close()
print("closed")
"""


@pytest.fixture(scope="module")
def swa_model(tmp_path_factory, builds):
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3-swa.gguf"
    return tiny_gemma3.write(path, layers=4, embd=640, heads=4, heads_kv=1, head_dim=256, ff=512,
                             swa=512, swa_pattern=2, vocab=32768)


def run_child(model, n_ctx, attention, settings, lengths, n_decode=0):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(n_ctx), attention, json.dumps(settings),
                           lengths, str(n_decode)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ICEFORMER_LLAMA_BACKEND": "patched"})
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("n_ctx,settings,lengths,n_decode", [
    # the report: the cache crosses min_n_kv (1024) in the second ubatch, the graph switches to the kernel
    # and was re-planned at n_kv = 1024 (before the fix: 69.00 against 67.50 MiB)
    (2048, {}, "1100", 0),
    # the switch to the kernel at 2048 cells, then a second prompt back on the upstream route, re-planned at
    # n_kv = 512 (before: 68.75 against 67.50 MiB)
    (4096, {"min_n_kv": 2048}, "2600,600", 0),
    # dense_prefill: prompts upstream + state update, decoding on the kernel (before: 68.75 against 67.50 MiB)
    (2048, {"dense_prefill": True}, "1100,600", 4),
], ids=["crosses-min-n-kv", "mixed-routes-then-new-prompt", "dense-prefill-decode"])
def test_iceformer_reservation_covers_the_graphs_that_run(swa_model, n_ctx, settings, lengths, n_decode):
    stderr = run_child(swa_model, n_ctx, "iceformer", settings, lengths, n_decode)
    assert MISMATCH not in stderr, stderr


def test_dense_mode_matches_its_reservation(swa_model):
    """Control: llama.cpp's own attention never re-plans (passes before and after the fix)."""
    stderr = run_child(swa_model, 2048, "dense", {}, "1100,600", 4)
    assert MISMATCH not in stderr, stderr
