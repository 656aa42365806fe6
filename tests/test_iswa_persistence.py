"""The kernel state of an iSWA model's layers (Gemma 2/3: sliding-window and global layers, each kind with
its own KV cache) persists across decode calls (patch 0003) and stays the state a rebuild would give.

The model is tests/tiny_gemma3.py's (4 layers, window 512: layers 0 and 2 sliding, 1 and 3 global) with a
sliding-window cache that is not full-size (swa_full=False: 1024 cells), so decoding past it reuses the
cells of keys that left the window: the cells k_idxs names are rewritten, and the layer's block summaries
must follow. Settings as tests/test_kv_persistence.py's SPARSE (min_n_kv 32, 4 sinks, a window of 16 and the
2 best blocks of 16 cells), so a stale summary changes which keys are attended.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_gemma3  # noqa: E402  (standalone generator beside this file)

SPARSE = dict(min_n_kv=32, n_sinks=4, window=16, block_size=16, top_k=0, tail_estimate=False, top_blocks=2,
              dense_layers=[])
FULL = dict(SPARSE, top_blocks=4096)
PROMPT, DECODE = 2000, 300   # the 1024-cell sliding-window cache wraps, twice

CHILD = r"""
import json, random, sys, time
import numpy as np
import iceformer_llama as il
model, out, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rng = random.Random(0)
tokens = [2] + [rng.randrange(4, 300) for _ in range(PROMPT + DECODE - 1)]
rows, seconds = {}, {}
for name, settings in runs.items():
    llm = il.Llama(model, attention="iceformer", iceformer=il.IceformerSettings(**settings), n_ctx=4096,
                   swa_full=False, verbose=False, n_threads=1, n_threads_batch=1)
    llm.eval(tokens[:PROMPT])
    t0 = time.process_time()   # one thread: CPU time, not disturbed by other work on the machine
    recorded = []
    for i, t in enumerate(tokens[PROMPT:]):
        llm.eval([t])
        if i % 10 == 0:   # the step's logits (logits_all would add a copy per step that hides the kernel's time)
            recorded.append(np.ctypeslib.as_array(llm.llama._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
    seconds[name] = time.process_time() - t0
    rows[name] = np.stack(recorded).astype(np.float32)
    llm.close()
np.savez(out, **rows)
print(json.dumps(seconds))
""".replace("PROMPT", str(PROMPT)).replace("DECODE", str(DECODE))


@pytest.fixture(scope="module")
def runs(builds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iswa")
    model = tiny_gemma3.write(tmp / "tiny-gemma3.gguf", swa=512, swa_pattern=2)
    spec = {"sparse": dict(SPARSE, persistent=True), "rebuilt": dict(SPARSE, persistent=False),
            "full": dict(FULL, persistent=True)}
    out = tmp / "rows.npz"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), json.dumps(spec)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "ICEFORMER_LLAMA_BACKEND": "patched"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        rows = {k: z[k] for k in z.files}
    return rows, json.loads(proc.stdout.strip().splitlines()[-1])


def test_persistent_state_of_sliding_window_layers_is_bitwise_the_rebuilt_state(runs):
    rows, _ = runs
    ref, got = rows["rebuilt"], rows["sparse"]
    assert ref.shape == got.shape == (DECODE // 10, got.shape[1]) and np.isfinite(got).all()
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))
    assert not np.array_equal(rows["full"], got), "the sparse selection does not matter here"


def test_decoding_updates_the_state_instead_of_rebuilding_it(runs):
    """Before patch 0003 every decode step rebuilt the state of every sparse layer, as persistent=False
    does. CPU seconds of the 300 one-token decodes, one thread, measured: before 0003 0.17-0.20 (persistent)
    against 0.18-0.23 (rebuilt); after it 0.05-0.06 against 0.20-0.23."""
    _, seconds = runs
    assert seconds["sparse"] * 2 < seconds["rebuilt"], seconds
