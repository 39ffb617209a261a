from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from tests.conftest import REPO, coherence


def test_help_is_fast_and_imports_no_framework():
    code = (
        "import sys, time; t=time.perf_counter();"
        "from click.testing import CliRunner; from harness.cli import main;"
        "r=CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
        "print(time.perf_counter()-t);"
        "print(sorted(m for m in ('torch','jax','pynvml','pandas','matplotlib','numpy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _elapsed, loaded = proc.stdout.strip().splitlines()
    assert loaded == "[]"
    # The whole process, interpreter start included, as a user sees it.
    t0 = time.perf_counter()
    assert subprocess.run([sys.executable, "-m", "harness.cli", "--help"], cwd=REPO, capture_output=True).returncode == 0
    assert time.perf_counter() - t0 < 1.0


def test_env_json_reports_layers_with_evidence():
    proc = coherence("env", "--json", "--anonymize")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    layers = doc["virtualization"]["layers"]
    assert all(layer["evidence"] for layer in layers)
    assert doc["host"]["hostname"]["value"].startswith("host-")
    assert any(d["id"] == "cpu:0" for d in doc["devices"]["torch"])


def test_list_shows_probes_and_devices():
    proc = coherence("list", env={"COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    for name in ("memory.triad", "gemm.square", "gemm.shaped", "overhead.timer", "overhead.launch"):
        assert name in proc.stdout
    assert "cpu:0" in proc.stdout


def test_env_layers_agree_with_the_raw_signals_of_this_machine():
    """Whatever machine this runs on: an x86 hypervisor flag means a hypervisor layer, a
    /.dockerenv means a docker layer. Only that direction holds everywhere: an arm64 VM
    has no such flag and is found from SMBIOS/DMI/the device tree instead."""
    from pathlib import Path

    doc = json.loads(coherence("env", "--json").stdout)
    kinds = {(layer["layer"], layer["kind"]) for layer in doc["virtualization"]["layers"]}
    flags = Path("/proc/cpuinfo").read_text().split()
    if "hypervisor" in flags:
        assert any(layer == "hypervisor" for layer, _ in kinds), kinds
    if Path("/.dockerenv").exists():
        assert ("container", "docker") in kinds


def test_list_shows_the_probes_a_suite_plugin_registers(write_suite):
    suite = write_suite("plugins: [tests.plugins.fault_probes]\nprobes:\n  testing.raises: {}\n")
    proc = coherence("list", "--suite", str(suite), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [p["probe"] for p in json.loads(proc.stdout)] == ["testing.raises"]


# -- one meaning per option: --out is an output folder, --results the runs read --------
def _cli(*args, columns=200):
    """The CLI in-process (click's runner), stdout and stderr apart."""
    from click.testing import CliRunner

    from harness.cli import main

    return CliRunner(env={"COLUMNS": str(columns)}).invoke(main, [str(a) for a in args])


def _tiny_run(root, run_id="r1"):
    import numpy as np

    from tests.harness.test_results import make_run

    return make_run(root, run_id, {"gemm.square[n=8]@cpu:0": np.linspace(1e-3, 2e-3, 20)})


def test_help_gives_each_option_one_meaning():
    """Commands that read runs take --results DIR (their old --out is hidden, deprecated);
    files are -o/--output FILE on report and export; --out, where shown, is a folder the
    command writes into."""
    for cmd in ("show", "collect", "compare", "fleet", "export"):
        text = _cli(cmd, "--help").stdout
        assert "--results DIR" in text and not re.search(r"^  (-\w, )?--out\b", text, re.M), cmd
    for cmd in ("report", "export"):
        assert "-o, --output FILE" in _cli(cmd, "--help").stdout, cmd
    assert "--out DIR" in _cli("report", "--help").stdout
    assert "Folder that receives" in _cli("run", "--help").stdout
    assert "--all" in _cli("compare", "--help").stdout


def test_show_and_collect_read_runs_from_results_and_out_still_works_with_a_warning(tmp_path):
    _tiny_run(tmp_path)
    proc = _cli("show", "r1", "--results", tmp_path, "--json")
    assert proc.exit_code == 0 and proc.stderr == "" and "gemm.square[n=8]@cpu:0" in proc.stdout
    proc = _cli("show", "r1", "--out", tmp_path, "--json")
    assert proc.exit_code == 0 and "gemm.square[n=8]@cpu:0" in proc.stdout
    assert proc.stderr.count("\n") == 1 and "deprecated" in proc.stderr and "--results DIR" in proc.stderr
    proc = _cli("show", "r1", "--results", tmp_path, "--out", tmp_path / "elsewhere")
    assert proc.exit_code == 2 and proc.stderr.startswith("coherence: error: --results") and proc.stdout == ""
    proc = _cli("collect", "r1", "--results", tmp_path, "--quiet", "--json")
    assert proc.exit_code == 2 and "--quiet and --json" in proc.stderr
    proc = _cli("collect", "r1", "--results", tmp_path, "--quiet")
    assert proc.exit_code == 0 and proc.stdout.strip() == str(tmp_path / "r1" / "indicators.json")


def test_report_writes_output_file_out_folder_and_the_old_out_file_spelling(tmp_path):
    _tiny_run(tmp_path)
    target = tmp_path / "mine.html"
    proc = _cli("report", "r1", "--results", tmp_path, "-o", target)
    assert proc.exit_code == 0, proc.output
    assert target.read_text().startswith("<!DOCTYPE html>") and proc.stderr == ""
    folder = tmp_path / "reports"
    folder.mkdir()
    proc = _cli("report", "r1", "--results", tmp_path, "--out", folder)
    assert proc.exit_code == 0 and (folder / "report.html").is_file() and proc.stderr == ""
    old = tmp_path / "old.html"
    proc = _cli("report", "r1", "--results", tmp_path, "--out", old)
    assert proc.exit_code == 0 and old.is_file()
    assert proc.stderr.count("\n") == 1 and "report --out FILE is deprecated; use -o/--output FILE" in proc.stderr
    # Options that would do nothing are refused, not ignored.
    for args, culprit in ((["--gate", "p50:+5%"], "--gate applies to --compare only"),
                          (["--config", tmp_path / "c.yaml"], "--config applies to --compare and --fleet only"),
                          (["-o", target, "--out", folder], "give one")):
        proc = _cli("report", "r1", "--results", tmp_path, *args)
        assert proc.exit_code == 2 and culprit in proc.stderr and proc.stderr.count("\n") == 1, proc.output
