"""Serving capacity and the coherence ratio (INDICATORS.md §2) of every composite case.

For a composite case (a tensor-parallel decode step, a disaggregated or colocated
request) the probe names the isolated cases it decomposes into (``extra.components``:
case id, count, role). From those, in the same run:

- ``T_pred`` = Σ count × p50 of each component inside the layers; ``T_meas`` = the
  composite's p50 as run (for requests: the service time, end-to-end minus queueing);
  κ = T_pred / T_meas. κ compares the truncated stack with its own parts.
- **Full model.** A composite runs ``layers`` L of the model's N layers and none of the
  parts outside them; its components of role ``outside`` (``decode.lm_head``,
  ``prefill.lm_head``: embedding lookup, final norm, LM head) are measured in isolation.
  Every figure judged against an SLO or a capacity uses the full-model unit: layer time
  × N / L + the outside parts (formulas.full_model_time); a request's queueing is
  recomputed for the full-model service times under the same arrivals. ``truncation``
  in each entry states L, N, the scale and how the outside parts were measured.
- ``C_nom`` = tokens per unit / t_nom with t_nom = Σ over phases (the prefill, each
  decode step) of max(FLOPs / N_compute, bytes / N_mem) + Σ collective bus bytes /
  N_link + Σ transfer bytes / N_link (N_host_link for transfers through the host), the
  layers' terms × N / L. The ranks of a CPU tensor-parallel group share the CPU's
  nominal (their shards' work adds up against one ceiling). Where a nominal figure is
  missing (CPU memory and links have none) the isolated ceiling measured in the same
  run stands in, and ``basis`` says so for each resource.
- ``C_eff`` = tokens per unit / mean full-model unit time × fraction of steps
  (requests) meeting the SLO; ε = C_eff / C_nom.
- Requests also get the field's serving metrics (vLLM benchmark_serving, MLPerf,
  DistServe; formulas.py): TTFT, TPOT, ITL and E2E percentiles, request and output-token
  throughput and goodput, all of the full model.
- The waterfall, in seconds per full-model unit, from t_nom to the mean unit time:
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


def _phase(comp: dict) -> str:
    """A component's phase: ``prefill`` or ``decode`` from its probe's family prefix."""
    return "prefill" if str(comp["row"]["probe"]).startswith("prefill.") else "decode"


def _truncation(row, comps: list[dict], problems: list[str]) -> dict:
    """How the truncated composite becomes the whole model (INDICATORS.md §2): layers
    run L, the model's N, scale N / L, and the isolated parts outside the layers per
    phase (seconds per prefill, per decode step), or why it cannot.

    Runs written before the full-model figure (no ``model_layers`` in extra) keep
    their truncated figures, scale 1, and say so."""
    extra, p = row["extra_d"], row["rparams"]
    layers = int(extra.get("layers") or p.get("layers") or 1)
    model_layers = extra.get("model_layers")
    steps = _decode_steps(row)
    out = {"layers_run": layers, "model_layers": model_layers, "decode_steps": steps}
    outside = [c for c in comps if c["role"] == "outside"]
    if model_layers is None:
        out.update(scale=1.0, outside_prefill_s=0.0, outside_decode_step_s=0.0, outside=[],
                   note="run by older code: the figures are of the truncated stack as run (no full-model scaling)")
        return out
    model_layers = int(model_layers)
    missing = [x for x in problems if "lm_head" in x]
    if missing:
        out["error"] = "parts outside the layers not measured: " + "; ".join(missing)[:300]
    pre = sum(c["count"] * float(c["row"]["p50_s"]) for c in outside if _phase(c) == "prefill")
    dec = sum(c["count"] * float(c["row"]["p50_s"]) for c in outside if _phase(c) == "decode")
    out.update(model_layers=model_layers, scale=model_layers / layers, outside_prefill_s=pre,
               outside_decode_step_s=dec / steps if steps else 0.0,
               outside=[{"case_id": c["case_id"], "count": c["count"], "p50_s": float(c["row"]["p50_s"])}
                        for c in outside],
               how=(f"{layers} of {model_layers} layers run; full model = measured layer time x {model_layers}/{layers} "
                    "+ embedding lookup, final norm and LM head measured in isolation (decode.lm_head, "
                    "prefill.lm_head p50)"))
    return out


def _decode_steps(row) -> int:
    """Decode steps of one unit: 1 for the TP step; a request's T − 1 (its prefill makes
    token 1), or T for runs of older code (where T decode steps made the T tokens)."""
    if row["probe"] == TP_STEP:
        return 1
    extra, p = row["extra_d"], row["rparams"]
    if extra.get("decode_steps") is not None:
        return int(extra["decode_steps"])
    return int(p.get("tokens") or 1)


def sharing_ranks(row) -> int:
    """Ranks that run at the same time on one device and so share its nominal: every
    rank of a CPU tensor-parallel group (the CPU ranks are processes on one host's
    cores, INDICATORS.md §2 "ranks that share one device share its nominal"); 1 for
    GPU groups (one device per rank) and for requests (one rank computes at a time)."""
    from harness.results import device_members

    members = device_members(row["device"])
    if row["probe"] != TP_STEP or len(members) < 2:
        return 1
    return len(members) if all(m.split(":")[0] == "cpu" for m in members) else 1


def _nominal_time(view: RunView, row, comps: list[dict], trunc: dict) -> tuple[dict, dict]:
    """t_nom of the full-model unit per role, and the basis (nominal or isolated
    stand-in) of each resource: compute = Σ over phases of count × max(FLOPs / N_compute,
    bytes / N_mem) (formulas.phase_roofline_time), the layers' work × N / L plus the
    parts outside the layers, × the ranks sharing the device."""
    nom = view.nominal(row["device"])
    from harness.collector.formulas import phase_roofline_time
    from harness.results import device_members

    first = device_members(row["device"])[0]
    basis = {}
    scale, share = float(trunc["scale"]), sharing_ranks(row)
    phases = {}
    for c in comps:
        if c["role"] not in ("compute", "outside"):
            continue
        f = scale if c["role"] == "compute" else 1.0
        ph = phases.setdefault(_phase(c), [0.0, 0.0])
        ph[0] += c["count"] * float(c["row"]["flops"] or 0) * f * share
        ph[1] += c["count"] * float(c["row"]["bytes"] or 0) * f * share
    steps = max(1, int(trunc["decode_steps"]))
    # Per phase: (flops, bytes, count) with the decode steps' work spread evenly over them.
    table = [(fl / (steps if name == "decode" else 1), by / (steps if name == "decode" else 1),
              steps if name == "decode" else 1) for name, (fl, by) in phases.items()]
    flops = sum(fl for fl, _ in phases.values())
    nbytes = sum(by for _, by in phases.values())
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
    t = {"phases": {name: {"flops": fl, "bytes": by, "count": steps if name == "decode" else 1}
                    for name, (fl, by) in phases.items()}}
    if (flops and not n_compute) or (nbytes and not n_mem) or not (flops or nbytes):
        t["compute"] = None
    else:
        t["compute"] = phase_roofline_time(table, n_compute or float("inf"), n_mem or float("inf"))
    coll, tran = 0.0, 0.0
    link, host_link = nom.get("link_Bps"), nom.get("host_link_Bps")
    for c in comps:
        r = c["row"]
        if c["role"] == "collective":
            bus = float(r["bytes"] or 0) * float(r.get("busbw_factor") or 1.0)
            if link:
                coll += c["count"] * bus / link * scale
            else:
                coll += c["count"] * float(r["p50_s"]) * scale
                basis["link"] = "isolated"
        elif c["role"] == "transfer":
            through_host = str(r["rparams"].get("path", "")) == "d2h2d"
            peak = host_link if through_host else link
            if peak:
                tran += c["count"] * float(r["bytes"] or 0) / peak * scale
            else:
                tran += c["count"] * float(r["p50_s"]) * scale
                basis["host_link" if through_host else "link"] = "isolated"
    basis.setdefault("link", "nominal" if link else "not used")
    if share > 1:
        basis["sharing"] = f"{share} ranks share the device's nominal"
    t["collective"], t["transfer"] = coll, tran
    return t, basis


def _step_frame(view: RunView, case_id: str):
    """One row per TP step: the slowest rank's duration (the step ends when the last rank
    does) and the step's round (0 for runs without rounds)."""
    s = view.samples_of(case_id)
    if "round" not in s.columns:
        s = s.assign(round=0)
    s = s.assign(round=s["round"].fillna(0))
    return s.groupby("rep", sort=True).agg(duration_s=("duration_s", "max"), round=("round", "first")).reset_index()


def _request_frame(view: RunView, case_id: str):
    """One row per request: the rank row that carries the request columns."""
    s = view.samples_of(case_id)
    if "ttft_s" not in s.columns:
        return None
    s = s[s["ttft_s"].notna()]
    return s.sort_values(["rep", "rank"]).groupby("rep", sort=True).first().reset_index()


def _pcts(values, name: str) -> dict:
    """p50, p90, p99 and mean of ``values`` as ``name``_p50_s … (vLLM reports mean,
    median and chosen percentiles of TTFT, TPOT, ITL and E2EL)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {}
    return {f"{name}_p50_s": float(np.median(v)), f"{name}_p90_s": float(np.percentile(v, 90)),
            f"{name}_p99_s": float(np.percentile(v, 99)), f"{name}_mean_s": float(v.mean())}


def request_figures(req, extra: dict, params: dict, trunc: dict, slo: dict) -> dict:
    """The full-model per-request figures of a request composite, and the serving
    metrics over them (vLLM benchmark_serving / MLPerf definitions, formulas.py).

    ``req``: one row per request with queue_s, prefill_s, kv_transfer_s, decode_s
    (truncated, as measured) in rep order; ``extra``: the case's extra (itl_s per
    request, interarrival_s of Poisson arrivals). Each phase's layer time × N/L plus
    the parts outside the layers; the queueing is recomputed for the full-model service
    times under the same arrivals (formulas.fifo_schedule): back to back, nobody
    queues. Runs of older code (scale 1, no parts outside) keep their recorded TTFT
    and TPOT."""
    from harness.collector.formulas import fifo_schedule, serving_rates

    n = len(req)
    tokens = int(params.get("tokens") or 1)
    batch = int(params.get("batch") or 1)
    scale = float(trunc["scale"])
    col = lambda name: req[name].fillna(0).to_numpy(dtype=float) if name in req else np.zeros(n)  # noqa: E731
    legacy = trunc.get("model_layers") is None
    o_pre, o_dec = float(trunc["outside_prefill_s"]), float(trunc["outside_decode_step_s"])
    steps = int(trunc["decode_steps"])
    prefill = col("prefill_s") * scale + o_pre
    kv = col("kv_transfer_s") * scale
    decode = col("decode_s") * scale + steps * o_dec
    service = prefill + kv + decode
    rounds = req["round"].fillna(0).to_numpy(dtype=int) if "round" in req else np.zeros(n, dtype=int)
    gaps_in = extra.get("itl_s")
    itl, itl_note = None, None
    if isinstance(gaps_in, list) and gaps_in:
        # extra is the last round's (runner.pool_rounds): its gaps are that round's requests.
        last = rounds == rounds.max()
        if len(gaps_in) == n or len(gaps_in) == int(last.sum()):
            itl = [list(np.asarray(g, dtype=float) * scale + o_dec) for g in gaps_in]
            if len(gaps_in) != n:
                itl_note = f"ITL from the last round's {len(gaps_in)} requests (extra keeps the last round's gaps)"
    if params.get("arrival") == "poisson" and extra.get("interarrival_s"):
        # Every round replays the same seeded arrivals from its own start.
        count = max(int(np.bincount(rounds).max()), 1)
        recorded = np.asarray(extra["interarrival_s"], dtype=float)
        if len(recorded) < count and extra.get("arrival_seed") is not None and params.get("rate"):
            recorded = np.random.default_rng(int(extra["arrival_seed"])).exponential(1.0 / float(params["rate"]), count)
        queue, duration = np.zeros(n), 0.0
        for r in np.unique(rounds):
            idx = np.flatnonzero(rounds == r)
            k = min(len(idx), len(recorded))
            arrivals = np.cumsum(recorded[:k])
            start, done = fifo_schedule(arrivals, service[idx[:k]])
            queue[idx[:k]] = start - arrivals
            duration += float(done[-1] - arrivals[0]) if k else 0.0
        queue_how = "recomputed for the full-model service times under the recorded Poisson arrivals"
    else:
        queue = np.zeros(n) if not legacy else col("queue_s")
        duration = float(service.sum() + (queue.sum() if legacy else 0.0))
        queue_how = "back to back: the next request arrives when the previous one is done"
    if legacy:
        ttft = req["ttft_s"].to_numpy(dtype=float)
        tpot = req["tpot_s"].to_numpy(dtype=float)
        e2e = req["duration_s"].to_numpy(dtype=float)
        service = e2e - queue
    else:
        ttft = queue + prefill + kv
        e2e = ttft + decode
        tpot = (e2e - ttft) / (tokens - 1) if tokens > 1 else np.full(n, np.nan)
    out = {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "service_s": service, "queue_s": queue,
           "itl_s": itl, "itl_note": itl_note, "queue_how": queue_how, "rounds": rounds}
    out["rates"] = serving_rates(ttft, tpot, tokens * batch, duration, slo.get("ttft_s"), slo.get("tpot_s")) \
        if duration > 0 else None
    return out


def _energy_value(row, column: str) -> float | None:
    """A finite number from an energy column of a cases row; None where the column is
    missing (runs made before energy accounting), null or not finite."""
    from harness.collector.formulas import finite

    return finite(row.get(column)) if hasattr(row, "get") else None


def _energy_text(row, column: str) -> str | None:
    """A text energy column (method, scope, reason) of a cases row; None when absent or null."""
    v = row.get(column) if hasattr(row, "get") else None
    return v if isinstance(v, str) and v else None


def energy_missing_reason(row) -> str:
    """Why a case has no energy figure: its ``energy_reason``, else that the run
    predates the energy columns (cases.parquet without ``energy_j``), else that the
    figure is null without a recorded reason."""
    if _energy_text(row, "energy_reason"):
        return str(row.get("energy_reason"))
    if "energy_j" not in getattr(row, "index", row):
        return "the run predates energy accounting (no energy_j column in cases.parquet)"
    return "energy_j is null and no energy_reason was recorded"


def tokens_per_rep(probe: str, params: dict, extra: dict | None = None) -> float:
    """Output tokens of one timed repetition of a serving composite.

    TP decode step: one repetition is one decode step of ``batch`` sequences, so
    ``tokens_per_step`` from the case's extra, else ``batch``. A request: one
    repetition is one request of ``batch`` sequences, each generating ``tokens``
    output tokens (probes/composite.py: the prefill makes token 1, T − 1 decode steps
    the rest), so ``tokens`` × ``batch``. Raises ValueError for another probe."""
    extra = extra or {}
    if probe == TP_STEP:
        return float(extra.get("tokens_per_step") or params.get("batch") or 1)
    if probe in REQUESTS:
        return float(params.get("tokens") or 1) * float(params.get("batch") or 1)
    raise ValueError(f"{probe} is not a serving composite")


def energy_figures(view: RunView, row, comps: list[dict], trunc: dict, tokens: float) -> dict:
    """J per token and tokens per J of a serving composite (INDICATORS.md §2, energy).

    ``row["energy_j"]`` is joules per timed repetition summed over the case's devices
    (cases.parquet; NVML's total-energy counter, an integral of NVML power samples, or
    RAPL). One repetition is one unit of ``tokens`` output tokens (:func:`tokens_per_rep`):
    J/token as run = energy_j / tokens (formula ``E.j_per_token``). For a request the unit
    is the whole request, so the prefill, the KV transfer and every decode step are in
    it. The full-model figure scales the layers' energy like their time (INDICATORS.md
    §2 full model): energy_j × N / L + Σ count × energy_j of the components outside the
    layers (``decode.lm_head``, ``prefill.lm_head``); runs without ``model_layers`` keep
    the figure as run (scale 1). tokens/J = 1 / (J/token) (``E.tokens_per_j``).

    Returns {j_per_token, tokens_per_j} (indicators, not measurable with the reason
    where energy_j is null or an outside part has no energy) and ``energy`` (the
    per-unit joules, method, scope, what the unit includes)."""
    cfg, cid = view.cfg, row["case_id"]
    energy = _energy_value(row, "energy_j")
    method, scope = _energy_text(row, "energy_method"), _energy_text(row, "energy_scope")
    includes = ("one decode step of the batch (every rank's device summed)" if row["probe"] == TP_STEP else
                "the whole request: prefill, KV transfer and every decode step (every device of the case summed)")
    detail = {"energy_method": method, "energy_scope": scope, "unit_includes": includes, "tokens_per_unit": tokens}
    if energy is None or energy <= 0 or tokens <= 0:
        reason = (energy_missing_reason(row) if energy is None
                  else f"energy_j = {energy:g} J per repetition: no positive energy was measured")
        return {"energy": {**detail, "energy_j_per_unit": None, "reason": reason},
                "j_per_token": not_measurable("serving.j_per_token", "J/token", "E.j_per_token", reason, cfg, [cid]),
                "tokens_per_j": not_measurable("serving.tokens_per_j", "tokens/J", "E.tokens_per_j", reason, cfg,
                                               [cid])}
    as_run = energy / tokens
    scale = float(trunc.get("scale") or 1.0)
    outside = [c for c in comps if c["role"] == "outside"]
    missing = [c["case_id"] for c in outside if _energy_value(c["row"], "energy_j") is None]
    note = None
    if trunc.get("model_layers") is None:
        full = as_run
        note = "run by older code: J/token of the truncated stack as run (no full-model scaling)"
    elif missing:
        full = None
    else:
        full = (energy * scale + sum(c["count"] * _energy_value(c["row"], "energy_j") for c in outside)) / tokens
    cases = [cid, *[c["case_id"] for c in outside]]
    how = (f"energy_j per {('step' if row['probe'] == TP_STEP else 'request')} x {scale:g} (model layers / layers run) "
           "+ count x energy_j of the parts outside the layers, / tokens per unit")
    if full is None:
        reason = ("no energy for the parts outside the layers: "
                  + "; ".join(f"{m}: {energy_missing_reason(view.row(m))}" for m in missing))[:400]
        jpt = not_measurable("serving.j_per_token", "J/token", "E.j_per_token", reason, cfg, cases)
        jpt["as_run"] = as_run
        tpj = not_measurable("serving.tokens_per_j", "tokens/J", "E.tokens_per_j", reason, cfg, cases)
        tpj["as_run"] = 1.0 / as_run
    else:
        jpt = indicator("serving.j_per_token", full, "J/token", "E.j_per_token", cases, cfg, reason=note,
                        as_run=as_run, how=how, **detail)
        tpj = indicator("serving.tokens_per_j", 1.0 / full, "tokens/J", "E.tokens_per_j", cases, cfg, reason=note,
                        as_run=1.0 / as_run, how=how, **detail)
    return {"energy": {**detail, "energy_j_per_unit": energy,
                       "avg_power_w": _energy_value(row, "avg_power_w"), "j_per_token_as_run": as_run},
            "j_per_token": jpt, "tokens_per_j": tpj}


def serving_case(view: RunView, row) -> dict:
    cfg = view.cfg
    cid = row["case_id"]
    p = row["rparams"]
    model = p.get("model")
    slo = slo_for(cfg, model)
    out: dict = {"case_id": cid, "probe": row["probe"], "device": row["device"], "params": p, "slo": slo}
    comps, problems = _components(view, row)
    trunc = _truncation(row, comps, problems)
    out["truncation"] = {k: v for k, v in trunc.items() if k != "error"}
    if trunc.get("error"):
        reason = trunc["error"]
        out["error"] = reason
        for key, unit, formula in (("C_eff", "tokens/s", "S.ceff"), ("kappa", "ratio", "S.kappa"),
                                   ("C_nom", "tokens/s", "S.cnom"), ("epsilon", "ratio", "S.epsilon")):
            out[key] = not_measurable(f"serving.{key}", unit, formula, reason, cfg, [cid])
        out["waterfall"] = None
        return clean(out)
    scale = float(trunc["scale"])
    is_tp = row["probe"] == TP_STEP
    # Measured unit: TP = slowest rank per step; requests = service time per request
    # (end-to-end minus queueing). T_meas (κ) is the truncated stack as run; the SLOs,
    # C_eff and the waterfall use the full-model unit.
    if is_tp:
        reps = _step_frame(view, cid)
        measured = reps["duration_s"].to_numpy(dtype=float)
        unit_rounds = reps["round"].to_numpy(dtype=int)
        t_meas_p50 = float(row["p50_s"])
        steps = measured * scale + float(trunc["outside_decode_step_s"])
        tokens = tokens_per_rep(row["probe"], p, row["extra_d"])
        meets = steps <= slo.get("tpot_s", np.inf)
        unit_name = "step"
        out.update(_pcts(steps, "tpot"))
    else:
        req = _request_frame(view, cid)
        if req is None or not len(req):
            out["error"] = "no per-request columns (ttft_s) in the samples"
            return out
        queue = req["queue_s"].fillna(0).to_numpy(dtype=float) if "queue_s" in req else np.zeros(len(req))
        measured = req["duration_s"].to_numpy(dtype=float) - queue
        t_meas_p50 = float(np.median(measured))
        fig = request_figures(req, row["extra_d"], p, trunc, slo)
        steps = fig["service_s"]
        unit_rounds = fig["rounds"]
        if fig["itl_note"]:
            out["itl_note"] = fig["itl_note"]
        tokens = tokens_per_rep(row["probe"], p, row["extra_d"])
        meets = (fig["ttft_s"] <= slo.get("ttft_s", np.inf)) & (
            np.nan_to_num(fig["tpot_s"], nan=0.0) <= slo.get("tpot_s", np.inf))
        unit_name = "request"
        for name in ("ttft", "tpot", "e2e", "queue"):
            out.update(_pcts(fig[f"{name}_s"], name))
        if fig["itl_s"] is not None:
            out.update(_pcts([g for gaps in fig["itl_s"] for g in gaps], "itl"))
        out["queue_how"] = fig["queue_how"]
        if "kv_transfer_s" in req:
            out["kv_transfer_p50_s"] = float(req["kv_transfer_s"].median()) * scale
        out["per_request"] = {"ttft_s": np.asarray(fig["ttft_s"]).tolist(), "tpot_s": np.asarray(fig["tpot_s"]).tolist(),
                              "e2e_s": np.asarray(fig["e2e_s"]).tolist(), "meets_slo": meets.tolist()}
        rates = fig["rates"]
        if rates:
            out["request_throughput"] = indicator("serving.request_throughput", rates["request_throughput"],
                                                  "requests/s", "S.request_throughput", [cid], cfg,
                                                  duration_s=rates["duration_s"], requests=rates["requests"])
            out["output_throughput"] = indicator("serving.output_throughput", rates["output_throughput"],
                                                 "tokens/s", "S.output_throughput", [cid], cfg)
            out["goodput"] = indicator("serving.goodput", rates["goodput"], "requests/s", "S.goodput", [cid], cfg,
                                       good_requests=rates["good_requests"], requests=rates["requests"],
                                       slo=slo)
    t_mean = float(steps.mean())
    f = float(meets.mean()) if len(meets) else float("nan")
    out.update(unit=unit_name, tokens_per_unit=tokens, T_meas_p50_s=t_meas_p50,
               T_meas_p99_s=float(np.percentile(measured, 99)), T_mean_s=float(measured.mean()),
               full_p50_s=float(np.median(steps)), full_p99_s=float(np.percentile(steps, 99)), full_mean_s=t_mean,
               slo_fraction=f)
    c_eff = tokens / t_mean * f if t_mean > 0 else None
    from harness.collector.formulas import capacity_band

    band = list(capacity_band(steps, meets, tokens, groups=unit_rounds)) if t_mean > 0 else None
    out["C_eff"] = indicator("serving.C_eff", c_eff, "tokens/s", "S.ceff", [cid], cfg,
                             throughput_tokens_per_s=tokens / t_mean if t_mean > 0 else None,
                             noise_band=band,
                             noise_band_how=("95 % bootstrap over the units (steps or requests), nested in the "
                                             f"{len(np.unique(unit_rounds))} round(s): rounds, then units"))
    out.update(energy_figures(view, row, comps, trunc, tokens))
    # Straggler wait from per-rank compute time (TP with more than one rank).
    straggle = 0.0
    wide = wide_by_rank(view.samples_of(cid), "compute_s") if is_tp else np.empty((0, 0))
    if wide.size and wide.shape[1] > 1:
        straggle = float(wide.max(axis=1).mean() - wide.mean(axis=1).mean()) * scale
    if problems:
        reason = "; ".join(problems)[:400]
        out["T_pred_s"] = None
        out["kappa"] = not_measurable("serving.kappa", "ratio", "S.kappa", reason, cfg, [cid])
        out["C_nom"] = not_measurable("serving.C_nom", "tokens/s", "S.cnom", reason, cfg, [cid])
        out["epsilon"] = not_measurable("serving.epsilon", "ratio", "S.epsilon", reason, cfg, [cid])
        out["waterfall"] = None
        return clean(out)
    inside = [c for c in comps if c["role"] != "outside"]
    pred = {role: sum(c["count"] * float(c["row"]["p50_s"]) for c in inside if c["role"] == role)
            for role in ("compute", "collective", "transfer")}
    t_pred = sum(pred.values())
    comp_ids = [c["case_id"] for c in comps]
    out["T_pred_s"] = t_pred
    out["T_pred_parts_s"] = pred
    out["components"] = [{"case_id": c["case_id"], "count": c["count"], "role": c["role"],
                          "p50_s": float(c["row"]["p50_s"])} for c in comps]
    out["kappa"] = indicator("serving.kappa", t_pred / t_meas_p50 if t_meas_p50 > 0 else None, "ratio",
                             "S.kappa", [cid, *[c["case_id"] for c in inside]], cfg)
    t_nom, basis = _nominal_time(view, row, comps, trunc)
    out["basis"] = basis
    if t_nom["compute"] is None:
        reason = "no compute or memory ceiling for the device (neither nominal nor isolated in this run)"
        out["C_nom"] = not_measurable("serving.C_nom", "tokens/s", "S.cnom", reason, cfg, [cid])
        out["epsilon"] = not_measurable("serving.epsilon", "ratio", "S.epsilon", reason, cfg, [cid])
        out["waterfall"] = None
        return clean(out)
    t_nominal = t_nom["compute"] + t_nom["collective"] + t_nom["transfer"]
    out["nominal_phases"] = t_nom["phases"]
    c_nom = tokens / t_nominal
    substituted = [k for k, v in basis.items() if v == "isolated"]
    note = (f"isolated ceilings stand in for missing nominal figures: {', '.join(substituted)}"
            if substituted else None)
    out["C_nom"] = indicator("serving.C_nom", c_nom, "tokens/s", "S.cnom", [cid, *comp_ids], cfg, reason=note)
    out["epsilon"] = indicator("serving.epsilon", (c_eff / c_nom) if c_eff is not None else None, "ratio",
                               "S.epsilon", [cid, *comp_ids], cfg, reason=note)
    # The waterfall of the full-model unit: the layers' isolated parts × N / L plus the
    # parts outside the layers, so the bars still sum to the (full-model) mean exactly.
    outside_s = sum(c["count"] * float(c["row"]["p50_s"]) for c in comps if c["role"] == "outside")
    full_pred = {"compute": pred["compute"] * scale + outside_s, "collective": pred["collective"] * scale,
                 "transfer": pred["transfer"] * scale}
    bars = [
        ("nominal", t_nominal, "t_nom: the step at nominal peaks"),
        ("roofline loss", full_pred["compute"] - t_nom["compute"], "isolated kernels below their nominal peak"),
        ("interconnect (mode 3)", full_pred["collective"] - t_nom["collective"],
         "isolated collectives vs the nominal link"),
        ("memory path / KV transfer (mode 2)", full_pred["transfer"] - t_nom["transfer"],
         "isolated transfers vs the nominal link"),
        ("straggler wait (mode 1)", straggle, "E[max_i compute_i] - E[mean_i compute_i] per step"),
        ("composition & noise (residual)", t_mean - sum(full_pred.values()) - straggle,
         "measured mean step - T_pred - straggler wait: the cross-layer loss no isolated part shows"),
    ]
    unit_text = f"s per {unit_name}" + (f" (full model: {trunc['layers_run']} of {trunc['model_layers']} layers run, "
                                        f"x {scale:g} + parts outside the layers)" if trunc.get("how") else "")
    waterfall = {"unit": unit_text,
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


def serving_rows(entries: list[dict]) -> list[dict]:
    """One flat row per serving composite: the truncation (layers run of the model's,
    scale) and the full-model serving metrics (TTFT, TPOT, ITL, E2E p50/p99, request and
    output-token throughput, goodput, SLO-met share, J/token and tokens/J of the full
    model) as indicators.json holds them.
    Missing figures (older runs, TP steps have no TTFT) are None."""
    rows = []
    for e in entries:
        tr = e.get("truncation") or {}
        layers = (f"{tr.get('layers_run')}/{tr.get('model_layers')} (x{tr.get('scale'):g})"
                  if tr.get("model_layers") else f"{tr.get('layers_run', '?')} (as run)")
        row = {"case_id": e.get("case_id"), "unit": e.get("unit"), "layers": layers}
        for name in ("ttft", "tpot", "itl", "e2e"):
            for q in ("p50", "p99"):
                row[f"{name}_{q}_s"] = e.get(f"{name}_{q}_s")
        for key in ("request_throughput", "output_throughput", "goodput"):
            row[key] = (e.get(key) or {}).get("value") if isinstance(e.get(key), dict) else None
        row["slo_fraction"] = e.get("slo_fraction")
        for key in ("j_per_token", "tokens_per_j"):
            row[key] = (e.get(key) or {}).get("value") if isinstance(e.get(key), dict) else None
        rows.append(row)
    return rows
