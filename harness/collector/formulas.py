"""The formulas of INDICATORS.md on plain arrays: no run folders, no config.

Each function is one documented formula, so the unit tests can feed it synthetic
samples with known answers. Formula ids (``F1.straggler`` …) are what indicators.json
cites in each indicator's ``formula`` field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Formula ids and their text, cited by every indicator.
FORMULAS = {
    "F1.straggler": "S = E_steps[max_i t_i] / mean_i E_steps[t_i] - 1, t_i = rank i's compute time in a step",
    "F1.asymmetry": "A = (p_slow / p_fast) / (nominal_fast / nominal_slow); p = p50 (or p99) of one case on each device",
    "F1.drift": "Theil-Sen slope of duration vs elapsed time, x 60 s / median x 100 (%/minute)",
    "F1.gap_drift": "Theil-Sen slope of (slowest - fastest rank duration) per step vs elapsed time, %/minute of the median step",
    "F1.cusum": "two-sided tabular CUSUM on (d - median)/(1.4826 MAD) of the first third of the series, k = 0.5, h = 5; alarms counted, reset after each",
    "F2.decode_mem_eff": "achieved B/s of memory-bound decode kernels at p50 / I_mem (best isolated memory-probe B/s on the device)",
    "F2.util_illusion": "U = busy fraction reported during the case / (achieved FLOP/s / N_compute[dtype])",
    "F2.kv_share": "median over requests of kv_transfer_s / ttft_s",
    "F2.layout_penalty": "B/s contiguous / B/s paged, same probe, shape, path and device",
    "F2.pinning_penalty": "B/s pinned / B/s pageable, same direction and size",
    "F2.direction_asymmetry": "max(h2d, d2h) / min(h2d, d2h) B/s, pinned, same size",
    "F3.link_eff": "busbw (nccl-tests factors) at the largest size / N_link",
    "F3.scaling_coll": "busbw(n) / busbw(2), same op and size",
    "F3.scaling_tp": "E(n) = T(1) / (n T(n)), T = p50 step time of the TP decode step at n ranks",
    "F3.coll_share": "mean over steps of comm_s / step time of the rank with the longest compute in that step",
    "F3.accessible": "share of devices whose bandwidth to the group >= theta x the group median",
    "F4.fit": "robust fit t = a + b work (Theil-Sen) over every sample of a size sweep; R^2 = 1 - SS_res/SS_tot; noise = IQR(residual / fitted)",
    "F4.tail": "p99 / p50 of the case's samples",
    "F4.outliers": "share of samples > p50 + 5 MAD",
    "F4.jitter": "clock-read gaps > 10 us per second of reading (overhead.timer)",
    "F4.jitter_share": "sum of clock-read gaps > 10 us / wall time of the reading loop (overhead.timer)",
    "F4.steal": "steal ticks / all ticks from /proc/stat during the case",
    "F4.launch": "p50 of an empty device operation incl. synchronization (overhead.launch)",
    "S.kappa": "kappa = T_pred / T_meas; T_pred = sum(count x p50 of each isolated component case), T_meas = p50 of the composite",
    "S.ceff": "C_eff = tokens/s x fraction of steps (requests) meeting the SLO",
    "S.cnom": "C_nom = tokens per step / (max(FLOPs / N_compute, bytes / N_mem) + collective bus bytes / N_link + transfer bytes / N_link)",
    "S.epsilon": "epsilon = C_eff / C_nom",
    "L.efficiency": "roofline efficiency = I / N",
}


def straggler_penalty(per_step_rank_times: np.ndarray) -> float:
    """``per_step_rank_times[step, rank]``: S = E[max_i t_i] / mean_i E[t_i] − 1.

    [[1, 1, 1, 2]] in every step gives 2 / 1.25 − 1 = 0.6."""
    t = np.asarray(per_step_rank_times, dtype=float)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise ValueError("straggler penalty needs steps x ranks (at least 2 ranks)")
    mean_rank = t.mean(axis=0).mean()
    if mean_rank <= 0:
        raise ValueError("straggler penalty needs positive times")
    return float(t.max(axis=1).mean() / mean_rank - 1.0)


def asymmetry(slow: float, fast: float, nominal_slow: float | None, nominal_fast: float | None) -> dict:
    """Measured slow/fast latency ratio, the ratio the nominal peaks predict, and the
    asymmetry beyond nominal (their quotient; 1 = explained by the hardware)."""
    measured = slow / fast
    predicted = (nominal_fast / nominal_slow) if nominal_slow and nominal_fast else None
    return {"measured": measured, "predicted": predicted,
            "beyond_nominal": measured / predicted if predicted else None}


def theil_sen(x: np.ndarray, y: np.ndarray, max_points: int = 400) -> tuple[float, float, float, float]:
    """(slope, intercept, slope_low, slope_high) at 95 % through scipy's Theil–Sen,
    on at most ``max_points`` evenly spaced points (the estimator is O(n²))."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) > max_points:
        idx = np.linspace(0, len(x) - 1, max_points).round().astype(int)
        x, y = x[idx], y[idx]
    res = stats.theilslopes(y, x, alpha=0.95)
    return float(res.slope), float(res.intercept), float(res.low_slope), float(res.high_slope)


def drift_pct_per_min(t_s: np.ndarray, durations: np.ndarray) -> dict:
    """Theil–Sen drift of a case, %/minute of its median, with the 95 % interval."""
    med = float(np.median(durations))
    slope, _, lo, hi = theil_sen(t_s, durations)
    scale = 60.0 / med * 100.0 if med > 0 else float("nan")
    return {"pct_per_min": slope * scale, "low": lo * scale, "high": hi * scale,
            "significant": bool(lo > 0 or hi < 0)}


def cusum_alarms(durations: np.ndarray, k: float = 0.5, h: float = 5.0) -> list[int]:
    """Indices where a two-sided tabular CUSUM on robustly standardized durations
    crosses ``h`` (both sums reset after an alarm)."""
    d = np.asarray(durations, dtype=float)
    if len(d) < 4:
        return []
    # The in-control reference: the first third of the series (at least 10 samples).
    ref = d[: max(10, len(d) // 3)]
    med = np.median(ref)
    mad = np.median(np.abs(ref - med)) * 1.4826
    if mad <= 0:
        mad = np.std(ref) or 1.0
    z = (d - med) / mad
    hi = lo = 0.0
    alarms = []
    for i, v in enumerate(z):
        hi = max(0.0, hi + v - k)
        lo = max(0.0, lo - v - k)
        if hi > h or lo > h:
            alarms.append(i)
            hi = lo = 0.0
    return alarms


@dataclass
class SweepFit:
    a: float  # fixed per-operation overhead, s
    b: float  # s per unit of work
    r2: float  # control predictability
    noise: float  # IQR of the relative residuals
    n: int
    points: int  # distinct work values


def sweep_fit(work: np.ndarray, durations: np.ndarray) -> SweepFit:
    """t = a + b·work by Theil–Sen over every sample; R² and the residual dispersion."""
    x = np.asarray(work, dtype=float)
    y = np.asarray(durations, dtype=float)
    points = len(np.unique(x))
    if points < 2 or len(x) < 4:
        raise ValueError("a sweep fit needs at least 2 work sizes and 4 samples")
    b, a, _, _ = theil_sen(x, y)
    fitted = a + b * x
    ss_res = float(((y - fitted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (y - fitted) / np.where(np.abs(fitted) > 0, fitted, np.nan)
    rel = rel[np.isfinite(rel)]
    q75, q25 = np.percentile(rel, [75, 25]) if len(rel) else (float("nan"), float("nan"))
    return SweepFit(a=a, b=b, r2=r2, noise=float(q75 - q25), n=len(x), points=points)


def tail_weight(durations: np.ndarray) -> float:
    d = np.asarray(durations, dtype=float)
    return float(np.percentile(d, 99) / np.percentile(d, 50))


def outlier_share(durations: np.ndarray) -> float:
    d = np.asarray(durations, dtype=float)
    med = np.median(d)
    mad = np.median(np.abs(d - med))
    return float((d > med + 5 * mad).mean())


def tp_scaling_efficiency(t1: float, tn: float, n: int) -> float:
    """E(n) = T(1) / (n · T(n))."""
    return t1 / (n * tn)


def accessible_fraction(bandwidth_to_group: dict, theta: float = 0.5) -> float:
    """Share of devices whose bandwidth to the group is ≥ θ × the group median."""
    values = np.asarray(list(bandwidth_to_group.values()), dtype=float)
    med = np.median(values)
    return float((values >= theta * med).mean())


def finite(x) -> float | None:
    """A float for JSON, or None for NaN/inf/None."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
