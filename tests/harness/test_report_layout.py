"""Report layout at 1400 px, measured in headless Chromium: no table wider than its
container unless that container scrolls sideways, nothing spilling out of a cell or off
the page; plus the report's content rules that need no browser (verdict first, legends
that name what differs, a 1×1 heatmap as a number, whole tick labels, hover titles).

How the measurement is made: the report's Content-Security-Policy forbids every script,
so the page cannot measure itself. The TEST writes a copy of the report with a
measuring script inserted first in ``<head>``, before the page's CSP ``<meta>`` element
(a CSP delivered by ``<meta>`` governs only what is parsed after it, so the product's
policy stays exactly as shipped and still applies to the page's own content). Chromium
runs it with ``--headless --dump-dom --window-size=1400,...``; the script opens every
``<details>`` (a closed one hides its table from layout), measures after load and
writes its findings into an attribute of ``<html>``, which the dumped DOM carries back.
A control page with a wide table outside any scrolling box proves the detector detects.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.report import build_compare_report, build_run_report
from harness.results import load_run
from tests.harness.test_report import ARTIFACTS, _chromium, _chromium_run
from tests.harness.test_results import make_run

WIDTH = 1400

MEASURE = """<script>window.addEventListener('load',function(){
var root=document.documentElement,bad=[],scrolling=[],n=0;
document.querySelectorAll('details').forEach(function(d){d.open=true;});
var vw=root.clientWidth;
function name(t){return t.getAttribute('data-table')||('table#'+n);}
document.querySelectorAll('table').forEach(function(t){n++;
 var box=t.parentElement,cs=getComputedStyle(box),scrolls=(cs.overflowX==='auto'||cs.overflowX==='scroll');
 if(t.scrollWidth>box.clientWidth+1){if(scrolls){scrolling.push(name(t));}
  else{bad.push(name(t)+': table '+t.scrollWidth+' px in a '+box.clientWidth+' px container that does not scroll');}}
 var r=box.getBoundingClientRect();
 if(r.right>vw+1){bad.push(name(t)+': its container ends at '+Math.round(r.right)+' px, past the '+vw+' px window');}
 t.querySelectorAll('td,th').forEach(function(c){
  if(c.scrollWidth>c.clientWidth+1){bad.push(name(t)+': a cell spills '+(c.scrollWidth-c.clientWidth)+' px: '
   +c.textContent.slice(0,60));}});
});
document.querySelectorAll('figure').forEach(function(f){var r=f.getBoundingClientRect();
 if(r.right>vw+1){bad.push('figure '+f.getAttribute('data-plot')+' ends at '+Math.round(r.right)+' px');}});
if(root.scrollWidth>vw+1){var who=[];document.querySelectorAll('body *').forEach(function(e){
 var r=e.getBoundingClientRect(),p=e.parentElement.getBoundingClientRect(),ox=getComputedStyle(e).overflowX;
 var spills=(ox==='visible'&&e.scrollWidth>e.clientWidth+1&&e.clientWidth>0&&r.right+e.scrollWidth-e.clientWidth>vw+1);
 if(((r.right>vw+1&&p.right<=vw+1)||spills)&&who.length<5){who.push(e.tagName.toLowerCase()+' '
  +(e.getAttribute('data-plot')||e.getAttribute('data-table')||'')+(spills?' (its text spills) ':'')+' '
  +(e.textContent||'').slice(0,50));}});
 bad.push('the page scrolls sideways: '+root.scrollWidth+' px wide in '+vw+'; first past the edge: '+who.join('; '));}
root.setAttribute('data-layout',JSON.stringify({tables:n,window:vw,scrolling:scrolling,bad:bad}));
});</script>"""


def measure(page: Path, tmp: Path) -> dict:
    """Open ``page`` at WIDTH px in headless Chromium and return the measuring script's
    findings: {tables, window, scrolling: [tables that scroll in their box], bad: [...]}."""
    text = page.read_text()
    probed = page.with_name(page.stem + "-measured.html")
    probed.write_text(text.replace("<head>", "<head>" + MEASURE, 1))
    proc = _chromium_run(_chromium(), probed.as_uri(), tmp, "--dump-dom", f"--window-size={WIDTH},3000",
                         "--hide-scrollbars")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'data-layout="([^"]*)"', proc.stdout)
    assert m, "the measuring script did not run: " + proc.stdout[:500]
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, tmp: Path, name: str) -> Path:
    shot = tmp / f"{name}.png"
    proc = _chromium_run(_chromium(), page.as_uri(), tmp, f"--screenshot={shot}", f"--window-size={WIDTH},4000",
                         "--hide-scrollbars")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    shutil.copy(page, ARTIFACTS / page.name)
    return shot


# -- a run with what made the report overflow: long ids, a serving composite, wide indicators
COMPOSITE = ("composite.disagg_request[model=llama-3.1-70b,layers=2,prompt=2048,tokens=256,batch=16,dtype=bf16,"
             "arrival=poisson,rate=8,kv_layout=paged]@cuda:0-1")
COLL = "collective.all_reduce[size_bytes={s},dtype=fp32,world_size={w}]@cpu:0-{r}"


def _indicator(name: str, verdict: str, cases: list[str], value: float = 0.42) -> dict:
    return {"id": name, "value": value, "unit": "ratio", "verdict": verdict,
            "threshold": {"warn": 0.8, "fail": 0.5, "better": "higher"},
            "formula": "C / I", "formula_text": "coordinated rate over the best isolated rate of the same resource, "
            "per device and dtype, at the p50 repetition of each case behind it " * 2,
            "cases": cases, "reason": "a_very_long_unbroken_token_" * 6,
            "per_case": {c: {"value": value, "n": 40} for c in cases}}


def _indicators(cases: list[str], scale: float = 1.0) -> dict:
    serving = {
        "case_id": COMPOSITE, "unit": "s per request", "T_pred_s": 0.081, "T_meas_p50_s": 0.112 * scale,
        "T_meas_p99_s": 0.19 * scale, "slo_fraction": 0.93,
        "kappa": {"value": 0.72 / scale, "unit": "ratio", "verdict": "warn"},
        "C_eff": {"value": 812.0 / scale, "unit": "tokens/s"}, "C_nom": {"value": 4096.0, "unit": "tokens/s"},
        "epsilon": {"value": 0.198 / scale, "unit": "ratio"},
        "basis": {"slo": "TTFT ≤ 200 ms and TPOT ≤ 50 ms (configs/indicators.yaml serving.slo)",
                  "model": "llama-3.1-70b scaled from 2 of 80 layers", "prefill": "measured", "decode": "measured"},
        "truncation": {"layers_run": 2, "model_layers": 80, "scale": 40},
        **{f"{k}_{q}_s": 0.01 * (i + 1) * scale for i, k in enumerate(("ttft", "tpot", "itl", "e2e")) for q in ("p50", "p99")},
        "request_throughput": {"value": 12.5}, "output_throughput": {"value": 3200.0}, "goodput": {"value": 11.0},
        # Energy (issue 16): its table carries the long case id and a long note.
        "j_per_token": {"value": 0.021 * scale, "unit": "J/token", "energy_method": "nvml_energy_counter",
                        "energy_scope": "gpu board", "reason": "a_very_long_unbroken_token_" * 6},
        "tokens_per_j": {"value": 47.6 / scale, "unit": "tokens/J"},
        "waterfall": {"unit": "s per request", "measured_mean_s": 0.11, "slo_misses_s": 0.004, "effective_s": 0.114,
                      "bars": [{"name": "nominal step", "seconds": 0.05}, {"name": "roofline loss", "seconds": 0.02},
                               {"name": "interconnect", "seconds": 0.012},
                               {"name": "memory path / KV transfer", "seconds": 0.015},
                               {"name": "straggler wait", "seconds": 0.005},
                               {"name": "composition & noise", "seconds": 0.008}]},
    }
    return {
        "summary": {"ok": 2, "warn": 1, "fail": 1},
        "capacity": {"C_eff": 812.0 / scale, "C_nom": 4096.0, "epsilon": 0.198 / scale, "from_case": COMPOSITE,
                     "basis": serving["basis"]},
        "serving": [serving],
        "ladder": [{"device": "cuda:0", "energy": {
            "flops_per_j": {"value": 4.2e11 / scale, "unit": "FLOP/J", "dtype": "bf16", "cases": [cases[-1]]},
            "bytes_per_j": {"value": None, "unit": "B/J", "reason": "a_very_long_unbroken_token_" * 6}}}],
        "mode1": {"drift": _indicator("mode1.drift_within_rounds", "ok", cases[:2], 0.9 / scale)},
        "mode3": {"link_efficiency": _indicator("mode3.link_efficiency", "fail", cases, 0.31 / scale),
                  "collective_scaling": _indicator("mode3.collective_scaling", "warn", cases[2:], 0.6 / scale)},
        "mode4": {"tail_weight": _indicator("mode4.tail_weight", "ok", cases[:1], 1.2 * scale)},
    }


def _cases(rng, scale: float = 1.0) -> dict:
    cases = {COLL.format(s=s, w=w, r=w - 1): rng.lognormal(np.log(2e-4 * s / 1024 * w * scale), 0.05, 40)
             for s in (1024, 1048576) for w in (2, 4)}
    cases[COMPOSITE] = rng.lognormal(np.log(0.11 * scale), 0.05, 40)
    cases["transfer.local[size_bytes=67108864]@cpu:0"] = rng.lognormal(np.log(5e-3), 0.03, 40)
    cases["gemm.shaped[mnk=128x4096x14336,dtype=bf16,layout=row_major,impl=torch.matmul]@cpu:0"] = \
        rng.lognormal(np.log(3e-3 * scale), 0.03, 40)
    cases["testing.raises[x=" + "y" * 150 + "]@cpu:0"] = "failed"
    return cases


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """(run report, compare report) of synthetic runs, as files."""
    from harness.compare import load_config, parse_gate

    tmp = tmp_path_factory.mktemp("layout")
    rng = np.random.default_rng(11)
    a_cases, b_cases = _cases(rng), _cases(rng, scale=1.3)
    ids = [c for c in a_cases if not isinstance(a_cases[c], str)]
    devices = [{"id": "cpu:0", "type": "cpu", "name": "Test CPU"}, {"id": "cuda:0", "type": "cuda", "name": "Test GPU"}]
    # a fact with no place to break, wider than the page: its table must scroll in its own box
    env_a = {"os": {"kernel_release": {"value": "6.1.0-" + "x" * 300, "source": "uname -r"}}}
    env_b = {"os": {"kernel_release": {"value": "6.8.0-" + "y" * 300, "source": "uname -r"}}}
    a = load_run(make_run(tmp, "A", a_cases, devices=devices, indicators=_indicators(ids), environment=env_a))
    b = load_run(make_run(tmp, "B", b_cases, devices=devices, indicators=_indicators(ids, 1.3), environment=env_b))
    run_page = tmp / "report.html"
    run_page.write_text(build_run_report(b))
    cmp_page = tmp / "compare.html"
    cmp_page.write_text(build_compare_report([a], b, parse_gate("p50:+5%,p99:+10%,sla:2x"), load_config()))
    return run_page, cmp_page


# -- headless Chromium ------------------------------------------------------------------
needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")


@needs_chromium
def test_the_detector_flags_a_wide_table_that_does_not_scroll(tmp_path):
    wide = "".join(f"<td>column_{i}_with_a_long_unbreakable_value</td>" for i in range(40))
    page = tmp_path / "wide.html"
    page.write_text(f"<!DOCTYPE html><html><head></head><body><main><table data-table='wide'><tr>{wide}</tr></table>"
                    f"<div style='overflow-x:auto'><table data-table='boxed'><tr>{wide}</tr></table></div>"
                    "</main></body></html>")
    found = measure(page, tmp_path)
    assert found["window"] <= WIDTH and found["tables"] == 2
    assert any(b.startswith("wide: table") for b in found["bad"]), found
    assert found["scrolling"] == ["boxed"] and not any(b.startswith("boxed") for b in found["bad"]), found


@needs_chromium
@pytest.mark.parametrize("which", ["run", "compare"])
def test_report_tables_fit_1400px_or_scroll_in_their_own_box(reports, tmp_path, which):
    page = reports[0] if which == "run" else reports[1]
    found = measure(page, tmp_path)
    assert found["window"] <= WIDTH and found["tables"] >= (8 if which == "run" else 3), found
    assert found["bad"] == [], found["bad"]
    # the tables that overflowed 1400 px before (issue 14) are among those measured
    text = page.read_text()
    for table in (("serving", "serving-metrics", "mode3", "serving-energy", "ladder-energy") if which == "run"
                  else ("verdicts", "indicator-deltas")):
        assert f'data-table="{table}"' in text
    # the unbreakable 300-character fact is wider than the page: its table scrolls, in its box
    assert found["scrolling"] == (["facts"] if which == "run" else ["fingerprint-diff"]), found
    screenshot(page, tmp_path, f"layout-{which}")


@needs_chromium
def test_without_the_scrolling_box_the_same_report_fails(reports, tmp_path):
    """The check would fail if the report were wrong: the run report with its tables'
    scrolling boxes turned off (as before) overflows at 1400 px."""
    page = tmp_path / "unboxed.html"
    text = reports[0].read_text()
    assert ".tablewrap{overflow-x:auto;" in text
    page.write_text(text.replace(".tablewrap{overflow-x:auto;", ".tablewrap{", 1))
    found = measure(page, tmp_path)
    assert any(b.startswith("facts: table") for b in found["bad"]), found


# -- content rules (no browser) -----------------------------------------------------------
def test_run_report_opens_with_the_verdict(reports):
    text = reports[0].read_text()
    body = text[text.index("<main>"):]
    assert body.index('id="verdict"') < body.index('id="environment"') < body.index('id="capacity"')
    block = body[body.index('class="verdict'):body.index("</section>")]
    # cases: a failed case -> FAIL, with its counts and findings as sentences
    assert 'data-verdict="FAIL"' in block and ">FAIL<" in block
    assert '<ol class="findings">' in block and "failed" in block
    assert 'v-fail">fail</span> 1' in block or 'v-fail">fail</span> 2' in block


def test_a_single_transfer_cell_is_a_number_not_a_heatmap(reports):
    text = reports[0].read_text()
    fig = re.search(r'<figure class="plot" data-plot="transfer-heatmap" data-state="([a-z]+)"[^>]*>(.*?)</figure>',
                    text, re.DOTALL)
    assert fig and fig.group(1) == "value", fig
    assert "<svg" not in fig.group(2) and 'class="value"' in fig.group(2)
    assert "transfer.local[size_bytes=67108864]@cpu:0" in fig.group(2)  # hover title names the case


def _titles(svg: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", svg, re.DOTALL)]


def test_every_point_bar_and_line_has_a_hover_title_with_its_case(reports):
    text = reports[0].read_text()
    figs = dict(re.findall(r'data-plot="([a-z-]+)" data-state="ok"[^>]*>(.*?)</figure>', text, re.DOTALL))
    # waterfall bars: the composite and each step's seconds
    wf = _titles(figs["capacity-waterfall"])
    assert len(wf) == 9 and all(COMPOSITE in t for t in wf) and any("interconnect: +12 ms" in t for t in wf), wf
    # latency lines: case id with its p50
    lat = [t for svg in re.findall(r'data-plot="latency-cdf" data-state="ok"[^>]*>(.*?)</figure>', text, re.DOTALL)
           for t in _titles(svg)]
    assert any(t.startswith(COMPOSITE) and "p50" in t for t in lat), lat
    # roofline dots
    roof = _titles(figs["roofline"])
    assert roof and all("FLOP/s at p50" in t for t in roof)
    assert "<script" not in text.lower() and "default-src 'none'" in text


def test_latency_legends_name_what_differs_and_many_lines_are_split():
    from harness.report.plots import distinct_labels
    from harness.report.run_report import PANEL_MAX, latency_panels

    ids = [COLL.format(s=s, w=w, r=w - 1) for w in (2, 4) for s in (1024, 1048576, 16777216)]
    labels = distinct_labels(ids)
    # exactly where they differ: size and world size, not a common prefix cut short
    assert labels[ids[0]] == "size_bytes=1024, world_size=2" and labels[ids[-1]] == "size_bytes=16777216, world_size=4"
    ops = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "all_to_all", "sendrecv")
    many = [i.replace("all_reduce", op) for op in ops for i in ids] + [COLL.format(s=4096, w=2, r=1)]
    assert len(many) == 43
    panels = latency_panels(many)
    assert all(len(p) <= PANEL_MAX for _, p in panels) and sorted(c for _, p in panels for c in p) == sorted(many)
    assert {name for name, _ in panels} == {f"collective.{op}" for op in ops}  # one panel per operation
    # a probe with more than PANEL_MAX cases splits by its fewest-valued parameter
    wide = [f"decode.projection[proj={p},batch={b},dtype={d}]@cpu:0" for p in "abcd" for b in (1, 32)
            for d in ("fp32", "bf16")]
    split = latency_panels(wide)
    assert [len(p) for _, p in split] == [8, 8] and split[0][0] == "decode.projection, batch=1"


def test_svg_titles_survive_escaping_and_tick_labels_are_whole():
    from harness.report import plots

    long = "composite.tp_decode_step[model=tiny,layers=2,batch=1,ctx=512,dtype=fp32,world_size=2]@cpu:0-1 <&>"
    svg = plots.waterfall([{"name": "nominal step", "seconds": 0.01},
                           {"name": "memory path / KV transfer", "seconds": 0.002}], 0.012, 0.0, 0.012,
                          "s per step", long)
    assert "<&>" not in svg and "&lt;&amp;&gt;" in svg
    # every tick label of the waterfall is there whole (wrapped onto lines, never cut with an ellipsis)
    assert "…" not in svg
    words = " ".join(re.sub(r"<[^>]+>", " ", svg[svg.index("</metadata>"):]).split())
    for label in ("nominal step", "memory path / KV transfer", "measured mean", "SLO misses", "effective"):
        assert all(w in words for w in label.split()), (label, words)
    assert len(re.findall(r"<title>", svg)) == 5  # one hover title per bar
    assert plots._wrap("a" * 25, 10).split("\n") == ["a" * 10, "a" * 10, "a" * 5]


def test_heatmap_cells_and_compare_plots_carry_hover_titles(reports):
    from harness.report import plots

    svg = plots.heatmap([[1e9, None], [2e9, 3e10]], ["host (pinned)", "cpu:0"], ["cpu:0", "host (pinned)"], "t",
                        tips=[["transfer.h2d[size_bytes=1]@cpu:0", None], ["a@cpu:0", "b@cpu:0"]])
    titles = _titles(svg)
    # one per measured cell (the unmeasured one has none), each naming source, destination and case
    assert len(titles) == 3 and "host (pinned) → cpu:0: 1 GB/s\ntransfer.h2d[size_bytes=1]@cpu:0" in titles, titles
    text = reports[1].read_text()
    figs = dict(re.findall(r'data-plot="([a-z-]+)" data-state="ok"[^>]*>(.*?)</figure>', text, re.DOTALL))
    overlay = _titles(figs["cdf-overlay"])
    assert any(t.startswith(COMPOSITE) and "baseline: n 40" in t for t in overlay), overlay
    assert any(t.startswith(COMPOSITE) and "candidate: n 40" in t for t in overlay), overlay
    sla = _titles(figs["sla-amplification"])
    assert sla and all("verdict" in t for t in sla) and any(t.startswith(COMPOSITE) for t in sla), sla
