"""Backends: a third one added by a plugin alone, planning by registered kernels, and
the backend registry's errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import backends, registry
from harness.config import parse_suite
from harness.errors import UserError
from harness.plan import device_types, plan
from tests.conftest import coherence

PLUGIN = "tests.plugins.numpy_backend"
SUITE = """
name: numpy-backend
timing: {warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.2}
probes:
  memory.triad: {params: {size_mib: 4, dtype: [fp64, bf16]}}
  memory.copy: {params: {size_mib: 4, dtype: fp64}}
  gemm.square: {params: {n: 128, dtype: fp32}}
"""


def test_a_plugin_adds_a_numpy_backend_that_coherence_run_uses(tmp_path):
    """The plugin (tests/plugins/numpy_backend.py) registers the backend and two kernels;
    nothing under harness/ or probes/ names it. Its cases carry the shipped specs' work
    model, are checked against float64 and end ok; a probe it has no kernel for is not
    planned on it; a dtype it cannot compute is skipped with the reason."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "results"
    proc = coherence("run", "--suite", str(suite), "--backend", "numpy", "--out", str(out), "--no-report", "--quiet",
                     env={"COHERENCE_PLUGINS": PLUGIN}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    cases = pd.read_parquet(run / "cases.parquet").set_index("case_id")
    assert set(cases["backend"]) == {"numpy"}
    assert set(cases.index) == {
        "memory.triad[size_mib=4,dtype=fp64]@numpy:cpu:0",
        "memory.triad[size_mib=4,dtype=bf16]@numpy:cpu:0",
        "gemm.square[n=128,dtype=fp32]@numpy:cpu:0",
    }
    triad = cases.loc["memory.triad[size_mib=4,dtype=fp64]@numpy:cpu:0"]
    assert triad["status"] == "ok", triad["reason"]
    assert triad["bytes"] == 3 * 4 * 2**20 and triad["flops"] == 2 * (4 * 2**20 // 8)
    assert json.loads(triad["extra"])["max_rel_error"] <= 1e-12
    gemm = cases.loc["gemm.square[n=128,dtype=fp32]@numpy:cpu:0"]
    assert gemm["status"] == "ok", gemm["reason"]
    assert gemm["flops"] == 2 * 128**3 and gemm["n"] >= 3
    bf16 = cases.loc["memory.triad[size_mib=4,dtype=bf16]@numpy:cpu:0"]
    assert bf16["status"] == "skipped" and bf16["reason"] == "NumPy has no bf16 arithmetic"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["backend"] == "numpy"
    # `coherence list` shows the plugin's backend next to the shipped ones.
    listing = coherence("list", "--json", env={"COHERENCE_PLUGINS": PLUGIN})
    assert listing.returncode == 0, listing.stderr
    by_name = {p["probe"]: p for p in json.loads(listing.stdout)}
    assert by_name["memory.triad"]["backends"] == ["torch", "jax", "numpy"]
    assert by_name["memory.copy"]["backends"] == ["torch", "jax"]


def test_an_unknown_backend_is_one_line_naming_the_known_ones():
    proc = coherence("run", "--backend", "numpy", "--no-report")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "unknown backend 'numpy' (known: torch, jax; a plugin's backend is known once its module is loaded: "
        "the suite's plugins or COHERENCE_PLUGINS)")
    assert "Traceback" not in proc.stderr


def test_a_probe_plans_only_where_a_kernel_is_registered():
    registry.discover()
    suite = parse_suite({"name": "t", "probes": {"collective.broadcast": {"params": {"size_bytes": 4096}},
                                                "memory.triad": {"params": {"size_mib": 4}}}}, "test")
    jax_cpu = [{"id": f"jax:cpu:{i}", "backend": "jax", "type": "cpu", "index": i, "extra": {}} for i in range(2)]
    cases = plan(suite, list(suite.probes), jax_cpu, "jax", {})
    assert {c.probe for c in cases} == {"memory.triad"}  # no JAX broadcast kernel
    assert device_types(registry.get("collective.broadcast"), "jax") == ()


def _none(env):
    return []


def _one(env):
    return [{"id": "x"}]


def test_a_backend_name_is_taken_once():
    backends.register(backends.Backend("t-once", _none))
    try:
        backends.register(backends.Backend("t-once", _none))  # the same definition again: fine
        with pytest.raises(TypeError, match="registered twice"):
            backends.register(backends.Backend("t-once", _one))
        with pytest.raises(TypeError, match="groups"):
            backends.register(backends.Backend("t-bad", _none, groups="threads"))
        with pytest.raises(UserError, match="t-once: not usable here"):
            backends.devices_of(["t-once"])
    finally:
        backends._BACKENDS.pop("t-once", None)


def test_a_kernel_for_a_probe_and_backend_is_registered_once():
    @registry.kernel("t.probe", "t-backend")
    def build(probe, ctx):
        return None

    def other(probe, ctx):
        return None

    with pytest.raises(TypeError, match="registered twice"):
        registry.kernel("t.probe", "t-backend")(other)
    registry._KERNELS.pop(("t.probe", "t-backend"))


def _raises(env):
    raise OSError("cannot open /dev/mydev")


@pytest.mark.parametrize("listing,message", [
    (_raises, "t-dev: listing its devices failed (OSError: cannot open /dev/mydev)"),
    (lambda env: ["cpu:0"], "expected a mapping with keys id, type, backend"),
    (lambda env: [{"id": "t-dev:cpu:0", "backend": "t-dev"}], "missing type"),
    (lambda env: [{"id": "t-dev:cpu:0", "type": "cpu", "backend": "torch"}], "its backend is 'torch', not 't-dev'"),
    (lambda env: [{"id": "cpu:0", "type": "cpu", "backend": "t-dev"}], "its id must start with 't-dev:'"),
])
def test_a_backend_s_devices_are_checked_in_one_line(listing, message):
    backends._BACKENDS.pop("t-dev", None)
    backends.register(backends.Backend("t-dev", listing))
    try:
        with pytest.raises(UserError) as err:
            backends.devices_of(["t-dev"])
        assert message in str(err.value) and str(err.value).startswith("--backend t-dev")
    finally:
        backends._BACKENDS.pop("t-dev", None)


def test_a_kernel_for_a_probe_nothing_registers_is_named_with_its_module():
    registry.kernel("memory.cpoy", "torch")(_none)
    try:
        with pytest.raises(UserError, match=r"test_backends: kernel for unknown probe 'memory.cpoy' on backend torch "
                                            r"\(known: memory.add, memory.copy"):
            registry.discover()
    finally:
        registry._KERNELS.pop(("memory.cpoy", "torch"))
    registry.discover()  # fine again


def test_a_builder_that_returns_no_kernel_fails_its_case_with_a_reason_naming_it():
    from tests.probes.helpers import run

    registry.discover()
    entry = registry._KERNELS[("memory.triad", "torch")]
    registry._KERNELS[("memory.triad", "torch")] = registry.KernelEntry(lambda probe, ctx: None, None, "my.plugin")
    try:
        result = run("memory.triad", {"size_mib": 1, "dtype": "fp64"})
    finally:
        registry._KERNELS[("memory.triad", "torch")] = entry
    assert result["status"] == "failed"
    assert result["reason"] == ("TypeError: the torch kernel builder of memory.triad (my.plugin) returned NoneType, "
                                "not a harness.registry.Kernel")


def test_a_backend_without_kernels_for_the_suite_says_what_it_measures(tmp_path):
    proc = coherence("run", "--backend", "numpy", "--probe", "memory.copy", "--out", str(tmp_path), "--no-report",
                     env={"COHERENCE_PLUGINS": PLUGIN})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "backend numpy has no kernel for memory.copy (it measures: gemm.square, memory.triad)")
