"""The whole-run shift of harness.compare (issue 18): a machine state that lasts a
whole run moves every case of a bound class by one factor; within the run-level floor
it holds the verdicts it alone would make, beyond it the verdicts stand."""

from __future__ import annotations

import numpy as np
import pytest

from harness.compare import compare_runs, load_config, run_shifts
from harness.errors import UserError
from harness.results import load_run
from tests.harness.test_results import make_run

GATE = {"p50": 1.05, "p99": 1.10, "sla": 2.0}
CASES = [f"gemm.k{i}@cpu:0" for i in range(8)]


def run(root, name, rng, state=1.0, change=None, n=150):
    """One run of the 8 compute-bound CASES: base time × the machine's run-level
    ``state`` × ``change`` (case id -> a real factor) × 1 % noise."""
    cases = {cid: 1e-3 * (k + 1) * state * (change or {}).get(cid, 1.0) * np.exp(rng.normal(0, 0.01, n))
             for k, cid in enumerate(CASES)}
    make_run(root, name, cases)
    return load_run(name, root)


def verdicts(doc):
    return {r["case_id"]: r["verdict"] for r in doc["cases"]}


def test_an_a_a_pair_in_two_machine_states_gives_no_verdict(tmp_path):
    """Nothing changed, but the candidate's run was 8 % faster on every case (a machine
    state): one baseline run cannot tell that from a change. Every case is held, the
    shift is reported once, exit 0; with the rule off, all 8 'improved'."""
    rng = np.random.default_rng(1)
    a, b = run(tmp_path, "a", rng, 1.00), run(tmp_path, "b", rng, 0.92)
    doc = compare_runs(a, b, GATE, load_config())
    assert set(verdicts(doc).values()) == {"unchanged"} and doc["exit_code"] == 0
    assert doc["summary"]["held_by_run_shift"] == 8
    (shift,) = doc["run_shift"]
    assert shift["group"] == "compute-bound" and shift["cases"] == 8 and shift["removed"]
    assert shift["shift_ratio"] == pytest.approx(0.92, rel=0.01) and shift["agree"] == 1.0
    assert shift["floor"] == pytest.approx(0.15) and "one baseline run" in shift["floor_source"]
    assert "8.0% faster as a group" in shift["why"] or "7.9% faster" in shift["why"]
    for row in doc["cases"]:
        assert row["held_by_run_shift"] and row["run_shift"]["verdict"] == "unchanged"
    off = load_config()
    off["compare"]["run_shift"]["floor"] = 0
    doc = compare_runs(a, b, GATE, off)
    assert set(verdicts(doc).values()) == {"improved"} and doc["run_shift"] == []


def test_a_shift_beyond_the_run_level_floor_stands(tmp_path):
    """Every case 30 % slower: beyond the 15 % floor, all regressed, exit 1."""
    rng = np.random.default_rng(2)
    a, b = run(tmp_path, "a", rng, 1.00), run(tmp_path, "b", rng, 1.30)
    doc = compare_runs(a, b, GATE, load_config())
    assert set(verdicts(doc).values()) == {"regressed"} and doc["exit_code"] == 1
    assert not doc["run_shift"][0]["removed"] and "verdicts stand" in doc["run_shift"][0]["why"]
    assert doc["summary"]["held_by_run_shift"] == 0


def test_one_real_regression_inside_a_machine_shift_is_still_called(tmp_path):
    """The candidate's run was 7 % faster on every case, and one case got 50 % slower:
    that case regressed (beyond its noise with and without the shift), the others are
    held, not 'improved'."""
    rng = np.random.default_rng(3)
    a = run(tmp_path, "a", rng, 1.00)
    b = run(tmp_path, "b", rng, 0.93, change={CASES[3]: 1.5})
    doc = compare_runs(a, b, GATE, load_config())
    v = verdicts(doc)
    assert v[CASES[3]] == "regressed" and doc["exit_code"] == 1
    assert all(v[c] == "unchanged" for c in CASES if c != CASES[3])
    row = next(r for r in doc["cases"] if r["case_id"] == CASES[3])
    assert row["run_shift"]["verdict"] == "regressed" and not row["held_by_run_shift"]


def test_a_change_to_part_of_the_class_is_not_taken_for_a_machine_shift(tmp_path):
    """5 of 8 cases 10 % slower, 3 unchanged: the cases do not move together (62 % <
    80 %), so nothing is held — the 5 regress."""
    rng = np.random.default_rng(4)
    a = run(tmp_path, "a", rng, 1.00)
    b = run(tmp_path, "b", rng, 1.00, change={c: 1.10 for c in CASES[:5]})
    doc = compare_runs(a, b, GATE, load_config())
    v = verdicts(doc)
    assert [v[c] for c in CASES[:5]] == ["regressed"] * 5
    assert [v[c] for c in CASES[5:]] == ["unchanged"] * 3
    assert not doc["run_shift"][0]["removed"] and "did not move together" in doc["run_shift"][0]["why"]


def test_three_baseline_runs_measure_the_run_level_floor(tmp_path):
    """Three baseline runs that agree within 1 % measure a small whole-run spread: the
    floor comes from them, and a uniform +8 % candidate is a regression, where one
    baseline run (configured 15 % floor) holds it."""
    rng = np.random.default_rng(5)
    base = [run(tmp_path, f"a{i}", rng, s) for i, s in enumerate((1.00, 1.01, 0.99))]
    b = run(tmp_path, "b", rng, 1.08)
    doc = compare_runs(base, b, GATE, load_config())
    (shift,) = doc["run_shift"]
    assert "baseline repeats (k=3)" in shift["floor_source"] and shift["floor"] < 0.08
    assert not shift["removed"] and set(verdicts(doc).values()) == {"regressed"}
    single = compare_runs(base[0], b, GATE, load_config())
    assert single["run_shift"][0]["removed"] and set(verdicts(single).values()) == {"unchanged"}


def test_too_few_cases_make_no_group():
    rows = [{"case_id": f"c{i}", "p50_ratio": 0.9, "shift_group": "compute-bound"} for i in range(4)]
    assert run_shifts(rows, [{}], load_config()) == []


@pytest.mark.parametrize("key,value", [("floor", 1.5), ("floor", float("nan")), ("floor", True),
                                       ("min_cases", 1), ("min_cases", 2.5), ("agree", 0.3)])
def test_run_shift_config_is_validated(tmp_path, key, value):
    doc = {"floor": 0.15, "min_cases": 5, "agree": 0.8, key: value}
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"compare": {"run_shift": doc}}))
    with pytest.raises(UserError, match=f"compare.run_shift.{key}"):
        load_config(path)


def test_shown_medians_are_the_ones_the_ratio_is_made_of():
    """With rounds the ratio is one of geometric means of per-round p50s; the p50s shown
    beside it are those, so 'p50 A → B' and the ratio agree even when one round was slow
    (the pooled medians stay available)."""
    from harness.compare import compare_case

    rng = np.random.default_rng(6)
    ua = [1e-3 * np.exp(rng.normal(0, 0.01, 40)) for _ in range(3)]
    ub = [1e-3 * np.exp(rng.normal(0, 0.01, 40)) for _ in range(2)] + [20e-3 * np.exp(rng.normal(0, 0.01, 40))]
    row = compare_case("x@cpu:0", np.concatenate(ua), np.concatenate(ub), load_config(), units=(ua, ub))
    assert row["p50_b"] / row["p50_a"] == pytest.approx(row["p50_ratio"], rel=1e-9)
    assert row["p50_ratio"] == pytest.approx(20 ** (1 / 3), rel=0.03)
    assert row["p50_pooled_b"] == pytest.approx(1e-3, rel=0.05)  # the pooled median ignores the slow round
