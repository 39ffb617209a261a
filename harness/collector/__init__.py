"""The collector: a run's samples -> capacity ladder, serving capacity and the mode 1–4
indicators of INDICATORS.md, written to ``indicators.json`` in the run folder.

Layout of indicators.json (schema_version 1)::

    {schema_version, run_id, generated_at, config: {thresholds, slo, ...},
     capacity: {C_eff, C_nom, epsilon, from_case, basis, world_size, scaling},  # best configuration
     oversubscribed: {case_id: {ranks, usable_cores, source}},  # CPU ranks > cores: not judged
     ladder: [{device, compute: {dtype: rung}, memory: rung, link: rung, host_link: rung,
               energy: {flops_per_j, bytes_per_j}}],  # indicators; best isolated case per device
     serving: [{case_id, T_pred_s, T_meas_p50_s, kappa, C_eff, C_nom, epsilon, waterfall,
                truncation: {layers_run, model_layers, scale, outside, how},  # full-model figure
                full_p50_s, {ttft,tpot,itl,e2e,queue}_{p50,p90,p99,mean}_s,
                request_throughput, output_throughput, goodput, per_request,
                j_per_token, tokens_per_j, energy: {energy_j_per_unit, energy_method, ...}, ...}],
     mode1: {name: indicator}, mode2: {...}, mode3: {...}, mode4: {...},
     summary: {verdict counts}}

An indicator is ``{id, value, unit, formula, formula_text, cases, verdict, threshold}``
plus details; ``value`` null with a ``reason`` when not measurable.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

INDICATORS_SCHEMA_VERSION = 1


def collect(run, overrides: dict | None = None) -> dict:
    """The indicators document of a loaded run (:class:`harness.results.Run`)."""
    from harness.collector import ladder, modes, serving
    from harness.collector.common import RunView, clean, load_config
    from harness.store import utc_now

    suite_cfg = ((run.manifest.get("config") or {}).get("resolved") or {}).get("indicators") or {}
    cfg = load_config({**suite_cfg, **(overrides or {})})
    from harness.collector.oversubscribe import judge, oversubscribed_cases

    view = RunView(run, cfg)
    # CPU ranks outnumbering the usable cores: measured and shown, not judged (their
    # waits are the scheduler's, not a link's).
    over = oversubscribed_cases(run.manifest, run.cases.to_dict(orient="records") if len(run.cases) else [])
    serving_entries = serving.serving(view)
    for entry in serving_entries:
        if entry.get("case_id") in over:
            o = over[entry["case_id"]]  # text: a note, not a figure compare would diff
            entry["oversubscribed"] = f"{o['ranks']} CPU ranks on {o['usable_cores']:g} usable cores"
            if isinstance(entry.get("kappa"), dict):
                entry["kappa"] = judge({**entry["kappa"], "cases": [entry["case_id"]]}, over)
    doc = {
        "schema_version": INDICATORS_SCHEMA_VERSION,
        "run_id": run.run_id,
        "generated_at": utc_now(),
        "capacity": best_capacity(serving_entries, over),
        "ladder": ladder.ladder(view),
        "serving": serving_entries,
        "mode1": modes.mode1(view),
        "mode2": modes.mode2(view),
        "mode3": modes.mode3(view),
        "mode4": modes.mode4(view),
        "oversubscribed": over,
        "config": cfg,
    }
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        doc[mode] = {name: judge(ind, over) for name, ind in doc[mode].items()}
    counts = Counter()
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for ind in doc[mode].values():
            counts["not judged" if ind.get("not_judged") else ind["verdict"]] += 1
    for entry in serving_entries:
        if isinstance(entry.get("kappa"), dict):
            counts["not judged" if entry["kappa"].get("not_judged") else entry["kappa"]["verdict"]] += 1
    doc["summary"] = dict(counts)
    return clean(doc)


def _c_eff(entry: dict) -> float | None:
    v = (entry.get("C_eff") or {}).get("value") if isinstance(entry.get("C_eff"), dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _world_size(entry: dict) -> int:
    ws = (entry.get("params") or {}).get("world_size") or 1
    return int(ws) if isinstance(ws, (int, float)) else 1


def best_capacity(entries: list[dict], over: dict | None = None) -> dict:
    """The node's headline capacity: the serving composite with the largest C_eff
    (tokens/s meeting the SLO), i.e. the best configuration measured, not the largest
    world size; oversubscribed cases only when nothing else was measured.

    Returns {from_case, C_eff, C_nom, epsilon, tokens_per_j, unit, basis, world_size,
    scaling}, where
    ``scaling`` lists, for each composite run at several world sizes, every larger world
    size that delivers less than the best one: {probe, from_case, to_case, world_size_from,
    world_size_to, C_eff_from, C_eff_to, ratio, sentence} (the loss from scaling out, a
    finding of its own). Without a measurable C_nom: {C_eff: None, ..., reason}.
    """
    import json as _json

    over = over or {}
    usable = [e for e in entries if isinstance(e.get("C_nom"), dict) and e["C_nom"].get("value") is not None
              and _c_eff(e) is not None]
    if not usable:
        return {"C_eff": None, "C_nom": None, "epsilon": None,
                "reason": "no composite case with a measurable C_nom in this run"}
    judged = [e for e in usable if e["case_id"] not in over] or usable
    best = max(judged, key=lambda e: (_c_eff(e), -_world_size(e)))
    groups: dict[str, list[dict]] = {}
    for e in usable:
        rest = {k: v for k, v in sorted((e.get("params") or {}).items()) if k != "world_size"}
        groups.setdefault(f"{e.get('probe')} {_json.dumps(rest, sort_keys=True, default=str)}", []).append(e)
    scaling = []
    for members in groups.values():
        if len({_world_size(e) for e in members}) < 2:
            continue
        top = max(members, key=lambda e: (_c_eff(e), -_world_size(e)))
        for e in sorted(members, key=_world_size):
            if _world_size(e) > _world_size(top) and _c_eff(e) < _c_eff(top):
                ratio = _c_eff(e) / _c_eff(top) if _c_eff(top) else None
                scaling.append({
                    "probe": e.get("probe"), "from_case": top["case_id"], "to_case": e["case_id"],
                    "world_size_from": _world_size(top), "world_size_to": _world_size(e),
                    "C_eff_from": _c_eff(top), "C_eff_to": _c_eff(e), "ratio": ratio,
                    "oversubscribed": e["case_id"] in over,
                    "sentence": (f"{e.get('probe')} at world size {_world_size(e)} serves {_c_eff(e):.3g} tok/s, "
                                 f"{ratio:.2f}x its {_c_eff(top):.3g} tok/s at world size {_world_size(top)}"
                                 + (" (oversubscribed CPU ranks)" if e["case_id"] in over else "")
                                 + ": scaling out loses capacity here."),
                })
    tpj = best.get("tokens_per_j")
    return {"from_case": best["case_id"], "C_eff": _c_eff(best), "C_nom": best["C_nom"]["value"],
            # Energy of the same configuration (None when it was not measured: then the
            # entry's tokens_per_j indicator says why).
            "tokens_per_j": tpj.get("value") if isinstance(tpj, dict) else None,
            "epsilon": (best.get("epsilon") or {}).get("value") if isinstance(best.get("epsilon"), dict) else None,
            "unit": "tokens/s", "basis": best.get("basis"), "world_size": _world_size(best),
            "rule": "largest C_eff over the serving composites measured", "scaling": scaling}


def write_indicators(run_path: Path, overrides: dict | None = None) -> Path:
    """Compute and write ``indicators.json`` atomically into the run folder."""
    from harness.results import load_path

    run = load_path(Path(run_path), indicators=False)  # written anew: a damaged one is replaced
    doc = collect(run, overrides)
    from harness import atomic

    # The one writer: mode 0644, one line naming the file on a read-only or full disk.
    return atomic.write_json(Path(run_path) / "indicators.json", doc, indent=1, default=None, allow_nan=False)


def indicator_rows(doc: dict) -> list[dict]:
    """Flat rows (mode, name, value, unit, verdict, reason/cases) for tables: modes 1–4,
    each composite's serving indicators, and each device's energy efficiency (mode
    ``capacity``: FLOP/J, B/J; ladders of runs made before energy have none)."""
    rows = []
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for name, ind in (doc.get(mode) or {}).items():
            rows.append({"mode": mode, "name": name, "value": ind.get("value"), "unit": ind.get("unit"),
                         "verdict": ind.get("verdict"), "reason": ind.get("reason") or ind.get("note") or "",
                         "cases": ind.get("cases") or []})
    for entry in doc.get("serving") or []:
        for key in ("kappa", "C_eff", "C_nom", "epsilon", "request_throughput", "output_throughput", "goodput",
                    "j_per_token", "tokens_per_j"):
            ind = entry.get(key)
            if isinstance(ind, dict):
                rows.append({"mode": "serving", "name": f"{key} {entry['case_id']}", "value": ind.get("value"),
                             "unit": ind.get("unit"), "verdict": ind.get("verdict"),
                             "reason": ind.get("reason") or ind.get("note") or "", "cases": ind.get("cases") or []})
    for dev in doc.get("ladder") or []:
        for key, ind in ((dev.get("energy") or {}) if isinstance(dev, dict) else {}).items():
            if isinstance(ind, dict):
                rows.append({"mode": "capacity", "name": f"{key} {dev.get('device')}", "value": ind.get("value"),
                             "unit": ind.get("unit"), "verdict": ind.get("verdict"),
                             "reason": ind.get("reason") or ind.get("note") or "", "cases": ind.get("cases") or []})
    return rows
