"""The collector: every formula on synthetic samples with known answers, and whole
synthetic runs (a tensor-parallel step and a disaggregated request with their
components) whose κ, C_eff, C_nom, ε and waterfall are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from harness.collector import collect
from harness.collector import formulas as F
from harness.collector.common import load_config, verdict
from harness.errors import UserError
from harness.results import Run


# -- formulas ------------------------------------------------------------------------------
def test_straggler_penalty_of_one_slow_rank_in_four():
    steps = np.array([[1.0, 1.0, 1.0, 2.0]] * 10)
    assert F.straggler_penalty(steps) == pytest.approx(0.6)
    assert F.straggler_penalty(np.ones((5, 4))) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        F.straggler_penalty(np.ones((5, 1)))


def test_straggler_penalty_counts_a_rotating_straggler_that_averages_out():
    # Each step one rank is slow, a different one each time: per-rank means are equal,
    # but every step waits for the slow one.
    steps = np.ones((8, 4))
    for i in range(8):
        steps[i, i % 4] = 2.0
    assert F.straggler_penalty(steps) == pytest.approx(2.0 / 1.25 - 1)


def test_asymmetry_beyond_nominal():
    res = F.asymmetry(slow=2.0, fast=1.0, nominal_slow=1.0, nominal_fast=2.0)
    assert res["measured"] == 2.0 and res["predicted"] == 2.0 and res["beyond_nominal"] == pytest.approx(1.0)
    assert F.asymmetry(3.0, 1.0, 1.0, 2.0)["beyond_nominal"] == pytest.approx(1.5)


def test_drift_of_a_linear_ramp():
    t = np.linspace(0, 60, 200)
    d = 1e-3 * (1 + 0.001 * t)  # +0.1 %/s of the start ≈ 6 %/minute of the median
    res = F.drift_pct_per_min(t, d)
    assert res["pct_per_min"] == pytest.approx(0.06 / 1.03 * 100, rel=1e-3) and res["significant"]
    flat = F.drift_pct_per_min(t, 1e-3 + np.random.default_rng(0).normal(0, 1e-6, 200))
    assert abs(flat["pct_per_min"]) < 0.5


def test_cusum_finds_a_step_and_leaves_noise_alone():
    rng = np.random.default_rng(1)
    noise = rng.normal(1.0, 0.01, 400)
    assert F.cusum_alarms(noise) == []
    stepped = np.concatenate([noise[:200], noise[200:] + 0.05])
    alarms = F.cusum_alarms(stepped)
    assert alarms and 200 <= alarms[0] < 210


def test_sweep_fit_recovers_overhead_and_slope():
    rng = np.random.default_rng(2)
    x = np.repeat([1e3, 1e5, 1e6, 1e7], 20)
    y = 5e-6 + 1e-10 * x
    fit = F.sweep_fit(x, y * (1 + rng.normal(0, 1e-3, len(x))))
    assert fit.a == pytest.approx(5e-6, rel=0.05) and fit.b == pytest.approx(1e-10, rel=0.01)
    assert fit.r2 > 0.999 and fit.noise < 0.01 and fit.points == 4
    noisy = F.sweep_fit(x, y * (1 + np.abs(rng.normal(0, 0.5, len(x)))))
    assert noisy.r2 < fit.r2 and noisy.noise > 0.1
    with pytest.raises(ValueError):
        F.sweep_fit(np.ones(10), np.ones(10))


def test_tail_and_outliers():
    d = np.concatenate([np.ones(98), [10.0, 10.0]])
    assert F.outlier_share(d) == pytest.approx(0.02)
    assert F.tail_weight(np.arange(1, 101, dtype=float)) == pytest.approx(np.percentile(np.arange(1, 101), 99) / 50.5)


def test_scaling_and_accessible_fraction():
    assert F.tp_scaling_efficiency(1.0, 0.6, 2) == pytest.approx(1 / 1.2)
    assert F.accessible_fraction({"a": 10.0, "b": 10.0, "c": 2.0}, theta=0.5) == pytest.approx(2 / 3)


def test_verdicts_and_config_overrides():
    th = {"better": "lower", "warn": 0.1, "fail": 0.25}
    assert [verdict(v, th) for v in (0.05, 0.2, 0.3, None)] == ["ok", "warn", "fail", "not measurable"]
    assert verdict(0.5, {"better": "higher", "warn": 0.6, "fail": 0.3}) == "warn"
    assert verdict(1.0, None) == "info"
    cfg = load_config({"thresholds": {"mode1.straggler_penalty": {"warn": 0.5}}, "slo": {"tiny": {"tpot_s": 0.01}}})
    assert cfg["thresholds"]["mode1.straggler_penalty"] == {"better": "lower", "warn": 0.5, "fail": 0.25}
    assert cfg["slo"]["tiny"] == {"tpot_s": 0.01}
    with pytest.raises(UserError, match="indicators.thresholds.nope"):
        load_config({"thresholds": {"nope": {"warn": 1}}})
    with pytest.raises(UserError, match="indicators.colour"):
        load_config({"colour": 1})


# -- whole synthetic runs ------------------------------------------------------------------
NOMINAL = {"kind": "datasheet", "compute_flops": {"bf16": 1e12}, "memory_Bps": 1e9, "link_Bps": 1e9,
           "host_link_Bps": 5e8}
BASE = {"backend": "torch", "status": "ok", "reason": "", "bound": "memory", "dtype": "bf16", "world_size": 1,
        "busbw_Bps": None, "busbw_factor": None, "cpu_util_pct": 100.0}


def case(case_id, probe, family, device, params, p50, flops=0.0, nbytes=0.0, extra=None, **more):
    row = {**BASE, "case_id": case_id, "probe": probe, "family": family, "device": device,
           "params": json.dumps(params), "resolved_params": json.dumps(params), "extra": json.dumps(extra or {}),
           "p50_s": p50, "p99_s": p50 * 1.2, "flops": flops, "bytes": nbytes,
           "flops_per_s": flops / p50, "bytes_per_s": nbytes / p50, **more}
    return row


def samples(case_id, durations, ranks=1, t0=0.0, **columns):
    rows = []
    t = t0
    for rep, d in enumerate(durations):
        for rank in range(ranks):
            row = {"case_id": case_id, "rank": rank, "rep": rep, "t_start_s": t, "duration_s": d}
            for k, v in columns.items():
                row[k] = v[rep][rank] if ranks > 1 else v[rep]
            rows.append(row)
        t += d
    return rows


def make_run(cases, sample_rows, tmp_path):
    manifest = {"schema_version": 1, "run_id": "synthetic", "devices": [
        {"id": "cuda:0", "name": "Synthetic GPU", "type": "cuda", "nominal": NOMINAL},
        {"id": "cuda:1", "name": "Synthetic GPU", "type": "cuda", "nominal": NOMINAL}],
        "environment": {"virtualization": {"layers": [], "summary": "bare metal"}}, "config": {}}
    tel = pd.DataFrame(columns=["t_s", "case_id", "source", "metric", "value"])
    return Run(path=tmp_path, manifest=manifest, cases=pd.DataFrame(cases), samples=pd.DataFrame(sample_rows),
               telemetry=tel)


def tp_run(tmp_path, slow_rank_factor=2.0):
    """A 2-rank TP step: per layer 1 compute component (10 ms) and 1 all-reduce (5 ms),
    2 layers. Steps: rank 0 computes 20 ms, rank 1 20·f ms; the step ends when the
    slower rank ends, plus 10 ms of collectives."""
    comp = "decode.projection[x]@cuda:0"
    coll = "collective.all_reduce[x]@cuda:0-1"
    tp = "composite.tp_decode_step[x]@cuda:0-1"
    components = [{"case_id": comp, "count": 2, "role": "compute"}, {"case_id": coll, "count": 2, "role": "collective"}]
    cases = [
        case(comp, "decode.projection", "decode", "cuda:0", {"model": "tiny"}, 0.010, flops=1e9, nbytes=4e6),
        case(coll, "collective.all_reduce", "collective", "cuda:0-1", {"size_bytes": 1e6, "world_size": 2}, 0.005,
             nbytes=1e6, family_="x", busbw_factor=1.0, busbw_Bps=2e8, world_size=2),
        case(tp, "composite.tp_decode_step", "composite", "cuda:0-1", {"model": "tiny", "batch": 8, "world_size": 2},
             0.020 * slow_rank_factor + 0.010, extra={"components": components, "tokens_per_step": 8}, world_size=2),
    ]
    steps = 20
    c0, c1 = 0.020, 0.020 * slow_rank_factor
    step = c1 + 0.010
    compute = [[c0, c1]] * steps
    comm = [[step - c0, step - c1]] * steps
    rows = samples(comp, [0.010] * 10) + samples(coll, [0.005] * 10, ranks=2)
    rows += samples(tp, [step] * steps, ranks=2, t0=1.0, compute_s=compute, comm_s=comm)
    return make_run(cases, rows, tmp_path), {"tp": tp, "step": step, "c0": c0, "c1": c1}


def test_tp_step_kappa_capacity_and_a_waterfall_summing_to_the_step(tmp_path):
    run, k = tp_run(tmp_path)
    doc = collect(run)
    entry = next(e for e in doc["serving"] if e["case_id"] == k["tp"])
    # T_pred = 2 × 10 ms + 2 × 5 ms = 30 ms; T_meas = 50 ms.
    assert entry["T_pred_s"] == pytest.approx(0.030)
    assert entry["kappa"]["value"] == pytest.approx(0.030 / 0.050)
    # Nominal: compute max(2e9 FLOP / 1e12, 8e6 B / 1e9) = 8 ms; collectives 2 × 1e6 / 1e9 = 2 ms.
    assert entry["C_nom"]["value"] == pytest.approx(8 / 0.010)
    assert entry["basis"] == {"compute": "nominal", "memory": "nominal", "link": "nominal"}
    # Every step (50 ms) meets the default TPOT of 200 ms: C_eff = 8 tokens / 50 ms.
    assert entry["C_eff"]["value"] == pytest.approx(8 / 0.050)
    assert entry["epsilon"]["value"] == pytest.approx((8 / 0.050) / (8 / 0.010))
    bars = {b["name"]: b["seconds"] for b in entry["waterfall"]["bars"]}
    assert sum(bars.values()) == pytest.approx(entry["waterfall"]["measured_mean_s"]) == pytest.approx(k["step"])
    assert bars["nominal"] == pytest.approx(0.010)
    assert bars["roofline loss"] == pytest.approx(0.020 - 0.008)
    assert bars["interconnect (mode 3)"] == pytest.approx(0.010 - 0.002)
    # Straggler wait: E[max] − E[mean] = 40 − 30 ms.
    assert bars["straggler wait (mode 1)"] == pytest.approx(0.010)
    assert entry["waterfall"]["slo_misses_s"] == pytest.approx(0.0)
    assert doc["capacity"]["from_case"] == k["tp"] and doc["capacity"]["epsilon"] == pytest.approx(0.2)
    # Mode 1 and 3 from the same composite.
    assert doc["mode1"]["straggler_penalty"]["value"] == pytest.approx(0.040 / 0.030 - 1)
    assert doc["mode1"]["straggler_penalty"]["cases"] == [k["tp"]]
    share = doc["mode3"]["collective_share"]["value"]
    assert share == pytest.approx(0.010 / 0.050)
    json.dumps(doc, allow_nan=False)


def test_slo_misses_lower_c_eff_and_close_the_waterfall(tmp_path):
    run, k = tp_run(tmp_path)
    run.manifest["config"] = {"resolved": {"indicators": {"slo": {"tiny": {"tpot_s": 0.055}}}}}
    # Half the steps slower than the TPOT limit.
    s = run.samples
    tp = s["case_id"] == k["tp"]
    s.loc[tp & (s["rep"] % 2 == 1), "duration_s"] = 0.060
    doc = collect(run)
    entry = next(e for e in doc["serving"] if e["case_id"] == k["tp"])
    mean = (0.050 + 0.060) / 2
    assert entry["slo_fraction"] == pytest.approx(0.5)
    assert entry["C_eff"]["value"] == pytest.approx(8 / mean * 0.5)
    wf = entry["waterfall"]
    assert sum(b["seconds"] for b in wf["bars"]) == pytest.approx(mean)
    assert wf["effective_s"] == pytest.approx(mean / 0.5) == pytest.approx(mean + wf["slo_misses_s"])


def test_a_missing_component_makes_kappa_not_measurable_not_zero(tmp_path):
    run, k = tp_run(tmp_path)
    run.cases.loc[run.cases["probe"] == "collective.all_reduce", "status"] = "failed"
    doc = collect(run)
    entry = next(e for e in doc["serving"] if e["case_id"] == k["tp"])
    assert entry["kappa"]["value"] is None and entry["kappa"]["verdict"] == "not measurable"
    assert "collective.all_reduce[x]@cuda:0-1: failed" in entry["kappa"]["reason"]
    assert entry["C_eff"]["value"] is not None


def test_indicators_without_inputs_are_not_measurable_with_a_reason(tmp_path):
    run, _ = tp_run(tmp_path)
    doc = collect(run)
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for name, ind in doc[mode].items():
            if ind["value"] is None:
                assert ind["verdict"] == "not measurable" and ind["reason"], (mode, name)
            else:
                assert ind["verdict"] in ("ok", "warn", "fail", "info"), (mode, name)
    assert doc["mode2"]["kv_transfer_share"]["verdict"] == "not measurable"
    assert "disaggregated" in doc["mode2"]["kv_transfer_share"]["reason"]


def test_disaggregated_request_kv_share_and_capacity(tmp_path):
    pre = "prefill.layer[x]@cuda:0"
    kv = "transfer.kv_sendrecv[x]@cuda:0-1"
    dec = "decode.layer[x]@cuda:1"
    dis = "composite.disagg_request[x]@cuda:0-1"
    components = [{"case_id": pre, "count": 2, "role": "compute"}, {"case_id": kv, "count": 1, "role": "transfer"},
                  {"case_id": dec, "count": 8, "role": "compute"}]
    cases = [
        case(pre, "prefill.layer", "prefill", "cuda:0", {}, 0.010, flops=1e10, nbytes=1e6, bound="compute"),
        case(kv, "transfer.kv_sendrecv", "transfer", "cuda:0-1", {"layout": "contiguous"}, 0.004, nbytes=2e6),
        case(dec, "decode.layer", "decode", "cuda:1", {}, 0.002, flops=1e6, nbytes=1e6),
        case(dis, "composite.disagg_request", "composite", "cuda:0-1",
             {"model": "tiny", "tokens": 4, "batch": 1, "world_size": 2}, 0.050, extra={"components": components}),
    ]
    n = 10
    ttft = [0.030] * n
    rows = samples(pre, [0.010] * 5) + samples(kv, [0.004] * 5, ranks=2) + samples(dec, [0.002] * 5)
    rows += samples(dis, [0.050] * n, ttft_s=ttft, tpot_s=[0.005] * n, kv_transfer_s=[0.006] * n,
                    queue_s=[0.0] * n, prefill_s=[0.020] * n, decode_s=[0.024] * n)
    doc = collect(make_run(cases, rows, tmp_path))
    entry = doc["serving"][0]
    assert entry["T_pred_s"] == pytest.approx(2 * 0.010 + 0.004 + 8 * 0.002)
    assert entry["kappa"]["value"] == pytest.approx(0.040 / 0.050)
    assert entry["C_eff"]["value"] == pytest.approx(4 / 0.050)
    # Nominal, each phase at its own roofline (a run of older code: T = 4 decode steps):
    # prefill max(2e10 / 1e12, 2e6 / 1e9) = 20 ms; each decode step max(2e6 / 1e12,
    # 2e6 / 1e9) = 2 ms, 4 of them; transfer 2e6 / 1e9 = 2 ms. (The max of the summed
    # FLOPs and bytes, 20.008 ms, would hide the memory-bound decode behind the prefill.)
    assert entry["C_nom"]["value"] == pytest.approx(4 / (0.020 + 4 * 0.002 + 0.002))
    assert entry["truncation"]["scale"] == 1.0 and "older code" in entry["truncation"]["note"]
    assert sum(b["seconds"] for b in entry["waterfall"]["bars"]) == pytest.approx(0.050)
    assert doc["mode2"]["kv_transfer_share"]["value"] == pytest.approx(0.2)


def test_drift_is_within_rounds_not_across_their_levels(tmp_path):
    """Three rounds of a flat case at different levels (2, 6, 2 ms: run-to-run variance, as
    compare measures it) have no drift and no change points; a ramp inside one round is
    drift. The pooled fit read the level shift between rounds as drift (fresh-user trial:
    1.8e4 %/minute on the quick suite)."""
    rng = np.random.default_rng(1)
    flat, ramp = "memory.copy[flat]@cuda:0", "memory.copy[ramp]@cuda:0"
    rows = []
    for rnd, (level, t0) in enumerate(((2e-3, 0.0), (6e-3, 100.0), (2e-3, 200.0))):
        for r in samples(flat, level + rng.normal(0, 1e-6, 3000), t0=t0):
            rows.append({**r, "rep": r["rep"] + 3000 * rnd, "round": rnd})
        durations = level * (1 + np.linspace(0, 0.5, 3000) * (rnd == 1)) + rng.normal(0, 1e-6, 3000)
        for r in samples(ramp, durations, t0=t0 + 50):
            rows.append({**r, "rep": r["rep"] + 3000 * rnd, "round": rnd})
    cases = [case(flat, "memory.copy", "memory", "cuda:0", {}, 1e-3, nbytes=1e6),
             case(ramp, "memory.copy", "memory", "cuda:0", {}, 1e-3, nbytes=1e6)]
    doc = collect(make_run(cases, rows, tmp_path))
    per_case = {d["case_id"]: d for d in doc["mode1"]["drift"]["per_case"]}
    assert not per_case[flat]["significant"] and abs(per_case[flat]["pct_per_min"]) < 1.0
    assert per_case[ramp]["significant"] and per_case[ramp]["round"] == 1 and per_case[ramp]["pct_per_min"] > 100
    assert per_case[flat]["rounds_fitted"] == 3
    # CUSUM (k=0.5, h=5) false-alarms on white noise about once per ~500 repetitions; a
    # series pooled over the rounds alarms on nearly every repetition after the level shift.
    alarms = {a["case_id"]: a["alarms"] for a in doc["mode1"]["change_points"].get("per_case") or []}
    pooled = len(F.cusum_alarms(np.array([r["duration_s"] for r in rows if r["case_id"] == flat])))
    assert alarms.get(flat, 0) < 9000 / 200 < pooled
