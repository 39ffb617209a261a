"""Per-case summary statistics of timed samples (the cases.parquet columns)."""

from __future__ import annotations

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
