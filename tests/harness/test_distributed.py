"""Multi-rank execution: spawned rank pools, hung ranks, and torchrun across 'nodes'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from harness.ranks import combine, free_port
from tests.conftest import REPO, coherence

SUITE = """
plugins: [tests.plugins.fault_probes]
cpu_ranks: 4
group_timeout_s: 4
timing: {warmup: 1, min_reps: 3, max_reps: 8, budget_s: 0.2}
probes:
  testing.ranked_sum: {params: {world_size: [2, 4]}}
  testing.absent_rank: {timeout_s: 60}
  testing.counter: {params: {i: [0], seconds: 0.01}}
"""


@pytest.mark.slow
def test_ranks_run_checked_and_a_rank_that_never_arrives_times_out(tmp_path, write_suite):
    suite = write_suite(SUITE)
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = coherence("run", "--suite", str(suite), "--out", str(out), "--quiet")
    assert proc.returncode == 1, proc.stderr
    run = next(out.iterdir())
    cases = pd.read_parquet(run / "cases.parquet").set_index("case_id")
    ok2 = cases.loc["testing.ranked_sum[world_size=2]@cpu:0-1"]
    ok4 = cases.loc["testing.ranked_sum[world_size=4]@cpu:0-3"]
    assert ok2["status"] == "ok" and ok4["status"] == "ok"
    assert ok2["world_size"] == 2 and ok4["world_size"] == 4
    absent = cases.loc["testing.absent_rank[world_size=2]@cpu:0-1"]
    assert absent["status"] == "timeout"
    assert "rank(s) 1 did not answer" in absent["reason"]
    # The run went on after the hung case, with a fresh worker.
    assert cases.loc["testing.counter[i=0,seconds=0.01]@cpu:0", "status"] == "ok"
    # Per-rank samples are kept; the case's duration per repetition is the slowest rank's.
    samples = pd.read_parquet(run / "samples.parquet")
    mine = samples[samples["case_id"] == "testing.ranked_sum[world_size=4]@cpu:0-3"]
    assert sorted(mine["rank"].unique()) == [0, 1, 2, 3]
    slowest = mine.groupby("rep")["duration_s"].max()
    assert slowest.median() == pytest.approx(ok4["p50_s"])
    assert len(json.loads(ok4["rank_p50_s"])) == 4
    # group timeout 4 s + grace: well inside the case's 60 s, and nothing left running.
    assert time.monotonic() - t0 < 90
    leftovers = subprocess.run(["pgrep", "-f", "coherence-rank"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_combine_takes_the_slowest_rank_per_repetition():
    results = [
        {"status": "ok", "durations_s": [1.0, 2.0, 3.0], "t_start_ns": [10, 20, 30], "extra": {}},
        {"status": "ok", "durations_s": [1.5, 1.0, 3.5], "t_start_ns": [11, 19, 31], "extra": {}},
    ]
    out = combine(results, 2)
    assert out["durations_s"] == [1.5, 2.0, 3.5]
    assert out["t_start_ns"] == [10, 19, 30]
    assert out["rank_durations_s"] == [[1.0, 2.0, 3.0], [1.5, 1.0, 3.5]]


def test_combine_reports_the_worst_rank():
    failed = combine([{"status": "ok", "durations_s": [1.0]},
                      {"status": "failed", "reason": "correctness check failed: x"}], 2)
    assert failed["status"] == "failed" and "rank 1: correctness check failed" in failed["reason"]
    hung = combine([{"status": "failed", "reason": "RuntimeError: Timed out waiting 4000ms"}, None], 2)
    assert hung["status"] == "timeout" and "rank(s) 1 did not answer" in hung["reason"]
    timed = combine([{"status": "failed", "reason": "DistBackendError: operation timed out"},
                     {"status": "failed", "reason": "DistBackendError: operation timed out"}], 2)
    assert timed["status"] == "timeout"


@pytest.mark.slow
def test_two_torchrun_nodes_write_one_run_folder(tmp_path, write_suite):
    suite = write_suite("""
plugins: [tests.plugins.fault_probes]
group_timeout_s: 30
timing: {warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.2}
probes:
  testing.ranked_sum: {}
  testing.counter: {params: {i: [0], seconds: 0.01}}
""")
    out = tmp_path / "results"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "harness.cli", "run", "--suite", str(suite), "--out", str(out), "--label", "two-nodes"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    logs = [p.communicate(timeout=180)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], logs
    runs = list(out.iterdir())
    assert len(runs) == 1, runs
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["label"] == "two-nodes"
    assert [r["node_rank"] for r in manifest["ranks"]] == [0, 1]
    assert manifest["config"]["launcher"]["world_size"] == 2
    cases = pd.read_parquet(runs[0] / "cases.parquet").set_index("case_id")
    joint = cases.loc["testing.ranked_sum[world_size=2]@torchrun:cpux2"]
    assert joint["status"] == "ok" and joint["world_size"] == 2
    samples = pd.read_parquet(runs[0] / "samples.parquet")
    assert sorted(samples.loc[samples["case_id"] == joint.name, "rank"].unique()) == [0, 1]
    assert cases.loc["testing.counter[i=0,seconds=0.01]@cpu:0", "status"] == "ok"
    # rank 0 writes the HTML report too, with every rank of the launch
    report = (runs[0] / "report.html").read_text()
    assert "ranks (torchrun)" in report and "testing.ranked_sum[world_size=2]@torchrun:cpux2" in report
