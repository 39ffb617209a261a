"""harness.dtype_path: an emulated dtype (extra.native false) is marked in `show`'s
cases table and in the run report; native cases and older rows are not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd

from harness import dtype_path
from harness.report.run_report import cases_section

VIA = "bf16 emulated via fp32 upcast: no avx512_bf16/amx_bf16/bf16/svebf16/sve_bf16 on this CPU"


def _row(case_id: str, extra, dtype: str = "bf16") -> dict:
    return {"case_id": case_id, "probe": "gemm.square", "family": "gemm", "status": "ok", "reason": "", "n": 5,
            "p50_s": 0.01, "p99_s": 0.012, "flops": 2e9, "bytes": 6e6, "flops_per_s": 2e11, "bytes_per_s": 6e8,
            "best_flops_per_s": 2.1e11, "best_bytes_per_s": 6.1e8, "bound": "compute", "roofline_fraction": 0.42,
            "dtype": dtype, "extra": extra if isinstance(extra, str) or extra is None else json.dumps(extra)}


EMULATED = _row("gemm.square[n=1024,dtype=bf16]@cpu:0",
                {"native": False, "native_via": VIA, "judged_against": "fp32 peak (the products run on its FMA units)",
                 "rel_error": 1e-3})
NATIVE = _row("gemm.square[n=1024,dtype=fp16]@cpu:0", {"native": True, "native_via": "fp16 native (amx_fp16)"}, "fp16")
FP32 = _row("gemm.square[n=1024,dtype=fp32]@cpu:0", {"rel_error": 1e-6}, "fp32")
OLD = _row("gemm.square[n=512,dtype=bf16]@cpu:0", None)  # a run written before the key existed


def test_only_a_false_native_is_emulated():
    note = dtype_path.emulated(EMULATED)
    assert note.startswith(VIA) and "judged against the fp32 peak" in note
    assert dtype_path.emulated({**EMULATED, "extra": json.loads(EMULATED["extra"])}) == note  # a dict works too
    for row in (NATIVE, FP32, OLD, _row("x", "{not json"), _row("y", "[1, 2]")):
        assert dtype_path.emulated(row) is None, row["extra"]


def test_show_marks_the_emulated_case_and_says_how(capsys, monkeypatch):
    from harness import show

    monkeypatch.setenv("COLUMNS", "80")
    show.print_run({"run_id": "r", "status": "complete"}, pd.DataFrame([EMULATED, NATIVE, FP32, OLD]))
    out = capsys.readouterr().out
    lines = out.splitlines()
    # gemm's dtypes side by side (fp32, bf16, fp16): only the emulated bf16 roofline is
    # marked, and its footnote says how it ran and what it is judged against.
    row = next(line for line in lines if line.startswith("square n=1024")).split()
    assert (row[4], row[7], row[10], row[11]) == ("42%c", "42%c*", "42%c", "1")
    old = next(line for line in lines if line.startswith("square n=512"))
    assert "42%c" in old and "*" not in old
    notes = " ".join(line.strip() for line in lines[lines.index(next(x for x in lines if x.startswith("[1]"))):])
    assert notes.startswith("[1] " + VIA) and "judged against the fp32 peak" in notes


def test_report_cases_table_marks_the_emulated_case():
    html = cases_section(SimpleNamespace(cases=pd.DataFrame([EMULATED, NATIVE, FP32, OLD])))
    assert html.count('data-native="false"') == 1 and 'data-emulated="1"' in html
    row = next(r for r in html.split("<tr>") if "n=1024,dtype=bf16" in r)
    assert 'class="emulated"' in row and "42.0% of fp32" in row and "emulated via fp32 upcast" in row
    for case in (NATIVE, FP32, OLD):
        row = next(r for r in html.split("<tr>") if case["case_id"].split("@")[0] in r)
        assert 'class="emulated"' not in row and "of fp32" not in row
    plain = cases_section(SimpleNamespace(cases=pd.DataFrame([NATIVE, FP32])))
    assert "data-emulated" not in plain
