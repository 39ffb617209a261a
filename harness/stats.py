"""Per-case summary statistics of timed samples (the cases.parquet columns)."""

from __future__ import annotations

import math

import numpy as np

SUMMARY_COLUMNS = ("n", "p50_s", "p90_s", "p99_s", "mean_s", "std_s", "mad_s", "min_s", "max_s")


def summarize(durations_s) -> dict:
    """Quantiles (linear interpolation, numpy's default), mean, sample std, the median
    absolute deviation (unscaled) and the extremes. Empty input gives None values."""
    x = np.asarray(durations_s, dtype=float)
    if x.size == 0:
        return {"n": 0, **{k: None for k in SUMMARY_COLUMNS if k != "n"}}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {
        "n": int(x.size),
        "p50_s": float(p50),
        "p90_s": float(p90),
        "p99_s": float(p99),
        "mean_s": float(x.mean()),
        "std_s": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "mad_s": float(np.median(np.abs(x - p50))),
        "min_s": float(x.min()),
        "max_s": float(x.max()),
    }


def rate(amount: float | None, seconds: float | None) -> float | None:
    """amount / seconds, or None when either is missing or the amount is zero."""
    if not amount or not seconds or seconds <= 0:
        return None
    return float(amount) / float(seconds)


# -- hierarchical (rounds, then samples) bootstrap -----------------------------------------
# A run made of rounds is two-level data: rounds (top-level units: each a fresh worker at
# another time of the run, so each sees another state of the machine) and repetitions
# within a round. Repetitions of one round are not independent draws of the run-to-run
# variation, so resampling them alone (the plain bootstrap) sees only the within-round
# spread. The two-stage bootstrap resamples the units with replacement and then the
# samples within each chosen unit (Davison & Hinkley 1997, "Bootstrap Methods and their
# Application", §3.8 "Hierarchical data"; Saravanan, Berman & Sober 2020, "Application
# of the hierarchical bootstrap to multi-level data in neuroscience", NBDC 3(5)).
#
# The statistic is the mean over units of the log of each unit's quantile (the log of
# the geometric mean of the per-round p50, or p99). For a mean over units the two-stage
# bootstrap variance splits exactly into a between-unit part, shrunk by (K−1)/K, and
# the within-unit sampling counted a second time; a pooled quantile has no such split
# (with a few well separated rounds its bootstrap variance came out ~25 % too large on
# synthetic data, and the interval over-covered by 2-3 points).
NESTED_CHUNK_ELEMENTS = 4_000_000


def nested_bootstrap_log_quantiles(units, qs, resamples: int, rng, resample_units: bool = True) -> np.ndarray:
    """Two-stage bootstrap replicates of mean_k log(quantile_q(unit k)).

    units: K ≥ 1 one-dimensional arrays of positive values (the samples of each
    top-level unit, e.g. the repetition durations of each round, seconds). Each
    replicate draws K units with replacement (stage 1), then within each drawn unit as
    many samples as it has, with replacement (stage 2), takes each unit's q-quantile
    (numpy's linear interpolation, the definition of :func:`summarize`) and averages
    their logs. ``resample_units`` False keeps the K units and resamples only within
    them (the within-unit part of the variance). Vectorized: units of unequal size are
    padded with NaN (sorted last), each quantile interpolated over its own count.
    Returns shape (resamples, len(qs)). Raises ValueError when there is no unit, a unit
    is empty or a value is not > 0."""
    units = [np.asarray(u, dtype=float).ravel() for u in units]
    if not units or any(u.size == 0 for u in units):
        raise ValueError("nested bootstrap: every unit needs at least one sample")
    if not all(np.all(u > 0) for u in units):
        raise ValueError("nested bootstrap: values must be > 0 (log scale)")
    k = len(units)
    sizes = np.array([u.size for u in units])
    nmax = int(sizes.max())
    table = np.full((k, nmax), np.nan)
    for i, u in enumerate(units):
        table[i, : u.size] = u
    qs = np.asarray(qs, dtype=float)
    out = np.empty((resamples, qs.size))
    chunk = max(1, NESTED_CHUNK_ELEMENTS // (k * nmax))
    equal = bool(np.all(sizes == nmax))
    for start in range(0, resamples, chunk):
        r = min(resamples, start + chunk) - start
        chosen = (rng.integers(0, k, size=(r, k)) if resample_units     # stage 1: units
                  else np.broadcast_to(np.arange(k), (r, k)))
        n_of = sizes[chosen]                                            # (r, k)
        pick = (rng.random((r, k, nmax)) * n_of[..., None]).astype(np.int64)  # stage 2
        values = table[chosen[..., None], pick]                         # (r, k, nmax)
        if equal:
            quant = np.quantile(values, qs, axis=2)                     # (len(qs), r, k)
        else:
            values[np.arange(nmax)[None, None, :] >= n_of[..., None]] = np.nan
            values.sort(axis=2)                                         # NaN sorts last
            quant = np.empty((qs.size, r, k))
            for col, q in enumerate(qs):
                h = (n_of - 1) * q
                lo = np.floor(h).astype(np.int64)
                hi = np.minimum(lo + 1, n_of - 1)
                vlo = np.take_along_axis(values, lo[..., None], axis=2)[..., 0]
                vhi = np.take_along_axis(values, hi[..., None], axis=2)[..., 0]
                quant[col] = vlo + (h - lo) * (vhi - vlo)
        out[start:start + r] = np.log(quant).mean(axis=2).T
    return out


def unit_log_quantiles(units, q: float) -> np.ndarray:
    """log of each unit's q-quantile (numpy's linear interpolation), shape (K,)."""
    return np.log([float(np.quantile(np.asarray(u, dtype=float), q)) for u in units])


def hierarchical_ratio(units_a, units_b, qs, resamples: int, rng, confidence: float = 0.95) -> list[dict]:
    """B/A ratios of the geometric mean of per-unit quantiles, with a confidence interval
    whose noise is the spread between top-level units (rounds, and separate runs).

    units_a, units_b: lists of sample arrays (seconds, all > 0), one per unit (see
    :func:`nested_bootstrap_log_quantiles`). Per side with K ≥ 2 units the variance of
    its statistic is (two-stage bootstrap variance − within-unit-only bootstrap
    variance) × K/(K−1), and never below the within-unit-only variance: the two-stage
    bootstrap counts the within-unit sampling twice and shrinks the between-unit spread
    by (K−1)/K (Davison & Hinkley 1997 §3.8). A side with one unit cannot show its own
    run-to-run spread: it borrows the other side's unit-level variance (K_other × that
    side's variance), as a new run is judged against the spread of k earlier ones. The
    interval is log r ± t·se with Student's t: se and df are Welch–Satterthwaite's
    (Welch 1947; K−1 per side) or, when larger, the pooled two-sample t's (one unit-level
    variance for both sides, df K_a + K_b − 2; always when K_a = K_b) — a side whose few
    rounds agree by chance does not make the ratio look certain; K_other − 1 when
    borrowed. With 3 rounds a side
    the t quantile (≈2.8 instead of 1.96) is what keeps the coverage near nominal. ``p``
    is the two-sided p-value of log r = 0 on the same t.

    Returns per q a dict: ratio, ci [lo, hi], p, se (of log r), df, t, se_a, se_b (of
    each side's statistic), s_unit_a, s_unit_b (sd of one unit's log quantile on that
    side alone, before pooling; the other side's when borrowed), k_a,
    k_b, borrowed ("a", "b" or None), method ("welch", "pooled" or "borrowed"). Raises ValueError when both sides have a single
    unit (no between-unit spread to use) or a value is not > 0."""
    from scipy.stats import t as student_t

    ka, kb = len(units_a), len(units_b)
    if ka < 2 and kb < 2:
        raise ValueError("hierarchical ratio: at least one side needs two or more units")
    var = {}
    for side, units in (("a", units_a), ("b", units_b)):
        if len(units) >= 2:
            k = len(units)
            v_both = np.var(nested_bootstrap_log_quantiles(units, qs, resamples, rng), axis=0, ddof=1)
            v_within = np.var(nested_bootstrap_log_quantiles(units, qs, resamples, rng, resample_units=False),
                              axis=0, ddof=1)
            var[side] = np.maximum(k / (k - 1) * (v_both - v_within), v_within)
        elif not np.all(np.asarray(units[0]) > 0):
            raise ValueError("hierarchical ratio: values must be > 0 (log scale)")
    out = []
    for col, q in enumerate(qs):
        lr = float(unit_log_quantiles(units_b, q).mean() - unit_log_quantiles(units_a, q).mean())
        borrowed = None
        method = "welch"
        if "a" in var and "b" in var:
            va, vb = float(var["a"][col]), float(var["b"][col])
            denom = va * va / (ka - 1) + vb * vb / (kb - 1)
            df = (va + vb) ** 2 / denom if denom > 0 else float(ka + kb - 2)
            # Pooled unit-level variance (the classic two-sample t): with 3 rounds a side,
            # one side's rounds agree by chance often enough (a bimodal case landing in one
            # mode three times) that its own spread says "certain"; the pooled spread does
            # not. The larger of the two se is used, with its own df; with as many units on
            # both sides the se are equal and the pooled t (df 2K − 2) is used — with equal
            # group sizes Student's t keeps its level under unequal variances (Scheffé
            # 1959, "The Analysis of Variance", §10.4), where Welch's df would fall to K − 1.
            own = (va * ka, vb * kb)
            pooled = ((ka - 1) * va * ka + (kb - 1) * vb * kb) / (ka + kb - 2)
            if ka == kb or pooled * (1 / ka + 1 / kb) > va + vb:
                va, vb, df, method = pooled / ka, pooled / kb, float(ka + kb - 2), "pooled"
        elif "a" in var:
            va = float(var["a"][col])
            vb, borrowed, df, method = va * ka, "b", float(ka - 1), "borrowed"
        else:
            vb = float(var["b"][col])
            va, borrowed, df, method = vb * kb, "a", float(kb - 1), "borrowed"
        if borrowed is not None or method == "welch":
            own = (va * ka, vb * kb)
        se = math.sqrt(va + vb)
        tq = float(student_t.ppf(0.5 + confidence / 2, df))
        p = float(2 * student_t.sf(abs(lr) / se, df)) if se > 0 else (1.0 if lr == 0 else 0.0)
        out.append({"ratio": math.exp(lr), "ci": [math.exp(lr - tq * se), math.exp(lr + tq * se)], "p": p,
                    "se": se, "df": df, "t": tq, "se_a": math.sqrt(va), "se_b": math.sqrt(vb),
                    "s_unit_a": math.sqrt(own[0]), "s_unit_b": math.sqrt(own[1]),
                    "k_a": ka, "k_b": kb, "borrowed": borrowed, "method": method})
    return out


#: Scheduler tick lengths of the common kernel timer rates (CONFIG_HZ 100, 250, 300, 1000).
SCHEDULER_TICKS_S = (10e-3, 4e-3, 1e-2 / 3, 1e-3)


def scheduler_quantized(durations_s, ticks=SCHEDULER_TICKS_S, tol: float = 0.06,
                        min_share: float = 0.5, min_mode_share: float = 0.1) -> dict | None:
    """Whether a case's repetitions measured the scheduler rather than the work: their
    durations sit at whole multiples of a scheduler tick, in two or more modes.

    A repetition that loses the CPU to another runnable task gets it back only at a tick
    boundary (CFS on a loaded core: one time slice per tick), so when every repetition is
    preempted the durations cluster at k × tick (k = 1, 2, 3, …) whatever the work is —
    e.g. a 34 µs 1 MiB copy timed at 4, 8, 12 and 16 ms on a saturated HZ=250 VM
    (pyperf issue 106). ``durations_s``: 1-D, seconds. For each tick T of ``ticks``
    (seconds), a repetition is *on the grid* when it is ≥ 0.9·T and within ``tol``·T of
    a multiple of T (by chance, with durations spread over several ticks, that is a
    2·tol share, 12 %). Quantized when at least ``min_share`` of the repetitions are on
    the grid and at least two multiples each hold ``min_share_mode`` of them, centred on
    the multiple (median offset within tol/3; a single tight mode — a 5.00 ms kernel —
    is not quantization, nor is a 10.5 ms kernel beside a few preempted repetitions at
    60 ms). Returns ``{"tick_s",
    "share", "multiples"}`` for the first tick that qualifies, else None (also for fewer
    than 8 repetitions)."""
    d = np.asarray(durations_s, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 8:
        return None
    for tick in ticks:
        k = np.rint(d / tick)
        on = (d >= 0.9 * tick) & (np.abs(d / tick - k) <= tol)
        share = float(on.mean())
        if share < min_share:
            continue
        values, counts = np.unique(k[on].astype(int), return_counts=True)
        offset = d / tick - k
        # A mode counts only when its repetitions sit ON the multiple (median offset
        # within tol/3): a kernel whose own duration is 10.5 ms has a mode near 1 × 10 ms
        # that lies off the grid by its work, not by the scheduler.
        modes = [int(v) for v, c in zip(values, counts) if c >= min_mode_share * d.size
                 and abs(float(np.median(offset[on & (k == v)]))) <= tol / 3]
        if len(modes) >= 2:
            return {"tick_s": float(tick), "share": share, "multiples": modes}
    return None
