"""The HTML report of a fleet view (``coherence report --fleet RUN_OR_DIR...``)."""

from __future__ import annotations

import math
from pathlib import Path

from harness.report import html as H
from harness.report.html import esc
from harness.report.run_report import Plotter


def _node_label(node: dict) -> str:
    host = node.get("host") or ""
    return f"{node['run_id']} ({host})" if host else str(node["run_id"])


def build(runs: list, cfg: dict, generator: str) -> str:
    from harness.fleet import fleet_view, fleet_view_paths

    # Run folders: only their summaries are read (harness.fleet.fleet_view_paths).
    doc = fleet_view_paths(runs, cfg) if all(isinstance(r, (str, Path)) for r in runs) else fleet_view(runs, cfg)
    plotter = Plotter()
    nodes = doc["nodes"]
    threshold = doc["z_threshold"]
    labels = {n["path"]: _node_label(n) for n in nodes}
    order = [labels[n["path"]] for n in nodes]

    long = doc["long"]
    def point_label(r: dict) -> str:
        # hover title of the point: the case (or "(run)" for a run indicator) and its metric value
        unit = f" {r['unit']}" if r.get("unit") else ""
        return f"{r.get('case_id') or '(run)'} — {r.get('metric')} = {H.num(r.get('value'))}{unit}"

    points = [{"node": labels[r["path"]], "z": float(r["z"]) if r["z"] is not None else None, "flagged": bool(r["flagged"]),
               "label": point_label(r)}
              for r in long.to_dict(orient="records")] if len(long) else []
    points = [p for p in points if p["z"] is not None and not math.isnan(p["z"])]
    if points:
        caption = (f"robust z = (x − class median) / max(1.4826·MAD, r·|median|) of every metric of every node "
                   f"({len(points)} values; metrics {', '.join(doc['metrics'])}, run indicators {', '.join(doc['indicators'])}); "
                   f"red: |z| > {threshold:g}; node rule '{doc['node_rule']}'")
        outliers = plotter.figure("fleet-outliers", "outliers per node", "fleet_outliers", order, points, threshold,
                                  "robust z per node", caption=esc(caption))
    else:
        outliers = H.figure("fleet-outliers", "outliers per node", why="no metric shared by the nodes")

    cap_nodes = sorted(({"node": labels[n["path"]], "class": n["device_classes"], "C_eff": n["C_eff"], "C_nom": n["C_nom"],
                         "epsilon": n["epsilon"]} for n in nodes if n["C_eff"] is not None or n["C_nom"] is not None),
                       key=lambda n: (n["class"], n["node"]))
    if cap_nodes:
        capacity = plotter.figure("fleet-capacity", "capacity by node and device class", "fleet_capacity", cap_nodes,
                                  "C_eff against C_nom per node", caption="from each run's indicators.json (the node's headline composite)")
    else:
        capacity = H.figure("fleet-capacity", "capacity by node and device class",
                            why="no node has C_eff or C_nom (no indicators.json, or no composite serving case)")
    cap = doc["capacity"]
    if cap.get("measurable"):
        cost = cap.get("cost") or {}
        cost_text = (f"; cost per million effective tokens {H.num(cost.get('per_million_effective_tokens'))}"
                     if cost.get("measurable") else f"; cost: {cost.get('reason')}")
        capacity = (f'<p class="headline">fleet: Σ C_eff <b>{esc(H.si(cap["sum_C_eff"], "tok/s"))}</b> of Σ C_nom '
                    f'<b>{esc(H.si(cap["sum_C_nom"], "tok/s"))}</b>, ε {esc(H.num(cap.get("epsilon")))} over '
                    f'{cap["nodes"]} of {cap["of_nodes"]} nodes{esc(cost_text)}</p>') + capacity
    else:
        capacity = f'<p class="headline">fleet capacity: not measurable — {esc(cap.get("reason"))}</p>' + capacity

    node_rows = []
    for n in nodes:
        node_rows.append([esc(n["run_id"]), esc(n.get("host")), esc(n.get("label")), esc(n["device_classes"]), esc(n["devices"]),
                          esc(H.num(n["epsilon"])), esc(H.si(n["C_eff"], "tok/s")), esc(H.si(n["C_nom"], "tok/s")),
                          esc(n.get("metrics")), esc(n.get("flagged_metrics")), esc(H.num(n.get("max_abs_z"))),
                          esc(n.get("worst")),
                          (H.badge("fail") + " " + esc("; ".join(n["flag_reasons"]))) if n["flagged"] else H.badge("ok")])
    nodes_html = H.table(["run", "host", "label", "device class", "devices", "ε", "C_eff", "C_nom", "metrics", "flagged metrics",
                          "max |z|", "worst", "node flagged"], node_rows,
                         ["id", "", "", "", "num", "num", "num", "num", "num", "num", "num", "id", "reason"], 'data-table="nodes"')
    classes = ", ".join(f"{k}: {v} node{'s' if v != 1 else ''}" for k, v in sorted(doc["classes"].items()))
    flags = doc["flags"]
    flag_rows = [[esc(labels.get(f["path"], f["run_id"])), esc(f["device_class"]), esc(f["case_id"] or "(run)"), esc(f["metric"]),
                  esc(H.num(f["value"])), esc(f.get("unit") or ""), esc(H.num(f["median"])), esc(H.num(f["z"])), esc(f["scale_source"])]
                 for f in flags]
    flags_html = (H.table(["node", "class", "case", "metric", "value", "unit", "class median", "z", "scale from"], flag_rows,
                          ["", "", "id", "", "num", "", "num", "num", ""], 'data-table="flags"')
                  if flag_rows else "<p>no metric beyond the threshold.</p>")
    subtitle = (f"{len(nodes)} nodes · classes {esc(classes)} · |z| > {threshold:g} flags · "
                f"{len(doc['flagged_nodes'])} node(s) flagged")
    sections = [
        ("outliers", "Outliers", outliers),
        ("capacity", "Capacity by node and class", capacity),
        ("nodes", "Nodes", nodes_html),
        ("flags", f"Flagged metrics ({len(flags)})", flags_html),
    ]
    if not plotter.ok:
        sections.insert(0, ("plots", "Plots unavailable", f"<p>{esc(plotter.why)}; tables are complete.</p>"))
    return H.page(f"coherence fleet — {len(nodes)} nodes", subtitle, [(a, h) for a, h, _ in sections], sections, generator)
