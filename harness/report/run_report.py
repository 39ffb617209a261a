"""The HTML report of one run (``coherence report RUN``)."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pandas as pd

from harness import dtype_path
from harness.report import html as H
from harness.report.html import esc
from harness.results import json_object

MODES = (
    ("mode1", "Mode 1 — latency-asymmetry drift"),
    ("mode2", "Mode 2 — memory-path incoherence"),
    ("mode3", "Mode 3 — interconnect-induced capacity inaccessibility"),
    ("mode4", "Mode 4 — virtualization-induced control distortion"),
)
# ``interrupted``: a case SIGINT/SIGTERM stopped in a partial run (harness.interrupts).
NOT_OK = ("failed", "timeout", "interrupted", "skipped")


def _f(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _records(cases: pd.DataFrame) -> list[dict]:
    return cases.to_dict(orient="records") if len(cases) else []


class Plotter:
    """Calls a plot function when matplotlib is there; otherwise, or when the plot
    fails, a figure that says so (a plot bug never costs the rest of the report)."""

    def __init__(self):
        from harness.report import plots

        self.plots = plots
        self.ok, self.why = plots.available()

    def figure(self, kind: str, title: str, fn_name: str, *args, caption: str = "", attrs: dict | None = None,
               **kwargs) -> str:
        if not self.ok:
            return H.figure(kind, title, why=f"plot unavailable: {self.why}", caption=caption, state="unavailable",
                            attrs=attrs)
        try:
            svg = getattr(self.plots, fn_name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the report goes on without this plot
            return H.figure(kind, title, why=f"plot failed: {type(exc).__name__}: {exc}", caption=caption,
                            state="error", attrs=attrs)
        return H.figure(kind, title, svg=svg, caption=caption, attrs=attrs)


# -- per-repetition durations ----------------------------------------------------------
def durations_by_case(samples: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per case the per-repetition durations; multi-rank cases the slowest rank's."""
    out: dict[str, np.ndarray] = {}
    if not len(samples) or "duration_s" not in samples.columns:
        return out
    multi = "rank" in samples.columns and "rep" in samples.columns
    for cid, grp in samples.groupby("case_id", sort=False):
        if multi and grp["rank"].nunique() > 1:
            d = grp.groupby("rep", sort=True)["duration_s"].max()
        else:
            d = grp["duration_s"]
        d = d.to_numpy(dtype=float)
        out[str(cid)] = d[np.isfinite(d)]
    return out


# -- sections --------------------------------------------------------------------------
def _header(run, counts: dict) -> str:
    m = run.manifest
    parts = [
        f"run <b>{esc(run.run_id)}</b>", f"status {esc(m.get('status'))}",
        f"label {esc(m.get('label') or '—')}", f"host {esc(m.get('host') or '—')}",
        f"started {esc(m.get('started_at'))}", f"finished {esc(m.get('finished_at') or '—')}",
        f"schema v{esc(m.get('schema_version'))}" + (f" (loaded from v{run.loaded_from_version})"
                                                     if run.loaded_from_version != m.get("schema_version") else ""),
        "cases: " + (", ".join(f"{v} {esc(k)}" for k, v in sorted(counts.items())) or "none"),
    ]
    return " · ".join(parts)


def _fact_text(node) -> str:
    if isinstance(node, dict) and "value" in node:
        value = node["value"]
        if isinstance(value, dict):
            trues = [k for k, v in value.items() if v is True]
            return ", ".join(trues) if trues and all(isinstance(v, bool) for v in value.values()) else json.dumps(value, default=str)
        return "—" if value is None else str(value)
    return str(node)


def _facts(prefix: str, node, rows: list) -> None:
    if isinstance(node, dict) and "value" in node and "source" in node:
        rows.append([esc(prefix), esc(_fact_text(node)), f'<span class="note">{esc(node["source"])}</span>'])
        return
    if isinstance(node, dict):
        for key, child in node.items():
            _facts(f"{prefix}.{key}" if prefix else str(key), child, rows)


def environment_section(run) -> str:
    env = run.manifest.get("environment") or {}
    virt = env.get("virtualization") or {}
    out = [f'<p class="headline">virtualization layers: <b>{esc(virt.get("summary") or "none detected")}</b></p>']
    layers = virt.get("layers") or []
    if layers:
        rows = [[esc(layer.get("layer")), esc(layer.get("kind")),
                 esc(" ".join(f"{k}={layer[k]}" for k in ("role", "on") if layer.get(k)) or "—"),
                 esc("\n".join(layer.get("evidence") or []))] for layer in layers]
        out.append(H.table(["layer", "kind", "role", "evidence"], rows, ["", "", "", "reason"], 'data-table="virtualization"'))
    else:
        out.append('<p class="note">no virtualization layer detected (bare metal, or undetectable)</p>')
    steal = virt.get("steal_time")
    if steal:
        out.append(f'<p class="note">steal time: {esc(json.dumps(steal, default=str))}</p>')
    for note in virt.get("notes") or []:
        out.append(f'<p class="note">note: {esc(note)}</p>')
    # devices with their nominal peaks
    rows = []
    for dev in run.manifest.get("devices") or []:
        nom = dev.get("nominal") or {}
        peaks = ", ".join(f"{k} {H.si(v, 'FLOP/s')}" for k, v in (nom.get("compute_flops") or {}).items())
        rows.append([f'<span class="mono">{esc(dev.get("id"))}</span>', esc(dev.get("name")), esc(nom.get("kind") or "unknown"),
                     esc(peaks or "unknown"), esc(H.si(nom.get("memory_Bps"), "B/s")), esc(H.si(nom.get("link_Bps"), "B/s")),
                     esc(H.si(nom.get("host_link_Bps"), "B/s")), f'<span class="note">{esc(nom.get("source"))}</span>'])
    out.append("<h3>devices and nominal peaks</h3>")
    out.append(H.table(["device", "name", "nominal", "compute", "memory", "link", "host link", "source"], rows,
                       attrs='data-table="devices"'))
    ranks = run.manifest.get("ranks")
    if ranks:
        rows = [[esc(r.get("rank")), esc(r.get("node_rank")), esc(r.get("host")), esc(r.get("device")),
                 esc(r.get("device_name")), esc(r.get("virtualization"))] for r in ranks if isinstance(r, dict)]
        out.append("<h3>ranks (torchrun)</h3>")
        out.append(H.table(["rank", "node", "host", "device", "device name", "virtualization"], rows))
    facts: list = []
    for section in ("host", "cpu", "memory", "os", "python", "frameworks"):
        if section in env:
            _facts(section, env[section], facts)
    nvidia = env.get("nvidia") or {}
    if nvidia.get("available"):
        for key in ("driver_version", "cuda_driver_version", "nvml_version"):
            if key in nvidia:
                _facts(f"nvidia.{key}", nvidia[key], facts)
        for gpu in nvidia.get("gpus") or []:
            _facts(f"nvidia.gpu{gpu.get('index', '?')}", {k: v for k, v in gpu.items() if k != "index"}, facts)
        for pair in ((nvidia.get("links") or {}).get("pairs") or []):
            _facts("nvidia.link", pair, facts)
    else:
        facts.append(["nvidia", "not available", f'<span class="note">{esc(nvidia.get("reason", ""))}</span>'])
    versions = run.manifest.get("versions") or {}
    for k, v in versions.items():
        facts.append([esc(f"versions.{k}"), esc(v if not isinstance(v, (dict, list)) else json.dumps(v, default=str)), ""])
    out.append(H.details(f"every fact of the fingerprint ({len(facts)}), with how it was detected",
                         H.table(["fact", "value", "detected by"], facts, ["mono", "", ""], 'data-table="facts"')))
    return "".join(out)


def capacity_section(run, doc: dict | None, plotter: Plotter, reason: str = "") -> str:
    if doc is None:
        return ('<p>no indicators: ' + esc(reason) + "</p>"
                + H.figure("capacity-waterfall", "capacity waterfall", why="no indicators for this run"))
    cap = doc.get("capacity") or {}
    out = []
    if cap.get("C_nom") is not None:
        basis = ", ".join(f"{k}: {v}" for k, v in (cap.get("basis") or {}).items())
        out.append(f'<p class="headline">C_eff <b>{esc(H.si(cap.get("C_eff"), "tok/s"))}</b> of C_nom '
                   f'<b>{esc(H.si(cap.get("C_nom"), "tok/s"))}</b>: ε = <b>{esc(H.num(cap.get("epsilon")))}</b> '
                   f'<span class="note">(from <span class="mono">{esc(cap.get("from_case"))}</span>; basis {esc(basis)})</span></p>')
    else:
        out.append(f'<p class="headline">capacity: not measurable — {esc(cap.get("reason"))}</p>')
    serving = doc.get("serving") or []
    figs = []
    for entry in serving:
        wf = entry.get("waterfall")
        cid = entry.get("case_id")
        eps = (entry.get("epsilon") or {}).get("value") if isinstance(entry.get("epsilon"), dict) else None
        if not wf:
            why = ((entry.get("epsilon") or {}).get("reason") if isinstance(entry.get("epsilon"), dict) else None) \
                or "no waterfall for this composite (nominal step unknown)"
            figs.append(H.figure("capacity-waterfall", f"waterfall {cid}", why=why, attrs={"case": cid}))
            continue
        caption = (f"{esc(wf.get('unit'))}: nominal → roofline loss → interconnect → memory path/KV transfer → "
                   f"straggler wait → composition &amp; noise = measured mean {esc(H.seconds(wf.get('measured_mean_s')))}; "
                   f"+ SLO misses = effective {esc(H.seconds(wf.get('effective_s')))}; ε {esc(H.num(eps))}")
        figs.append(plotter.figure("capacity-waterfall", f"waterfall {cid}", "waterfall", wf.get("bars") or [],
                                   float(wf.get("measured_mean_s") or 0.0), float(wf.get("slo_misses_s") or 0.0),
                                   float(wf.get("effective_s") or 0.0), str(wf.get("unit") or "s per step"),
                                   str(cid), caption=caption, attrs={"case": cid}))
    if not figs:
        figs.append(H.figure("capacity-waterfall", "capacity waterfall",
                             why="no composite serving cases in this run (composite.tp_decode_step, "
                                 "composite.disagg_request, composite.colocated_request)"))
    out.extend(figs)
    if serving:
        rows = []
        def ind(entry: dict, key: str) -> tuple[str, str]:
            node = entry.get(key)
            if not isinstance(node, dict):
                return "—", ""
            return H.value_text(node.get("value"), node.get("unit")), node.get("verdict") or ""

        eager = graph_notes(run)
        for e in serving:
            kv, kv_verdict = ind(e, "kappa")
            # A composite that asked for CUDA graphs and ran eagerly: its κ is marked, the
            # reason is in the note under the table.
            mark = "<sup>eager†</sup>" if e.get("case_id") in eager else ""
            rows.append([esc(e.get("case_id")), esc(H.seconds(e.get("T_pred_s"))), esc(H.seconds(e.get("T_meas_p50_s"))),
                         esc(H.seconds(e.get("T_meas_p99_s"))),
                         esc(kv) + mark + " " + (H.badge(kv_verdict) if kv_verdict else ""),
                         esc(H.pct(e.get("slo_fraction"))), esc(ind(e, "C_eff")[0]), esc(ind(e, "C_nom")[0]), esc(ind(e, "epsilon")[0]),
                         esc(", ".join(f"{k}: {v}" for k, v in (e.get("basis") or {}).items()))])
        out.append("<h3>serving composites</h3>")
        out.append(H.table(["composite case", "T_pred", "T_meas p50", "T_meas p99", "κ", "meets SLO", "C_eff", "C_nom", "ε", "basis"],
                           rows, ["id", "num", "num", "num", "num", "num", "num", "num", "num", ""], 'data-table="serving"'))
        if eager:
            out.append('<p class="note" data-note="graph">† CUDA graphs requested, not applied (the case ran eagerly, '
                       "so its κ includes launch overhead): "
                       + "; ".join(f'<span class="mono">{esc(cid)}</span>: {esc(why)}' for cid, why in eager.items())
                       + "</p>")
        out.append(_serving_metrics_table(serving))
        out.append(serving_energy_html(serving))
    # the ladder
    rows = []
    for dev in doc.get("ladder") or []:
        rungs = [(f"compute {k}", v) for k, v in (dev.get("compute") or {}).items()]
        rungs += [(k.replace("_", " "), dev.get(k)) for k in ("memory", "link", "host_link")]
        for name, r in rungs:
            if not isinstance(r, dict) or (r.get("N") is None and r.get("I") is None and r.get("C") is None):
                continue
            u = r.get("unit") or ""
            eff = H.pct(r.get("efficiency")) if r.get("efficiency") is not None else esc(r.get("efficiency_reason") or "—")
            rows.append([esc(dev.get("device")), esc(name), esc(H.si(r.get("N"), u)), esc(H.si(r.get("I"), u)),
                         esc(H.si(r.get("C"), u)), eff, f'<span class="mono">{esc(r.get("I_case") or "—")}</span>'])
    out.append("<h3>capacity ladder (nominal N → isolated I → coordinated C)</h3>")
    out.append(H.table(["device", "resource", "N", "I", "C", "I / N", "I from"], rows,
                       ["mono", "", "num", "num", "num", "num", "id"], 'data-table="ladder"') if rows
               else '<p class="note">no rung measured</p>')
    out.append(ladder_energy_html(doc.get("ladder") or []))
    return "".join(out)


def graph_notes(run) -> dict[str, str]:
    """Composite case id -> why its requested CUDA graphs were not applied
    (``extra.graph`` = {requested, applied, collectives, reason}, probes/composite.py), for
    the composites that asked for graphs and ran eagerly. Empty for runs without
    ``extra.graph`` (made before the graph parameter)."""
    out = {}
    cases = getattr(run, "cases", None)
    if cases is None or not len(cases) or "extra" not in cases:
        return out
    for cid, extra in zip(cases["case_id"], cases["extra"]):
        g = json_object(extra).get("graph")
        if isinstance(g, dict) and g.get("requested") and not g.get("applied"):
            out[str(cid)] = str(g.get("reason") or "no reason recorded")
    return out


def _energy_how(node: dict) -> str:
    method, scope = node.get("energy_method"), node.get("energy_scope")
    return f"{method} ({scope})" if method and scope else str(method or "—")


def serving_energy_html(serving: list[dict]) -> str:
    """Energy of the serving composites (indicators.json ``serving[].j_per_token`` and
    ``tokens_per_j``, full model; INDICATORS.md §2 energy): a table of J/token, tokens/J
    and the meter (method and scope) per composite, or a note with the reasons where none
    was measured; a note that the indicators predate energy accounting where no entry
    has the figures (indicators.json of older code)."""
    entries = [e for e in serving if isinstance(e, dict) and isinstance(e.get("j_per_token"), dict)]
    if not entries:
        return ('<p class="note" data-note="energy">energy per token: not in indicators.json '
                "(written before energy accounting)</p>")
    measured = [e for e in entries if H.is_num(e["j_per_token"].get("value"))]
    if not measured:
        reasons = defaultdict(list)
        for e in entries:
            reasons[str(e["j_per_token"].get("reason") or "no reason recorded")].append(str(e.get("case_id")))
        return ('<p class="note" data-note="energy">energy per token: not measured — '
                + "; ".join(f"{esc(why)} ({len(ids)} composite{'s' if len(ids) > 1 else ''})"
                            for why, ids in reasons.items()) + "</p>")
    rows = []
    for e in entries:
        jpt, tpj = e["j_per_token"], e.get("tokens_per_j") or {}
        ok = H.is_num(jpt.get("value"))
        rows.append([esc(e.get("case_id")), esc(H.si(jpt.get("value"), "J") if ok else "—"),
                     esc(H.num(tpj.get("value"), 3) if ok else "—"), esc(_energy_how(jpt if ok else e.get("energy") or {})),
                     esc(jpt.get("reason") or "")])
    return ("<h3>energy per token (full model)</h3>"
            + H.table(["composite case", "J/token", "tokens/J", "meter", "note"], rows,
                      ["id", "num", "num", "", "reason"], 'data-table="serving-energy"'))


def ladder_energy_html(ladder: list[dict]) -> str:
    """Work per joule per device (indicators.json ``ladder[].energy``): the best FLOP/J of
    its compute-bound (gemm) cases and B/J of its memory-probe cases, each with the case
    it comes from, or the reason it is not measurable. Nothing for ladders written before
    energy accounting (no ``energy`` key)."""
    rows = []
    for dev in ladder:
        energy = dev.get("energy") if isinstance(dev, dict) else None
        if not isinstance(energy, dict):
            continue
        for key, unit, what in (("flops_per_j", "FLOP/J", "compute-bound (gemm)"), ("bytes_per_j", "B/J", "memory")):
            node = energy.get(key) if isinstance(energy.get(key), dict) else {}
            ok = H.is_num(node.get("value"))
            dtype = f" {node['dtype']}" if ok and node.get("dtype") else ""
            rows.append([esc(dev.get("device")), esc(what), esc(H.si(node.get("value"), unit) + dtype if ok else "—"),
                         esc((node.get("cases") or ["—"])[0] if ok else "—"),
                         "" if ok else esc("not measurable: " + str(node.get("reason") or "no figure"))])
    if not rows:
        return ""
    return ("<h3>energy per device (best work per joule of its isolated cases)</h3>"
            + H.table(["device", "resource", "per joule", "from case", "note"], rows,
                      ["mono", "", "num", "id", "reason"], 'data-table="ladder-energy"'))


def _ladder_of(doc: dict | None, device: str) -> dict:
    for dev in (doc or {}).get("ladder") or []:
        if dev.get("device") == device:
            return dev
    return {}


def roofline_section(run, doc: dict | None, plotter: Plotter) -> str:
    from harness.results import device_members

    ok = [r for r in _records(run.cases) if r.get("status") == "ok"]
    nominal = {d.get("id"): (d.get("nominal") or {}) for d in run.manifest.get("devices") or []}
    by_dev: dict[str, list[dict]] = defaultdict(list)
    unplaced = []
    for r in ok:
        flops, nbytes, rate = _f(r.get("flops")), _f(r.get("bytes")), _f(r.get("flops_per_s"))
        ai = _f(r.get("arithmetic_intensity")) or (flops / nbytes if flops and nbytes else None)
        if not flops or not nbytes or not rate or not ai:
            unplaced.append(r)
            continue
        dev = device_members(str(r.get("device") or ""))[0]
        by_dev[dev].append({"ai": ai, "rate": rate, "family": r.get("family"), "dtype": r.get("dtype") if isinstance(r.get("dtype"), str) else "",
                            "label": r["case_id"]})
    out = []
    for dev, points in sorted(by_dev.items()):
        lad = _ladder_of(doc, dev)
        nom = nominal.get(dev) or {}
        comp = {}
        for dtype, peak in (nom.get("compute_flops") or {}).items():
            comp.setdefault(dtype, {})["N"] = _f(peak)
        for dtype, rung in (lad.get("compute") or {}).items():
            comp.setdefault(dtype, {})["I"] = _f((rung or {}).get("I"))
            comp[dtype].setdefault("N", _f((rung or {}).get("N")))
        used = {p["dtype"] for p in points}
        comp = {k: v for k, v in comp.items() if k in used and (v.get("N") or v.get("I"))}
        mem_rung = lad.get("memory") or {}
        mem = {"N": _f(nom.get("memory_Bps")) or _f(mem_rung.get("N")), "I": _f(mem_rung.get("I"))}
        missing = []
        if not mem["N"]:
            missing.append("nominal memory bandwidth unknown (set nominal.<type>.memory_Bps in the suite)")
        if not mem["I"]:
            missing.append("no isolated memory probe on this device")
        caption = (f"{len(points)} cases at their p50 rate; solid = nominal ceilings, dashed = measured "
                   f"(best isolated GEMM per dtype, best memory probe)" + ("; " + "; ".join(missing) if missing else ""))
        out.append(plotter.figure("roofline", f"roofline {dev} ({nom.get('device_class') or ''})", "roofline", points,
                                  {"compute": comp, "memory": mem}, f"{dev}: achieved FLOP/s vs arithmetic intensity",
                                  caption=esc(caption), attrs={"device": dev}))
    if not by_dev:
        out.append(H.figure("roofline", "roofline", why="no ok case with both FLOPs and bytes in its work model"))
    if unplaced:
        rows = [[esc(r["case_id"]), esc(r.get("family")), esc(r.get("bound") if isinstance(r.get("bound"), str) else "—"),
                 esc(H.si(_f(r.get("bytes_per_s")), "B/s"))] for r in unplaced]
        out.append(H.details(f"{len(unplaced)} ok cases not placed on the roofline: no FLOPs (or no bytes) in their "
                             "work model — copies, transfers, collectives, latency probes",
                             H.table(["case", "family", "bound", "rate at p50"], rows, ["id", "", "", "num"])))
    return "".join(out)


PANEL_MAX = 8  # lines per latency plot: past this a legend no longer says which line is which


def latency_panels(case_ids: list[str], limit: int = PANEL_MAX) -> list[tuple[str, list[str]]]:
    """Split a family's cases into panels of at most ``limit`` lines: first one panel per
    probe, then a panel larger than ``limit`` by the parameter with the fewest distinct
    values (world_size, dtype...), until each fits or nothing is left to split by (then
    in consecutive chunks). Returns [(what the panel holds, its case ids)] in input order;
    a family that fits whole is one panel named ""."""
    from harness.report.plots import split_case_id

    if len(case_ids) <= limit:
        return [("", list(case_ids))]

    def split(name: str, ids: list[str]) -> list[tuple[str, list[str]]]:
        if len(ids) <= limit:
            return [(name, ids)]
        parsed = {c: split_case_id(c)[1] for c in ids}
        keys = sorted({k for p in parsed.values() for k in p})
        counts = {k: len({p.get(k) for p in parsed.values()}) for k in keys}
        usable = [k for k in keys if counts[k] > 1]
        if not usable:
            n = -(-len(ids) // limit)
            size = -(-len(ids) // n)
            return [(f"{name} ({i + 1}/{n})".strip(), ids[i * size:(i + 1) * size]) for i in range(n)]
        key = min(usable, key=lambda k: (counts[k], keys.index(k)))
        groups: dict[str, list[str]] = {}
        for c in ids:
            groups.setdefault(str(parsed[c].get(key)), []).append(c)
        out = []
        for value, members in groups.items():
            out += split(f"{name}, {key}={value}".lstrip(", "), members)
        return out

    by_probe: dict[str, list[str]] = {}
    for c in case_ids:
        by_probe.setdefault(split_case_id(c)[0], []).append(c)
    out = []
    for probe, ids in by_probe.items():
        out += split(probe, ids)
    return out


def latency_section(run, plotter: Plotter, durations: dict[str, np.ndarray]) -> str:
    ok = [r for r in _records(run.cases) if r.get("status") == "ok"]
    fams: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for r in ok:
        d = durations.get(str(r["case_id"]))
        if d is not None and d.size:
            fam = r.get("family") if isinstance(r.get("family"), str) else str(r["case_id"]).split(".")[0]
            fams[fam][str(r["case_id"])] = d
    out = []
    for fam, series in sorted(fams.items()):
        panels = latency_panels(list(series))
        for what, ids in panels:
            part = {c: series[c] for c in ids}
            n = sum(v.size for v in part.values())
            caption = (f"{len(part)} cases, {n} repetitions (multi-rank: the slowest rank per repetition); the legend "
                       "names what differs between the lines; hover a line for its case id, p50 and p99"
                       + (f"; {fam} is split into {len(panels)} plots of at most {PANEL_MAX} lines"
                          if len(panels) > 1 else ""))
            title = f"latency CDF — {what or fam}"
            attrs = {"family": fam, **({"panel": what} if what else {})}
            out.append(plotter.figure("latency-cdf", title, "latency_cdf", part,
                                      what or f"{fam}: per-repetition duration", caption=esc(caption), attrs=attrs))
    if not fams:
        out.append(H.figure("latency-cdf", "latency CDFs", why="no ok case with timed samples in this run"))
    return "".join(out)


def collective_section(run, doc: dict | None, plotter: Plotter) -> str:
    recs = [r for r in _records(run.cases) if r.get("status") == "ok" and r.get("family") == "collective"]
    by_ws: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    group_dev: dict[int, str] = {}
    for r in recs:
        params = json_object(r.get("params"))
        size = _f(params.get("size_bytes")) or _f(r.get("bytes"))
        bw = _f(r.get("busbw_Bps"))
        ws = _f(r.get("world_size")) or _f(params.get("world_size"))
        if size is None or bw is None or ws is None:
            continue
        op = r.get("collective_op") if isinstance(r.get("collective_op"), str) else str(r.get("probe", "")).split(".")[-1]
        dt = params.get("dtype")
        by_ws[int(ws)][f"{op}" + (f" {dt}" if dt and dt != "fp32" else "")].append((size, bw, str(r["case_id"])))
        group_dev[int(ws)] = str(r.get("device") or "")
    out = []
    nominal = {d.get("id"): (d.get("nominal") or {}) for d in run.manifest.get("devices") or []}
    from harness.results import device_members

    for ws, lines in sorted(by_ws.items()):
        first = device_members(group_dev.get(ws, ""))[0]
        link = _f((nominal.get(first) or {}).get("link_Bps"))
        caption = (f"busbw = algbw × the nccl-tests factor of each operation, at the p50 repetition; group "
                   f"{group_dev.get(ws)}" + ("" if link else "; no nominal link bandwidth for this device"))
        out.append(plotter.figure("collective-busbw", f"collective busbw — world size {ws}", "collective_busbw",
                                  dict(lines), link, f"world size {ws} ({group_dev.get(ws)})", caption=esc(caption),
                                  attrs={"world-size": ws}))
    if not by_ws:
        out.append(H.figure("collective-busbw", "collective busbw", why="no collective cases in this run"))
    from harness.collector.links import report_inputs  # the pairwise link matrix, when the run has one

    if lm := report_inputs(run.cases, doc):
        out.append(plotter.figure("link-matrix", lm["title"], "link_matrix", lm["matrix"], lm["labels"], lm["flagged"],
                                  lm["slow_nodes"], lm["title"], caption=esc(lm["caption"]), attrs={"case": lm["case_id"]}))
    if doc:
        rows = _indicator_rows(doc, "mode3", ("link_efficiency", "collective_scaling"))
        if rows:
            out.append(rows)
    return "".join(out)


def _transfer_cells(recs: list[dict]) -> tuple[dict, list[str], list[str]]:
    """(src, dst) -> (size, B/s at p50, case id), the largest size per cell."""
    cells: dict[tuple[str, str], tuple[float, float, str]] = {}
    for r in recs:
        probe = str(r.get("probe") or "")
        params, extra = json_object(r.get("params")), json_object(r.get("extra"))
        dev = str(r.get("device") or "")
        mem = params.get("memory") or extra.get("memory")
        host = f"host ({mem})" if mem else "host"
        if probe == "transfer.h2d":
            src, dst = host, dev
        elif probe == "transfer.d2h":
            src, dst = dev, host
        elif probe == "transfer.d2d":
            src, dst = str(extra.get("source") or dev), str(extra.get("destination") or "next device")
        elif probe == "transfer.local":
            src, dst = dev, dev
        else:
            continue
        bw, size = _f(r.get("bytes_per_s")), _f(params.get("size_bytes")) or _f(r.get("bytes")) or 0.0
        if bw is None:
            continue
        if (src, dst) not in cells or size > cells[(src, dst)][0]:
            cells[(src, dst)] = (size, bw, str(r["case_id"]))
    hosts = sorted({k for pair in cells for k in pair if k.startswith("host")})
    devs = sorted({k for pair in cells for k in pair if not k.startswith("host")})
    return cells, hosts + devs, devs + hosts


def transfer_section(run, doc: dict | None, plotter: Plotter) -> str:
    recs = [r for r in _records(run.cases) if r.get("status") == "ok" and r.get("family") == "transfer"]
    out = []
    cells, rows, cols = _transfer_cells(recs)
    rows = [r for r in rows if any((r, c) in cells for c in cols)]
    cols = [c for c in cols if any((r, c) in cells for r in rows)]
    if len(cells) == 1 and len(rows) == 1 and len(cols) == 1:
        # One cell is not a heatmap: the number itself, with what it measured.
        (src, dst), (size, bw, cid) = next(iter(cells.items()))
        what = ("copy within " + src) if src == dst else f"{src} → {dst}"
        out.append(H.single_value("transfer-heatmap", "transfer bandwidth (source × destination)", H.si(bw, "B/s"),
                                  f"{what}, {H.si(size, 'B')} payload, at the p50 repetition", f"{cid}: {H.si(bw, 'B/s')}",
                                  caption=esc("the run measured one source × destination pair, so there is no matrix "
                                              "to draw; hover the number for its case"),
                                  attrs={"cells": 1}))
    elif cells:
        matrix = [[cells[(r, c)][1] if (r, c) in cells else None for c in cols] for r in rows]
        tips = [[(f"{cells[(r, c)][2]}, {H.si(cells[(r, c)][0], 'B')} payload" if (r, c) in cells else None)
                 for c in cols] for r in rows]
        sizes = sorted({v[0] for v in cells.values()})
        caption = ("bandwidth at the p50 repetition, largest payload per cell "
                   f"({', '.join(H.si(s, 'B') for s in sizes)}); diagonal = copy within one device "
                   "(transfer.local); host rows/columns = transfer.h2d / .d2h by host memory kind; "
                   "grey = not measured; hover a cell for its case")
        out.append(plotter.figure("transfer-heatmap", "transfer bandwidth (source × destination)", "heatmap", matrix,
                                  rows, cols, "transfer bandwidth at p50", caption=esc(caption), tips=tips,
                                  attrs={"cells": len(cells)}))
    else:
        out.append(H.figure("transfer-heatmap", "transfer bandwidth (source × destination)",
                            why="no ok transfer.h2d / .d2h / .d2d / .local cases in this run"))
    # KV layouts
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    kv_ids: dict[str, dict[str, str]] = defaultdict(dict)
    for r in recs:
        probe = str(r.get("probe") or "")
        if probe not in ("transfer.kv", "transfer.kv_sendrecv"):
            continue
        p = json_object(r.get("params"))
        layout = p.get("layout")
        bw = _f(r.get("bytes_per_s"))
        if not layout or bw is None:
            continue
        key = (f"{probe.split('.')[-1]} {p.get('path') or 'send/recv'} {p.get('model')} ctx={p.get('ctx')} "
               f"{p.get('dtype')} @{r.get('device')}")
        groups[key][str(layout)] = bw
        kv_ids[key][str(layout)] = str(r["case_id"])
    if groups:
        layouts = [lay for lay in ("contiguous", "layerwise", "paged") if any(lay in g for g in groups.values())]
        layouts += sorted({lay for g in groups.values() for lay in g} - set(layouts))
        names = sorted(groups)
        series = {lay: [groups[g].get(lay) for g in names] for lay in layouts}
        kv_tips = {lay: [kv_ids[g].get(lay) for g in names] for lay in layouts}
        caption = ("one request's KV cache moved contiguous, layer by layer, or as scattered 16-token blocks "
                   "(gather → copy → scatter); bandwidth at the p50 repetition")
        out.append(plotter.figure("kv-layout", "KV-cache transfer by layout", "grouped_bars", names, series,
                                  "GB/s at p50", "KV transfer bandwidth by layout", caption=esc(caption), tips=kv_tips))
    else:
        out.append(H.figure("kv-layout", "KV-cache transfer by layout",
                            why="no ok transfer.kv / transfer.kv_sendrecv cases in this run"))
    if doc:
        rows = _indicator_rows(doc, "mode2", ("layout_penalty", "pinning_penalty", "direction_asymmetry",
                                              "kv_transfer_share"))
        if rows:
            out.append(rows)
    return "".join(out)


def _threshold_text(t) -> str:
    if not isinstance(t, dict):
        return "—"
    parts = [f"{k} {t[k]:g}" if H.is_num(t.get(k)) else f"{k} {t[k]}" for k in ("warn", "fail") if t.get(k) is not None]
    if t.get("better"):
        parts.append(f"{t['better']} is better")
    return ", ".join(parts) or "—"


def _cases_html(ids: list, status: dict[str, str]) -> str:
    if not ids:
        return '<span class="note">—</span>'
    items = "".join(f"<li><span class=\"mono\">{esc(c)}</span> {H.badge(status.get(str(c), '?'), 's') if str(c) in status else ''}</li>"
                    for c in ids)
    return H.details(f"{len(ids)} case{'s' if len(ids) != 1 else ''}", f"<ul>{items}</ul>")


_SHOWN = {"id", "value", "unit", "formula", "formula_text", "cases", "verdict", "threshold", "reason", "note", "summary"}


def _serving_metrics_table(serving: list[dict]) -> str:
    """The full-model serving metrics per composite (vLLM benchmark_serving / MLPerf
    definitions): layers run of the model's, TTFT, TPOT, ITL, E2E p50/p99, request and
    output-token throughput, goodput; T_pred/T_meas/κ above stay on the stack as run."""
    from harness.collector.serving import serving_rows

    def pair(row, name):
        a, b = row.get(f"{name}_p50_s"), row.get(f"{name}_p99_s")
        return "—" if a is None else f"{H.seconds(a)} / {H.seconds(b)}"

    def num(x):
        return "—" if x is None else f"{x:.3g}"

    rows = [[esc(r["case_id"]), esc(r["layers"]), esc(pair(r, "ttft")), esc(pair(r, "tpot")), esc(pair(r, "itl")),
             esc(pair(r, "e2e")), esc(num(r["request_throughput"])), esc(num(r["output_throughput"])),
             esc(num(r["goodput"])), esc(H.pct(r.get("slo_fraction")))] for r in serving_rows(serving)]
    note = ('<p class="note">Full model: a composite that runs L of a model\'s N layers is scaled by N/L and the '
            "embedding lookup, final norm and LM head (decode.lm_head, prefill.lm_head, measured in isolation) are "
            "added; SLOs, C_eff, C_nom and ε use that figure. TTFT ends at the first token out of the prefill; "
            "TPOT = (E2E − TTFT)/(tokens − 1); goodput = requests/s meeting both SLOs (vLLM --goodput).</p>")
    return ("<h3>serving metrics (full model)</h3>" + note
            + H.table(["composite case", "layers run/model", "TTFT p50/p99", "TPOT p50/p99", "ITL p50/p99",
                       "E2E p50/p99", "requests/s", "output tokens/s", "goodput req/s", "meets SLO"],
                      rows, ["id", "", "num", "num", "num", "num", "num", "num", "num", "num"],
                      'data-table="serving-metrics"'))


def _indicator_table(items: list[tuple[str, dict]], status: dict[str, str], table_id: str) -> str:
    rows = []
    for name, ind in items:
        if not isinstance(ind, dict):
            continue
        verdict = ind.get("verdict") or "—"
        why = ind.get("reason") or ind.get("note") or ind.get("summary") or ""
        detail_keys = {k: v for k, v in ind.items() if k not in _SHOWN}
        detail = ""
        if detail_keys:
            text = json.dumps(detail_keys, indent=1, default=str)
            if len(text) > 6000:
                text = text[:6000] + "\n… (truncated; indicators.json has it all)"
            detail = H.details("details", f"<pre class=\"mono\">{esc(text)}</pre>")
        rows.append([f'<span class="mono">{esc(ind.get("id") or name)}</span>',
                     esc(H.value_text(ind.get("value"), ind.get("unit"))), esc(ind.get("unit") or ""),
                     H.badge(verdict), esc(_threshold_text(ind.get("threshold"))),
                     f'<span class="mono">{esc(ind.get("formula"))}</span>: {esc(ind.get("formula_text"))}',
                     esc(why) + detail, _cases_html(ind.get("cases") or [], status)])
    return H.table(["indicator", "value", "unit", "verdict", "threshold", "formula", "why / note", "cases behind it"],
                   rows, ["id", "num", "", "", "", "", "reason", ""], f'data-table="{esc(table_id)}"')


def _indicator_rows(doc: dict, mode: str, names: tuple[str, ...]) -> str:
    items = [(n, (doc.get(mode) or {}).get(n)) for n in names if (doc.get(mode) or {}).get(n)]
    if not items:
        return ""
    return f"<h3>{esc(mode)} indicators shown here</h3>" + _indicator_table(items, {}, f"{mode}-excerpt")


def indicators_section(run, doc: dict | None, reason: str = "") -> str:
    if doc is None:
        return f"<p>no indicators: {esc(reason)}</p>"
    status = {str(r["case_id"]): str(r.get("status")) for r in _records(run.cases)}
    summary = doc.get("summary") or {}
    out = ['<p class="headline">verdicts: ' + " ".join(f"{H.badge(k)} {v}" for k, v in sorted(summary.items())) + "</p>",
           (f'<p class="note">thresholds from configs/indicators.yaml and the suite\'s overrides; '
            f'indicators.json generated {esc(doc.get("generated_at"))}</p>')]
    serving = []
    for e in doc.get("serving") or []:
        for key in ("kappa", "C_eff", "C_nom", "epsilon"):
            if isinstance(e.get(key), dict):
                serving.append((f"{key} {e.get('case_id')}", {**e[key], "id": f"{e[key].get('id') or key} — {e.get('case_id')}"}))
    if serving:
        out.append('<div data-mode="serving"><h3>Serving — κ, C_eff, C_nom, ε per composite</h3>'
                   + _indicator_table(serving, status, "serving-indicators") + "</div>")
    for mode, title in MODES:
        items = list((doc.get(mode) or {}).items())
        out.append(f'<div data-mode="{mode}"><h3>{esc(title)}</h3>'
                   + (_indicator_table(items, status, mode) if items else '<p class="note">no indicator</p>') + "</div>")
    return "".join(out)


def failures_section(run) -> str:
    bad = [r for r in _records(run.cases) if r.get("status") in NOT_OK]
    if not bad:
        return '<p data-failures="0">every case ended ok.</p>'
    order = {"failed": 0, "timeout": 1, "interrupted": 2, "skipped": 3}
    bad.sort(key=lambda r: (order.get(r.get("status"), 4), str(r["case_id"])))
    counts = defaultdict(int)
    for r in bad:
        counts[r["status"]] += 1
    rows = [[esc(r["case_id"]), H.badge(r["status"], "s"), esc(r.get("reason") or "(no reason recorded)")] for r in bad]
    head = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return (f'<p data-failures="{len(bad)}">{esc(head)}</p>'
            + H.table(["case", "status", "reason"], rows, ["id", "", "reason"], 'data-table="failures"'))


def cases_section(run) -> str:
    rows = []
    emulated_count = 0
    for r in _records(run.cases):
        bound = r.get("bound") if isinstance(r.get("bound"), str) else ""
        if _f(r.get("busbw_Bps")) is not None:
            rate = H.si(_f(r.get("busbw_Bps")), "B/s") + " busbw"
        elif bound == "compute" or (_f(r.get("flops")) and not _f(r.get("bytes"))):
            rate = H.si(_f(r.get("flops_per_s")), "FLOP/s")
        elif _f(r.get("bytes")):
            rate = H.si(_f(r.get("bytes_per_s")), "B/s")
        else:
            rate = "—"
        n = _f(r.get("n"))
        # A dtype the CPU has no arithmetic for ran through fp32 (harness.dtype_path):
        # marked, with how it ran in the marker's title; its roofline is against fp32.
        emulated = dtype_path.emulated(r)
        emulated_count += bool(emulated)
        mark = (f' <span class="emulated" data-native="false" title="{esc(emulated)}">{esc(dtype_path.MARK)}</span>'
                if emulated else "")
        roof = H.pct(_f(r.get("roofline_fraction")))
        rows.append([esc(r["case_id"]) + mark, H.badge(str(r.get("status")), "s"), esc("" if n is None else int(n)),
                     esc(H.seconds(_f(r.get("p50_s")))), esc(H.seconds(_f(r.get("p99_s")))), esc(rate), esc(bound or "—"),
                     esc(roof + (" of fp32" if emulated and roof != "—" else ""))])
    note = ""
    if emulated_count:
        note = (f'<p class="note" data-emulated="{emulated_count}">{emulated_count} case(s) marked '
                f'“{esc(dtype_path.MARK)}”: a dtype this CPU has no arithmetic for, computed through fp32 and '
                "judged against the fp32 peak (hover the marker for the path).</p>")
    return note + H.details(f"all {len(rows)} cases", H.table(["case", "status", "n", "p50", "p99", "rate at p50", "bound", "roofline"],
                                                       rows, ["id", "", "num", "num", "num", "num", "", "num"],
                                                       'data-table="cases"'))


def verdict_section(run, doc: dict | None) -> str:
    """The verdict that opens the report: overall PASS / WARN / FAIL, counts and the
    largest findings, from :mod:`harness.headline` (the same summary ``run``, ``show``
    and ``collect`` print). Built from the loaded cases and ``doc`` rather than by
    re-reading the folder, so a report whose indicators were computed on the fly
    (no indicators.json yet) judges the same indicators it shows. A headline that
    cannot be computed says why in the block instead of costing the report."""
    try:
        from harness import headline

        summary = headline.summarize(_records(run.cases), doc, run.manifest)
    except Exception as exc:  # noqa: BLE001 - the rest of the report stands without it
        return H.verdict_block(None, f"verdict unavailable: {type(exc).__name__}: {exc}")
    return H.verdict_block(summary)


def build(run, generator: str) -> str:
    """The run report as one HTML document."""
    doc, reason = run.indicators, ""
    if doc is None:
        try:
            from harness.collector import collect

            doc = collect(run)
            reason = "indicators.json absent; computed for this report (coherence collect RUN writes it)"
        except Exception as exc:  # noqa: BLE001 - the report still shows the cases
            reason = f"indicators.json absent and the collector failed: {type(exc).__name__}: {exc}"
    plotter = Plotter()
    durations = durations_by_case(run.samples)
    counts = run.cases["status"].value_counts().to_dict() if len(run.cases) else {}
    sections = [
        ("verdict", "Verdict", verdict_section(run, doc)),
        ("environment", "Environment fingerprint", environment_section(run)),
        ("capacity", "Capacity: nominal → effective", capacity_section(run, doc, plotter, reason)),
        ("roofline", "Roofline", roofline_section(run, doc, plotter)),
        ("latency", "Latency CDFs per family", latency_section(run, plotter, durations)),
        ("collectives", "Collectives: busbw against size", collective_section(run, doc, plotter)),
        ("transfers", "Transfers and KV layouts", transfer_section(run, doc, plotter)),
        ("indicators", "Indicators per mode", indicators_section(run, doc, reason)),
        ("failures", "Failed, timed-out and skipped cases", failures_section(run)),
        ("cases", "Cases", cases_section(run)),
    ]
    if reason and doc is not None:
        sections[2] = (sections[2][0], sections[2][1], f'<p class="note">{esc(reason)}</p>' + sections[2][2])
    if not plotter.ok:  # right after the verdict, which needs no plot
        sections.insert(1, ("plots", "Plots unavailable", f"<p>{esc(plotter.why)}; tables are complete.</p>"))
    nav = [(a, h.split(":")[0].split(" per ")[0]) for a, h, _ in sections]
    return H.page(f"coherence report — {run.run_id}", _header(run, counts), nav, sections, generator)
