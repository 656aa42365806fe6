"""The commands users run, end to end on the bundled model, and their answers to bad input."""

import json
import re

import pytest

from conftest import assert_one_line_error, run_cli

JSON_FIELDS = {"text", "prompt_tokens", "generated_tokens", "prefill_seconds", "decode_seconds",
               "prefill_tokens_per_second", "decode_tokens_per_second", "backend", "attention", "settings"}


@pytest.mark.parametrize("backend,flag,attention", [
    ("patched", "iceformer", "iceformer"), ("patched", "dense", "dense"), ("stock", "dense", "dense"),
    ("patched", None, "iceformer"), ("stock", None, "dense"),   # no --attention: the backend's default
], ids=["patched-iceformer", "patched-dense", "stock-dense", "patched-default", "stock-default"])
def test_generate_json(builds, bundled_model, backend, flag, attention):
    proc = run_cli("generate", "--backend", backend, *(["--attention", flag] if flag else []),
                   "-p", "The capital of France is", "-n", "6", "--ctx-size", "256", "--threads", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert JSON_FIELDS <= set(out)
    assert out["backend"] == backend and out["attention"] == attention
    assert out["prompt_tokens"] >= 5 and out["generated_tokens"] == 6
    assert "Paris" in out["text"]
    assert out["prefill_seconds"] > 0 and out["decode_tokens_per_second"] > 0
    assert out["settings"]["ctx_size"] == 256
    assert out["settings"]["iceformer"]["mode"] == attention


def test_generate_json_reports_the_models_layers(builds, bundled_model):
    """The per-layer settings cover the bundled model's 30 layers, not the library's 256 slots."""
    proc = run_cli("generate", "--dense-layers", "2,29", "-p", "Hi", "-n", "1", "--ctx-size", "128",
                   "--threads", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    params = json.loads(proc.stdout)["settings"]["iceformer"]
    assert len(params["layer_budget"]) == 30, params["layer_budget"]
    assert params["dense_layers"] == [2, 29]


def test_generate_streams_plain_text(builds, bundled_model):
    proc = run_cli("generate", "-p", "The capital of France is", "-n", "4", "--ctx-size", "128")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_chat_with_piped_stdin(builds, bundled_model):
    proc = run_cli("chat", "-n", "12", "--temp", "0", "--ctx-size", "1024",
                   input="What is the capital of France?\n/reset\nSay hello.\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    # one reply per turn, the /reset notice between them, nothing after /exit
    assert len(lines) == 3 and lines[1] == "(conversation cleared)", lines
    assert lines[0].strip() and lines[2].strip()


def test_chat_samples_a_fresh_seed_each_run_and_says_which(builds, bundled_model):
    """At the default temperature (0.7) two runs without --seed differ (32 sampled tokens of a poem: a repeat
    is all but impossible), each says its seed once on stderr, and --seed with that seed gives the same reply."""
    turn = "Write a short poem about the sea.\n"
    common = ("chat", "-n", "32", "--ctx-size", "512", "--threads", "2")
    runs = [run_cli(*common, input=turn) for _ in range(2)]
    seeds = []
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        found = re.findall(r"use --seed (\d+) to reproduce", proc.stderr)
        assert len(found) == 1, proc.stderr
        seeds.append(int(found[0]))
    assert seeds[0] != seeds[1]
    assert runs[0].stdout.strip() and runs[0].stdout != runs[1].stdout, [r.stdout for r in runs]
    again = run_cli(*common, "--seed", seeds[0], input=turn)
    assert again.returncode == 0, again.stderr
    assert again.stdout == runs[0].stdout
    assert "--seed" not in again.stderr  # a seed given is not reported back


def test_chat_speed_command_retunes_the_live_context(builds, bundled_model):
    proc = run_cli("chat", "-n", "8", "--temp", "0", "--ctx-size", "1024",
                   input="Name a colour.\n/speed\n/speed 2\n/speed 12\n/speed\nName a fruit.\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "(speed 3 (default); /speed 1..8, 1 = most exact)" in lines
    assert "(speed 2: block_size=16, top_blocks=280, window=128, block_share=0.75)" in lines
    assert "(speed must be a number from 1 to 8, got '12')" in lines
    # the setting stuck, and the conversation went on on the same context
    assert lines.count("(speed 2; /speed 1..8, 1 = most exact)") == 1
    assert lines[-1].strip() and not lines[-1].startswith("(")


def test_chat_says_when_the_context_is_full(builds, bundled_model):
    long_turn = "Please repeat: " + "lorem ipsum dolor sit amet " * 40
    proc = run_cli("chat", "-n", "8", "--temp", "0", "--ctx-size", "128", input=long_turn + "\nHi\n")
    assert proc.returncode == 0, proc.stderr
    assert "context is full" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_prompt_longer_than_the_context(builds, bundled_model):
    proc = run_cli("generate", "-p", "word " * 200, "-n", "4", "--ctx-size", "64")
    assert_one_line_error(proc, "tokens but the context holds 64")


def test_missing_model_file(tmp_path):
    assert_one_line_error(run_cli("generate", "-p", "x", "--model", tmp_path / "absent.gguf"), "not found")


def test_text_file_named_gguf(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are my notes, not a model\n")
    assert_one_line_error(run_cli("generate", "-p", "x", "--model", fake), "not a GGUF file")


def test_truncated_gguf(tmp_path, bundled_model):
    cut = tmp_path / "cut.gguf"
    with open(bundled_model, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    assert_one_line_error(run_cli("generate", "-p", "x", "--model", cut), "truncated")


def test_unknown_alias():
    assert_one_line_error(run_cli("generate", "-p", "x", "--model", "llama-9-000b"), "unknown model")


def test_offline_download(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    assert_one_line_error(run_cli("download", "llama-2-7b", env=env, timeout=120), "hub")


@pytest.mark.parametrize("args,fragment", [
    (("generate", "-p", "x", "--ctx-size", "0"), "--ctx-size"),
    (("generate", "-p", "x", "-n", "-3"), "-n"),
    (("chat", "--threads", "0"), "--threads"),
    (("generate", "-p", "x", "--top-k", "-1"), "--top-k"),
    (("generate", "-p", "x", "--backend", "gpu"), "--backend"),
    (("generate",), "--prompt"),
    (("generate", "-p", "x", "--speed", "9"), "--speed"),
    (("generate", "-p", "x", "--speed", "0"), "--speed"),
    (("generate", "-p", "x", "--backend", "stock", "--speed", "2", "--sinks", "8"), "(--speed, --sinks) need the patched"),
    (("generate", "-p", "x", "--backend", "stock", "--attention", "iceformer"), "--attention iceformer needs the patched"),
    (("chat", "--backend", "stock", "--attention", "iceformer"), "--attention iceformer needs the patched"),
])
def test_bad_arguments(args, fragment):
    assert_one_line_error(run_cli(*args), fragment)


@pytest.mark.parametrize("flags,fragment", [
    (("--attention", "iceformer"), "--attention iceformer needs the patched"),
    (("--top-blocks", "10"), "(--top-blocks) need the patched"),
])
def test_iceformer_flags_on_stock_chosen_by_the_environment(flags, fragment):
    """$ICEFORMER_LLAMA_BACKEND=stock refuses IceFormer flags as --backend stock does (no silent dense run)."""
    proc = run_cli("generate", "-p", "x", *flags, env={"ICEFORMER_LLAMA_BACKEND": "stock"})
    assert_one_line_error(proc, fragment)


def test_missing_prompt_file(tmp_path):
    assert_one_line_error(run_cli("generate", "--prompt-file", tmp_path / "none.txt"), "cannot read prompt file")
