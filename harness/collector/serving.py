"""Serving capacity and the coherence ratio (INDICATORS.md §2) of every composite case.

For a composite case (a tensor-parallel decode step, a disaggregated or colocated
request) the probe names the isolated cases it decomposes into (``extra.components``:
case id, count, role). From those, in the same run:

- ``T_pred`` = Σ count × p50 of each component; ``T_meas`` = the composite's p50
  (for requests: the service time, end-to-end minus queueing); κ = T_pred / T_meas.
- ``C_nom`` = tokens per step / t_nom with t_nom = max(ΣFLOPs / N_compute, Σbytes /
  N_mem) + Σ collective bus bytes / N_link + Σ transfer bytes / N_link (N_host_link for
  transfers through the host). Where a nominal figure is missing (CPU memory and links
  have none) the isolated ceiling measured in the same run stands in, and ``basis``
  says so for each resource.
- ``C_eff`` = tokens per step / mean step time × fraction of steps (requests) meeting
  the SLO; ε = C_eff / C_nom.
- The waterfall, in seconds per step, from t_nom to the measured mean step time:
  roofline loss (isolated kernels vs nominal), interconnect loss (isolated collectives
  vs nominal link), memory-path/transfer loss (isolated transfers vs nominal link),
  straggler wait (E[max_i t_i] − E[mean_i t_i] of per-rank compute), and the residual
  (composition and noise: what no isolated part explains). These parts sum to the
  measured mean step time exactly. A last bar, SLO misses (mean/f − mean), leads to
  the effective step time tokens per step / C_eff.
"""

from __future__ import annotations

import numpy as np

from harness.collector.common import (
    RunView,
    clean,
    indicator,
    not_measurable,
    wide_by_rank,
)
from harness.collector.ladder import isolated_memory

TP_STEP = "composite.tp_decode_step"
REQUESTS = ("composite.disagg_request", "composite.colocated_request")


def slo_for(cfg: dict, model: str | None) -> dict:
    slo = cfg.get("slo") or {}
    return {**(slo.get("default") or {}), **(slo.get(model or "") or {})}


def _components(view: RunView, row) -> tuple[list[dict], list[str]]:
    """The component rows of a composite, and the problems (missing, not ok)."""
    comps, problems = [], []
    for comp in row["extra_d"].get("components") or []:
        r = view.row(comp["case_id"])
        if r is None:
            problems.append(f"{comp['case_id']}: not in the run")
        elif r["status"] != "ok":
            problems.append(f"{comp['case_id']}: {r['status']} ({str(r['reason'])[:80]})")
        else:
            comps.append({**comp, "row": r})
    if not row["extra_d"].get("components"):
        problems.append("the composite case lists no components")
    return comps, problems


def _nominal_time(view: RunView, row, comps: list[dict]) -> tuple[dict, dict]:
    """t_nom per role and the basis (nominal or isolated stand-in) of each resource."""
    nom = view.nominal(row["device"])
    from harness.results import device_members

    first = device_members(row["device"])[0]
    basis = {}
    flops = sum(c["count"] * float(c["row"]["flops"] or 0) for c in comps if c["role"] == "compute")
    nbytes = sum(c["count"] * float(c["row"]["bytes"] or 0) for c in comps if c["role"] == "compute")
    dtype = str(row.get("dtype") or row["rparams"].get("dtype") or "")
    n_compute = (nom.get("compute_flops") or {}).get(dtype)
    basis["compute"] = "nominal" if n_compute else "isolated"
    if not n_compute:
        gemm = view.ok[(view.ok["family"] == "gemm") & (view.ok["device"] == first)]
        if "dtype" in gemm:
            gemm = gemm[gemm["dtype"].astype(str) == dtype]
        n_compute = float(gemm["flops_per_s"].max()) if len(gemm) else None
    n_mem = nom.get("memory_Bps")
    basis["memory"] = "nominal" if n_mem else "isolated"
    if not n_mem:
        n_mem, _ = isolated_memory(view, first)
    t = {}
    parts = [x for x in (flops / n_compute if n_compute and flops else None,
                         nbytes / n_mem if n_mem and nbytes else None) if x is not None]
    t["compute"] = max(parts) if parts else None
    if (flops and not n_compute) or (nbytes and not n_mem):
        t["compute"] = None
    coll, tran = 0.0, 0.0
    link, host_link = nom.get("link_Bps"), nom.get("host_link_Bps")
    for c in comps:
        r = c["row"]
        if c["role"] == "collective":
            bus = float(r["bytes"] or 0) * float(r.get("busbw_factor") or 1.0)
            if link:
                coll += c["count"] * bus / link
            else:
                coll += c["count"] * float(r["p50_s"])
                basis["link"] = "isolated"
        elif c["role"] == "transfer":
            through_host = str(r["rparams"].get("path", "")) == "d2h2d"
            peak = host_link if through_host else link
            if peak:
                tran += c["count"] * float(r["bytes"] or 0) / peak
            else:
                tran += c["count"] * float(r["p50_s"])
                basis["host_link" if through_host else "link"] = "isolated"
    basis.setdefault("link", "nominal" if link else "not used")
    t["collective"], t["transfer"] = coll, tran
    return t, basis


def _request_frame(view: RunView, case_id: str):
    """One row per request: the rank row that carries the request columns."""
    s = view.samples_of(case_id)
    if "ttft_s" not in s.columns:
        return None
    s = s[s["ttft_s"].notna()]
    return s.sort_values(["rep", "rank"]).groupby("rep", sort=True).first().reset_index()


def serving_case(view: RunView, row) -> dict:
    cfg = view.cfg
    cid = row["case_id"]
    p = row["rparams"]
    model = p.get("model")
    slo = slo_for(cfg, model)
    out: dict = {"case_id": cid, "probe": row["probe"], "device": row["device"], "params": p, "slo": slo}
    comps, problems = _components(view, row)
    is_tp = row["probe"] == TP_STEP
    # Measured step: TP = slowest rank per step; requests = service time per request.
    if is_tp:
        reps = view.per_rep(cid)
        steps = reps["duration_s"].to_numpy(dtype=float)
        t_meas_p50 = float(row["p50_s"])
        tokens = float(row["extra_d"].get("tokens_per_step") or p.get("batch") or 1)
        meets = steps <= slo.get("tpot_s", np.inf)
        unit_name = "step"
    else:
        req = _request_frame(view, cid)
        if req is None or not len(req):
            out["error"] = "no per-request columns (ttft_s) in the samples"
            return out
        queue = req["queue_s"].fillna(0).to_numpy(dtype=float) if "queue_s" in req else np.zeros(len(req))
        steps = req["duration_s"].to_numpy(dtype=float) - queue
        t_meas_p50 = float(np.median(steps))
        tokens = float(p.get("tokens") or 1) * float(p.get("batch") or 1)
        meets = (req["ttft_s"].to_numpy(dtype=float) <= slo.get("ttft_s", np.inf)) & (
            req["tpot_s"].fillna(0).to_numpy(dtype=float) <= slo.get("tpot_s", np.inf))
        unit_name = "request"
        out["ttft_p50_s"] = float(req["ttft_s"].median())
        out["ttft_p99_s"] = float(req["ttft_s"].quantile(0.99))
        out["tpot_p50_s"] = float(req["tpot_s"].median())
        out["tpot_p99_s"] = float(req["tpot_s"].quantile(0.99))
        if "kv_transfer_s" in req:
            out["kv_transfer_p50_s"] = float(req["kv_transfer_s"].median())
    t_mean = float(steps.mean())
    f = float(meets.mean()) if len(meets) else float("nan")
    out.update(unit=unit_name, tokens_per_unit=tokens, T_meas_p50_s=t_meas_p50,
               T_meas_p99_s=float(np.percentile(steps, 99)), T_mean_s=t_mean, slo_fraction=f)
    c_eff = tokens / t_mean * f if t_mean > 0 else None
    out["C_eff"] = indicator("serving.C_eff", c_eff, "tokens/s", "S.ceff", [cid], cfg,
                             throughput_tokens_per_s=tokens / t_mean if t_mean > 0 else None)
    # Straggler wait from per-rank compute time (TP with more than one rank).
    straggle = 0.0
    wide = wide_by_rank(view.samples_of(cid), "compute_s") if is_tp else np.empty((0, 0))
    if wide.size and wide.shape[1] > 1:
        straggle = float(wide.max(axis=1).mean() - wide.mean(axis=1).mean())
    if problems:
        reason = "; ".join(problems)[:400]
        out["T_pred_s"] = None
        out["kappa"] = not_measurable("serving.kappa", "ratio", "S.kappa", reason, cfg, [cid])
        out["C_nom"] = not_measurable("serving.C_nom", "tokens/s", "S.cnom", reason, cfg, [cid])
        out["epsilon"] = not_measurable("serving.epsilon", "ratio", "S.epsilon", reason, cfg, [cid])
        out["waterfall"] = None
        return clean(out)
    pred = {role: sum(c["count"] * float(c["row"]["p50_s"]) for c in comps if c["role"] == role)
            for role in ("compute", "collective", "transfer")}
    t_pred = sum(pred.values())
    comp_ids = [c["case_id"] for c in comps]
    out["T_pred_s"] = t_pred
    out["T_pred_parts_s"] = pred
    out["components"] = [{"case_id": c["case_id"], "count": c["count"], "role": c["role"],
                          "p50_s": float(c["row"]["p50_s"])} for c in comps]
    out["kappa"] = indicator("serving.kappa", t_pred / t_meas_p50 if t_meas_p50 > 0 else None, "ratio",
                             "S.kappa", [cid, *comp_ids], cfg)
    t_nom, basis = _nominal_time(view, row, comps)
    out["basis"] = basis
    if t_nom["compute"] is None:
        reason = "no compute or memory ceiling for the device (neither nominal nor isolated in this run)"
        out["C_nom"] = not_measurable("serving.C_nom", "tokens/s", "S.cnom", reason, cfg, [cid])
        out["epsilon"] = not_measurable("serving.epsilon", "ratio", "S.epsilon", reason, cfg, [cid])
        out["waterfall"] = None
        return clean(out)
    t_nominal = t_nom["compute"] + t_nom["collective"] + t_nom["transfer"]
    c_nom = tokens / t_nominal
    substituted = [k for k, v in basis.items() if v == "isolated"]
    note = (f"isolated ceilings stand in for missing nominal figures: {', '.join(substituted)}"
            if substituted else None)
    out["C_nom"] = indicator("serving.C_nom", c_nom, "tokens/s", "S.cnom", [cid, *comp_ids], cfg, reason=note)
    out["epsilon"] = indicator("serving.epsilon", (c_eff / c_nom) if c_eff is not None else None, "ratio",
                               "S.epsilon", [cid, *comp_ids], cfg, reason=note)
    bars = [
        ("nominal", t_nominal, "t_nom: the step at nominal peaks"),
        ("roofline loss", pred["compute"] - t_nom["compute"], "isolated kernels below their nominal peak"),
        ("interconnect (mode 3)", pred["collective"] - t_nom["collective"], "isolated collectives vs the nominal link"),
        ("memory path / KV transfer (mode 2)", pred["transfer"] - t_nom["transfer"], "isolated transfers vs the nominal link"),
        ("straggler wait (mode 1)", straggle, "E[max_i compute_i] - E[mean_i compute_i] per step"),
        ("composition & noise (residual)", t_mean - t_pred - straggle,
         "measured mean step - T_pred - straggler wait: the cross-layer loss no isolated part shows"),
    ]
    waterfall = {"unit": f"s per {unit_name}",
                 "bars": [{"name": n, "seconds": s, "what": w} for n, s, w in bars],
                 "measured_mean_s": t_mean}
    if f > 0:
        waterfall["slo_misses_s"] = t_mean / f - t_mean
        waterfall["effective_s"] = t_mean / f
    else:
        waterfall["slo_misses_s"] = None
        waterfall["effective_s"] = None
        waterfall["slo_note"] = "no step met the SLO: C_eff = 0"
    out["waterfall"] = waterfall
    return clean(out)


def serving(view: RunView) -> list[dict]:
    ok = view.ok
    rows = ok[ok["probe"].isin((TP_STEP, *REQUESTS))]
    return [serving_case(view, r) for _, r in rows.iterrows()]


def headline(entries: list[dict]) -> dict:
    """The node's capacity figures: the TP decode step at the largest world size (the
    whole node serving), else a disaggregated request, else a colocated one."""

    def rank(e):
        ws = (e.get("params") or {}).get("world_size") or 1
        order = {TP_STEP: 0, "composite.disagg_request": 1, "composite.colocated_request": 2}
        return (order.get(e["probe"], 9), -int(ws) if isinstance(ws, (int, float)) else 0)

    usable = [e for e in entries if isinstance(e.get("C_nom"), dict) and e["C_nom"].get("value") is not None]
    if not usable:
        return {"C_eff": None, "C_nom": None, "epsilon": None,
                "reason": "no composite case with a measurable C_nom in this run"}
    best = sorted(usable, key=rank)[0]
    return {"from_case": best["case_id"], "C_eff": best["C_eff"]["value"], "C_nom": best["C_nom"]["value"],
            "epsilon": best["epsilon"]["value"], "unit": "tokens/s", "basis": best.get("basis")}
