"""Indicators of instability modes 1–4 (INDICATORS.md §3) from one run.

Every function returns ``{indicator_name: indicator}``; an indicator whose inputs the
run lacks is ``not measurable`` with the reason, never 0 or 1 in its place. Where one
indicator has a value per case, ``value`` is the summary named in ``summary`` and
``per_case`` lists the rest.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from harness.collector import formulas as F
from harness.collector.common import RunView, indicator, not_measurable, wide_by_rank
from harness.collector.ladder import isolated_memory
from harness.collector.serving import TP_STEP
from harness.results import device_members

PAIRWISE = "collective.pairwise"  # the link-matrix probe (probes/collective.py)
# Parameters that name a size: a size sweep varies one of these and nothing else.
SIZE_KEYS = ("size_bytes", "size_mib", "n", "batch", "ctx", "seq", "reads", "mnk", "prompt", "tokens")


def _key(params: dict, drop: tuple = ()) -> str:
    return json.dumps({k: v for k, v in sorted(params.items()) if k not in drop}, sort_keys=True, default=str)


def extreme(ind_id: str, items: list[dict], unit: str, formula: str, cfg: dict, *, worst, summary: str,
            empty_reason: str, detail: str = "per_case") -> dict:
    """The indicator whose value is the worst (``worst`` = max or min) of per-case
    ``items`` ({"value", "case_id" or "case_ids", ...}), all of them kept under
    ``detail``; not measurable with ``empty_reason`` when there are none."""
    if not items:
        return not_measurable(ind_id, unit, formula, empty_reason, cfg)
    pick = worst(items, key=lambda c: c["value"])
    cases = [c for item in items for c in item.get("case_ids") or [item["case_id"]]]
    return indicator(ind_id, pick["value"], unit, formula, cases, cfg, summary=summary, **{detail: items})


# -- mode 1 ----------------------------------------------------------------------------
def mode1(view: RunView) -> dict:
    cfg = view.cfg
    out = {}
    # Straggler penalty over lockstep steps of multi-rank TP composites.
    per_case = []
    for _, row in view.by_probe(TP_STEP).iterrows():
        wide = wide_by_rank(view.samples_of(row["case_id"]), "compute_s")
        if wide.size and wide.shape[1] > 1:
            rank_p50 = np.median(wide, axis=0)
            per_case.append({"case_id": row["case_id"], "value": F.straggler_penalty(wide),
                             "steps": int(wide.shape[0]), "ranks": int(wide.shape[1]),
                             "rank_compute_p50_s": rank_p50.tolist(),
                             "rank_asymmetry": float(rank_p50.max() / rank_p50.min()) if rank_p50.min() > 0 else None})
    out["straggler_penalty"] = extreme(
        "mode1.straggler_penalty", per_case, "fraction of step", "F1.straggler", cfg, worst=max,
        summary="largest over cases",
        empty_reason="no multi-rank tensor-parallel composite with per-rank compute times in this run")
    out["path_asymmetry"] = _path_asymmetry(view)
    out.update(_drift(view))
    return out


def _path_asymmetry(view: RunView) -> dict:
    cfg = view.cfg
    ok = view.ok
    single = ok[[len(device_members(d)) == 1 for d in ok["device"]]] if len(ok) else ok
    groups = defaultdict(list)
    for _, r in single.iterrows():
        groups[(r["probe"], _key(r["params_d"]))].append(r)
    found = []
    for (probe, _), rows in groups.items():
        devs = {r["device"] for r in rows}
        if len(devs) < 2:
            continue
        slow = max(rows, key=lambda r: r["p50_s"])
        fast = min(rows, key=lambda r: r["p50_s"])
        res_p50 = F.asymmetry(slow["p50_s"], fast["p50_s"], _peak(view, slow), _peak(view, fast))
        res_p99 = F.asymmetry(slow["p99_s"], fast["p99_s"], _peak(view, slow), _peak(view, fast))
        found.append({"case_ids": [slow["case_id"], fast["case_id"]], "p50_ratio": res_p50["measured"],
                      "p99_ratio": res_p99["measured"], "nominal_ratio": res_p50["predicted"],
                      "beyond_nominal": res_p50["beyond_nominal"] or res_p50["measured"]})
    if not found:
        return not_measurable("mode1.path_asymmetry", "ratio", "F1.asymmetry",
                              "no case ran on two or more devices in this run", cfg)
    worst = max(found, key=lambda c: c["beyond_nominal"])
    return indicator("mode1.path_asymmetry", worst["beyond_nominal"], "ratio", "F1.asymmetry",
                     [c for f in found for c in f["case_ids"]], cfg, summary="largest over cases", per_case=found)


def _peak(view: RunView, row) -> float | None:
    nom = view.nominal(row["device"])
    if row.get("bound") == "compute":
        return (nom.get("compute_flops") or {}).get(str(row.get("dtype")))
    if row.get("bound") in ("memory",):
        return nom.get("memory_Bps")
    return nom.get("link_Bps")


def _drift(view: RunView) -> dict:
    cfg = view.cfg
    min_span = float(cfg.get("drift_min_span_s", 5.0))
    min_n = int(cfg.get("drift_min_samples", 10))
    drifts, gaps, alarms, used = [], [], [], []
    for _, row in view.ok.iterrows():
        if row["probe"] == "overhead.timer":
            continue  # its samples are clock-read gaps, not repetitions of work
        reps = view.per_rep(row["case_id"])
        reps = reps[np.isfinite(reps["t_start_s"])]
        # Drift is within one measurement window: each round is its own window (rounds
        # run at different times, so a level shift between them is run-to-run variance,
        # which compare measures, not drift). A case's drift is its largest within-round
        # slope (significant ones first); its change points are summed over rounds.
        segments = [seg for _, seg in reps.groupby("round", sort=True)
                    if len(seg) >= min_n and seg["t_start_s"].max() - seg["t_start_s"].min() >= min_span]
        if not segments:
            continue
        used.append(row["case_id"])
        per_round = [{"round": int(seg["round"].iloc[0]),
                      **F.drift_pct_per_min(seg["t_start_s"].to_numpy(), seg["duration_s"].to_numpy())}
                     for seg in segments]
        sig_rounds = [d for d in per_round if d["significant"]]
        d = max(sig_rounds or per_round, key=lambda d: abs(d["pct_per_min"]))
        drifts.append({"case_id": row["case_id"], **d, "rounds_fitted": len(per_round)})
        n_alarms, at = 0, []
        for seg in segments:
            cps = F.cusum_alarms(seg["duration_s"].to_numpy())
            n_alarms += len(cps)
            at += [(int(seg["round"].iloc[0]), i) for i in cps]
        if n_alarms:
            alarms.append({"case_id": row["case_id"], "alarms": n_alarms,
                           "at_reps": [i for _, i in at[:20]], "at_rounds": [r for r, _ in at[:20]]})
        s = view.samples_of(row["case_id"])
        if s["rank"].nunique() > 1:
            g = s.groupby("rep").agg(t=("t_start_s", "min"), hi=("duration_s", "max"), lo=("duration_s", "min"))
            g = g[np.isfinite(g["t"])]
            if len(g) >= min_n:
                gap = (g["hi"] - g["lo"]).to_numpy()
                med = float(np.median(g["hi"]))
                slope, _, lo, hi = F.theil_sen(g["t"].to_numpy(), gap)
                scale = 60.0 / med * 100.0 if med > 0 else float("nan")
                gaps.append({"case_id": row["case_id"], "pct_per_min": slope * scale, "low": lo * scale,
                             "high": hi * scale, "significant": bool(lo > 0 or hi < 0)})
    reason = (f"no case has ≥ {min_n} repetitions spanning ≥ {min_span:g} s "
              "(raise the timing budget, or drift_min_span_s in the indicators config)")
    out = {}
    if drifts:
        sig = [d for d in drifts if d["significant"]]
        worst = max(sig or drifts, key=lambda d: abs(d["pct_per_min"]))
        out["drift"] = indicator("mode1.drift", abs(worst["pct_per_min"]) if sig else 0.0, "%/minute", "F1.drift",
                                 used, cfg, summary="largest |slope| whose 95 % interval excludes 0 (0 if none)",
                                 worst_case=worst["case_id"], significant_cases=len(sig), per_case=drifts)
    else:
        out["drift"] = not_measurable("mode1.drift", "%/minute", "F1.drift", reason, cfg)
    if gaps:
        sig = [g for g in gaps if g["significant"]]
        worst = max(sig or gaps, key=lambda g: abs(g["pct_per_min"]))
        out["gap_drift"] = indicator("mode1.gap_drift", abs(worst["pct_per_min"]) if sig else 0.0, "%/minute",
                                     "F1.gap_drift", [g["case_id"] for g in gaps], cfg,
                                     summary="largest significant |slope| (0 if none)", per_case=gaps)
    else:
        out["gap_drift"] = not_measurable("mode1.gap_drift", "%/minute", "F1.gap_drift",
                                          "no multi-rank case with enough timed steps", cfg)
    if used:
        out["change_points"] = indicator("mode1.change_points", float(sum(a["alarms"] for a in alarms)), "count",
                                         "F1.cusum", used, cfg, per_case=alarms)
    else:
        out["change_points"] = not_measurable("mode1.change_points", "count", "F1.cusum", reason, cfg)
    return out


# -- mode 2 ----------------------------------------------------------------------------
def mode2(view: RunView) -> dict:
    cfg = view.cfg
    ok = view.ok
    out = {}
    decode = ok[(ok["family"] == "decode") & (ok["bound"] == "memory")]
    eff, illusion = [], []
    for _, r in decode.iterrows():
        i_mem, i_case = isolated_memory(view, r["device"])
        nom = view.nominal(r["device"])
        if i_mem:
            eff.append({"case_id": r["case_id"], "value": r["bytes_per_s"] / i_mem, "I_mem_case": i_case,
                        "vs_nominal": r["bytes_per_s"] / nom["memory_Bps"] if nom.get("memory_Bps") else None})
        busy = r.get("gpu_util_pct") if str(r["device"]).startswith("cuda") else r.get("cpu_util_pct")
        peak = (nom.get("compute_flops") or {}).get(str(r.get("dtype")))
        if busy is not None and np.isfinite(busy) and peak and r["flops_per_s"]:
            frac = r["flops_per_s"] / peak
            illusion.append({"case_id": r["case_id"], "value": (busy / 100.0) / frac, "busy_pct": busy,
                             "achieved_compute_fraction": frac})
    if eff:
        vals = [e["value"] for e in eff]
        out["decode_memory_efficiency"] = indicator(
            "mode2.decode_memory_efficiency", float(np.median(vals)), "fraction of I_mem", "F2.decode_mem_eff",
            [e["case_id"] for e in eff], cfg, summary="median over memory-bound decode cases",
            worst=min(eff, key=lambda e: e["value"]), per_case=eff)
    else:
        out["decode_memory_efficiency"] = not_measurable(
            "mode2.decode_memory_efficiency", "fraction of I_mem", "F2.decode_mem_eff",
            "needs memory-bound decode cases and an isolated memory probe on the same device", cfg)
    if illusion:
        out["utilization_illusion"] = indicator(
            "mode2.utilization_illusion", float(np.median([e["value"] for e in illusion])), "ratio",
            "F2.util_illusion", [e["case_id"] for e in illusion], cfg, summary="median over decode cases",
            worst=max(illusion, key=lambda e: e["value"]), per_case=illusion)
    else:
        out["utilization_illusion"] = not_measurable(
            "mode2.utilization_illusion", "ratio", "F2.util_illusion",
            "needs decode cases with busy telemetry and a nominal compute peak", cfg)
    out["kv_transfer_share"] = _kv_share(view)
    # decode.attention's paged cases may name their kernel; each pairs with the
    # contiguous case (which has only kernel=default), so every kernel has a penalty.
    out["layout_penalty"] = _pair_ratio(view, "layout", "contiguous", "paged", "mode2.layout_penalty",
                                         "F2.layout_penalty", ("transfer.kv", "transfer.kv_sendrecv", "decode.attention"),
                                         bad_only=("kernel",))
    out["pinning_penalty"] = _pair_ratio(view, "memory", "pinned", "pageable", "mode2.pinning_penalty",
                                         "F2.pinning_penalty", ("transfer.h2d", "transfer.d2h"), largest_only=True)
    out["direction_asymmetry"] = _direction(view)
    return out


def _kv_share(view: RunView) -> dict:
    cfg = view.cfg
    per_case = []
    for _, r in view.by_probe("composite.disagg_request").iterrows():
        s = view.samples_of(r["case_id"])
        if {"kv_transfer_s", "ttft_s"} <= set(s.columns):
            s = s[s["ttft_s"].notna() & s["kv_transfer_s"].notna() & (s["ttft_s"] > 0)]
            if len(s):
                per_case.append({"case_id": r["case_id"], "value": float(np.median(s["kv_transfer_s"] / s["ttft_s"]))})
    return extreme("mode2.kv_transfer_share", per_case, "fraction of TTFT", "F2.kv_share", cfg, worst=max,
                   summary="largest over cases",
                   empty_reason="no disaggregated-request composite with kv_transfer_s and ttft_s in this run")


def _pair_ratio(view: RunView, key: str, good: str, bad: str, ind_id: str, formula: str, probes: tuple,
                largest_only: bool = False, bad_only: tuple = ()) -> dict:
    """Bandwidth with ``key=good`` over bandwidth with ``key=bad``, everything else equal.

    ``bad_only``: parameters that vary among the ``bad`` cases alone (decode.attention's
    paged ``kernel``): they are left out of the match, so each ``bad`` case pairs with
    the ``good`` case equal in everything else (a good case with a non-default value of
    them is skipped by its probe, so the ok good case is unique). A pair's item then
    names them under ``params``. Rows without them (older runs) pair as before."""
    cfg = view.cfg
    ok = view.ok[view.ok["probe"].isin(probes)]
    goods, bads = {}, defaultdict(list)
    for _, r in ok.iterrows():
        val = r["params_d"].get(key)
        where = (r["probe"], r["device"], _key(r["params_d"], (key, *bad_only)))
        if val == good:
            goods.setdefault(where, r)
        elif val == bad:
            bads[where].append(r)
    found = []
    for where, rows in bads.items():
        g = goods.get(where)
        for b in rows:
            if g is not None and b["bytes_per_s"]:
                item = {"case_ids": [g["case_id"], b["case_id"]], "probe": where[0], "size": g["bytes"],
                        "value": float(g["bytes_per_s"] / b["bytes_per_s"])}
                named = {k: b["params_d"][k] for k in bad_only if k in b["params_d"]}
                if named:
                    item["params"] = named
                found.append(item)
    if largest_only and found:
        by_probe = defaultdict(list)
        for f in found:
            by_probe[f["probe"]].append(f)
        found = [max(v, key=lambda f: f["size"]) for v in by_probe.values()]
    empty = f"no pair of cases differing only in {key} ({good} vs {bad}) among {', '.join(probes)}"
    if bad_only and any("params" in f for f in found):
        return _best_kernel_ratio(ind_id, formula, found, cfg, empty)
    return extreme(ind_id, found, "ratio", formula, cfg, worst=max,
                   summary="largest over pairs" + (" (largest size)" if largest_only else ""), detail="per_pair",
                   empty_reason=empty)


def _best_kernel_ratio(ind_id: str, formula: str, found: list[dict], cfg: dict, empty: str) -> dict:
    """The penalty of a layout where several kernels read it (decode.attention's paged
    ``kernel``): what the layout costs is what the best kernel for it pays, since a
    serving engine reads the block table in place rather than copying the cache first
    (issue 16). So each shape (one contiguous case) takes the smallest ratio over its
    kernels, and the indicator is the largest of those over shapes. Every pair stays
    under ``per_pair`` (each marked ``best`` or not), and ``per_kernel`` gives each
    kernel's largest ratio over shapes, so gather_sdpa's copy is still visible."""
    by_shape = defaultdict(list)
    for f in found:
        by_shape[f["case_ids"][0]].append(f)
    best = []
    for pairs in by_shape.values():
        pick = min(pairs, key=lambda f: f["value"])
        for f in pairs:
            f["best"] = f is pick
        best.append(pick)
    per_kernel = defaultdict(float)
    for f in found:
        name = str((f.get("params") or {}).get("kernel", "default"))
        per_kernel[name] = max(per_kernel[name], f["value"])
    if not best:
        return not_measurable(ind_id, "ratio", formula, empty, cfg)
    pick = max(best, key=lambda f: f["value"])
    cases = [c for f in found for c in f["case_ids"]]
    return indicator(ind_id, pick["value"], "ratio", formula, cases, cfg,
                     summary="largest over shapes of the best kernel's ratio", per_pair=found,
                     per_kernel=dict(per_kernel), best_kernel=(pick.get("params") or {}).get("kernel", "default"))


def _direction(view: RunView) -> dict:
    cfg = view.cfg
    ok = view.ok
    rows = ok[ok["probe"].isin(["transfer.h2d", "transfer.d2h"])]
    rows = rows[[p.get("memory") == "pinned" for p in rows["params_d"]]] if len(rows) else rows
    if not len(rows):
        return not_measurable("mode2.direction_asymmetry", "ratio", "F2.direction_asymmetry",
                              "no pinned host<->device copies in this run (needs a GPU)", cfg)
    found = []
    for (device, size), g in rows.groupby([rows["device"], rows["bytes"]]):
        if set(g["probe"]) == {"transfer.h2d", "transfer.d2h"}:
            bw = g.set_index("probe")["bytes_per_s"]
            found.append({"device": device, "size": size, "h2d_Bps": bw["transfer.h2d"], "d2h_Bps": bw["transfer.d2h"],
                          "value": float(max(bw) / min(bw)), "case_ids": list(g["case_id"])})
    if not found:
        return not_measurable("mode2.direction_asymmetry", "ratio", "F2.direction_asymmetry",
                              "no h2d/d2h pair at the same size", cfg)
    largest = max(found, key=lambda f: f["size"])
    return indicator("mode2.direction_asymmetry", largest["value"], "ratio", "F2.direction_asymmetry",
                     largest["case_ids"], cfg, summary="at the largest size", per_size=found)


# -- mode 3 ----------------------------------------------------------------------------
def mode3(view: RunView) -> dict:
    cfg = view.cfg
    ok = view.ok
    out = {}
    # collective.pairwise is the link matrix, not a collective with a busbw (_pairwise).
    coll = ok[(ok["family"] == "collective") & (ok["probe"] != PAIRWISE)]
    link_eff, scaling = [], []
    missing_link = set()
    for (op, device_kind), g in coll.groupby([coll["probe"], coll["device"].str.split(":").str[0]]) if len(coll) else []:
        for ws, gw in g.groupby("world_size"):
            top = gw.loc[gw["bytes"].idxmax()]
            # The group's own links (NVML pair matrix: its ring's slowest hop), as case rows use.
            from harness.nominal import group_link_Bps
            link = group_link_Bps(view.nominal(top["device"]), device_members(top["device"]))
            if link and top["busbw_Bps"]:
                link_eff.append({"case_id": top["case_id"], "value": float(top["busbw_Bps"] / link)})
            else:
                missing_link.add(view.device_class(top["device"]))
        sizes = g.groupby("bytes")
        for size, gs in sizes:
            by_ws = {int(r["world_size"]): r for _, r in gs.iterrows()}
            if 2 in by_ws and by_ws[2]["busbw_Bps"]:
                for n, r in by_ws.items():
                    if n > 2 and r["busbw_Bps"]:
                        scaling.append({"case_ids": [by_ws[2]["case_id"], r["case_id"]], "op": op, "size": size,
                                        "n": n, "value": float(r["busbw_Bps"] / by_ws[2]["busbw_Bps"])})
    why = ("no collective cases in this run" if not len(coll) else
           f"no nominal link bandwidth for {', '.join(sorted(missing_link))} "
           "(set nominal.<device type>.link_Bps in the suite)")
    out["link_efficiency"] = extreme("mode3.link_efficiency", link_eff, "fraction of N_link", "F3.link_eff", cfg,
                                     worst=min, summary="lowest over op × world size", empty_reason=why)
    if scaling:
        largest = max(s["size"] for s in scaling)
        at_top = [s for s in scaling if s["size"] == largest]
        worst = min(at_top, key=lambda s: s["value"])
        out["collective_scaling"] = indicator("mode3.collective_scaling", worst["value"], "busbw(n)/busbw(2)",
                                              "F3.scaling_coll", [c for s in at_top for c in s["case_ids"]], cfg,
                                              summary="lowest at the largest size", per_case=scaling)
    else:
        out["collective_scaling"] = not_measurable("mode3.collective_scaling", "busbw(n)/busbw(2)", "F3.scaling_coll",
                                                   "needs one collective at world size 2 and a larger one", cfg)
    out.update(_tp_scaling(view))
    matrix = _pairwise(view)
    out.update({k: v for k, v in matrix.items() if k != "accessible_capacity_fraction"})
    out["accessible_capacity_fraction"] = matrix.get("accessible_capacity_fraction") or _accessible(view)
    return out


def _pairwise(view: RunView) -> dict:
    """Slowest link and slowest node (fraction of the group median) from the link
    matrix of the widest ``collective.pairwise`` case (devices before CPU ranks, then
    the most ranks, then the largest transfer), and the accessible capacity fraction
    from the same matrix (harness.collector.links)."""
    from harness.collector import links as L

    cfg = view.cfg
    theta = float(cfg.get("accessible_theta", 0.5))
    unit = "fraction of group median"
    rows = view.by_probe(PAIRWISE)
    rows = rows[rows["status"] == "ok"] if len(rows) else rows
    found = []
    for _, r in rows.iterrows():
        extra = r["extra_d"] or {}
        try:
            res = L.link_findings(extra.get("matrix_Bps"), theta, L.rank_labels(extra))
        except ValueError as exc:
            found.append((None, r, str(exc)))
            continue
        cpu = str(r["device"]).startswith("cpu")
        found.append(((not cpu, int(r.get("world_size") or 0), float(r["bytes"] or 0)), r, res))
    usable = [f for f in found if f[0] is not None]
    if not usable:
        why = (f"the link matrix of {found[0][1]['case_id']} is unusable: {found[0][2]}" if found else
               "no collective.pairwise case in this run (add it to the suite for the link matrix)")
        return {"slowest_link": not_measurable("mode3.slowest_link", unit, "F3.slowest_link", why, cfg),
                "slowest_node": not_measurable("mode3.slowest_node", unit, "F3.slowest_node", why, cfg)}
    _, r, res = max(usable, key=lambda f: f[0])
    cid = [r["case_id"]]
    hosts = (r["extra_d"] or {}).get("hosts") or []
    note = None
    if str(r["device"]).startswith("cpu") and len(set(hosts)) <= 1:
        note = "CPU ranks on one host: the links are the host transport between rank processes"
    common = {"group_median_Bps": res["group_median_Bps"], "theta": theta, "flagged_links": res["flagged_links"],
              "slow_nodes": res["slow_nodes"], "slow_links": res["slow_links"], "matrix_case": r["case_id"]}
    link = res["slowest_link"]
    node = res["slowest_node"]
    return {
        "slowest_link": indicator("mode3.slowest_link", link["ratio"], unit, "F3.slowest_link", cid, cfg,
                                  reason=note, link=link["link"], src=link["src"], dst=link["dst"],
                                  Bps=link["Bps"], **common),
        "slowest_node": indicator("mode3.slowest_node", node["ratio"], unit, "F3.slowest_node", cid, cfg,
                                  reason=note, node=node["node"], rank=node["rank"], Bps=node["Bps"],
                                  node_Bps=res["node_Bps"], **common),
        "accessible_capacity_fraction": indicator(
            "mode3.accessible_capacity_fraction", res["accessible_fraction"], "fraction of devices", "F3.accessible",
            cid, cfg, reason=note, theta=theta,
            bandwidth_to_group_Bps={lab: b for lab, b in zip(res["labels"], res["node_Bps"])},
            source="pairwise link matrix"),
    }


def _tp_scaling(view: RunView) -> dict:
    cfg = view.cfg
    tp = view.by_probe(TP_STEP)
    eff, share = [], []
    groups = defaultdict(dict)
    for _, r in tp.iterrows():
        ws = int(r["params_d"].get("world_size") or r.get("world_size") or 1)
        groups[_key(r["params_d"], ("world_size",))][ws] = r
        s = view.samples_of(r["case_id"])
        if ws > 1 and {"comm_s", "compute_s"} <= set(s.columns):
            # Per step, the share of time in collectives of the rank that computed longest:
            # the others' collective time also holds their wait for it (mode 1, not 3).
            idx = s.groupby("rep")["compute_s"].idxmax()
            slow = s.loc[idx]
            share.append({"case_id": r["case_id"], "value": float((slow["comm_s"] / slow["duration_s"]).mean())})
    for _, by_ws in groups.items():
        if 1 in by_ws:
            for n, r in by_ws.items():
                if n > 1:
                    eff.append({"case_ids": [by_ws[1]["case_id"], r["case_id"]], "n": n,
                                "value": F.tp_scaling_efficiency(by_ws[1]["p50_s"], r["p50_s"], n)})
    return {
        "tp_scaling_efficiency": extreme(
            "mode3.tp_scaling_efficiency", eff, "E(n)", "F3.scaling_tp", cfg, worst=min,
            summary="lowest over world sizes",
            empty_reason="needs the tensor-parallel decode step at world size 1 and at a larger one"),
        "collective_share": extreme(
            "mode3.collective_share", share, "fraction of step", "F3.coll_share", cfg, worst=max,
            summary="largest over cases",
            empty_reason="no multi-rank tensor-parallel composite with comm_s in this run"),
    }


def _accessible(view: RunView) -> dict:
    cfg = view.cfg
    theta = float(cfg.get("accessible_theta", 0.5))
    ok = view.ok
    pairs = ok[ok["probe"].isin(["transfer.d2d", "transfer.kv_sendrecv", "collective.sendrecv"])]
    per_device = defaultdict(list)
    used = []
    for _, r in pairs.iterrows():
        members = device_members(r["device"])
        if len(set(members)) < 2 or all(m.startswith("cpu") for m in members):
            continue  # ranks sharing one device (all CPU ranks) say nothing about links between devices
        bw = r.get("busbw_Bps") if r["family"] == "collective" else r["bytes_per_s"]
        if bw:
            used.append(r["case_id"])
            for m in set(members):
                per_device[m].append(float(bw))
    if len(per_device) < 2:
        return not_measurable("mode3.accessible_capacity_fraction", "fraction of devices", "F3.accessible",
                              "needs pairwise transfers between two or more distinct devices "
                              "(CPU ranks all share one device)", cfg)
    bw = {d: float(np.median(v)) for d, v in per_device.items()}
    return indicator("mode3.accessible_capacity_fraction", F.accessible_fraction(bw, theta), "fraction of devices",
                     "F3.accessible", used, cfg, theta=theta, bandwidth_to_group_Bps=bw)


# -- mode 4 ----------------------------------------------------------------------------
def mode4(view: RunView) -> dict:
    cfg = view.cfg
    out = {"fingerprint": _fingerprint(view)}
    out.update(_sweeps(view))
    tails, outl = [], []
    for _, r in view.ok.iterrows():
        if r["probe"] == "overhead.timer":
            continue
        d = view.per_rep(r["case_id"])["duration_s"].to_numpy()
        if len(d) >= 5 and np.median(d) > 0:
            tails.append({"case_id": r["case_id"], "value": F.tail_weight(d)})
            outl.append({"case_id": r["case_id"], "value": F.outlier_share(d)})
    if tails:
        out["tail_weight"] = indicator("mode4.tail_weight", float(np.median([t["value"] for t in tails])), "p99/p50",
                                       "F4.tail", [t["case_id"] for t in tails], cfg, summary="median over cases",
                                       worst=max(tails, key=lambda t: t["value"]), per_case=tails)
        out["outlier_share"] = indicator("mode4.outlier_share", float(np.mean([t["value"] for t in outl])),
                                         "fraction of samples", "F4.outliers", [t["case_id"] for t in outl], cfg,
                                         summary="mean over cases", worst=max(outl, key=lambda t: t["value"]))
    else:
        for name, unit, f in (("tail_weight", "p99/p50", "F4.tail"), ("outlier_share", "fraction of samples", "F4.outliers")):
            out[name] = not_measurable(f"mode4.{name}", unit, f, "no ok case with ≥ 5 samples", cfg)
    timer = view.by_probe("overhead.timer")
    if len(timer):
        r = timer.iloc[0]
        ex = r["extra_d"]
        gaps = view.samples_of(r["case_id"])["duration_s"].to_numpy()
        out["timer_jitter"] = indicator(
            "mode4.timer_jitter", ex.get("interruptions_per_s"), "interruptions > 10 us per s", "F4.jitter",
            [r["case_id"]], cfg, p999_gap_s=float(np.percentile(gaps, 99.9)) if len(gaps) else None,
            max_gap_s=ex.get("max_gap_s"), clock=ex.get("clock"))
        out["timer_interrupted_share"] = indicator(
            "mode4.timer_interrupted_share", ex.get("interrupted_share"), "fraction of wall time", "F4.jitter_share",
            [r["case_id"]], cfg, reason=None if ex.get("interrupted_share") is not None else
            "the overhead.timer case predates interrupted_share")
    else:
        out["timer_jitter"] = not_measurable("mode4.timer_jitter", "interruptions > 10 us per s", "F4.jitter",
                                             "overhead.timer did not run", cfg)
        out["timer_interrupted_share"] = not_measurable("mode4.timer_interrupted_share", "fraction of wall time",
                                                        "F4.jitter_share", "overhead.timer did not run", cfg)
    out["steal_share"] = _steal(view)
    launch = view.by_probe("overhead.launch")
    if len(launch):
        per_dev = [{"case_id": r["case_id"], "device": r["device"], "value": float(r["p50_s"])} for _, r in launch.iterrows()]
        out["launch_overhead"] = indicator("mode4.launch_overhead", max(p["value"] for p in per_dev), "s", "F4.launch",
                                           [p["case_id"] for p in per_dev], cfg, summary="largest over devices",
                                           per_device=per_dev)
    else:
        out["launch_overhead"] = not_measurable("mode4.launch_overhead", "s", "F4.launch", "overhead.launch did not run", cfg)
    return out


def _fingerprint(view: RunView) -> dict:
    env = view.run.manifest.get("environment") or {}
    virt = env.get("virtualization") or {}
    layers = [f"{l.get('layer')}:{l.get('kind')}" for l in virt.get("layers") or [] if isinstance(l, dict)]
    gpus = ((env.get("nvidia") or {}).get("gpus")) or []
    gpu_virt = []
    for g in gpus:
        if isinstance(g, dict):
            gpu_virt.append({k: g.get(k) for k in ("index", "name", "virtualization_mode", "mig_mode") if k in g})
    summary = virt.get("summary") or ("bare metal (no virtualization layer detected)" if not layers else " > ".join(layers))
    return indicator("mode4.fingerprint", summary, "text", "fingerprint", [], view.cfg,
                     layers=layers, gpu_virtualization=gpu_virt)


def _sweeps(view: RunView) -> dict:
    cfg = view.cfg
    groups = defaultdict(list)
    for _, r in view.ok.iterrows():
        if r["family"] == "composite" or r["probe"] == "overhead.timer":
            continue
        varying = [k for k in SIZE_KEYS if k in r["params_d"]]
        for k in varying:
            groups[(r["probe"], r["device"], k, _key(r["params_d"], (k,)))].append(r)
    fits = []
    for (probe, device, key, _), rows in groups.items():
        if len({json.dumps(r["params_d"].get(key), default=str) for r in rows}) < 2:
            continue
        xs, ys, ids = [], [], []
        for r in rows:
            work = r["bytes"] if r.get("bound") in ("memory", "link") or not r["flops"] else r["flops"]
            d = view.per_rep(r["case_id"])["duration_s"].to_numpy()
            if not len(d) or work is None or not np.isfinite(work):
                continue
            xs.extend([float(work)] * len(d))
            ys.extend(d.tolist())
            ids.append(r["case_id"])
        try:
            fit = F.sweep_fit(np.array(xs), np.array(ys))
        except ValueError:
            continue
        fits.append({"probe": probe, "device": device, "swept": key, "case_ids": ids, "a_s": fit.a,
                     "b_s_per_unit": fit.b, "r2": fit.r2, "noise": fit.noise, "samples": fit.n, "sizes": fit.points})
    if not fits:
        reason = "no size sweep (one probe at two or more sizes, all else equal) in this run"
        return {name: not_measurable(f"mode4.{name}", unit, "F4.fit", reason, cfg)
                for name, unit in (("control_predictability", "R²"), ("residual_noise", "IQR of relative residuals"),
                                   ("fixed_overhead", "s"))}
    r2 = [f["r2"] for f in fits if f["r2"] is not None and np.isfinite(f["r2"])]
    ids = [c for f in fits for c in f["case_ids"]]
    return {
        "control_predictability": indicator(
            "mode4.control_predictability", float(np.median(r2)) if r2 else None, "R²", "F4.fit", ids, cfg,
            summary="median over sweeps", worst=min(fits, key=lambda f: f["r2"] if np.isfinite(f["r2"]) else 1),
            sweeps=fits),
        "residual_noise": indicator("mode4.residual_noise", float(np.median([f["noise"] for f in fits])),
                                    "IQR of relative residuals", "F4.fit", ids, cfg, summary="median over sweeps"),
        "fixed_overhead": indicator("mode4.fixed_overhead", float(np.median([f["a_s"] for f in fits])), "s", "F4.fit",
                                    ids, cfg, summary="median intercept a over sweeps",
                                    per_sweep=[{"probe": f["probe"], "device": f["device"], "a_s": f["a_s"]} for f in fits]),
    }


def _steal(view: RunView) -> dict:
    cfg = view.cfg
    tel = view.run.telemetry
    steal = tel[(tel["source"] == "host") & (tel["metric"] == "steal_pct")] if len(tel) else tel
    if not len(steal):
        return not_measurable("mode4.steal_share", "fraction of CPU time", "F4.steal",
                              "no steal telemetry (/proc/stat unreadable, or no telemetry in this run)", cfg)
    per_case = steal.groupby("case_id")["value"].mean() / 100.0
    worst = per_case.idxmax() if len(per_case) else None
    return indicator("mode4.steal_share", float(steal["value"].mean() / 100.0), "fraction of CPU time", "F4.steal",
                     [c for c in per_case.index if c], cfg, summary="mean over the run",
                     worst_case=worst, worst_case_value=float(per_case.max()) if len(per_case) else None)
