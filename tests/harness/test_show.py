"""`coherence show`, `env` and `list` in the terminal: never wider than $COLUMNS (80 when
piped), plain ASCII, one compact table per family, case ids shrunk to the parameters
that vary, reasons as numbered footnotes, one unit per column, collectives in
nccl-tests' columns and serving in benchmark_serving's summary shape."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.show import run_text, serving_summary, short_labels, text_table, wrap_table

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "aa-v1" / "A1"
LONG = "the worker died: " + "x" * 300


def case(cid, probe, family, params, p50, status="ok", reason="", device="cpu:0", **more):
    return {"case_id": cid, "probe": probe, "family": family, "device": device, "params": json.dumps(params),
            "status": status, "reason": reason, "n": 10, "p50_s": p50, "p99_s": p50 * 2,
            "dtype": params.get("dtype"), "extra": json.dumps(more.pop("extra", {})), **more}


def collective(op, size, ws, busbw, factor=1.0):
    t = size / (busbw / factor)
    return case(f"collective.{op}[size_bytes={size},world_size={ws}]@cpu:0-{ws - 1}", f"collective.{op}", "collective",
                {"size_bytes": size, "dtype": "fp32", "world_size": ws}, t, device=f"cpu:0-{ws - 1}",
                world_size=ws, bytes=float(size), algbw_Bps=busbw / factor, busbw_Bps=busbw, collective_op=op,
                extra={"check": "exact", "root": 0 if op == "broadcast" else None})


def synthetic_cases() -> pd.DataFrame:
    rows = [
        case("memory.copy[n=1]@cpu:0", "memory.copy", "memory", {"size_mib": 64}, 0.01, bytes_per_s=4e3),
        case("memory.triad[n=1]@cpu:0", "memory.triad", "memory", {"size_mib": 64}, 0.02, bytes_per_s=2e9),
        case("gemm.square[n=1024,dtype=fp32]@cpu:0", "gemm.square", "gemm", {"n": 1024, "dtype": "fp32"}, 0.1,
             flops_per_s=2e10, roofline_fraction=0.04, bound="compute"),
        case("gemm.square[n=1024,dtype=bf16]@cpu:0", "gemm.square", "gemm", {"n": 1024, "dtype": "bf16"}, 0.02,
             flops_per_s=1e11, roofline_fraction=0.1, bound="compute"),
        case("gemm.square[n=2048,dtype=fp32]@cpu:0", "gemm.square", "gemm", {"n": 2048, "dtype": "fp32"}, 0.8,
             flops_per_s=2e10, roofline_fraction=0.04, bound="compute"),
        case("gemm.square[n=2048,dtype=bf16]@cpu:0", "gemm.square", "gemm", {"n": 2048, "dtype": "bf16"}, 0.2,
             status="failed", reason=LONG),
        case("decode.attention[model=tiny,batch=1]@cpu:0", "decode.attention", "decode",
             {"model": "tiny", "batch": 1, "ctx": 4096}, 0.001, status="skipped", reason=LONG),
        case("decode.attention[model=tiny,batch=8]@cpu:0", "decode.attention", "decode",
             {"model": "tiny", "batch": 8, "ctx": 4096}, 0.004, bytes_per_s=5e9),
    ]
    for op in ("all_reduce", "broadcast"):
        for ws in (2, 4):
            for size in (1024, 16 << 20):
                rows.append(collective(op, size, ws, busbw=1e9 / ws if size > 1024 else 1e6 / ws))
    return pd.DataFrame(rows)


MANIFEST = {"run_id": "t", "status": "complete", "schema_version": 2, "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:01:00Z",
            "environment": {"cpu": {"usable_cores": {"value": 2, "source": "test"}},
                            "virtualization": {"summary": "bare metal"}},
            "devices": [{"id": "cpu:0", "name": "Test CPU", "nominal": {"kind": "derived",
                                                                        "compute_flops": {"fp32": 5e11}}}]}


@pytest.mark.parametrize("cols", [50, 80, 132])
def test_every_line_fits_the_width_in_plain_ascii(monkeypatch, cols):
    monkeypatch.setenv("COLUMNS", str(cols))
    lines = run_text(MANIFEST, synthetic_cases())
    assert lines[0].startswith("verdict FAIL: cases 14 ok, 1 failed, 1 skipped")
    assert all(len(line) <= cols for line in lines), [x for x in lines if len(x) > cols]
    assert all(line.isascii() for line in lines)  # one character, one byte: mawk's length agrees


def test_one_table_per_family_with_case_ids_shrunk_to_what_varies(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lines = run_text(MANIFEST, synthetic_cases())
    for family in ("memory", "gemm", "decode", "collective"):
        assert sum(1 for line in lines if line.startswith(family)) == 1, family
    first = lines.index(next(x for x in lines if x.startswith("memory")))
    tables = lines[first:lines.index(next(x for x in lines if x.startswith("collective")))]
    assert not any("[" in x or "@cpu:0" in x for x in tables)  # no parameters that don't vary, no lone device
    rows = [{"probe": "decode.attention", "params": json.dumps({"model": "tiny", "batch": b, "ctx": 4096}),
             "device": "cpu:0"} for b in (1, 8)]
    assert short_labels(rows, "decode") == ["attention b=1", "attention b=8"]
    rows.append({"probe": "decode.layer", "params": json.dumps({"model": "tiny"}), "device": "cuda:0"})
    assert short_labels(rows, "decode") == ["attention b=1 @cpu:0", "attention b=8 @cpu:0", "layer @cuda:0"]


def test_dtypes_side_by_side_and_reasons_as_one_numbered_footnote(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    lines = run_text(MANIFEST, synthetic_cases())
    gemm = lines.index(next(x for x in lines if x.startswith("gemm")))
    assert "-- fp32 --" in lines[gemm - 1] and "-- bf16 --" in lines[gemm - 1]
    assert lines[gemm + 1].startswith("square n=1024") and lines[gemm + 2].startswith("square n=2048")
    assert "FAIL" in lines[gemm + 2] and lines[gemm + 2].rstrip().endswith(" 1")
    # The same reason on two cases is one footnote, cut to one readable line or two.
    notes = [x for x in lines if x.startswith("[")]
    assert len(notes) == 2 and notes[0].startswith("[1] the worker died: xxx")
    assert [x for x in lines if x.startswith("attention b=1")][0].rstrip().endswith(" 1")


def test_one_unit_per_column(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lines = run_text(MANIFEST, synthetic_cases())
    i = lines.index(next(x for x in lines if x.startswith("memory")))
    assert lines[i].split()[-1] == "MB/s"  # 4 kB/s and 2 GB/s in the same column: one scale
    assert lines[i + 1].split()[-1] == "4.0e-03" and lines[i + 2].split()[-1] == "2000"


def test_collectives_in_nccl_tests_columns_with_avg_bus_bandwidth(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lines = run_text(MANIFEST, synthetic_cases())
    head = next(x for x in lines if x.startswith("size"))
    assert head.split() == ["size", "count", "type", "redop", "root", "time", "algbw", "busbw", "time", "algbw",
                            "busbw", "#wrong", "fn"]
    avg = [x for x in lines if "Avg bus bandwidth" in x]
    # One line per operation, one figure per world size: the mean busbw over the sizes.
    assert len(avg) == 2 and avg[0].startswith("all_reduce")
    assert "250 MB/s (2 ranks)" in avg[0] and "125 MB/s (4 ranks)" in avg[0]
    row = next(x for x in lines if x.lstrip().startswith("16M"))
    assert row.split()[:5] == ["16M", str((16 << 20) // 4), "fp32", "sum", "-1"] and row.split()[-2:] == ["0", "2"]
    assert "[2] not judged: 4 CPU ranks on 2 usable cores" in "\n".join(lines)
    # No room side by side: one group per operation and world size, each with its line.
    monkeypatch.setenv("COLUMNS", "60")
    narrow = run_text(MANIFEST, synthetic_cases())
    avg = [x for x in narrow if "Avg bus bandwidth" in x]
    assert len(avg) == 4 and avg[0].startswith("all_reduce, 2 ranks on cpu:0-1")


def test_serving_in_benchmark_serving_shape(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    entry = {"case_id": "composite.colocated_request[x]@cpu:0", "probe": "composite.colocated_request",
             "params": {"arrival": "poisson"}, "request_throughput": {"value": 2.0},
             "output_throughput": {"value": 8.0}, "goodput": {"value": 1.5}, "slo_fraction": 0.75,
             "truncation": {"layers_run": 2, "model_layers": 8}}
    for i, name in enumerate(("ttft", "tpot", "itl", "e2e")):
        entry.update({f"{name}_mean_s": 0.01 * (i + 1), f"{name}_p50_s": 0.009 * (i + 1),
                      f"{name}_p99_s": 0.5 * (i + 1)})
    lines = serving_summary([entry, {**entry, "case_id": "b", "params": {"arrival": "back_to_back"}},
                             {"case_id": "tp", "probe": "composite.tp_decode_step"}])  # no requests: left out
    assert "vLLM benchmark_serving" in lines[0] and "2/8 layers, scaled" in lines[0] and len(lines[0]) <= 80
    table = {x.split("  ")[0]: x.split()[-2:] for x in lines[1:9]}
    assert table["Requests/s"] == ["2", "2"] and table["Goodput req/s"] == ["1.5", "1.5"]
    assert table["TTFT ms"] == ["10/9/500", "10/9/500"] and table["E2E ms"] == ["40/36/2000", "40/36/2000"]
    assert set(table) == {"metric", "Requests/s", "Output tokens/s", "Goodput req/s", "TTFT ms", "TPOT ms", "ITL ms",
                          "E2E ms"}
    legend = " ".join(x.strip() for x in lines[9:])
    assert legend == ("A colocated_request poisson (75% meet SLO); B colocated_request back_to_back (75% meet SLO)")


def test_text_tables_cut_the_label_and_wrap_tables_wrap_every_cell():
    lines = text_table(["case", "p50"], [["x" * 100, "1.5"]], right={1}, total=30)
    assert max(map(len, lines)) <= 30 and lines[1].endswith("~ 1.5")
    wrapped = wrap_table(["fact", "value"], [["cpu.flags", " ".join(["avx512f"] * 30)]], total=40)
    assert max(map(len, wrapped)) <= 40 and sum(x.count("avx512f") for x in wrapped) == 30  # nothing lost


def test_show_of_an_old_run_at_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = CliRunner().invoke(main, ["show", str(FIXTURE)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("verdict PASS: cases 5 ok;") and max(map(len, lines)) <= 80
    assert any(x.startswith("gemm") for x in lines) and any(x.startswith("decode") for x in lines)


def test_env_and_list_fit_the_terminal(monkeypatch):
    from harness.show import print_environment

    monkeypatch.setenv("COLUMNS", "50")
    doc = {"host": {"hostname": {"value": "h" * 90, "source": "/proc/sys/kernel/hostname"}},
           "cpu": {"isa": {"value": {f"flag{i}": True for i in range(40)}, "source": "/proc/cpuinfo flags"}},
           "virtualization": {"summary": "kvm > docker", "layers": [{"layer": "hypervisor", "kind": "kvm",
                                                                    "evidence": ["CPUID leaf 0x40000000: " + "K" * 70]}]},
           "nominal": {"cpu:0": {"rule": "amd-zen4", "source": "AMD documentation " * 5, "cores": 2,
                                 "compute_flops": {"fp32": 1e12}, "memory_Bps": 5e10}}}
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        print_environment(doc)
    out = buf.getvalue().splitlines()
    assert max(map(len, out)) <= 50 and all(x.isascii() for x in out)
    text = "\n".join(out)
    assert "flag39" in text and "nominal peaks" in text and "1 TFLOP/s" in text
    r = CliRunner().invoke(main, ["list"], env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    assert max(map(len, r.output.splitlines())) <= 60 and "gemm.square" in r.output


def test_indicators_written_by_older_code_still_show(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    # indicators.json before the best configuration and the oversubscription marks.
    old = {"capacity": {"C_eff": 81.0, "C_nom": 160.0, "epsilon": 0.5, "from_case": "composite.tp_decode_step[x]@cpu:0-1"},
           "mode1": {"straggler_penalty": {"value": 0.3, "unit": "fraction of step", "verdict": "fail",
                                           "threshold": {"better": "lower", "warn": 0.1, "fail": 0.25},
                                           "cases": ["composite.tp_decode_step[x]@cpu:0-1"]}},
           "serving": [], "summary": {"fail": 1}}
    lines = run_text(MANIFEST, synthetic_cases(), old)
    text = " ".join(x.strip() for x in lines)
    assert "best serving capacity 81 tok/s (composite.tp_decode_step@cpu:0-1), 0.5 of nominal 160 tok/s" in text
    assert any(x.startswith("m1") and "straggler_penalty" in x and "fail" in x for x in lines)
    # The oversubscription marks come from the manifest when indicators.json has none.
    assert "not judged: 4 CPU ranks on 2 usable cores" in text


# -- energy and graphs where a reader looks (issue 16) ----------------------------------------
def _energy_tp_run(tmp_path, energies: dict, graph: dict | None = None, **kw):
    """The 2-rank TP step run of test_collector with the energy columns (case id -> J per
    repetition) and, where given, the composite's ``extra.graph``."""
    from tests.harness.test_collector import tp_run
    from tests.harness.test_energy_figures import _with_energy

    run, k = tp_run(tmp_path)
    run = _with_energy(run, {k[key] if key in k else key: v for key, v in energies.items()}, **kw)
    if graph is not None:
        cases = run.cases.copy()
        cases["extra"] = [json.dumps({**json.loads(e), "graph": graph}) if c == k["tp"] else e
                          for c, e in zip(cases["case_id"], cases["extra"])]
        run.cases = cases
    return run, k


def _composite_row(lines: list[str]) -> tuple[list[str], list[str]]:
    head = next(x for x in lines if x.startswith("composite"))
    return head.split(), lines[lines.index(head) + 1].split()


@pytest.mark.parametrize("cols", [80, 132])
def test_show_says_how_energy_was_measured_per_device_and_j_per_token(tmp_path, monkeypatch, cols):
    from harness.collector import collect

    monkeypatch.setenv("COLUMNS", str(cols))
    run, k = _energy_tp_run(tmp_path, {"tp": 4.0, "decode.projection[x]@cuda:0": 0.1})
    lines = run_text(run.manifest, run.cases, collect(run))
    assert all(len(x) <= cols and x.isascii() for x in lines), [x for x in lines if len(x) > cols]
    text = "\n".join(lines)
    # cuda:0 has the projection and the composite measured, the collective (cuda:0-1) not.
    dev0 = lines.index(next(x for x in lines if x.startswith("cuda:0 ")))
    first = next(i for i in range(dev0, len(lines)) if lines[i].startswith("  energy:"))
    energy0 = " ".join(x.strip() for x in lines[first:first + 3] if x.startswith("  "))
    assert energy0.startswith("energy: nvml_energy_counter (gpu board) on 2 of 3 ok cases; 1 not measured")
    assert "energy not measured: no energy counter on this device" in text  # the reason, as a footnote
    head, row = _composite_row(lines)
    # 4 J per step over batch 8: 0.5 J/token, in its own column before kappa.
    # (composite, st, T_pred, T_meas, p99, C_eff, J/tok, kappa ...: the 7th cell.)
    assert " ".join(head).endswith("C_eff tok/s J/tok kappa fn") and row[6] == "0.5"


def test_show_energy_not_measured_gives_the_reason_and_old_runs_say_they_predate_it(tmp_path, monkeypatch):
    from harness.collector import collect
    from tests.harness.test_collector import tp_run

    monkeypatch.setenv("COLUMNS", "80")
    why = "RAPL not readable: /sys/class/powercap/intel-rapl:0/energy_uj: EACCES"
    run, k = _energy_tp_run(tmp_path, {}, reason=why)
    lines = run_text(run.manifest, run.cases, collect(run))
    assert max(map(len, lines)) <= 80
    joined = " ".join(x.strip() for x in lines)
    assert "cuda:0 Synthetic GPU" in joined and "energy: not measured - RAPL not readable" in joined
    head, row = _composite_row(lines)
    assert " ".join(head).endswith("J/tok kappa fn") and row[6] == "-"
    notes = [x for x in lines if x.startswith("[")]
    # The J/token reason once, however many rows point at it.
    assert sum("J/token not measured" in x for x in notes) == 1 and "EACCES" in joined
    assert row[-1] == next(x for x in notes if "J/token" in x)[1:].split("]")[0]
    # A run made before energy accounting: one line per device saying so, no J/token column.
    old, _ = tp_run(tmp_path / "old")
    lines = run_text(old.manifest, old.cases, collect(old))
    assert sum("energy: not recorded (the run predates energy accounting)" in x for x in lines) == 2
    # indicators.json of code before energy (no j_per_token): the table as before.
    doc = collect(old)
    for e in doc["serving"]:
        e.pop("j_per_token", None), e.pop("tokens_per_j", None)
    assert "J/tok" not in _composite_row(run_text(old.manifest, old.cases, doc))[0]


def test_a_graph_requested_and_not_applied_has_its_footnote(tmp_path, monkeypatch):
    from harness.collector import collect
    from harness.show import _graph_note

    monkeypatch.setenv("COLUMNS", "80")
    eager = {"requested": True, "applied": False, "collectives": None,
             "reason": "CUDA graphs need a CUDA device; cpu:0 runs eagerly"}
    run, k = _energy_tp_run(tmp_path, {"tp": 4.0}, graph=eager)
    lines = run_text(run.manifest, run.cases, collect(run))
    _, row = _composite_row(lines)
    note = next(x for x in lines if x.startswith(f"[{row[-1]}]"))
    assert "graph requested, not applied (ran eagerly): CUDA graphs need a CUDA device" in note
    # graph=true and graph=false are rows of their own, told apart in one word each, and at
    # 80 columns the label is not cut (the time unit goes above T_pred, T_meas and p99).
    rows = [{"probe": "composite.tp_decode_step", "params": json.dumps({"batch": 1, "graph": g}), "device": "cpu:0"}
            for g in (True, False)]
    assert short_labels(rows, "composite") == ["tp_decode_step graph", "tp_decode_step eager"]
    head = next(i for i, x in enumerate(lines) if x.startswith("composite"))
    assert lines[head - 1].strip() == "-- ms --" and lines[head].split()[2:5] == ["T_pred", "T_meas", "p99"]
    # Applied, not requested, or no extra.graph (older runs): no footnote.
    assert _graph_note({"extra": json.dumps({"graph": {**eager, "applied": True}})}) is None
    assert _graph_note({"extra": json.dumps({"graph": {**eager, "requested": False}})}) is None
    assert _graph_note({"extra": "{}"}) is None and _graph_note({}) is None
