from __future__ import annotations

import math

import numpy as np
import pytest

from harness.stats import rate, summarize


def test_summary_of_known_samples():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["n"] == 5
    assert s["p50_s"] == 3.0
    assert s["min_s"] == 1.0 and s["max_s"] == 100.0
    assert s["mean_s"] == pytest.approx(22.0)
    assert s["std_s"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    assert s["mad_s"] == 1.0  # |x - 3| = 2,1,0,1,97 -> median 1
    assert s["p90_s"] == pytest.approx(61.6)  # linear interpolation between 4 and 100


def test_empty_samples_give_nones():
    s = summarize([])
    assert s["n"] == 0 and s["p50_s"] is None


def test_rate():
    assert rate(10.0, 2.0) == 5.0
    assert rate(0.0, 2.0) is None and rate(5.0, None) is None and rate(5.0, 0.0) is None


# -- the nested (rounds, then samples) bootstrap -------------------------------------------
from harness.stats import hierarchical_ratio, nested_bootstrap_log_quantiles  # noqa: E402


def test_nested_bootstrap_of_unequal_units_matches_a_plain_loop():
    """The vectorized replicates equal a straightforward loop over the same draws: the
    loop re-draws with the same generator state, so both must agree exactly."""
    units = [np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0, 40.0, 50.0]), np.array([5.0])]
    got = nested_bootstrap_log_quantiles(units, (0.5, 0.9), 7, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    sizes = np.array([3, 5, 1])
    chosen = rng.integers(0, 3, size=(7, 3))
    pick = (rng.random((7, 3, 5)) * sizes[chosen][..., None]).astype(int)
    for r in range(7):
        for col, q in enumerate((0.5, 0.9)):
            logs = [np.log(np.quantile(units[u][pick[r, j, : sizes[u]]], q)) for j, u in enumerate(chosen[r])]
            assert got[r, col] == pytest.approx(np.mean(logs))
    # units kept as they are: only the within-unit draw varies; a one-sample unit never does
    within = nested_bootstrap_log_quantiles([np.array([5.0])] * 2, (0.5,), 5, np.random.default_rng(2),
                                            resample_units=False)
    assert within == pytest.approx(np.full((5, 1), np.log(5.0)))
    with pytest.raises(ValueError):
        nested_bootstrap_log_quantiles([np.array([1.0]), np.array([])], (0.5,), 5, np.random.default_rng(0))
    with pytest.raises(ValueError):
        hierarchical_ratio([np.array([1.0, 2.0])], [np.array([1.0, 2.0])], (0.5,), 100, np.random.default_rng(0))


def _coverage(trials, k, m, sigma_between, sigma_within, q, seed, k_b=None):
    """Share of A/A trials (both sides from the same two-level log-normal model: a
    per-round state ~ N(0, σ_b) in log, repetitions ~ N(0, σ_w) around it) whose 95 %
    interval of the ratio holds the true ratio 1."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        side = [[1e-3 * np.exp(rng.normal(0, sigma_between) + rng.normal(0, sigma_within, m)) for _ in range(kk)]
                for kk in (k, k_b or k)]
        r = hierarchical_ratio(side[0], side[1], (q,), 200, rng)[0]
        hits += r["ci"][0] <= 1.0 <= r["ci"][1]
    return hits / trials


def test_nested_bootstrap_coverage_with_known_between_round_variance():
    """3 rounds a side, the between-round spread (10 %) dominating the within-round one
    (2 %, 40 repetitions a round): coverage within 2 points of the nominal 95 % for p50
    and p99 (1000 seeded trials: binomial sd 0.7 points). The plain bootstrap of the
    pooled samples covers a fraction of that — the failure rounds exist to fix."""
    for q in (0.5, 0.99):
        cov = _coverage(1000, 3, 40, 0.10, 0.02, q, seed=7)
        assert abs(cov - 0.95) <= 0.02, (q, cov)
    from harness.compare import ratio_cis

    rng = np.random.default_rng(8)
    hits = 0
    for _ in range(200):
        a, b = ([1e-3 * np.exp(rng.normal(0, 0.10) + rng.normal(0, 0.02, 40)) for _ in range(3)] for _ in range(2))
        _, lo, hi = ratio_cis(np.concatenate(a), np.concatenate(b), (0.5,), 200, rng, 0.95)[0]
        hits += lo <= 1.0 <= hi
    assert hits / 200 < 0.6


def test_one_unit_side_borrows_the_other_sides_spread():
    """A single run (no rounds) against 3 rounds: the candidate borrows the baseline's
    unit-level spread (a new unit against the mean of three: se² = s²(1/3 + 1), t with 2
    degrees of freedom); coverage holds near nominal too."""
    rng = np.random.default_rng(5)
    a = [np.exp(rng.normal(s, 0.001, 50)) for s in (0.0, 0.1, -0.1)]
    r = hierarchical_ratio(a, [np.exp(rng.normal(0, 0.001, 50))], (0.5,), 400, rng)[0]
    assert r["borrowed"] == "b" and r["df"] == 2 and r["k_a"] == 3 and r["k_b"] == 1
    assert r["se"] == pytest.approx(0.1 * math.sqrt(1 / 3 + 1), rel=0.05)
    assert abs(_coverage(600, 3, 30, 0.10, 0.02, 0.5, seed=9, k_b=1) - 0.95) <= 0.025


def test_scheduler_quantized_finds_repetitions_on_the_tick_grid():
    from harness.stats import scheduler_quantized

    rng = np.random.default_rng(3)
    # a 34 µs copy preempted every repetition on an HZ=250 machine: 4, 8, 12 ms modes
    grid = np.concatenate([4e-3 * k + rng.normal(0, 2e-5, 10) for k in (1, 2, 3)])
    q = scheduler_quantized(grid)
    assert q is not None and q["tick_s"] == pytest.approx(4e-3) and set(q["multiples"]) == {1, 2, 3}
    assert q["share"] == pytest.approx(1.0)
    # HZ=100: 10 ms modes
    assert scheduler_quantized(np.concatenate([np.full(6, 0.0201), np.full(6, 0.0299)]))["tick_s"] == pytest.approx(0.01)


@pytest.mark.parametrize("case", ["continuous", "one_tight_mode", "microseconds", "too_few"])
def test_scheduler_quantized_leaves_real_timings_alone(case):
    from harness.stats import scheduler_quantized

    rng = np.random.default_rng(5)
    d = {"continuous": rng.uniform(2e-3, 30e-3, 200),          # spread over many ticks
         "one_tight_mode": 5.000e-3 + rng.normal(0, 1e-6, 50),  # a 5.00 ms kernel: on the 1 ms grid, one mode
         "microseconds": 34e-6 + rng.normal(0, 1e-6, 50),
         "too_few": np.array([4e-3, 8e-3, 12e-3, 4e-3])}[case]
    assert scheduler_quantized(d) is None


def test_a_kernel_near_one_tick_with_a_few_preempted_repetitions_is_not_quantized():
    """A GEMM whose own duration is 10.4-11.3 ms (one 10 ms tick and a bit) and 15 % of
    repetitions preempted to ~6 ticks: its main mode lies off the grid by its work, so
    only one centred mode remains: not the scheduler (the trial's gemm fp16 n=1024)."""
    from harness.stats import scheduler_quantized

    rng = np.random.default_rng(4)
    work = rng.uniform(10.4e-3, 11.3e-3, 85)
    preempted = 60e-3 + rng.normal(0, 0.1e-3, 15)
    assert scheduler_quantized(np.concatenate([work, preempted])) is None
    # The same preemptions with a 34 µs copy (every repetition waits whole ticks): quantized.
    waits = np.concatenate([np.full(45, 10e-3), np.full(40, 20e-3), preempted]) + rng.normal(0, 50e-6, 100)
    assert scheduler_quantized(waits)["multiples"] == [1, 2, 6]
