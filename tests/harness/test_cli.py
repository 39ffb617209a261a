from __future__ import annotations

import json
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
