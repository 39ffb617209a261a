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

Verdict per case under a gate (``p50:+5%,p99:+10%,sla:2x``; each gate is a ratio g > 1):

- p50: regressed when ratio > g and the Holm-corrected MWU p < alpha; improved when
  ratio < 1/g and the same p < alpha.
- p99: regressed when the whole bootstrap CI of the p99 ratio lies above g (CI low > g);
  improved when it lies below 1/g. (A p99 from tens of samples is close to the maximum;
  the CI keeps a single slow repetition from failing a gate.)
- sla: regressed when amplification > g and the Holm-corrected Fisher p < alpha;
  improved when amplification < 1/g and that p < alpha.

A case is *regressed* when any gated metric regressed, *improved* when one improved and
none regressed, *unchanged* otherwise. Exit code 1 when a gated case (``gate_cases``
globs) regressed.
"""

from __future__ import annotations

import fnmatch
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import CONFIG_DIR, read_yaml
from harness.errors import UserError
from harness.results import (
    Run,
    device_members,
    indicator_leaves,
    mode_of,
    rep_durations,
)

DEFAULT_CONFIG = CONFIG_DIR / "compare.yaml"
GATE_METRICS = ("p50", "p99", "sla")
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
    },
    "fleet": {
        "z_threshold": 3.5,
        "min_scale_rel": 0.02,
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
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise UserError(f"{file}: compare.bootstrap.resamples: expected an integer ≥ 100, got {resamples!r}")
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
    _num(f["z_threshold"], f"{file}: fleet.z_threshold", 0, None)
    floor = f["min_scale_rel"]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise UserError(f"{file}: fleet.min_scale_rel: expected a number in [0, 1), got {floor!r}")
    _globs(f["cases"], f"{file}: fleet.cases")
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if value <= lo or (hi is not None and value >= hi):
        bound = f"in ({lo}, {hi})" if hi is not None else f"> {lo}"
        raise UserError(f"{where}: must be {bound}, got {value!r}")
    return float(value)


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
    """Share k/n with its Wilson score interval."""
    from scipy.stats import norm

    if n <= 0:
        return None, None, None
    z = float(norm.ppf(0.5 + confidence / 2))
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return phat, max(0.0, centre - half), min(1.0, centre + half)


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
    percentile interval of the ratios of independently resampled quantiles."""
    ra = bootstrap_quantiles(a, qs, resamples, rng)
    rb = bootstrap_quantiles(b, qs, resamples, rng)
    tail = (1 - confidence) / 2 * 100
    out = []
    for col, q in enumerate(qs):
        qa, qb = float(np.percentile(a, q * 100)), float(np.percentile(b, q * 100))
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


def compare_case(case_id: str, a: np.ndarray, b: np.ndarray, cfg: dict) -> dict:
    """Every statistic of one case (before the Holm correction across cases)."""
    from scipy.stats import fisher_exact, ks_2samp, mannwhitneyu

    c = cfg["compare"]
    conf, resamples = c["confidence"], c["bootstrap"]["resamples"]
    rng = _case_rng(c["bootstrap"]["seed"], case_id)
    out: dict = {"case_id": case_id, "n_a": int(a.size), "n_b": int(b.size)}
    out["p50_a"], out["p50_b"] = float(np.median(a)), float(np.median(b))
    out["p99_a"], out["p99_b"] = float(np.percentile(a, 99)), float(np.percentile(b, 99))
    (out["p50_ratio"], *p50_ci), (out["p99_ratio"], *p99_ci) = ratio_cis(a, b, (0.5, 0.99), resamples, rng, conf)
    out["p50_ci"], out["p99_ci"] = p50_ci, p99_ci
    if np.array_equal(np.sort(a), np.sort(b)) or (np.ptp(a) == 0 and np.ptp(b) == 0 and a[0] == b[0]):
        out["mwu_p"], out["ks"] = 1.0, 0.0
    else:
        out["mwu_p"] = float(mannwhitneyu(b, a, alternative="two-sided").pvalue)
        out["ks"] = float(ks_2samp(a, b).statistic)
    # SLA amplification
    tau = _sla_threshold(case_id, c["sla"]["thresholds"])
    source = "config" if tau is not None else "baseline p99"
    tau = out["p99_a"] if tau is None else tau
    ka, kb = int((a > tau).sum()), int((b > tau).sum())
    va, va_lo, va_hi = wilson(ka, a.size, conf)
    vb, vb_lo, vb_hi = wilson(kb, b.size, conf)
    if ka == 0 and kb == 0:
        amp, note = None, "no violations"
    elif ka == 0:
        amp, note = math.inf, "new violations"
    else:
        amp, note = vb / va, ""
    fisher_p = 1.0 if ka == kb == 0 else float(fisher_exact([[kb, b.size - kb], [ka, a.size - ka]]).pvalue)
    out["sla"] = {
        "threshold_s": tau, "threshold_source": source,
        "violations_a": ka, "violations_b": kb,
        "v_a": va, "v_a_ci": [va_lo, va_hi], "v_b": vb, "v_b_ci": [vb_lo, vb_hi],
        "amplification": amp, "note": note, "fisher_p": fisher_p,
    }
    return out


def verdict(row: dict, gates: dict[str, float], alpha: float) -> tuple[str, list[str]]:
    """improved / unchanged / regressed, with the reasons (module doc)."""
    worse, better = [], []
    if "p50" in gates and row.get("p50_ratio") is not None:
        g, r, p = gates["p50"], row["p50_ratio"], row["mwu_p_holm"]
        if r > g and p < alpha:
            worse.append(f"p50 {_pct(r)} > {_pct(g)} (MWU p_holm {p:.2g})")
        elif r < 1 / g and p < alpha:
            better.append(f"p50 {_pct(r)} < {_pct(1 / g)} (MWU p_holm {p:.2g})")
    if "p99" in gates and row.get("p99_ci") and row["p99_ci"][0] is not None:
        g, (lo, hi) = gates["p99"], row["p99_ci"]
        if lo > g:
            worse.append(f"p99 {_pct(row['p99_ratio'])}, CI low {_pct(lo)} > {_pct(g)}")
        elif hi < 1 / g:
            better.append(f"p99 {_pct(row['p99_ratio'])}, CI high {_pct(hi)} < {_pct(1 / g)}")
    sla = row.get("sla") or {}
    if "sla" in gates and sla.get("amplification") is not None:
        g, amp, p = gates["sla"], sla["amplification"], sla["fisher_p_holm"]
        if amp > g and p < alpha:
            worse.append(f"SLA violations ×{_amp(amp)} > ×{g:g} (Fisher p_holm {p:.2g})")
        elif amp < 1 / g and p < alpha:
            better.append(f"SLA violations ×{_amp(amp)} < ×{1 / g:.3g} (Fisher p_holm {p:.2g})")
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
    """Mean power during the case (telemetry metric power_w), summed over the GPUs of
    the case's device group (cuda:N -> source gpu:N); None without power telemetry."""
    t = run.telemetry
    if t is None or not len(t) or "metric" not in t.columns:
        return None
    t = t[(t["metric"] == "power_w") & (t["case_id"] == case_id)]
    if not len(t):
        return None
    total = 0.0
    for member in device_members(device):
        kind, _, idx = member.partition(":")
        if kind not in ("cuda", "rocm", "gpu"):
            return None
        values = t.loc[t["source"] == f"gpu:{idx}", "value"]
        if not len(values):
            return None
        total += float(values.mean())
    return total


def generation_view(a: Run, b: Run, ids: list[str], rows_a: dict, rows_b: dict) -> dict | None:
    ca, cb = sorted(set(a.device_classes().values())), sorted(set(b.device_classes().values()))
    if ca == cb:
        return None
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
            if power is None:
                notes.append(f"{'baseline' if side == 'a' else 'candidate'}: no power telemetry")
        entry["power_note"] = "; ".join(notes)
        cases.append(entry)
    return {"classes_baseline": ca, "classes_candidate": cb, "cases": cases}


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


def compare_runs(a: Run, b: Run, gates: dict[str, float], cfg: dict) -> dict:
    """The whole mode 5 comparison of B (candidate) against A (baseline) as a document."""
    c = cfg["compare"]
    alpha = c["alpha"]
    rows_a, rows_b = _records(a.cases), _records(b.cases)
    ids_a, ids_b = list(rows_a), list(rows_b)
    common = [i for i in ids_a if i in rows_b]
    if not common:
        raise UserError(f"runs {a.run_id} and {b.run_id} have no case in common "
                        f"({len(ids_a)} and {len(ids_b)} cases); nothing to compare")
    compared, not_compared = [], []
    for cid in common:
        sa, sb = rows_a[cid].get("status"), rows_b[cid].get("status")
        if sa != "ok" or sb != "ok":
            reason = "; ".join(f"{side}: {st} {(r.get('reason') or '')[:120]}".strip()
                               for side, st, r in (("baseline", sa, rows_a[cid]), ("candidate", sb, rows_b[cid]))
                               if st != "ok")
            not_compared.append({"case_id": cid, "status_a": sa, "status_b": sb, "reason": reason})
            continue
        da = rep_durations(a.samples, cid).to_numpy()
        db = rep_durations(b.samples, cid).to_numpy()
        da, db = da[np.isfinite(da)], db[np.isfinite(db)]
        if not da.size or not db.size:
            side = "baseline" if not da.size else "candidate"
            not_compared.append({"case_id": cid, "status_a": sa, "status_b": sb,
                                 "reason": f"{side}: no samples in samples.parquet"})
            continue
        compared.append(compare_case(cid, da, db, cfg))
    for key, out in (("mwu_p", "mwu_p_holm"),):
        for row, adj in zip(compared, holm([r[key] for r in compared])):
            row[out] = adj
    for row, adj in zip(compared, holm([r["sla"]["fisher_p"] for r in compared])):
        row["sla"]["fisher_p_holm"] = adj
    gate_globs = c["gate_cases"]
    for row in compared:
        row["gated"] = any(fnmatch.fnmatchcase(row["case_id"], g) for g in gate_globs)
        row["verdict"], row["reasons"] = verdict(row, gates, alpha)
        row["status_a"] = row["status_b"] = "ok"
    counts = {v: sum(1 for r in compared if r["verdict"] == v) for v in ("regressed", "improved", "unchanged")}
    gated_regressed = [r["case_id"] for r in compared if r["gated"] and r["verdict"] == "regressed"]
    doc = {
        "baseline": _run_info(a),
        "candidate": _run_info(b),
        "gate": gates,
        "gate_text": gate_text(gates),
        "alpha": alpha,
        "confidence": c["confidence"],
        "bootstrap": dict(c["bootstrap"]),
        "cases": compared,
        "only_in_baseline": [i for i in ids_a if i not in rows_b],
        "only_in_candidate": [i for i in ids_b if i not in rows_a],
        "not_compared": not_compared,
        "indicators": indicator_deltas(a, b),
        "environment": environment_diff(a.manifest, b.manifest),
        "generation": generation_view(a, b, [r["case_id"] for r in compared], rows_a, rows_b),
        "summary": {
            "compared": len(compared), **counts,
            "gated_regressed": len(gated_regressed),
            "only_in_baseline": len([i for i in ids_a if i not in rows_b]),
            "only_in_candidate": len([i for i in ids_b if i not in rows_a]),
            "not_compared": len(not_compared),
        },
        "exit_code": 1 if gated_regressed else 0,
    }
    return doc


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
            f"{s['unchanged']} unchanged; {s['only_in_baseline']} only in baseline, "
            f"{s['only_in_candidate']} only in candidate, {s['not_compared']} not compared (status)")


VERDICT_STYLE = {"regressed": "bold red", "improved": "green", "unchanged": "dim"}
CASE_HEADERS = ["case", "n A/B", "p50 A→B", "p50 Δ [95% CI]", "MWU p (Holm)", "KS", "p99 Δ [95% CI]",
                "SLA v_A→v_B, amplification", "verdict"]


def _case_cells(row: dict) -> list[str]:
    verdict_text = row["verdict"] + ("" if row["gated"] else " (not gated)")
    return [
        row["case_id"], f"{row['n_a']}/{row['n_b']}", f"{_s(row['p50_a'])}→{_s(row['p50_b'])}",
        _ratio_ci(row["p50_ratio"], row["p50_ci"]), _p(row["mwu_p_holm"]), f"{row['ks']:.2f}",
        _ratio_ci(row["p99_ratio"], row["p99_ci"]), _sla_text(row["sla"]), verdict_text,
    ]


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


def print_comparison(doc: dict, console=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from harness.show import si

    console = console or wide_console()
    a, b = doc["baseline"], doc["candidate"]
    for title, r in (("baseline ", a), ("candidate", b)):
        partial = "" if r["status"] == "complete" else f"  [yellow]status {r['status']}[/]"
        console.print(f"[bold]{title}[/] {r['run_id']}  label {escape(r['label'] or '—')}  host {escape(r['host'] or '—')}  "
                      f"{escape(', '.join(r['device_classes']))}{partial}")
    console.print(f"gate {doc['gate_text']}  alpha {doc['alpha']:g} (Holm)  bootstrap "
                  f"{doc['bootstrap']['resamples']} resamples, seed {doc['bootstrap']['seed']}")
    table = Table(title="cases (Δ = B/A − 1; SLA threshold = config SLO or baseline p99)")
    for h in CASE_HEADERS:
        table.add_column(h, overflow="fold", no_wrap=h == "case")
    for row in doc["cases"]:
        cells = _case_cells(row)
        style = VERDICT_STYLE.get(row["verdict"], "")
        cells[-1] = f"[{style}]{cells[-1]}[/]"
        table.add_row(escape(cells[0]), *cells[1:-1], cells[-1])
    console.print(table)
    for row in doc["cases"]:
        if row["verdict"] != "unchanged":
            console.print(f"  {row['verdict']}: {escape(row['case_id'])}: {escape('; '.join(row['reasons']))}")
    for key, title in (("only_in_baseline", "only in baseline"), ("only_in_candidate", "only in candidate")):
        if doc[key]:
            console.print(f"[yellow]{title}[/]: " + escape(", ".join(doc[key])))
    if doc["not_compared"]:
        t = Table(title="not compared (status)")
        for h in ("case", "baseline", "candidate", "reason"):
            t.add_column(h, overflow="fold")
        for r in doc["not_compared"]:
            t.add_row(escape(r["case_id"]), str(r["status_a"]), str(r["status_b"]), escape(r["reason"]))
        console.print(t)
    gen = doc.get("generation")
    if gen:
        t = Table(title=f"generation: {', '.join(gen['classes_baseline'])} → {', '.join(gen['classes_candidate'])}")
        for h in ("case", "rate A", "rate B", "roofline A", "roofline B", "perf/W A", "perf/W B", "note"):
            t.add_column(h, overflow="fold")
        for r in gen["cases"]:
            unit = (r["rate_unit"] or "").split(" ")[0] or "/s"
            t.add_row(escape(r["case_id"]), si(r["rate_a"], unit), si(r["rate_b"], unit),
                      _frac(r["roofline_a"]), _frac(r["roofline_b"]),
                      si(r["perf_per_w_a"], unit + "/W"), si(r["perf_per_w_b"], unit + "/W"), r["power_note"])
        console.print(t)
    ind = doc["indicators"]
    if not ind["measurable"]:
        console.print(f"indicators (modes 1–4): {ind['reason']}")
    elif ind["deltas"]:
        t = Table(title="indicators (modes 1–4), A vs B")
        for h in ("mode", "indicator", "A", "B", "Δ", "unit"):
            t.add_column(h, overflow="fold")
        for d in ind["deltas"]:
            t.add_row(d["mode"], escape(d["indicator"]), _fmt_value(d["baseline"]), _fmt_value(d["candidate"]),
                      _fmt_value(d["delta"]), str(d["unit"] or ""))
        console.print(t)
    env = doc["environment"]
    if env["changed"]:
        t = Table(title=f"environment fingerprint: {len(env['changed'])} changed, {env['identical']} identical")
        for h in ("category", "fact", "baseline", "candidate"):
            t.add_column(h, overflow="fold")
        for d in env["changed"]:
            t.add_row(d["category"], d["fact"], escape(_fmt_value(d["baseline"])), escape(_fmt_value(d["candidate"])))
        console.print(t)
    else:
        console.print(f"environment fingerprint: no change ({env['identical']} facts identical)")
    style = "bold red" if doc["exit_code"] else "bold green"
    console.print(f"[{style}]{summary_line(doc)}[/]")


def _frac(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict) -> str:
    from harness.show import si

    a, b = doc["baseline"], doc["candidate"]
    lines = [
        f"## coherence compare: {a['run_id']} → {b['run_id']}",
        "",
        f"- baseline: `{a['run_id']}` ({a['label'] or 'no label'}, {', '.join(a['device_classes'])})",
        f"- candidate: `{b['run_id']}` ({b['label'] or 'no label'}, {', '.join(b['device_classes'])})",
        (f"- gate `{doc['gate_text']}`, alpha {doc['alpha']:g} (Holm), bootstrap "
         f"{doc['bootstrap']['resamples']} resamples, seed {doc['bootstrap']['seed']}"),
        f"- **{summary_line(doc)}**",
        "",
        "| " + " | ".join(CASE_HEADERS) + " |",
        "|" + "---|" * len(CASE_HEADERS),
    ]
    for row in doc["cases"]:
        cells = _case_cells(row)
        if row["verdict"] == "regressed":
            cells[-1] = f"**{cells[-1]}**"
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    reasons = [f"- {r['verdict']}: `{r['case_id']}`: {'; '.join(r['reasons'])}"
               for r in doc["cases"] if r["verdict"] != "unchanged"]
    if reasons:
        lines += ["", *reasons]
    for key, title in (("only_in_baseline", "Only in baseline"), ("only_in_candidate", "Only in candidate")):
        if doc[key]:
            lines += ["", f"{title}: " + ", ".join(f"`{i}`" for i in doc[key])]
    if doc["not_compared"]:
        lines += ["", "| not compared | baseline | candidate | reason |", "|---|---|---|---|"]
        lines += [f"| `{r['case_id']}` | {r['status_a']} | {r['status_b']} | {_md_cell(r['reason'])} |"
                  for r in doc["not_compared"]]
    gen = doc.get("generation")
    if gen:
        lines += ["", f"### Generation: {', '.join(gen['classes_baseline'])} → {', '.join(gen['classes_candidate'])}",
                  "", "| case | rate A | rate B | roofline A | roofline B | perf/W A | perf/W B | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in gen["cases"]:
            unit = (r["rate_unit"] or "").split(" ")[0] or "/s"
            lines.append(f"| `{r['case_id']}` | {si(r['rate_a'], unit)} | {si(r['rate_b'], unit)} | "
                         f"{_frac(r['roofline_a'])} | {_frac(r['roofline_b'])} | {si(r['perf_per_w_a'], unit + '/W')} | "
                         f"{si(r['perf_per_w_b'], unit + '/W')} | {r['power_note']} |")
    ind = doc["indicators"]
    lines += ["", "### Indicators (modes 1–4)", ""]
    if not ind["measurable"]:
        lines.append(ind["reason"])
    else:
        lines += ["| mode | indicator | A | B | Δ | unit |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['mode']} | `{d['indicator']}` | {_fmt_value(d['baseline'])} | {_fmt_value(d['candidate'])} | "
                  f"{_fmt_value(d['delta'])} | {d['unit'] or ''} |" for d in ind["deltas"]]
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
