"""coherence validate: the verdict rules, the perturbations' clean-up, and one real
experiment (a delayed rank must raise the straggler penalty) end to end."""

from __future__ import annotations

import json
import os
import time

import pytest

from harness.validate import INJECT_ENV, Perturbation, judge, null_fires, suite_for
from tests.conftest import coherence


def test_judge_needs_the_expected_direction_beyond_the_band():
    assert judge(1.0, 1.1, 1.5, "up", 0.1)["verdict"] == "responds"
    assert judge(1.0, 1.1, 1.15, "up", 0.1)["verdict"] == "does not respond"  # inside max(0.1, 0.1)
    assert judge(1.0, 1.0, 0.5, "up", 0.1)["verdict"] == "does not respond"  # the wrong way
    assert judge(1.0, 1.0, 0.5, "down", 0.1)["verdict"] == "responds"
    assert judge(None, 1.0, 2.0, "up", 0.1)["verdict"] == "not measurable"
    # The band is the larger of the repeat spread and the floor.
    assert judge(1.0, 1.4, 1.5, "up", 0.1)["band"] == pytest.approx(0.4)


def test_null_fires_past_both_the_relative_and_the_absolute_floor():
    assert null_fires(0.15, 0.05, 0.5) is True
    assert null_fires(0.15, 0.05, 0.5, null_abs=0.1) is False
    assert null_fires(1.0, 1.2, 0.5) is False
    assert null_fires(None, 1.0, 0.5) is None


def test_hog_processes_are_killed_and_the_delay_is_unset():
    with Perturbation("hog", {"hog_processes": 1}) as pert:
        pid = pert.pids[0]
        os.kill(pid, 0)  # alive
    time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with Perturbation("delay", {"slow_rank_delay_s": 0.01}):
        assert os.environ[INJECT_ENV] == "1:0.01"
    assert INJECT_ENV not in os.environ


def test_suite_overrides_merge_into_the_probe_params():
    base = {"probes": {"composite.disagg_request": {"params": {"model": "tiny", "tokens": 8}}}}
    doc = suite_for(base, {"composite.disagg_request": {"kv_layout": "paged"}})
    assert doc["probes"]["composite.disagg_request"]["params"] == {"model": "tiny", "tokens": 8, "kv_layout": "paged"}
    assert base["probes"]["composite.disagg_request"]["params"] == {"model": "tiny", "tokens": 8}


def test_an_unknown_experiment_is_a_one_line_error(tmp_path):
    proc = coherence("validate", "--experiment", "gremlins", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown experiment 'gremlins'" in proc.stderr


SLOW_RANK_SUITE = """
timeout_s: 120
cpu_ranks: 2
timing: {warmup: 3, min_reps: 20, max_reps: 60, budget_s: 1.0}
probes:
  composite.tp_decode_step:
    params: {model: tiny, layers: 2, batch: 4, ctx: 512, dtype: fp32, world_size: 2}
"""


@pytest.mark.slow
def test_a_delayed_rank_raises_the_straggler_penalty_end_to_end(tmp_path, write_suite):
    proc = coherence("validate", "--experiment", "slow rank", "--suite", str(write_suite(SLOW_RANK_SUITE)),
                     "--out", str(tmp_path / "runs"), "--json", timeout=600)
    report = json.loads(proc.stdout)
    (result,) = report["experiments"][0]["results"]
    assert result["indicator"] == "mode1.straggler_penalty"
    assert result["verdict"] == "responds", result
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The perturbed run says it was perturbed.
    import pandas as pd

    cases = pd.read_parquet(os.path.join(report["runs"]["slow rank"], "cases.parquet"))
    tp = cases[cases["probe"] == "composite.tp_decode_step"].iloc[0]
    assert "injected_delay_s" in tp["extra"]
