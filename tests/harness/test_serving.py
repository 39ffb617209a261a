"""Serving figures (issue 13): the field's serving metrics from synthetic timestamps with
known answers (vLLM benchmark_serving definitions), C_nom of a request as the sum of
each phase's roofline time (a hand-worked two-phase example), and the full-model figure
of truncated composites: C_nom and C_eff do not depend on the layers run, SLOs are
judged on the whole model, runs of older code keep loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.collector import collect
from harness.collector import formulas as F
from tests.harness.test_collector import case, make_run, samples


# -- per-request latencies (vLLM benchmark_serving) -----------------------------------------
def test_ttft_tpot_itl_e2e_from_timestamps():
    # Arrival at 1.0 s; tokens out at 1.5, 1.6, 1.8, 2.1 s.
    lat = F.request_latencies(1.0, [1.5, 1.6, 1.8, 2.1])
    assert lat["ttft_s"] == pytest.approx(0.5)
    assert lat["e2e_s"] == pytest.approx(1.1)
    assert lat["tpot_s"] == pytest.approx((1.1 - 0.5) / 3)  # (E2E - TTFT) / (tokens - 1)
    assert lat["itl_s"] == pytest.approx([0.1, 0.2, 0.3])
    # TPOT is the mean ITL of the request: equal here by construction, and not the
    # mean of the ITL pooled over requests (vLLM reports both).
    assert lat["tpot_s"] == pytest.approx(np.mean(lat["itl_s"]))
    one = F.request_latencies(0.0, [0.25])
    assert one["ttft_s"] == one["e2e_s"] == 0.25 and math.isnan(one["tpot_s"]) and one["itl_s"] == []
    with pytest.raises(ValueError):
        F.request_latencies(2.0, [1.5])  # a token before the arrival
    with pytest.raises(ValueError):
        F.request_latencies(0.0, [0.3, 0.2])  # out of order
    with pytest.raises(ValueError):
        F.request_latencies(0.0, [])


def test_goodput_counts_requests_meeting_both_slos():
    ttft = [0.1, 0.3, 0.1, 0.1]
    tpot = [0.02, 0.02, 0.05, float("nan")]  # the last request has one token: no TPOT
    r = F.serving_rates(ttft, tpot, [10, 10, 10, 1], 2.0, slo_ttft_s=0.2, slo_tpot_s=0.03)
    # Request 0 meets both, 1 misses TTFT, 2 misses TPOT, 3 meets TTFT and has no TPOT.
    assert r["good_requests"] == 2 and r["goodput"] == pytest.approx(1.0)
    assert r["request_throughput"] == pytest.approx(2.0)
    assert r["output_throughput"] == pytest.approx(31 / 2.0)
    # No SLO given: every request is good, goodput = request throughput.
    assert F.serving_rates(ttft, tpot, 10, 2.0)["goodput"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        F.serving_rates(ttft, tpot, 10, 0.0)


def test_fifo_schedule_queues_behind_the_request_in_service():
    start, done = F.fifo_schedule([0.0, 0.1, 0.15, 1.0], [0.2, 0.2, 0.2, 0.1])
    assert start == pytest.approx([0.0, 0.2, 0.4, 1.0])
    assert done == pytest.approx([0.2, 0.4, 0.6, 1.1])


# -- C_nom of a request: each phase at its own roofline ----------------------------------------
def test_request_nominal_time_sums_each_phase_roofline():
    n_compute, n_mem = 1e12, 1e11  # FLOP/s, B/s
    # Prefill: 2e12 FLOPs (2 s of compute), 1e10 B (0.1 s) -> compute-bound, 2 s.
    # 10 decode steps: each 1e9 FLOPs (1 ms), 1e10 B (0.1 s) -> memory-bound, 0.1 s each.
    phases = [(2e12, 1e10, 1), (1e9, 1e10, 10)]
    assert F.phase_roofline_time(phases, n_compute, n_mem) == pytest.approx(2.0 + 10 * 0.1)
    # The max of the summed FLOPs and summed bytes would be max(2.01 s, 1.1 s) = 2.01 s:
    # the decode steps' memory time would hide behind the prefill's compute.
    summed = max((2e12 + 10 * 1e9) / n_compute, (1e10 + 10 * 1e10) / n_mem)
    assert summed == pytest.approx(2.01)
    with pytest.raises(ValueError):
        F.phase_roofline_time(phases, 0.0, n_mem)


def test_full_model_time_and_capacity_band():
    # 2 of 32 layers measured at 0.2 s: 0.1 s per layer x 32 + 0.05 s outside the layers.
    assert F.full_model_time(0.2, 2, 32, outside_s=0.05) == pytest.approx(3.25)
    # When the measurement already holds the outside parts, they are not scaled.
    assert F.full_model_time(0.25, 2, 32, outside_s=0.05, outside_in_measured_s=0.05) == pytest.approx(3.25)
    assert np.allclose(F.full_model_time(np.array([0.1, 0.2]), 1, 4), [0.4, 0.8])
    with pytest.raises(ValueError):
        F.full_model_time(0.2, 5, 4)
    units = np.linspace(0.09, 0.11, 50)
    lo, hi = F.capacity_band(units, np.ones(50), 1.0)
    assert lo < 1 / units.mean() < hi and hi - lo < 0.05 * (1 / units.mean())
    assert F.capacity_band(units, np.ones(50), 1.0) == (lo, hi)  # seeded: reproducible


# -- full-model figures of truncated composites --------------------------------------------------
NOM = {"kind": "datasheet", "compute_flops": {"bf16": 1e12}, "memory_Bps": 1e9}


def _tp_run(tmp_path, layers: int, per_layer_s: float = 0.010, model_layers=32, outside=True, cpu_ranks=1):
    """A TP step at ``layers`` of a ``model_layers``-layer model: one compute component
    per layer (10 ms, 1e9 FLOPs, 4e6 B) and the decode.lm_head outside the layers (5 ms,
    1e8 FLOPs, 2e6 B)."""
    dev = "cpu:0" if cpu_ranks == 1 else f"cpu:0-{cpu_ranks - 1}"
    comp, head = "decode.projection[x]@cpu:0", "decode.lm_head[x]@cpu:0"
    tp = f"composite.tp_decode_step[layers={layers}]@{dev}"
    components = [{"case_id": comp, "count": layers, "role": "compute"}]
    extra = {"tokens_per_step": 8, "layers": layers}
    if outside:
        components.append({"case_id": head, "count": 1, "role": "outside"})
    if model_layers:
        extra["model_layers"] = model_layers
    cases = [case(comp, "decode.projection", "decode", "cpu:0", {"model": "m"}, 0.010, flops=1e9, nbytes=4e6),
             case(head, "decode.lm_head", "decode", "cpu:0", {"model": "m"}, 0.005, flops=1e8, nbytes=2e6),
             case(tp, "composite.tp_decode_step", "composite", dev,
                  {"model": "m", "layers": layers, "batch": 8, "world_size": cpu_ranks}, per_layer_s * layers,
                  extra={**extra, "components": components}, world_size=cpu_ranks)]
    rows = samples(comp, [0.010] * 5) + samples(head, [0.005] * 5)
    rows += samples(tp, [per_layer_s * layers] * 20, ranks=cpu_ranks)
    run = make_run(cases, rows, tmp_path)
    run.manifest["devices"] = [{"id": "cpu:0", "name": "Synthetic CPU", "type": "cpu", "nominal": NOM}]
    return run


def _entry(run, **overrides):
    return collect(run, overrides or None)["serving"][0]


def test_c_nom_and_c_eff_do_not_depend_on_the_layers_run(tmp_path):
    slo = {"slo": {"default": {"ttft_s": 10.0, "tpot_s": 1.0}}}
    one, two = (_entry(_tp_run(tmp_path / str(L), L), **slo) for L in (1, 2))
    # Full step: 10 ms per layer x 32 + 5 ms of embedding, norm and LM head = 325 ms.
    for e in (one, two):
        assert e["full_p50_s"] == pytest.approx(0.325)
        assert e["C_eff"]["value"] == pytest.approx(8 / 0.325)
        # Nominal: max(32 x 1e9 + 1e8 FLOPs / 1e12, 32 x 4e6 + 2e6 B / 1e9) = 0.13 s.
        assert e["C_nom"]["value"] == pytest.approx(8 / 0.130)
        assert e["truncation"]["model_layers"] == 32 and "LM head" in e["truncation"]["how"]
    assert one["truncation"]["scale"] == 32 and two["truncation"]["scale"] == 16
    assert one["C_nom"]["value"] == pytest.approx(two["C_nom"]["value"])
    # κ compares the stack as run with its own parts: the outside parts are not in T_pred.
    assert two["T_pred_s"] == pytest.approx(0.020) and two["kappa"]["value"] == pytest.approx(1.0)
    # The waterfall of the full-model step still sums to its mean.
    assert sum(b["seconds"] for b in two["waterfall"]["bars"]) == pytest.approx(0.325)


def test_the_slo_is_judged_on_the_whole_model(tmp_path):
    # 20 ms for 2 layers meets a 0.2 s TPOT; the whole 32-layer model (325 ms) does not.
    e = _entry(_tp_run(tmp_path, 2))
    assert e["slo"]["tpot_s"] == 0.2 and e["T_meas_p50_s"] == pytest.approx(0.020)
    assert e["slo_fraction"] == 0.0 and e["C_eff"]["value"] == 0.0


def test_cpu_tensor_parallel_ranks_share_the_nominal(tmp_path):
    # Two CPU ranks, each with its shard: their work adds up against the one CPU's nominal.
    e = _entry(_tp_run(tmp_path, 2, cpu_ranks=2))
    assert e["C_nom"]["value"] == pytest.approx(8 / (2 * 0.130))
    assert "share" in e["basis"]["sharing"]


def test_a_missing_outside_part_is_said_not_hidden(tmp_path):
    run = _tp_run(tmp_path, 2)
    run.cases.loc[run.cases["probe"] == "decode.lm_head", "status"] = "skipped"
    e = _entry(run)
    assert e["C_eff"]["value"] is None and "outside the layers" in e["C_eff"]["reason"]


def test_runs_of_older_code_keep_their_truncated_figures(tmp_path):
    e = _entry(_tp_run(tmp_path, 2, model_layers=None, outside=False),
               slo={"default": {"ttft_s": 10.0, "tpot_s": 1.0}})
    assert e["truncation"]["scale"] == 1.0 and "older code" in e["truncation"]["note"]
    assert e["C_eff"]["value"] == pytest.approx(8 / 0.020)


def _request_run(tmp_path, arrival="back_to_back", legacy=False):
    """A colocated request of 4 tokens at 2 of 8 layers: prefill 30 ms, 3 decode steps of
    10 ms (ITL gaps 10, 10, 10 ms); outside the layers: prefill.lm_head 4 ms,
    decode.lm_head 2 ms per step."""
    pre, dec = "prefill.projection[x]@cpu:0", "decode.projection[x]@cpu:0"
    phead, dhead = "prefill.lm_head[x]@cpu:0", "decode.lm_head[x]@cpu:0"
    req = f"composite.colocated_request[{arrival}]@cpu:0"
    components = [{"case_id": pre, "count": 2, "role": "compute"}, {"case_id": dec, "count": 6, "role": "compute"},
                  {"case_id": phead, "count": 1, "role": "outside"}, {"case_id": dhead, "count": 3, "role": "outside"}]
    n = 5
    extra = {"layers": 2, "model_layers": 8, "decode_steps": 3, "itl_s": [[0.010, 0.010, 0.010]] * n,
             "components": components}
    if arrival == "poisson":
        extra["interarrival_s"] = [0.1, 0.1, 0.1, 0.1, 0.1]
    if legacy:
        extra = {"components": components[:2]}
    params = {"model": "m", "layers": 2, "tokens": 4, "batch": 1, "arrival": arrival}
    cases = [case(pre, "prefill.projection", "prefill", "cpu:0", {}, 0.015, flops=1e10, nbytes=1e6),
             case(dec, "decode.projection", "decode", "cpu:0", {}, 0.005, flops=1e6, nbytes=1e6),
             case(phead, "prefill.lm_head", "prefill", "cpu:0", {}, 0.004, flops=1e7, nbytes=1e6),
             case(dhead, "decode.lm_head", "decode", "cpu:0", {}, 0.002, flops=1e7, nbytes=1e6),
             case(req, "composite.colocated_request", "composite", "cpu:0", params, 0.060, extra=extra)]
    rows = samples(pre, [0.015] * 5) + samples(dec, [0.005] * 5) + samples(phead, [0.004] * 5)
    rows += samples(dhead, [0.002] * 5)
    rows += samples(req, [0.060] * n, ttft_s=[0.030] * n, tpot_s=[0.010] * n, queue_s=[0.0] * n,
                    prefill_s=[0.030] * n, kv_transfer_s=[0.0] * n, decode_s=[0.030] * n)
    run = make_run(cases, rows, tmp_path)
    run.manifest["devices"] = [{"id": "cpu:0", "name": "Synthetic CPU", "type": "cpu", "nominal": NOM}]
    return run


def test_request_serving_metrics_of_the_whole_model(tmp_path):
    e = _entry(_request_run(tmp_path), slo={"default": {"ttft_s": 0.2, "tpot_s": 0.05}})
    # x 8/2 = 4: TTFT = 30 ms x 4 + 4 ms = 124 ms; each gap 10 ms x 4 + 2 ms = 42 ms;
    # E2E = 124 + 3 x 42 = 250 ms; TPOT = (250 - 124) / 3 = 42 ms.
    assert e["ttft_p50_s"] == pytest.approx(0.124)
    assert e["itl_p50_s"] == pytest.approx(0.042) and e["itl_p99_s"] == pytest.approx(0.042)
    assert e["tpot_p50_s"] == pytest.approx(0.042)
    assert e["e2e_p50_s"] == pytest.approx(0.250) and e["e2e_p99_s"] == pytest.approx(0.250)
    # Back to back: 5 requests in 1.25 s; 4 tokens each; all meet both SLOs.
    assert e["request_throughput"]["value"] == pytest.approx(4.0)
    assert e["output_throughput"]["value"] == pytest.approx(16.0)
    assert e["goodput"]["value"] == pytest.approx(4.0)
    assert e["per_request"]["ttft_s"] == pytest.approx([0.124] * 5)
    # C_nom per phase (NOM: 1e12 FLOP/s, 1e9 B/s), layers x 4: prefill max(2 x 1e10 x 4 +
    # 1e7 / 1e12, (8e6 + 1e6) / 1e9) = 80.01 ms; decode step (2 x 1e6 x 4 + 1e7 FLOPs,
    # 9e6 B) -> 9 ms, 3 of them.
    assert e["C_nom"]["value"] == pytest.approx(4 / (0.08001 + 3 * 0.009))
    # A tighter TPOT SLO: no request is good, goodput 0 while throughput stays.
    tight = _entry(_request_run(tmp_path / "t"), slo={"default": {"ttft_s": 0.2, "tpot_s": 0.03}})
    assert tight["goodput"]["value"] == 0.0 and tight["request_throughput"]["value"] == pytest.approx(4.0)


def test_poisson_queueing_is_recomputed_for_the_whole_model(tmp_path):
    # Requests every 100 ms, each served in 250 ms (full model): request i waits 150 ms x i.
    e = _entry(_request_run(tmp_path, "poisson"))
    per = e["per_request"]["ttft_s"]
    assert per == pytest.approx([0.124 + 0.150 * i for i in range(5)])
    assert "Poisson" in e["queue_how"]
    # Duration: first arrival 0.1 s, last completion 0.1 + 5 x 0.25 s.
    assert e["request_throughput"]["value"] == pytest.approx(5 / 1.25)


def test_an_old_style_request_run_keeps_loading(tmp_path):
    e = _entry(_request_run(tmp_path, legacy=True))
    assert e["truncation"]["scale"] == 1.0 and e["ttft_p50_s"] == pytest.approx(0.030)
    assert "itl_p50_s" not in e and e["goodput"]["value"] is not None
    json.dumps(e)  # JSON-safe


# -- output: show, the report --------------------------------------------------------------------
def test_serving_rows_show_and_report_table(tmp_path, capsys, monkeypatch):
    from harness.collector.serving import serving_rows
    from harness.report.run_report import _serving_metrics_table
    from harness.show import print_indicators

    doc = collect(_request_run(tmp_path), {"slo": {"default": {"ttft_s": 0.2, "tpot_s": 0.05}}})
    (row,) = serving_rows(doc["serving"])
    assert row["layers"] == "2/8 (x4)" and row["ttft_p50_s"] == pytest.approx(0.124)
    assert row["goodput"] == pytest.approx(4.0) and row["itl_p99_s"] == pytest.approx(0.042)
    html = _serving_metrics_table(doc["serving"])
    assert 'data-table="serving-metrics"' in html and "124 ms" in html and "2/8 (x4)" in html
    monkeypatch.setenv("COLUMNS", "300")  # one line per row, whatever the terminal
    print_indicators(doc)
    text = capsys.readouterr().out
    assert "serving (vLLM benchmark_serving" in text and "TTFT ms" in text and "/124/" in text  # mean/median/P99
    # A run of older code: the layers as run, no ITL.
    (old,) = serving_rows(collect(_request_run(tmp_path / "old", legacy=True))["serving"])
    assert old["layers"] == "2 (as run)" and old["itl_p50_s"] is None


# -- rounds (coherence run --rounds) ---------------------------------------------------------------
def test_capacity_band_nested_in_rounds_holds_the_spread_between_windows():
    # Two time windows: one with steps at 0.10 s, one at 0.13 s (a loaded machine).
    units = np.concatenate([np.full(20, 0.10), np.full(20, 0.13)]) + np.linspace(0, 1e-3, 40)
    meets = np.ones(40)
    plain = F.capacity_band(units, meets, 1.0)
    nested = F.capacity_band(units, meets, 1.0, groups=[0] * 20 + [1] * 20)
    # The plain bootstrap treats the 40 steps as one window: a narrow band; nested in
    # the rounds, either window alone is a possible outcome.
    assert nested[0] < plain[0] and nested[1] > plain[1]
    assert nested[0] < 1 / 0.13 * 1.01 and nested[1] > 1 / 0.10 * 0.99
    with pytest.raises(ValueError):
        F.capacity_band(units, meets, 1.0, groups=[0, 1])


def test_poisson_requests_over_rounds_each_replay_the_arrivals(tmp_path):
    run = _request_run(tmp_path, "poisson")
    s = run.samples
    rid = s["case_id"].str.startswith("composite.")
    s.loc[rid, "round"] = [0, 0, 0, 1, 1]
    e = _entry(run)
    # Round 0: 3 requests arriving every 100 ms (waits 0, 150, 300 ms); round 1 starts over.
    assert e["per_request"]["ttft_s"] == pytest.approx([0.124, 0.274, 0.424, 0.124, 0.274])
    # Busy time: round 0 from 0.1 s to 0.85 s, round 1 from 0.1 s to 0.6 s -> 5 in 1.25 s.
    assert e["request_throughput"]["value"] == pytest.approx(5 / 1.25)
    assert "2 round(s)" in e["C_eff"]["noise_band_how"]
