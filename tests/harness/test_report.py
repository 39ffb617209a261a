"""HTML reports: run, compare and fleet reports, the `report` command and `run`'s
report.html; the real run's report opened in headless Chromium (console errors, every
plot present, a screenshot)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.report import (
    COMPARE_PLOTS,
    FLEET_PLOTS,
    RUN_PLOTS,
    build_compare_report,
    build_fleet_report,
    build_run_report,
)
from harness.results import load_run
from tests.conftest import coherence
from tests.harness.test_results import make_run

SUITE = """
name: report-test
plugins: [tests.plugins.fault_probes]
timeout_s: 90
cpu_ranks: 2
timing: {warmup: 1, min_reps: 5, max_reps: 20, budget_s: 0.1}
probes:
  testing.raises: {}
  testing.skips: {}
  memory.triad:
    params: {size_mib: 16, dtype: fp64}
  gemm.square:
    params: {n: 256, dtype: [fp32, fp16]}
  transfer.local:
    params: {size_bytes: [65536, 4194304]}
  transfer.kv:
    params: {model: tiny, ctx: 256, layout: [contiguous, paged], path: d2d, dtype: fp32}
  collective.all_reduce:
    params: {size_bytes: [1024, 65536, 1048576], world_size: 2}
  composite.tp_decode_step:
    params: {model: tiny, layers: 1, batch: 1, ctx: 64, dtype: fp32, world_size: 1}
    timing: {warmup: 1, min_reps: 5, max_reps: 10, budget_s: 0.2}
"""
ARTIFACTS = Path(os.environ.get("COHERENCE_REPORT_ARTIFACTS", Path(tempfile.gettempdir()) / "coherence-report-test"))
FIGURE = re.compile(r'<figure class="plot" data-plot="([a-z-]+)" data-state="([a-z]+)"[^>]*>(.*?)</figure>', re.DOTALL)


def figures(text: str) -> list[tuple[str, str, str]]:
    """(kind, state, inner HTML) of every plot figure."""
    return FIGURE.findall(text)


def assert_every_plot(text: str, kinds: tuple[str, ...], state: str | None = "ok") -> None:
    found = figures(text)
    for kind in kinds:
        mine = [(s, inner) for k, s, inner in found if k == kind]
        assert mine, f"no <figure data-plot={kind}>"
        if state:
            # a plot of one value (a 1x1 heatmap) is shown as that number: it counts as shown
            assert any(s == state or (state == "ok" and s == "value") for s, _ in mine), \
                (kind, [s for s, _ in mine], [i[:300] for _, i in mine])
    for kind, s, inner in found:
        if s == "ok":
            assert "<svg" in inner and "</svg>" in inner, kind
        elif s == "value":
            assert 'class="bignum"' in inner and "<svg" not in inner, kind
        else:
            assert 'class="why"' in inner and "<svg" not in inner, kind


def assert_self_contained(text: str) -> None:
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    # nothing fetched: no external src/href, no stylesheet link, no script
    assert not re.search(r'(?:src|href)\s*=\s*"(?:https?:)?//', text)
    assert "<link" not in text and "<script" not in text.lower()


# -- synthetic runs (fast) --------------------------------------------------------------
def _synthetic(tmp_path):
    rng = np.random.default_rng(3)
    cases = {
        "gemm.square[n=256]@cpu:0": rng.lognormal(np.log(1e-3), 0.05, 60),
        "memory.triad[size_mib=16]@cpu:0": rng.lognormal(np.log(2e-3), 0.05, 60),
        "testing.raises[x=<i>&amp]@cpu:0": "failed",
        "gemm.square[n=256,dtype=fp16]@cpu:0": "skipped",
    }
    return make_run(tmp_path, "syn", cases)


def test_run_report_shows_failed_and_skipped_cases_with_reasons_escaped(tmp_path):
    path = _synthetic(tmp_path)
    text = build_run_report(load_run(path))
    failures = text[text.index('id="failures"'):text.index('id="cases"')]
    assert 'data-failures="2"' in failures
    # the case id is escaped, never raw markup
    assert "testing.raises[x=&lt;i&gt;&amp;amp]@cpu:0" in failures and "<i>" not in text
    assert 's-failed">failed</span>' in failures and "failed on purpose" in failures
    assert 's-skipped">skipped</span>' in failures and "skipped on purpose" in failures
    # failed before skipped
    assert failures.index("failed on purpose") < failures.index("skipped on purpose")
    # every plot kind is there: with data, or saying why not
    assert_every_plot(text, RUN_PLOTS, state=None)
    states = {k: s for k, s, _ in figures(text)}
    assert states["latency-cdf"] == "ok" and states["roofline"] == "ok"
    whys = {k: inner for k, s, inner in figures(text) if s == "empty"}
    assert "no collective cases in this run" in whys["collective-busbw"]
    assert "no composite serving cases" in whys["capacity-waterfall"]
    assert_self_contained(text)


def test_without_matplotlib_the_tables_stay_and_plots_say_why(tmp_path, monkeypatch):
    from harness.report import plots

    monkeypatch.setattr(plots, "available", lambda: (False, "matplotlib is not usable here (test)"))
    text = build_run_report(load_run(_synthetic(tmp_path)))
    found = figures(text)
    assert found and {s for _, s, _ in found} <= {"unavailable", "empty"}
    assert "Plots unavailable" in text and "matplotlib is not usable here (test)" in text
    assert "<svg" not in text
    assert 'data-table="failures"' in text and 'data-table="cases"' in text


def test_a_failing_plot_is_reported_in_its_figure_not_fatal(tmp_path, monkeypatch):
    from harness.report import plots

    def broken(*args, **kwargs):
        raise ValueError("deliberately broken plot")

    monkeypatch.setattr(plots, "latency_cdf", broken)
    text = build_run_report(load_run(_synthetic(tmp_path)))
    bad = [(s, inner) for k, s, inner in figures(text) if k == "latency-cdf"]
    assert bad and all(s == "error" and "deliberately broken plot" in inner for s, inner in bad)
    assert any(k == "roofline" and s == "ok" for k, s, _ in figures(text))


def test_compare_report_from_synthetic_runs(tmp_path):
    from harness.compare import load_config, parse_gate

    rng = np.random.default_rng(5)
    base = {f"gemm.k{i}@cpu:0": rng.lognormal(np.log(1e-3), 0.03, 120) for i in range(4)}
    cand = {k: rng.lognormal(np.log(1e-3), 0.03, 120) for k in base}
    cand["gemm.k0@cpu:0"] = rng.lognormal(np.log(1.5e-3), 0.03, 120)  # +50 %
    env_a = {"os": {"kernel_release": {"value": "6.1.0", "source": "uname"}}}
    env_b = {"os": {"kernel_release": {"value": "6.8.0", "source": "uname"}}}
    a = load_run(make_run(tmp_path, "a", base, environment=env_a))
    b = load_run(make_run(tmp_path, "b", cand, environment=env_b))
    text = build_compare_report([a], b, parse_gate("p50:+5%,p99:+10%,sla:2x"), load_config())
    assert_every_plot(text, COMPARE_PLOTS)
    verdicts = text[text.index('data-table="verdicts"'):]
    verdicts = verdicts[:verdicts.index("</table>")]
    row = next(r for r in verdicts.split("<tr>") if "gemm.k0@cpu:0" in r)
    assert 'v-regressed">regressed' in row
    assert all('v-unchanged">unchanged' in r for r in verdicts.split("<tr>") if "gemm.k1@cpu:0" in r)
    assert 'data-table="fingerprint-diff"' in text and "6.1.0" in text and "6.8.0" in text
    assert_self_contained(text)


def test_fleet_report_from_synthetic_runs(tmp_path):
    from harness.compare import load_config

    rng = np.random.default_rng(7)
    for i in range(5):
        slow = 2.0 if i == 4 else 1.0
        ind = {"capacity": {"C_eff": 100.0 / slow, "C_nom": 400.0, "epsilon": 0.25 / slow}}
        make_run(tmp_path, f"n{i}", {f"memory.m{j}@cpu:0": rng.lognormal(np.log(1e-3 * slow), 0.02, 30) for j in range(4)},
                 indicators=ind)
    runs = [load_run(tmp_path / f"n{i}") for i in range(5)]
    text = build_fleet_report(runs, load_config())
    assert_every_plot(text, FLEET_PLOTS)
    nodes = text[text.index('data-table="nodes"'):]
    nodes = nodes[:nodes.index("</table>")]
    flagged = [r for r in nodes.split("<tr>") if 'v-fail">fail' in r]
    assert len(flagged) == 1 and ">n4<" in flagged[0]
    assert "Σ C_eff" in text
    assert_self_contained(text)


def test_fleet_report_without_indicators_says_why_capacity_is_missing(tmp_path):
    from harness.compare import load_config

    rng = np.random.default_rng(8)
    for i in range(3):
        make_run(tmp_path, f"n{i}", {"memory.m@cpu:0": rng.lognormal(np.log(1e-3), 0.02, 30)})
    text = build_fleet_report([load_run(tmp_path / f"n{i}") for i in range(3)], load_config())
    cap = [(s, inner) for k, s, inner in figures(text) if k == "fleet-capacity"]
    assert cap == [(cap[0][0], cap[0][1])] and cap[0][0] == "empty" and "no node has C_eff or C_nom" in cap[0][1]


def test_cli_report_bad_input_is_one_line_and_exit_2(tmp_path):
    path = _synthetic(tmp_path)
    cases = [
        ("report", str(tmp_path / "no-such-run")),
        ("report",),
        ("report", "--compare", str(path)),
        ("report", "--compare", "--fleet", str(path), str(path)),
        ("report", str(path), str(path)),
        ("report", "--compare", str(path), str(path)),
    ]
    for args in cases:
        proc = coherence(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("coherence: error:"), (args, proc.stderr)
    assert "no run" in coherence("report", str(tmp_path / "no-such-run")).stderr


def test_cli_report_writes_the_files(tmp_path):
    path = _synthetic(tmp_path)
    other = make_run(tmp_path, "syn2", {"gemm.square[n=256]@cpu:0": np.full(30, 1e-3)})
    proc = coherence("report", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (path / "report.html").exists() and str(path / "report.html") in proc.stdout
    out = tmp_path / "sub" / "r.html"
    assert coherence("report", "syn", "--results", str(tmp_path), "--out", str(out)).returncode == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    proc = coherence("report", "--compare", str(path), str(other), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "compare-syn-vs-syn2.html").exists()
    proc = coherence("report", "--fleet", str(path), str(other), "--out", str(tmp_path / "f.html"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'data-plot="fleet-outliers"' in (tmp_path / "f.html").read_text()


def test_a_report_failure_after_a_run_is_a_warning_and_keeps_the_run(tmp_path, monkeypatch, capsys):
    import harness.report as reports
    from harness.finish import report_into

    path = _synthetic(tmp_path)
    before = sorted(p.name for p in path.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded [on purpose]")

    monkeypatch.setattr(reports, "write_run_report", broken)
    assert report_into(path) is None
    err = capsys.readouterr().err
    assert "report not written: RuntimeError: renderer exploded [on purpose]" in err and "coherence report" in err
    assert sorted(p.name for p in path.iterdir()) == before  # nothing lost, nothing half-written
    monkeypatch.undo()
    assert report_into(path) == path / "report.html" and (path / "report.html").exists()


def test_help_lists_report_and_no_report():
    top = coherence("--help", env={"COLUMNS": "200"})
    assert top.returncode == 0 and "report" in top.stdout
    run_help = coherence("run", "--help", env={"COLUMNS": "200"})
    assert "--no-report" in run_help.stdout
    rep = coherence("report", "--help", env={"COLUMNS": "200"})
    assert rep.returncode == 0 and "--compare" in rep.stdout and "--fleet" in rep.stdout and "--out" in rep.stdout


# -- a real run through the CLI ----------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-run")
    suite = root / "suite.yaml"
    suite.write_text(SUITE)
    # fp16 without arithmetic for it on any host (as on every CPU before Sapphire Rapids):
    # measured through fp32 and marked (probes.native), not skipped.
    proc = coherence("run", "--suite", str(suite), "--out", str(root / "results"), "--devices", "cpu", "--quiet",
                     env={"COHERENCE_CPU_FLAGS_OFF": "avx512_fp16,amx_fp16"})
    assert proc.returncode == 1, proc.stderr  # testing.raises failed: exit 1
    runs = [p for p in (root / "results").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0], proc


@pytest.mark.slow
def test_run_writes_report_html_with_the_failure_and_every_plot(real_run):
    path, proc = real_run
    report = path / "report.html"
    assert report.exists(), proc.stderr
    text = report.read_text()
    assert_every_plot(text, RUN_PLOTS, state="ok")
    failures = text[text.index('id="failures"'):text.index('id="cases"')]
    cases = pd.read_parquet(path / "cases.parquet")
    bad = cases[cases["status"] != "ok"]
    assert sorted(bad["status"]) == ["failed", "skipped"]
    for row in bad.itertuples():
        # each not-ok case: its id, its status and its reason, in one row of the table
        cells = next(r for r in failures.split("<tr>") if f'<td class="id">{html.escape(row.case_id)}</td>' in r)
        assert f's-{row.status}">{row.status}</span>' in cells and html.escape(row.reason) in cells
    failed = bad[bad["status"] == "failed"].iloc[0]
    assert failed["probe"] == "testing.raises" and "deliberate failure in prepare" in failed["reason"]
    # fp16 with no arithmetic for it: measured (not skipped), marked in the cases table
    fp16 = cases[cases["case_id"].str.contains("dtype=fp16")].iloc[0]
    assert fp16["status"] == "ok" and json.loads(fp16["extra"])["native"] is False
    assert any('class="emulated"' in r and "of fp32" in r for r in text.split("<tr>") if html.escape(fp16["case_id"]) in r)
    # the virtualization layers of this machine, and the indicator panel per mode
    env = json.loads((path / "manifest.json").read_text())["environment"]
    summary = (env.get("virtualization") or {}).get("summary")
    if summary:
        assert summary.replace(">", "&gt;") in text
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        assert f'data-mode="{mode}"' in text
    assert "mode4.tail_weight" in text and "cases behind it" in text
    assert_self_contained(text)


@pytest.mark.slow
def test_run_no_report_skips_it(tmp_path, write_suite):
    suite = write_suite("timing: {warmup: 1, min_reps: 3, max_reps: 3, budget_s: 0.05}\n"
                        "probes:\n  gemm.square: {params: {n: 64, dtype: fp32}}\n")
    proc = coherence("run", "--suite", str(suite), "--out", str(tmp_path / "r"), "--devices", "cpu", "--quiet", "--no-report")
    assert proc.returncode == 0, proc.stderr
    run = Path(proc.stdout.strip().splitlines()[-1])
    assert (run / "indicators.json").exists() and not (run / "report.html").exists()


# -- headless Chromium ------------------------------------------------------------------
PROBE_SCRIPT = """<script>(function(){var errs=[],root=document.documentElement;
function rec(m){errs.push(String(m));root.setAttribute('data-console-errors',JSON.stringify(errs));}
var ce=console.error;console.error=function(){rec('console.error: '+Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};
window.addEventListener('error',function(e){rec(e.message?'uncaught: '+e.message:'resource failed: '+((e.target&&(e.target.src||e.target.href))||e.target));},true);
window.addEventListener('unhandledrejection',function(e){rec('unhandled rejection: '+e.reason);});
document.addEventListener('securitypolicyviolation',function(e){rec('CSP violation: '+e.violatedDirective+' '+e.blockedURI);});
window.addEventListener('load',function(){root.setAttribute('data-probe-loaded','1');if(!errs.length)root.setAttribute('data-console-errors','[]');});
})();</script>"""
CONSOLE_ERROR = re.compile(r"Uncaught|Refused to|Failed to load|CONSOLE\(\d+\)\].*(?:error|Error)|ERR_")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_run(exe: str, url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp / 'chromium-profile'}", *extra, url]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=180)


def _console_errors(exe: str, page: Path, tmp: Path) -> tuple[list[str], str, list[str]]:
    """(errors recorded in the page, the DOM after load, console errors in Chromium's log)."""
    text = page.read_text()
    probed = page.with_name(page.stem + "-probed.html")
    # Before everything else in <head> (before the page's CSP, which forbids scripts).
    probed.write_text(text.replace("<head>", "<head>" + PROBE_SCRIPT, 1))
    proc = _chromium_run(exe, probed.as_uri(), tmp, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-probe-loaded="1"' in dom, "the page never finished loading (or the probe did not run)"
    m = re.search(r"data-console-errors=\"([^\"]*)\"", dom)
    recorded = json.loads(html.unescape(m.group(1))) if m else ["no data-console-errors attribute"]
    logged = [line for line in proc.stderr.splitlines() if CONSOLE_ERROR.search(line) and "file://" in line]
    return recorded, dom, logged


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it as root)")
def test_report_opens_in_headless_chromium_without_console_errors(real_run, tmp_path):
    exe = _chromium()
    path, _ = real_run
    page = tmp_path / "report.html"
    shutil.copy(path / "report.html", page)

    # The detector detects: a page with a script error and a blocked external image.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
                   '</head><body><img src="https://example.invalid/x.png"></body></html>')
    recorded, _, _ = _console_errors(exe, bad, tmp_path)
    assert recorded and any("CSP violation" in e or "resource failed" in e for e in recorded), recorded
    thrower = tmp_path / "thrower.html"
    thrower.write_text("<!DOCTYPE html><html><head></head><body><script>throw new Error('boom')</script></body></html>")
    recorded, _, logged = _console_errors(exe, thrower, tmp_path)
    assert any("boom" in e for e in recorded), recorded

    # The report: no console error, every plot in the DOM with its SVG.
    recorded, dom, logged = _console_errors(exe, page, tmp_path)
    assert recorded == [], recorded
    assert logged == [], logged
    assert_every_plot(dom, RUN_PLOTS, state="ok")
    assert "deliberate failure in prepare" in dom

    shot = tmp_path / "report.png"
    proc = _chromium_run(exe, page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1400,3000",
                         "--hide-scrollbars")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    shutil.copy(page, ARTIFACTS / "report.html")
    print(f"report screenshot: {ARTIFACTS / 'report.png'} (report: {ARTIFACTS / 'report.html'})")


# -- energy and graphs in the run report (issue 16) ------------------------------------------
def _energy_report(tmp_path, energies: dict, graph: dict | None = None, **kw) -> str:
    """The run report of test_collector's 2-rank TP step run with the energy columns
    (see tests/harness/test_show.py) and, where given, the composite's extra.graph."""
    from harness.collector import collect
    from tests.harness.test_show import _energy_tp_run

    run, k = _energy_tp_run(tmp_path, energies, graph, **kw)
    run.indicators = collect(run)
    return build_run_report(run)


def test_run_report_has_j_per_token_tokens_per_joule_and_flops_per_joule(tmp_path):
    text = _energy_report(tmp_path, {"tp": 4.0, "decode.projection[x]@cuda:0": 0.1})
    capacity = text[text.index('id="capacity"'):text.index('id="roofline"')]
    energy = capacity[capacity.index('data-table="serving-energy"'):]
    energy = energy[:energy.index("</table>")]
    # 4 J per step of batch 8: 0.5 J/token, 2 tokens/J, from the NVML counter.
    assert ">0.5 J<" in energy and ">2<" in energy and "nvml_energy_counter (gpu board)" in energy
    ladder = capacity[capacity.index('data-table="ladder-energy"'):]
    ladder = ladder[:ladder.index("</table>")]
    # No gemm case in this run: each device says why it has no FLOP/J.
    assert "not measurable: no compute-bound (gemm) case" in ladder
    assert_self_contained(text)
    # A device with gemm cases: the best FLOP/J with its dtype and case (collect's ladder).
    from harness.collector import collect
    from harness.report.run_report import ladder_energy_html
    from tests.harness.test_collector import case, make_run, samples
    from tests.harness.test_energy_figures import _with_energy

    g = "gemm.square[a]@cuda:0"
    run = make_run([case(g, "gemm.square", "gemm", "cuda:0", {}, 0.010, flops=1e12, bound="compute")],
                   samples(g, [0.01] * 5), tmp_path / "g")
    html_ = ladder_energy_html(collect(_with_energy(run, {g: 2.0}))["ladder"])
    row = html_[html_.index(">cuda:0<"):]
    row = row[:row.index("</tr>")]
    assert "compute-bound" in row and ">500 GFLOP/J bf16<" in row and f">{g}<" in row


def test_run_report_says_why_energy_was_not_measured(tmp_path):
    text = _energy_report(tmp_path, {}, reason="RAPL not readable: /sys/class/powercap/intel-rapl:0/energy_uj: EACCES")
    assert 'data-table="serving-energy"' not in text
    note = text[text.index('data-note="energy"'):]
    note = note[:note.index("</p>")]
    assert "energy per token: not measured" in note and "EACCES" in note
    # indicators.json of older code: the report says the figures predate energy accounting.
    from harness.report.run_report import ladder_energy_html, serving_energy_html

    assert "before energy accounting" in serving_energy_html([{"case_id": "c", "kappa": {"value": 1.0}}])
    assert ladder_energy_html([{"device": "cuda:0", "compute": {}}]) == ""


def test_run_report_marks_kappa_of_a_composite_that_ran_eagerly(tmp_path):
    eager = {"requested": True, "applied": False, "collectives": None,
             "reason": "CUDA graphs need a CUDA device; cpu:0 runs eagerly"}
    text = _energy_report(tmp_path, {"tp": 4.0}, graph=eager)
    serving = text[text.index('data-table="serving"'):]
    serving = serving[:serving.index("</table>")]
    assert "eager†" in serving
    note = text[text.index('data-note="graph"'):]
    assert "CUDA graphs need a CUDA device; cpu:0 runs eagerly" in note[:note.index("</p>")]
    applied = _energy_report(tmp_path / "b", {"tp": 4.0}, graph={**eager, "applied": True})
    assert 'data-note="graph"' not in applied and "eager†" not in applied
