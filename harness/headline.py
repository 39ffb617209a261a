"""The verdict a person acts on: overall PASS / WARN / FAIL of a run, its counts and its
largest findings in plain sentences, and the exit code of ``--fail-on`` for CI gating.

The shape follows the tools performance engineers already gate on: DCGM diagnostics
report each test as Pass / Warn / Fail and the run as the worst of them
(https://docs.nvidia.com/datacenter/dcgm/latest/user-guide/dcgm-diagnostics.html), and an
MLPerf submission is VALID or INVALID as a whole (MLPerf Inference rules,
https://github.com/mlcommons/inference_policies). Here the inputs are the case statuses
(cases.parquet) and the indicator verdicts (indicators.json, INDICATORS.md).
"""

from __future__ import annotations

import math
from pathlib import Path

from harness.errors import UserError

# The choices of --fail-on, most lenient first. `case` is the behaviour before the flag
# existed: exit 1 only when a case failed or timed out.
FAIL_ON = ("case", "fail", "warn")
DEFAULT_FAIL_ON = "case"

CASE_FAILED = ("failed", "timeout", "interrupted")
MAX_FINDINGS = 5


def verdict_summary(run_path: Path) -> dict:
    """The verdict summary of the run folder ``run_path``.

    Reads cases.parquet (case statuses) and indicators.json (indicator verdicts; absent
    means no indicator is counted). Returns::

        {"overall": "PASS" | "WARN" | "FAIL",
         "counts": {"pass", "warn", "fail", "info", "not_measurable", "not_judged",
                    "cases_ok", "cases_failed", "cases_skipped", "cases_total"},   # ints
         "findings": [str, ...]}   # 3-5 plain sentences with figures, largest first

    FAIL: a case failed / timed out, or an indicator's verdict is ``fail``; WARN: an
    indicator's verdict is ``warn``; else PASS. Indicators marked ``not_judged`` (e.g. a
    CPU case with more ranks than usable cores, oversubscribed) count as neither.
    Raises UserError (one line naming the file) when the run folder cannot be read.
    """
    from harness.results import read_indicators
    from harness.store import read_cases

    from harness.store import read_manifest

    path = Path(run_path)
    if not (path / "manifest.json").exists() and not (path / "cases.parquet").exists():
        raise UserError(f"{path}: not a run folder (no manifest.json)")
    cases = read_cases(path)
    manifest = read_manifest(path) if (path / "manifest.json").exists() else None
    return summarize(cases.to_dict(orient="records") if len(cases) else [], read_indicators(path), manifest)


def summarize(cases: list[dict], indicators: dict | None, manifest: dict | None = None) -> dict:
    """:func:`verdict_summary` of already loaded data: ``cases`` as records (each with
    ``case_id``, ``status``, ``reason``), ``indicators`` the indicators.json document or
    None, ``manifest`` the run's manifest (None: the run is taken as complete). A run
    whose manifest status is not ``complete`` (killed, or interrupted before its last
    case) is FAIL: its verdict is about cases that never ran; ``counts["incomplete"]``
    is then the number of planned cases without a row (``planned_cases``; at least 1)."""
    counts = {"pass": 0, "warn": 0, "fail": 0, "info": 0, "not_measurable": 0, "not_judged": 0,
              "cases_ok": 0, "cases_failed": 0, "cases_skipped": 0, "cases_total": len(cases), "incomplete": 0}
    run_status = (manifest or {}).get("status", "complete")
    done = len({str(r.get("case_id")) for r in cases})  # cases with a result
    if run_status != "complete":
        planned = (manifest or {}).get("planned_cases")
        counts["incomplete"] = max(1, int(planned) - done) if isinstance(planned, int) else 1
    failed = []
    for row in cases:
        status = str(row.get("status") or "")
        if status == "ok":
            counts["cases_ok"] += 1
        elif status == "skipped":
            counts["cases_skipped"] += 1
        elif status in CASE_FAILED:
            counts["cases_failed"] += 1
            failed.append(row)
    judged = []
    for ind in _indicators(indicators):
        v = ind["verdict"]
        if ind.get("not_judged"):
            counts["not_judged"] += 1
        elif v == "ok":
            counts["pass"] += 1
        elif v in ("warn", "fail", "info"):
            counts[v] += 1
        elif v == "not measurable":
            counts["not_measurable"] += 1
        if v in ("warn", "fail") and not ind.get("not_judged"):
            judged.append(ind)
    if counts["cases_failed"] or counts["fail"] or counts["incomplete"]:
        overall = "FAIL"
    elif counts["warn"]:
        overall = "WARN"
    else:
        overall = "PASS"
    findings = _findings(failed, judged, indicators, counts)
    if counts["incomplete"]:
        planned = (manifest or {}).get("planned_cases")
        of = f" of {planned} planned" if isinstance(planned, int) else ""
        findings = [f"the run is {run_status}: {done}{of} cases have a result; "
                    f"coherence run --resume {(manifest or {}).get('run_id', 'RUN')} completes it."] + findings
        findings = findings[:MAX_FINDINGS]
    return {"overall": overall, "counts": counts, "findings": findings}


def exit_code(summary: dict, fail_on: str = DEFAULT_FAIL_ON) -> int:
    """The process exit code for ``--fail-on fail_on`` given a :func:`verdict_summary`.

    ``case``: 1 when a case failed or timed out (the default, as before the flag);
    ``fail``: also 1 when an indicator's verdict is fail; ``warn``: also 1 on a warn.
    Each level includes the stricter ones, as DCGM's diag treats a Fail as worse than a
    Warn. Raises UserError for any other ``fail_on``.
    """
    if fail_on not in FAIL_ON:
        raise UserError(f"--fail-on: '{fail_on}' is not one of {', '.join(FAIL_ON)}")
    c = summary.get("counts") or {}
    if c.get("cases_failed") or c.get("incomplete"):
        return 1
    if fail_on in ("fail", "warn") and c.get("fail"):
        return 1
    if fail_on == "warn" and c.get("warn"):
        return 1
    return 0


def headline_lines(summary: dict) -> list[str]:
    """The summary as plain text lines (no markup): the verdict line with its counts,
    then one numbered line per finding. Used by run, show and collect."""
    c = summary["counts"]
    # The case statuses present (as `show` always printed them); indicators all three.
    parts = [f"{c['cases_ok']} ok"] + [f"{c[k]} {k[6:]}" for k in ("cases_failed", "cases_skipped") if c.get(k)]
    if c.get("incomplete"):
        parts.append(f"{c['incomplete']} not run (partial run)")
    ind = [f"{c['pass']} pass", f"{c['warn']} warn", f"{c['fail']} fail"]
    extra = [f"{c[k]} {k.replace('_', ' ')}" for k in ("not_judged",) if c.get(k)]
    lines = [f"verdict {summary['overall']}: cases {', '.join(parts)}; indicators {', '.join(ind + extra)}"]
    lines += [f"  {i}. {text}" for i, text in enumerate(summary.get("findings") or [], 1)]
    return lines


# -- findings -------------------------------------------------------------------------


def _indicators(doc: dict | None) -> list[dict]:
    """Every judged entry of indicators.json: mode 1-4 indicators and each serving
    composite's κ, as dicts with name, mode, value, unit, verdict, threshold."""
    out = []
    if not isinstance(doc, dict):
        return out
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for name, ind in (doc.get(mode) or {}).items() if isinstance(doc.get(mode), dict) else ():
            if isinstance(ind, dict) and "verdict" in ind:
                out.append({**ind, "name": name, "mode": mode})
    for entry in doc.get("serving") or []:
        if isinstance(entry, dict) and isinstance(entry.get("kappa"), dict) and "verdict" in entry["kappa"]:
            out.append({**entry["kappa"], "name": "coherence ratio κ", "mode": "serving",
                        "cases": [entry.get("case_id")]})
    return out


def _miss(ind: dict) -> float:
    """How far the value is past its threshold, as |log(value / threshold)|: the size
    used to put the largest finding first (0 where it cannot be told)."""
    th = ind.get("threshold") or {}
    limit = th.get(ind["verdict"]) if isinstance(th, dict) else None
    v = ind.get("value")
    if not isinstance(v, (int, float)) or not isinstance(limit, (int, float)) or v <= 0 or limit <= 0:
        return 0.0
    return abs(math.log(v / limit))


# Units worth writing after a figure; other unit texts ("fraction of step", "E(n)")
# restate the indicator's name and are left out of the one-line sentence.
PHYSICAL = ("s", "B", "B/s", "FLOP/s", "FLOP", "tok/s", "tokens/s", "req/s")


def _figure(value, unit) -> str:
    from harness.units import fmt

    if not isinstance(value, (int, float)):
        return str(value)
    if unit in PHYSICAL:
        return fmt(value, unit)
    return f"{value:.3g}"


def short_case(case_id) -> str:
    """A case id without its parameters: ``gemm.square[n=1024,dtype=fp32]@cpu:0`` ->
    ``gemm.square@cpu:0`` (enough to find it in `show`'s family table)."""
    import re

    return re.sub(r"\[[^\]]*\]", "", str(case_id))


def _sentence(ind: dict) -> str:
    th = ind.get("threshold") or {}
    limit = th.get(ind["verdict"]) if isinstance(th, dict) else None
    side = "below" if (th.get("better") if isinstance(th, dict) else None) == "higher" else "above"
    name = str(ind["name"]).replace("_", " ")
    where = ind.get("cases") or []
    case = f" ({short_case(where[0])}{' +%d more' % (len(where) - 1) if len(where) > 1 else ''})" if where else ""
    text = f"{ind['mode'].replace('mode', 'mode ')} {name} {_figure(ind.get('value'), ind.get('unit'))}{case}"
    if isinstance(limit, (int, float)):
        text += f", {ind['verdict']} {side} {_figure(limit, ind.get('unit'))}"
    else:
        text += f" ({ind['verdict']})"
    return text + "."


def _findings(failed: list[dict], judged: list[dict], doc: dict | None, counts: dict) -> list[str]:
    """Largest first: failed cases, fail verdicts, warn verdicts (each ordered by how far
    past its threshold), then the capacity headline and the loss from scaling out."""
    out = []
    if failed:
        first = failed[0]
        reason = str(first.get("reason") or "no reason recorded").splitlines()[0][:120]
        out.append(f"{len(failed)} case(s) failed or timed out; first {first.get('case_id')}: {reason}.")
    for level in ("fail", "warn"):
        for ind in sorted((i for i in judged if i["verdict"] == level), key=_miss, reverse=True):
            out.append(_sentence(ind))
    cap = (doc or {}).get("capacity") if isinstance(doc, dict) else None
    info = []
    if isinstance(cap, dict) and cap.get("C_eff") is not None:
        from harness.units import fmt

        eps = cap.get("epsilon")
        ws = f" at world size {cap['world_size']}" if cap.get("world_size") else ""
        basis = cap.get("basis") if isinstance(cap.get("basis"), dict) else {}
        # C_nom takes a measured ceiling where the device has no datasheet figure (a CPU's
        # memory bandwidth): then it moves with the run, and the sentence says so.
        measured = sorted(k for k in ("compute", "memory", "link") if basis.get(k) == "isolated")
        what = " and ".join(measured) + (" ceilings" if len(measured) > 1 else " ceiling")
        of = (f"C_nom {fmt(cap.get('C_nom'), 'tok/s')} (its {what} measured, not nominal)"
              if measured else f"nominal {fmt(cap.get('C_nom'), 'tok/s')}")
        info.append(f"best serving capacity {fmt(cap['C_eff'], 'tok/s')}{ws} ({short_case(cap.get('from_case'))})"
                    + (f", {eps:.2g} of {of}" if isinstance(eps, (int, float)) else "")
                    + ".")
    if isinstance(cap, dict):
        for loss in cap.get("scaling") or []:
            if isinstance(loss, dict) and loss.get("sentence"):
                info.append(str(loss["sentence"]))
    if counts.get("not_judged"):
        info.append(f"{counts['not_judged']} indicator(s) not judged: oversubscribed CPU ranks (more than the "
                    "usable cores), the harness's setup, not the interconnect.")
    # Capacity and scaling are always worth a line; problems take the rest of the five.
    room = max(MAX_FINDINGS - min(len(info), 2), 3)
    return out[:room] + info[: MAX_FINDINGS - len(out[:room])]
