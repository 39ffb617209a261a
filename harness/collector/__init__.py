"""The collector: a run's samples -> capacity ladder, serving capacity and the mode 1–4
indicators of INDICATORS.md, written to ``indicators.json`` in the run folder.

Layout of indicators.json (schema_version 1)::

    {schema_version, run_id, generated_at, config: {thresholds, slo, ...},
     capacity: {C_eff, C_nom, epsilon, from_case, basis},   # the node's headline
     ladder: [{device, compute: {dtype: rung}, memory: rung, link: rung, host_link: rung}],
     serving: [{case_id, T_pred_s, T_meas_p50_s, kappa, C_eff, C_nom, epsilon, waterfall,
                truncation: {layers_run, model_layers, scale, outside, how},  # full-model figure
                full_p50_s, {ttft,tpot,itl,e2e,queue}_{p50,p90,p99,mean}_s,
                request_throughput, output_throughput, goodput, per_request, ...}],
     mode1: {name: indicator}, mode2: {...}, mode3: {...}, mode4: {...},
     summary: {verdict counts}}

An indicator is ``{id, value, unit, formula, formula_text, cases, verdict, threshold}``
plus details; ``value`` null with a ``reason`` when not measurable.
"""

from __future__ import annotations

import json
import os
import tempfile
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
    view = RunView(run, cfg)
    serving_entries = serving.serving(view)
    doc = {
        "schema_version": INDICATORS_SCHEMA_VERSION,
        "run_id": run.run_id,
        "generated_at": utc_now(),
        "capacity": serving.headline(serving_entries),
        "ladder": ladder.ladder(view),
        "serving": serving_entries,
        "mode1": modes.mode1(view),
        "mode2": modes.mode2(view),
        "mode3": modes.mode3(view),
        "mode4": modes.mode4(view),
        "config": cfg,
    }
    counts = Counter()
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for ind in doc[mode].values():
            counts[ind["verdict"]] += 1
    for entry in serving_entries:
        if isinstance(entry.get("kappa"), dict):
            counts[entry["kappa"]["verdict"]] += 1
    doc["summary"] = dict(counts)
    return clean(doc)


def write_indicators(run_path: Path, overrides: dict | None = None) -> Path:
    """Compute and write ``indicators.json`` atomically into the run folder."""
    from harness.results import load_path

    run = load_path(Path(run_path))
    doc = collect(run, overrides)
    target = Path(run_path) / "indicators.json"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".indicators-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def indicator_rows(doc: dict) -> list[dict]:
    """Flat rows (mode, name, value, unit, verdict, reason/cases) for tables."""
    rows = []
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for name, ind in (doc.get(mode) or {}).items():
            rows.append({"mode": mode, "name": name, "value": ind.get("value"), "unit": ind.get("unit"),
                         "verdict": ind.get("verdict"), "reason": ind.get("reason") or ind.get("note") or "",
                         "cases": ind.get("cases") or []})
    for entry in doc.get("serving") or []:
        for key in ("kappa", "C_eff", "C_nom", "epsilon", "request_throughput", "output_throughput", "goodput"):
            ind = entry.get(key)
            if isinstance(ind, dict):
                rows.append({"mode": "serving", "name": f"{key} {entry['case_id']}", "value": ind.get("value"),
                             "unit": ind.get("unit"), "verdict": ind.get("verdict"),
                             "reason": ind.get("reason") or ind.get("note") or "", "cases": ind.get("cases") or []})
    return rows
