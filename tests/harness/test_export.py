"""`coherence export`: records of a run as JSON lines, CSV, Parquet and a Prometheus
textfile (harness.export), checked with prometheus_client's own text parser."""

from __future__ import annotations

import io
import json
import math
import re
import socket
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import export
from harness.results import load_path
from harness.stats import summarize
from harness.store import SAMPLE_COLUMNS, RunStore
from tests.conftest import coherence

SUITE = """
plugins: [tests.plugins.fault_probes]
timeout_s: 120
timing: {warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.2}
probes:
  memory.triad: {params: {size_mib: 8, dtype: fp64}}
  gemm.square: {params: {n: 128, dtype: fp32}}
  collective.all_reduce: {params: {size_bytes: 4096, dtype: fp32, world_size: 2}}
  testing.raises: {}
"""

# Base-unit suffixes a metric name may end with; the few unitless ones are listed.
UNIT_SUFFIXES = ("_seconds", "_bytes", "_bytes_per_second", "_flops_per_second", "_tokens_per_second", "_ratio",
                 "_joules", "_watts", "_flops_per_joule", "_bytes_per_joule", "_tokens_per_joule", "_joules_per_token")
UNITLESS = {"coherence_run_info", "coherence_run_cases", "coherence_case_status", "coherence_case_repetitions",
            "coherence_indicator_verdicts", "coherence_indicator_value", "coherence_case_energy_info"}


def parse(text: str) -> dict[str, list]:
    """Prometheus text -> {family name: [samples]}; every family must come once."""
    families: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in families, f"family {fam.name} appears twice"
        assert fam.type == "gauge", fam.name
        assert fam.documentation, f"{fam.name} has no HELP"
        families[fam.name] = list(fam.samples)
    return families


def series(families: dict, name: str, **labels) -> list:
    return [s for s in families.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]


# -- a real run, made with the CLI -----------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    suite = root / "suite.yaml"
    suite.write_text(SUITE)
    out = root / "results"
    proc = coherence("run", "--suite", str(suite), "--out", str(out), "--devices", "cpu", "--quiet", "--anonymize")
    assert proc.returncode == 1, proc.stderr  # testing.raises fails on purpose
    run = Path(proc.stdout.strip().splitlines()[-1])
    assert (run / "indicators.json").exists()
    return run


@pytest.fixture(scope="module")
def prom(real_run):
    proc = coherence("export", str(real_run), "--format", "prometheus")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_prometheus_export_of_a_real_run_parses_with_unique_label_sets_and_units(real_run, prom):
    families = parse(prom)
    for name, samples in families.items():
        keys = [(s.name, tuple(sorted(s.labels.items()))) for s in samples]
        assert len(keys) == len(set(keys)), f"duplicate label set in {name}"
        assert all(math.isfinite(s.value) for s in samples), name
        assert name.endswith(UNIT_SUFFIXES) or name in UNITLESS, f"{name} names no unit"
    assert "NaN" not in prom and "nan" not in prom.lower().split()
    for s in families["coherence_indicator_value"]:
        assert s.labels.get("unit"), s  # no base unit: the unit is a label

    run = load_path(real_run)
    cases = run.cases.set_index("probe")
    # Values are the run's own numbers, under their unit.
    gemm = cases.loc["gemm.square"]
    (p50,) = series(families, "coherence_case_latency_p50_seconds", case_id=gemm["case_id"])
    assert p50.value == pytest.approx(gemm["p50_s"], rel=1e-12)
    assert p50.labels["device"] == "cpu:0" and p50.labels["family"] == "gemm" and p50.labels["backend"] == "torch"
    assert p50.labels["device_class"] == run.class_of("cpu:0")
    (flops,) = series(families, "coherence_case_flops_per_second", case_id=gemm["case_id"])
    assert flops.value == pytest.approx(gemm["flops_per_s"], rel=1e-12)
    triad = cases.loc["memory.triad"]
    (bw,) = series(families, "coherence_case_bandwidth_bytes_per_second", case_id=triad["case_id"])
    assert bw.value == pytest.approx(triad["bytes_per_s"], rel=1e-12)
    coll = cases.loc["collective.all_reduce"]
    assert coll["status"] == "ok", coll["reason"]
    (busbw,) = series(families, "coherence_case_busbw_bytes_per_second", case_id=coll["case_id"])
    assert busbw.value == pytest.approx(coll["busbw_Bps"], rel=1e-12)
    assert busbw.labels["device"] == coll["device"] == "cpu:0-1"
    (reps,) = series(families, "coherence_case_repetitions", case_id=gemm["case_id"])
    assert reps.value == gemm["n"] >= 3
    # Labels identify the run; the host is the anonymized one the manifest holds.
    assert {s.labels["run_id"] for f in families.values() for s in f} == {run.run_id}
    hosts = {s.labels["host"] for f in families.values() for s in f}
    assert hosts == {run.host} and socket.gethostname() not in hosts
    # Every numeric mode indicator of indicators.json is there, under its mode.
    exported = {(s.labels["mode"], s.labels["indicator"]): s.value
                for name in ("coherence_indicator_value", "coherence_indicator_ratio", "coherence_indicator_seconds")
                for s in families.get(name, [])}
    expected = {(mode, name): ind["value"] for mode in ("mode1", "mode2", "mode3", "mode4")
                for name, ind in run.indicators[mode].items() if isinstance(ind.get("value"), (int, float))}
    assert expected and exported == pytest.approx(expected)
    verdicts = {s.labels["verdict"]: s.value for s in families["coherence_indicator_verdicts"]}
    assert verdicts == run.indicators["summary"]


@pytest.mark.slow
def test_failed_case_appears_with_its_status_and_reason(real_run, prom):
    families = parse(prom)
    run = load_path(real_run)
    failed = run.cases.set_index("probe").loc["testing.raises"]
    assert failed["status"] == "failed"
    states = {s.labels["status"]: s.value for s in series(families, "coherence_case_status", case_id=failed["case_id"])}
    assert states == {"ok": 0, "failed": 1, "timeout": 0, "skipped": 0}
    for s in series(families, "coherence_case_status", case_id=failed["case_id"]):
        assert "deliberate failure in prepare" in s.labels["reason"]
    # A failed case has a status, never timings.
    timed = [n for n, f in families.items() if n.startswith("coherence_case_latency")
             for s in f if s.labels["case_id"] == failed["case_id"]]
    assert not timed
    # Every case of the run has exactly one state at 1.
    ones = [s.labels["case_id"] for s in families["coherence_case_status"] if s.value == 1]
    assert sorted(ones) == sorted(run.cases["case_id"])
    counts = {s.labels["status"]: s.value for s in families["coherence_run_cases"]}
    assert counts["failed"] == 1 and counts["ok"] == len(run.cases) - 1


@pytest.mark.slow
def test_jsonl_csv_and_parquet_carry_the_same_records(real_run, prom, tmp_path):
    families = parse(prom)
    from_prom = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "unit"))): s.value
                 for f in families.values() for s in f}
    proc = coherence("export", str(real_run))  # jsonl is the default, to stdout
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    finished = json.loads((real_run / "manifest.json").read_text())["finished_at"]
    ts = datetime.fromisoformat(finished.replace("Z", "+00:00")).timestamp()
    from_jsonl = {}
    for line in lines:
        rec = json.loads(line)
        assert list(rec) == ["metric", "value", "unit", "labels", "timestamp"]
        assert isinstance(rec["value"], float) and isinstance(rec["unit"], str) and rec["unit"]
        assert rec["timestamp"] == ts
        from_jsonl[(rec["metric"], tuple(sorted((k, v) for k, v in rec["labels"].items() if k != "unit")))] = rec["value"]
    assert len(from_jsonl) == len(lines) == len(from_prom)
    assert from_jsonl == pytest.approx(from_prom)

    proc = coherence("export", str(real_run), "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(io.StringIO(proc.stdout), dtype=str, keep_default_na=False)
    assert list(table.columns[:4]) == ["metric", "value", "unit", "timestamp"]
    assert len(table) == len(lines)
    target = tmp_path / "run.parquet"
    proc = coherence("export", str(real_run), "--format", "parquet", "--output", str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    frame = pd.read_parquet(target)
    assert len(frame) == len(lines)
    failed = frame[(frame["metric"] == "coherence_case_status") & (frame["status"] == "failed") & (frame["value"] == 1)]
    assert list(failed["probe"]) == ["testing.raises"]
    gemm = frame[(frame["metric"] == "coherence_case_latency_p50_seconds") & (frame["probe"] == "gemm.square")]
    assert gemm["unit"].tolist() == ["s"]
    assert gemm["value"].iloc[0] == pytest.approx(load_path(real_run).cases.set_index("probe").loc["gemm.square", "p50_s"])


@pytest.mark.slow
def test_prometheus_file_is_written_whole_for_the_textfile_collector(real_run, prom, tmp_path):
    target = tmp_path / "coherence.prom"
    target.write_text("old\n")
    proc = coherence("export", str(real_run), "--format", "prometheus", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_text() == prom
    assert [p.name for p in tmp_path.iterdir()] == ["coherence.prom"]  # no temporary left behind
    assert target.stat().st_mode & 0o044 == 0o044  # readable by node_exporter's user


# -- synthetic runs: escaping, missing values, indicators ------------------------------
def write_run(root: Path, run_id: str, *, host: str, cases: list[dict], indicators: dict | None = None) -> Path:
    store = RunStore.create(root, run_id, {"label": "", "host": host,
                                           "devices": [{"id": "cpu:0", "type": "cpu", "name": "Test CPU"}],
                                           "environment": {}})
    for row in cases:
        durations = row.pop("_durations", None)
        if durations is None:
            store.append_case(row, pd.DataFrame(columns=SAMPLE_COLUMNS))
            continue
        stats = summarize(np.asarray(durations, float))
        row = {**stats, **row}
        samples = pd.DataFrame({"case_id": row["case_id"], "rank": 0, "rep": range(len(durations)),
                                "t_start_s": np.arange(len(durations)) * 0.01, "duration_s": durations})
        store.append_case(row, samples)
    store.finalize()
    if indicators is not None:
        (store.path / "indicators.json").write_text(json.dumps(indicators))
    return store.path


def ok_case(case_id: str, **extra) -> dict:
    return {"case_id": case_id, "probe": case_id.split("[")[0], "family": "gemm", "backend": "torch", "device": "cpu:0",
            "params": "{}", "status": "ok", "reason": "", "_durations": [1e-3, 1.1e-3, 0.9e-3, 1.2e-3], **extra}


def indicator(value, unit, verdict="ok", **extra):
    return {"id": "x", "value": value, "unit": unit, "verdict": verdict, "cases": [], **extra}


INDICATORS = {
    "schema_version": 1,
    "capacity": {"from_case": "gemm.square[n=8]@cpu:0", "C_eff": 10.0, "C_nom": 40.0, "epsilon": 0.25, "unit": "tokens/s"},
    "ladder": [{"device": "cpu:0", "device_class": "Test CPU",
                "compute": {"fp32": {"unit": "FLOP/s", "N": 1e11, "I": 5e10, "I_case": "gemm.square[n=8]@cpu:0",
                                     "C": None, "efficiency": 0.5}},
                "memory": {"unit": "B/s", "N": None, "I": 2e10, "I_case": "memory.triad[size_mib=8]@cpu:0",
                           "C": None, "efficiency": None}}],
    "serving": [{"case_id": "composite.tp_decode_step[world_size=2]@cpu:0-1", "T_pred_s": 0.01, "T_meas_p50_s": 0.02,
                 "slo_fraction": 1.0,
                 "kappa": indicator(0.5, "ratio", "fail"), "C_eff": indicator(30.0, "tokens/s", "info"),
                 "C_nom": indicator(None, "tokens/s", "not measurable", reason="no nominal"),
                 "epsilon": indicator(None, "ratio", "not measurable")}],
    "mode1": {"straggler_penalty": indicator(0.1, "fraction of step"),
              "drift": indicator(None, "%/minute", "not measurable", reason="no case spans 5 s")},
    "mode2": {},
    "mode3": {"collective_scaling": indicator(0.8, "busbw(n)/busbw(2)", "warn")},
    "mode4": {"fingerprint": indicator("kvm > docker", "text", "info"), "launch_overhead": indicator(2e-6, "s", "info"),
              "tail_weight": indicator(float("nan"), "p99/p50")},
    "summary": {"ok": 1, "warn": 1, "fail": 1, "info": 2, "not measurable": 3},
}


def test_label_values_are_escaped_and_missing_values_left_out(tmp_path):
    host = 'rack "7"\\node\nb'  # quote, backslash and newline
    reason = 'bad "dtype" \\ here'
    path = write_run(tmp_path, "r1", host=host, cases=[
        ok_case("gemm.square[n=8]@cpu:0", p99_s=float("nan"), flops=float("nan"), flops_per_s=float("nan"),
                bytes_per_s=2e9, roofline_fraction=None),
        {"case_id": "gemm.square[n=9]@cpu:0", "probe": "gemm.square", "family": "gemm", "backend": "torch",
         "device": "cpu:0", "params": "{}", "status": "skipped", "reason": reason, "n": 0},
    ])
    text = export.render(load_path(path), "prometheus").decode()
    assert '\\"7\\"\\\\node\\nb' in text  # escaped as the exposition format says
    families = parse(text)
    assert {s.labels["host"] for f in families.values() for s in f} == {host}  # parsed back exactly
    (skipped,) = series(families, "coherence_case_status", case_id="gemm.square[n=9]@cpu:0", status="skipped")
    assert skipped.value == 1 and skipped.labels["reason"] == reason
    assert not series(families, "coherence_case_latency_p50_seconds", case_id="gemm.square[n=9]@cpu:0")
    ok = "gemm.square[n=8]@cpu:0"
    assert series(families, "coherence_case_latency_p50_seconds", case_id=ok)
    assert series(families, "coherence_case_bandwidth_bytes_per_second", case_id=ok)[0].value == 2e9
    for missing in ("coherence_case_latency_p99_seconds", "coherence_case_flops_per_second",
                    "coherence_case_roofline_ratio"):
        assert not series(families, missing, case_id=ok), missing
    assert "nan" not in text.lower()
    assert not any(n.startswith(("coherence_indicator", "coherence_capacity")) for n in families)  # no indicators.json


def test_indicators_become_unit_named_records(tmp_path):
    path = write_run(tmp_path, "r2", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")], indicators=INDICATORS)
    families = parse(export.render(load_path(path), "prometheus").decode())
    (cap,) = families["coherence_capacity_effective_tokens_per_second"]
    assert cap.value == 10.0 and cap.labels["case_id"] == "gemm.square[n=8]@cpu:0" and cap.labels["device"] == "cpu:0"
    assert families["coherence_capacity_epsilon_ratio"][0].value == 0.25
    (kappa,) = families["coherence_serving_kappa_ratio"]
    assert kappa.value == 0.5 and kappa.labels["verdict"] == "fail"
    # A composite the cases table lacks still gets its device and probe from the id.
    assert kappa.labels["device"] == "cpu:0-1" and kappa.labels["probe"] == "composite.tp_decode_step"
    assert families["coherence_serving_effective_tokens_per_second"][0].value == 30.0
    assert "coherence_serving_nominal_tokens_per_second" not in families  # not measurable: no record
    assert "coherence_serving_epsilon_ratio" not in families
    assert families["coherence_serving_predicted_seconds"][0].value == 0.01
    (straggler,) = families["coherence_indicator_ratio"]
    assert straggler.labels == {"run_id": "r2", "host": "h", "mode": "mode1", "indicator": "straggler_penalty",
                                "unit": "fraction of step", "verdict": "ok"}
    (scaling,) = families["coherence_indicator_value"]
    assert scaling.labels["unit"] == "busbw(n)/busbw(2)" and scaling.value == 0.8
    (launch,) = families["coherence_indicator_seconds"]
    assert launch.labels["indicator"] == "launch_overhead" and launch.value == 2e-6
    indicators = {s.labels["indicator"] for n, f in families.items() if n.startswith("coherence_indicator_") for s in f
                  if "indicator" in s.labels}
    assert indicators == {"straggler_penalty", "collective_scaling", "launch_overhead"}  # no null, text or NaN value
    ladder = {(s.labels["resource"], s.labels["rung"]): s.value
              for n in ("coherence_ladder_flops_per_second", "coherence_ladder_bytes_per_second") for s in families[n]}
    assert ladder == {("compute", "nominal"): 1e11, ("compute", "isolated"): 5e10, ("memory", "isolated"): 2e10}
    assert families["coherence_ladder_efficiency_ratio"][0].labels["dtype"] == "fp32"
    verdicts = {s.labels["verdict"]: s.value for s in families["coherence_indicator_verdicts"]}
    assert verdicts == INDICATORS["summary"]


def test_jsonl_records_have_the_perfkitbenchmarker_sample_shape(tmp_path):
    path = write_run(tmp_path, "r3", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")], indicators=INDICATORS)
    run = load_path(path)
    lines = export.render(run, "jsonl").decode().splitlines()
    recs = [json.loads(line) for line in lines]
    assert all(set(r) == {"metric", "value", "unit", "labels", "timestamp"} for r in recs)
    assert {r["timestamp"] for r in recs} == {export.run_timestamp(run)}
    (p50,) = [r for r in recs if r["metric"] == "coherence_case_latency_p50_seconds"]
    assert p50["unit"] == "s" and p50["value"] == pytest.approx(run.cases["p50_s"].iloc[0])
    assert p50["labels"]["case_id"] == "gemm.square[n=8]@cpu:0"
    (scaling,) = [r for r in recs if r["labels"].get("indicator") == "collective_scaling"]
    assert scaling["unit"] == "busbw(n)/busbw(2)"


def test_duplicate_records_are_refused():
    a = export.Record("coherence_x_seconds", 1.0, "s", {"run_id": "r", "case_id": "c"}, "x")
    b = export.Record("coherence_x_seconds", 2.0, "s", {"case_id": "c", "run_id": "r"}, "x")
    export.check_unique([a, export.Record("coherence_x_seconds", 1.0, "s", {"run_id": "r"}, "x")])
    with pytest.raises(RuntimeError, match="duplicate"):
        export.check_unique([a, b])


def test_metric_names_carry_their_unit():
    assert export.named("serving_kappa", "ratio") == "coherence_serving_kappa_ratio"
    assert export.named("indicator", "fraction of TTFT") == "coherence_indicator_ratio"
    assert export.named("indicator", "s") == "coherence_indicator_seconds"
    assert export.named("ladder", "B/s") == "coherence_ladder_bytes_per_second"
    assert export.named("indicator", "%/minute") == "coherence_indicator_value"
    for column, metric, unit, _ in export.CASE_METRICS:
        if unit != "count":
            assert re.search(r"_(seconds|bytes_per_second|flops_per_second|ratio)$", metric), metric


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    path = write_run(tmp_path, "r4", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")])
    cases = [
        (("export", "no-such-run", "--results", str(tmp_path)), "no run 'no-such-run'"),
        (("export", str(path), "--format", "xml"), "unknown format"),
        (("export", str(path), "--format", "parquet"), "--output FILE"),
        (("export", str(path), "--format", "parquet", "-o", "-"), "--output FILE"),
        (("export", str(path), "--format", "csv", "-o", str(tmp_path / "missing" / "x.csv")), "does not exist"),
        (("export", str(path), "--format", "csv", "-o", str(tmp_path)), "is a directory"),
    ]
    for args, message in cases:
        proc = coherence(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, (args, proc.stderr)
        assert proc.stdout == ""
    assert not (tmp_path / "missing").exists()


def test_list_and_collect_print_json_for_scripts(tmp_path):
    proc = coherence("list", "--json", "--devices", "cpu")
    assert proc.returncode == 0, proc.stderr
    probes = {p["probe"]: p for p in json.loads(proc.stdout)}
    assert probes["memory.triad"]["family"] == "memory" and "cpu:0" in probes["memory.triad"]["devices"]
    assert "size_mib" in probes["memory.triad"]["grid"]
    path = write_run(tmp_path, "r5", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")])
    proc = coherence("collect", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["run_id"] == "r5" and {"mode1", "mode2", "mode3", "mode4", "capacity"} <= set(doc)
    assert doc == json.loads((path / "indicators.json").read_text())


def test_serving_metric_records_of_the_full_model():
    entry = {"ttft_p50_s": 0.124, "ttft_p99_s": 0.2, "itl_p50_s": 0.042, "tpot_p50_s": None,
             "goodput": {"value": 4.0, "unit": "requests/s"}, "request_throughput": {"value": None},
             "truncation": {"scale": 4.0, "layers_run": 2, "model_layers": 8}}
    recs = {(r.metric, r.labels.get("quantile")): r for r in export._serving_metric_records(entry, {"case_id": "c"})}
    assert recs[("coherence_serving_ttft_seconds", "0.5")].value == 0.124
    assert recs[("coherence_serving_ttft_seconds", "0.99")].value == 0.2
    assert recs[("coherence_serving_itl_seconds", "0.5")].value == 0.042
    assert recs[("coherence_serving_goodput_requests_per_second", None)].value == 4.0
    scale = recs[("coherence_serving_layer_scale_ratio", None)]
    assert scale.value == 4.0 and scale.labels["layers_run"] == "2" and scale.labels["model_layers"] == "8"
    # Missing figures give no record (never NaN).
    assert ("coherence_serving_tpot_seconds", "0.5") not in recs
    assert ("coherence_serving_request_throughput_requests_per_second", None) not in recs
    export.check_unique(list(recs.values()))


# -- options: -o/--output is the file, --results the folder holding runs ----------------
def test_csv_output_option_writes_the_file_not_stdout(tmp_path):
    path = write_run(tmp_path, "r6", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")])
    target = tmp_path / "x.csv"
    proc = coherence("export", str(path), "--format", "csv", "--output", str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and target.is_file()
    assert proc.stderr.strip() == f"export (csv) → {target}"
    df = pd.read_csv(target)
    assert list(df.columns[:4]) == ["metric", "value", "unit", "timestamp"]
    assert df.loc[df["metric"] == "coherence_case_latency_p50_seconds", "value"].iloc[0] == pytest.approx(1.05e-3)
    assert target.read_bytes() == export.render(load_path(path), "csv")


def test_out_is_the_deprecated_results_folder_and_never_silently_ignored(tmp_path):
    write_run(tmp_path, "r7", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")])
    proc = coherence("export", "r7", "--results", str(tmp_path))
    assert proc.returncode == 0 and proc.stderr == "" and '"run_id": "r7"' in proc.stdout
    proc = coherence("export", "r7", "--out", str(tmp_path))
    assert proc.returncode == 0 and '"run_id": "r7"' in proc.stdout
    assert proc.stderr.count("\n") == 1 and "deprecated" in proc.stderr and "--results DIR" in proc.stderr
    # The spelling of issue 14: --out x.csv meant a file; it is refused, not ignored.
    proc = coherence("export", str(tmp_path / "r7"), "--format", "csv", "--out", str(tmp_path / "x.csv"))
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "x.csv").exists()
    assert proc.stderr == (f"coherence: error: --out {tmp_path / 'x.csv'}: no such folder of runs; "
                           "write the export to a file with -o/--output FILE\n")


def test_prometheus_text_round_trips_every_record(tmp_path):
    """prometheus_client writes the file; its own parser reads back every record once,
    with its labels and value, and one HELP/TYPE block per family."""
    path = write_run(tmp_path, "r8", host='h "q"', cases=[ok_case("gemm.square[n=8]@cpu:0")], indicators=INDICATORS)
    run = load_path(path)
    recs = export.records(run)
    text = export.render(run, "prometheus").decode()
    families = parse(text)
    assert list(families) == list(dict.fromkeys(r.metric for r in recs))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f}
    want = {(r.metric, tuple(sorted(r.labels.items()))): r.value for r in recs}
    assert got == pytest.approx(want)
    assert text.count("# TYPE ") == len(families) and " # " not in text


def test_output_suffix_names_the_format_when_format_is_not_given(tmp_path):
    assert export.infer_format(None, "x.csv") == "csv" and export.infer_format(None, "a/b.PROM") == "prometheus"
    assert export.infer_format(None, "x.parquet") == "parquet" and export.infer_format(None, "x.txt") == "jsonl"
    assert export.infer_format(None, "-") == "jsonl" and export.infer_format("jsonl", "x.csv") == "jsonl"
    with pytest.raises(export.UserError, match="unknown format"):
        export.infer_format("xml", "x.csv")
    path = write_run(tmp_path, "r9", host="h", cases=[ok_case("gemm.square[n=8]@cpu:0")])
    target = tmp_path / "y.csv"
    proc = coherence("export", str(path), "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == export.render(load_path(path), "csv")


def test_kappa_records_say_whether_the_composite_replayed_cuda_graphs(tmp_path):
    """κ of a graphed and of an eager composite are different findings: the kappa record
    carries graph_applied (true/false) where the case has extra.graph, none otherwise."""
    from harness import export
    from harness.collector import collect
    from tests.harness.test_show import _energy_tp_run

    def kappa_labels(graph):
        run, _ = _energy_tp_run(tmp_path / str(graph), {"tp": 4.0}, graph=graph)
        run.indicators = collect(run)
        (rec,) = [r for r in export.records(run) if r.metric == "coherence_serving_kappa_ratio"]
        return rec.labels

    eager = {"requested": True, "applied": False, "collectives": None, "reason": "CUDA graphs need a CUDA device"}
    assert kappa_labels(eager)["graph_applied"] == "false"
    assert kappa_labels({**eager, "applied": True, "collectives": "inside"})["graph_applied"] == "true"
    assert "graph_applied" not in kappa_labels(None)  # a run made before the graph parameter
    # Only the kappa records carry it, and the tabular formats have it as a column.
    run, _ = _energy_tp_run(tmp_path / "csv", {"tp": 4.0}, graph=eager)
    run.indicators = collect(run)
    assert all("graph_applied" not in r.labels for r in export.records(run) if "kappa" not in r.metric)
    frame = pd.read_csv(io.BytesIO(export.render(run, "csv")))
    assert list(frame.loc[frame["metric"] == "coherence_serving_kappa_ratio", "graph_applied"]) == [False]


def test_export_help_lists_the_energy_records():
    from click.testing import CliRunner

    from harness.cli import main

    r = CliRunner().invoke(main, ["export", "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for what in ("energy (J per repetition, W, FLOP/J, B/J", "coherence_case_energy_info", "J/token, tokens/J",
                 "graph_applied", "energy_method, energy_scope"):
        assert what in text, what
