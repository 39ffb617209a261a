"""Versioned loading of run folders (harness.results)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from harness import SCHEMA_VERSION
from harness.errors import UserError
from harness.results import (
    MIGRATIONS,
    RawRun,
    capacity_figures,
    device_members,
    indicator_leaves,
    load_run,
    mode_of,
    register_migration,
    rep_durations,
    rep_series,
    run_folders,
)
from harness.stats import summarize
from harness.store import RunStore
from tests.conftest import coherence


def make_run(root, run_id, cases: dict, *, devices=None, indicators=None, telemetry=None, ranks=None,
             environment=None, label=""):
    """A real v1 run folder written through RunStore.create/append_case/finalize.

    ``cases``: case id -> array of durations (an ``ok`` case) or a status string
    (``skipped``/``failed``, no samples). ``ranks``: case id -> list of per-rank arrays."""
    devices = devices or [{"id": "cpu:0", "type": "cpu", "name": "Test CPU"}]
    store = RunStore.create(root, run_id, {"label": label, "host": f"host-{run_id}", "devices": devices,
                                           "environment": environment or {}})
    for cid, data in {**cases, **(ranks or {})}.items():
        device = cid.split("@")[1] if "@" in cid else "cpu:0"
        if isinstance(data, str):
            row = {"case_id": cid, "probe": "p", "family": "gemm", "backend": "torch", "device": device,
                   "params": "{}", "status": data, "reason": f"{data} on purpose", "n": 0}
            store.append_case(row, pd.DataFrame(columns=["case_id", "rank", "rep", "t_start_s", "duration_s"]))
            continue
        per_rank = data if ranks and cid in ranks else [data]
        per_rep = np.max(np.vstack([np.asarray(r, float) for r in per_rank]), axis=0)
        stats = summarize(per_rep)
        flops = 1e9
        probe = cid.split("[")[0].split("@")[0]
        family = probe.split(".")[0] if "." in probe else "gemm"
        row = {"case_id": cid, "probe": probe, "family": family, "backend": "torch", "device": device,
               "params": "{}", "status": "ok", "reason": "", **stats, "flops": flops, "bytes": 1e6,
               "flops_per_s": flops / stats["p50_s"], "bytes_per_s": 1e6 / stats["p50_s"],
               "best_flops_per_s": flops / stats["min_s"], "best_bytes_per_s": 1e6 / stats["min_s"],
               "bound": "compute", "roofline_fraction": 0.5}
        frames = [pd.DataFrame({"case_id": cid, "rank": rank, "rep": range(len(r)),
                                "t_start_s": np.arange(len(r)) * 0.01, "duration_s": np.asarray(r, float)})
                  for rank, r in enumerate(per_rank)]
        tel = telemetry.get(cid) if telemetry else None
        store.append_case(row, pd.concat(frames, ignore_index=True), tel)
    store.finalize()
    if indicators is not None:
        (store.path / "indicators.json").write_text(json.dumps(indicators))
    return store.path


def test_load_run_gives_every_part_of_a_v1_run(tmp_path):
    path = make_run(tmp_path, "r1", {"a@cpu:0": [1.0, 2.0, 3.0], "b@cpu:0": "skipped"})
    run = load_run("r1", tmp_path)  # by id under the root
    assert run.path == path and run.run_id == "r1" and run.loaded_from_version == SCHEMA_VERSION
    assert list(run.cases["case_id"]) == ["a@cpu:0", "b@cpu:0"]
    assert list(run.cases["status"]) == ["ok", "skipped"]
    assert run.samples["duration_s"].tolist() == [1.0, 2.0, 3.0]
    assert run.telemetry.empty and run.indicators is None
    assert run.device_classes() == {"cpu:0": "Test CPU"}
    assert load_run(str(path), tmp_path / "elsewhere").run_id == "r1"  # by folder


def test_indicators_are_loaded_when_present(tmp_path):
    make_run(tmp_path, "r1", {"a@cpu:0": [1.0]}, indicators={"capacity": {"C_eff": {"value": 5, "unit": "tok/s"}}})
    assert load_run("r1", tmp_path).indicators == {"capacity": {"C_eff": {"value": 5, "unit": "tok/s"}}}


def test_newer_schema_is_refused_in_one_line(tmp_path):
    path = make_run(tmp_path, "r1", {"a@cpu:0": [1.0]})
    doc = json.loads((path / "manifest.json").read_text())
    doc["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="newer than this coherence") as err:
        load_run("r1", tmp_path)
    assert "\n" not in str(err.value)


def _make_v0(tmp_path):
    """A run as a fictitious schema v0 wrote it: the median column was 'median_s'."""
    path = make_run(tmp_path, "old", {"a@cpu:0": [1.0, 2.0, 3.0]})
    doc = json.loads((path / "manifest.json").read_text())
    doc["schema_version"] = 0
    (path / "manifest.json").write_text(json.dumps(doc))
    cases = pd.read_parquet(path / "cases.parquet").rename(columns={"p50_s": "median_s"})
    cases.to_parquet(path / "cases.parquet", index=False)
    return path


def test_an_older_schema_is_migrated_through_the_registry(tmp_path):
    _make_v0(tmp_path)
    assert MIGRATIONS[SCHEMA_VERSION](RawRun(SCHEMA_VERSION, {}, None, None, None, None)).schema_version == SCHEMA_VERSION

    def v0_to_v1(raw: RawRun) -> RawRun:
        raw.cases = raw.cases.rename(columns={"median_s": "p50_s"})
        raw.schema_version = 1
        return raw

    register_migration(0, v0_to_v1)
    try:
        run = load_run("old", tmp_path)
    finally:
        del MIGRATIONS[0]
    assert run.loaded_from_version == 0
    assert run.manifest["schema_version"] == SCHEMA_VERSION  # 0 -> 1 -> 2
    assert "p50_s" in run.cases.columns and "median_s" not in run.cases.columns
    assert run.cases["p50_s"].tolist() == [2.0]


def test_an_older_schema_without_migration_is_refused(tmp_path):
    _make_v0(tmp_path)
    assert 0 not in MIGRATIONS
    with pytest.raises(UserError, match="schema_version 0 has no migration"):
        load_run("old", tmp_path)


@pytest.mark.parametrize("victim", ["manifest.json", "cases.parquet", "samples.parquet", "telemetry.parquet",
                                    "indicators.json"])
def test_a_truncated_file_is_named_in_one_line(tmp_path, victim):
    tel = {"a@cpu:0": pd.DataFrame({"t_s": [0.1], "case_id": ["a@cpu:0"], "source": ["host"],
                                    "metric": ["cpu_util_pct"], "value": [50.0]})}
    path = make_run(tmp_path, "r1", {"a@cpu:0": [1.0, 2.0]}, indicators={"x": 1}, telemetry=tel)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_run("r1", tmp_path)
    assert victim in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_a_corrupt_run_in_one_line_with_exit_2(tmp_path):
    make_run(tmp_path, "good", {"a@cpu:0": [1.0, 2.0]})
    path = make_run(tmp_path, "bad", {"a@cpu:0": [1.0, 2.0]})
    (path / "samples.parquet").write_bytes(b"PAR1 not really")
    proc = coherence("compare", "good", "bad", "--results", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "samples.parquet" in proc.stderr and "Traceback" not in proc.stderr
    proc = coherence("compare", "good", "missing", "--results", str(tmp_path))
    assert proc.returncode == 2 and "no run 'missing'" in proc.stderr


def test_run_folders_expands_a_directory_of_runs(tmp_path):
    make_run(tmp_path, "r1", {"a@cpu:0": [1.0]})
    make_run(tmp_path, "r2", {"a@cpu:0": [1.0]})
    (tmp_path / "not-a-run").mkdir()
    assert [p.name for p in run_folders(tmp_path)] == ["r1", "r2"]
    assert [p.name for p in run_folders("r2", tmp_path)] == ["r2"]
    with pytest.raises(UserError, match="neither a run folder"):
        run_folders(tmp_path / "not-a-run")


def test_multi_rank_cases_use_the_slowest_rank_per_repetition(tmp_path):
    make_run(tmp_path, "r1", {}, ranks={"c@cpu:0-1": [[1.0, 5.0, 1.0], [2.0, 1.0, 3.0]]})
    run = load_run("r1", tmp_path)
    assert rep_durations(run.samples, "c@cpu:0-1").tolist() == [2.0, 5.0, 3.0]


def test_helpers_for_indicators_and_device_groups():
    doc = {"mode1": {"straggler": {"value": 0.2, "unit": ""}, "drift": {"value": None, "reason": "one device"}},
           "modes": {"3": {"link_eff": 0.7}},
           "capacity": {"C_eff": {"value": 10.0}, "C_nom": 100, "epsilon": 0.1},
           "per_device": [{"id": "cuda:0", "C_eff": 4.0}]}
    leaves = indicator_leaves(doc)
    assert "mode1.drift" not in leaves  # not measurable is skipped, never 0
    assert leaves["mode1.straggler"]["value"] == 0.2 and leaves["per_device[cuda:0].C_eff"]["value"] == 4.0
    assert mode_of("mode1.straggler") == "mode 1" and mode_of("modes.3.link_eff") == "mode 3"
    assert mode_of("capacity.C_eff") == "capacity"
    assert capacity_figures(doc) == {"epsilon": 0.1, "C_eff": 10.0, "C_nom": 100.0}  # the top-level figure
    assert capacity_figures(None) == {"epsilon": None, "C_eff": None, "C_nom": None}
    assert device_members("cuda:0-2") == ["cuda:0", "cuda:1", "cuda:2"]
    assert device_members("cuda:0+cuda:3") == ["cuda:0", "cuda:3"]


def test_rep_series_is_time_ordered_and_takes_the_slowest_rank():
    samples = pd.DataFrame({"case_id": ["a"] * 6 + ["b"] * 2, "rank": [0, 1, 0, 1, 0, 1, 0, 0],
                            "rep": [0, 0, 1, 1, 2, 2, 1, 0],
                            "t_start_s": [0.3, 0.31, 0.1, 0.12, 0.2, 0.19, 5.0, 4.0],
                            "duration_s": [1.0, 3.0, 2.0, 1.0, 5.0, 4.0, 7.0, 8.0]})
    a = rep_series(samples, "a")
    assert a["t_start_s"].tolist() == [0.1, 0.19, 0.3] and a["duration_s"].tolist() == [2.0, 5.0, 3.0]
    assert rep_series(samples, "b")["duration_s"].tolist() == [8.0, 7.0]
    assert rep_series(samples, "none").empty


def test_indicator_leaves_skip_bookkeeping():
    from harness.results import indicator_leaves

    doc = {"schema_version": 1, "summary": {"warn": 3}, "config": {"validate": {"floor": 0.1}},
           "mode1": {"straggler_penalty": {"value": 0.2, "unit": "fraction of step"}}}
    assert set(indicator_leaves(doc)) == {"mode1.straggler_penalty"}


def _as_v1(path):
    """Rewrite a run folder as schema v1 wrote it: no round columns anywhere."""
    doc = json.loads((path / "manifest.json").read_text())
    doc["schema_version"] = 1
    (path / "manifest.json").write_text(json.dumps(doc))
    cases = pd.read_parquet(path / "cases.parquet")
    cases.drop(columns=[c for c in ("rounds", "round_p50_s", "round_p99_s") if c in cases.columns]).to_parquet(
        path / "cases.parquet", index=False)
    for name in ("samples.parquet", "telemetry.parquet"):
        df = pd.read_parquet(path / name)
        df.drop(columns=[c for c in ("round",) if c in df.columns]).to_parquet(path / name, index=False)
    return path


def test_a_v1_run_loads_as_one_round(tmp_path):
    tel = {"a@cpu:0": pd.DataFrame({"t_s": [0.1], "case_id": ["a@cpu:0"], "source": ["host"],
                                    "metric": ["cpu_util_pct"], "value": [50.0]})}
    path = _as_v1(make_run(tmp_path, "old", {"a@cpu:0": [1.0, 2.0, 3.0], "b@cpu:0": "skipped"}, telemetry=tel))
    assert "round" not in pd.read_parquet(path / "samples.parquet").columns
    run = load_run("old", tmp_path)
    assert run.loaded_from_version == 1 and run.manifest["schema_version"] == SCHEMA_VERSION == 2
    assert run.samples["round"].tolist() == [0, 0, 0] and run.samples["round"].dtype == "int64"
    assert run.telemetry["round"].tolist() == [0]
    cases = run.cases.set_index("case_id")
    assert cases.loc["a@cpu:0", "rounds"] == 1 and cases.loc["b@cpu:0", "rounds"] == 0
    assert json.loads(cases.loc["a@cpu:0", "round_p50_s"]) == [2.0]
    assert json.loads(cases.loc["a@cpu:0", "round_p99_s"]) == [pytest.approx(2.98)]
    assert json.loads(cases.loc["b@cpu:0", "round_p50_s"]) == []


def test_v1_runs_still_compare(tmp_path):
    _as_v1(make_run(tmp_path, "base", {"a@cpu:0": [1.0, 1.01, 0.99, 1.0, 1.02] * 4}))
    _as_v1(make_run(tmp_path, "cand", {"a@cpu:0": [1.0, 1.0, 0.99, 1.01, 1.02] * 4}))
    proc = coherence("compare", "base", "cand", "--results", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "a@cpu:0" in proc.stdout


def test_a_v2_run_keeps_its_round_columns(tmp_path):
    path = make_run(tmp_path, "new", {"a@cpu:0": [1.0, 2.0]})
    cases = pd.read_parquet(path / "cases.parquet")
    cases["rounds"], cases["round_p50_s"] = 2, json.dumps([1.0, 2.0])
    cases.to_parquet(path / "cases.parquet", index=False)
    run = load_run("new", tmp_path)
    assert run.loaded_from_version == SCHEMA_VERSION
    assert run.cases.loc[0, "rounds"] == 2 and json.loads(run.cases.loc[0, "round_p50_s"]) == [1.0, 2.0]
