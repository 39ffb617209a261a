"""Energy in the figures people read (issue 16): J/token and tokens/J of the serving
composites, FLOP/J per device in the capacity ladder, performance per joule in a
generation comparison, and the energy columns in every export format. Runs are made
up here with the cases.parquet energy columns (energy_j, avg_power_w, energy_method,
energy_scope, energy_reason, flops_per_j, bytes_per_j); runs made before them load and
compare as before."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from harness.collector import collect, indicator_rows
from harness.collector.serving import tokens_per_rep
from tests.harness.test_collector import tp_run
from tests.harness.test_serving import _request_run


def _with_energy(run, energies: dict, method="nvml_energy_counter", scope="gpu board", reason=None):
    """``run`` with the energy columns set on the cases named in ``energies`` (case id
    -> J per repetition, None for not measured); the other cases get nulls."""
    cases = run.cases.copy()
    cases["energy_j"] = [energies.get(c) for c in cases["case_id"]]
    measured = cases["energy_j"].notna()
    cases["energy_method"] = np.where(measured, method, None)
    cases["energy_scope"] = np.where(measured, scope, None)
    cases["energy_reason"] = np.where(measured, None, reason or "no energy counter on this device")
    cases["avg_power_w"] = cases["energy_j"] / cases["p50_s"]
    cases["flops_per_j"] = cases["flops"] / cases["energy_j"]
    cases["bytes_per_j"] = cases["bytes"] / cases["energy_j"]
    run.cases = cases
    return run


# -- serving: J per token -------------------------------------------------------------------
def test_tokens_per_repetition_of_each_serving_composite():
    assert tokens_per_rep("composite.tp_decode_step", {"batch": 32}) == 32.0
    assert tokens_per_rep("composite.tp_decode_step", {"batch": 32}, {"tokens_per_step": 16}) == 16.0
    # A request of batch 2 sequences, 16 output tokens each (prefill makes the first).
    assert tokens_per_rep("composite.colocated_request", {"tokens": 16, "batch": 2}) == 32.0
    assert tokens_per_rep("composite.disagg_request", {"tokens": 16}) == 16.0
    with pytest.raises(ValueError):
        tokens_per_rep("gemm.square", {})


def test_tp_step_j_per_token_is_energy_per_step_over_the_batch(tmp_path):
    run, k = tp_run(tmp_path)
    # 4 J per decode step over both ranks' GPUs, 8 tokens per step (batch 8).
    run = _with_energy(run, {k["tp"]: 4.0})
    doc = collect(run)
    e = next(e for e in doc["serving"] if e["case_id"] == k["tp"])
    assert e["j_per_token"]["value"] == pytest.approx(0.5)
    assert e["j_per_token"]["unit"] == "J/token" and e["j_per_token"]["formula"] == "E.j_per_token"
    assert e["tokens_per_j"]["value"] == pytest.approx(2.0) and e["tokens_per_j"]["unit"] == "tokens/J"
    assert e["tokens_per_j"]["cases"] == [k["tp"]] and e["tokens_per_j"]["formula_text"].startswith("tokens/J")
    assert e["energy"]["energy_method"] == "nvml_energy_counter"
    assert e["energy"]["energy_j_per_unit"] == pytest.approx(4.0)
    assert e["energy"]["avg_power_w"] == pytest.approx(4.0 / 0.050)
    # An older-code composite (no model_layers): the figure is of the stack as run, and says so.
    assert "as run" in e["j_per_token"]["note"]
    assert doc["capacity"]["tokens_per_j"] == pytest.approx(2.0)
    names = {r["name"]: r for r in indicator_rows(doc)}
    assert names[f"tokens_per_j {k['tp']}"]["value"] == pytest.approx(2.0)


def test_request_j_per_token_counts_the_whole_request_and_scales_to_the_full_model(tmp_path):
    run = _request_run(tmp_path)
    req = next(c for c in run.cases["case_id"] if c.startswith("composite."))
    phead, dhead = "prefill.lm_head[x]@cpu:0", "decode.lm_head[x]@cpu:0"
    # 2 of 8 layers: 1.2 J per request as run (4 tokens, batch 1); outside the layers the
    # prefill LM head 0.1 J once and the decode LM head 0.05 J x 3 steps.
    run = _with_energy(run, {req: 1.2, phead: 0.1, dhead: 0.05}, method="rapl", scope="package")
    e = collect(run)["serving"][0]
    full = (1.2 * 4 + 0.1 + 3 * 0.05) / 4
    assert e["j_per_token"]["value"] == pytest.approx(full)
    assert e["j_per_token"]["as_run"] == pytest.approx(1.2 / 4)
    assert e["tokens_per_j"]["value"] == pytest.approx(1 / full)
    assert set(e["j_per_token"]["cases"]) == {req, phead, dhead}
    assert "prefill" in e["energy"]["unit_includes"] and e["energy"]["energy_method"] == "rapl"
    # The outside parts without energy: the full-model figure is not measurable, says
    # which part and why, and still carries the figure as run.
    run2 = _with_energy(_request_run(tmp_path / "b"), {req: 1.2, phead: 0.1})
    e2 = collect(run2)["serving"][0]
    assert e2["j_per_token"]["value"] is None and dhead in e2["j_per_token"]["reason"]
    assert "no energy counter" in e2["j_per_token"]["reason"]
    assert e2["j_per_token"]["as_run"] == pytest.approx(0.3)


def test_not_measurable_carries_the_reason_and_older_runs_have_none(tmp_path):
    run, k = tp_run(tmp_path)
    run = _with_energy(run, {}, reason="RAPL not readable: /sys/class/powercap/intel-rapl:0/energy_uj: EACCES")
    e = next(e for e in collect(run)["serving"] if e["case_id"] == k["tp"])
    assert e["j_per_token"]["value"] is None and e["j_per_token"]["verdict"] == "not measurable"
    assert "EACCES" in e["j_per_token"]["reason"] and "EACCES" in e["tokens_per_j"]["reason"]
    # A run made before energy accounting: no column, the figure is not measurable and says why.
    old, k = tp_run(tmp_path / "old")
    assert "energy_j" not in old.cases.columns
    doc = collect(old)
    e = next(e for e in doc["serving"] if e["case_id"] == k["tp"])
    assert e["tokens_per_j"]["value"] is None and "predates energy" in e["tokens_per_j"]["reason"]
    assert e["C_eff"]["value"] == pytest.approx(8 / 0.050)  # the rest as before
    assert doc["capacity"]["tokens_per_j"] is None


# -- capacity: FLOP/J per device ------------------------------------------------------------
def test_ladder_flops_per_joule_is_the_best_compute_bound_case(tmp_path):
    from tests.harness.test_collector import case, make_run, samples

    g1, g2 = "gemm.square[a]@cuda:0", "gemm.square[b]@cuda:0"
    g3 = "gemm.square[c]@cuda:0"
    mem = "memory.triad[a]@cuda:0"
    cases = [case(g1, "gemm.square", "gemm", "cuda:0", {}, 0.010, flops=1e12, bound="compute"),
             case(g2, "gemm.square", "gemm", "cuda:0", {}, 0.010, flops=1e12, bound="compute"),
             case(g3, "gemm.square", "gemm", "cuda:0", {}, 0.010, flops=1e12, bound="compute", dtype="fp32"),
             case(mem, "memory.triad", "memory", "cuda:0", {}, 0.010, nbytes=1e9)]
    rows = samples(g1, [0.01] * 5) + samples(g2, [0.01] * 5) + samples(g3, [0.01] * 5) + samples(mem, [0.01] * 5)
    run = _with_energy(make_run(cases, rows, tmp_path), {g1: 4.0, g2: 2.0, g3: 10.0, mem: 5.0})
    doc = collect(run)
    dev = next(d for d in doc["ladder"] if d["device"] == "cuda:0")
    fpj = dev["energy"]["flops_per_j"]
    assert fpj["value"] == pytest.approx(5e11) and fpj["cases"] == [g2] and fpj["unit"] == "FLOP/J"
    assert fpj["formula"] == "E.flops_per_j" and fpj["dtype"] == "bf16"
    assert fpj["by_dtype"]["fp32"]["value"] == pytest.approx(1e11) and fpj["by_dtype"]["fp32"]["case"] == g3
    assert dev["energy"]["bytes_per_j"]["value"] == pytest.approx(2e8)
    # A device with no case: not measurable, and why.
    other = next(d for d in doc["ladder"] if d["device"] == "cuda:1")
    assert other["energy"]["flops_per_j"]["value"] is None
    assert "no compute-bound (gemm) case" in other["energy"]["flops_per_j"]["reason"]
    names = {r["name"] for r in indicator_rows(doc) if r["mode"] == "capacity"}
    assert "flops_per_j cuda:0" in names
    # Without flops_per_j but with energy_j and flops (derived), the same figure.
    run.cases = run.cases.drop(columns=["flops_per_j"])
    again = next(d for d in collect(run)["ladder"] if d["device"] == "cuda:0")
    assert again["energy"]["flops_per_j"]["value"] == pytest.approx(5e11)
    json.dumps(doc, allow_nan=False)  # indicators.json stays strict JSON


# -- compare: performance per joule in a generation comparison -------------------------------
def _add_energy_columns(path, energies: dict, reason="no energy counter on this device"):
    """Rewrite a run folder's cases.parquet with the energy columns (case id -> J per
    repetition; None: not measured, with ``reason``), as the energy accounting writes them."""
    f = path / "cases.parquet"
    cases = pd.read_parquet(f)
    cases["energy_j"] = [energies.get(c) for c in cases["case_id"]]
    measured = cases["energy_j"].notna()
    cases["energy_method"] = [("nvml_energy_counter" if m else None) for m in measured]
    cases["energy_scope"] = [("gpu board" if m else None) for m in measured]
    cases["energy_reason"] = [(None if m else reason) for m in measured]
    cases["avg_power_w"] = cases["energy_j"].astype(float) / cases["p50_s"]
    cases["flops_per_j"] = cases["flops"] / cases["energy_j"].astype(float)
    cases["bytes_per_j"] = cases["bytes"] / cases["energy_j"].astype(float)
    cases.to_parquet(f, index=False)


def _generation_pair(tmp_path, energy_old=None, energy_new=None):
    from harness.results import load_run
    from tests.harness.test_results import make_run

    rng = np.random.default_rng(3)
    ids = ("g@cuda:0", "h@cuda:0")
    old = make_run(tmp_path, "old", {i: 1e-3 * np.exp(rng.normal(0, 0.02, 40)) for i in ids},
                   devices=[{"id": "cuda:0", "name": "NVIDIA A100"}])
    new = make_run(tmp_path, "new", {i: 0.5e-3 * np.exp(rng.normal(0, 0.02, 40)) for i in ids},
                   devices=[{"id": "cuda:0", "name": "NVIDIA H200"}])
    if energy_old is not None:
        _add_energy_columns(old, energy_old)
    if energy_new is not None:
        _add_energy_columns(new, energy_new)
    return load_run("old", tmp_path), load_run("new", tmp_path)


def test_generation_comparison_shows_work_per_joule_next_to_the_time_ratio(tmp_path, capsys):
    from harness.compare import compare_runs, load_config, markdown, print_comparison, to_jsonable

    # g: 0.4 J -> 0.1 J per repetition (1e9 FLOPs each): 2.5 -> 10 GFLOP/J, 4x per joule.
    # h: energy on the baseline only.
    a, b = _generation_pair(tmp_path, {"g@cuda:0": 0.4, "h@cuda:0": 0.4}, {"g@cuda:0": 0.1})
    gates = {"p50": 1.05, "p99": 1.10, "sla": 2.0}
    doc = compare_runs(a, b, gates, load_config())
    gen = {r["case_id"]: r for r in doc["generation"]["cases"]}
    g = gen["g@cuda:0"]
    assert g["per_j_unit"] == "FLOP/J"
    assert g["per_j_a"] == pytest.approx(2.5e9) and g["per_j_b"] == pytest.approx(1e10)
    assert g["per_j_ratio"] == pytest.approx(4.0)
    assert g["time_ratio"] == pytest.approx(next(r["p50_ratio"] for r in doc["cases"] if r["case_id"] == "g@cuda:0"))
    assert 0.4 < g["time_ratio"] < 0.6
    h = gen["h@cuda:0"]
    assert h["per_j_ratio"] is None and "candidate: no energy counter on this device" in h["energy_note"]
    summary = doc["generation"]["energy"]
    assert summary["cases"] == 1 and summary["without_energy"] == 1
    assert summary["per_j_geomean_ratio"] == pytest.approx(4.0)
    # Shown, not judged: the verdicts are the time statistics'.
    assert {r["verdict"] for r in doc["cases"]} == {"improved"}
    json.dumps(to_jsonable(doc), allow_nan=False)
    print_comparison(doc)
    text = capsys.readouterr().out
    assert "performance per joule (FLOP/J)" in text and "g@cuda:0: 2.5 GFLOP/J → 10 GFLOP/J (4.00x per joule)" in text
    md = markdown(doc)
    assert "performance per joule" in md and "4.00x" in md
    assert "| `g@cuda:0` |" in markdown(doc, show_all=True)


def test_a_run_without_energy_columns_compares_as_before(tmp_path, capsys):
    from harness.compare import compare_runs, load_config, print_comparison

    gates = {"p50": 1.05, "p99": 1.10, "sla": 2.0}
    a, b = _generation_pair(tmp_path / "x")
    assert "energy_j" not in a.cases.columns
    plain = compare_runs(a, b, gates, load_config())
    a2, b2 = _generation_pair(tmp_path / "y", None, {"g@cuda:0": 0.1, "h@cuda:0": 0.1})
    mixed = compare_runs(a2, b2, gates, load_config())
    for doc in (plain, mixed):
        assert [r["verdict"] for r in doc["cases"]] == ["improved", "improved"]
        assert all(r["per_j_ratio"] is None for r in doc["generation"]["cases"])
        assert doc["generation"]["energy"]["cases"] == 0
    assert "baseline: the run predates energy accounting" in mixed["generation"]["cases"][0]["energy_note"]
    print_comparison(mixed)
    assert "no case has energy on both sides" in capsys.readouterr().out


def test_serving_composites_compare_tokens_per_joule():
    from harness.compare import case_work_per_joule

    row = {"probe": "composite.colocated_request", "params": json.dumps({"tokens": 16, "batch": 2}),
           "resolved_params": None, "extra": "{}", "energy_j": 8.0, "bound": "memory", "flops": 1e9, "bytes": 1e9}
    assert case_work_per_joule(row) == (pytest.approx(4.0), "tokens/J", None)
    tp = {**row, "probe": "composite.tp_decode_step", "params": json.dumps({"batch": 32})}
    assert case_work_per_joule(tp)[0] == pytest.approx(4.0)
    mem = {**row, "probe": "memory.triad", "bytes_per_j": None}
    assert case_work_per_joule(mem) == (pytest.approx(1.25e8), "B/J", None)
    none = {**row, "energy_j": None, "energy_reason": "RAPL not readable"}
    assert case_work_per_joule(none) == (None, "", "RAPL not readable")


# -- export: the energy columns in every format ------------------------------------------------
def test_export_carries_energy_in_every_format(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from harness import export
    from harness.collector import write_indicators
    from harness.results import load_path
    from tests.harness.test_results import make_run

    path = make_run(tmp_path, "e", {"gemm.square[a]@cuda:0": np.full(5, 1e-3), "h@cuda:0": np.full(5, 1e-3)},
                    devices=[{"id": "cuda:0", "name": "NVIDIA H200", "type": "cuda"}])
    _add_energy_columns(path, {"gemm.square[a]@cuda:0": 0.4}, reason="NVML: nvmlDeviceGetTotalEnergyConsumption "
                                                                        "not supported")
    write_indicators(path)
    run = load_path(path)
    prom = export.render(run, "prometheus").decode()
    fams = {f.name: list(f.samples) for f in text_string_to_metric_families(prom)}
    (energy,) = fams["coherence_case_energy_joules"]
    assert energy.value == pytest.approx(0.4) and energy.labels["case_id"] == "gemm.square[a]@cuda:0"
    assert energy.labels["energy_method"] == "nvml_energy_counter"
    (fpj,) = fams["coherence_case_flops_per_joule"]
    assert fpj.value == pytest.approx(1e9 / 0.4)
    assert fams["coherence_case_power_watts"][0].value == pytest.approx(400.0)
    assert fams["coherence_case_bytes_per_joule"][0].value == pytest.approx(1e6 / 0.4)
    info = {s.labels["case_id"]: s.labels for s in fams["coherence_case_energy_info"]}
    assert info["gemm.square[a]@cuda:0"]["energy_measured"] == "true"
    assert info["h@cuda:0"]["energy_measured"] == "false"
    assert "not supported" in info["h@cuda:0"]["energy_reason"]
    (ladder,) = fams["coherence_ladder_energy_flops_per_joule"]
    assert ladder.value == pytest.approx(2.5e9) and ladder.labels["device"] == "cuda:0"
    # The same records in the tabular formats.
    for fmt in ("csv", "jsonl", "parquet"):
        data = export.render(run, fmt)
        if fmt == "parquet":
            import io

            frame = pd.read_parquet(io.BytesIO(data))
        elif fmt == "csv":
            import io

            frame = pd.read_csv(io.BytesIO(data))
        else:
            frame = pd.DataFrame([{**r, **r.pop("labels")} for r in map(json.loads, data.decode().splitlines())])
        rows = frame[frame["metric"] == "coherence_case_energy_joules"]
        assert len(rows) == 1 and rows["value"].iloc[0] == pytest.approx(0.4) and rows["unit"].iloc[0] == "J"
        reasons = frame.loc[frame["metric"] == "coherence_case_energy_info", "energy_reason"].dropna()
        assert any("not supported" in str(r) for r in reasons), fmt
    # A run made before energy accounting: no energy records, the rest as before.
    old = make_run(tmp_path, "old", {"gemm.square[a]@cuda:0": np.full(5, 1e-3)})
    write_indicators(old)
    text = export.render(load_path(old), "prometheus").decode()
    assert "energy" not in text and "coherence_case_latency_p50_seconds" in text


# -- compare: the reason on the concise line, and energy in same-class compares ---------------
def _same_class_pair(tmp_path, energy_old=None, energy_new=None):
    """Two runs on the same device class (H200 both): candidate twice as fast."""
    from harness.results import load_run
    from tests.harness.test_results import make_run

    rng = np.random.default_rng(5)
    ids = ("g@cuda:0", "h@cuda:0")
    runs = []
    for name, scale, energies in (("old", 1e-3, energy_old), ("new", 0.5e-3, energy_new)):
        path = make_run(tmp_path, name, {i: scale * np.exp(rng.normal(0, 0.02, 40)) for i in ids},
                        devices=[{"id": "cuda:0", "name": "NVIDIA H200"}])
        if energies is not None:
            _add_energy_columns(path, energies)
        runs.append(load_run(name, tmp_path))
    return runs


def test_concise_generation_line_keeps_the_not_measured_reason(tmp_path, capsys):
    from harness.compare import compare_runs, energy_lines, load_config, markdown, print_comparison

    gates = {"p50": 1.05, "p99": 1.10, "sla": 2.0}
    a, b = _generation_pair(tmp_path / "x", None, {"g@cuda:0": 0.1, "h@cuda:0": 0.1})
    doc = compare_runs(a, b, gates, load_config())
    (line,) = energy_lines(doc["generation"])
    assert line.startswith("performance per joule: no case has energy on both sides (2 without: ")
    assert "baseline: the run predates energy accounting (2 cases)" in line
    print_comparison(doc)
    assert "the run predates energy accounting (2 cases)" in " ".join(capsys.readouterr().out.split())
    assert "the run predates energy accounting (2 cases)" in markdown(doc)
    # Some cases with energy on both sides: the others' reason follows their count.
    a, b = _generation_pair(tmp_path / "y", {"g@cuda:0": 0.4, "h@cuda:0": 0.4}, {"g@cuda:0": 0.1})
    first = energy_lines(compare_runs(a, b, gates, load_config())["generation"])[0]
    assert first.endswith("; 1 without energy on a side: candidate: no energy counter on this device (1 case)")


def test_same_class_compare_shows_work_per_joule_or_why_not(tmp_path, capsys):
    from harness.compare import compare_runs, load_config, markdown, print_comparison
    from harness.report import build_compare_report

    gates = {"p50": 1.05, "p99": 1.10, "sla": 2.0}
    # g: 0.4 J -> 0.1 J per repetition: 4x the work per joule; h: the same energy, 1x.
    a, b = _same_class_pair(tmp_path / "x", {"g@cuda:0": 0.4, "h@cuda:0": 0.2}, {"g@cuda:0": 0.1, "h@cuda:0": 0.2})
    doc = compare_runs(a, b, gates, load_config())
    assert doc["generation"] is None
    e = doc["energy"]
    assert e["cases"] == 2 and e["without_energy"] == 0 and e["per_j_geomean_ratio"] == pytest.approx(2.0)
    assert e["why"].startswith("work per joule B/A 2.00x (FLOP/J) over 2 cases with energy on both sides")
    assert "(shown, not judged)" in e["why"]
    assert {r["verdict"] for r in doc["cases"]} == {"improved"}  # time verdicts only
    print_comparison(doc)
    out = " ".join(capsys.readouterr().out.split())
    assert "whole run" in out and "energy: work per joule B/A 2.00x" in out
    assert "- energy: work per joule B/A 2.00x" in markdown(doc)
    assert 'data-note="energy">energy: work per joule B/A 2.00x' in build_compare_report([a], b, gates, load_config())
    # No energy on the baseline: one line with the reason.
    a, b = _same_class_pair(tmp_path / "y", None, {"g@cuda:0": 0.1, "h@cuda:0": 0.1})
    doc = compare_runs(a, b, gates, load_config())
    assert doc["energy"]["why"] == ("work per joule not compared: baseline: the run predates energy accounting "
                                    "(2 cases)")
    # A generation comparison has its own energy view; the same-class line is absent.
    a, b = _generation_pair(tmp_path / "z", {"g@cuda:0": 0.4}, {"g@cuda:0": 0.1})
    assert compare_runs(a, b, gates, load_config())["energy"] is None
