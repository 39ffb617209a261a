"""Mode 5: `coherence compare` (harness.compare) on synthetic run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.compare import (
    bootstrap_quantile,
    compare_runs,
    environment_diff,
    holm,
    load_config,
    markdown,
    parse_gate,
    to_jsonable,
    wilson,
)
from harness.errors import UserError
from harness.results import load_run
from tests.conftest import coherence as _coherence
from tests.harness.test_results import make_run

GATE = {"p50": 1.05, "p99": 1.10, "sla": 2.0}


def coherence(*args, env=None, **kw):
    """The CLI in a 250-column terminal, so the phrases asserted below stay on one line
    (the 80-column layout has its own test)."""
    return _coherence(*args, env={"COLUMNS": "250", **(env or {})}, **kw)


def lognormal(rng, n, median=1e-3, sigma=0.05):
    return median * np.exp(rng.normal(0.0, sigma, n))


def cfg(**compare):
    c = load_config()
    c["compare"].update(compare)
    return c


def by_id(doc):
    return {r["case_id"]: r for r in doc["cases"]}


# -- pieces ----------------------------------------------------------------------------
def test_parse_gate():
    assert parse_gate("p50:+5%,p99:+10%,sla:2x") == pytest.approx({"p50": 1.05, "p99": 1.10, "sla": 2.0})
    assert parse_gate("p99:1.2x") == pytest.approx({"p99": 1.2})
    assert parse_gate(" p50 : 5% ") == pytest.approx({"p50": 1.05})
    for bad in ("p50", "p50:+5", "p75:+5%", "p50:+5%,p50:+6%", "p50:-5%", "sla:0.5x", "", "p50:+5%;p99:+10%"):
        with pytest.raises(UserError):
            parse_gate(bad)


def test_holm_matches_the_step_down_definition():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_wilson_interval_known_values():
    p, lo, hi = wilson(0, 10)
    assert p == 0 and lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    p, lo, hi = wilson(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_order_statistic_bootstrap_matches_direct_resampling():
    """Above DIRECT_BOOTSTRAP_MAX_N the resampled quantile is drawn from its exact
    order-statistic law; it must agree with brute-force resampling."""
    rng = np.random.default_rng(1)
    x = rng.lognormal(0, 0.5, 6000)
    fast = bootstrap_quantile(x, 0.99, 3000, np.random.default_rng(2))
    direct = np.empty(600)
    r = np.random.default_rng(3)
    for i in range(direct.size):
        direct[i] = np.quantile(x[r.integers(0, x.size, x.size)], 0.99)
    assert fast.mean() == pytest.approx(direct.mean(), rel=0.01)
    assert fast.std() == pytest.approx(direct.std(), rel=0.2)


# -- verdicts --------------------------------------------------------------------------
def test_repeat_of_the_same_distribution_raises_no_alarm(tmp_path):
    """Ten cases, independent draws of the same distributions: no case may be flagged."""
    rng = np.random.default_rng(10)
    ids = [f"k{i}@cpu:0" for i in range(10)]
    make_run(tmp_path, "a", {i: lognormal(rng, 200, 1e-3 * (k + 1)) for k, i in enumerate(ids)})
    make_run(tmp_path, "b", {i: lognormal(rng, 200, 1e-3 * (k + 1)) for k, i in enumerate(ids)})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    assert doc["summary"]["compared"] == 10
    assert [r["verdict"] for r in doc["cases"]] == ["unchanged"] * 10
    assert doc["exit_code"] == 0
    for r in doc["cases"]:
        assert r["p50_ci"][0] < 1 < r["p50_ci"][1] or abs(r["p50_ratio"] - 1) < 0.02


def test_shifts_beyond_the_gate_regress_or_improve_with_significance(tmp_path):
    rng = np.random.default_rng(11)
    base = {f"k{i}@cpu:0": lognormal(rng, 100) for i in range(6)}
    cand = {k: lognormal(rng, 100) for k in base}
    cand["k0@cpu:0"] = lognormal(rng, 100, 1.2e-3)   # +20 %: regressed
    cand["k1@cpu:0"] = lognormal(rng, 100, 0.8e-3)   # -20 %: improved
    cand["k2@cpu:0"] = lognormal(rng, 100, 1.03e-3)  # +3 %: inside the gate
    make_run(tmp_path, "a", base)
    make_run(tmp_path, "b", cand)
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    rows = by_id(doc)
    assert rows["k0@cpu:0"]["verdict"] == "regressed" and rows["k0@cpu:0"]["mwu_p_holm"] < 0.05
    assert rows["k0@cpu:0"]["p50_ratio"] == pytest.approx(1.2, rel=0.05)
    assert rows["k0@cpu:0"]["p50_ci"][0] > 1.1
    assert rows["k0@cpu:0"]["ks"] > 0.5
    assert rows["k1@cpu:0"]["verdict"] == "improved"
    # +3 % on a tight distribution: inside the p50 and p99 gates; it multiplies the
    # violations of the baseline p99 many times over, and the statistics alone would
    # call it (SLA gate) — but a single baseline of 100 repetitions has a noise floor of
    # a few % (within-run drift), and over the threshold raised by that floor the
    # candidate violates no more than the baseline: held, and reported as such.
    k2 = rows["k2@cpu:0"]
    assert k2["sla"]["amplification"] > 5
    assert k2["verdict_without_floor"] == "regressed" and k2["verdict"] == "unchanged"
    assert k2["within_noise_floor"] and k2["held_by_floor"][0].startswith("SLA violations")
    assert k2["noise_floor"]["source"].startswith("within-run drift (5 blocks)")
    assert k2["sla"]["beyond_floor"]["up"]["amplification"] < 2
    assert doc["summary"]["within_noise_floor"] == 1
    # With the floor at 0 (config) the statistics decide alone, as before the floor.
    no_floor = cfg(noise_floor={"min": 0.0, "coverage": 1e-9, "blocks": 5, "min_block_samples": 4, "pool": "none"})
    k2 = by_id(compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, no_floor))["k2@cpu:0"]
    assert k2["verdict"] == "regressed" and [r.split(" ")[0] for r in k2["reasons"]] == ["SLA"]
    no_sla = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), parse_gate("p50:+5%,p99:+10%"), no_floor)
    assert by_id(no_sla)["k2@cpu:0"]["verdict"] == "unchanged"
    assert {rows[k]["verdict"] for k in ("k3@cpu:0", "k4@cpu:0", "k5@cpu:0")} == {"unchanged"}
    assert doc["exit_code"] == 1
    # Holm: corrected p-values are never below the raw ones.
    assert all(r["mwu_p_holm"] >= r["mwu_p"] for r in doc["cases"])


# -- the run-to-run noise floor ----------------------------------------------------------
FAMILY = [f"decode.k{i}@cpu:0" for i in range(5)]


def drifting_run(root, name, rng, state=1.0, shift=None, n=200, ramp=0.0):
    """One run of the FAMILY cases: every case at its base time × ``state`` (the machine's
    run-level state: the same for all cases of a run, different from run to run) × a
    within-run ramp from 1 − ramp to 1 + ramp over the repetitions × tight noise (1 %);
    ``shift``: case id -> an extra factor (a real change)."""
    cases = {}
    for k, cid in enumerate(FAMILY):
        drift = np.linspace(1 - ramp, 1 + ramp, n)
        cases[cid] = lognormal(rng, n, 1e-3 * (k + 1) * state * (shift or {}).get(cid, 1.0), 0.01) * drift
    return make_run(root, name, cases)


def test_repeated_baseline_absorbs_run_to_run_drift(tmp_path):
    """Two baseline runs in different machine states (×1.00, ×1.08) and an unperturbed
    candidate in a third (×1.15): every case is 'significantly' slower than the pooled
    baseline by MWU. Separate runs are top-level units: the CI of the ratio carries the
    spread between them (t with 1 degree of freedom), so nothing regresses, exit 0."""
    rng = np.random.default_rng(30)
    drifting_run(tmp_path, "a1", rng, 1.00)
    drifting_run(tmp_path, "a2", rng, 1.08)
    drifting_run(tmp_path, "b", rng, 1.15)
    base = [load_run("a1", tmp_path), load_run("a2", tmp_path)]
    doc = compare_runs(base, load_run("b", tmp_path), GATE, cfg())
    assert doc["summary"]["compared"] == 5 and doc["exit_code"] == 0
    assert doc["summary"]["regressed"] == 0
    for row in doc["cases"]:
        assert row["baseline_runs"] == 2 and row["n_a"] == 400 and (row["units_a"], row["units_b"]) == (2, 1)
        assert row["verdict"] == "unchanged" and row["mwu_p_holm"] < 1e-6
        # ratio of geometric means: 1.15 / sqrt(1.00 · 1.08); the CI spans the runs' spread
        assert row["p50_ratio"] == pytest.approx(1.15 / math.sqrt(1.08), rel=0.01)
        assert row["p50_ci"][0] < 1.0 < 1.05 < row["p50_ci"][1]
        bu = row["between_units"]["p50"]
        assert bu["borrowed"] == "b" and bu["df"] == 1
        # se² = s²(1/2 + 1), s = sd(log 1, log 1.08) (plus a little within-run sampling)
        assert bu["se"] == pytest.approx(math.log(1.08) / math.sqrt(2) * math.sqrt(1.5), rel=0.1)
        assert row["noise_floor"]["source"].startswith("between rounds (nested bootstrap, 2+1 units)")
    assert "spread between rounds" in markdown(doc)
    # The same candidate against either baseline run alone (no repeats: the within-run
    # floor of tight, drift-free repetitions is the 2 % minimum) is a false alarm unless
    # the whole-run shift (every case ×1.15, within the 15 % run-level floor) is held —
    # the reason repeats are the strongest source.
    no_shift = cfg(run_shift={"floor": 0, "min_cases": 5, "agree": 0.8})
    single = compare_runs(base[0], load_run("b", tmp_path), GATE, no_shift)
    assert single["summary"]["regressed"] == 5 and single["exit_code"] == 1
    assert {r["noise_floor"]["source"] for r in single["cases"]} == {"config minimum"}
    single = compare_runs(base[0], load_run("b", tmp_path), GATE, cfg())
    assert single["summary"]["regressed"] == 0 and single["summary"]["held_by_run_shift"] == 5
    assert single["exit_code"] == 0 and single["run_shift"][0]["removed"]


def test_a_real_shift_beyond_the_floor_regresses(tmp_path):
    """Three drifting baselines (×1.00, ×1.08, ×0.97); one case of the candidate is 60 %
    slower than the baseline's states allow (×1.04 state × 1.60): regressed, the rest
    unchanged; a +15 % shift stays within the spread between runs."""
    rng = np.random.default_rng(31)
    drifting_run(tmp_path, "a1", rng, 1.00)
    drifting_run(tmp_path, "a2", rng, 1.08)
    drifting_run(tmp_path, "a3", rng, 0.97)
    drifting_run(tmp_path, "b", rng, 1.04, shift={FAMILY[2]: 1.60})
    drifting_run(tmp_path, "c", rng, 1.04, shift={FAMILY[2]: 1.15})
    base = [load_run("a1", tmp_path), load_run("a2", tmp_path), load_run("a3", tmp_path)]
    doc = compare_runs(base, load_run("b", tmp_path), GATE, cfg())
    rows = by_id(doc)
    hit = rows[FAMILY[2]]
    gm = (1.00 * 1.08 * 0.97) ** (1 / 3)
    assert hit["verdict"] == "regressed" and hit["p50_ratio"] == pytest.approx(1.04 * 1.60 / gm, rel=0.03)
    assert hit["p50_ratio"] > 1 + hit["noise_floor"]["p50"] and hit["mwu_p_holm"] < 0.05
    assert any(r.startswith("p50") and "beyond the noise floor" in r for r in hit["reasons"])
    assert [r["verdict"] for r in doc["cases"]].count("regressed") == 1 and doc["exit_code"] == 1
    # +15 %: beyond the gate and significant by MWU, but not beyond the spread between runs.
    doc = compare_runs(base, load_run("c", tmp_path), GATE, cfg())
    mid = by_id(doc)[FAMILY[2]]
    assert mid["verdict"] == "unchanged" and mid["mwu_p_holm"] < 0.05 and doc["exit_code"] == 0


def test_single_baseline_floor_from_within_run_drift(tmp_path):
    """One baseline whose repetitions drift ±10 % over the run (a slow ramp): the block
    medians spread far beyond what sampling explains, so the floor comes from the
    drift (source named); a +8 % candidate stays within it, a +60 % one regresses."""
    rng = np.random.default_rng(32)
    drifting_run(tmp_path, "a", rng, ramp=0.10)
    drifting_run(tmp_path, "b", rng, 1.08)
    drifting_run(tmp_path, "c", rng, 1.60)
    drifting_run(tmp_path, "quiet", rng)
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    for row in doc["cases"]:
        nf = row["noise_floor"]
        assert nf["source"].startswith("within-run drift (5 blocks)") and nf["blocks"] == 5
        assert 0.15 < nf["p50"] < 0.6  # sd of 5 block medians of a ±10 % ramp ≈ 0.065, × 3·sqrt(2)
        assert row["verdict"] == "unchanged"
    assert doc["exit_code"] == 0
    assert {r["verdict"] for r in compare_runs(load_run("a", tmp_path), load_run("c", tmp_path), GATE,
                                               cfg())["cases"]} == {"regressed"}
    # Drift-free repetitions: the block spread is what sampling explains, the floor the
    # configured minimum (and that minimum follows the config).
    quiet = compare_runs(load_run("quiet", tmp_path), load_run("b", tmp_path), GATE, cfg())
    assert {r["noise_floor"]["source"] for r in quiet["cases"]} == {"config minimum"}
    assert {r["noise_floor"]["p50"] for r in quiet["cases"]} == {0.02}
    # Every case ×1.08: a whole-run shift within the 15 % run-level floor, held (one
    # baseline run cannot tell it from the machine's state); without that rule, 5 regress.
    assert quiet["summary"]["regressed"] == 0 and quiet["summary"]["held_by_run_shift"] == 5
    no_shift = {"run_shift": {"floor": 0, "min_cases": 5, "agree": 0.8}}
    quiet = compare_runs(load_run("quiet", tmp_path), load_run("b", tmp_path), GATE, cfg(**no_shift))
    assert quiet["summary"]["regressed"] == 5
    high = cfg(noise_floor={**load_config()["compare"]["noise_floor"], "min": 0.10}, **no_shift)
    assert compare_runs(load_run("quiet", tmp_path), load_run("b", tmp_path), GATE, high)["summary"]["regressed"] == 0


def test_family_median_raises_a_case_with_a_lucky_small_spread(tmp_path):
    """Three baseline repeats: four cases move together run to run (±8 %), one case
    happens to agree to 0.1 % — its own floor would be tiny; the family median lifts it."""
    rng = np.random.default_rng(33)
    states = [1.00, 1.08, 0.95]
    for r, st in enumerate(states):
        cases = {cid: lognormal(rng, 100, 1e-3 * (k + 1) * (st if k else 1 + 0.001 * r), 0.01)
                 for k, cid in enumerate(FAMILY)}
        make_run(tmp_path, f"a{r}", cases)
    make_run(tmp_path, "b", {cid: lognormal(rng, 100, 1e-3 * (k + 1) * 1.10, 0.01) for k, cid in enumerate(FAMILY)})
    base = [load_run(f"a{r}", tmp_path) for r in range(3)]
    doc = compare_runs(base, load_run("b", tmp_path), GATE, cfg())
    lucky = by_id(doc)[FAMILY[0]]
    assert lucky["noise_floor"]["own"] < 0.02 < lucky["noise_floor"]["family"] == pytest.approx(lucky["noise_floor"]["p50"])
    assert lucky["noise_floor"]["source"] == "between rounds (nested bootstrap, 3+1 units), decode family median"
    assert lucky["verdict"] == "unchanged" and doc["exit_code"] == 0
    # (Without the whole-run shift rule: the candidate's ×1.10 state lies within the
    # spread of the three baseline runs' states, which would hold the case anyway.)
    nopool = cfg(noise_floor={**load_config()["compare"]["noise_floor"], "pool": "none"},
                 run_shift={"floor": 0, "min_cases": 5, "agree": 0.8})
    lucky = by_id(compare_runs(base, load_run("b", tmp_path), GATE, nopool))[FAMILY[0]]
    assert lucky["verdict"] == "regressed" and lucky["noise_floor"]["source"] == "config minimum"


def test_a_large_shift_with_too_few_samples_is_not_significant(tmp_path):
    make_run(tmp_path, "a", {f"k{i}@cpu:0": [1.0, 1.1, 0.9] for i in range(5)})
    make_run(tmp_path, "b", {f"k{i}@cpu:0": [1.2, 1.3, 1.1] for i in range(5)})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), {"p50": 1.05}, cfg())
    assert all(r["p50_ratio"] == pytest.approx(1.2) for r in doc["cases"])
    assert all(r["mwu_p_holm"] >= 0.05 and r["verdict"] == "unchanged" for r in doc["cases"])
    assert doc["exit_code"] == 0


def test_five_percent_median_shift_with_heavier_tail_amplifies_sla_violations(tmp_path):
    """The mode 5 headline: a +5 % median shift with a heavier tail multiplies the
    violations of the baseline's p99 by ≥ 3 — caught by the SLA gate although the p50
    gate (+10 % here) lets the median through."""
    rng = np.random.default_rng(5)
    n = 4000
    a = lognormal(rng, n, 1e-3, 0.08)
    b = lognormal(rng, n, 1.05e-3, 0.08)
    tail = rng.random(n) < 0.04
    b[tail] *= np.exp(np.abs(rng.normal(0, 0.3, tail.sum())))  # a heavier upper tail
    make_run(tmp_path, "a", {"decode@cpu:0": a})
    make_run(tmp_path, "b", {"decode@cpu:0": b})
    gates = parse_gate("p50:+10%,sla:2x")
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), gates, cfg())
    row = doc["cases"][0]
    assert row["p50_ratio"] == pytest.approx(1.05, abs=0.015)
    sla = row["sla"]
    assert sla["threshold_source"] == "baseline p99"
    assert sla["v_a"] == pytest.approx(0.01, abs=0.002)
    assert sla["amplification"] >= 3
    assert sla["v_b_ci"][0] > sla["v_a_ci"][1]  # Wilson intervals apart
    assert row["verdict"] == "regressed" and any("SLA violations" in r for r in row["reasons"])
    assert not any(r.startswith("p50") for r in row["reasons"])
    assert doc["exit_code"] == 1
    text = markdown(doc, show_all=True)
    assert f"×{sla['amplification']:.3g}" in text and "**regressed**" in text
    assert "**regressed**" in markdown(doc) and "SLA violations ×" in markdown(doc)


def test_no_baseline_violations_is_reported_as_new_violations_not_a_division(tmp_path):
    c = cfg()
    c["compare"]["sla"]["thresholds"] = {"slo*": 0.01}
    make_run(tmp_path, "a", {"slo@cpu:0": np.full(50, 0.005), "slo2@cpu:0": np.full(50, 0.005)})
    b = np.full(50, 0.005)
    b[:10] = 0.02
    make_run(tmp_path, "b", {"slo@cpu:0": b, "slo2@cpu:0": np.full(50, 0.006)})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), {"sla": 2.0}, c)
    rows = by_id(doc)
    sla = rows["slo@cpu:0"]["sla"]
    assert sla["threshold_s"] == 0.01 and sla["threshold_source"] == "config"
    assert sla["v_a"] == 0 and sla["v_b"] == pytest.approx(0.2)
    assert math.isinf(sla["amplification"]) and sla["note"] == "new violations"
    assert rows["slo@cpu:0"]["verdict"] == "regressed"
    assert rows["slo2@cpu:0"]["sla"]["amplification"] is None
    assert rows["slo2@cpu:0"]["sla"]["note"] == "no violations"
    out = json.loads(json.dumps(to_jsonable(doc)))
    assert by_id(out)["slo@cpu:0"]["sla"]["amplification"] == "inf"


def test_one_sided_and_not_ok_cases_are_listed_not_compared(tmp_path):
    rng = np.random.default_rng(3)
    make_run(tmp_path, "a", {"both@cpu:0": lognormal(rng, 30), "only_a@cpu:0": lognormal(rng, 30),
                             "skip@cpu:0": "skipped", "fail@cpu:0": lognormal(rng, 30)})
    make_run(tmp_path, "b", {"both@cpu:0": lognormal(rng, 30), "only_b@cpu:0": lognormal(rng, 30),
                             "skip@cpu:0": "skipped", "fail@cpu:0": "failed"})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    assert [r["case_id"] for r in doc["cases"]] == ["both@cpu:0"]
    assert doc["only_in_baseline"] == ["only_a@cpu:0"] and doc["only_in_candidate"] == ["only_b@cpu:0"]
    nc = {r["case_id"]: r for r in doc["not_compared"]}
    assert nc["skip@cpu:0"]["status_a"] == "skipped" and nc["fail@cpu:0"]["status_b"] == "failed"
    assert "failed on purpose" in nc["fail@cpu:0"]["reason"]
    s = doc["summary"]
    assert (s["compared"], s["only_in_baseline"], s["only_in_candidate"], s["not_compared"]) == (1, 1, 1, 2)


def test_no_case_in_common_is_bad_input(tmp_path):
    make_run(tmp_path, "a", {"x@cpu:0": [1.0]})
    make_run(tmp_path, "b", {"y@cpu:0": [1.0]})
    with pytest.raises(UserError, match="no case in common"):
        compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())


def test_multi_rank_cases_compare_the_slowest_rank(tmp_path):
    rng = np.random.default_rng(4)
    fast = [lognormal(rng, 80) for _ in range(2)]
    slow_rank = [lognormal(rng, 80), lognormal(rng, 80, 1.5e-3)]  # rank 1 slowed by half
    make_run(tmp_path, "a", {}, ranks={"ar@cpu:0-1": fast})
    make_run(tmp_path, "b", {}, ranks={"ar@cpu:0-1": slow_rank})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    row = doc["cases"][0]
    assert row["n_a"] == row["n_b"] == 80  # repetitions, not rank samples
    assert row["p50_ratio"] > 1.3 and row["verdict"] == "regressed"


def test_indicator_deltas_and_their_absence(tmp_path):
    rng = np.random.default_rng(6)
    make_run(tmp_path, "a", {"k@cpu:0": lognormal(rng, 20)})
    make_run(tmp_path, "b", {"k@cpu:0": lognormal(rng, 20)},
             indicators={"mode1": {"straggler": {"value": 0.3, "unit": ""}}})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    assert doc["indicators"]["measurable"] is False
    assert "not measurable: no indicators.json in baseline (a)" in doc["indicators"]["reason"]
    make_run(tmp_path, "c", {"k@cpu:0": lognormal(rng, 20)},
             indicators={"mode1": {"straggler": {"value": 0.1, "unit": ""}}, "mode4": {"tail": 2.0},
                         "mode5": {"x": 1.0}})
    doc = compare_runs(load_run("c", tmp_path), load_run("b", tmp_path), GATE, cfg())
    deltas = {d["indicator"]: d for d in doc["indicators"]["deltas"]}
    assert deltas["mode1.straggler"]["delta"] == pytest.approx(0.2) and deltas["mode1.straggler"]["mode"] == "mode 1"
    assert deltas["mode4.tail"]["candidate"] is None
    assert "mode5.x" not in deltas


def test_environment_diff_names_changed_facts():
    def env(driver, cores, layers):
        return {"environment": {
            "cpu": {"physical_cores": {"value": cores, "source": "x"}, "frequency": {"max_mhz": {"value": 3000, "source": "y"}}},
            "nvidia": {"available": True, "driver_version": {"value": driver, "source": "nvml"},
                       "gpus": [{"index": {"value": 0, "source": "i"}, "clocks_max_sm_mhz": {"value": 1980, "source": "n"}}]},
            "virtualization": {"summary": layers, "layers": [{"layer": "hypervisor", "kind": layers}]},
        }, "devices": [{"id": "cuda:0", "name": "H100"}]}

    diff = environment_diff(env("550.1", 32, "kvm"), env("560.2", 16, "none"))
    changed = {d["fact"]: d for d in diff["changed"]}
    assert changed["nvidia.driver_version"]["baseline"] == "550.1" and changed["nvidia.driver_version"]["candidate"] == "560.2"
    assert changed["cpu.physical_cores"]["category"] == "topology"
    assert changed["virtualization.summary"]["candidate"] == "none"
    assert "gpu0.clocks_max_sm_mhz" not in changed and "cpu.frequency.max_mhz" not in changed
    assert diff["identical"] > 0
    assert environment_diff(env("1", 1, "kvm"), env("1", 1, "kvm"))["changed"] == []


def test_generation_comparison_shows_efficiency_and_perf_per_watt(tmp_path):
    rng = np.random.default_rng(7)
    tel = {"g@cuda:0": pd.DataFrame({"t_s": [0.1, 0.2, 0.3], "case_id": "g@cuda:0", "source": "gpu:0",
                                     "metric": "power_w", "value": [300.0, 400.0, 500.0]})}
    make_run(tmp_path, "old", {"g@cuda:0": lognormal(rng, 40)}, devices=[{"id": "cuda:0", "name": "NVIDIA A100"}],
             telemetry=tel)
    make_run(tmp_path, "new", {"g@cuda:0": lognormal(rng, 40, 0.5e-3)}, devices=[{"id": "cuda:0", "name": "NVIDIA H100"}])
    doc = compare_runs(load_run("old", tmp_path), load_run("new", tmp_path), GATE, cfg())
    gen = doc["generation"]
    assert gen["classes_baseline"] == ["NVIDIA A100"] and gen["classes_candidate"] == ["NVIDIA H100"]
    row = gen["cases"][0]
    assert row["rate_unit"] == "FLOP/s" and row["rate_b"] > 1.8 * row["rate_a"]
    assert row["roofline_a"] == 0.5
    assert row["power_w_a"] == pytest.approx(400.0)
    assert row["perf_per_w_a"] == pytest.approx(row["rate_a"] / 400.0)
    assert row["perf_per_w_b"] is None and "candidate: no power telemetry" in row["power_note"]
    assert by_id(doc)["g@cuda:0"]["verdict"] == "improved"
    # Same device class: no generation view.
    make_run(tmp_path, "new2", {"g@cuda:0": lognormal(rng, 40)}, devices=[{"id": "cuda:0", "name": "NVIDIA A100"}])
    assert compare_runs(load_run("old", tmp_path), load_run("new2", tmp_path), GATE, cfg())["generation"] is None


def test_results_repeat_exactly_with_the_seed(tmp_path):
    rng = np.random.default_rng(8)
    make_run(tmp_path, "a", {"k@cpu:0": lognormal(rng, 50)})
    make_run(tmp_path, "b", {"k@cpu:0": lognormal(rng, 50)})
    one = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())["cases"][0]
    two = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())["cases"][0]
    assert one["p50_ci"] == two["p50_ci"] and one["p99_ci"] == two["p99_ci"]


def test_config_validation(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("compare: {alpha: 2}\n")
    with pytest.raises(UserError, match="compare.alpha"):
        load_config(bad)
    bad.write_text("compare: {gaet: x}\n")
    with pytest.raises(UserError, match="unknown key 'gaet'"):
        load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("compare: {gate: 'p50:+20%'}\n")
    c = load_config(good)
    assert c["compare"]["gate"] == "p50:+20%" and c["compare"]["alpha"] == 0.05 and c["fleet"]["z_threshold"] == 3.5


# -- the command -----------------------------------------------------------------------
def test_cli_exit_codes_and_formats(tmp_path):
    rng = np.random.default_rng(9)
    make_run(tmp_path, "a", {"k@cpu:0": lognormal(rng, 100), "j@cpu:0": lognormal(rng, 100)})
    make_run(tmp_path, "same", {"k@cpu:0": lognormal(rng, 100), "j@cpu:0": lognormal(rng, 100)})
    make_run(tmp_path, "slow", {"k@cpu:0": lognormal(rng, 100, 1.5e-3), "j@cpu:0": lognormal(rng, 100)})
    out = str(tmp_path)
    proc = coherence("compare", "a", "same", "--results", out)
    assert proc.returncode == 0, proc.stderr
    assert "0 regressed, 0 improved" in proc.stdout and "2 unchanged, 0 only in one run" in proc.stdout
    proc = coherence("compare", "a", "slow", "--results", out, "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert by_id(doc)["k@cpu:0"]["verdict"] == "regressed" and doc["summary"]["gated_regressed"] == 1
    proc = coherence("compare", "a", "slow", "--results", out, "--markdown", "--gate", "p50:+60%")
    assert proc.returncode == 0 and proc.stdout.startswith("## coherence compare")
    assert "| `k@cpu:0` |" not in proc.stdout and "### Changed cases (0 of 2)" in proc.stdout
    proc = coherence("compare", "a", "slow", "--results", out, "--markdown", "--gate", "p50:+60%", "--all")
    assert "| `k@cpu:0` |" in proc.stdout and "| `j@cpu:0` |" in proc.stdout
    for args in (["--gate", "p50:+5"], ["--gate", "p42:+5%"], ["--json", "--markdown"], ["--json", "--all"]):
        proc = coherence("compare", "a", "slow", "--results", out, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("coherence: error:") and proc.stderr.count("\n") == 1
    make_run(tmp_path, "other", {"zzz@cpu:0": [1.0]})
    proc = coherence("compare", "a", "other", "--results", out)
    assert proc.returncode == 2 and "no case in common" in proc.stderr


def test_cli_repeated_baselines_directory_and_floor_report(tmp_path):
    rng = np.random.default_rng(34)
    bases = tmp_path / "bases"
    drifting_run(bases, "a1", rng, 1.00)
    drifting_run(bases, "a2", rng, 1.08)
    drifting_run(tmp_path, "b", rng, 1.15)
    out = str(tmp_path)
    # Single baseline: the drift between runs is unseen -> false alarms, exit 1.
    proc = coherence("compare", str(bases / "a1"), "b", "--results", out)
    assert proc.returncode == 1, proc.stderr
    assert "5 regressed" in proc.stdout and "config minimum" in proc.stdout
    # Two repeats, as two arguments or as a directory: the floor holds them, exit 0.
    for args in ([str(bases / "a1"), str(bases / "a2")], [str(bases)]):
        proc = coherence("compare", *args, "b", "--results", out, "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert [r["run_id"] for r in doc["baselines"]] == ["a1", "a2"] and doc["noise_floor"]["baseline_runs"] == 2
        assert doc["summary"]["regressed"] == 0
        assert all(r["noise_floor"]["source"].startswith("between rounds (nested bootstrap, 2+1 units)")
                   for r in doc["cases"])
    proc = coherence("compare", str(bases), "b", "--results", out)
    assert proc.returncode == 0 and "0 regressed" in proc.stdout
    assert "noise floor from between rounds" in proc.stdout and "baseline repeat" in proc.stdout
    proc = coherence("compare", str(bases), "b", "--results", out, "--markdown")
    assert "spread between rounds" in proc.stdout
    proc = coherence("compare", str(bases), "b", "--results", out, "--markdown", "--all")
    assert "| noise floor (source) |" in proc.stdout
    # --min-floor raises the floor for a single baseline.
    proc = coherence("compare", str(bases / "a1"), "b", "--results", out, "--min-floor", "0.2")
    assert proc.returncode == 0, proc.stdout
    # Bad input: one argument, a candidate that is a directory or also a baseline.
    for args in (["b"], [str(bases / "a1"), str(bases)], [str(bases), str(bases / "a2")]):
        proc = coherence("compare", *args, "--results", out)
        assert proc.returncode == 2 and proc.stderr.startswith("coherence: error:") and proc.stderr.count("\n") == 1


def test_noise_floor_config_validation(tmp_path):
    bad = tmp_path / "c.yaml"
    for text, match in (("compare: {noise_floor: {min: 1.5}}", "noise_floor.min"),
                        ("compare: {noise_floor: {blocks: 1}}", "noise_floor.blocks"),
                        ("compare: {noise_floor: {pool: all}}", "noise_floor.pool"),
                        ("compare: {noise_floor: {coverage: -1}}", "noise_floor.coverage"),
                        ("compare: {noise_floor: {mni: 0.1}}", "unknown key 'mni'"),
                        ("compare: {load: {differ: 0}}", "load.differ"),
                        ("compare: {load: {differ: 1.5}}", "load.differ"),
                        ("compare: {load: {differ: true}}", "load.differ"),
                        ("compare: {load: {share: 0.1}}", "unknown key 'share'"),
                        ("fleet: {pool_scale: yes}", "fleet.pool_scale")):
        bad.write_text(text + "\n")
        with pytest.raises(UserError, match=match):
            load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("compare: {noise_floor: {min: 0.05}}\n")
    nf = load_config(good)["compare"]["noise_floor"]
    assert nf["min"] == 0.05 and nf["coverage"] == 3.0 and nf["pool"] == "family"


# -- rounds, foreign load, old runs (issue 18) ---------------------------------------------
FIXTURE_V1 = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "aa-v1"


def rounds_run(root, name, rng, states, shift=None, n=40, load=None):
    """A run of the FAMILY cases in len(states) rounds: round r at its own machine state
    (a factor on every case), repetitions with 2 % noise; samples carry ``round`` and the
    rows ``foreign_cpu_share`` / ``steal_share`` when ``load`` = (foreign, steal)."""
    cases = {}
    for k, cid in enumerate(FAMILY):
        cases[cid] = np.concatenate([lognormal(rng, n, 1e-3 * (k + 1) * st * (shift or {}).get(cid, 1.0), 0.02)
                                     for st in states])
    path = make_run(root, name, cases)
    s = pd.read_parquet(path / "samples.parquet")
    s["round"] = (s["rep"] // n).astype("int64")
    s.to_parquet(path / "samples.parquet", index=False)
    if load is not None:
        c = pd.read_parquet(path / "cases.parquet")
        c["foreign_cpu_share"], c["steal_share"] = load
        c.to_parquet(path / "cases.parquet", index=False)
    return path


def test_rounds_carry_the_run_to_run_variance_into_one_baseline(tmp_path):
    """One baseline and one candidate of 3 rounds each, rounds ±10 % apart, no change:
    the pooled samples make every case 'significant' (MWU) but the nested bootstrap's
    CI spans the round spread — no verdict, exit 0. A +60 % change of one case regresses;
    the same +60 % with the candidate's rounds as noisy as a 2-core VM (×0.7–×1.5) does
    not by its p50, because 3 rounds that disagree that much cannot show it."""
    rng = np.random.default_rng(40)
    rounds_run(tmp_path, "a", rng, [1.00, 1.10, 0.92])
    rounds_run(tmp_path, "b", rng, [1.08, 0.95, 1.02])
    rounds_run(tmp_path, "c", rng, [1.08, 0.95, 1.02], shift={FAMILY[1]: 1.6})
    doc = compare_runs(load_run("a", tmp_path), load_run("b", tmp_path), GATE, cfg())
    assert doc["summary"]["regressed"] + doc["summary"]["improved"] == 0 and doc["exit_code"] == 0
    for row in doc["cases"]:
        assert (row["units_a"], row["units_b"]) == (3, 3) and row["noise_floor"]["kind"] == "rounds"
        assert row["p50_ci"][0] < 1.0 < row["p50_ci"][1]
        assert row["between_units"]["p50"]["borrowed"] is None and 2 <= row["between_units"]["p50"]["df"] <= 4
        assert row["noise_floor"]["source"].startswith("between rounds (nested bootstrap, 3+3 units)")
        assert row["noise_floor"]["p99"] >= row["noise_floor"]["p50"]
    # without rounds the same samples are one unit a side: the within-run floor, false alarms
    flat = tmp_path / "flat"
    for name in ("a", "b"):
        dst = flat / name
        dst.mkdir(parents=True)
        for f in (tmp_path / name).iterdir():
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())
        s = pd.read_parquet(dst / "samples.parquet").drop(columns=["round"])
        s.to_parquet(dst / "samples.parquet", index=False)
    pooled = compare_runs(load_run("a", flat), load_run("b", flat), GATE, cfg())
    assert {r["noise_floor"]["kind"] for r in pooled["cases"]} == {"blocks"}
    doc = compare_runs(load_run("a", tmp_path), load_run("c", tmp_path), GATE, cfg())
    assert [r["case_id"] for r in doc["cases"] if r["verdict"] == "regressed"] == [FAMILY[1]]
    assert by_id(doc)[FAMILY[1]]["p50_ratio"] == pytest.approx(1.6 * (1.08 * 0.95 * 1.02 / (1.1 * 0.92)) ** (1 / 3),
                                                                rel=0.03)
    rounds_run(tmp_path, "noisy", rng, [0.7, 1.5, 1.0], shift={FAMILY[1]: 1.6})
    doc = compare_runs(load_run("a", tmp_path), load_run("noisy", tmp_path), GATE, cfg())
    noisy = by_id(doc)[FAMILY[1]]
    assert noisy["p50_ci"][0] < 1.05 and not any(r.startswith("p50") for r in noisy["reasons"])


def test_rounds_and_baseline_repeats_pool_as_units(tmp_path):
    rng = np.random.default_rng(41)
    rounds_run(tmp_path, "a1", rng, [1.00, 1.05])
    rounds_run(tmp_path, "a2", rng, [0.97, 1.02, 1.04])
    rounds_run(tmp_path, "b", rng, [1.01, 0.99, 1.03])
    doc = compare_runs([load_run("a1", tmp_path), load_run("a2", tmp_path)], load_run("b", tmp_path), GATE, cfg())
    assert all((r["units_a"], r["units_b"]) == (5, 3) for r in doc["cases"])
    assert doc["exit_code"] == 0 and "spread between rounds" in markdown(doc)


def test_foreign_load_marks_the_verdict_and_names_the_loaded_side(tmp_path):
    """The candidate slowed 1.5× while it ran with 45 % foreign CPU against 2 %:
    'regressed (load)', the summary says so; the same slowdown with the baseline loaded
    (the candidate faster) is 'improved (load)'; equal loads leave plain verdicts."""
    rng = np.random.default_rng(42)
    rounds_run(tmp_path, "quiet", rng, [1.0, 1.02, 0.99], load=(0.02, 0.0))
    rounds_run(tmp_path, "busy", rng, [1.5, 1.52, 1.49], load=(0.45, 0.01))
    rounds_run(tmp_path, "slow", rng, [1.5, 1.52, 1.49], load=(0.03, 0.0))
    doc = compare_runs(load_run("quiet", tmp_path), load_run("busy", tmp_path), GATE, cfg())
    assert {r["verdict"] for r in doc["cases"]} == {"regressed"} and doc["exit_code"] == 1
    assert {r["verdict_label"] for r in doc["cases"]} == {"regressed (load)"}
    row = doc["cases"][0]
    assert row["load"]["differed"] and row["load"]["loaded_side"] == "candidate"
    assert row["load"]["share_b"] == pytest.approx(0.46) and row["load"]["foreign_cpu_a"] == pytest.approx(0.02)
    s = doc["summary"]["load"]
    assert s["regressed_load"] == 5 and s["loaded_candidate"] == 5
    md = markdown(doc)
    assert "candidate ran with 45% foreign CPU against 2%" in md and "regressed (load)" in md
    assert "the candidate ran with 46% of the machine taken by foreign load" in md
    back = compare_runs(load_run("busy", tmp_path), load_run("quiet", tmp_path), GATE, cfg())
    assert {r["verdict_label"] for r in back["cases"]} == {"improved (load)"}
    assert {r["load"]["loaded_side"] for r in back["cases"]} == {"baseline"}
    plain = compare_runs(load_run("quiet", tmp_path), load_run("slow", tmp_path), GATE, cfg())
    assert {r["verdict_label"] for r in plain["cases"]} == {"regressed"}
    assert not any(r["load"]["differed"] for r in plain["cases"])
    proc = coherence("compare", "quiet", "busy", "--results", str(tmp_path))
    assert proc.returncode == 1 and "regressed (load)" in proc.stdout
    assert "foreign load: candidate ran with 45% foreign CPU against 2%" in proc.stdout
    # threshold: a 10-point difference is "differed" at the default, not at 0.5
    wide = cfg(load={"differ": 0.5})
    assert {r["verdict_label"] for r in compare_runs(load_run("quiet", tmp_path), load_run("busy", tmp_path), GATE,
                                                     wide)["cases"]} == {"regressed"}


def test_runs_made_before_rounds_compare_as_before():
    """Recorded pre-rounds runs (schema 1, no round column, no foreign-load columns) load,
    and one baseline against one candidate gives what compare gave before rounds existed
    (figures from that version, seeded bootstrap): same ratios, CIs and floors; no load is
    reported. The two false verdicts of that version are gone: the 1 MiB copy and the
    GEMM were preempted in every baseline repetition (durations on the 4 ms tick grid),
    so they are not compared; the qkv projection's p99 of 40 repetitions is their maximum,
    not gated without rounds."""
    runs = {r: load_run(FIXTURE_V1 / r) for r in ("A1", "A2", "B")}
    assert runs["A1"].loaded_from_version == 1
    doc = compare_runs(runs["A1"], runs["B"], GATE, cfg())
    rows = {r["case_id"].split("@")[0]: r for r in doc["cases"]}
    expected = {
        # floor 0.436 before: the family median took in the preempted 1 MiB copy
        "transfer.local[size_bytes=4096]": ("unchanged", 0.9850320741268709, 0.2575019781616974),
        "decode.projection[model=tiny,proj=qkv,batch=1,dtype=fp32]": ("unchanged", 1.0071986570185467, 0.02),
        "decode.projection[model=tiny,proj=down,batch=1,dtype=fp32]": ("unchanged", 1.0033874534390046, 0.02),
    }
    assert set(rows) == set(expected)
    preempted = {r["case_id"].split("@")[0]: r["reason"] for r in doc["not_compared"] if "scheduler tick" in r["reason"]}
    assert set(preempted) == {"gemm.square[n=256,dtype=fp32]", "transfer.local[size_bytes=1048576]"}
    assert all(r.startswith("baseline: ") and "4 ms scheduler tick" in r for r in preempted.values())
    qkv = rows["decode.projection[model=tiny,proj=qkv,batch=1,dtype=fp32]"]
    assert qkv["p99_ratio"] > 5 and "p99 not gated: 40 repetitions" in qkv["p99_gate"]
    assert doc["exit_code"] == 0 and doc["summary"]["regressed"] == doc["summary"]["improved"] == 0
    for cid, (verdict_text, ratio, floor) in expected.items():
        r = rows[cid]
        assert (r["units_a"], r["units_b"]) == (1, 1) and "between_units" not in r
        assert r["verdict"] == r["verdict_label"] == verdict_text
        assert r["p50_ratio"] == pytest.approx(ratio, rel=1e-12) and r["noise_floor"]["p50"] == pytest.approx(floor)
        assert r["load"]["share_a"] is None and not r["load"]["differed"]
    assert doc["summary"]["load"]["foreign_cpu_a"] is None and "foreign load" not in markdown(doc)
    # separate old runs are units: two repeats against one candidate use the spread between them
    two = compare_runs([runs["A1"], runs["A2"]], runs["B"], GATE, cfg())
    assert {(r["units_a"], r["units_b"]) for r in two["cases"]} == {(2, 1)} and two["exit_code"] == 0


def test_case_units_split_by_round_and_take_the_slowest_rank():
    from harness.compare import case_units

    s = pd.DataFrame({"case_id": "c", "rank": [0, 1, 0, 1, 0, 1, 0, 1], "rep": [0, 0, 1, 1, 2, 2, 3, 3],
                      "round": [0, 0, 0, 0, 1, 1, 1, 1], "duration_s": [1.0, 2.0, 3.0, 1.0, 5.0, 4.0, 6.0, 7.0]})
    units = case_units(s, "c")
    assert [u.tolist() for u in units] == [[2.0, 3.0], [5.0, 7.0]]
    old = s.drop(columns=["round"])
    assert [u.tolist() for u in case_units(old, "c")] == [[2.0, 3.0, 5.0, 7.0]]
    assert case_units(s, "other") == []


def test_a_candidate_preempted_every_repetition_regresses_attributed_to_load():
    """The other way round: a clean baseline, a candidate whose 1 MiB copy was preempted in
    every repetition. A noisy target is a finding (the verdict stands, exit 1), attributed
    to load with the evidence — not hidden."""
    runs = {r: load_run(FIXTURE_V1 / r) for r in ("A1", "B")}
    doc = compare_runs(runs["B"], runs["A1"], GATE, cfg())
    row = next(r for r in doc["cases"] if r["case_id"].startswith("transfer.local[size_bytes=1048576]"))
    assert row["verdict"] == "regressed" and row["verdict_label"] == "regressed (load)"
    assert row["load"]["loaded_side"] == "candidate" and "4 ms scheduler tick" in row["load"]["preempted"]
    assert doc["exit_code"] == 1
    assert "candidate: 76% of repetitions at multiples (2, 3) of a 4 ms scheduler tick" in markdown(doc)
    proc = coherence("compare", str(FIXTURE_V1 / "B"), str(FIXTURE_V1 / "A1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "preempted" in proc.stdout


# -- rendering: concise by default -------------------------------------------------------
def cli(*args, columns=250):
    """The CLI in-process (click's runner: faster than a process per call), output piped
    into a terminal ``columns`` wide (COLUMNS)."""
    from click.testing import CliRunner

    from harness.cli import main

    return CliRunner(env={"COLUMNS": str(columns)}).invoke(main, [str(a) for a in args])


def _ind(value, unit="ratio", verdict="ok"):
    return {"value": value, "unit": unit, "verdict": verdict}


def concise_runs(tmp_path):
    """Baseline and candidate: one case 1.6× slower, five unchanged, two only in the
    baseline, one only in the candidate, and indicators of which one moved by 40 % (beyond
    the 10 % relative noise threshold), one by 2 % and one measured only in the candidate."""
    rng = np.random.default_rng(77)
    long_id = "decode.attention[ctx=4096,kv_heads=8,dtype=bf16,layout=paged,block=16]@cpu:0"
    same = {f"memory.triad[size_mib={2 ** k}]@cpu:0": 1e-3 * (k + 1) for k in range(5)}
    a = {long_id: lognormal(rng, 100), **{cid: lognormal(rng, 100, m) for cid, m in same.items()},
         "gone.one@cpu:0": lognormal(rng, 50), "gone.two@cpu:0": lognormal(rng, 50)}
    b = {long_id: lognormal(rng, 100, 1.6e-3), **{cid: lognormal(rng, 100, m) for cid, m in same.items()},
         "new.one@cpu:0": lognormal(rng, 50)}
    ind_a = {"schema_version": 1, "mode3": {"collective_scaling": _ind(0.50)}, "mode4": {"tail_weight": _ind(1.40),
             "timer_jitter": _ind(None, "interruptions > 10 us per s", "not measurable")}}
    ind_b = {"schema_version": 1, "mode3": {"collective_scaling": _ind(0.30)}, "mode4": {"tail_weight": _ind(1.43),
             "timer_jitter": _ind(500.0, "interruptions > 10 us per s")}}
    make_run(tmp_path, "a", a, indicators=ind_a)
    make_run(tmp_path, "b", b, indicators=ind_b)
    return long_id, list(same)


def test_compare_prints_changed_cases_then_one_summary_line_and_one_line_of_counts(tmp_path):
    """Piped at 80 columns: the regressed case with its figures, not the unchanged ones;
    the indicator that moved beyond its noise, not the one within it; then the geometric
    mean of the p50 ratios (pyperf's wording) and 'N unchanged, M only in one run' as the
    last two lines; no line wider than 80."""
    long_id, same = concise_runs(tmp_path)
    proc = cli("compare", "a", "b", "--results", tmp_path, columns=80)
    assert proc.exit_code == 1, proc.output
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    text = proc.stdout
    flat = " ".join(line.strip() for line in lines)
    assert flat.replace(" ", "").count(long_id) == 1  # the regressed case, wrapped if need be
    assert not any(cid in text for cid in same)  # unchanged cases are counted, not listed
    assert "gone.one" not in text and "new.one" not in text
    assert "mode3.collective_scaling: 0.5 → 0.3" in flat and "tail_weight" not in text
    assert "1 measured in one run only" in flat
    doc = json.loads(cli("compare", "a", "b", "--results", tmp_path, "--json").stdout)
    ratios = [r["p50_ratio"] for r in doc["cases"]]
    g = math.exp(np.mean(np.log(ratios)))
    assert doc["summary"]["geomean_p50_ratio"] == pytest.approx(g) and doc["summary"]["geomean_cases"] == 6
    assert 1.05 < g < 1.12
    tail = [line for line in lines if line and not line.startswith("  ")]
    assert tail[-2] == f"p50 geometric mean {g:.2f}x slower (+{(g - 1) * 100:.1f}%, 6 cases); 1 regressed, 0 improved"
    assert lines[-1] == "5 unchanged, 3 only in one run (2 baseline, 1 candidate)"
    # --json stays complete: every case and every indicator delta, each marked
    assert len(doc["cases"]) == 6 and doc["only_in_baseline"] == ["gone.one@cpu:0", "gone.two@cpu:0"]
    marks = {d["indicator"]: d["beyond_noise"] for d in doc["indicators"]["deltas"]}
    assert marks == {"mode3.collective_scaling": True, "mode4.tail_weight": False, "mode4.timer_jitter": None}
    assert doc["indicators"]["min_change"] == 0.10
    # --all shows everything
    full = cli("compare", "a", "b", "--results", tmp_path, "--all", columns=80).stdout
    assert all(cid in full for cid in same) and "gone.two@cpu:0" in full and "new.one@cpu:0" in full
    assert "mode4.tail_weight" in full and "MWU p (Holm)" in full
    assert max(len(line) for line in full.splitlines()) <= 80


def test_the_concise_output_is_shorter_than_the_full_one(tmp_path):
    concise_runs(tmp_path)
    args = ("compare", "a", "b", "--results", tmp_path)
    short = cli(*args, columns=80).stdout.splitlines()
    full = cli(*args, "--all", columns=80).stdout.splitlines()
    assert len(short) < len(full)
    md = cli(*args, "--markdown").stdout
    assert "### Changed cases (1 of 6)" in md and "memory.triad" not in md and "tail_weight" not in md
    assert "p50 geometric mean" in md and "5 unchanged, 3 only in one run" in md


def test_indicator_noise_from_ci_when_present_else_the_relative_threshold():
    from harness.compare import indicator_beyond_noise

    assert indicator_beyond_noise({"baseline": 1.0, "candidate": 1.05}) == (False, "relative")
    assert indicator_beyond_noise({"baseline": 1.0, "candidate": 1.2}) == (True, "relative")
    assert indicator_beyond_noise({"baseline": 1.0, "candidate": 0.85}, 0.2) == (False, "relative")
    assert indicator_beyond_noise({"baseline": 0, "candidate": 2}) == (True, "relative")
    assert indicator_beyond_noise({"baseline": 0, "candidate": 0}) == (False, "relative")
    assert indicator_beyond_noise({"baseline": None, "candidate": 2.0}) == (None, "one side")
    # a CI on both sides decides, whatever the relative change
    wide = {"baseline": 1.0, "candidate": 1.5, "ci_a": [0.5, 1.6], "ci_b": [1.2, 2.0]}
    assert indicator_beyond_noise(wide) == (False, "ci")
    tight = {"baseline": 1.0, "candidate": 1.03, "baseline_ci": [0.99, 1.01], "candidate_ci": [1.02, 1.04]}
    assert indicator_beyond_noise(tight) == (True, "ci")


def test_indicator_min_change_is_configurable_and_checked(tmp_path):
    good = tmp_path / "g.yaml"
    good.write_text("compare: {indicators: {min_change: 0.5}}\n")
    assert load_config(good)["compare"]["indicators"]["min_change"] == 0.5
    for bad in ("0", "-0.1", "true", "'x'"):
        good.write_text(f"compare: {{indicators: {{min_change: {bad}}}}}\n")
        with pytest.raises(UserError, match="compare.indicators.min_change"):
            load_config(good)


def test_geometric_mean_in_pyperf_wording():
    from harness.compare import _pyperf_ratio, geomean_p50_ratio

    g, n = geomean_p50_ratio([{"p50_ratio": 2.0}, {"p50_ratio": 0.5}, {"p50_ratio": 1.0}, {"p50_ratio": None},
                              {"p50_ratio": float("inf")}])
    assert (g, n) == (pytest.approx(1.0), 3)
    assert geomean_p50_ratio([]) == (None, 0)
    assert _pyperf_ratio(1.25) == "1.25x slower" and _pyperf_ratio(0.8) == "1.25x faster"
    assert _pyperf_ratio(1.001) == "no change"


def test_out_still_names_the_results_folder_of_compare_with_a_warning(tmp_path):
    rng = np.random.default_rng(3)
    make_run(tmp_path, "a", {"k@cpu:0": lognormal(rng, 60)})
    make_run(tmp_path, "b", {"k@cpu:0": lognormal(rng, 60)})
    proc = cli("compare", "a", "b", "--out", tmp_path, "--json")
    assert proc.exit_code == 0, proc.output
    assert json.loads(proc.stdout)["candidate"]["run_id"] == "b"
    assert proc.stderr.count("\n") == 1 and "--out DIR for the folder holding runs is deprecated" in proc.stderr
    proc = cli("compare", "a", "b", "--results", tmp_path / "nowhere")
    assert proc.exit_code == 2 and proc.stderr.strip() == (f"coherence: error: --results {tmp_path / 'nowhere'}: "
                                                           "no such folder of runs")


def test_headline_indicators_are_shown_their_supporting_figures_counted():
    from harness.compare import headline_indicator, wrap

    for path in ("mode3.collective_scaling", "mode_4.tail_weight", "capacity.C_eff",
                 "serving[composite.tp_decode_step[world_size=2]@cpu:0-1].kappa",
                 "ladder[0].compute.fp32.efficiency"):
        assert headline_indicator(path), path
    for path in ("serving[composite.x[a=1]@cpu:0].components[decode.y[b=2]@cpu:0].p50_s",
                 "serving[composite.x[a=1]@cpu:0].waterfall.bars[nominal].seconds",
                 "serving[composite.x[a=1]@cpu:0].T_meas_p50_s", "ladder[0].memory.I", "mode1.drift.per_case"):
        assert not headline_indicator(path), path
    text = wrap("regressed decode.attention[model=tiny,batch=1,ctx=4096,layout=paged,dtype=bf16]@cpu:0", 40, 2)
    lines = text.splitlines()
    assert all(len(line) <= 40 for line in lines) and lines[1].startswith("    ")
    assert "".join(line.strip() for line in lines).replace(" ", "") == \
        "regresseddecode.attention[model=tiny,batch=1,ctx=4096,layout=paged,dtype=bf16]@cpu:0"
    assert all(line.rstrip().endswith(",") for line in lines[:-1])  # folded between parameters
