"""CPU-side checks of the H200 device check (tests/gpu/device_check.sh) and its pieces.

No GPU is assumed: the script is only parsed; the summary runs against made-up runs and a
real tiny CPU run; bare_matmul runs its comparison on cpu:0 at a tiny size (its figures are
not asserted, only that both sides were measured and combined as documented).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.gpu import bare_matmul, summary

HERE = Path(__file__).parent
SCRIPT = HERE / "device_check.sh"
SUITE = HERE / "gpu_check.yaml"
REPO = HERE.parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_script_changes_no_gpu_setting():
    # nvidia-smi's setters: application/locked clocks, power limit, MIG, persistence,
    # compute mode, reset (nvidia-smi --help). The script may only read.
    text = SCRIPT.read_text()
    calls = re.findall(r"nvidia-smi[^\n]*", text)
    assert calls, "the script records the GPU with nvidia-smi"
    setters = re.compile(r"\s(-ac|-rac|-pl|-lgc|-rgc|-lmc|-rmc|-mig|-pm|-c|-r|--lock|--reset|"
                         r"--applications-clocks|--power-limit|--multi-instance-gpu|--persistence-mode|"
                         r"--compute-mode|--gpu-reset)\b")
    assert not [c for c in calls if setters.search(c)]


def _code_lines() -> list[str]:
    """The script's lines, comments left out, continuation lines joined."""
    return [ln for ln in SCRIPT.read_text().replace("\\\n", " ").splitlines() if not ln.lstrip().startswith("#")]


def _step_lines() -> dict[str, str]:
    """{step name: its `step NAME CAP CMD...` line}, in the script's order."""
    return {ln.split()[1]: ln for ln in _code_lines() if ln.startswith("step ") or ln.startswith("  step ")}


def test_every_heavy_step_runs_under_its_own_limit():
    # Each suite, test and GEMM step goes through step(), which wraps it in `timeout`.
    lines = _code_lines()
    for needle in ("tests.gpu.bare_matmul", '"${GPU_RUN[@]}"', "--devices jax:gpu", "-m pytest",
                   "--suite quick --devices cuda"):
        found = [ln for ln in lines if needle in ln]
        assert found and all(ln.lstrip().startswith("step ") for ln in found), (needle, found)
    assert any("gpu_check.yaml" in ln for ln in lines if ln.startswith("GPU_RUN=("))
    assert 'timeout -k 15 "$limit" "$@"' in SCRIPT.read_text()


def test_must_show_figures_come_first_one_step_each():
    # Priority order: a cut step loses only its own figure, and the must-show ones run
    # before the suites no figure depends on.
    order = list(_step_lines())
    assert order[:5] == ["setup", "gpu-gemm", "gpu-tp", "gpu-paged", "jax-quick"], order
    assert set(order[5:]) == {"cuda-tests", "quick", "gpu-rest", "cuda-marked"}, order
    steps = _step_lines()
    assert '--label device-gpu-tp "${TP_PROBES[@]/#/--probe=}"' in steps["gpu-tp"]
    assert '--label device-gpu-paged "${PAGED_PROBES[@]/#/--probe=}"' in steps["gpu-paged"]
    # The labels the summary reads each figure from.
    assert "device-gpu-tp" in summary.LABELS["tp"] and "device-gpu-paged" in summary.LABELS["paged"]
    assert f"--label {summary.LABELS['jax'][0]}" in steps["jax-quick"]


def test_every_suite_run_is_one_round():
    # The quick suite asks for 3 rounds; at the steps' caps that would cut it on the H200.
    runs = [ln for ln in _code_lines() if "harness.cli run" in ln]
    assert len(runs) == 3, runs  # GPU_RUN, jax-quick, quick
    assert all("--rounds 1" in ln for ln in runs), runs


def test_show_is_written_at_160_columns():
    # At a file's 80 columns long case ids shrink to identical labels (harness/show.py).
    shows = [ln for ln in _code_lines() if "harness.cli show" in ln]
    assert shows and all("COLUMNS=160 " in ln for ln in shows), shows


def _array(name: str) -> list[str]:
    """The words of the bash array ``name=(...)`` in the script."""
    m = re.search(rf"^{name}=\(([^)]*)\)", SCRIPT.read_text(), re.M)
    assert m, f"{name} not in the script"
    return m.group(1).split()


def test_the_gpu_check_runs_cover_the_suite_once():
    import yaml

    tp, paged, rest = _array("TP_PROBES"), _array("PAGED_PROBES"), _array("REST_PROBES")
    assert tp == ["composite.tp_decode_step"] and paged == ["decode.attention"]
    for name in yaml.safe_load(SUITE.read_text())["probes"]:
        covers = [sel for sel in tp + paged + rest if sel in (name, name.split(".")[0])]
        assert len(covers) == 1, (name, covers)


def test_the_gpu_check_suite_loads_with_the_pairs_issue_16_needs():
    # Needs the graph parameter (composite spec) and the kernel parameter (decode spec).
    from harness.config import load_suite

    suite = load_suite(str(SUITE))
    grids = {p.name: p.grid for p in suite.probes}
    tp = grids["composite.tp_decode_step"]
    assert tp["graph"] == [True, False] and tp["batch"] == [1, 32] and tp["layers"] == [2]
    attn = grids["decode.attention"]
    assert {"contiguous", "paged"} <= set(attn["layout"]) and 32 in attn["batch"] and attn["ctx"] == [8192]
    assert {"gather_sdpa", "flex", "default"} <= set(attn["kernel"])
    assert grids["gemm.square"]["n"] == [8192] and "bf16" in grids["gemm.square"]["dtype"]
    assert grids["composite.colocated_request"]["graph"] == [True, False]


def test_bare_matmul_reads_the_suites_gemm_timing():
    import yaml

    doc = yaml.safe_load(SUITE.read_text())
    timing = bare_matmul.suite_timing()
    want = {**doc["timing"], **(doc["probes"]["gemm.square"] or {}).get("timing", {})}
    assert {k: timing[k] for k in want} == want


def test_bare_matmul_compares_both_sides_on_a_cpu(tmp_path):
    out = tmp_path / "g.json"
    rc = bare_matmul.main(["--n", "48", "--dtype", "fp32", "--device", "cpu:0", "--warmup", "1",
                           "--batches", "2", "--per-batch", "2", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["harness"]["status"] == "ok"
    assert doc["flops_per_product"] == 2 * 48**3
    best = max(doc["bare"][w]["batch_flops_per_s"] for w in ("before", "after"))
    assert doc["ratio"] == pytest.approx(doc["harness"]["flops_per_s"] / best)
    assert doc["harness"]["flops_per_s"] == pytest.approx(2 * 48**3 / doc["harness"]["p50_s"])


def test_bare_matmul_without_a_device_says_why(tmp_path):
    out = bare_matmul.harness_case(32, "fp32", "cpu:7", bare_matmul.suite_timing())
    assert out["status"] == "failed" and "cpu:7" in out["reason"] and out["flops_per_s"] is None


# --- the summary on made-up runs -----------------------------------------------------

def _row(probe, params, status="ok", **cols):
    return {"case_id": f"{probe}{json.dumps(params, sort_keys=True)}", "probe": probe, "params": json.dumps(params),
            "status": status, "reason": cols.pop("reason", ""), **cols}


def _run(rows, indicators=None, status="complete", planned=None):
    manifest = {"status": status, "planned_cases": len(rows) if planned is None else planned}
    return SimpleNamespace(cases=pd.DataFrame(rows), indicators=indicators, manifest=manifest)


TP_1G = _row("composite.tp_decode_step", {"batch": 1, "graph": True}, energy_j=2.0, energy_method="nvml_energy_counter",
             extra=json.dumps({"graph": {"requested": True, "applied": True, "reason": ""}}))
TP_32E = _row("composite.tp_decode_step", {"batch": 32, "graph": False}, energy_j=8.0,
              energy_method="nvml_energy_counter")
TP_32G = _row("composite.tp_decode_step", {"batch": 32, "graph": True}, energy_j=None,
              energy_reason="window 3 ms < 50 ms")
POINT = {"batch": 32, "ctx": 8192, "dtype": "bf16"}
CONTIG = _row("decode.attention", {**POINT, "layout": "contiguous", "kernel": "default"}, bytes_per_s=4e12,
              roofline_fraction=0.8)
FLEX = _row("decode.attention", {**POINT, "layout": "paged", "kernel": "flex"}, bytes_per_s=3.2e12,
            roofline_fraction=0.64, extra=json.dumps({"paged_kernel": "flex"}))
GATHER = _row("decode.attention", {**POINT, "layout": "paged", "kernel": "default"}, bytes_per_s=1e12,
              roofline_fraction=0.2, extra=json.dumps({"paged_kernel": "gather_sdpa"}))
CONTIG_FLEX = _row("decode.attention", {**POINT, "layout": "contiguous", "kernel": "flex"}, status="skipped",
                   reason="contiguous layout has one kernel", bytes_per_s=None)
OTHER = _row("decode.attention", {**POINT, "batch": 1, "layout": "contiguous", "kernel": "default"}, bytes_per_s=1e9)


def test_kappa_per_tp_case_from_the_serving_entries():
    ind = {"serving": [{"case_id": TP_1G["case_id"], "kappa": {"value": 0.91}},
                       {"case_id": TP_32E["case_id"], "kappa": {"value": None, "reason": "component failed"}}]}
    got = {(k["batch"], k["mode"]): k for k in summary.kappas(_run([TP_1G, TP_32E, TP_32G], ind))}
    assert got[(1, "graph")]["kappa"] == 0.91 and got[(1, "graph")]["graph_applied"] is True
    assert got[(32, "eager")]["missing"] == "component failed"
    assert "no serving entry" in got[(32, "graph")]["missing"]
    nothing = summary.kappas(_run([TP_1G], None))
    assert nothing[0]["missing"].startswith("no indicators.json")


def test_a_tp_point_the_run_lacks_is_a_missing_line():
    # A run cut short keeps its finished cases only: the absent ones are named, not dropped.
    ind = {"serving": [{"case_id": TP_1G["case_id"], "kappa": {"value": 0.91}}]}
    cut = {(k["batch"], k["mode"]): k for k in summary.kappas(_run([TP_1G], ind, status="partial", planned=16))}
    assert set(cut) == set(summary.TP_POINTS) and cut[(1, "graph")]["kappa"] == 0.91
    assert cut[(32, "eager")]["missing"] == "not run: the run is partial"
    whole = {(k["batch"], k["mode"]): k for k in summary.kappas(_run([TP_1G], ind))}
    assert whole[(1, "eager")]["missing"].startswith("no such case in the run")
    energy = {(j["batch"], j["mode"]): j for j in summary.joules_per_token(_run([TP_1G], ind, status="partial"))}
    assert set(energy) == set(summary.TP_POINTS) and energy[(32, "graph")]["missing"].startswith("not run")
    # An older build's eager case (no graph parameter) is the eager point, not a gap.
    old = _row("composite.tp_decode_step", {"batch": 1})
    modes = {(k["batch"], k["mode"]) for k in summary.kappas(_run([old], None)) if "not planned" in k.get("missing", "")
             or "no such case" in k.get("missing", "")}
    assert (1, "eager") not in modes and (1, "graph") in modes


def test_a_tp_case_without_the_graph_parameter_is_the_eager_one():
    old = _row("composite.tp_decode_step", {"batch": 1})
    assert summary._graph_of(old).startswith("eager (no graph parameter")


def test_layout_penalty_pairs_each_paged_kernel_with_its_contiguous_twin():
    got = {p["kernel"]: p for p in summary.paged(_run([CONTIG, FLEX, GATHER, CONTIG_FLEX, OTHER]))}
    assert set(got) == {"flex", "default -> gather_sdpa"}
    assert got["flex"]["layout_penalty"] == pytest.approx(4e12 / 3.2e12)
    assert got["default -> gather_sdpa"]["layout_penalty"] == pytest.approx(4.0)
    assert got["flex"]["roofline_fraction"] == 0.64
    lines = summary.render({"paged": {"figure": "P", "value": [got["flex"], got["default -> gather_sdpa"]]}})
    assert lines[1] == ("  kernel flex: roofline fraction 0.640 (in place: required >= 0.6: met); "
                        "layout penalty (contiguous B/s / paged B/s) 1.25")
    assert lines[2].startswith("  kernel default -> gather_sdpa: roofline fraction 0.200; layout penalty")
    alone = summary.paged(_run([FLEX, OTHER], status="partial"))
    assert alone[0]["penalty_missing"].startswith("no ok contiguous case")
    # The gather kernel the figure needs did not run before the cut: a line says so.
    assert {"case_id": None, "kernel": "gather_sdpa", "status": None,
            "missing": "not run: the run is partial"} in alone
    with pytest.raises(summary.Missing, match="no decode.attention case at"):
        summary.paged(_run([OTHER]))


def test_joules_per_token_is_energy_per_step_over_batch():
    ind = {"serving": [{"case_id": TP_1G["case_id"], "j_per_token": {"value": 32.5}},
                       {"case_id": TP_32E["case_id"], "j_per_token": {"value": None, "reason": "no lm_head energy"}}]}
    got = {(j["batch"], j["mode"]): j for j in summary.joules_per_token(_run([TP_1G, TP_32E, TP_32G], ind))}
    assert got[(1, "graph")]["full_model_j_per_token"] == 32.5
    assert got[(32, "eager")]["full_model_missing"] == "no lm_head energy"
    lines = summary.render({"j_per_token": {"figure": "J", "value": list(got.values())}})
    assert "  None, None layers, batch 1 graph: 2 as run; full model 32.5 (nvml_energy_counter)" in lines
    assert "  None, None layers, batch 32 graph: missing: window 3 ms < 50 ms" in lines
    assert got[(1, "graph")]["j_per_token"] == pytest.approx(2.0)
    assert got[(32, "eager")]["j_per_token"] == pytest.approx(8.0 / 32)
    assert got[(32, "graph")]["missing"] == "window 3 ms < 50 ms"
    no_column = [{k: v for k, v in r.items() if not k.startswith("energy")} for r in (TP_1G, TP_32E)]
    with pytest.raises(summary.Missing, match="no energy_j column"):
        summary.joules_per_token(_run(no_column))


def test_status_counts_name_the_failures():
    rows = [_row("memory.copy", {"a": 1}), _row("gemm.square", {"n": 1}, status="failed", reason="boom"),
            _row("gemm.square", {"n": 2}, status="timeout", reason="over 120 s")]
    got = summary.status_counts(_run(rows, status="partial", planned=5))
    line = summary.render({"jax_quick": {"figure": "J", "value": got}})[0]
    assert line.endswith("run partial (3 of 5 planned cases have a result) (required 0 failed: NOT met: "
                         "run partial: 3 of 5 planned cases have a result; 1 failed; 1 timeout)")
    assert (got["failed"], got["timeout"], got["run_status"]) == (1, 1, "partial")
    assert any("boom" in x for x in got["not_ok"]) and any("over 120 s" in x for x in got["not_ok"])


def _bar(rows, status, planned=None):
    got = summary.status_counts(_run(rows, status=status, planned=planned))
    return got, summary.render({"jax_quick": {"figure": "J", "value": got}})[0]


def test_zero_failed_is_met_only_by_a_complete_run_without_a_bad_case():
    ok = [_row("memory.copy", {"a": i}) for i in range(3)] + [_row("gemm.square", {"n": 1}, status="skipped")]
    got, line = _bar(ok, "complete")
    assert got["zero_failed"] is True and line.endswith("(required 0 failed: met)")
    # The user's trial: cut short, the case in flight interrupted, nothing failed.
    cut = ok[:2] + [_row("gemm.square", {"n": 2}, status="interrupted", reason="SIGTERM")]
    got, line = _bar(cut, "partial", planned=50)
    assert got["zero_failed"] is False and got["interrupted"] == 1 and got["failed"] == 0
    assert "interrupted 1," in line
    assert line.endswith("NOT met: run partial: 3 of 50 planned cases have a result; 1 interrupted)")
    assert any(x.startswith("interrupted gemm.square") for x in got["not_ok"])
    # Partial with every finished case ok: still not shown for the cases that never ran.
    got, line = _bar(ok, "partial", planned=50)
    assert got["zero_failed"] is False and "NOT met: run partial: 4 of 50" in line
    # An interrupted case in a run marked complete (a resumed run's record): not met.
    got, _ = _bar(ok[:1] + [_row("gemm.square", {"n": 3}, status="interrupted")], "complete")
    assert got["zero_failed"] is False and got["zero_failed_why"] == "1 interrupted"
    # A manifest without planned_cases (older runs): '?' rather than a crash.
    got = summary.status_counts(SimpleNamespace(cases=pd.DataFrame(ok), indicators=None,
                                                manifest={"status": "partial"}))
    assert got["zero_failed_why"] == "run partial: 4 of ? planned cases have a result"


def test_a_per_case_figure_of_a_partial_run_says_so_in_its_heading():
    flex = summary.paged(_run([CONTIG, FLEX, GATHER]))
    fig = {"figure": "P", "value": flex, "run": {"status": "partial", "planned": 8, "with_result": 3}}
    lines = summary.render({"paged": fig})
    assert lines[0] == "P [run partial: 3 of 8 planned cases have a result]:"
    # The in-place kernel's bar judges its own finished case.
    assert "(in place: required >= 0.6: met)" in lines[1]
    fig["run"]["status"] = "complete"
    assert summary.render({"paged": fig})[0] == "P:"


def test_steps_table_takes_the_scripts_total(tmp_path):
    (tmp_path / "steps.tsv").write_text("step\trc\tseconds\tlimit\nsetup\t0\t12\t90\ngpu-check\t124\t150\t150\n"
                                        "quick\t-1\t0\t0\ntotal\t0\t301\t360\n")
    got = summary.steps(tmp_path)
    assert got["total_s"] == 301 and got["total_from"] == "script wall time"
    assert got["steps"]["gpu-check"]["rc"] == 124 and got["steps"]["quick"]["rc"] == -1
    (tmp_path / "steps.tsv").write_text("step\trc\tseconds\tlimit\nsetup\t0\t12\t90\ngpu-gemm\t0\t20\t60\n")
    assert summary.steps(tmp_path)["total_s"] == 32


def test_two_calls_copied_side_by_side_add_up(tmp_path):
    # A full call cut at gpu-paged, then a targeted rerun: each call's folder copied into
    # its own subfolder; every steps.tsv counts, the rerun's line for a step wins.
    (tmp_path / "call1").mkdir()
    (tmp_path / "call2").mkdir()
    (tmp_path / "call1" / "steps.tsv").write_text("step\trc\tseconds\tlimit\nsetup\t0\t20\t90\n"
                                                  "gpu-paged\t124\t150\t150\ntotal\t0\t335\t360\n")
    (tmp_path / "call2" / "steps.tsv").write_text("step\trc\tseconds\tlimit\nsetup\t0\t5\t90\n"
                                                  "gpu-paged\t0\t80\t150\ntotal\t0\t90\t360\n")
    got = summary.steps(tmp_path)
    assert got["total_s"] == 425 and [c["file"] for c in got["calls"]] == ["call1/steps.tsv", "call2/steps.tsv"]
    assert got["steps"]["gpu-paged"] == {"rc": 0, "seconds": 80, "limit": 150, "call": "call2/steps.tsv"}
    lines = summary.render({"device_time": {"figure": "D", "value": got}})
    assert lines[0].startswith("D: 425.0 s over 2 calls (script wall time;")
    assert "  gpu-paged: rc 0, 80 s of 150 s (call2/steps.tsv)" in lines


def test_the_newest_run_of_a_label_counts_across_calls(tmp_path):
    # Run ids sort by start time, whatever folder each call was copied into.
    for folder, run_id in (("b_first", "20261130T001000Z-aaaa"), ("a_rerun", "20261130T002000Z-bbbb")):
        path = tmp_path / folder / "runs" / run_id
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps({"label": "device-gpu-paged"}))
    assert summary.find_runs(tmp_path)["device-gpu-paged"].name == "20261130T002000Z-bbbb"


def test_the_newest_gemm_ratio_counts_across_calls(tmp_path):
    docs = {"call1": {"ratio": 0.97, "written_at": "2026-11-30T00:10:00+00:00"},
            "call2": {"ratio": 0.96, "written_at": "2026-11-30T00:20:00+00:00"},
            "call3": {"ratio": None, "ratio_reason": "harness case timeout", "written_at": "2026-11-30T00:30:00+00:00"}}
    for call, doc in docs.items():
        (tmp_path / call).mkdir()
        (tmp_path / call / "gemm_ratio.json").write_text(json.dumps(doc))
    # The latest document with a ratio, not a later call's failed one.
    assert summary.gemm_ratio(tmp_path)["ratio"] == 0.96


def test_gemm_figure_reads_the_ratio_or_says_why(tmp_path):
    with pytest.raises(summary.Missing, match="gemm_ratio.json not written"):
        summary.gemm_ratio(tmp_path)
    (tmp_path / "gemm_ratio.json").write_text(json.dumps({"ratio": None, "ratio_reason": "harness case failed: x"}))
    with pytest.raises(summary.Missing, match="harness case failed: x"):
        summary.gemm_ratio(tmp_path)


def test_summary_of_an_empty_folder_prints_a_missing_line_per_figure(tmp_path):
    doc = summary.summarize(tmp_path)
    lines = summary.render(doc)
    assert len(lines) == len(doc) and all(": missing: " in ln for ln in lines)


@pytest.mark.slow
def test_summary_on_a_real_cpu_run_of_the_figures_cases(tmp_path):
    # A real run folder, labelled as the GPU check's, with the must-show probes at a tiny
    # shape on the CPU: the summary reads the real params (graph, kernel), extra, the
    # energy columns and indicators.json, and says what the CPU cannot give.
    suite = tmp_path / "mini.yaml"
    suite.write_text(
        "name: mini\ntiming: {warmup: 1, min_reps: 3, max_reps: 3, budget_s: 0.1}\nprobes:\n"
        "  decode.attention:\n    params: {model: tiny, batch: 32, ctx: 8192, layout: [contiguous, paged], "
        "kernel: [default, gather_sdpa], dtype: bf16}\n"
        "  composite.tp_decode_step:\n    params: {model: tiny, layers: 2, batch: [1, 32], ctx: 128, dtype: bf16, "
        "world_size: 1, graph: [true, false]}\n")
    runs = tmp_path / "runs"
    # One run under the label the must-show probes shared before the per-figure steps:
    # both the TP and the paged figures fall back to it.
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", str(suite), "--devices", "cpu",
                           "--out", str(runs), "-q", "--no-report", "--label", "device-gpu-check"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert summary.main([str(tmp_path), "--runs", str(runs)]) == 0
    text = (tmp_path / "summary.txt").read_text()
    doc = json.loads((tmp_path / "summary.json").read_text())
    kappa = {(k["batch"], k["mode"]): k for k in doc["kappa"]["value"]}
    assert set(kappa) == {(1, "graph"), (1, "eager"), (32, "graph"), (32, "eager")}
    assert all(k["kappa"] > 0 and k["graph_applied"] is False for k in kappa.values())
    paged = {p["kernel"]: p for p in doc["paged"]["value"]}
    # The mini suite plans no flex (a compile): the figure names the kernel it lacks.
    assert set(paged) == {"default -> chunked", "gather_sdpa", "flex"}
    assert paged.pop("flex")["missing"].startswith("no such case in the run")
    assert all(p["layout_penalty"] > 0 for p in paged.values())
    # Energy on this CPU: a value where RAPL is readable, else the reason; never a crash.
    # A build without the energy columns: the figure is missing, naming the column.
    if doc["j_per_token"]["value"] is None:
        assert "no energy_j column" in doc["j_per_token"]["missing"]
    for j in doc["j_per_token"]["value"] or []:
        assert (j.get("j_per_token") or 0) > 0 or j["missing"]
    assert "JAX quick suite on jax:gpu: missing: no device-jax-quick run folder" in text
    assert "bf16 8192^3 GEMM, harness / bare torch.matmul: missing: gemm_ratio.json not written" in text
    assert re.search(r"GPU check suite, TP step and its components: failed 0, timeout 0, interrupted 0", text)
    assert re.search(r"GPU check suite, decode.attention kernels: failed 0, timeout 0, interrupted 0", text)
