"""The verdict summary (overall PASS / WARN / FAIL, counts, largest findings) and the
exit codes of --fail-on on run, show and collect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import UserError
from harness.headline import exit_code, headline_lines, summarize, verdict_summary

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "aa-v1" / "A1"

LOWER = {"better": "lower", "warn": 0.1, "fail": 0.25}
HIGHER = {"better": "higher", "warn": 0.8, "fail": 0.5}


def ind(value, verdict, threshold=None, cases=("x",), **more):
    return {"value": value, "unit": "fraction", "verdict": verdict, "threshold": threshold, "cases": list(cases), **more}


def doc(**modes) -> dict:
    base = {"schema_version": 1, "run_id": "t", "generated_at": "2026-01-01T00:00:00Z", "config": {},
            "capacity": {"C_eff": None, "C_nom": None, "epsilon": None, "reason": "none"}, "ladder": [],
            "serving": [], "mode1": {}, "mode2": {}, "mode3": {}, "mode4": {}, "summary": {}}
    base.update(modes)
    return base


OK = [{"case_id": "a", "status": "ok"}, {"case_id": "b", "status": "skipped", "reason": "no GPU"}]


def test_overall_is_the_worst_of_cases_and_indicators():
    assert summarize(OK, None)["overall"] == "PASS"
    assert summarize(OK, doc(mode1={"s": ind(0.05, "ok", LOWER)}))["overall"] == "PASS"
    assert summarize(OK, doc(mode1={"s": ind(0.2, "warn", LOWER)}))["overall"] == "WARN"
    assert summarize(OK, doc(mode1={"s": ind(0.3, "fail", LOWER)}))["overall"] == "FAIL"
    failed = OK + [{"case_id": "c", "status": "timeout", "reason": "ran past 120 s"}]
    s = summarize(failed, None)
    assert s["overall"] == "FAIL" and s["counts"]["cases_failed"] == 1
    assert s["findings"][0].startswith("1 case(s) failed or timed out; first c: ran past 120 s")


def test_counts_per_verdict_and_not_judged_counts_as_neither():
    d = doc(mode1={"s": ind(0.2, "warn", LOWER), "t": ind(None, "not measurable")},
            mode3={"l": ind(0.1, "info", HIGHER, not_judged=True, verdict_if_judged="fail"),
                   "m": ind(0.9, "ok", HIGHER)},
            serving=[{"case_id": "tp", "kappa": ind(0.4, "fail", HIGHER)}])
    c = summarize(OK, d)["counts"]
    assert (c["pass"], c["warn"], c["fail"], c["not_measurable"], c["not_judged"]) == (1, 1, 1, 1, 1)
    assert (c["cases_ok"], c["cases_skipped"], c["cases_failed"], c["cases_total"]) == (1, 1, 0, 2)


def test_findings_largest_first_with_their_figures():
    d = doc(mode2={"decode_memory_efficiency": ind(0.45, "fail", HIGHER, cases=["decode.attention[x]@cpu:0"])},
            mode3={"link_efficiency": ind(0.05, "fail", HIGHER), "coll": ind(0.7, "warn", HIGHER)},
            mode1={"straggler_penalty": ind(0.2, "warn", LOWER)},
            capacity={"C_eff": 162.0, "C_nom": 540.0, "epsilon": 0.3, "from_case": "tp[ws=1]",
                      "scaling": [{"sentence": "tp at world size 2 serves 81 tok/s, 0.50x its 162 tok/s at world size 1."}]})
    f = summarize(OK, d)["findings"]
    assert 3 <= len(f) <= 5
    # Fails before warns; among fails the further past its threshold (0.05 vs 0.5) first.
    assert f[0].startswith("mode 3 link efficiency 0.05") and "fail below 0.5" in f[0]
    assert f[1].startswith("mode 2 decode memory efficiency 0.45 (decode.attention@cpu:0)")
    assert any("best serving capacity 162 tok/s" in x for x in f)
    assert any("world size 2 serves 81 tok/s" in x for x in f)
    lines = headline_lines(summarize(OK, d))
    assert lines[0].startswith("verdict FAIL: cases 1 ok, 1 skipped; indicators 0 pass, 2 warn, 2 fail")
    assert lines[1].startswith("  1. mode 3 link efficiency")


def test_exit_codes_of_fail_on():
    cases_failed = {"counts": {"cases_failed": 1, "warn": 0, "fail": 0}}
    warn = {"counts": {"cases_failed": 0, "warn": 2, "fail": 0}}
    fail = {"counts": {"cases_failed": 0, "warn": 0, "fail": 1}}
    clean = {"counts": {"cases_failed": 0, "warn": 0, "fail": 0}}
    for summary, expected in ((cases_failed, (1, 1, 1)), (warn, (0, 0, 1)), (fail, (0, 1, 1)), (clean, (0, 0, 0))):
        assert tuple(exit_code(summary, f) for f in ("case", "fail", "warn")) == expected, summary
    assert exit_code(clean) == 0
    with pytest.raises(UserError, match="--fail-on: 'strict'"):
        exit_code(clean, "strict")


def _run_with(tmp_path, indicators: dict | None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    if indicators is not None:
        (run / "indicators.json").write_text(json.dumps(indicators), encoding="utf-8")
    return run


def test_verdict_summary_reads_a_run_folder(tmp_path):
    run = _run_with(tmp_path, doc(mode1={"s": ind(0.2, "warn", LOWER)}))
    s = verdict_summary(run)
    assert s["overall"] == "WARN" and s["counts"]["cases_ok"] == 5 and s["counts"]["warn"] == 1
    assert verdict_summary(_run_with(tmp_path / "b", None))["overall"] == "PASS"  # no indicators.json yet
    with pytest.raises(UserError, match="not a run folder"):
        verdict_summary(tmp_path / "nothing")


def test_show_fail_on_gates_a_run_with_a_warn(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    run = _run_with(tmp_path, doc(mode1={"straggler_penalty": ind(0.2, "warn", LOWER)}))
    r = CliRunner().invoke(main, ["show", str(run), "--fail-on", "warn"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("verdict WARN:")  # the verdict comes first
    assert CliRunner().invoke(main, ["show", str(run), "--fail-on", "case"]).exit_code == 0
    assert CliRunner().invoke(main, ["show", str(run)]).exit_code == 0  # case is the default
    assert CliRunner().invoke(main, ["show", str(run), "--fail-on", "fail"]).exit_code == 0
    bad = CliRunner().invoke(main, ["show", str(run), "--fail-on", "sometimes"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_collect_prints_the_verdict_first_and_gates(tmp_path, monkeypatch):
    from harness.headline import verdict_summary as vs

    monkeypatch.setenv("COLUMNS", "80")
    run = _run_with(tmp_path, None)
    r = CliRunner().invoke(main, ["collect", str(run), "--fail-on", "warn"])
    s = vs(run)  # what collect computed and wrote
    assert r.output.startswith(f"verdict {s['overall']}:")
    assert r.exit_code == exit_code(s, "warn"), r.output
    assert CliRunner().invoke(main, ["collect", str(run), "--fail-on", "case", "-q"]).exit_code == 0


def test_run_ends_with_the_verdict_and_fail_on_sets_its_exit_code(tmp_path, monkeypatch):
    from harness import run_command
    from harness.runner import RunOutcome

    run = _run_with(tmp_path, doc(mode3={"link_efficiency": ind(0.3, "fail", HIGHER)}))
    monkeypatch.setattr(run_command, "run_suite", lambda **kw: RunOutcome(path=run, counts={"ok": 5}))
    r = CliRunner().invoke(main, ["run", "--fail-on", "fail"])
    assert r.exit_code == 1 and "verdict FAIL:" in r.output and "link efficiency 0.3" in r.output
    assert CliRunner().invoke(main, ["run"]).exit_code == 0
    assert CliRunner().invoke(main, ["run", "-q", "--fail-on", "warn"]).exit_code == 1


def test_a_partial_run_is_a_fail_whatever_its_finished_cases_say():
    """A run killed part way (manifest status partial, 49 of 69 planned cases with a
    row, all ok, no indicators yet) is FAIL with the missing count and the resume
    command; --fail-on case exits 1. The same rows in a complete run pass."""
    from harness.headline import exit_code, headline_lines, summarize

    cases = [{"case_id": f"c{i}", "status": "ok", "reason": ""} for i in range(49)]
    partial = {"run_id": "r1", "status": "partial", "planned_cases": 69}
    s = summarize(cases, None, partial)
    assert s["overall"] == "FAIL" and s["counts"]["incomplete"] == 20
    assert s["findings"][0].startswith("the run is partial: 49 of 69 planned cases") and "--resume r1" in s["findings"][0]
    assert "20 not run (partial run)" in headline_lines(s)[0]
    assert exit_code(s, "case") == 1
    done = summarize(cases, None, {"run_id": "r1", "status": "complete", "planned_cases": 49})
    assert done["overall"] == "PASS" and exit_code(done, "case") == 0 and done["counts"]["incomplete"] == 0
    assert summarize(cases, None)["overall"] == "PASS"  # no manifest: taken as complete
