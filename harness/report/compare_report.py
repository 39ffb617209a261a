"""The HTML report of a comparison (``coherence report --compare BASELINE... CANDIDATE``)."""

from __future__ import annotations

import math

import numpy as np

from harness.report import html as H
from harness.report.html import esc
from harness.report.run_report import Plotter, durations_by_case

MAX_OVERLAYS = 12
MAX_SLA_ROWS = 40


def _overlay_cases(rows: list[dict]) -> list[dict]:
    """Regressed, improved and floor-held cases first, then the largest |log p50 ratio|."""
    def shift(r):
        ratio = r.get("p50_ratio")
        return abs(math.log(ratio)) if ratio and ratio > 0 else 0.0

    first = [r for r in rows if r["verdict"] != "unchanged" or r.get("within_noise_floor")]
    rest = sorted((r for r in rows if r not in first), key=shift, reverse=True)
    return (sorted(first, key=shift, reverse=True) + rest)[:MAX_OVERLAYS]


def _energy_note(doc: dict) -> str:
    """Energy beside the verdict, shown and not judged: the same-class line (the
    document's ``energy.why``) or a generation comparison's performance-per-joule line
    (harness.compare.energy_lines, first line), each with why cases lack it; nothing for
    documents of older code."""
    from harness.compare import energy_lines

    gen = doc.get("generation")
    line = (energy_lines(gen)[:1] or [""])[0] if gen else ((doc.get("energy") or {}).get("why") or "")
    return f'<p class="note" data-note="energy">energy: {esc(line)}</p>' if line else ""


def build(baselines: list, candidate, gates: dict, cfg: dict, generator: str) -> str:
    from harness.compare import (
        CASE_HEADERS,
        _case_cells,
        add_render_summary,
        compare_runs,
        floor_line,
        summary_line,
        to_jsonable,
    )

    doc = compare_runs(baselines, candidate, gates, cfg)
    plotter = Plotter()
    rows = doc["cases"]
    base_d = [durations_by_case(r.samples) for r in baselines]
    cand_d = durations_by_case(candidate.samples)

    # verdict table: the cases that changed (or that the noise floor held) first, in the
    # open; the unchanged ones complete but folded, as compare prints them (issue 14 §5)
    cells, quiet = [], []
    for row in rows:
        raw = _case_cells(row)
        c = [esc(x) for x in raw]
        # the verdict as a badge, then its qualifiers ("(not gated)", "(within noise floor; ...)")
        rest = raw[-1][len(row["verdict"]):].strip()
        c[-1] = H.badge(row["verdict"]) + (" " + esc(rest) if rest else "")
        reasons = row.get("reasons") or row.get("held_by_floor") or []
        c.append(esc("; ".join(reasons)) if reasons else "—")
        (cells if row["verdict"] != "unchanged" or row.get("within_noise_floor") else quiet).append(c)
    # the CI columns may wrap before their bracket: twelve columns fit 1400 px
    case_cls = ["id", "num", "num", "num wrap", "num", "num", "num wrap", "", "", "", "", "reason"]
    verdict_html = (f'<p class="headline">{esc(summary_line(doc))}</p><p class="note">{esc(floor_line(doc))}; gate '
                    f'{esc(doc["gate_text"])}, alpha {esc(doc["alpha"])} (Holm)</p>'
                    + _energy_note(doc)
                    + (H.table(CASE_HEADERS + ["why"], cells, case_cls, 'data-table="verdicts"') if cells
                       else '<p data-table="verdicts">no case changed.</p>'))
    if quiet:
        verdict_html += H.details(f"{len(quiet)} cases unchanged", H.table(CASE_HEADERS + ["why"], quiet, case_cls,
                                                                          'data-table="verdicts-unchanged"'))
    if doc["not_compared"]:
        verdict_html += H.details(f"{len(doc['not_compared'])} cases not compared (status, or a baseline preempted in every repetition)", H.table(
            ["case", "baseline", "candidate", "reason"],
            [[esc(r["case_id"]), H.badge(str(r["status_a"]), "s"), H.badge(str(r["status_b"]), "s"), esc(r["reason"])]
             for r in doc["not_compared"]], ["id", "", "", "reason"], 'data-table="not-compared"'))
    for key, what in (("only_in_baseline", "only in the baseline"), ("only_in_candidate", "only in the candidate")):
        if doc[key]:
            verdict_html += H.details(f"{len(doc[key])} cases {what}",
                                      "<ul>" + "".join(f'<li class="mono">{esc(c)}</li>' for c in doc[key]) + "</ul>")

    # CDF overlays
    chosen = _overlay_cases(rows)
    overlays = []
    for r in chosen:
        cid = r["case_id"]
        a = np.concatenate([d[cid] for d in base_d if cid in d] or [np.array([])])
        overlays.append({"label": cid, "a": a, "b": cand_d.get(cid, np.array([])), "verdict": r["verdict"],
                         "tau": (r.get("sla") or {}).get("threshold_s")})
    if overlays:
        caption = (f"{len(overlays)} of {len(rows)} compared cases: every regressed, improved or floor-held case, then "
                   "the largest p50 shifts; blue baseline (repeats pooled), orange candidate; dotted: the SLA threshold τ")
        cdf = plotter.figure("cdf-overlay", "duration CDFs, baseline vs candidate", "cdf_overlays", overlays,
                             "per-repetition duration CDFs", caption=esc(caption))
    else:
        cdf = H.figure("cdf-overlay", "duration CDFs, baseline vs candidate", why="no case ok in both runs")

    # SLA amplification
    def amp_key(r):
        amp = r["sla"].get("amplification")
        return -1.0 if amp is None else (math.inf if math.isinf(amp) else abs(math.log(amp)) if amp > 0 else math.inf)

    sla_rows = sorted(rows, key=amp_key, reverse=True)[:MAX_SLA_ROWS]
    if sla_rows:
        caption = (f"{len(sla_rows)} of {len(rows)} cases, largest change first: share of repetitions over τ (the "
                   "case's SLO from config, else the baseline's p99), candidate over baseline")
        sla = plotter.figure("sla-amplification", "SLA amplification", "sla_amplification",
                             [{"label": r["case_id"], "amp": r["sla"].get("amplification"), "verdict": r["verdict"]}
                              for r in sla_rows], gates.get("sla"), "SLA amplification per case", caption=esc(caption))
    else:
        sla = H.figure("sla-amplification", "SLA amplification", why="no case ok in both runs")

    # indicators A vs B
    ind = doc["indicators"]
    if ind.get("measurable"):
        # Beyond their noise first, as compare prints them (compare.add_render_summary:
        # non-overlapping CIs, else a relative change of at least min_change); the rest,
        # mostly unchanged bookkeeping, folded away but complete.
        add_render_summary(doc, cfg)

        def delta_rows(deltas):
            return [[esc(d["mode"]), f'<span class="mono">{esc(d["indicator"])}</span>', esc(H.num(d["baseline"])),
                     esc(H.num(d["candidate"])), esc(H.num(d.get("delta"))), esc(H.num(d.get("ratio"))),
                     esc(d.get("unit") or "")] for d in deltas]

        heads = ["mode", "indicator", "baseline", "candidate", "Δ", "ratio", "unit"]
        cls = ["", "id", "num", "num", "num", "num", ""]
        moved = [d for d in ind["deltas"] if d.get("beyond_noise")]
        rest = [d for d in ind["deltas"] if not d.get("beyond_noise")]
        ind_html = (f'<p class="note">{len(moved)} of {len(ind["deltas"])} indicators moved beyond their noise '
                    f'(non-overlapping intervals, else a change of at least {H.pct(ind.get("min_change"))}).</p>'
                    + H.table(heads, delta_rows(moved), cls, 'data-table="indicator-deltas"'))
        if rest:
            ind_html += H.details(f"{len(rest)} within their noise, or measured in one run only",
                                  H.table(heads, delta_rows(rest), cls, 'data-table="indicator-deltas-within-noise"'))
    else:
        ind_html = f"<p>{esc(ind.get('reason'))}</p>"

    env = doc["environment"]
    if env["changed"]:
        env_html = (f"<p>{len(env['changed'])} facts changed, {env['identical']} identical.</p>" + H.table(
            ["category", "fact", "baseline", "candidate"],
            [[esc(d["category"]), f'<span class="mono">{esc(d["fact"])}</span>', esc(to_jsonable(d["baseline"])),
              esc(to_jsonable(d["candidate"]))] for d in env["changed"]], attrs='data-table="fingerprint-diff"'))
    else:
        env_html = f'<p data-table="fingerprint-diff">no change ({env["identical"]} facts identical).</p>'

    gen = doc.get("generation")
    gen_html = ""
    if gen:
        gen_rows = [[esc(c["case_id"]), esc(c.get("class_a")), esc(c.get("class_b")), esc(H.si(c.get("rate_a"), c.get("rate_unit") or "")),
                     esc(H.si(c.get("rate_b"), c.get("rate_unit") or "")), esc(H.pct(c.get("roofline_a"))), esc(H.pct(c.get("roofline_b")))]
                    for c in gen.get("cases") or []]
        gen_html = ("<h3>different device classes: efficiency side by side</h3>"
                    + H.table(["case", "class A", "class B", "rate A", "rate B", "roofline A", "roofline B"], gen_rows,
                              ["id", "", "", "num", "num", "num", "num"]))

    base_ids = " + ".join(b["run_id"] for b in doc["baselines"])
    subtitle = (f"baseline <b>{esc(base_ids)}</b> ({len(doc['baselines'])} run{'s' if len(doc['baselines']) > 1 else ''}) → "
                f"candidate <b>{esc(doc['candidate']['run_id'])}</b> · gate {esc(doc['gate_text'])} · "
                f"{esc(doc['summary']['gated_regressed'])} gated case(s) regressed")
    sections = [
        ("verdicts", "Verdict per case", verdict_html),
        ("cdf", "Duration CDF overlays", cdf),
        ("sla", "SLA amplification", sla),
        ("indicators", "Mode 1–4 indicators, baseline vs candidate", ind_html),
        ("fingerprint", "Environment fingerprint diff", env_html + gen_html),
    ]
    if not plotter.ok:
        sections.insert(0, ("plots", "Plots unavailable", f"<p>{esc(plotter.why)}; tables are complete.</p>"))
    nav = [(a, h) for a, h, _ in sections]
    return H.page(f"coherence compare — {base_ids} → {doc['candidate']['run_id']}", subtitle, nav, sections, generator)
