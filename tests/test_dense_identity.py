"""Dense mode of the patched library is upstream llama.cpp, bit for bit."""

import subprocess
import sys
from pathlib import Path

import numpy as np

PROBE = Path(__file__).with_name("logits_probe.py")


def probe(tmp_path, backend, attention, n_tokens=300, **settings):
    out = tmp_path / f"{backend}-{attention}-{len(settings)}.npy"
    args = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else str(v).lower()}" for k, v in settings.items()]
    proc = subprocess.run([sys.executable, str(PROBE), backend, attention, str(out), str(n_tokens), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


def test_dense_logits_are_bit_identical_to_stock(builds, bundled_model, tmp_path):
    stock = probe(tmp_path, "stock", "dense")
    patched = probe(tmp_path, "patched", "dense")
    assert stock.shape == patched.shape == (300, stock.shape[1])
    assert np.isfinite(stock).all()
    assert np.array_equal(stock.view(np.uint32), patched.view(np.uint32))
