"""One backend per process, chosen before llama_cpp loads; clear refusals otherwise."""

import subprocess
import sys

from conftest import ROOT


def run_py(code, env=None, timeout=300):
    import os
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full,
                          timeout=timeout)


def test_the_environment_variable_selects_stock(builds, bundled_model):
    code = ("import os, iceformer_llama as il\n"
            "llm = il.Llama(None, n_ctx=64)\n"
            "print(llm.backend, os.environ['LLAMA_CPP_LIB_PATH'])\n")
    proc = run_py(code, env={"ICEFORMER_LLAMA_BACKEND": "stock"})
    assert proc.returncode == 0, proc.stderr
    name, lib = proc.stdout.split()
    assert name == "stock" and lib == str(builds["stock"].lib_dir)


def test_patched_is_the_default_and_exposes_the_iceformer_api(builds, bundled_model):
    code = ("import iceformer_llama as il\n"
            "llm = il.Llama(None, n_ctx=64, attention='iceformer', iceformer=il.IceformerSettings(top_k=48))\n"
            "p = llm.attention_params()\n"
            "print(llm.backend, p['mode'], p['top_k'], p['dense_layers'])\n"
            "llm.set_attention('dense')\n"
            "print(llm.attention_params()['mode'])\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["patched", "iceformer", "48", "[]", "dense"]


def test_layer_budget_round_trips_and_the_library_checks_its_range(builds, bundled_model):
    """Layers past the given list keep 100%; a percentage above LLAMA_ICEFORMER_MAX_LAYER_BUDGET (1000) is
    refused by llama_set_iceformer_params itself (the context keeps its settings). Unset, or empty, the
    budget is 100% everywhere (no model has a hand-made per-layer budget any more)."""
    code = ("import ctypes, iceformer_llama as il\n"
            "from iceformer_llama.runtime import backend\n"
            "llm = il.Llama(None, n_ctx=64, attention='iceformer')\n"
            "print(set(llm.attention_params()['layer_budget']) == {100})\n"
            "llm.set_attention('iceformer', il.IceformerSettings(layer_budget=()))\n"
            "print(set(llm.attention_params()['layer_budget']))\n"
            "llm = il.Llama(None, n_ctx=64, attention='iceformer', iceformer=il.IceformerSettings(layer_budget=(50, 300)))\n"
            "b = llm.attention_params()['layer_budget']\n"
            "print(len(b), b[0], b[1], set(b[2:]))\n"
            "api = backend.iceformer_api()\n"
            "p = api.to_params('iceformer', None); p.layer_budget[7] = 1001\n"
            "print(api._set(llm._llm.ctx, ctypes.byref(p)), llm.attention_params()['layer_budget'][:2])\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    # the lists cover the model's 30 layers
    assert proc.stdout.splitlines() == ["True", "{100}", "30 50 300 {100}", "-1 [50, 300]"]


def test_attention_defaults_to_the_backends(builds, bundled_model):
    """Llama(attention=None), the default, runs what the CLI and the server run: iceformer on patched,
    dense on stock."""
    code = ("import iceformer_llama as il\n"
            "llm = il.Llama(None, n_ctx=64)\n"
            "print(llm.backend, llm.attention, llm.attention_params()['mode'])\n")
    for name, mode in (("patched", "iceformer"), ("stock", "dense")):
        proc = run_py(code, env={"ICEFORMER_LLAMA_BACKEND": name})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [name, mode, mode]


def test_switching_backend_after_loading_is_refused(builds, bundled_model):
    code = ("import iceformer_llama as il\n"
            "il.use_backend('stock'); il.Llama(None, n_ctx=64)\n"
            "try:\n    il.use_backend('patched')\nexcept il.IceformerError as e:\n    print('refused:', e)\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the stock backend is already loaded" in proc.stdout


def test_llama_cpp_imported_with_other_libraries_is_refused(builds, bundled_model):
    code = ("import os; os.environ['LLAMA_CPP_LIB_PATH'] = %r\n"
            "import llama_cpp\n"
            "import iceformer_llama as il\n"
            "try:\n    il.Llama(None, n_ctx=64)\nexcept il.IceformerError as e:\n    print('refused:', e)\n"
            % str(builds["stock"].lib_dir))
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert "refused: llama_cpp was imported before" in proc.stdout


def test_iceformer_attention_on_stock_is_refused(builds, bundled_model):
    code = ("import iceformer_llama as il\nil.use_backend('stock')\n"
            "try:\n    il.Llama(None, n_ctx=64, attention='iceformer')\nexcept il.IceformerError as e:\n"
            "    print('refused:', e)\n")
    proc = run_py(code)
    assert "refused: iceformer attention needs the patched backend" in proc.stdout, proc.stderr


def test_unknown_keyword_arguments_are_errors(builds, bundled_model):
    code = ("import iceformer_llama as il\n"
            "try:\n    il.Llama(None, n_ctxx=64)\nexcept TypeError as e:\n    print('TypeError:', e)\n")
    proc = run_py(code)
    assert "TypeError: Llama() got unexpected keyword argument(s): n_ctxx" in proc.stdout, proc.stderr


def test_a_missing_build_is_named(tmp_path):
    code = ("import iceformer_llama as il\n"
            "try:\n    il.Llama(None)\nexcept il.IceformerError as e:\n    print('refused:', e)\n")
    proc = run_py(code, env={"ICEFORMER_LLAMA_CACHE": str(tmp_path)})
    assert "refused: the patched llama.cpp is not built; run: python -m iceformer_llama build" in proc.stdout, \
        proc.stderr


def test_drop_in_methods(builds, bundled_model):
    code = ("import iceformer_llama as il\n"
            "llm = il.Llama(None, n_ctx=256, n_threads=2)\n"
            "out = llm('The capital of France is', max_tokens=3, temperature=0)\n"
            "print(out['choices'][0]['text'].strip().split()[0])\n"
            "chunks = list(llm.create_completion('1, 2, 3,', max_tokens=3, temperature=0, stream=True))\n"
            "print(len(chunks) >= 3)\n"
            "r = llm.create_chat_completion(messages=[{'role': 'user', 'content': 'Say hi'}], max_tokens=4)\n"
            "print(r['choices'][0]['message']['role'])\n"
            "t = llm.tokenize(b'Hello world'); llm.reset(); llm.eval(t); print(llm.n_tokens == len(t), llm.scores.shape[1] > 1000)\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0].startswith("Paris") and words[1:] == ["True", "assistant", "True", "True"], proc.stdout


def test_greedy_generation_matches_llama_cpps_greedy_sampler(builds, bundled_model):
    """generate() at temperature 0 reads the argmax straight from the logits; llama.cpp's own sampler
    chain at temperature 0 must pick the same tokens."""
    code = ("import iceformer_llama as il\n"
            "from iceformer_llama.runtime.generate import generate\n"
            "llm = il.Llama(None, n_ctx=256, attention='iceformer')\n"
            "prompt = 'The three primary colours are'\n"
            "fast = generate(llm, prompt, n_predict=24).text\n"
            "toks = llm.tokenize(prompt.encode(), add_bos=True, special=False)\n"
            "llm.reset(); llm.eval(toks); out = []\n"
            "for _ in range(24):\n"
            "    t = llm.sample(temp=0.0, top_k=40, top_p=0.95, repeat_penalty=1.0)\n"
            "    out.append(t); llm.eval([t])\n"
            "print(repr(fast)); print(repr(llm.detokenize(out).decode()))\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    fast, slow = proc.stdout.splitlines()
    assert fast == slow and len(fast) > 10
