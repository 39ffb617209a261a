"""The runner end to end through the CLI: isolation of failing cases, exit codes,
resume after SIGKILL, the run folder per schema v2, and rounds (order, budget split,
fresh worker per round, resume across rounds)."""

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
def test_quick_suite_writes_a_complete_schema_v2_run(tmp_path):
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
    # The suite's rounds (quick: 3), each with samples of every ok case.
    assert manifest["rounds"] == 3 and (ok["rounds"] == manifest["rounds"]).all()
    # Every ok case has samples, and its statistics are those of its samples (pooled).
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
    assert list(telemetry.columns) == TELEMETRY_COLUMNS + ["round"]  # schema v2: the case's round
    assert {"cpu_util_pct", "steal_pct"} <= set(telemetry["metric"])
    assert not (run / "parts").exists()

    shown = coherence("show", run.name, "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    # show prints the statuses present ("120 ok", or "110 ok, 10 skipped").
    assert (f"{len(ok)} ok, {len(skipped)} skipped" if len(skipped) else f"{len(ok)} ok") in shown.stdout
    as_json = coherence("show", str(run), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["case_id"] for r in json.loads(as_json.stdout)] == list(cases["case_id"])


# -- rounds ------------------------------------------------------------------------------
from harness.registry import PlannedCase  # noqa: E402
from harness.runner import merge_status, pool_rounds, round_order, round_timing  # noqa: E402


def _planned(n_single: int, blocks: dict[str, int]) -> list[PlannedCase]:
    cases = [PlannedCase(f"s{i}", "p", "f", "torch", "cpu:0", {}, group_devices=["cpu:0"]) for i in range(n_single)]
    for gid, count in blocks.items():
        ws = int(gid.split("-")[1]) + 1
        cases += [PlannedCase(f"{gid}/{k}", "c", "collective", "torch", gid, {}, world_size=ws,
                              group_devices=["cpu:0"] * ws) for k in range(count)]
    return cases


def test_round_order_is_a_seeded_shuffle_that_keeps_rank_pool_blocks_together():
    cases = _planned(8, {"cpu:0-1": 4, "cpu:0-3": 3})
    orders = [[c.case_id for c in round_order(cases, seed)] for seed in (1, 2, 3)]
    for order in orders:
        assert sorted(order) == sorted(c.case_id for c in cases)  # every case, once
        for gid, count in (("cpu:0-1", 4), ("cpu:0-3", 3)):
            at = [i for i, cid in enumerate(order) if cid.startswith(gid)]
            assert at == list(range(at[0], at[0] + count))  # one block: the rank pool is started once
    assert len({tuple(o) for o in orders}) == 3  # different orders per round
    assert [c.case_id for c in round_order(cases, 2)] == orders[1]  # replayable from the recorded seed
    # Cases move in time between rounds, the multi-rank ones included.
    assert any(orders[0].index(cid) != orders[1].index(cid) for cid in orders[0] if cid.startswith("cpu:0-1"))


def test_round_timing_splits_budget_and_reps_but_not_warmup():
    timing = {"warmup": 2, "warmup_s": 0.1, "min_reps": 5, "max_reps": 50, "budget_s": 0.6, "timeout_s": 120}
    assert round_timing(timing, 1) == timing
    three = round_timing(timing, 3)
    assert three == {"warmup": 2, "warmup_s": 0.1, "min_reps": 2, "max_reps": 17, "budget_s": pytest.approx(0.2),
                     "timeout_s": 120}
    # Pooled over the rounds: at least the suite's min_reps, about its max_reps and budget.
    assert 3 * three["min_reps"] >= timing["min_reps"] and 3 * three["max_reps"] - timing["max_reps"] < 3
    slow = round_timing({"warmup": 1, "min_reps": 10, "max_reps": 20, "budget_s": 2.0}, 4)
    assert slow["min_reps"] == 3 and slow["max_reps"] == 5
    # A fixed count (16 requests) is split too, rounded up: 3 x 6 >= 16.
    fixed = {"warmup": 0, "min_reps": 16, "max_reps": 16, "budget_s": 0.0}
    assert round_timing(fixed, 3) == {"warmup": 0, "min_reps": 6, "max_reps": 6, "budget_s": 0.0}
    # Never fewer than 2 per round (a spread), never more than max_reps.
    assert round_timing({"min_reps": 1, "max_reps": 1, "budget_s": 1.0}, 3)["min_reps"] == 1
    assert round_timing({"min_reps": 3, "max_reps": 9, "budget_s": 1.0}, 3)["min_reps"] == 2


def test_status_over_rounds_is_the_worst_with_the_first_failing_reason():
    assert merge_status([(0, "ok", ""), (1, "ok", "")], 2) == ("ok", "")
    assert merge_status([(0, "ok", ""), (1, "timeout", "slow"), (2, "failed", "boom")], 3) == (
        "failed", "round 1: slow")
    assert merge_status([(1, "failed", "second"), (0, "failed", "first")], 2) == ("failed", "round 0: first")
    assert merge_status([(0, "skipped", "needs 4 cpu"), (1, "skipped", "needs 4 cpu")], 2) == ("skipped", "needs 4 cpu")
    assert merge_status([(0, "timeout", "exceeded 3 s")], 1) == ("timeout", "exceeded 3 s")  # one round: as before


def test_pool_rounds_concatenates_durations_in_round_order_and_keeps_the_latest_fields():
    history = [
        {"round": 1, "status": "ok", "durations_s": [3.0, 4.0], "rank_durations_s": [[3.0, 1.0], [2.0, 4.0]],
         "work": {"flops": 1.0}},
        {"round": 0, "status": "ok", "durations_s": [1.0], "rank_durations_s": [[1.0], [0.5]]},
    ]
    pooled = pool_rounds(history, 2)
    assert pooled["durations_s"] == [1.0, 3.0, 4.0]
    assert pooled["round_durations_s"] == [[1.0], [3.0, 4.0]]
    assert pooled["rank_durations_s"] == [[1.0, 3.0, 1.0], [0.5, 2.0, 4.0]]
    assert pooled["status"] == "ok" and pooled["work"] == {"flops": 1.0}
    from harness.runner import case_row

    case = PlannedCase("x", "p", "f", "torch", "cpu:0-1", {}, world_size=2, group_devices=["cpu:0", "cpu:0"])
    row = case_row(case, pooled, {})
    assert row["n"] == 3 and row["p50_s"] == 3.0 and row["rounds"] == 2
    assert json.loads(row["round_p50_s"]) == [1.0, 3.5] and len(json.loads(row["round_p99_s"])) == 2
    assert json.loads(row["rank_p50_s"]) == [1.0, 2.0]


ROUNDS = """
plugins: [tests.plugins.fault_probes]
timeout_s: 60
cpu_ranks: 2
rounds: 2
timing: {warmup: 1, min_reps: 3, max_reps: 6, budget_s: 30}
probes:
  testing.counter:
    params: {i: [0, 1, 2], seconds: 0.005}
  testing.whoami:
    params: {i: [0, 1], seconds: 0.005}
  testing.ranked_sum:
    params: {world_size: 2}
"""


def _round_orders(samples: pd.DataFrame) -> dict[int, list[str]]:
    first = samples.groupby(["round", "case_id"])["t_start_s"].min().reset_index()
    return {int(r): list(g.sort_values("t_start_s")["case_id"]) for r, g in first.groupby("round")}


@pytest.mark.slow
def test_rounds_run_every_case_per_round_in_its_seeded_order_in_a_fresh_worker(tmp_path, write_suite):
    out = tmp_path / "results"
    proc = coherence("run", "--suite", str(write_suite(ROUNDS)), "--out", str(out), "--devices", "cpu", "--quiet",
                     "--no-report")
    assert proc.returncode == 0, proc.stderr
    run = only_run(out)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rounds"] == 2 and len(manifest["round_seeds"]) == 2
    cases = pd.read_parquet(run / "cases.parquet")
    assert len(cases) == 6 and cases["case_id"].is_unique and (cases["status"] == "ok").all()
    samples = pd.read_parquet(run / "samples.parquet")
    assert samples["round"].dtype == "int64" and set(samples["round"]) == {0, 1}
    # The budget is split: 2 rounds of max_reps 6/2 = 3, so the pooled case has the
    # suite's 6 repetitions, not 12; rep counts on over the rounds.
    assert (cases["n"] == 6).all() and (cases["rounds"] == 2).all()
    for row in cases.itertuples():
        mine = samples[samples["case_id"] == row.case_id]
        per_rep = mine.groupby("rep")["duration_s"].max()
        assert sorted(per_rep.index) == list(range(6))
        assert per_rep.median() == pytest.approx(row.p50_s)
        by_round = [mine[mine["round"] == r].groupby("rep")["duration_s"].max() for r in range(2)]
        assert json.loads(row.round_p50_s) == pytest.approx([s.median() for s in by_round])
        assert json.loads(row.round_p99_s) == pytest.approx([s.quantile(0.99) for s in by_round])
    # Each round ran in the order its recorded seed gives.
    planned = [PlannedCase(r.case_id, r.probe, r.family, r.backend, r.device, {},
                           world_size=int(r.world_size) if pd.notna(r.world_size) else 1)
               for r in cases.itertuples()]
    observed = _round_orders(samples)
    for rnd, seed in enumerate(manifest["round_seeds"]):
        assert observed[rnd] == [c.case_id for c in round_order(planned, seed)]
    # A fresh worker per round (the cases of one round share it).
    journal = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    pids = {}
    for line in journal:
        if line["probe"] == "testing.whoami":
            pids.setdefault(line["_round"], set()).add(json.loads(line["extra"])["pid"])
    assert all(len(p) == 1 for p in pids.values()) and len(set().union(*pids.values())) == 2
    telemetry = pd.read_parquet(run / "telemetry.parquet")
    tagged = telemetry[telemetry["case_id"] != ""]
    assert set(tagged["round"]) <= {0, 1} and tagged["round"].notna().all()


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_a_run_killed_after_round_1_of_2_resumes_only_round_2(tmp_path, write_suite, monkeypatch):
    import harness.runner as runner
    from harness.run_command import run_suite

    suite = write_suite("""
plugins: [tests.plugins.fault_probes]
rounds: 2
timing: {warmup: 0, min_reps: 2, max_reps: 4, budget_s: 30}
probes:
  testing.counter:
    params: {i: [0, 1, 2], seconds: 0.005}
""")
    out = tmp_path / "results"
    real = runner._run_one

    def dies_in_round_2(case, rnd, *args, **kwargs):
        if rnd == 1:
            raise _Killed  # as a SIGKILL would, before the round's first case is written
        return real(case, rnd, *args, **kwargs)

    monkeypatch.setattr(runner, "_run_one", dies_in_round_2)
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(_Killed):
        run_suite(str(suite), "cpu", (), "torch", out, "", None, None, False, True, report=False)
    monkeypatch.setattr(runner, "_run_one", real)
    run = only_run(out)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "partial" and manifest["rounds"] == 2
    assert (pd.read_parquet(run / "cases.parquet")["rounds"] == 1).all()

    log = tmp_path / "prepared.log"
    resumed = coherence("run", "--resume", run.name, "--out", str(out), "--quiet", "--no-report",
                        env={"COHERENCE_TEST_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr
    cases = pd.read_parquet(run / "cases.parquet")
    # Only round 2 ran: every case prepared exactly once by the resume.
    assert sorted(_count_lines(log)) == sorted(cases["case_id"])
    assert len(cases) == 3 and (cases["rounds"] == 2).all() and (cases["n"] == 4).all()
    samples = pd.read_parquet(run / "samples.parquet")
    assert samples.groupby(["case_id", "round"]).size().to_dict() == {(c, r): 2 for c in cases["case_id"] for r in (0, 1)}
    assert all(sorted(g["rep"]) == [0, 1, 2, 3] for _, g in samples.groupby("case_id"))
    observed = _round_orders(samples)
    planned = [PlannedCase(c, "testing.counter", "overhead", "torch", "cpu:0", {}) for c in cases["case_id"]]
    assert observed[1] == [c.case_id for c in round_order(planned, manifest["round_seeds"][1])]  # same seed replayed
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["sessions"][-1]["resumed"]


@pytest.mark.slow
def test_a_run_from_before_rounds_resumes_as_one_round(tmp_path, write_suite, monkeypatch):
    import harness.runner as runner
    from harness.run_command import run_suite

    suite = write_suite("""
plugins: [tests.plugins.fault_probes]
timing: {warmup: 0, min_reps: 2, max_reps: 2, budget_s: 30}
probes:
  testing.counter:
    params: {i: [0, 1, 2], seconds: 0.005}
""")
    out = tmp_path / "results"
    real, calls = runner._run_one, []

    def dies_at_the_second_case(case, *args, **kwargs):
        calls.append(case.case_id)
        if len(calls) == 2:
            raise _Killed
        return real(case, *args, **kwargs)

    monkeypatch.setattr(runner, "_run_one", dies_at_the_second_case)
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(_Killed):
        run_suite(str(suite), "cpu", (), "torch", out, "", None, None, False, True, report=False)
    monkeypatch.setattr(runner, "_run_one", real)
    run = only_run(out)
    # Make it what a run of schema v1 left: no rounds anywhere.
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("rounds", "round_seeds"):
        manifest.pop(key)
    manifest["schema_version"] = 1
    (run / "manifest.json").write_text(json.dumps(manifest))
    lines = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    (run / "cases.jsonl").write_text("".join(
        json.dumps({k: v for k, v in line.items() if k not in ("_round", "_round_status", "_round_reason", "rounds",
                                                                 "round_p50_s", "round_p99_s")}) + "\n"
        for line in lines))
    for part in (run / "parts").glob("*.parquet"):
        pd.read_parquet(part).drop(columns=["round"]).to_parquet(part, index=False)
    (run / "cases.parquet").unlink()
    finished = calls[0]

    log = tmp_path / "prepared.log"
    resumed = coherence("run", "--resume", run.name, "--out", str(out), "--quiet", "--no-report",
                        env={"COHERENCE_TEST_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr
    assert finished not in _count_lines(log) and len(_count_lines(log)) == 2
    cases = pd.read_parquet(run / "cases.parquet")
    assert len(cases) == 3 and (cases["status"] == "ok").all() and (cases["n"] == 2).all()
    samples = pd.read_parquet(run / "samples.parquet")
    assert (samples["round"] == 0).all() and len(samples) == 6
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rounds"] == 1 and len(manifest["round_seeds"]) == 1


@pytest.mark.slow
def test_sigterm_ends_the_worker_with_the_run(tmp_path, write_suite):
    import psutil

    suite = write_suite("""
plugins: [tests.plugins.fault_probes]
rounds: 2
timing: {warmup: 0, min_reps: 2, max_reps: 2, budget_s: 30}
probes:
  testing.counter:
    params: {i: [0, 1], seconds: 30.0}
""")
    log = tmp_path / "prepared.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COHERENCE_TEST_LOG": str(log)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", "--suite", str(suite), "--out", str(tmp_path / "results"),
         "--quiet", "--no-report"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not _count_lines(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the worker, mid-case
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, alive  # not left orphaned, sleeping on
    manifest = json.loads((only_run(tmp_path / "results") / "manifest.json").read_text())
    assert manifest["status"] == "partial"  # --resume finishes it
