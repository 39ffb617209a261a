"""The runner end to end through the CLI: isolation of failing cases, exit codes,
resume after SIGKILL, and the run folder per schema v1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness import SCHEMA_VERSION
from harness.store import CASE_COLUMNS, SAMPLE_COLUMNS, TELEMETRY_COLUMNS
from tests.conftest import REPO, coherence

FAULTS = """
plugins: [tests.plugins.fault_probes]
timeout_s: 60
timing: {warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.2}
probes:
  testing.raises: {}
  testing.sleeps:
    params: {seconds: 30.0}
    timeout_s: 3
  testing.crashes: {}
  testing.wrong: {}
  testing.counter:
    params: {i: [0, 1], seconds: 0.01}
"""


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_failing_cases_are_recorded_and_the_run_goes_on(tmp_path, write_suite):
    suite = write_suite(FAULTS)
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = coherence("run", "--suite", str(suite), "--out", str(out), "--devices", "cpu", "--quiet")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    run = only_run(out)
    cases = pd.read_parquet(run / "cases.parquet").set_index("probe")
    assert cases.loc["testing.raises", "status"] == "failed"
    assert "deliberate failure in prepare" in cases.loc["testing.raises", "reason"]
    assert cases.loc["testing.sleeps", "status"] == "timeout"
    assert "3 s" in cases.loc["testing.sleeps", "reason"]
    assert cases.loc["testing.crashes", "status"] == "failed"
    assert "SIGSEGV" in cases.loc["testing.crashes", "reason"]
    assert cases.loc["testing.wrong", "status"] == "failed"
    assert "correctness check failed" in cases.loc["testing.wrong", "reason"]
    counters = cases.loc[["testing.counter"]]
    assert list(counters["status"]) == ["ok", "ok"]
    assert (counters["n"] >= 3).all()
    # The overrun was cut at its timeout, not allowed to sleep 30 s per repetition.
    assert elapsed < 60
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def _count_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
def test_sigkill_midway_then_resume_reruns_nothing_finished(tmp_path, write_suite):
    suite = write_suite(
        """
plugins: [tests.plugins.fault_probes]
timing: {warmup: 0, min_reps: 2, max_reps: 2, budget_s: 10}
probes:
  testing.counter:
    params: {i: [0, 1, 2, 3, 4, 5], seconds: 0.4}
"""
    )
    out = tmp_path / "results"
    log = tmp_path / "prepared.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COHERENCE_TEST_LOG": str(log)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", "--suite", str(suite), "--out", str(out), "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(_count_lines(log)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = only_run(out)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "partial"
    finished = set(pd.read_parquet(run / "cases.parquet")["case_id"])
    assert 1 <= len(finished) < 6

    resumed = coherence("run", "--resume", run.name, "--out", str(out), "--quiet", env={"COHERENCE_TEST_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr
    cases = pd.read_parquet(run / "cases.parquet")
    assert sorted(cases["case_id"]) == sorted(set(cases["case_id"]))  # no duplicates
    assert len(cases) == 6 and (cases["status"] == "ok").all()
    prepared = _count_lines(log)
    # Every case finished before the kill was prepared exactly once.
    for case_id in finished:
        assert prepared.count(case_id) == 1, case_id
    samples = pd.read_parquet(run / "samples.parquet")
    assert samples.groupby("case_id").size().to_dict() == {c: 2 for c in cases["case_id"]}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert len(manifest["sessions"]) == 2 and manifest["sessions"][1]["resumed"]


@pytest.mark.slow
def test_quick_suite_writes_a_complete_schema_v1_run(tmp_path):
    out = tmp_path / "results"
    proc = coherence("run", "--suite", "quick", "--out", str(out), "--label", "ci", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = only_run(out)
    assert proc.stdout.strip() == str(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    for key in ("run_id", "label", "started_at", "finished_at", "status", "host", "environment", "config", "versions"):
        assert key in manifest, key
    assert manifest["status"] == "complete" and manifest["label"] == "ci"
    assert manifest["run_id"] == run.name
    cases = pd.read_parquet(run / "cases.parquet")
    assert list(cases.columns[: len(CASE_COLUMNS)]) == CASE_COLUMNS
    assert set(cases["family"]) >= {"memory", "gemm", "overhead"}
    assert set(cases["status"]) <= {"ok", "skipped"}
    ok = cases[cases["status"] == "ok"]
    # Every ok case has samples, and its statistics are those of its samples.
    samples = pd.read_parquet(run / "samples.parquet")
    # Schema columns first; probes' own per-repetition columns (composites) after, floats.
    assert list(samples.columns[: len(SAMPLE_COLUMNS)]) == SAMPLE_COLUMNS
    extra_columns = list(samples.columns[len(SAMPLE_COLUMNS):])
    assert {"compute_s", "comm_s", "ttft_s", "tpot_s"} <= set(extra_columns)
    assert all(samples[c].dtype == "float64" for c in extra_columns)
    for row in ok.itertuples():
        # Multi-rank cases: a repetition lasts as long as its slowest rank.
        mine = samples[samples["case_id"] == row.case_id].groupby("rep")["duration_s"].max()
        assert len(mine) == row.n
        assert mine.median() == pytest.approx(row.p50_s)
        assert mine.min() == pytest.approx(row.min_s)
    gemm = ok[ok["family"] == "gemm"]
    assert (gemm["bound"] == "compute").all()
    assert (gemm["flops_per_s"] == gemm["flops"] / gemm["p50_s"]).all()
    # CPU compute peaks are derived, so every GEMM has a roofline fraction, and an
    # honest one (the derived peak uses the highest clock the core reaches).
    assert gemm["roofline_fraction"].between(0.01, 1.0).all(), gemm[["case_id", "roofline_fraction"]]
    decode = ok[ok["family"] == "decode"]
    assert len(decode) and (decode[decode["params"].str.contains('"batch": 1,')]["bound"] == "memory").all()
    assert (decode[decode["probe"] == "decode.attention"]["bound"] == "memory").all()
    # The suite's own prefill cases (composites imply short-prompt ones that are not).
    prefill = ok[(ok["family"] == "prefill") & ok["implied_by"].isna()]
    assert len(prefill) and (prefill["bound"] == "compute").all()
    assert ok["implied_by"].notna().any()
    memory = ok[ok["family"] == "memory"]
    assert (memory["bound"] == "memory").all() and (memory["bytes_per_s"] > 0).all()
    skipped = cases[cases["status"] == "skipped"]
    assert (skipped["reason"].str.len() > 0).all()
    telemetry = pd.read_parquet(run / "telemetry.parquet")
    assert list(telemetry.columns) == TELEMETRY_COLUMNS
    assert {"cpu_util_pct", "steal_pct"} <= set(telemetry["metric"])
    assert not (run / "parts").exists()

    shown = coherence("show", run.name, "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    assert f"{len(ok)} ok, {len(skipped)} skipped" in shown.stdout
    as_json = coherence("show", str(run), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["case_id"] for r in json.loads(as_json.stdout)] == list(cases["case_id"])
