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
    "F3.slowest_link": ("min over ordered pairs of link B/s (pairwise matrix, row = sender) / group median; "
                        "group median = median over ranks of each rank's median link; links < theta x it are flagged"),
    "F3.slowest_node": ("min over ranks of the rank's median link B/s (both directions) / group median; "
                        "a rank < theta x it is a slow node"),
    "F4.fit": "robust fit t = a + b work (Theil-Sen) over every sample of a size sweep; R^2 = 1 - SS_res/SS_tot; noise = IQR(residual / fitted)",
    "F4.tail": "p99 / p50 of the case's samples",
    "F4.outliers": "share of samples > p50 + 5 MAD",
    "F4.jitter": "clock-read gaps > 10 us per second of reading (overhead.timer)",
    "F4.jitter_share": "sum of clock-read gaps > 10 us / wall time of the reading loop (overhead.timer)",
    "F4.steal": "steal ticks / all ticks from /proc/stat during the case",
    "F4.launch": "p50 of an empty device operation incl. synchronization (overhead.launch)",
    "S.kappa": "kappa = T_pred / T_meas; T_pred = sum(count x p50 of each isolated component case), T_meas = p50 of the composite",
    "S.ceff": "C_eff = tokens/s x fraction of steps (requests) meeting the SLO",
    "S.cnom": ("C_nom = tokens per step / (sum over phases (prefill, each decode step) of max(FLOPs / N_compute, "
               "bytes / N_mem) + collective bus bytes / N_link + transfer bytes / N_link), full model: layer parts x "
               "num_layers / layers run + the parts outside the layers; ranks sharing one device share its nominal"),
    "S.full_model": "full-model time = (measured - parts outside the layers) x num_layers / layers run + parts outside (isolated p50)",
    "S.ttft": "TTFT = first output token - arrival (vLLM benchmark_serving, MLPerf): queueing included",
    "S.tpot": "TPOT = (E2E - TTFT) / (output tokens - 1) (vLLM benchmark_serving)",
    "S.itl": "ITL = every gap between consecutive output tokens, all requests pooled (vLLM benchmark_serving)",
    "S.e2e": "E2E = last output token - arrival",
    "S.request_throughput": "completed requests / benchmark duration (first arrival to last completion)",
    "S.output_throughput": "output tokens of completed requests / benchmark duration",
    "S.goodput": "requests meeting both TTFT <= SLO and TPOT <= SLO / benchmark duration (vLLM --goodput, DistServe)",
    "S.epsilon": "epsilon = C_eff / C_nom",
    "L.efficiency": "roofline efficiency = I / N",
    "E.j_per_token": ("J/token = energy_j / output tokens per repetition (TP step: batch; request: tokens x batch, "
                      "prefill included); full model: energy_j x num_layers / layers run + count x energy_j of the "
                      "parts outside the layers; energy_j = J per timed repetition summed over the case's devices "
                      "(NVML total-energy counter, NVML power integral or RAPL)"),
    "E.tokens_per_j": "tokens/J = 1 / (J/token)",
    "E.flops_per_j": ("FLOP/J = work-model FLOPs per repetition / energy_j, the best compute-bound (gemm) case on "
                      "the device"),
    "E.bytes_per_j": "B/J = work-model bytes per repetition / energy_j, the best memory-probe case on the device",
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


# -- serving metrics (INDICATORS.md §2) -------------------------------------------------------
def request_latencies(arrival_s: float, token_times_s) -> dict:
    """One request's latencies from its arrival and the times its output tokens came
    out (seconds, one clock, token order), as vLLM's benchmarks/benchmark_serving.py
    defines them (and MLPerf's inference rules for TTFT/TPOT):

    - ``ttft_s`` = first token − arrival (queueing included);
    - ``e2e_s`` = last token − arrival;
    - ``tpot_s`` = (e2e − ttft) / (tokens − 1), NaN for a one-token request;
    - ``itl_s`` = the gaps between consecutive tokens (tokens − 1 values).

    Raises ValueError for no tokens or tokens out of order."""
    t = np.asarray(token_times_s, dtype=float)
    if t.ndim != 1 or not len(t):
        raise ValueError("a request needs at least one output token time")
    gaps = np.diff(t)
    if (gaps < 0).any() or t[0] < arrival_s:
        raise ValueError("token times must follow the arrival and each other")
    ttft = float(t[0] - arrival_s)
    e2e = float(t[-1] - arrival_s)
    tpot = (e2e - ttft) / (len(t) - 1) if len(t) > 1 else float("nan")
    return {"ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot, "itl_s": [float(g) for g in gaps]}


def fifo_schedule(arrivals_s, service_s) -> tuple[np.ndarray, np.ndarray]:
    """(start, completion) of each request served one at a time in arrival order: the
    Lindley recursion start_i = max(arrival_i, completion_{i-1}), completion_i = start_i
    + service_i. Lets a truncated request's queueing be recomputed for the full-model
    service times under the same arrivals."""
    a = np.asarray(arrivals_s, dtype=float)
    svc = np.asarray(service_s, dtype=float)
    start, done = np.empty_like(a), np.empty_like(a)
    free = -np.inf
    for i in range(len(a)):
        start[i] = max(a[i], free)
        done[i] = free = start[i] + svc[i]
    return start, done


def serving_rates(ttft_s, tpot_s, output_tokens, duration_s: float, slo_ttft_s: float | None = None,
                  slo_tpot_s: float | None = None) -> dict:
    """Request throughput, output-token throughput and goodput over a benchmark lasting
    ``duration_s`` (first arrival to last completion), from per-request TTFT, TPOT and
    output token counts: vLLM benchmark_serving's ``request_throughput``,
    ``output_throughput`` and ``--goodput`` (requests meeting every SLO given, per
    second; DistServe, Zhong et al., OSDI 2024, §2). A request with one token has no
    TPOT and meets the TPOT SLO. A missing SLO is not checked. Raises ValueError for a
    non-positive duration."""
    if not duration_s > 0:
        raise ValueError("serving rates need a positive benchmark duration")
    ttft = np.asarray(ttft_s, dtype=float)
    tpot = np.asarray(tpot_s, dtype=float)
    good = np.ones(len(ttft), dtype=bool)
    if slo_ttft_s is not None:
        good &= ttft <= slo_ttft_s
    if slo_tpot_s is not None:
        good &= np.isnan(tpot) | (tpot <= slo_tpot_s)
    tokens = np.broadcast_to(np.asarray(output_tokens, dtype=float), ttft.shape)
    return {"request_throughput": len(ttft) / duration_s, "output_throughput": float(tokens.sum()) / duration_s,
            "goodput": float(good.sum()) / duration_s, "good_requests": int(good.sum()), "requests": len(ttft),
            "duration_s": float(duration_s)}


def phase_roofline_time(phases, n_compute: float, n_mem: float) -> float:
    """Nominal time of work done in phases that run one after the other (a request: its
    prefill, then each decode step): Σ count × max(FLOPs / N_compute, bytes / N_mem)
    over ``phases`` = [(flops, bytes, count)], each phase at its own roofline (Williams,
    Waterman, Patterson, "Roofline", CACM 2009). A compute-bound prefill and a
    memory-bound decode do not hide each other. Raises ValueError for a non-positive
    ceiling."""
    if not (n_compute > 0 and n_mem > 0):
        raise ValueError("phase roofline time needs positive compute and memory ceilings")
    return float(sum(count * max(flops / n_compute, nbytes / n_mem) for flops, nbytes, count in phases))


def full_model_time(measured_s, layers_run: int, model_layers: int, outside_s: float = 0.0,
                    outside_in_measured_s: float = 0.0):
    """A truncated model's time as the whole model's: (measured − the parts outside the
    layers that the measurement includes) × model_layers / layers_run + the parts
    outside the layers (embedding, final norm, LM head; isolated). Works on scalars
    and arrays. Raises ValueError when layers_run is not in 1..model_layers."""
    if not 1 <= layers_run <= model_layers:
        raise ValueError(f"layers run {layers_run} must be in 1..{model_layers}")
    return (np.asarray(measured_s, dtype=float) - outside_in_measured_s) * (model_layers / layers_run) + outside_s


def capacity_band(unit_s, meets, tokens_per_unit: float, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95, groups=None) -> tuple[float, float]:
    """The noise band of C_eff = tokens / mean(unit time) × fraction meeting the SLO: a
    percentile bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993,
    ch. 13) over the units (steps or requests), each resampled with its SLO outcome;
    ``level`` two-sided. ``groups`` (one label per unit: the round it was measured in)
    makes it nested, as INDICATORS.md §3 mode 5 asks of rounds: resample the rounds,
    then the units within each drawn round, so the spread between time windows is in
    the band. Seeded, so a run's band is reproducible. Raises ValueError on no units or
    mismatched lengths."""
    t = np.asarray(unit_s, dtype=float)
    ok = np.asarray(meets, dtype=float)
    if not len(t) or len(t) != len(ok):
        raise ValueError("capacity band needs one SLO outcome per unit and at least one unit")
    rng = np.random.default_rng(seed)
    labels = np.zeros(len(t), dtype=int) if groups is None else np.asarray(groups)
    if len(labels) != len(t):
        raise ValueError("capacity band needs one group label per unit")
    members = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    if len(members) == 1:
        idx = rng.integers(0, len(t), size=(resamples, len(t)))
        values = tokens_per_unit / t[idx].mean(axis=1) * ok[idx].mean(axis=1)
    else:
        values = np.empty(resamples)
        for i in range(resamples):
            drawn = [members[j] for j in rng.integers(0, len(members), size=len(members))]
            idx = np.concatenate([m[rng.integers(0, len(m), size=len(m))] for m in drawn])
            values[i] = tokens_per_unit / t[idx].mean() * ok[idx].mean()
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def finite(x) -> float | None:
    """A float for JSON, or None for NaN/inf/None."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
