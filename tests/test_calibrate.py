"""calibrate: the level choice on fixed figures (known answers), the profile store (round trip, damaged
files, keyed by content), and the command end to end on the bundled model at a short length: the
profile it writes is what generate and Llama then run, for that model file only."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_cli
from iceformer_llama.evaluation import calibrate as C
from iceformer_llama.paths import sha256_of
from iceformer_llama.runtime import calibration
from iceformer_llama.runtime.settings import DEFAULT_SPEED, LEVEL_PROMISES, SPEED_LEVELS, IceformerSettings

FLOOR = {"top1_agreement": 0.95, "mean_kl": 0.004, "ppl": 10.0, "ppl_vs_dense": 0.0}


def rec(document, ppl_vs_dense, top1, floor=FLOOR):
    return {"document": document, "n_tokens": 512, "top1_agreement": top1, "mean_kl": 0.01,
            "ppl_vs_dense": ppl_vs_dense, "floor": floor, "prefill_seconds_dense": 2.0,
            "prefill_seconds_iceformer": 1.0}


# Three rungs on two documents (floor top-1 0.95):
#   rung 0: A +10% ppl, 8 points below the floor (only level 8); B exact         -> level 8
#   rung 1: A +1.5%, 1 point below (level 4 and up); B +4%, at the floor (6 up)  -> levels 6, 7
#   rung 2: A +0.1%, at the floor; B +0.2%, 0.2 points below (level 1)           -> levels 1-5
MEASURED = [
    [rec("A", 0.10, 0.87), rec("B", 0.001, 0.95)],
    [rec("A", 0.015, 0.94), rec("B", 0.04, 0.95)],
    [rec("A", 0.001, 0.95), rec("B", 0.002, 0.948)],
]


def test_each_level_gets_the_cheapest_rung_that_keeps_its_promise_on_every_document():
    chosen = C.choose_levels(MEASURED, C.GROUPED[:3])
    assert chosen == {8: (0, True), 7: (1, True), 6: (1, True), 5: (2, True), 4: (2, True), 3: (2, True),
                      2: (2, True), 1: (2, True)}


def test_a_level_no_rung_meets_gets_the_most_exact_grouped_rung_marked_unmet():
    chosen = C.choose_levels(MEASURED[:2], C.LADDER)
    last = len(C.GROUPED) - 1
    assert chosen[8] == (0, True) and chosen[6] == (1, True)
    assert all(chosen[level] == (last, False) for level in (1, 2, 3, 4, 5))
    assert not C.meets([rec("A", 0.0, 0.95, floor=None)], 8)   # no floor: the top-1 promise cannot be judged


def _timed(records, seconds):
    return [{**r, "prefill_seconds_iceformer": seconds} for r in records]


def test_the_families_compete_on_measured_prefill_time_level_by_level():
    """Grouped rungs 0-2 as MEASURED (1 s per document); per-head rungs: the first as grouped rung 1 (meets
    levels 6-8) but faster, the second as grouped rung 2 (levels 1-5) but slower. Each level gets the faster
    family's cheapest rung that keeps its promise (level 8: the per-head rung, faster than grouped rung 0,
    which also keeps it); a rung not run (None) is never chosen."""
    ladder = C.GROUPED[:3] + C.PER_HEAD[:3]
    g = len(C.GROUPED[:3])
    assert C.families(ladder) == [[0, 1, 2], [3, 4, 5]]
    measured = MEASURED + [_timed(MEASURED[1], 0.5), _timed(MEASURED[2], 2.0), None]
    chosen = C.choose_levels(measured, ladder)
    assert chosen == {8: (g, True), 7: (g, True), 6: (g, True), 5: (2, True), 4: (2, True), 3: (2, True),
                      2: (2, True), 1: (2, True)}
    measured = MEASURED + [_timed(MEASURED[1], 0.5), _timed(MEASURED[2], 0.9), None]
    assert all(C.choose_levels(measured, ladder)[level] == (g + 1, True) for level in (1, 2, 3, 4, 5))
    profile = C.make_profile(sha256="ab" * 32, info=_Info, model="/m.gguf", lengths=[512], texts=[], ladder=ladder,
                             measured=measured, command="calibrate", threads=2)
    assert profile["rungs"][5] is None and profile["levels"]["3"]["knobs"]["group_blocks"] is False
    assert profile["levels"]["8"]["knobs"]["group_blocks"] is False
    assert C.format_levels(profile).splitlines()[3].split()[:2] == ["3", "head"]   # header, levels 1, 2, 3


def test_models_without_gqa_calibrate_the_grouped_family_only():
    class Shape:
        n_head, n_head_kv = 32, 32
    assert C.ladder_for("auto", Shape) == C.GROUPED and C.ladder_for("on", Shape) == C.LADDER
    Shape.n_head_kv = 8
    assert C.ladder_for("auto", Shape) == C.LADDER and C.ladder_for("off", Shape) == C.GROUPED
    Shape.n_head_kv = None   # not known (per-layer metadata): measure both
    assert C.ladder_for("auto", Shape) == C.LADDER


def test_promises_tighten_with_the_level_and_the_ladder_runs_from_cheap_to_exact():
    assert set(LEVEL_PROMISES) == set(SPEED_LEVELS)
    for level in list(SPEED_LEVELS)[1:]:
        for key in ("ppl_tolerance", "top1_margin"):
            assert LEVEL_PROMISES[level][key] > LEVEL_PROMISES[level - 1][key]
    assert LEVEL_PROMISES[DEFAULT_SPEED] == {"ppl_tolerance": 0.01, "top1_margin": 0.015}   # issue #21's target
    for family in (C.GROUPED, C.PER_HEAD):
        cost = [r["top_blocks"] * r["block_size"] + r["window"] for r in family]
        assert cost == sorted(cost) and len(set(cost)) == len(cost)
        assert len({r["group_blocks"] for r in family}) == 1
    assert C.LADDER == C.GROUPED + C.PER_HEAD and C.GROUPED[0]["group_blocks"] is True
    for rung in C.LADDER:
        IceformerSettings(**rung)
        assert set(rung) == set(C.LADDER[0])


def test_rungs_keep_their_share_of_the_blocks_past_the_calibrated_length():
    """At the calibrated length a rung's share asks for no more than its top_blocks (it runs as measured);
    past it the budget grows in proportion: twice the context, twice the blocks."""
    held = C.hold_share(C.LADDER, 8192)
    for rung, h in zip(C.LADDER, held):
        assert {k: v for k, v in h.items() if k != "block_share"} == {k: v for k, v in rung.items() if k != "block_share"}
        assert math.ceil(h["block_share"] * 512) <= rung["top_blocks"]            # 8k: 512 blocks of 16
        assert rung["top_blocks"] * 2 - 1 <= math.ceil(h["block_share"] * 1024) <= rung["top_blocks"] * 2
    assert [h["block_share"] for h in C.hold_share([C.GROUPED[-1]], 512)] == [1.0]   # 320 blocks of a 32-block context
    assert C.hold_share(C.GROUPED, 4096)[-1]["block_share"] == 1.0


class _Info:
    name, architecture = "Tiny", "llama"


def _profile(sha="ab" * 32, measured=MEASURED):
    texts = [{"document": d, "class": "user", "split": "user", "n_tokens": 512, "first_position": 255,
              "ppl_dense": 10.0, "floor": FLOOR} for d in ("A", "B")]
    return C.make_profile(sha256=sha, info=_Info, model="/m.gguf", lengths=[512], texts=texts, ladder=C.GROUPED[:3],
                          measured=measured, command="calibrate", threads=2)


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    monkeypatch.setenv("ICEFORMER_LLAMA_PROFILES", str(folder))
    calibration._warned.clear()
    return folder


def test_profile_round_trip_and_what_a_level_runs(profiles):
    path = calibration.save_profile(_profile())
    assert path == profiles / f"{'ab' * 32}.json"
    data = json.loads(path.read_text())
    assert data["format"] == calibration.PROFILE_FORMAT and data["model_name"] == "Tiny" and data["lengths"] == [512]
    assert [d["document"] for d in data["documents"]] == ["A", "B"] and data["created"]
    assert data["levels"]["8"]["knobs"]["top_blocks"] == C.LADDER[0]["top_blocks"]
    assert data["levels"]["3"]["meets"] is True and data["levels"]["3"]["ppl_vs_dense_max"] == pytest.approx(0.002)
    assert data["levels"]["3"]["top1_minus_floor_min"] == pytest.approx(-0.002)
    profile = calibration.load_profile("ab" * 32)
    assert profile.levels[3] == C.LADDER[2] and profile.levels[6] == C.LADDER[1]
    # the default level's knobs, a level's, and explicit knobs winning over the level's
    assert profile.settings_for(IceformerSettings()).top_blocks == C.LADDER[2]["top_blocks"]
    assert profile.settings_for(IceformerSettings(speed=7)).top_blocks == C.LADDER[1]["top_blocks"]
    s = profile.settings_for(IceformerSettings(speed=8, window=99))
    assert (s.speed, s.top_blocks, s.window, s.layer_budget) == (None, C.LADDER[0]["top_blocks"], 99, ())


@pytest.mark.parametrize("text,why", [
    ("{not json", "expecting"),
    (json.dumps({"format": 99}), "format 99"),
    (json.dumps({"format": 1, "model_sha256": "ab" * 32, "levels": {}}), "made by an older version: format 1"),
    ("[1, 2]", "not a json object"),
    ("LEVELS", "top_blocks must be"),
    ("META", "level 4: meets"),
])
def test_a_damaged_profile_is_ignored_with_one_warning_per_file(profiles, capsys, text, why):
    sha = "cd" * 32
    good = _profile(sha)
    if text == "LEVELS":
        good["levels"]["2"]["knobs"]["top_blocks"] = "many"
        text = json.dumps(good)
    elif text == "META":
        good["levels"]["4"]["meets"] = "yes"
        text = json.dumps(good)
    profiles.mkdir(parents=True)
    (profiles / f"{sha}.json").write_text(text)
    assert calibration.load_profile(sha) is None
    assert calibration.load_profile(sha) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ignoring the calibration profile"), lines
    assert why.lower() in lines[0].lower()


def test_profiles_are_keyed_by_content_and_the_hash_is_memoised(profiles, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 100)
    b.write_bytes(b"GGUF" + b"\0" * 99 + b"\1")
    assert calibration.profile_for(a) is None and not profiles.exists()   # no profile at all: nothing hashed
    sha_a, sha_b = calibration.model_sha256(a), calibration.model_sha256(b)
    assert sha_a != sha_b and len(sha_a) == 64
    calibration.save_profile(_profile(sha_a))
    assert calibration.profile_for(a) is not None and calibration.profile_for(b) is None
    shutil.copy(a, tmp_path / "renamed.gguf")
    assert calibration.profile_for(tmp_path / "renamed.gguf") is not None   # same content, another name
    # memoised by path, size and mtime_ns: same size and mtime is not rehashed, a new mtime is
    st = os.stat(a)
    a.write_bytes(b"GGUF" + b"\0" * 99 + b"\2")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert calibration.model_sha256(a) == sha_a
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert calibration.model_sha256(a) not in (sha_a, sha_b)


# ------------------------------------------------------------------------------------------------
# End to end on the bundled model


def _notes(tmp_path, n=60):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"Note {i}: the kettle in room {i} was descaled on day {3 * i % 7}." for i in range(n)))
    return path


@pytest.fixture(scope="module")
def calibrated(patched_build, bundled_model, tmp_path_factory):
    """calibrate on one text file at 512 tokens; (profile JSON, env with its profiles folder, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    env = {"ICEFORMER_LLAMA_PROFILES": str(tmp / "profiles")}
    proc = run_cli("calibrate", "--lengths", "512", "--positions", "256", "--text-file", _notes(tmp),
                   "--threads", "2", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (path,) = [p for p in (tmp / "profiles").glob("*.json") if p.name != "sha256-memo.json"]
    return json.loads(path.read_text()), env, proc.stdout, proc.stderr


def test_calibrate_writes_a_profile_for_the_models_content(calibrated, bundled_model):
    profile, env, stdout, stderr = calibrated
    assert profile["model_sha256"] == sha256_of(bundled_model)
    assert profile["lengths"] == [512] and [d["document"] for d in profile["documents"]] == ["file:notes.txt"]
    assert profile["documents"][0]["first_position"] == 512 - 1 - 256 and profile["documents"][0]["floor"]
    assert set(profile["levels"]) == {str(level) for level in SPEED_LEVELS}
    for entry in profile["levels"].values():
        assert entry["knobs"] in [json.loads(json.dumps(r)) for r in C.hold_share(C.LADDER, 512)]
        assert isinstance(entry["meets"], bool)
    # the bundled model's query heads share KV heads: both families ran, each stopping at its first rung,
    # which meets level 1 (every row runs dense at 512 tokens)
    assert len(profile["rungs"]) == len(C.LADDER)
    assert [i for i, rung in enumerate(profile["rungs"]) if rung] == [0, len(C.GROUPED)]
    assert profile["layers"] is None and "no layer shaping" in stderr   # 512 tokens: every row runs dense
    assert "estimated up to about" in stderr and "wrote" in stderr and "run dense attention" in stderr
    assert "worst ppl vs dense" in stdout and len(stdout.strip().splitlines()) == 1 + len(SPEED_LEVELS)


def test_generate_runs_the_calibrated_levels_and_explicit_knobs_win(calibrated):
    profile, env, _, _ = calibrated
    level3 = profile["levels"]["3"]["knobs"]
    # 512 tokens is below min_n_kv (1024): every rung runs the same exact rows, so calibration picks the
    # cheapest rung (or, if none meets level 1, the most exact): never level 3's uncalibrated 80 blocks
    assert level3["top_blocks"] != SPEED_LEVELS[3]["top_blocks"]

    def params(*flags):
        proc = run_cli("generate", "-p", "Hi", "-n", "1", "--ctx-size", "128", "--threads", "2", "--json", *flags,
                       env=env)
        assert proc.returncode == 0, proc.stderr
        assert "hint" not in proc.stderr and "warning" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)["settings"]["iceformer"]

    p = params()
    assert (p["top_blocks"], p["window"], p["group_blocks"]) == (level3["top_blocks"], level3["window"],
                                                                 level3["group_blocks"])
    p = params("--speed", "6", "--window", "99")
    assert (p["top_blocks"], p["window"]) == (profile["levels"]["6"]["knobs"]["top_blocks"], 99)


def test_bench_runs_and_records_the_calibrated_default(calibrated, tmp_path):
    profile, env, _, _ = calibrated
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--lengths", "256", "--repeat", "1", "--warmup", "0", "-n", "2", "--threads", "1",
                   "--stock-flash-attn", "off", "--out", out, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["calibration_profile"].startswith(env["ICEFORMER_LLAMA_PROFILES"])
    level3 = profile["levels"]["3"]["knobs"]
    params = result["patched"]["params"]
    assert (params["top_blocks"], params["block_share"], params["group_blocks"]) == (
        level3["top_blocks"], pytest.approx(level3["block_share"]), level3["group_blocks"])


def test_another_model_file_does_not_pick_the_profile_up(calibrated, bundled_model, tmp_path):
    _, env, _, _ = calibrated
    other = tmp_path / "other.gguf"
    shutil.copy(bundled_model, other)
    with open(other, "r+b") as f:   # one byte of the last tensor's data: llama.cpp still loads it
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    code = ("import iceformer_llama as il\n"
            f"llm = il.Llama({str(other)!r}, n_ctx=64)\n"
            "p = llm.attention_params()\n"
            "print(llm.profile is None, p['top_blocks'], p['window'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **env), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(SPEED_LEVELS[3]["top_blocks"]), str(SPEED_LEVELS[3]["window"])]
    assert "hint" not in proc.stderr   # the library class prints no hint; the commands do
    proc = run_cli("generate", "--model", other, "-p", "Hi", "-n", "1", "--ctx-size", "64", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    hints = [ln for ln in proc.stderr.splitlines() if ln.startswith("hint:")]
    assert len(hints) == 1 and "calibrate" in hints[0]


def test_a_damaged_profile_file_gives_one_warning_and_no_crash(patched_build, bundled_model, tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / f"{sha256_of(bundled_model)}.json").write_text('{"format": 1, "levels": [')
    proc = run_cli("generate", "-p", "Hi", "-n", "1", "--ctx-size", "64", "--json", "--threads", "2",
                   env={"ICEFORMER_LLAMA_PROFILES": str(folder)})
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "ignoring the calibration profile" in warnings[0], proc.stderr
    assert json.loads(proc.stdout)["settings"]["iceformer"]["top_blocks"] == SPEED_LEVELS[3]["top_blocks"]


# ------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit


def test_calibrate_refuses_a_missing_model(tmp_path):
    proc = run_cli("calibrate", "--model", tmp_path / "absent.gguf", "--lengths", "512",
                   env={"ICEFORMER_LLAMA_PROFILES": str(tmp_path / "p")}, timeout=120)
    assert_one_line_error(proc, "absent.gguf")


def test_calibrate_refuses_lengths_above_the_trained_context(patched_build, bundled_model, tmp_path):
    from iceformer_llama.runtime.models import check_gguf

    cap = check_gguf(bundled_model).context_length
    proc = run_cli("calibrate", "--lengths", f"512,{2 * cap}", env={"ICEFORMER_LLAMA_PROFILES": str(tmp_path / "p")},
                   timeout=120)
    assert_one_line_error(proc, f"--lengths {2 * cap}", f"trained context of {cap}")
    assert not list((tmp_path / "p").glob("[0-9a-f]*.json"))


def test_calibrate_refuses_a_text_file_shorter_than_the_lengths(patched_build, bundled_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    proc = run_cli("calibrate", "--lengths", "512", "--text-file", short, "--threads", "2",
                   env={"ICEFORMER_LLAMA_PROFILES": str(tmp_path / "p")}, timeout=300)
    assert_one_line_error(proc, f"--text-file {short} has", "fewer than the 512 asked for")
    assert not list((tmp_path / "p").glob("[0-9a-f]*.json"))
