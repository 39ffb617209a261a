"""Suite validation: every mistake is one line naming the culprit, exit code 2."""

from __future__ import annotations

import pytest

from harness.config import load_suite
from harness.errors import UserError
from tests.conftest import coherence

BAD_SUITES = {
    "unknown top-level key": ("probes: {memory.triad: {}}\nrepeats: 3\n", "unknown key 'repeats'"),
    "unknown probe": ("probes: {memory.triangle: {}}\n", "unknown probe 'memory.triangle'"),
    "unknown parameter": ("probes: {gemm.square: {params: {side: [64]}}}\n", "unknown parameter 'side'"),
    "wrong parameter type": ("probes: {gemm.square: {params: {n: [fast]}}}\n", "probes.gemm.square.params.n: expected int, got 'fast'"),
    "bad choice": ("probes: {gemm.square: {params: {dtype: [fp7]}}}\n", "'fp7' is not one of"),
    "impossible size": ("probes: {gemm.square: {params: {n: [0]}}}\n", "below the minimum"),
    "wrong timing type": ("timing: {budget_s: soon}\nprobes: {memory.triad: {}}\n", "timing.budget_s: expected float"),
    "unknown timing key": ("timing: {reps: 3}\nprobes: {memory.triad: {}}\n", "unknown key 'reps'"),
    "wrong timeout type": ("timeout_s: [1]\nprobes: {memory.triad: {}}\n", "timeout_s: expected int or float"),
    "unknown probe key": ("probes: {memory.triad: {repeat: 2}}\n", "unknown key 'repeat'"),
    "no probes": ("name: empty\n", "'probes' must be a non-empty mapping"),
    "not a mapping": ("- memory.triad\n", "a suite is a mapping"),
    "invalid yaml": ("probes: {memory.triad: {}\n", "invalid YAML"),
    "bad mnk": ("probes: {gemm.shaped: {params: {mnk: [12x34]}}}\n", "does not match the form MxNxK"),
    "min above max": ("timing: {min_reps: 10, max_reps: 2}\nprobes: {memory.triad: {}}\n", "max_reps (2) is below min_reps (10)"),
    "zero rounds": ("rounds: 0\nprobes: {memory.triad: {}}\n", "rounds: must be an integer from 1 to 100, got 0"),
    "rounds as text": ("rounds: three\nprobes: {memory.triad: {}}\n", "rounds: expected int, got 'three'"),
    "fractional rounds": ("rounds: 2.5\nprobes: {memory.triad: {}}\n", "rounds: expected int, got 2.5"),
}


@pytest.mark.parametrize("text,expected", list(BAD_SUITES.values()), ids=list(BAD_SUITES))
def test_bad_suite_is_a_user_error_naming_the_culprit(write_suite, text, expected):
    path = write_suite(text)
    with pytest.raises(UserError) as info:
        load_suite(str(path))
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["unknown top-level key", "wrong parameter type", "unknown probe"])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, write_suite, case):
    path = write_suite(BAD_SUITES[case][0])
    proc = coherence("run", "--suite", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("coherence: error: ") and BAD_SUITES[case][1] in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_bad_arguments_exit_2(tmp_path):
    assert coherence("run", "--suite", "nosuchsuite").returncode == 2
    proc = coherence("run", "--devices", "cuda:7", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no device 'cuda:7'" in proc.stderr
    proc = coherence("run", "--probe", "nosuchprobe", "--out", str(tmp_path))
    assert proc.returncode == 2 and "nosuchprobe" in proc.stderr
    proc = coherence("show", "nosuchrun", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no run 'nosuchrun'" in proc.stderr
    proc = coherence("run", "--resume", "x", "--suite", "quick", "--out", str(tmp_path))
    assert proc.returncode == 2 and "drop --suite" in proc.stderr


def test_shipped_suites_validate():
    for name in ("quick", "standard"):
        suite = load_suite(name)
        assert {p.name.split(".")[0] for p in suite.probes} >= {"memory", "gemm", "overhead"}
    # Both carry their own run-to-run variance (configs/*.yaml say what it costs).
    assert load_suite("quick").rounds == 3 and load_suite("standard").rounds == 3


def test_probe_overrides_merge_with_suite_timing(write_suite):
    path = write_suite(
        "timing: {min_reps: 4, max_reps: 9}\n"
        "probes:\n  gemm.square: {params: {n: 64}, timing: {max_reps: 20}, timeout_s: 7}\n"
    )
    (entry,) = load_suite(str(path)).probes
    assert entry.grid == {"n": [64], "dtype": ["fp32", "bf16"]}
    assert entry.timing.min_reps == 4 and entry.timing.max_reps == 20
    assert entry.timeout_s == 7.0


def test_rounds_default_to_one_and_are_read_and_resolved(write_suite):
    assert load_suite(str(write_suite("probes: {memory.triad: {}}\n"))).rounds == 1
    suite = load_suite(str(write_suite("rounds: 3\nprobes: {memory.triad: {}}\n", "r3.yaml")))
    assert suite.rounds == 3 and suite.as_dict()["rounds"] == 3


@pytest.mark.parametrize("value", ["0", "101", "-2"])
def test_bad_rounds_option_is_one_line_exit_2(value):
    proc = coherence("run", "--suite", "quick", "--rounds", value, "--out", "/nonexistent-g-rounds")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--rounds" in proc.stderr, proc.stderr


def test_resume_refuses_rounds():
    proc = coherence("run", "--resume", "some-run", "--rounds", "2", "--out", "/nonexistent-g-rounds")
    assert proc.returncode == 2 and "drop --rounds" in proc.stderr, proc.stderr
