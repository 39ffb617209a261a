"""Mode 5 (migration-induced reconfiguration risk): compare run B against run A.

Per case present and ``ok`` in both runs, from the per-repetition durations of
samples.parquet (multi-rank cases: the slowest rank per repetition):

- **p50 ratio** B/A with a bootstrap CI: each side is resampled on its own
  (``resamples`` times, seeded by ``seed`` and the case id, so results repeat); the CI is
  the percentile interval of the resampled ratios. Up to 2000 samples a side is resampled
  directly (numpy's linear-interpolation quantile); above that the resampled quantile is
  drawn exactly from its order-statistic distribution (the k-th smallest of a resample of
  size n is x_(j) with P(≤ x_(j)) = P(Binomial(n, j/n) ≥ k), k = ceil(q·n)), which costs
  O(n) once instead of O(resamples·n).
- **Mann–Whitney U** two-sided p-value (scipy.stats.mannwhitneyu), Holm-corrected across
  the compared cases; **Kolmogorov–Smirnov** statistic (scipy.stats.ks_2samp).
- **p99 ratio** B/A with the same bootstrap CI.
- **SLA amplification**: threshold τ = the case's SLO from config (``sla.thresholds``,
  case-id globs), else A's p99; violation rates v = share of repetitions > τ with Wilson
  intervals; amplification = v_B / v_A. v_A = 0: ``inf`` ("new violations") when v_B > 0,
  undefined ("no violations") when both are 0. Significance: Fisher's exact test on the
  2×2 violation counts, Holm-corrected across cases.

Baseline repeats. A may be several runs of the same cases (``compare A1 A2 A3 B``):
their repetitions are pooled for every statistic above (τ = the pooled p99), and their
spread sets the noise floor. Indicator deltas, the fingerprint diff and the generation
view use the first baseline run.

Noise floor (significance is necessary, not sufficient). Within a run repetitions are
tight, but run to run the whole machine moves (on a shared VM by tens of %), so MWU
finds "significant" shifts between any two runs. Each case gets a floor f (relative;
:func:`case_noise`, :func:`noise_floors`): f = max(``min``, exp(c · factor · s) − 1) with
c = ``coverage`` (3) and s the larger of the case's own estimate and its probe family's
median (``pool: family``): with k ≥ 2 baseline runs s = sd of their log p50,
factor = sqrt(1 + 1/k) (the p99 floor likewise from their log p99, at least the p50
floor); with one run s = the drift of its time-ordered samples between consecutive
blocks beyond what sampling within a block explains, factor = sqrt(2). The source is
reported per case.

Rounds (issue 18). A run made with ``--rounds N`` has a ``round`` column in
samples.parquet; each round ran in a fresh worker at another time of the run, so the
spread between rounds is the run-to-run variance the run carries itself. The top-level
units of a side are its rounds, over all its runs (baseline repeats pool: separate runs
are more units; a run without rounds is one unit). When a side has two or more units the
p50 and p99 ratios and their CIs come from :func:`harness.stats.hierarchical_ratio`:
ratio = the ratio of the geometric means of the per-unit quantiles; its se from the
nested bootstrap (units with replacement, then samples within each chosen unit; Davison
& Hinkley 1997 §3.8; Saravanan et al. 2020), corrected for the within-unit sampling it
counts twice and for the (K−1)/K shrink; CI = log ratio ± t·se at Welch–Satterthwaite
df (a side with one unit borrows the other side's unit-level spread, df = K_other − 1).
The floor is then ``coverage`` × the baseline's unit-level sd of log p50 ×
sqrt(1/K_a + 1/K_b) (p99: of the log p99 — the between-round spread of p99; what the
baseline moves on its own, so a candidate made noisy by its load does not raise its own
bar), raised to the family median (source "between rounds");
``between_units`` holds the figures. One baseline run of N ≥ 3 rounds is enough: its
rounds show the spread that a single round hides. With one unit on both sides (runs
made before rounds, or --rounds 1) everything is as before: plain bootstrap, floor from
the within-run drift.

Foreign load (issue 18). Per case, cases.parquet ``foreign_cpu_share`` (CPU time of
processes outside the run's process tree while the case ran, as a share of the machine)
and ``steal_share`` (harness.telemetry) give each side's load share (baseline repeats
averaged). When the shares differ by at least ``load.differ`` (0.10 of the machine) the
case's load *differed*; a regression while the candidate carried more is labelled
``regressed (load)`` (``verdict_label``; ``verdict`` stays "regressed", and it still
fails the gate: a noisy target is a finding), an improvement while the baseline carried
more ``improved (load)``. The reasons, the per-case column and the summary line ("the
candidate ran with 45 % foreign CPU against 2 %") name the loaded side. Runs without
these columns report no load and are never labelled.

Whole-run shift (issue 18). A machine state that lasts a whole run (a neighbour on the
hypervisor's SMT sibling, a turbo or memory-bandwidth state) moves every case of a bound
class by about one factor; rounds inside one run cannot see it, and with one run a side
it cannot be told from a change. :func:`run_shifts` estimates it per bound class (median
p50 ratio) and its run-level floor (3+ baseline runs: their whole-run spread; fewer: the
configured ``run_shift.floor``, 0.15). Within the floor, with the cases moving together
and no load difference, each case of the class is also judged with the candidate
divided by the shift, and a verdict the two judgements do not share is held
(``held_by_run_shift``): a case is called only when it moved beyond its noise both with
and without the machine's shift. The shift is reported per class in ``run_shift`` (one
line each, no verdict). A shift beyond the floor stands: the cases keep their verdicts.

Verdict per case under a gate (``p50:+5%,p99:+10%,sla:2x``; each gate is a ratio g > 1):

- p50: regressed when the p50 ratio's CI low > g, the ratio > 1 + f and the
  Holm-corrected MWU p < alpha; improved when CI high < 1/g, ratio < 1/(1 + f) and the
  same p < alpha.
- p99: regressed when the whole bootstrap CI of the p99 ratio lies above g (CI low > g)
  and the ratio > 1 + f99; improved when it lies below 1/g and the ratio < 1/(1 + f99).
  (A p99 from tens of samples is close to the maximum; the CI keeps a single slow
  repetition from failing a gate.)
- sla: the candidate's violations are counted over τ·(1 + f) (``beyond_floor.up``):
  regressed when that amplification > g and its Holm-corrected Fisher p < alpha;
  improved when, over τ/(1 + f), it is < 1/g with p < alpha. (A candidate merely shifted
  within the floor keeps it near 1; a heavier tail still multiplies it.) The reported
  ``amplification`` is the plain one over τ. With rounds f is the p99 floor (τ is a p99).

Each case also carries ``verdict_without_floor`` (f = 0); ``within_noise_floor`` marks
the cases the floor held back, counted in the summary.

A case is *regressed* when any gated metric regressed, *improved* when one improved and
none regressed, *unchanged* otherwise. Exit code 1 when a gated case (``gate_cases``
globs) regressed.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from harness.checks import check_number
from harness.config import CONFIG_DIR, read_yaml
from harness.errors import UserError
from harness.results import (
    Run,
    indicator_leaves,
    mode_of,
    rep_durations,
    rep_series,
)
from harness.stats import hierarchical_ratio, scheduler_quantized, unit_log_quantiles

DEFAULT_CONFIG = CONFIG_DIR / "compare.yaml"
GATE_METRICS = ("p50", "p99", "sla")
MAD_SCALE = 1.4826
DIRECT_BOOTSTRAP_MAX_N = 2000

# -- configuration ---------------------------------------------------------------------
DEFAULTS = {
    "compare": {
        "gate": "p50:+5%,p99:+10%,sla:2x",
        "alpha": 0.05,
        "confidence": 0.95,
        "bootstrap": {"resamples": 2000, "seed": 0},
        "gate_cases": ["*"],
        "sla": {"thresholds": {}},
        "noise_floor": {"min": 0.02, "coverage": 3.0, "blocks": 5, "min_block_samples": 4, "pool": "family"},
        "load": {"differ": 0.10},
        "indicators": {"min_change": 0.10},
        "run_shift": {"floor": 0.15, "min_cases": 5, "agree": 0.8},
    },
    "fleet": {
        "z_threshold": 3.5,
        "min_scale_rel": 0.02,
        "pool_scale": "family",
        "node_rule": "family-median",
        "metrics": ["p50_s", "best_rate"],
        "cases": ["*"],
        "indicators": ["epsilon", "C_eff", "C_nom"],
        "price_per_device_hour": None,
    },
}


def _merge(defaults: dict, doc: dict, where: str) -> dict:
    out = {}
    for key in doc:
        if key not in defaults:
            raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(defaults))})")
    for key, default in defaults.items():
        value = doc.get(key, default)
        if isinstance(default, dict) and key not in ("thresholds",) and default is not None:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise UserError(f"{where}.{key}: expected a mapping, got {value!r}")
            value = _merge(default, value, f"{where}.{key}")
        out[key] = value
    return out


# Upper bounds of compare.yaml's counts: past them a bootstrap or a block split takes
# minutes per case and is a typo, not a setting.
MAX_RESAMPLES = 1_000_000
MAX_BLOCKS = 10_000


def load_config(path: str | Path | None = None) -> dict:
    """configs/compare.yaml (or ``path``) merged over the built-in defaults, validated."""
    file = Path(path) if path else DEFAULT_CONFIG
    if path and not file.is_file():
        raise UserError(f"--config {path}: no such file")
    doc = read_yaml(file) if file.is_file() else {}
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise UserError(f"{file}: expected a mapping with 'compare' and 'fleet' keys")
    cfg = _merge(DEFAULTS, doc, str(file))
    c, f = cfg["compare"], cfg["fleet"]
    _num(c["alpha"], f"{file}: compare.alpha", 0, 1)
    _num(c["confidence"], f"{file}: compare.confidence", 0, 1)
    resamples = c["bootstrap"]["resamples"]
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 100 <= resamples <= MAX_RESAMPLES:
        raise UserError(f"{file}: compare.bootstrap.resamples: expected an integer from 100 to {MAX_RESAMPLES}, "
                        f"got {resamples!r}")
    if isinstance(c["bootstrap"]["seed"], bool) or not isinstance(c["bootstrap"]["seed"], int):
        raise UserError(f"{file}: compare.bootstrap.seed: expected an integer, got {c['bootstrap']['seed']!r}")
    parse_gate(c["gate"], f"{file}: compare.gate")
    _globs(c["gate_cases"], f"{file}: compare.gate_cases")
    thresholds = c["sla"]["thresholds"] or {}
    if not isinstance(thresholds, dict):
        raise UserError(f"{file}: compare.sla.thresholds: expected a mapping of case-id glob to seconds")
    for glob, seconds in thresholds.items():
        _num(seconds, f"{file}: compare.sla.thresholds.{glob}", 0, None)
    c["sla"]["thresholds"] = thresholds
    nf = c["noise_floor"]
    if isinstance(nf["min"], bool) or not isinstance(nf["min"], (int, float)) or not 0 <= nf["min"] < 1:
        raise UserError(f"{file}: compare.noise_floor.min: expected a number in [0, 1), got {nf['min']!r}")
    _num(nf["coverage"], f"{file}: compare.noise_floor.coverage", 0, None)
    for key, lo in (("blocks", 2), ("min_block_samples", 2)):
        v = nf[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_BLOCKS:
            raise UserError(f"{file}: compare.noise_floor.{key}: expected an integer from {lo} to {MAX_BLOCKS}, "
                            f"got {v!r}")
    differ = c["load"]["differ"]
    if isinstance(differ, bool) or not isinstance(differ, (int, float)) or not 0 < differ <= 1:
        raise UserError(f"{file}: compare.load.differ: expected a share of the machine in (0, 1], got {differ!r}")
    rs = c["run_shift"]
    if isinstance(rs["floor"], bool) or not isinstance(rs["floor"], (int, float)) or not 0 <= rs["floor"] < 1:
        raise UserError(f"{file}: compare.run_shift.floor: expected a number in [0, 1), got {rs['floor']!r}")
    if isinstance(rs["min_cases"], bool) or not isinstance(rs["min_cases"], int) or rs["min_cases"] < 2:
        raise UserError(f"{file}: compare.run_shift.min_cases: expected an integer ≥ 2, got {rs['min_cases']!r}")
    if isinstance(rs["agree"], bool) or not isinstance(rs["agree"], (int, float)) or not 0.5 <= rs["agree"] <= 1:
        raise UserError(f"{file}: compare.run_shift.agree: expected a share in [0.5, 1], got {rs['agree']!r}")
    min_change = c["indicators"]["min_change"]
    if isinstance(min_change, bool) or not isinstance(min_change, (int, float)) or not 0 < min_change < 10:
        raise UserError(f"{file}: compare.indicators.min_change: expected a relative change in (0, 10), "
                        f"got {min_change!r}")
    if nf["pool"] not in ("family", "none"):
        raise UserError(f"{file}: compare.noise_floor.pool: expected 'family' or 'none', got {nf['pool']!r}")
    _num(f["z_threshold"], f"{file}: fleet.z_threshold", 0, None)
    floor = f["min_scale_rel"]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise UserError(f"{file}: fleet.min_scale_rel: expected a number in [0, 1), got {floor!r}")
    _globs(f["cases"], f"{file}: fleet.cases")
    if f["pool_scale"] not in ("family", "none"):
        raise UserError(f"{file}: fleet.pool_scale: expected 'family' or 'none', got {f['pool_scale']!r}")
    if f["node_rule"] not in ("family-median", "any"):
        raise UserError(f"{file}: fleet.node_rule: expected 'family-median' or 'any', got {f['node_rule']!r}")
    known_metrics = {"p50_s", "best_rate"}
    for m in _list(f["metrics"], f"{file}: fleet.metrics"):
        if m not in known_metrics:
            raise UserError(f"{file}: fleet.metrics: unknown metric '{m}' (known: {', '.join(sorted(known_metrics))})")
    for m in _list(f["indicators"], f"{file}: fleet.indicators"):
        if m not in ("epsilon", "C_eff", "C_nom"):
            raise UserError(f"{file}: fleet.indicators: unknown indicator '{m}' (known: C_eff, C_nom, epsilon)")
    price = f["price_per_device_hour"]
    if isinstance(price, dict):
        for glob, p in price.items():
            _num(p, f"{file}: fleet.price_per_device_hour.{glob}", 0, None)
    elif price is not None:
        _num(price, f"{file}: fleet.price_per_device_hour", 0, None)
    return cfg


def _num(value, where: str, lo, hi) -> float:
    """A finite number in the open interval (lo, hi) (hi None: unbounded), else a
    UserError naming ``where`` (harness.checks.check_number: NaN and inf refused)."""
    return check_number(value, where, lo, hi, lo_open=True, hi_open=True)


def _list(value, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: expected a list of names, got {value!r}")
    return value


def _globs(value, where: str) -> list:
    return _list(value, where)


def parse_gate(text: str, where: str = "--gate") -> dict[str, float]:
    """``p50:+5%,p99:+10%,sla:2x`` -> {"p50": 1.05, "p99": 1.10, "sla": 2.0}.

    A relative change (``+5%``, ``5%``) or a multiplier (``1.05x``, ``2x``) per metric;
    every gate must be worse than no change (> 1×)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: empty gate; expected e.g. 'p50:+5%,p99:+10%,sla:2x'")
    gates: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\w+)\s*:\s*(\+?)(\d+(?:\.\d*)?|\.\d+)\s*(%|x|X)", item)
        if not m:
            raise UserError(f"{where}: malformed gate '{item}' (expected METRIC:+N% or METRIC:Nx, "
                            f"metrics {', '.join(GATE_METRICS)})")
        metric, number, unit = m.group(1).lower(), float(m.group(3)), m.group(4).lower()
        if metric not in GATE_METRICS:
            raise UserError(f"{where}: unknown gate metric '{metric}' (known: {', '.join(GATE_METRICS)})")
        if metric in gates:
            raise UserError(f"{where}: gate metric '{metric}' given twice")
        ratio = 1 + number / 100 if unit == "%" else number
        if not ratio > 1:
            raise UserError(f"{where}: gate '{item}' must allow some worsening (> +0% or > 1x)")
        gates[metric] = ratio
    return gates


def gate_text(gates: dict[str, float]) -> str:
    return ",".join(f"{m}:{g:g}x" if m == "sla" else f"{m}:+{(g - 1) * 100:g}%" for m, g in gates.items())


# -- statistics ------------------------------------------------------------------------
def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Share k/n with its Wilson score interval (Wilson 1927; no continuity correction):
    (k/n, low, high), or (None, None, None) when n ≤ 0. The interval is scipy's:
    ``scipy.stats.binomtest(k, n).proportion_ci(confidence, method="wilson")``."""
    from scipy.stats import binomtest

    if n <= 0:
        return None, None, None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return k / n, max(0.0, float(ci.low)), min(1.0, float(ci.high))


def bootstrap_quantiles(x: np.ndarray, qs: tuple[float, ...], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` bootstrap replicates of each q-quantile of x, shape (resamples, len(qs))
    (see the module doc for the two methods)."""
    x = np.sort(np.asarray(x, dtype=float))
    n = x.size
    out = np.empty((resamples, len(qs)))
    if n == 0:
        out[:] = np.nan
        return out
    if n <= DIRECT_BOOTSTRAP_MAX_N:
        chunk = max(1, 2_000_000 // n)
        for start in range(0, resamples, chunk):
            stop = min(resamples, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            out[start:stop] = np.quantile(x[idx], qs, axis=1).T
        return out
    from scipy.stats import binom

    grid = np.arange(1, n + 1) / n
    for col, q in enumerate(qs):
        k = max(1, math.ceil(q * n))
        cdf = binom.sf(k - 1, n, grid)  # P(k-th smallest of a resample <= x_(j))
        cdf[-1] = 1.0
        j = np.searchsorted(cdf, rng.random(resamples), side="left")
        out[:, col] = x[np.minimum(j, n - 1)]
    return out


def bootstrap_quantile(x: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    return bootstrap_quantiles(x, (q,), resamples, rng)[:, 0]


def ratio_cis(a: np.ndarray, b: np.ndarray, qs: tuple[float, ...], resamples: int, rng, confidence: float):
    """Per q: (point ratio quantile_q(b)/quantile_q(a), CI low, CI high), the CI being the
    percentile interval of the ratios of independently resampled quantiles (numpy's
    linear-interpolation quantile). a, b: repetition durations in seconds.

    Both sides of 2 to ``DIRECT_BOOTSTRAP_MAX_N`` samples, all > 0:
    ``scipy.stats.bootstrap`` (``paired=False``: each side resampled on its own;
    ``method="percentile"``), the statistic being the vector of ratios for all ``qs``.
    Otherwise the same interval is built here: a side above the cap draws its resampled
    quantiles from their order-statistic law (:func:`bootstrap_quantiles`, which scipy's
    API cannot express), and a single sample or a zero duration is resampled directly."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    points = [(float(np.percentile(a, q * 100)), float(np.percentile(b, q * 100))) for q in qs]
    if (2 <= a.size <= DIRECT_BOOTSTRAP_MAX_N and 2 <= b.size <= DIRECT_BOOTSTRAP_MAX_N
            and np.all(a > 0) and np.all(b > 0)):
        from scipy.stats import bootstrap

        q_arr = np.asarray(qs, dtype=float)

        def statistic(x, y, axis=-1):
            return np.quantile(y, q_arr, axis=axis) / np.quantile(x, q_arr, axis=axis)

        res = bootstrap((a, b), statistic, n_resamples=resamples, paired=False, vectorized=True,
                        method="percentile", confidence_level=confidence, rng=rng,
                        batch=max(1, 2_000_000 // max(a.size, b.size)))
        lows = np.atleast_1d(res.confidence_interval.low)
        highs = np.atleast_1d(res.confidence_interval.high)
        return [(qb / qa, float(lo), float(hi)) for (qa, qb), lo, hi in zip(points, lows, highs)]
    ra = bootstrap_quantiles(a, qs, resamples, rng)
    rb = bootstrap_quantiles(b, qs, resamples, rng)
    tail = (1 - confidence) / 2 * 100
    out = []
    for col, (qa, qb) in enumerate(points):
        if qa <= 0:
            out.append((None, None, None))
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            r = rb[:, col] / ra[:, col]
        r = r[np.isfinite(r)]
        if not r.size:
            out.append((qb / qa, None, None))
            continue
        lo, hi = np.percentile(r, [tail, 100 - tail])
        out.append((qb / qa, float(lo), float(hi)))
    return out


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(case_id.encode())])


def _sla_threshold(case_id: str, thresholds: dict) -> float | None:
    for glob, seconds in thresholds.items():
        if fnmatch.fnmatchcase(case_id, glob):
            return float(seconds)
    return None


#: Repetitions per side below which a single-unit p99 is the sample maximum (not gated).
P99_MIN_SAMPLES = 100


def compare_case(case_id: str, a: np.ndarray, b: np.ndarray, cfg: dict,
                 units: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> dict:
    """Every statistic of one case (before the Holm correction across cases).

    a, b: the pooled repetition durations (seconds) of each side. ``units``: the same
    split into top-level units (rounds; separate runs) per side; when given and a side
    has two or more, the p50/p99 ratios and CIs come from the nested bootstrap between
    units (:func:`harness.stats.hierarchical_ratio`; ``between_units`` holds its
    figures), else from the plain bootstrap of the pooled samples."""
    from scipy.stats import ks_2samp

    c = cfg["compare"]
    conf, resamples = c["confidence"], c["bootstrap"]["resamples"]
    rng = _case_rng(c["bootstrap"]["seed"], case_id)
    out: dict = {"case_id": case_id, "n_a": int(a.size), "n_b": int(b.size)}
    out["p50_a"], out["p50_b"] = float(np.median(a)), float(np.median(b))
    out["p99_a"], out["p99_b"] = float(np.percentile(a, 99)), float(np.percentile(b, 99))
    nested = None
    if units is not None and max(len(units[0]), len(units[1])) >= 2:
        try:
            nested = hierarchical_ratio(units[0], units[1], (0.5, 0.99), resamples, rng, conf)
        except ValueError:
            nested = None  # a zero duration: no log scale; the pooled bootstrap below
    if nested is not None:
        out["p50_ratio"], out["p50_ci"] = nested[0]["ratio"], nested[0]["ci"]
        out["p99_ratio"], out["p99_ci"] = nested[1]["ratio"], nested[1]["ci"]
        out["between_units"] = {"p50": nested[0], "p99": nested[1]}
        # The figures the ratio is made of: the geometric mean over units of each unit's
        # p50 / p99 (the pooled median of a case with one slow round is far from it, and
        # "335 µs → 424 µs, +1731 %" would read as a contradiction). Pooled ones kept.
        out["p50_pooled_a"], out["p50_pooled_b"] = out["p50_a"], out["p50_b"]
        out["p99_pooled_a"], out["p99_pooled_b"] = out["p99_a"], out["p99_b"]
        for q, key in ((0.5, "p50"), (0.99, "p99")):
            out[f"{key}_a"] = float(np.exp(unit_log_quantiles(units[0], q).mean()))
            out[f"{key}_b"] = float(np.exp(unit_log_quantiles(units[1], q).mean()))
    else:
        (out["p50_ratio"], *p50_ci), (out["p99_ratio"], *p99_ci) = ratio_cis(a, b, (0.5, 0.99), resamples, rng, conf)
        out["p50_ci"], out["p99_ci"] = p50_ci, p99_ci
        if min(a.size, b.size) < P99_MIN_SAMPLES:
            # Below 100 repetitions no sample lies above the 99th percentile: p99 is the
            # sample maximum, one preempted repetition, and its bootstrap CI cannot show
            # how much it moves between runs. Without rounds to measure that, the p99 gate
            # does not apply; the tail is judged by the SLA gate (counts over a threshold).
            out["p99_gate"] = (f"p99 not gated: {min(a.size, b.size)} repetitions on a side "
                               f"(< {P99_MIN_SAMPLES}, p99 is the maximum) and no rounds")
    out["mwu_p"] = mwu_p(a, b)
    out["ks"] = 0.0 if out["mwu_p"] == 1.0 and np.array_equal(np.sort(a), np.sort(b)) else float(ks_2samp(a, b).statistic)
    out["sla"] = sla_stats(case_id, a, b, cfg)
    return out


def mwu_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Mann–Whitney U p-value of B against A (scipy.stats.mannwhitneyu); 1.0
    when the two samples are identical or both constant at the same value (no test)."""
    from scipy.stats import mannwhitneyu

    if np.array_equal(np.sort(a), np.sort(b)) or (np.ptp(a) == 0 and np.ptp(b) == 0 and a[0] == b[0]):
        return 1.0
    return float(mannwhitneyu(b, a, alternative="two-sided").pvalue)


def sla_stats(case_id: str, a: np.ndarray, b: np.ndarray, cfg: dict) -> dict:
    """SLA amplification of one case (module doc): the threshold τ (config glob, else
    A's p99), violation counts and Wilson-interval rates per side, v_B / v_A with its
    note and Fisher's exact p. a, b: repetition durations in seconds."""
    c = cfg["compare"]
    conf = c["confidence"]
    tau = _sla_threshold(case_id, c["sla"]["thresholds"])
    source = "config" if tau is not None else "baseline p99"
    tau = float(np.percentile(a, 99)) if tau is None else tau
    ka, kb = int((a > tau).sum()), int((b > tau).sum())
    va, va_lo, va_hi = wilson(ka, a.size, conf)
    vb, vb_lo, vb_hi = wilson(kb, b.size, conf)
    amp, note, fisher_p = _amplification(ka, a.size, kb, b.size)
    return {
        "threshold_s": tau, "threshold_source": source,
        "violations_a": ka, "violations_b": kb,
        "v_a": va, "v_a_ci": [va_lo, va_hi], "v_b": vb, "v_b_ci": [vb_lo, vb_hi],
        "amplification": amp, "note": note, "fisher_p": fisher_p,
    }


def _amplification(ka: int, na: int, kb: int, nb: int) -> tuple[float | None, str, float]:
    """v_B / v_A with its note and Fisher's exact p on the 2×2 counts."""
    from scipy.stats import fisher_exact

    if ka == 0 and kb == 0:
        return None, "no violations", 1.0
    amp, note = (math.inf, "new violations") if ka == 0 else ((kb / nb) / (ka / na), "")
    return amp, note, float(fisher_exact([[kb, nb - kb], [ka, na - ka]]).pvalue)


# -- the run-to-run noise floor ----------------------------------------------------------
def case_noise(series: list[np.ndarray], nf: dict) -> dict:
    """The raw noise estimate of one case from its baseline run(s), each a time-ordered
    array of repetition durations (module doc, "Noise floor"):

    - k ≥ 2 runs: ``s`` = standard deviation (ddof 1) of the runs' log p50, ``s99`` the
      same of their log p99; ``factor`` = sqrt(1 + 1/k) (a new run against the mean of k);
    - one run: the repetitions cut into ``blocks`` consecutive blocks (each at least
      ``min_block_samples``); ``s`` = the drift part of the spread of the log block
      medians: sqrt(max(0, var(log block medians) − (π/2)·σ_w²/m)), σ_w the pooled robust
      (1.4826·MAD) spread of log durations within the blocks and m the block size, i.e.
      what sampling within a block does not explain (on independent, identically
      distributed repetitions s ≈ 0); ``factor`` = sqrt(2) (one state of the machine
      against another); no ``s99``.
    ``s`` is None when it cannot be estimated (one run too short for two blocks)."""
    series = [np.asarray(x, dtype=float) for x in series if len(x)]
    k = len(series)
    if k >= 2:
        p50 = np.log([np.median(x) for x in series])
        p99 = np.log([np.percentile(x, 99) for x in series])
        return {"kind": "repeats", "k": k, "blocks": None, "s": float(np.std(p50, ddof=1)),
                "s99": float(np.std(p99, ddof=1)), "factor": math.sqrt(1 + 1 / k)}
    x = series[0] if k else np.array([])
    nblocks = min(int(nf["blocks"]), x.size // int(nf["min_block_samples"]))
    s = None
    if nblocks >= 2 and np.all(x > 0):
        parts = [np.log(part) for part in np.array_split(x, nblocks)]
        medians = np.array([np.median(part) for part in parts])
        within = float(np.median([MAD_SCALE * np.median(np.abs(part - np.median(part))) for part in parts]))
        sampling = math.pi / 2 * within ** 2 / (x.size / nblocks)
        s = math.sqrt(max(0.0, float(np.var(medians, ddof=1)) - sampling))
    return {"kind": "blocks", "k": k, "blocks": nblocks if nblocks >= 2 else None, "s": s, "s99": None,
            "factor": math.sqrt(2)}


def noise_floors(rows: list[dict], noises: list[dict], nf: dict) -> list[dict]:
    """Per case the noise floor of the p50 and p99 ratios (relative: 0.12 = a ratio must
    lie beyond ×1.12 or ×1/1.12), and the source it came from. The case's own estimate is
    raised to the median estimate of its probe family (same kind of source) when
    ``pool: family``; the configured ``min`` is the floor under everything."""
    coverage, min_log = float(nf["coverage"]), math.log1p(float(nf["min"]))
    pooled: dict[tuple[str, str, str], float] = {}
    if nf["pool"] == "family":
        groups: dict[tuple[str, str, str], list[float]] = {}
        for row, noise in zip(rows, noises):
            for key in ("s", "s99"):
                if noise[key] is not None:
                    groups.setdefault((row["family"], noise["kind"], key), []).append(noise[key])
        pooled = {g: float(np.median(v)) for g, v in groups.items()}
    out = []
    for row, noise in zip(rows, noises):
        kind = noise["kind"]
        own = noise["s"]
        fam = pooled.get((row["family"], kind, "s"))
        s = max(v for v in (own, fam, 0.0) if v is not None)
        est = coverage * noise["factor"] * s
        if kind == "rounds":
            what = f"between rounds (nested bootstrap, {noise['k_a']}+{noise['k_b']} units)"
        elif kind == "repeats":
            what = f"baseline repeats (k={noise['k']})"
        elif noise["blocks"]:
            what = f"within-run drift ({noise['blocks']} blocks)"
        else:
            what = "within-run drift (too few samples)"
        if est <= min_log:
            source = "config minimum"
        elif fam is not None and (own is None or fam > own):
            source = f"{what}, {row['family']} family median"
        else:
            source = what
        log50 = max(est, min_log)
        log99 = log50
        if kind in ("repeats", "rounds"):
            own99, fam99 = noise["s99"], pooled.get((row["family"], kind, "s99"))
            s99 = max(v for v in (own99, fam99, 0.0) if v is not None)
            log99 = max(log50, coverage * noise["factor"] * s99)
        out.append({
            "p50": math.expm1(log50), "p99": math.expm1(log99), "source": source, "kind": kind,
            "k": noise["k"], "blocks": noise["blocks"],
            "own": None if own is None else math.expm1(coverage * noise["factor"] * own),
            "family": None if fam is None else math.expm1(coverage * noise["factor"] * fam),
            "min": float(nf["min"]), "coverage": coverage,
        })
    return out


def verdict(row: dict, gates: dict[str, float], alpha: float, use_floor: bool = True) -> tuple[str, list[str]]:
    """improved / unchanged / regressed, with the reasons (module doc). ``use_floor``
    False gives the verdict the statistics alone would give (what the floor held back)."""
    worse, better = [], []
    nf = row.get("noise_floor") or {}
    f50 = 1 + (nf.get("p50") or 0.0) if use_floor else 1.0
    f99 = 1 + (nf.get("p99") or 0.0) if use_floor else 1.0
    beyond = (lambda f: f", beyond the noise floor ×{f:.3g}") if use_floor and nf else (lambda f: "")
    if "p50" in gates and row.get("p50_ratio") is not None and row.get("p50_ci") and row["p50_ci"][0] is not None:
        g, r, p, (lo, hi) = gates["p50"], row["p50_ratio"], row["mwu_p_holm"], row["p50_ci"]
        if lo > g and r > f50 and p < alpha:
            worse.append(f"p50 {_pct(r)}, CI low {_pct(lo)} > {_pct(g)}{beyond(f50)} (MWU p_holm {p:.2g})")
        elif hi < 1 / g and r < 1 / f50 and p < alpha:
            better.append(f"p50 {_pct(r)}, CI high {_pct(hi)} < {_pct(1 / g)}{beyond(f50)} (MWU p_holm {p:.2g})")
    if "p99" in gates and row.get("p99_ci") and row["p99_ci"][0] is not None and not row.get("p99_gate"):
        g, r, (lo, hi) = gates["p99"], row["p99_ratio"], row["p99_ci"]
        if lo > g and r > f99:
            worse.append(f"p99 {_pct(r)}, CI low {_pct(lo)} > {_pct(g)}{beyond(f99)}")
        elif hi < 1 / g and r < 1 / f99:
            better.append(f"p99 {_pct(r)}, CI high {_pct(hi)} < {_pct(1 / g)}{beyond(f99)}")
    sla = row.get("sla") or {}
    if "sla" in gates:
        g = gates["sla"]
        up, down = (sla.get("beyond_floor") or {}).get("up"), (sla.get("beyond_floor") or {}).get("down")
        amp, p = sla.get("amplification"), sla.get("fisher_p_holm")
        if use_floor and up and down:
            (amp_up, p_up), (amp_down, p_down) = (up["amplification"], up["fisher_p_holm"]), \
                (down["amplification"], down["fisher_p_holm"])
        else:
            amp_up = amp_down = amp
            p_up = p_down = p
        # the factor the threshold was moved by (the p50 floor; with rounds the p99 floor)
        fs = up["threshold_s"] / sla["threshold_s"] if use_floor and up and sla.get("threshold_s") else f50
        if amp_up is not None and amp_up > g and p_up < alpha:
            where = f" over the threshold ×{fs:.3g} (noise floor)" if use_floor and fs > 1 else ""
            worse.append(f"SLA violations ×{_amp(amp_up)}{where} > ×{g:g} (Fisher p_holm {p_up:.2g})")
        elif amp_down is not None and amp_down < 1 / g and p_down < alpha:
            where = f" over the threshold ÷{fs:.3g} (noise floor)" if use_floor and fs > 1 else ""
            better.append(f"SLA violations ×{_amp(amp_down)}{where} < ×{1 / g:.3g} (Fisher p_holm {p_down:.2g})")
    if worse:
        return "regressed", worse + better
    if better:
        return "improved", better
    return "unchanged", []


def _pct(ratio: float | None) -> str:
    if ratio is None or math.isnan(ratio):
        return "—"
    if math.isinf(ratio):
        return "+inf"
    return f"{(ratio - 1) * 100:+.1f}%"


def _amp(amp) -> str:
    if amp is None:
        return "—"
    if math.isinf(amp):
        return "inf"
    return f"{amp:.3g}"


# -- environment -----------------------------------------------------------------------
def _val(node, *path):
    for key in path:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return None
    if isinstance(node, dict) and "value" in node:
        return node["value"]
    return node


def environment_facts(manifest: dict) -> dict[str, tuple[str, object]]:
    """The facts the fingerprint diff compares: name -> (category, value)."""
    env = manifest.get("environment") or {}
    facts: dict[str, tuple[str, object]] = {}

    def put(cat: str, name: str, value) -> None:
        if isinstance(value, (dict, list)):
            value = str(value)
        facts[name] = (cat, value)

    virt = env.get("virtualization") or {}
    put("virtualization", "virtualization.summary", virt.get("summary"))
    layers = virt.get("layers") or []
    put("virtualization", "virtualization.layers",
        ", ".join(f"{l.get('layer')}:{l.get('kind')}" for l in layers if isinstance(l, dict)) or None)
    for name, fw in sorted((env.get("frameworks") or {}).items()):
        if isinstance(fw, dict):
            put("versions", f"frameworks.{name}.version", _val(fw, "version") if fw.get("available") else "not available")
            for extra in ("cuda_version", "hip_version", "cudnn_version"):
                if extra in fw:
                    put("versions", f"frameworks.{name}.{extra}", _val(fw, extra))
    nvidia = env.get("nvidia") or {}
    put("versions", "nvidia.driver_version", _val(nvidia, "driver_version") if nvidia.get("available") else "no NVML")
    put("versions", "nvidia.cuda_driver_version", _val(nvidia, "cuda_driver_version"))
    for key in ("kernel_release", "distro"):
        put("versions", f"os.{key}", _val(env, "os", key))
    put("versions", "python.version", _val(env, "python", "version"))
    for pkg, version in sorted((manifest.get("versions") or {}).items()):
        put("versions", f"versions.{pkg}", version)
    classes: dict[str, int] = {}
    for dev in manifest.get("devices") or []:
        if isinstance(dev, dict):
            name = str(dev.get("name") or dev.get("id"))
            classes[name] = classes.get(name, 0) + 1
    put("devices", "devices", ", ".join(f"{n} ×{k}" for n, k in sorted(classes.items())) or None)
    put("devices", "cpu.model_name", _val(env, "cpu", "model_name"))
    for key in ("current_mhz", "max_mhz", "nominal_mhz", "governor"):
        put("clocks", f"cpu.frequency.{key}", _val(env, "cpu", "frequency", key))
    for key in ("logical_cores", "physical_cores", "usable_cores", "sockets", "numa_nodes", "numa_cpus",
                "cgroup_cpu_limit_cores"):
        put("topology", f"cpu.{key}", _val(env, "cpu", key))
    put("topology", "memory.total_bytes", _val(env, "memory", "total_bytes"))
    for gpu in nvidia.get("gpus") or []:
        if not isinstance(gpu, dict):
            continue
        i = _val(gpu, "index")
        put("devices", f"gpu{i}.name", _val(gpu, "name"))
        put("devices", f"gpu{i}.compute_capability", _val(gpu, "compute_capability"))
        for key in ("clocks_max_sm_mhz", "clocks_max_mem_mhz", "power_limit_w", "enforced_power_limit_w"):
            put("clocks", f"gpu{i}.{key}", _val(gpu, key))
        put("virtualization", f"gpu{i}.mig", _val(gpu, "mig", "current"))
        put("virtualization", f"gpu{i}.virtualization_mode", _val(gpu, "virtualization_mode"))
        for key in ("current_generation", "current_width"):
            put("topology", f"gpu{i}.pcie.{key}", _val(gpu, "pcie", key))
    links = nvidia.get("links") or {}
    for g in links.get("per_gpu") or []:
        if isinstance(g, dict):
            put("topology", f"gpu{g.get('index')}.nvlink_active_links", _val(g, "nvlink_active_links"))
    for pair in links.get("pairs") or []:
        if isinstance(pair, dict):
            i, j = (pair.get("gpus") or [None, None])[:2]
            put("topology", f"gpu{i}-gpu{j}.topology", _val(pair, "topology"))
    return facts


def environment_diff(ma: dict, mb: dict) -> dict:
    fa, fb = environment_facts(ma), environment_facts(mb)
    changed, same = [], 0
    for name in list(dict.fromkeys([*fa, *fb])):
        cat = (fa.get(name) or fb.get(name))[0]
        va, vb = (fa.get(name) or (cat, None))[1], (fb.get(name) or (cat, None))[1]
        if va == vb:
            same += 1
        else:
            changed.append({"category": cat, "fact": name, "baseline": va, "candidate": vb})
    return {"changed": changed, "identical": same}


# -- indicators ------------------------------------------------------------------------
def indicator_deltas(a: Run, b: Run) -> dict:
    missing = [f"{side} ({r.run_id})" for side, r in (("baseline", a), ("candidate", b)) if r.indicators is None]
    if missing:
        return {"measurable": False, "reason": f"not measurable: no indicators.json in {' and '.join(missing)}",
                "deltas": []}
    la, lb = indicator_leaves(a.indicators), indicator_leaves(b.indicators)
    deltas = []
    for path in dict.fromkeys([*la, *lb]):
        mode = mode_of(path)
        if mode == "mode 5":
            continue
        va = la.get(path, {}).get("value")
        vb = lb.get(path, {}).get("value")
        unit = (la.get(path) or lb.get(path) or {}).get("unit")
        delta = vb - va if va is not None and vb is not None else None
        ratio = vb / va if delta is not None and va != 0 else None
        deltas.append({"mode": mode, "indicator": path, "baseline": va, "candidate": vb, "delta": delta,
                       "ratio": ratio, "unit": unit})
    return {"measurable": True, "deltas": deltas}


# -- generation comparison -------------------------------------------------------------
def _rate(row: dict) -> tuple[float | None, str]:
    bound = row.get("bound")
    if _ok_num(row.get("busbw_Bps")):
        return float(row["busbw_Bps"]), "B/s (busbw)"
    if bound == "compute" and _ok_num(row.get("flops_per_s")):
        return float(row["flops_per_s"]), "FLOP/s"
    if bound in ("memory", "link") and _ok_num(row.get("bytes_per_s")):
        return float(row["bytes_per_s"]), "B/s"
    if _ok_num(row.get("flops_per_s")):
        return float(row["flops_per_s"]), "FLOP/s"
    if _ok_num(row.get("bytes_per_s")):
        return float(row["bytes_per_s"]), "B/s"
    return None, ""


def _ok_num(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def case_power_w(run: Run, case_id: str, device: str) -> float | None:
    """Mean power in watts during the case (telemetry metric power_w), summed over the
    GPUs of the case's device group; None without power telemetry for every member.

    cuda:N is found among the NVML sources by the ``cuda_ordinal`` rows the sampler writes
    (PCI bus id / UUID match, harness.telemetry.gpu_sources), not by NVML index: under
    CUDA_VISIBLE_DEVICES=1, cuda:0 is NVML GPU 1. A board shared by several members (MIG
    devices of one GPU) is counted once, and its power is the whole board's (NVML reads no
    per-MIG power)."""
    from harness.telemetry import case_gpu_sources

    t = run.telemetry
    if t is None or not len(t) or "metric" not in t.columns:
        return None
    power = t[(t["metric"] == "power_w") & (t["case_id"] == case_id)]
    if not len(power):
        return None
    sources = case_gpu_sources(t, device)
    if not sources:
        return None
    total = 0.0
    for src in sources:
        values = power.loc[power["source"] == src, "value"]
        if not len(values):
            return None
        total += float(values.mean())
    return total


def case_work_per_joule(row: dict) -> tuple[float | None, str, str | None]:
    """(work per joule, unit, why none) of one case row of cases.parquet.

    ``energy_j`` is joules per timed repetition summed over the case's devices. Serving
    composites: tokens/J = output tokens per repetition (harness.collector.serving.
    tokens_per_rep) / energy_j. Other cases by their bound like :func:`_rate`: FLOP/J
    (``flops_per_j``, else flops / energy_j) for compute-bound cases, B/J (``bytes_per_j``,
    else bytes / energy_j) for memory- or link-bound ones, else whichever exists. The
    reason is the case's ``energy_reason``, or that the run predates the energy columns."""
    from harness.collector.serving import REQUESTS, TP_STEP, tokens_per_rep
    from harness.results import json_object

    energy = row.get("energy_j")
    if not _ok_num(energy) or float(energy) <= 0:
        if "energy_j" not in row:
            return None, "", "the run predates energy accounting"
        return None, "", str(row.get("energy_reason") or "energy_j is null and no reason was recorded")
    energy = float(energy)
    probe = str(row.get("probe") or "")
    if probe in (TP_STEP, *REQUESTS):
        params = {**json_object(row.get("params")), **json_object(row.get("resolved_params"))}
        return tokens_per_rep(probe, params, json_object(row.get("extra"))) / energy, "tokens/J", None

    def per_j(column: str, work: str) -> float | None:
        if _ok_num(row.get(column)):
            return float(row[column])
        return float(row[work]) / energy if _ok_num(row.get(work)) and float(row[work]) > 0 else None

    flops, nbytes = per_j("flops_per_j", "flops"), per_j("bytes_per_j", "bytes")
    bound = row.get("bound")
    if bound == "compute" and flops:
        return flops, "FLOP/J", None
    if bound in ("memory", "link") and nbytes:
        return nbytes, "B/J", None
    if flops:
        return flops, "FLOP/J", None
    if nbytes:
        return nbytes, "B/J", None
    return None, "", "the case has no FLOPs or bytes in its work model"


def _geomean(values: list[float]) -> float | None:
    vals = [v for v in values if _ok_num(v) and v > 0]
    return float(np.exp(np.mean(np.log(vals)))) if vals else None


def energy_summary(cases: list[dict]) -> dict:
    """Performance per joule over a generation view's cases with energy on both sides:
    their count, the geometric mean of the work-per-joule ratio B/A (FLOP/J, B/J or
    tokens/J: the same work on both sides, so each ratio is energy_A / energy_B) and of
    the p50 time ratio B/A of the same cases, and how many cases lack energy on a side."""
    both = [c for c in cases if c.get("per_j_ratio") is not None]
    return {"cases": len(both), "without_energy": len(cases) - len(both),
            "per_j_geomean_ratio": _geomean([c["per_j_ratio"] for c in both]),
            "time_geomean_ratio": _geomean([c["time_ratio"] for c in both if c.get("time_ratio") is not None]),
            "units": sorted({c["per_j_unit"] for c in both})}


def generation_view(a: Run, b: Run, ids: list[str], rows_a: dict, rows_b: dict,
                    time_ratios: dict[str, float] | None = None) -> dict | None:
    """The generation comparison (device classes differ between the runs): per case the
    rate, roofline fraction and perf/W (mean telemetry power) of each side and, where both
    sides measured energy, the work per joule (:func:`case_work_per_joule`) of each, its
    ratio B/A next to the p50 time ratio B/A (``time_ratios``, case id -> ratio). Energy
    is shown, not judged: the verdicts stay those of the time statistics. ``energy``
    summarizes (:func:`energy_summary`). None when the device classes are the same."""
    ca, cb = sorted(set(a.device_classes().values())), sorted(set(b.device_classes().values()))
    if ca == cb:
        return None
    time_ratios = time_ratios or {}
    cases = []
    for cid in ids:
        ra, rb = rows_a[cid], rows_b[cid]
        rate_a, unit = _rate(ra)
        rate_b, unit_b = _rate(rb)
        entry = {
            "case_id": cid, "bound_a": ra.get("bound"), "bound_b": rb.get("bound"),
            "class_a": a.class_of(str(ra.get("device") or "")), "class_b": b.class_of(str(rb.get("device") or "")),
            "rate_unit": unit or unit_b, "rate_a": rate_a, "rate_b": rate_b,
            "roofline_a": float(ra["roofline_fraction"]) if _ok_num(ra.get("roofline_fraction")) else None,
            "roofline_b": float(rb["roofline_fraction"]) if _ok_num(rb.get("roofline_fraction")) else None,
        }
        notes = []
        for side, run, row, rate in (("a", a, ra, rate_a), ("b", b, rb, rate_b)):
            power = case_power_w(run, cid, str(row.get("device") or ""))
            entry[f"power_w_{side}"] = power
            entry[f"perf_per_w_{side}"] = rate / power if power and rate else None
            who = 'baseline' if side == 'a' else 'candidate'
            if power is None:
                notes.append(f"{who}: no power telemetry")
            elif run.telemetry is not None and "cuda_ordinal" not in set(run.telemetry["metric"]):
                # Old runs carry NVML's index only: right unless CUDA_VISIBLE_DEVICES reordered GPUs.
                notes.append(f"{who}: power by NVML index (run predates the PCI bus id mapping)")
        entry["power_note"] = "; ".join(notes)
        entry.update(_energy_entry(ra, rb, time_ratios.get(cid)))
        cases.append(entry)
    return {"classes_baseline": ca, "classes_candidate": cb, "cases": cases, "energy": energy_summary(cases)}


def _energy_entry(ra: dict, rb: dict, time_ratio: float | None) -> dict:
    """One case's work per joule on each side (:func:`case_work_per_joule`), its ratio
    B/A where both sides have it in the same unit, the p50 ``time_ratio`` beside it, and
    ``energy_note``: why a side has none ("baseline: <reason>; candidate: <reason>")."""
    (per_a, unit_a, why_a), (per_b, unit_b, why_b) = case_work_per_joule(ra), case_work_per_joule(rb)
    same_unit = per_a is not None and per_b is not None and unit_a == unit_b
    missing = [f"{who}: {why}" for who, why in (("baseline", why_a), ("candidate", why_b)) if why]
    if per_a is not None and per_b is not None and not same_unit:
        missing.append(f"work per joule in {unit_a} against {unit_b}")
    return dict(per_j_unit=unit_a or unit_b or None, per_j_a=per_a, per_j_b=per_b,
                energy_j_a=float(ra["energy_j"]) if per_a is not None else None,
                energy_j_b=float(rb["energy_j"]) if per_b is not None else None,
                energy_method_a=ra.get("energy_method"), energy_method_b=rb.get("energy_method"),
                per_j_ratio=per_b / per_a if same_unit else None, time_ratio=time_ratio,
                energy_note="; ".join(missing))


def energy_reasons(cases: list[dict], limit: int = 2) -> str:
    """Why cases have no work-per-joule ratio, most common first: "<energy_note> (n
    cases); ..." for up to ``limit`` distinct notes, then how many others; '' where
    every case has its ratio."""
    from collections import Counter

    counts = Counter(c.get("energy_note") or "not measured" for c in cases if c.get("per_j_ratio") is None)
    parts = [f"{note} ({n} case{'s' if n > 1 else ''})" for note, n in counts.most_common(limit)]
    if len(counts) > limit:
        parts.append(f"{len(counts) - limit} other reasons (--all)")
    return "; ".join(parts)


def same_class_energy(a: Run, b: Run, ids: list[str], rows_a: dict, rows_b: dict,
                      time_ratios: dict[str, float] | None = None) -> dict | None:
    """Energy of a comparison between runs of the same device classes (a generation
    comparison has its own, :func:`generation_view`): :func:`energy_summary` of the
    compared cases' work per joule B/A, the reasons cases lack it (:func:`energy_reasons`)
    and ``why``, the one line the outputs print (the comparison renderers print a
    top-level entry's ``why``). Shown, not judged. None when the device classes differ."""
    if sorted(set(a.device_classes().values())) != sorted(set(b.device_classes().values())):
        return None
    time_ratios = time_ratios or {}
    cases = [_energy_entry(rows_a[cid], rows_b[cid], time_ratios.get(cid)) for cid in ids]
    summary = {**energy_summary(cases), "reasons": energy_reasons(cases)}
    if summary["cases"]:
        time = (f", p50 time ratio {summary['time_geomean_ratio']:.2f}x"
                if _ok_num(summary.get("time_geomean_ratio")) else "")
        why = (f"work per joule B/A {summary['per_j_geomean_ratio']:.2f}x ({', '.join(summary['units'])}) over "
               f"{summary['cases']} cases with energy on both sides{time} (shown, not judged)"
               + (f"; {summary['without_energy']} without: {summary['reasons']}" if summary["without_energy"] else ""))
    elif cases:
        why = f"work per joule not compared: {summary['reasons']}"
    else:
        why = "work per joule not compared: no case compared"
    return {**summary, "why": why}


# -- the comparison --------------------------------------------------------------------
def _run_info(run: Run) -> dict:
    m = run.manifest
    return {"run_id": run.run_id, "path": str(run.path), "label": run.label, "host": run.host,
            "started_at": m.get("started_at"), "status": m.get("status"),
            "schema_version": m.get("schema_version"), "loaded_from_schema": run.loaded_from_version,
            "device_classes": sorted(set(run.device_classes().values())),
            "indicators": run.indicators is not None}


def _records(cases: pd.DataFrame) -> dict[str, dict]:
    out = {}
    for row in cases.to_dict(orient="records"):
        out[str(row["case_id"])] = {k: (None if (not isinstance(v, (str, list, dict)) and v is not None and pd.isna(v))
                                        else v) for k, v in row.items()}
    return out


def _family(row: dict, case_id: str) -> str:
    fam = row.get("family")
    return fam if isinstance(fam, str) and fam else re.split(r"[.\[@]", case_id, maxsplit=1)[0]


def case_units(samples: pd.DataFrame, case_id: str) -> list[np.ndarray]:
    """The case's finite repetition durations split by the samples' ``round`` column
    (one array per round, in round order; multi-rank cases: the slowest rank per
    repetition within the round). Runs made before rounds have no ``round`` column (or
    only nulls): the whole run is one unit. Rounds without a finite duration are left
    out."""
    s = samples[samples["case_id"] == case_id]
    if "round" not in s.columns or not s["round"].notna().any():
        d = rep_durations(samples, case_id).to_numpy()
        d = d[np.isfinite(d)]
        return [d] if d.size else []
    out = []
    for _, grp in s[s["round"].notna()].groupby("round", sort=True):
        d = rep_durations(grp, case_id).to_numpy()
        d = d[np.isfinite(d)]
        if d.size:
            out.append(d)
    return out


def _share(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if _ok_num(r.get(key))]
    return float(np.mean(values)) if values else None


def case_load(rows_a: list[dict], row_b: dict, cfg_load: dict) -> dict:
    """Foreign load of one case on each side, from the cases.parquet columns
    ``foreign_cpu_share`` (CPU time of processes outside the run's process tree, as a
    share of the machine's CPU capacity while the case ran) and ``steal_share`` (CPU
    time the hypervisor gave to others); baseline repeats are averaged. ``share`` = the
    sum of both (capacity the case could not have). Loads *differed* when the shares
    are known on both sides and |share_b − share_a| ≥ ``differ`` (config
    ``compare.load.differ``, a share of the machine); ``loaded_side`` names the side with
    the larger share then ("candidate" or "baseline"), else None. Runs made before these
    columns: shares None, never differed."""
    out = {}
    for side, rows in (("a", rows_a), ("b", [row_b])):
        f, st = _share(rows, "foreign_cpu_share"), _share(rows, "steal_share")
        out[f"foreign_cpu_{side}"], out[f"steal_{side}"] = f, st
        out[f"share_{side}"] = None if f is None and st is None else (f or 0.0) + (st or 0.0)
    sa, sb = out["share_a"], out["share_b"]
    differed = sa is not None and sb is not None and abs(sb - sa) >= float(cfg_load["differ"])
    out["differed"] = bool(differed)
    out["loaded_side"] = ("candidate" if sb > sa else "baseline") if differed else None
    return out


# -- whole-run shift -----------------------------------------------------------------
def shift_group(row_a: dict, family: str) -> str:
    """The group a case's whole-run shift is estimated in: its bound class from the
    baseline's cases.parquet (``compute-bound``, ``memory-bound``, ...; a machine state
    such as a busy SMT sibling or a memory-bandwidth neighbour moves one class, not
    every case alike), else its probe family."""
    bound = row_a.get("bound")
    return f"{bound}-bound" if isinstance(bound, str) and bound else family


def _run_level_sd(logs_by_unit: list[dict[str, float]]) -> float | None:
    """sd (ddof 1) over units (baseline runs, or rounds) of each unit's common-mode
    deviation: the median over cases of (the unit's log p50 − the mean over units of the
    case's log p50). Only cases present in every unit count. None with < 2 units or no
    common case."""
    if len(logs_by_unit) < 2:
        return None
    common = set.intersection(*(set(u) for u in logs_by_unit))
    if not common:
        return None
    mean = {cid: float(np.mean([u[cid] for u in logs_by_unit])) for cid in common}
    dev = [float(np.median([u[cid] - mean[cid] for cid in common])) for u in logs_by_unit]
    return float(np.std(dev, ddof=1))


def run_shifts(compared: list[dict], baseline_rows: list[dict[str, dict]], cfg: dict) -> list[dict]:
    """The whole-run shift per group of cases (issue 18): one machine state that lasted a
    whole run (a neighbour on the hypervisor's SMT sibling, a turbo or memory-bandwidth
    state) moves every case of a bound class by about the same factor, and the rounds
    inside one run cannot see it. Per group (:func:`shift_group`) with at least
    ``run_shift.min_cases`` compared cases:

    - ``shift_ratio`` = exp(median over the group's cases of log(p50 ratio B/A));
      ``agree`` = the share of those cases on the shift's side of 1;
    - the run-level floor f (relative): with k ≥ 3 baseline runs, ``coverage`` × the sd
      over the runs of their common-mode deviation (:func:`_run_level_sd`) × sqrt(1 + 1/k)
      (measured: what the machine moves from one run to the next); with fewer, the
      configured ``run_shift.floor`` (0.15: above the largest A/A whole-run group
      shift measured by tests/benchmarks/bench_compare_noise.py on a 2-vCPU VM, 10.5 %
      under one busy loop, 4.3 % quiet; asv's ``continuous --factor`` reports nothing
      under 10 % at all; Laaber, Scheuner & Leitner, "Software microbenchmarking in the
      cloud. How bad is it really?", EMSE 2019, find same-instance-type variability
      beyond 10 % common) — one or two runs cannot measure it.
      Never below the spread of the baseline rounds' common-mode deviation (coverage ×
      sd × sqrt(2/K), K rounds) nor ``noise_floor.min``.
    - ``removed`` when |log shift| ≤ log(1 + f), at least ``agree`` of the cases moved
      together, and the foreign load differed in fewer than half of them (a loaded side
      is attributed to load instead, :func:`load_label`). Each case of a removed group
      is then also judged with the candidate divided by the shift; a verdict the two
      judgements do not share is held (``held_by_run_shift``): a case is only called
      when it moved beyond its noise both with and without the machine's shift. A
      shift beyond the floor stands: the cases keep their verdicts.

    Returns one dict per group: group, cases, shift_ratio, agree, floor, floor_source,
    removed, why (one line)."""
    c = cfg["compare"]
    rs, nf = c["run_shift"], c["noise_floor"]
    coverage, k = float(nf["coverage"]), len(baseline_rows)
    if float(rs["floor"]) == 0:
        return []  # turned off (configs/compare.yaml)
    groups: dict[str, list[dict]] = {}
    for row in compared:
        r = row.get("p50_ratio")
        if r is not None and math.isfinite(r) and r > 0:
            groups.setdefault(row["shift_group"], []).append(row)
    out = []
    for name, rows in groups.items():
        if len(rows) < int(rs["min_cases"]):
            continue
        ids = {row["case_id"] for row in rows}
        logs = np.log([row["p50_ratio"] for row in rows])
        shift = float(np.median(logs))
        agree = float(np.mean(np.sign(logs) == np.sign(shift))) if shift != 0 else 1.0
        if k >= 3:
            per_run = [{cid: math.log(rec[cid]["p50_s"]) for cid in ids
                        if cid in rec and _ok_num(rec[cid].get("p50_s")) and rec[cid]["p50_s"] > 0}
                       for rec in baseline_rows]
            sd = _run_level_sd(per_run)
            floor_log = coverage * (sd or 0.0) * math.sqrt(1 + 1 / k)
            source = f"baseline repeats (k={k}): their whole-run spread"
        else:
            floor_log = math.log1p(float(rs["floor"]))
            source = (f"config run_shift.floor ({'one baseline run' if k == 1 else 'two baseline runs'}: "
                      "the machine's state between runs is not measured; give 3 or more to measure it)")
        per_round: list[dict[str, float]] = []
        for rec in baseline_rows[:1]:
            rounds = {cid: _round_p50(rec[cid]) for cid in ids if cid in rec}
            for i in range(min((len(v) for v in rounds.values()), default=0)):
                per_round.append({cid: math.log(v[i]) for cid, v in rounds.items() if v[i] > 0})
        sd_r = _run_level_sd(per_round)
        if sd_r is not None and coverage * sd_r * math.sqrt(2 / len(per_round)) > floor_log:
            floor_log = coverage * sd_r * math.sqrt(2 / len(per_round))
            source = f"between rounds of the baseline ({len(per_round)} rounds): their common-mode spread"
        floor_log = max(floor_log, math.log1p(float(nf["min"])))
        loaded = sum(1 for row in rows if (row.get("load") or {}).get("differed"))
        within = abs(shift) <= floor_log
        removed = within and agree >= float(rs["agree"]) and loaded * 2 < len(rows)
        direction = "slower" if shift > 0 else "faster"
        head = (f"{name} cases ({len(rows)}) ran {abs(math.expm1(shift)):.1%} {direction} as a group "
                f"({agree:.0%} of them on that side)")
        if removed:
            why = (f"{head}: within the whole-run floor ±{math.expm1(floor_log):.1%} ({source}), so each is "
                   "judged with and without that shift and only called when both agree")
        elif not within:
            why = f"{head}: beyond the whole-run floor ±{math.expm1(floor_log):.1%} ({source}); verdicts stand"
        elif loaded * 2 >= len(rows):
            why = f"{head}: foreign load differed in {loaded} of them; attributed to load, verdicts stand"
        else:
            why = f"{head}: the cases did not move together (< {float(rs['agree']):.0%}); verdicts stand"
        out.append({"group": name, "cases": len(rows), "shift_ratio": math.exp(shift), "agree": agree,
                    "floor": math.expm1(floor_log), "floor_source": source, "removed": bool(removed),
                    "loaded_cases": loaded, "why": why})
    return out


def _round_p50(row: dict) -> list[float]:
    """The case's per-round p50 (cases.parquet ``round_p50_s``: a JSON list, or a list)
    as floats; [] when absent or unreadable."""
    v = row.get("round_p50_s")
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return []
    try:
        return [float(x) for x in v] if v is not None else []
    except (TypeError, ValueError):
        return []


def sla_floor(floor: dict) -> float:
    """The floor the SLA threshold moves by: with rounds the between-round spread of
    p99 (the threshold is a p99), otherwise the p50 floor, as before rounds existed."""
    return floor["p99"] if floor["kind"] == "rounds" else floor["p50"]


def holm_correct(rows: list[dict]) -> None:
    """Holm-correct, in place across ``rows``, the MWU p-values (``mwu_p_holm``), the SLA
    Fisher p-values (``sla.fisher_p_holm``) and those beyond the floor in each direction
    (``sla.beyond_floor.{up,down}.fisher_p_holm``)."""
    for row, adj in zip(rows, holm([r["mwu_p"] for r in rows])):
        row["mwu_p_holm"] = adj
    for row, adj in zip(rows, holm([r["sla"]["fisher_p"] for r in rows])):
        row["sla"]["fisher_p_holm"] = adj
    for key in ("up", "down"):
        for row, adj in zip(rows, holm([r["sla"]["beyond_floor"][key]["fisher_p"] for r in rows])):
            row["sla"]["beyond_floor"][key]["fisher_p_holm"] = adj


def shifted_row(row: dict, a: np.ndarray, b: np.ndarray, shift: float, cfg: dict) -> dict:
    """The case's statistics with the candidate divided by ``shift`` (a whole-run shift
    ratio, :func:`run_shifts`): p50/p99 ratios and CIs divided by it, MWU p and the SLA
    counts recomputed on b / shift (beyond_floor included). Holm is applied by the
    caller. a, b: the pooled repetition durations in seconds."""
    out = {key: value for key, value in row.items() if key not in ("sla", "p50_ci", "p99_ci")}
    for q in ("p50", "p99"):
        if row.get(f"{q}_ratio") is not None:
            out[f"{q}_ratio"] = row[f"{q}_ratio"] / shift
        out[f"{q}_ci"] = [None if v is None else v / shift for v in (row.get(f"{q}_ci") or [None, None])]
    bs = b / shift
    out["mwu_p"] = mwu_p(a, bs)
    out["sla"] = sla_stats(row["case_id"], a, bs, cfg)
    out["sla"]["beyond_floor"] = sla_beyond_floor(a, bs, out["sla"], sla_floor(row["noise_floor"]))
    return out


def preempted_text(quantized: dict) -> str:
    """One line for harness.stats.scheduler_quantized's finding."""
    return (f"{quantized['share']:.0%} of repetitions at multiples "
            f"({', '.join(str(k) for k in quantized['multiples'])}) of a {quantized['tick_s'] * 1e3:.3g} ms "
            "scheduler tick: preempted in every repetition, it timed the scheduler, not the probe")


def load_label(verdict_text: str, load: dict | None) -> str:
    """``regressed (load)`` when the candidate regressed while it carried the larger
    foreign load, ``improved (load)`` when it improved while the baseline did (a busy
    neighbour of the baseline is no improvement of the candidate); otherwise the
    verdict as it is (a regression despite a busier baseline stands unqualified)."""
    side = (load or {}).get("loaded_side")
    if verdict_text == "regressed" and side == "candidate":
        return "regressed (load)"
    if verdict_text == "improved" and side == "baseline":
        return "improved (load)"
    return verdict_text


def sla_beyond_floor(a: np.ndarray, b: np.ndarray, sla: dict, floor: float) -> dict:
    """The SLA amplification with the noise floor allowed for: the candidate's violations
    of the threshold raised (``up``) or lowered (``down``) by the p50 noise floor, over
    the baseline's violations of the threshold itself. A candidate merely shifted within
    the floor keeps ``up`` near 1; a heavier tail still multiplies it."""
    out = {}
    ka = sla["violations_a"]
    for key, tau in (("up", sla["threshold_s"] * (1 + floor)), ("down", sla["threshold_s"] / (1 + floor))):
        kb = int((b > tau).sum())
        amp, note, p = _amplification(ka, a.size, kb, b.size)
        out[key] = {"threshold_s": tau, "violations_b": kb, "amplification": amp, "note": note, "fisher_p": p}
    return out


def compare_runs(a: Run | list[Run], b: Run, gates: dict[str, float], cfg: dict) -> dict:
    """The whole mode 5 comparison of B (candidate) against A (baseline: one run, or
    several repeats of it) as a document."""
    c = cfg["compare"]
    alpha = c["alpha"]
    baselines = list(a) if isinstance(a, (list, tuple)) else [a]
    if not baselines:
        raise UserError("no baseline run given")
    first = baselines[0]
    records = [_records(r.cases) for r in baselines]
    rows_b = _records(b.cases)
    ids_a = list(dict.fromkeys(cid for rec in records for cid in rec))
    ids_b = list(rows_b)
    common = [i for i in ids_a if i in rows_b]
    if not common:
        names = "+".join(r.run_id for r in baselines)
        raise UserError(f"runs {names} and {b.run_id} have no case in common "
                        f"({len(ids_a)} and {len(ids_b)} cases); nothing to compare")
    rows_a = {cid: next(rec[cid] for rec in records if cid in rec) for cid in ids_a}
    compared, not_compared, samples, noises = [], [], {}, []
    for cid in common:
        ok_a = [(run, rec[cid]) for run, rec in zip(baselines, records)
                if cid in rec and rec[cid].get("status") == "ok"]
        sb = rows_b[cid].get("status")
        sa = "ok" if ok_a else rows_a[cid].get("status")
        if ok_a:
            rows_a[cid] = ok_a[0][1]
        if not ok_a or sb != "ok":
            reason = "; ".join(f"{side}: {st} {(r.get('reason') or '')[:120]}".strip()
                               for side, st, r in (("baseline", sa, rows_a[cid]), ("candidate", sb, rows_b[cid]))
                               if st != "ok")
            not_compared.append({"case_id": cid, "status_a": sa, "status_b": sb, "reason": reason, "kind": "status"})
            continue
        series, units_a = [], []
        for run, _ in ok_a:
            d = rep_series(run.samples, cid)["duration_s"].to_numpy()
            d = d[np.isfinite(d)]
            if d.size:
                series.append(d)
                units_a.extend(case_units(run.samples, cid))
        units_b = case_units(b.samples, cid)
        db = np.concatenate(units_b) if units_b else np.array([])
        if not series or not db.size:
            side = "baseline" if not series else "candidate"
            not_compared.append({"case_id": cid, "status_a": sa, "status_b": sb, "kind": "no samples",
                                 "reason": f"{side}: no samples in samples.parquet"})
            continue
        da = np.concatenate(series)
        # A baseline preempted in every repetition timed the scheduler, not the probe: no
        # verdict can be drawn against it (the candidate neither improved nor regressed it).
        if quantized := scheduler_quantized(da):
            not_compared.append({"case_id": cid, "status_a": sa, "status_b": sb, "kind": "baseline preempted",
                                 "reason": "baseline: " + preempted_text(quantized)})
            continue
        row = compare_case(cid, da, db, cfg, units=(units_a, units_b))
        row["family"] = _family(rows_a[cid], cid)
        row["shift_group"] = shift_group(rows_a[cid], row["family"])
        row["baseline_runs"] = len(series)
        row["units_a"], row["units_b"] = len(units_a), len(units_b)
        row["load"] = case_load([rec for _, rec in ok_a], rows_b[cid], c["load"])
        if quantized := scheduler_quantized(db):
            # The candidate was: a finding about the target (its verdict stands), attributed
            # to load like a busy neighbour, with the evidence.
            row["load"].update(differed=True, loaded_side="candidate",
                               preempted="candidate: " + preempted_text(quantized))
        compared.append(row)
        samples[cid] = (da, db)
        if "between_units" in row:
            bu = row["between_units"]
            # The floor is what the baseline moves on its own: its unit-level spread, as
            # the se of a difference between K_a and K_b such units. (The candidate's own
            # spread is in the CI; a candidate made noisy by its change or its load must
            # not raise the bar it is judged by.)
            factor = math.sqrt(1 / len(units_a) + 1 / len(units_b))
            noises.append({"kind": "rounds", "k": len(units_a) + len(units_b), "k_a": len(units_a),
                           "k_b": len(units_b), "blocks": None, "s": bu["p50"]["s_unit_a"] * factor,
                           "s99": bu["p99"]["s_unit_a"] * factor, "factor": 1.0})
        else:
            noises.append(case_noise(series, c["noise_floor"]))
    for row, floor in zip(compared, noise_floors(compared, noises, c["noise_floor"])):
        row["noise_floor"] = floor
        da, db = samples[row["case_id"]]
        row["sla"]["beyond_floor"] = sla_beyond_floor(da, db, row["sla"], sla_floor(floor))
    holm_correct(compared)
    shifts = run_shifts(compared, records, cfg)
    removed = {sh["group"]: sh["shift_ratio"] for sh in shifts if sh["removed"]}
    # The same judgement with the candidate divided by its group's whole-run shift; Holm
    # again over that family of tests (raw rows where no shift was removed: a copy whose
    # Holm fields may change). Only needed when some group's shift was removed.
    shifted = [shifted_row(row, *samples[row["case_id"]], removed[row["shift_group"]], cfg)
               if row["shift_group"] in removed else {**row, "sla": copy.deepcopy(row["sla"])}
               for row in compared] if removed else compared
    if removed:
        holm_correct(shifted)
    gate_globs = c["gate_cases"]
    for row, adj in zip(compared, shifted):
        row["gated"] = any(fnmatch.fnmatchcase(row["case_id"], g) for g in gate_globs)
        row["verdict"], row["reasons"] = verdict(row, gates, alpha)
        row["verdict_without_floor"], without = verdict(row, gates, alpha, use_floor=False)
        row["within_noise_floor"] = row["verdict_without_floor"] != row["verdict"]
        row["held_by_floor"] = without if row["within_noise_floor"] else []
        row["held_by_run_shift"] = []
        if row["shift_group"] in removed:
            v_adj, r_adj = verdict(adj, gates, alpha)
            row["run_shift"] = {"group": row["shift_group"], "shift_ratio": removed[row["shift_group"]],
                                "verdict": v_adj, "reasons": r_adj}
            if v_adj != row["verdict"]:
                # Called only when it moved beyond its noise with and without the
                # machine's whole-run shift; otherwise the shift may explain it.
                row["held_by_run_shift"] = row["reasons"] or r_adj
                row["verdict"], row["reasons"] = "unchanged", []
        row["verdict_label"] = load_label(row["verdict"], row.get("load"))
        row["status_a"] = row["status_b"] = "ok"
    counts = {v: sum(1 for r in compared if r["verdict"] == v) for v in ("regressed", "improved", "unchanged")}
    gated_regressed = [r["case_id"] for r in compared if r["gated"] and r["verdict"] == "regressed"]
    only_a = [i for i in ids_a if i not in rows_b]
    only_b = [i for i in ids_b if i not in rows_a]
    kinds = sorted({r["noise_floor"]["source"] for r in compared})
    floor_kinds = sorted({r["noise_floor"]["kind"] for r in compared})
    doc = {
        "baseline": _run_info(first),
        "baselines": [_run_info(r) for r in baselines],
        "candidate": _run_info(b),
        "gate": gates,
        "gate_text": gate_text(gates),
        "alpha": alpha,
        "confidence": c["confidence"],
        "bootstrap": dict(c["bootstrap"]),
        "noise_floor": {**dict(c["noise_floor"]), "baseline_runs": len(baselines), "sources": kinds,
                        "kinds": floor_kinds},
        "cases": compared,
        "only_in_baseline": only_a,
        "only_in_candidate": only_b,
        "not_compared": not_compared,
        "run_shift": shifts,
        "indicators": indicator_deltas(first, b),
        "environment": environment_diff(first.manifest, b.manifest),
        "generation": generation_view(first, b, [r["case_id"] for r in compared], rows_a, rows_b,
                                      {r["case_id"]: r["p50_ratio"] for r in compared}),
        # Not in KNOWN_DOC_KEYS on purpose: the terminal and markdown outputs print an
        # unknown entry's ``why`` under "whole run" (_extra_lines), where this line
        # belongs; the HTML report prints it beside the verdict.
        "energy": same_class_energy(first, b, [r["case_id"] for r in compared], rows_a, rows_b,
                                    {r["case_id"]: r["p50_ratio"] for r in compared}),
        "summary": {
            "compared": len(compared), **counts,
            "gated_regressed": len(gated_regressed),
            "within_noise_floor": sum(1 for r in compared if r["within_noise_floor"]),
            "held_by_run_shift": sum(1 for r in compared if r["held_by_run_shift"]),
            "regressed_without_floor": sum(1 for r in compared if r["verdict_without_floor"] == "regressed"),
            "only_in_baseline": len(only_a),
            "only_in_candidate": len(only_b),
            "not_compared": len(not_compared),
            "load": load_summary(compared, c["load"]),
        },
        "exit_code": 1 if gated_regressed else 0,
    }
    return doc


def load_summary(compared: list[dict], cfg_load: dict) -> dict:
    """Per side the median over compared cases of the foreign CPU share and steal share
    (None when no case carries the columns: runs made before them), and the counts of
    cases whose loads differed and of verdicts attributed to load."""
    out: dict = {"differ": float(cfg_load["differ"])}
    for key in ("foreign_cpu_a", "foreign_cpu_b", "steal_a", "steal_b", "share_a", "share_b"):
        values = [r["load"][key] for r in compared if (r.get("load") or {}).get(key) is not None]
        out[key] = float(np.median(values)) if values else None
    out["cases_differed"] = sum(1 for r in compared if (r.get("load") or {}).get("differed"))
    out["loaded_candidate"] = sum(1 for r in compared if (r.get("load") or {}).get("loaded_side") == "candidate")
    out["loaded_baseline"] = sum(1 for r in compared if (r.get("load") or {}).get("loaded_side") == "baseline")
    out["regressed_load"] = sum(1 for r in compared if r.get("verdict_label") == "regressed (load)")
    out["improved_load"] = sum(1 for r in compared if r.get("verdict_label") == "improved (load)")
    return out


def load_line(doc: dict) -> str | None:
    """"candidate ran with 45 % foreign CPU against 2 % (steal 0 % against 0 %); ...", or
    None when neither run recorded foreign load."""
    ld = doc["summary"].get("load") or {}
    if ld.get("foreign_cpu_a") is None and ld.get("foreign_cpu_b") is None:
        return None
    pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
    text = (f"candidate ran with {pct(ld['foreign_cpu_b'])} foreign CPU against {pct(ld['foreign_cpu_a'])} "
            f"(median over cases; steal {pct(ld['steal_b'])} against {pct(ld['steal_a'])})")
    if ld["cases_differed"]:
        text += (f"; load differed (≥ {ld['differ']:.0%} of the machine) in {ld['cases_differed']} cases "
                 f"({ld['loaded_candidate']} with the candidate loaded, {ld['loaded_baseline']} the baseline): "
                 f"{ld['regressed_load']} regressed (load), {ld['improved_load']} improved (load)")
    return text


# -- rendering -------------------------------------------------------------------------
def _s(value) -> str:
    from harness.show import seconds

    return seconds(value)


def _ratio_ci(ratio, ci) -> str:
    if ratio is None:
        return "—"
    if not ci or ci[0] is None:
        return _pct(ratio)
    return f"{_pct(ratio)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def _sla_text(sla: dict) -> str:
    va, vb = sla.get("v_a"), sla.get("v_b")
    rates = f"{va:.1%}→{vb:.1%}" if va is not None and vb is not None else "—"
    amp = sla.get("amplification")
    if amp is None:
        return f"{rates} ({sla.get('note') or '—'})"
    if math.isinf(amp):
        return f"{rates} ×inf (new violations)"
    return f"{rates} ×{amp:.3g}"


def _p(p) -> str:
    return "—" if p is None else f"{p:.2g}"


def summary_line(doc: dict) -> str:
    s = doc["summary"]
    return (f"{s['compared']} compared: {s['regressed']} regressed, {s['improved']} improved, "
            f"{s['unchanged']} unchanged; {s['within_noise_floor']} significant beyond the gate but within the "
            f"noise floor (not called); {s['only_in_baseline']} only in baseline, "
            f"{s['only_in_candidate']} only in candidate, {s['not_compared']} not compared")


def floor_line(doc: dict) -> str:
    nf = doc["noise_floor"]
    k = nf["baseline_runs"]
    if "rounds" in (nf.get("kinds") or []):
        other = [kd for kd in nf["kinds"] if kd != "rounds"]
        return (f"noise from the spread between rounds ({k} baseline run{'s' if k > 1 else ''}; rounds and separate "
                "runs are the top-level units): nested bootstrap (units, then samples within them), p50/p99 ratio = "
                "ratio of the geometric means of the per-unit p50/p99, CI = log ratio ± t(Welch df)·se; noise floor "
                f"per case = max({nf['min']:.0%} (config), {nf['coverage']:g} × the baseline's between-unit sd of log p50 × "
                "sqrt(1/K_a + 1/K_b)"
                f"{', raised to its family median' if nf['pool'] == 'family' else ''}); the p99 floor from the "
                "between-unit spread of p99" + (f"; cases without rounds on both sides: {', '.join(other)} floor"
                                                  if other else ""))
    where = (f"{k} baseline runs: spread of their per-run p50 (p99)" if k >= 2
             else f"1 baseline run: spread of its {nf['blocks']} consecutive block medians — this covers drift "
                  "within the run, not run-to-run variation; give 3 or more baseline repeats where runs vary "
                  "(a shared 2-core VM: 4 false alarms of 116 with one baseline, 0 with three)")
    return (f"noise floor per case = max({nf['min']:.0%} (config), {nf['coverage']:g} × "
            f"{'sqrt(1+1/k)' if k >= 2 else 'sqrt(2)'} × sd of log p50 from {where}"
            f"{', raised to its family median' if nf['pool'] == 'family' else ''})")


def _floor_text(row: dict) -> str:
    nf = row.get("noise_floor")
    if not nf:
        return "—"
    p99 = f", p99 ±{nf['p99']:.1%}" if nf["p99"] > nf["p50"] + 1e-12 else ""
    return f"±{nf['p50']:.1%}{p99} ({nf['source']})"


VERDICT_STYLE = {"regressed": "bold red", "improved": "green", "unchanged": "dim"}
CASE_HEADERS = ["case", "n A/B", "p50 A→B", "p50 Δ [95% CI]", "MWU p (Holm)", "KS", "p99 Δ [95% CI]",
                "SLA v_A→v_B, amplification", "noise floor (source)", "foreign CPU A→B", "verdict"]


def _case_cells(row: dict) -> list[str]:
    verdict_text = row.get("verdict_label", row["verdict"]) + ("" if row["gated"] else " (not gated)")
    if row.get("within_noise_floor"):
        verdict_text += f" (within noise floor; else {row['verdict_without_floor']})"
    return [
        row["case_id"], f"{row['n_a']}/{row['n_b']}", f"{_s(row['p50_a'])}→{_s(row['p50_b'])}",
        _ratio_ci(row["p50_ratio"], row["p50_ci"]), _p(row["mwu_p_holm"]), f"{row['ks']:.2f}",
        _ratio_ci(row["p99_ratio"], row["p99_ci"]), _sla_text(row["sla"]), _floor_text(row), _load_text(row),
        verdict_text,
    ]


def _load_reason(row: dict) -> list[str]:
    ld = row.get("load") or {}
    if not ld.get("differed"):
        return []
    out = [ld["preempted"]] if ld.get("preempted") else []
    a, b = ld.get("share_a"), ld.get("share_b")
    if a is None or b is None:
        return out  # preempted, in runs that did not record foreign load
    other = "baseline" if ld["loaded_side"] == "candidate" else "candidate"
    mine, theirs = (b, a) if ld["loaded_side"] == "candidate" else (a, b)
    return out + [f"the {ld['loaded_side']} ran with {mine:.0%} of the machine taken by foreign load (CPU + steal) "
                  f"against {theirs:.0%} for the {other}"]


def _load_text(row: dict) -> str:
    ld = row.get("load") or {}
    if ld.get("share_a") is None and ld.get("share_b") is None:
        return "candidate preempted" if ld.get("preempted") else "—"
    pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
    text = f"{pct(ld.get('foreign_cpu_a'))}→{pct(ld.get('foreign_cpu_b'))}"
    if (ld.get("steal_a") or 0) >= 0.005 or (ld.get("steal_b") or 0) >= 0.005:
        text += f" (steal {pct(ld.get('steal_a'))}→{pct(ld.get('steal_b'))})"
    if ld.get("loaded_side"):
        text += f", {ld['loaded_side']} loaded"
    return text


def _fmt_value(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def wide_console():
    """A rich console; when the output is not a terminal (a pipe, a CI log) it is 200
    columns wide, so long case ids stay on one line instead of rich's 80-column default."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def fitted_console():
    """A rich console as wide as the terminal: ``COLUMNS`` when set, else the terminal's
    width, else 80 (rich's default when piped). Nothing is forced wider than the reader's
    screen; long case ids wrap instead. No automatic highlighting (numbers keep the
    colour of their line)."""
    from rich.console import Console

    return Console(highlight=False)


#: Relative change of an indicator below which compare calls it noise when the indicator
#: carries no confidence interval (``compare.indicators.min_change`` in configs/compare.yaml).
INDICATOR_MIN_CHANGE = 0.10


def geomean_p50_ratio(cases: list[dict]) -> tuple[float | None, int]:
    """Geometric mean of the compared cases' p50 ratios B/A and how many went into it
    (ratios that are missing, not finite or ≤ 0 are left out): exp(mean(log r)). The
    one-number summary pyperf's ``compare_to`` prints as "Geometric mean" (pyperf docs,
    "pyperf compare_to"); > 1 = the candidate is slower."""
    logs = [math.log(r["p50_ratio"]) for r in cases
            if isinstance(r.get("p50_ratio"), (int, float)) and math.isfinite(r["p50_ratio"]) and r["p50_ratio"] > 0]
    return (math.exp(sum(logs) / len(logs)) if logs else None), len(logs)


def _ci_of(d: dict, side: str):
    for key in (f"ci_{side}", f"{'baseline' if side == 'a' else 'candidate'}_ci"):
        ci = d.get(key)
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_ok_num(v) for v in ci):
            return float(min(ci)), float(max(ci))
    return None


def indicator_beyond_noise(d: dict, min_change: float = INDICATOR_MIN_CHANGE) -> tuple[bool | None, str]:
    """Whether one indicator delta (an entry of ``doc["indicators"]["deltas"]``) moved
    beyond its noise, and on what basis:

    - both sides carry a CI (``ci_a``/``ci_b`` or ``baseline_ci``/``candidate_ci``,
      [low, high]): beyond when the two intervals do not overlap ("ci");
    - otherwise relative: beyond when |B/A − 1| ≥ ``min_change`` ("relative"); A = 0:
      beyond when B ≠ 0.
    None ("one side") when a side has no value (measurable in one run only)."""
    va, vb = d.get("baseline"), d.get("candidate")
    if not _ok_num(va) or not _ok_num(vb):
        return None, "one side"
    ca, cb = _ci_of(d, "a"), _ci_of(d, "b")
    if ca and cb:
        return (ca[1] < cb[0] or cb[1] < ca[0]), "ci"
    if va == 0:
        return vb != 0, "relative"
    return abs(vb / va - 1) >= min_change, "relative"


def add_render_summary(doc: dict, cfg: dict | None = None) -> dict:
    """Adds the figures the concise output is made of to a comparison document (in
    place; returns it) without touching the statistics: ``summary.geomean_p50_ratio``
    and ``summary.geomean_cases`` (:func:`geomean_p50_ratio`); per indicator delta
    ``beyond_noise`` (True, False, or None when measured in one run only) and
    ``noise_basis`` (:func:`indicator_beyond_noise`) and ``headline``
    (:func:`headline_indicator`); ``indicators.min_change`` (config
    ``compare.indicators.min_change``) and ``summary.indicators_beyond_noise`` (headline
    indicators beyond their noise).
    Idempotent; ``cfg`` None reads configs/compare.yaml."""
    s = doc.setdefault("summary", {})
    s["geomean_p50_ratio"], s["geomean_cases"] = geomean_p50_ratio(doc.get("cases") or [])
    ind = doc.setdefault("indicators", {"measurable": False, "reason": "", "deltas": []})
    if cfg is None:
        cfg = load_config()
    min_change = float(((cfg.get("compare") or {}).get("indicators") or {}).get("min_change", INDICATOR_MIN_CHANGE))
    ind["min_change"] = min_change
    beyond = 0
    for d in ind.get("deltas") or []:
        d["beyond_noise"], d["noise_basis"] = indicator_beyond_noise(d, min_change)
        d["headline"] = headline_indicator(str(d.get("indicator", "")))
        beyond += bool(d["beyond_noise"] and d["headline"])
    s["indicators_beyond_noise"] = beyond
    return doc


def _pyperf_ratio(r: float) -> str:
    """pyperf's wording of a time ratio: '1.23x slower', '1.23x faster', 'no change'."""
    if f"{r:.2f}" == "1.00" and f"{1 / r:.2f}" == "1.00":
        return "no change"
    return f"{r:.2f}x slower" if r > 1 else f"{1 / r:.2f}x faster"


def geomean_line(doc: dict) -> str:
    """'p50 geometric mean 1.03x slower (+3.0%, 40 cases); 2 regressed, 1 improved' — the
    one-line verdict of the comparison (the geometric mean of the p50 ratios B/A in
    pyperf compare_to's wording), short enough for an 80-column terminal."""
    s = doc["summary"]
    if "geomean_p50_ratio" not in s:
        add_render_summary(doc)
    g, n = s["geomean_p50_ratio"], s["geomean_cases"]
    head = (f"p50 geometric mean {_pyperf_ratio(g)} ({_pct(g)}, {n} case{'s' if n != 1 else ''})"
            if g is not None else "p50 geometric mean — (no case compared)")
    tail = f"{s.get('regressed', 0)} regressed, {s.get('improved', 0)} improved"
    if s.get("gated_regressed", 0) != s.get("regressed", 0):
        tail += f" ({s.get('gated_regressed', 0)} gated)"
    return f"{head}; {tail}"


def counts_line(doc: dict) -> str:
    """'37 unchanged, 110 only in one run (110 baseline, 0 candidate), ...' in one line."""
    s = doc["summary"]
    only = s.get("only_in_baseline", 0) + s.get("only_in_candidate", 0)
    parts = [f"{s.get('unchanged', 0)} unchanged",
             f"{only} only in one run ({s.get('only_in_baseline', 0)} baseline, {s.get('only_in_candidate', 0)} candidate)"]
    if s.get("not_compared"):
        kinds: dict[str, int] = {}
        for r in doc.get("not_compared") or []:
            kinds[r.get("kind", "status")] = kinds.get(r.get("kind", "status"), 0) + 1
        parts.append(f"{s['not_compared']} not compared ("
                     + ", ".join(f"{n} {k}" if len(kinds) > 1 else k for k, n in kinds.items()) + ")")
    if s.get("within_noise_floor"):
        parts.append(f"{s['within_noise_floor']} held by the noise floor")
    if s.get("held_by_run_shift"):
        parts.append(f"{s['held_by_run_shift']} held by the whole-run shift")
    return ", ".join(parts)


def _verdict_text(row: dict) -> str:
    return row.get("verdict_label", row["verdict"]) + ("" if row.get("gated", True) else " (not gated)")


def _shift_key(row: dict) -> float:
    r = row.get("p50_ratio")
    return abs(math.log(r)) if isinstance(r, (int, float)) and math.isfinite(r) and r > 0 else 0.0


def changed_cases(doc: dict) -> list[dict]:
    """The cases with a verdict other than unchanged: regressed first, then improved,
    each by the size of its p50 shift (largest first)."""
    order = {"regressed": 0, "improved": 1}
    rows = [r for r in doc.get("cases") or [] if r["verdict"] != "unchanged"]
    return sorted(rows, key=lambda r: (order.get(r["verdict"], 2), -_shift_key(r)))


def _figures(row: dict, full: bool) -> str:
    """One line of a case's figures: p50 A→B with its change and CI, p99 change, floor;
    ``full`` adds n, MWU, KS, SLA and foreign load."""
    parts = [f"p50 {_s(row['p50_a'])} → {_s(row['p50_b'])} {_ratio_ci(row['p50_ratio'], row['p50_ci'])}",
             f"p99 {_ratio_ci(row['p99_ratio'], row['p99_ci']) if full else _pct(row['p99_ratio'])}",
             f"floor {_floor_text(row)}"]
    if full:
        parts = [f"n {row['n_a']}/{row['n_b']}"] + parts + [
            f"MWU p (Holm) {_p(row.get('mwu_p_holm'))}", f"KS {row['ks']:.2f}", f"SLA {_sla_text(row['sla'])}",
            f"foreign CPU {_load_text(row)}"]
    return " · ".join(parts)


def _floor_short(row: dict) -> str:
    nf = row.get("noise_floor")
    return f"±{nf['p50']:.1%}" if nf else "—"


def wrap(text: str, width: int, indent: int = 0, hanging: int = 2) -> str:
    """``text`` folded to ``width`` columns: breaks at spaces and after commas (a case id
    such as ``probe[a=1,b=2]@cpu:0`` folds between its parameters), a piece longer than a
    whole line cut; continuation lines indented by ``indent + hanging``; no trailing
    spaces."""
    pieces = [p for p in re.split(r"(?<=[\s,])", text) if p]
    lines: list[str] = []
    line = " " * indent
    lead = " " * (indent + hanging)
    for piece in pieces:
        if len((line + piece).rstrip()) <= width or not line.strip():
            line += piece
        else:
            lines.append(line.rstrip())
            line = lead + piece.lstrip()
        while len(line.rstrip()) > width:  # one piece longer than a line: cut it
            lines.append(line[:width])
            line = lead + line[width:]
    lines.append(line.rstrip())
    return "\n".join(lines)


def _called_on(row: dict) -> str | None:
    """'called on p50, p99, SLA ×50': which gated metrics made the verdict (the full
    reasons are in ``--all`` and ``--json``)."""
    names = []
    for reason in row.get("reasons") or []:
        if reason.startswith("SLA"):
            m = re.match(r"SLA violations (×\S+)", reason)
            names.append(f"SLA {m.group(1)}" if m else "SLA")
        else:
            names.append(reason.split(" ", 1)[0])
    return ("called on " + ", ".join(names)) if names else None


#: Leaf names of a serving entry in indicators.json that are its headline indicators
#: (INDICATORS.md §2); the other leaves (components, waterfall, T_pred parts, latency
#: quantiles) are supporting figures.
SERVING_HEADLINE = ("kappa", "C_eff", "epsilon", "tokens_per_j")


def headline_indicator(path: str) -> bool:
    """Whether an indicator delta's path (``mode3.collective_scaling``,
    ``serving[case].kappa``, ``ladder[0].compute.fp32.efficiency``) is a headline
    indicator — a mode 1–4 indicator, the capacity headline, a composite's κ, C_eff, ε or
    tokens/J, a ladder efficiency I/N or a device's FLOP/J — rather than one of the
    figures it is computed from."""
    if re.fullmatch(r"mode[_\- ]?\d\.[^.\[]+", path) or path.startswith("capacity."):
        return True
    if path.startswith("serving[") and path.rsplit(".", 1)[-1] in SERVING_HEADLINE:
        return "].components[" not in path and ".waterfall." not in path
    return path.startswith("ladder[") and (path.endswith(".efficiency") or path.endswith(".energy.flops_per_j"))


def _why(row: dict, full: bool = True) -> list[str]:
    """Why the case got its verdict: the full reasons (``full``), or one 'called on'
    line; then the foreign load, the floor and the whole-run shift that held it."""
    called = _called_on(row)
    out = (list(row.get("reasons") or []) if full else [called] if called else []) + _load_reason(row)
    if row.get("within_noise_floor"):
        out.append(f"held by the noise floor ({row['verdict_without_floor']} without it): "
                   + "; ".join(row.get("held_by_floor") or []))
    if row.get("held_by_run_shift"):
        out.append("held by the whole-run shift: " + "; ".join(row["held_by_run_shift"]))
    return out


KNOWN_DOC_KEYS = {"baseline", "baselines", "candidate", "gate", "gate_text", "alpha", "confidence", "bootstrap",
                  "noise_floor", "cases", "only_in_baseline", "only_in_candidate", "not_compared", "indicators",
                  "environment", "generation", "summary", "exit_code", "run_shift"}


def _extra_lines(doc: dict) -> list[str]:
    """Whole-run findings: the ``run_shift`` groups' one-line ``why``, and any top-level
    field this renderer does not know yet, as ``key: value`` (nothing in the document
    is dropped from the output)."""
    lines = [sh["why"] for sh in doc.get("run_shift") or [] if isinstance(sh, dict) and sh.get("why")]
    for key, value in doc.items():
        if key in KNOWN_DOC_KEYS or value in (None, [], {}):
            continue
        if isinstance(value, list):
            lines += [f"{key}: {v['why'] if isinstance(v, dict) and 'why' in v else _fmt_value(v)}" for v in value]
        elif isinstance(value, dict) and "why" in value:
            lines.append(f"{key}: {value['why']}")
        else:
            lines.append(f"{key}: {_fmt_value(value) if not isinstance(value, dict) else value}")
    return lines


def _floor_short_line(doc: dict) -> str:
    nf = doc["noise_floor"]
    names = {"rounds": "between rounds", "repeats": "baseline repeats", "blocks": "within-run drift (weak)"}
    kinds = ", ".join(names.get(k, k) for k in nf.get("kinds") or []) or "—"
    return (f"gate {doc['gate_text']}, alpha {doc['alpha']:g} (Holm); noise floor from {kinds}, "
            f"at least {nf['min']:.0%}")


MAX_ENV_LINES = 8


#: Cases with energy on both sides listed in the concise output (the rest: --all).
ENERGY_CASES_SHOWN = 8


def _per_j_text(r: dict) -> str:
    """One case's performance per joule: "1.2 GFLOP/J → 2.4 GFLOP/J (2.00x per joule) at
    time 0.50x",
    or why it is missing (runs without the energy columns give no unit and no note)."""
    from harness.show import si

    unit = r.get("per_j_unit") or ""
    if r.get("per_j_ratio") is None:
        return f"per joule: {r.get('energy_note') or 'not measured'}"
    time = f" at time {r['time_ratio']:.2f}x" if _ok_num(r.get("time_ratio")) else ""
    return f"{si(r['per_j_a'], unit)} → {si(r['per_j_b'], unit)} ({r['per_j_ratio']:.2f}x per joule){time}"


def energy_lines(gen: dict, show_all: bool = False) -> list[str]:
    """The concise energy lines of a generation view: the geometric-mean work-per-joule
    ratio B/A next to the time ratio of the same cases, then up to
    ``ENERGY_CASES_SHOWN`` cases (all in ``--all``, which lists them per case instead).
    Nothing for views without the ``energy`` summary (documents of older code) and a
    line saying so where no case has energy on both sides."""
    e = gen.get("energy")
    if not e:
        return []
    # The reasons from the cases themselves, so documents of older code show them too.
    reasons = energy_reasons(gen.get("cases") or [])
    if not e["cases"]:
        return [f"performance per joule: no case has energy on both sides ({e['without_energy']} without"
                + (f": {reasons})" if reasons else ")")]
    time = f", p50 time ratio {e['time_geomean_ratio']:.2f}x" if _ok_num(e.get("time_geomean_ratio")) else ""
    lines = [f"performance per joule ({', '.join(e['units'])}), candidate/baseline over {e['cases']} cases with "
             f"energy on both sides: {e['per_j_geomean_ratio']:.2f}x{time} (shown, not judged)"
             + (f"; {e['without_energy']} without energy on a side" + (f": {reasons}" if reasons else "")
                if e["without_energy"] else "")]
    if not show_all:
        both = [r for r in gen["cases"] if r.get("per_j_ratio") is not None]
        lines += [f"  {r['case_id']}: {_per_j_text(r)}" for r in both[:ENERGY_CASES_SHOWN]]
        if len(both) > ENERGY_CASES_SHOWN:
            lines.append(f"  … {len(both) - ENERGY_CASES_SHOWN} more (--all)")
    return lines


def print_comparison(doc: dict, console=None, show_all: bool = False) -> None:
    """The comparison on the terminal, as wide as the terminal (:func:`fitted_console`).

    Default (concise): the two runs, then the changed cases (regressed, then improved,
    largest shift first) with their figures and reasons, newly failing cases, the
    whole-run shift, the indicators that moved beyond their noise
    (:func:`indicator_beyond_noise`), the changed environment facts, the foreign load,
    and two closing lines: :func:`geomean_line` and :func:`counts_line`.
    ``show_all``: every compared case with all its statistics, the cases held by the
    floor, the one-sided and not-compared cases, the generation table and every
    indicator delta. ``--json`` is the complete document either way."""
    from rich.markup import escape
    from rich.text import Text

    from harness.show import si

    if "geomean_p50_ratio" not in doc.get("summary", {}):
        add_render_summary(doc)
    console = console or fitted_console()

    width = max(40, console.width)

    def out(text: str, indent: int = 0, style: str = "") -> None:
        # Wrapped here (:func:`wrap`), not by rich: a hanging indent, no trailing padding,
        # and case ids fold between their parameters.
        console.print(Text(wrap(text, width, indent), style=style), soft_wrap=True)

    a, b = doc["baseline"], doc["candidate"]
    for title, r in (("baseline ", a), ("candidate", b)):
        partial = "" if r["status"] == "complete" else f"  [yellow]status {escape(str(r['status']))}[/]"
        console.print(f"[bold]{title}[/] {escape(r['run_id'])}  {escape(r['label'] or '—')}  host "
                      f"{escape(r['host'] or '—')}  {escape(', '.join(r['device_classes']))}{partial}")
    for extra in doc.get("baselines", [])[1:]:
        console.print(f"[bold]baseline repeat[/] {escape(extra['run_id'])}  {escape(extra['label'] or '—')}")
    out(floor_line(doc) if show_all else _floor_short_line(doc), style="dim")
    if show_all:
        out(f"gate {doc['gate_text']}, alpha {doc['alpha']:g} (Holm), bootstrap {doc['bootstrap']['resamples']} "
            f"resamples, seed {doc['bootstrap']['seed']}; a case regresses only when significant, its CI beyond "
            "the gate and its shift beyond its floor", style="dim")

    rows = changed_cases(doc)
    if show_all:
        rest = sorted((r for r in doc["cases"] if r["verdict"] == "unchanged"), key=lambda r: -_shift_key(r))
        rows = rows + rest
    console.print()
    title = "cases" if show_all else "changed cases"
    console.print(f"[bold]{title}[/] ({len(rows)} of {len(doc['cases'])} compared; Δ = B/A − 1 [95% CI])"
                  if rows else f"[bold]changed cases[/]: none of {len(doc['cases'])} compared")
    for row in rows:
        style = VERDICT_STYLE.get(row["verdict"], "")
        head = f"{_verdict_text(row):<11} {row['case_id']}"
        if len(head) > width:  # the id on its own line(s), folded between parameters
            head = _verdict_text(row) + "\n" + wrap(row["case_id"], width, 2)
        console.print(Text(head, style=style), soft_wrap=True)
        out(_figures(row, show_all), indent=2)
        for why in _why(row, full=show_all):
            out(why, indent=2, style="dim")

    not_ok_b = [r for r in doc.get("not_compared") or [] if r.get("status_a") == "ok" and r.get("status_b") != "ok"]
    shown_nc = (doc.get("not_compared") or []) if show_all else not_ok_b
    if shown_nc:
        console.print()
        console.print("[bold]not compared[/]" if show_all else
                      f"[bold red]not ok in the candidate[/] ({len(not_ok_b)}, ok in the baseline)")
        for r in shown_nc:
            out(f"{r['case_id']}: baseline {r['status_a']}, candidate {r['status_b']}: {r['reason']}", indent=2)
    if show_all:
        for key, label in (("only_in_baseline", "only in baseline"), ("only_in_candidate", "only in candidate")):
            if doc.get(key):
                console.print()
                console.print(f"[bold]{label}[/] ({len(doc[key])})")
                for cid in doc[key]:
                    out(cid, indent=2)

    extra = _extra_lines(doc)
    if extra:
        console.print()
        console.print("[bold]whole run[/]")
        for line in extra:
            out(line, indent=2)

    gen = doc.get("generation")
    if gen:
        console.print()
        console.print(f"[bold]generation[/] {escape(', '.join(gen['classes_baseline']))} → "
                      f"{escape(', '.join(gen['classes_candidate']))}"
                      + ("" if show_all else f" ({len(gen['cases'])} cases; --all: rate, roofline and perf/W each)"))
        for line in energy_lines(gen, show_all):
            out(line, indent=2)
        if show_all:
            for r in gen["cases"]:
                unit = (r["rate_unit"] or "").split(" ")[0] or "/s"
                out(r["case_id"], indent=2)
                out(f"rate {si(r['rate_a'], unit)} → {si(r['rate_b'], unit)} · roofline {_frac(r['roofline_a'])} → "
                    f"{_frac(r['roofline_b'])} · perf/W {si(r['perf_per_w_a'], unit + '/W')} → "
                    f"{si(r['perf_per_w_b'], unit + '/W')}" + (f" · {r['power_note']}" if r["power_note"] else ""),
                    indent=4)
                if r.get("per_j_unit") is not None or r.get("energy_note"):
                    out(_per_j_text(r), indent=4)

    ind = doc["indicators"]
    console.print()
    if not ind.get("measurable"):
        out(f"indicators (modes 1–4): {ind.get('reason', '')}")
    else:
        deltas = ind["deltas"]
        headline = [d for d in deltas if headline_indicator(d["indicator"])]
        shown = deltas if show_all else [d for d in headline if d.get("beyond_noise")]
        one_side = sum(1 for d in headline if d.get("beyond_noise") is None)
        supporting = sum(1 for d in deltas if d.get("beyond_noise") and not headline_indicator(d["indicator"]))
        basis = f"|Δ| ≥ {ind.get('min_change', INDICATOR_MIN_CHANGE):.0%} or CIs apart"
        if show_all:
            console.print(f"[bold]indicators[/] (all {len(deltas)} figures of indicators.json)")
        else:
            console.print(f"[bold]indicators beyond noise[/]: {len(shown)} of {len(headline)}")
            out(f"({basis}" + (f"; {one_side} measured in one run only" if one_side else "")
                + (f"; {supporting} supporting figures moved too, --all lists them" if supporting else "") + ")",
                indent=2, style="dim")
        for d in shown:
            unit = f" {d['unit']}" if d.get("unit") else ""
            rel = (f" ({_pct(d['candidate'] / d['baseline'])})"
                   if _ok_num(d.get("baseline")) and _ok_num(d.get("candidate")) and d["baseline"] else "")
            mark = "" if not show_all or d.get("beyond_noise") is None else (" *" if d.get("beyond_noise") else "")
            out(f"{d['indicator']}: {_fmt_value(d['baseline'])} → {_fmt_value(d['candidate'])}{unit}{rel}{mark}",
                indent=2)
        if show_all and shown:
            out("* beyond noise", indent=2, style="dim")

    env = doc["environment"]
    if env["changed"]:
        console.print()
        console.print(f"[bold]environment fingerprint[/]: {len(env['changed'])} changed, {env['identical']} identical")
        limit = None if show_all else MAX_ENV_LINES
        for d in env["changed"][:limit]:
            out(f"{d['fact']}: {_fmt_value(d['baseline'])} → {_fmt_value(d['candidate'])}", indent=2)
        if limit is not None and len(env["changed"]) > limit:
            out(f"… {len(env['changed']) - limit} more (--all)", indent=2, style="dim")
    else:
        out(f"environment fingerprint: no change ({env['identical']} facts identical)")
    loads = load_line(doc)
    if loads:
        out("foreign load: " + loads)
    console.print()
    style = "bold red" if doc["exit_code"] else "bold green"
    out(geomean_line(doc), style=style)
    out(counts_line(doc))


def _frac(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


MD_CHANGED_HEADERS = ["case", "p50 A→B", "p50 Δ [95% CI]", "p99 Δ", "noise floor", "verdict"]


def markdown(doc: dict, show_all: bool = False) -> str:
    """The comparison as Markdown (a PR comment, a ticket). Concise by default, like
    :func:`print_comparison`: the changed cases in one table with their reasons, newly
    failing cases, the indicators beyond noise, the changed environment facts, then
    :func:`geomean_line` and :func:`counts_line`. ``show_all``: every case with every
    statistic (:data:`CASE_HEADERS`), the one-sided and not-compared cases, the
    generation table and every indicator delta."""
    from harness.show import si

    if "geomean_p50_ratio" not in doc.get("summary", {}):
        add_render_summary(doc)
    a, b = doc["baseline"], doc["candidate"]
    loads = load_line(doc)
    lines = [
        f"## coherence compare: {a['run_id']} → {b['run_id']}",
        "",
        f"- baseline: `{a['run_id']}` ({a['label'] or 'no label'}, {', '.join(a['device_classes'])})",
        *[f"- baseline repeat: `{r['run_id']}` ({r['label'] or 'no label'})" for r in doc.get("baselines", [])[1:]],
        f"- candidate: `{b['run_id']}` ({b['label'] or 'no label'}, {', '.join(b['device_classes'])})",
        f"- {floor_line(doc)}",
        (f"- gate `{doc['gate_text']}`, alpha {doc['alpha']:g} (Holm), bootstrap "
         f"{doc['bootstrap']['resamples']} resamples, seed {doc['bootstrap']['seed']}"),
        f"- **{geomean_line(doc)}**",
        f"- {counts_line(doc)}",
        *([f"- foreign load: {loads}"] if loads else []),
        *[f"- {line}" for line in _extra_lines(doc)],
    ]
    if show_all:
        lines += ["", "| " + " | ".join(CASE_HEADERS) + " |", "|" + "---|" * len(CASE_HEADERS)]
        for row in doc["cases"]:
            cells = _case_cells(row)
            if row["verdict"] == "regressed":
                cells[-1] = f"**{cells[-1]}**"
            cells[0] = f"`{cells[0]}`"
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        reasons = [f"- {_verdict_text(r)}: `{r['case_id']}`: {'; '.join(_why(r))}" for r in doc["cases"] if _why(r)]
    else:
        rows = changed_cases(doc)
        lines += ["", f"### Changed cases ({len(rows)} of {len(doc['cases'])})", ""]
        if rows:
            lines += ["| " + " | ".join(MD_CHANGED_HEADERS) + " |", "|" + "---|" * len(MD_CHANGED_HEADERS)]
            for r in rows:
                verdict_text = _verdict_text(r)
                cells = [f"`{r['case_id']}`", f"{_s(r['p50_a'])} → {_s(r['p50_b'])}",
                         _ratio_ci(r["p50_ratio"], r["p50_ci"]), _pct(r["p99_ratio"]), _floor_short(r),
                         f"**{verdict_text}**" if r["verdict"] == "regressed" else verdict_text]
                lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        else:
            lines.append("None.")
        reasons = [f"- {_verdict_text(r)}: `{r['case_id']}`: {'; '.join(_why(r))}" for r in rows if _why(r)]
    if reasons:
        lines += ["", *reasons]
    if show_all:
        for key, title in (("only_in_baseline", "Only in baseline"), ("only_in_candidate", "Only in candidate")):
            if doc[key]:
                lines += ["", f"{title}: " + ", ".join(f"`{i}`" for i in doc[key])]
    not_compared = [r for r in doc["not_compared"]
                    if show_all or (r.get("status_a") == "ok" and r.get("status_b") != "ok")]
    if not_compared:
        lines += ["", "| not compared | baseline | candidate | reason |", "|---|---|---|---|"]
        lines += [f"| `{r['case_id']}` | {r['status_a']} | {r['status_b']} | {_md_cell(r['reason'])} |"
                  for r in not_compared]
    gen = doc.get("generation")
    if gen and show_all:
        lines += ["", f"### Generation: {', '.join(gen['classes_baseline'])} → {', '.join(gen['classes_candidate'])}",
                  "", "| case | rate A | rate B | roofline A | roofline B | perf/W A | perf/W B | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in gen["cases"]:
            unit = (r["rate_unit"] or "").split(" ")[0] or "/s"
            lines.append(f"| `{r['case_id']}` | {si(r['rate_a'], unit)} | {si(r['rate_b'], unit)} | "
                         f"{_frac(r['roofline_a'])} | {_frac(r['roofline_b'])} | {si(r['perf_per_w_a'], unit + '/W')} | "
                         f"{si(r['perf_per_w_b'], unit + '/W')} | {r['power_note']} |")
        if (gen.get("energy") or {}).get("cases"):
            lines += ["", *energy_lines(gen, True), "", "| case | per joule A | per joule B | B/A | time B/A | note |",
                      "|---|---|---|---|---|---|"]
            for r in gen["cases"]:
                unit = (r.get("per_j_unit") or "").split("/")[0] + "/J"
                ratio = f"{r['per_j_ratio']:.2f}x" if r.get("per_j_ratio") is not None else "–"
                time = f"{r['time_ratio']:.2f}x" if _ok_num(r.get("time_ratio")) else "–"
                lines.append(f"| `{r['case_id']}` | {si(r.get('per_j_a'), unit)} | {si(r.get('per_j_b'), unit)} | "
                             f"{ratio} | {time} | {_md_cell(r.get('energy_note') or '')} |")
    elif gen:
        lines += ["", f"Generation {', '.join(gen['classes_baseline'])} → {', '.join(gen['classes_candidate'])}: "
                      f"{len(gen['cases'])} cases (`--all` for rate, roofline and perf/W)."]
        lines += ["", *[f"- {line.strip()}" if line.startswith("  ") else line for line in energy_lines(gen)]]
    ind = doc["indicators"]
    if not ind["measurable"]:
        lines += ["", "### Indicators (modes 1–4)", "", ind["reason"]]
    else:
        headline = [d for d in ind["deltas"] if headline_indicator(d["indicator"])]
        shown = ind["deltas"] if show_all else [d for d in headline if d.get("beyond_noise")]
        title = ("Indicators (modes 1–4)" if show_all else
                 f"Indicators beyond noise ({len(shown)} of {len(headline)}; "
                 f"|Δ| ≥ {ind.get('min_change', INDICATOR_MIN_CHANGE):.0%} or CIs apart)")
        lines += ["", f"### {title}", ""]
        if shown:
            lines += ["| mode | indicator | A | B | Δ | unit |", "|---|---|---|---|---|---|"]
            lines += [f"| {d['mode']} | `{d['indicator']}` | {_fmt_value(d['baseline'])} | {_fmt_value(d['candidate'])} | "
                      f"{_fmt_value(d['delta'])} | {d['unit'] or ''} |" for d in shown]
        else:
            lines.append("None.")
    env = doc["environment"]
    lines += ["", "### Environment fingerprint", ""]
    if env["changed"]:
        lines += [f"{len(env['changed'])} changed, {env['identical']} identical.", "",
                  "| category | fact | baseline | candidate |", "|---|---|---|---|"]
        lines += [f"| {d['category']} | `{d['fact']}` | {_md_cell(_fmt_value(d['baseline']))} | "
                  f"{_md_cell(_fmt_value(d['candidate']))} |" for d in env["changed"]]
    else:
        lines.append(f"No change ({env['identical']} facts identical).")
    return "\n".join(lines) + "\n"


def to_jsonable(obj):
    """inf/NaN are not JSON: inf -> "inf", NaN -> null."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj
