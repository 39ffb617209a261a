"""The must-show figures of issue 16, read from one device check's output folder.

tests/gpu/device_check.sh leaves, under one folder: the run folders of its suites (told
apart by their manifest ``label``), ``gemm_ratio.json`` from tests/gpu/bare_matmul.py and
``steps.tsv`` (one line per step: name, exit status, seconds, limit). This module reads
what is there and writes ``summary.txt`` and ``summary.json``. Any figure it cannot read
(a run that did not happen, a column or parameter this build does not have, a null value)
is printed as ``missing: <why>``; it never stops at the first gap.

Several calls (a full call, then a targeted rerun) are read together when each call's
folder is copied into one folder, one subfolder per call (``call1/``, ``call2/``): runs
are found at any depth and the newest run of each label counts (run ids sort by start
time), the newest ``gemm_ratio.json`` (its ``written_at``) counts, and every
``steps.tsv`` is one call, their script times added up.

A "met" bar on a run's counts (the JAX quick suite's "0 failed") is met only when the run
is complete (manifest status ``complete``) and no case failed, timed out or was
interrupted: a run cut short has not shown that its missing cases pass. A bar on one
measured case (the in-place paged kernel's roofline fraction) judges that case, which ran
whole; its figure's heading says when the run around it was partial.

Figures (issue 16, "Must show"):
- GEMM: the harness's bf16 8192³ p50 over a bare ``torch.matmul`` loop (bare_matmul.py).
- κ of composite.tp_decode_step at batch 1 and 32, graph and eager (indicators.json's
  ``serving`` entries; κ = T_pred / T_meas, docs/INDICATORS.md).
- decode.attention paged at batch 32, ctx 8192, bf16: ``roofline_fraction`` per paged
  kernel, and the layout penalty per kernel = contiguous B/s / paged B/s at the same other
  parameters (formula F2.layout_penalty, harness/collector/formulas.py).
- J/token of the TP step = ``energy_j`` (J per repetition) / ``batch`` (one repetition is
  one decode step of ``batch`` sequences, one token each).
- The JAX quick suite on the GPU: cases failed (and timed out).
- Device time: the script's own wall time and each step's; the machine's start and the
  transfers are not in it (the device tool's lease reports those).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# A finite float or None (NaN, inf, None, text): the collector's own helper.
from harness.collector.formulas import finite
# Case statuses that fail a "0 failed" bar: the run verdict's own set (failed, timeout,
# interrupted).
from harness.headline import CASE_FAILED

# Each figure's run by manifest label (device_check.sh's --label), the first label found
# counts: the per-figure steps' labels, then the one gpu-check run that held all the
# must-show probes before the steps were split (its output folders still read).
LABELS = {"tp": ("device-gpu-tp", "device-gpu-check"), "paged": ("device-gpu-paged", "device-gpu-check"),
          "gpu_rest": ("device-gpu-check-rest",), "quick": ("device-quick",), "jax": ("device-jax-quick",)}
TP = "composite.tp_decode_step"
# The TP step cases the issue names: batch 1 and 32, graph and eager.
TP_POINTS = ((1, "graph"), (1, "eager"), (32, "graph"), (32, "eager"))
ATTN = "decode.attention"
# The paged-attention point the issue names.
ATTN_POINT = {"batch": 32, "ctx": 8192, "dtype": "bf16"}
# Parameters that tell a paged case's kernel apart; the first one present names it.
KERNEL_KEYS = ("kernel",)
# Paged kernels that read the KV in place (probes/decode.py PAGED_KERNELS) and the roofline
# fraction issue 16 requires of them at ATTN_POINT.
IN_PLACE = ("flex",)
PAGED_REQUIRED = 0.6
# The paged kernels the layout penalty must be given for ("both kernels": in place and
# the gather baseline), by the kernel the case ran.
PAGED_EXPECTED = ("flex", "gather_sdpa")


class Missing(Exception):
    """A figure that cannot be read; the message says why."""


def find_runs(root: Path) -> dict:
    """Run folders under ``root``, at any depth, by label: {label: newest folder}. A folder
    counts as a run when it holds manifest.json (its ``label`` key). Newest: the largest
    run id (the folder's name; run ids sort by start time), whatever folder holds it, so
    two calls' output copied side by side give the rerun's run of a label."""
    runs: dict = {}
    for manifest in sorted(Path(root).glob("**/manifest.json"), key=lambda m: (m.parent.name, str(m))):
        try:
            label = json.loads(manifest.read_text()).get("label") or ""
        except (OSError, ValueError):
            continue
        runs[label] = manifest.parent
    return runs


def load(folder: Path | None, what: str):
    """The run (harness.results.Run) in ``folder``; Missing naming ``what`` when there is
    none or it cannot be read."""
    if folder is None:
        raise Missing(f"no {what} run folder (its step did not start or wrote nothing)")
    from harness.errors import UserError
    from harness.results import load_path

    try:
        return load_path(Path(folder))
    except (UserError, OSError, ValueError) as exc:
        raise Missing(f"{what} run {folder} unreadable: {str(exc)[:200]}") from None


def params_of(row) -> dict:
    """A case row's parameters (``params``, JSON text; {} when unreadable)."""
    try:
        p = json.loads(row["params"]) if isinstance(row.get("params"), str) else row.get("params")
    except ValueError:
        return {}
    return p if isinstance(p, dict) else {}


def extra_of(row) -> dict:
    """A case row's ``extra`` (JSON text; {} when absent or unreadable)."""
    raw = row.get("extra")
    try:
        out = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def text_of(row, column: str) -> str | None:
    """A text column of a case row; None when absent, null or NaN (pandas fills a
    column some rows lack with NaN)."""
    v = row.get(column)
    return v if isinstance(v, str) and v else None


def figure(name: str, fn) -> dict:
    """{"figure": name, "value": fn()} or, when fn raises Missing, {"missing": why}."""
    try:
        value = fn()
    except Missing as exc:
        return {"figure": name, "value": None, "missing": str(exc)}
    return {"figure": name, "value": value}


def _newest_gemm_doc(out: Path):
    """(path, document) of the gemm_ratio.json under ``out`` (any depth) that counts: one
    with a ratio before one without, then the latest ``written_at`` (ISO UTC; documents
    written before the field existed sort first), then the path. None when there is none."""
    docs = []
    for path in sorted(Path(out).glob("**/gemm_ratio.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            docs.append((doc.get("ratio") is not None, str(doc.get("written_at") or ""), str(path), doc))
    return max(docs, key=lambda d: d[:3])[2:] if docs else None


def gemm_ratio(out: Path) -> dict:
    """The GEMM comparison of bare_matmul.py's gemm_ratio.json under ``out``."""
    found = _newest_gemm_doc(out)
    if found is None:
        raise Missing("gemm_ratio.json not written (the bare_matmul step failed or did not run)")
    doc = found[1]
    if doc.get("ratio") is None:
        raise Missing(doc.get("ratio_reason") or "no ratio in gemm_ratio.json")
    h = doc.get("harness") or {}
    bare = doc.get("bare") or {}
    return {"ratio": doc["ratio"], "required": doc.get("required_ratio"), "meets": doc.get("meets_required"),
            "harness_tflops": (h.get("flops_per_s") or 0) / 1e12,
            "bare_tflops": {k: (v.get("batch_flops_per_s") or 0) / 1e12 for k, v in bare.items()}}


def _tp_rows(run) -> list:
    cases = run.cases
    rows = [r for _, r in cases[cases["probe"] == TP].iterrows()] if "probe" in cases else []
    if not rows:
        raise Missing(f"no {TP} case in the run")
    return rows


def _graph_of(row) -> str:
    """'graph' or 'eager' for a TP row; a run whose TP step has no ``graph`` parameter
    predates the parameter and ran eagerly."""
    p = params_of(row)
    if "graph" not in p:
        return "eager (no graph parameter in this build)"
    return "graph" if p["graph"] in (True, "true", "True") else "eager"


def _shape(p: dict) -> str:
    """The TP step's model and layers run, e.g. 'llama-3.1-8b, 2 layers'."""
    return f"{p.get('model')}, {p.get('layers')} layers"


def kappas(run) -> list[dict]:
    """κ per TP step case: batch, graph/eager, whether the graph was applied, κ or why not."""
    serving = {e.get("case_id"): e for e in ((run.indicators or {}).get("serving") or [])}
    out = []
    for row in _tp_rows(run):
        p = params_of(row)
        g = extra_of(row).get("graph") or {}
        item = {"case_id": row["case_id"], "batch": p.get("batch"), "mode": _graph_of(row), "shape": _shape(p),
                "graph_applied": g.get("applied"), "graph_reason": g.get("reason") or None,
                "status": row.get("status")}
        if row.get("status") != "ok":
            item["missing"] = f"case {row.get('status')}: {str(row.get('reason'))[:200]}"
        elif run.indicators is None:
            item["missing"] = "no indicators.json (collector did not run)"
        elif row["case_id"] not in serving:
            item["missing"] = "no serving entry for the case in indicators.json"
        else:
            k = serving[row["case_id"]].get("kappa") or {}
            item["kappa"] = finite(k.get("value"))
            if item["kappa"] is None:
                item["missing"] = k.get("reason") or "kappa null"
        out.append(item)
    return out + _absent_tp_points(run, out)


def _absent_tp_points(run, items: list[dict]) -> list[dict]:
    """A missing item for each of TP_POINTS without a case in the run: a run cut short
    (or a build without the graph parameter) must show the gap, not fewer lines."""
    # "eager (no graph parameter in this build)" is the eager case of an older build.
    have = {(finite(i.get("batch")), i["mode"].split(" ")[0]) for i in items}
    shape = items[0]["shape"] if items else "?"
    why = ("not run: the run is " + str(run.manifest.get("status")) if run.manifest.get("status") != "complete"
           else "no such case in the run (not planned by this build or suite)")
    return [{"case_id": None, "batch": b, "mode": m, "shape": shape, "missing": why}
            for b, m in TP_POINTS if (b, m) not in have]


def _kernel_of(p: dict, extra: dict) -> str:
    """The paged kernel a case names, with what it resolved to when that differs
    (``extra["paged_kernel"]``: ``default`` is gather_sdpa on CUDA, probes/decode.py)."""
    named = next((str(p[k]) for k in KERNEL_KEYS if k in p), None)
    ran = extra.get("paged_kernel")
    if named is None:
        return f"(no kernel parameter in this build{': ran ' + str(ran) if ran else ''})"
    return f"{named} -> {ran}" if ran and ran != named else named


def paged(run) -> list[dict]:
    """Paged decode attention at ATTN_POINT: per paged kernel, roofline fraction and the
    layout penalty against the contiguous case with the same other parameters."""
    cases = run.cases
    if "probe" not in cases or not (cases["probe"] == ATTN).any():
        raise Missing(f"no {ATTN} case in the run")
    pick = []
    for _, r in cases[cases["probe"] == ATTN].iterrows():
        p = params_of(r)
        if all(p.get(k) == v for k, v in ATTN_POINT.items()):
            pick.append((p, r))
    if not pick:
        raise Missing(f"no {ATTN} case at {ATTN_POINT}")
    ignore = ("layout", *KERNEL_KEYS)

    def rest(p):
        return json.dumps({k: v for k, v in sorted(p.items()) if k not in ignore}, default=str)

    # The contiguous twin: the ok contiguous case (a contiguous case naming a paged-only
    # kernel is skipped by the spec and must not stand in for it).
    contiguous = {rest(p): r for p, r in pick if p.get("layout") == "contiguous" and r.get("status") == "ok"}
    out = []
    for p, r in pick:
        if p.get("layout") != "paged":
            continue
        item = {"case_id": r["case_id"], "kernel": _kernel_of(p, extra_of(r)), "status": r.get("status")}
        if r.get("status") != "ok":
            item["missing"] = f"case {r.get('status')}: {str(r.get('reason'))[:200]}"
            out.append(item)
            continue
        item["roofline_fraction"] = finite(r.get("roofline_fraction")) if "roofline_fraction" in r else None
        if item["roofline_fraction"] is None:
            item["roofline_missing"] = "roofline_fraction null (no nominal bandwidth for the device?)"
        twin = contiguous.get(rest(p))
        paged_bw = finite(r.get("bytes_per_s"))
        if twin is None:
            item["penalty_missing"] = "no ok contiguous case with the same other parameters"
        elif not paged_bw:
            item["penalty_missing"] = "paged case has no B/s"
        else:
            item["layout_penalty"] = finite(twin.get("bytes_per_s")) / paged_bw
            item["contiguous_roofline_fraction"] = finite(twin.get("roofline_fraction"))
        out.append(item)
    if not out:
        raise Missing(f"no paged {ATTN} case at {ATTN_POINT}")
    # Each kernel the figure needs, by what the case ran ("default -> gather_sdpa" counts
    # as gather_sdpa); one without a case is a gap, said as such.
    ran = {i["kernel"].split(" -> ")[-1] for i in out}
    status = run.manifest.get("status")
    for kernel in PAGED_EXPECTED:
        if kernel not in ran:
            out.append({"case_id": None, "kernel": kernel, "status": None,
                        "missing": (f"not run: the run is {status}" if status != "complete"
                                    else "no such case in the run (not planned by this build or suite)")})
    return out


def joules_per_token(run) -> list[dict]:
    """J/token per TP step case as run (the 2 layers measured): energy_j / batch; missing
    with the reason when the build has no energy_j column or the case's value is null
    (energy_reason). Where indicators.json has the serving entry's ``j_per_token``, its
    full-model value is added (``full_model_j_per_token``)."""
    rows = _tp_rows(run)
    serving = {e.get("case_id"): e for e in ((run.indicators or {}).get("serving") or [])}
    if "energy_j" not in run.cases:
        raise Missing("cases.parquet has no energy_j column (energy metering not in this build)")
    out = []
    for row in rows:
        p = params_of(row)
        item = {"case_id": row["case_id"], "batch": p.get("batch"), "mode": _graph_of(row), "shape": _shape(p),
                "method": text_of(row, "energy_method")}
        e, b = finite(row.get("energy_j")), finite(p.get("batch"))
        if row.get("status") != "ok":
            item["missing"] = f"case {row.get('status')}"
        elif e is None:
            item["missing"] = text_of(row, "energy_reason") or "energy_j null, no energy_reason"
        elif not b:
            item["missing"] = "no batch parameter"
        else:
            item["j_per_token"] = e / b
        # The collector's full-model figure (layers scaled to the model's, parts outside
        # the layers added: harness.collector.serving.energy_figures), where it has one.
        ind = serving.get(row["case_id"], {}).get("j_per_token")
        if ind:
            item["full_model_j_per_token"] = finite(ind.get("value"))
            if item["full_model_j_per_token"] is None:
                item["full_model_missing"] = ind.get("reason") or "null"
        out.append(item)
    return out + _absent_tp_points(run, out)


def run_state(run) -> dict:
    """What a run's manifest says of its completeness: ``status`` (``complete`` or
    ``partial``; None when the manifest has none), ``planned`` (``planned_cases``; None in
    runs made before the key) and ``with_result`` (distinct case ids with a row)."""
    c = run.cases
    planned = run.manifest.get("planned_cases")
    return {"status": run.manifest.get("status"), "planned": planned if isinstance(planned, int) else None,
            "with_result": int(c["case_id"].nunique()) if len(c) and "case_id" in c else 0}


def _state_text(state: dict) -> str:
    """'run partial: 30 of 50 planned cases have a result' (planned '?' when unknown)."""
    planned = state.get("planned") if state.get("planned") is not None else "?"
    return f"run {state.get('status')}: {state.get('with_result')} of {planned} planned cases have a result"


def status_counts(run) -> dict:
    """Cases by status; failed, timed-out and interrupted counts; the run's state
    (:func:`run_state`); the not-ok cases' ids and reasons (first 20); and the "0 failed"
    bar: ``zero_failed`` True only when the run is complete and no case failed, timed
    out or was interrupted (``zero_failed_why`` says what stops it otherwise)."""
    c = run.cases
    counts = {str(k): int(v) for k, v in c["status"].value_counts().items()} if len(c) else {}
    bad = c[c["status"].isin(list(CASE_FAILED))] if len(c) else c
    state = run_state(run)
    why = [_state_text(state)] if state["status"] != "complete" else []
    why += [f"{counts[s]} {s}" for s in CASE_FAILED if counts.get(s)]
    return {"counts": counts, "failed": counts.get("failed", 0), "timeout": counts.get("timeout", 0),
            "interrupted": counts.get("interrupted", 0), "run_status": state["status"], "planned": state["planned"],
            "with_result": state["with_result"], "zero_failed": not why, "zero_failed_why": "; ".join(why),
            "not_ok": [f"{r['status']} {r['case_id']}: {str(r['reason'])[:160]}" for _, r in bad.head(20).iterrows()]}


def call_steps(path: Path) -> dict:
    """One call's steps.tsv: {name: {rc, seconds, limit}} and its total seconds."""
    table = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] != "step":
            table[parts[0]] = {"rc": int(parts[1]), "seconds": float(parts[2]), "limit": float(parts[3])}
    # The script's own closing line (``total``) is its wall time, summary excluded;
    # without it (a script stopped early) the steps' sum stands in.
    total = table.pop("total", None)
    return {"steps": table, "total_s": total["seconds"] if total else round(sum(s["seconds"] for s in table.values()), 1),
            "total_from": "script wall time" if total else "sum of the steps written (script did not finish)"}


def steps(out: Path) -> dict:
    """Every steps.tsv under ``out`` (any depth), one per call, in path order (name the
    calls' folders in call order: call1, call2): ``calls`` [{file, steps, total_s,
    total_from}], ``steps`` merged (a later call's line for a step replaces an earlier
    one's, with ``call`` naming its file) and ``total_s`` the calls' script times added
    up. The machine's start, idle time and the transfers are in none of them (the device
    tool's lease, ``held_s``, counts those)."""
    paths = sorted(Path(out).glob("**/steps.tsv"))
    if not paths:
        raise Missing("steps.tsv not written")
    calls, merged = [], {}
    for path in paths:
        call = {"file": str(path.relative_to(out)), **call_steps(path)}
        calls.append(call)
        merged.update({name: {**st, "call": call["file"]} for name, st in call["steps"].items()})
    froms = {c["total_from"] for c in calls}
    return {"calls": calls, "steps": merged, "total_s": round(sum(c["total_s"] for c in calls), 1),
            "total_from": froms.pop() if len(froms) == 1 else "script wall time where the call finished, else its steps' sum"}


def summarize(out: Path, runs_root: Path | None = None) -> dict:
    """Every figure, each a :func:`figure` dict, keyed by name; a figure read from a run
    also has ``run`` (:func:`run_state`) when the run could be loaded."""
    out = Path(out)
    runs = find_runs(runs_root or out)
    loaded: dict = {}

    def run_of(key):
        # Loaded once per figure group; a Missing is kept and raised for each figure.
        if key not in loaded:
            folder = next((runs[label] for label in LABELS[key] if label in runs), None)
            try:
                loaded[key] = load(folder, " or ".join(LABELS[key]))
            except Missing as exc:
                loaded[key] = exc
        if isinstance(loaded[key], Missing):
            raise loaded[key]
        return loaded[key]

    def from_run(name, key, fn):
        fig = figure(name, lambda: fn(run_of(key)))
        if not isinstance(loaded.get(key), Missing):
            fig["run"] = run_state(loaded[key])
        return fig

    return {
        "gemm_ratio": figure("bf16 8192^3 GEMM, harness / bare torch.matmul", lambda: gemm_ratio(out)),
        "kappa": from_run("kappa of the TP step", "tp", kappas),
        "paged": from_run("paged attention b32 ctx8192 bf16", "paged", paged),
        "j_per_token": from_run("J/token of the TP step", "tp", joules_per_token),
        "jax_quick": from_run("JAX quick suite on jax:gpu", "jax", status_counts),
        "quick": from_run("quick suite on cuda", "quick", status_counts),
        "gpu_tp": from_run("GPU check suite, TP step and its components", "tp", status_counts),
        "gpu_paged": from_run("GPU check suite, decode.attention kernels", "paged", status_counts),
        "gpu_rest": from_run("GPU check suite, the rest", "gpu_rest", status_counts),
        "device_time": figure("device time (script wall, steps)", lambda: steps(out)),
    }


# Figures that are a run's case counts, and those of them with the "0 failed" bar.
COUNT_FIGURES = ("jax_quick", "quick", "gpu_tp", "gpu_paged", "gpu_rest")
ZERO_FAILED_BAR = ("jax_quick",)


def _fmt(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def render(doc: dict) -> list[str]:
    """Printable lines of :func:`summarize`'s document; every gap as ``missing: <why>``."""
    lines = []
    for key, fig in doc.items():
        head = f"{fig['figure']}:"
        state = fig.get("run")
        if state and state.get("status") != "complete" and key not in COUNT_FIGURES:
            # Per-case figures of a run cut short: what ran is measured; say what did not.
            head = f"{fig['figure']} [{_state_text(state)}]:"
        if fig.get("missing"):
            lines.append(f"{head} missing: {fig['missing']}")
            continue
        v = fig["value"]
        if key == "gemm_ratio":
            lines.append(f"{head} {_fmt(v['ratio'])} (harness {_fmt(v['harness_tflops'], '.1f')} TFLOP/s, bare "
                         + ", ".join(f"{k} {_fmt(t, '.1f')}" for k, t in v["bare_tflops"].items())
                         + f" TFLOP/s; required >= {v['required']}: {'met' if v['meets'] else 'NOT met'})")
        elif key in ("kappa", "j_per_token"):
            lines.append(head)
            field = "kappa" if key == "kappa" else "j_per_token"
            for item in sorted(v, key=lambda i: (str(i.get("batch")), i["mode"])):
                val = f"missing: {item['missing']}" if item.get("missing") else _fmt(item[field], ".4g")
                note = ""
                if item.get("missing"):
                    lines.append(f"  {item.get('shape')}, batch {item.get('batch')} {item['mode']}: {val}")
                    continue
                if key == "kappa" and item.get("graph_applied") is not None:
                    note = f" (graph applied: {item['graph_applied']}" + (
                        f", {item['graph_reason']}" if item.get("graph_reason") else "") + ")"
                if key == "j_per_token":
                    full = item.get("full_model_j_per_token")
                    note = (f" as run; full model {_fmt(full, '.4g')}" if full is not None else
                            f" as run; full model missing: {item['full_model_missing']}"
                            if item.get("full_model_missing") else "") + (
                        f" ({item['method']})" if item.get("method") else "")
                lines.append(f"  {item.get('shape')}, batch {item.get('batch')} {item['mode']}: {val}{note}")
        elif key == "paged":
            lines.append(head)
            for item in v:
                if item.get("missing"):
                    lines.append(f"  kernel {item['kernel']}: missing: {item['missing']}")
                    continue
                rf = (_fmt(item["roofline_fraction"]) if item.get("roofline_fraction") is not None
                      else f"missing: {item.get('roofline_missing')}")
                pen = (_fmt(item["layout_penalty"], ".2f") if item.get("layout_penalty") is not None
                       else f"missing: {item.get('penalty_missing')}")
                bar = ""
                if item["kernel"].split(" -> ")[-1] in IN_PLACE and item.get("roofline_fraction") is not None:
                    met = item["roofline_fraction"] >= PAGED_REQUIRED
                    bar = f" (in place: required >= {PAGED_REQUIRED}: {'met' if met else 'NOT met'})"
                lines.append(f"  kernel {item['kernel']}: roofline fraction {rf}{bar}; layout penalty "
                             f"(contiguous B/s / paged B/s) {pen}")
        elif key in COUNT_FIGURES:
            bar = ""
            if key in ZERO_FAILED_BAR:
                bar = (" (required 0 failed: met)" if v.get("zero_failed")
                       else f" (required 0 failed: NOT met: {v.get('zero_failed_why')})")
            planned = v.get("planned") if v.get("planned") is not None else "?"
            lines.append(f"{head} failed {v['failed']}, timeout {v['timeout']}, interrupted {v.get('interrupted', 0)}, "
                         f"by status {v['counts']}, run {v['run_status']} ({v.get('with_result')} of {planned} "
                         f"planned cases have a result){bar}")
            lines.extend(f"  {x}" for x in v["not_ok"])
        elif key == "device_time":
            calls = v.get("calls") or []
            lines.append(f"{head} {v['total_s']} s over {len(calls)} call{'s' if len(calls) != 1 else ''} "
                         f"({v['total_from']}; the machine's start, idle time and the transfers are not included: "
                         "the device tool's lease held_s counts them)")
            if len(calls) > 1:
                lines.extend(f"  call {c['file']}: {c['total_s']} s ({c['total_from']})" for c in calls)
            lines.extend(f"  {name}: rc {s['rc']}, {s['seconds']:.0f} s of {s['limit']:.0f} s"
                         + (f" ({s['call']})" if len(calls) > 1 and s.get("call") else "")
                         for name, s in v["steps"].items())
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python3 -m tests.gpu.summary OUT [--runs DIR]``: writes OUT/summary.txt and
    OUT/summary.json and prints the lines. Exit 0 even with gaps (they are the finding)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=Path, help="folder holding the run folders (default: OUT)")
    args = ap.parse_args(argv)
    doc = summarize(args.out, args.runs)
    text = "\n".join(render(doc))
    (args.out / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
