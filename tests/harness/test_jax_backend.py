"""The JAX backend in the harness: planning, host devices, nominal matching, the CLI
with and without JAX installed."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from harness import environment, nominal, registry
from harness.backends import jax_device_types
from harness.backends import parse as parse_backends
from harness.config import parse_suite
from harness.errors import UserError
from harness.plan import device_types, plan, resolve_devices
from tests.conftest import coherence

SUITE = {
    "name": "jaxtest",
    "timing": {"warmup": 1, "min_reps": 3, "max_reps": 5, "budget_s": 0.1},
    "probes": {
        "memory.triad": {"params": {"size_mib": 8, "dtype": "fp32"}},
        "gemm.square": {"params": {"n": 128, "dtype": "fp32"}},
        "collective.all_reduce": {"params": {"size_bytes": 4096, "world_size": [2, 4]}},
        "collective.broadcast": {"params": {"size_bytes": 4096, "world_size": [2]}},
    },
}


def _devices():
    torch_cpu = {"id": "cpu:0", "backend": "torch", "type": "cpu", "index": 0, "name": "cpu", "extra": {}}
    jax_cpu = [{"id": f"jax:cpu:{i}", "backend": "jax", "type": "cpu", "index": i, "name": "cpu", "extra": {}}
               for i in range(4)]
    return [torch_cpu, *jax_cpu]


def test_plan_both_backends_side_by_side():
    registry.discover()
    suite = parse_suite(SUITE, "test")
    cases = plan(suite, list(suite.probes), _devices(), "torch,jax", {}, cpu_ranks=2)
    ids = [c.case_id for c in cases]
    assert len(ids) == len(set(ids))
    jax_cases = {c.case_id: c for c in cases if c.backend == "jax"}
    torch_cases = {c.case_id: c for c in cases if c.backend == "torch"}
    # Single-device JAX cases only on the first host device (they share one CPU).
    assert "memory.triad[size_mib=8,dtype=fp32]@jax:cpu:0" in jax_cases
    assert not any("@jax:cpu:1" in i for i in jax_cases)
    # Collectives over the mesh: world sizes 2 and 4, one process (no rank pool).
    ar = [c for c in jax_cases.values() if c.probe == "collective.all_reduce"]
    assert sorted((c.world_size, c.device) for c in ar) == [(2, "jax:cpu:0-1"), (4, "jax:cpu:0-3")]
    assert ar[-1].group_devices == [f"jax:cpu:{i}" for i in range(ar[-1].world_size)]
    assert all(c.skip is None for c in ar)
    # No JAX broadcast; torch keeps its own, on its own devices only.
    assert not any(c.probe == "collective.broadcast" for c in jax_cases.values())
    assert any(c.probe == "collective.broadcast" for c in torch_cases.values())
    assert all("jax:" not in c.device for c in torch_cases.values())
    # torch planned alone is unchanged by the JAX devices being in the list.
    alone = plan(suite, list(suite.probes), _devices()[:1], "torch", {}, cpu_ranks=2)
    assert [c.case_id for c in alone] == [c.case_id for c in cases if c.backend == "torch"]


def test_plan_skips_a_mesh_larger_than_the_devices():
    registry.discover()
    suite = parse_suite(SUITE, "test")
    cases = plan(suite, list(suite.probes), _devices()[:3], "jax", {})
    four = [c for c in cases if c.world_size == 4]
    assert four and all("needs 4 JAX cpu devices, 2 available" in c.skip for c in four)


def test_jax_device_types():
    registry.discover()
    # The JAX backend's default: the probe's torch device types, cuda read as gpu, + tpu.
    assert jax_device_types(registry.get("memory.triad")) == ("cpu", "gpu", "tpu")
    # A JAX kernel that names its device types: transfer.d2d also runs between host devices.
    assert device_types(registry.get("memory.triad"), "jax") == ("cpu", "gpu", "tpu")
    assert device_types(registry.get("transfer.d2d"), "jax") == ("gpu", "tpu", "cpu")
    assert device_types(registry.get("transfer.d2d"), "torch") == ("cuda",)
    # No JAX kernel: not planned on JAX.
    assert "jax" not in registry.backends_of(registry.get("collective.reduce"))
    assert "jax" not in registry.backends_of(registry.get("overhead.launch"))
    assert device_types(registry.get("overhead.launch"), "jax") == ()


def test_resolve_devices_by_backend_and_platform():
    devs = _devices()
    assert [d["id"] for d in resolve_devices("jax", devs)] == [f"jax:cpu:{i}" for i in range(4)]
    assert [d["id"] for d in resolve_devices("jax:cpu", devs)] == [f"jax:cpu:{i}" for i in range(4)]
    assert [d["id"] for d in resolve_devices("cpu:0", devs)] == ["cpu:0"]
    with pytest.raises(UserError):
        resolve_devices("jax:tpu", devs)


def test_parse_backends():
    assert parse_backends("torch,jax") == ["torch", "jax"]
    assert parse_backends(" jax ") == ["jax"]
    with pytest.raises(UserError, match="unknown backend 'tensorflow'"):
        parse_backends("torch,tensorflow")


def test_host_devices_forced_unless_configured(monkeypatch):
    import sys

    # As in a fresh process: other tests in this one may have started JAX already.
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    env = {}
    rec = environment.prepare_jax_host_devices(4, environ=env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    assert rec["host_devices"] == 4
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"}
    rec = environment.prepare_jax_host_devices(4, environ=env)
    assert rec == {"forced_host_devices": False, "host_devices": 8,
                   "how": "left as configured (XLA_FLAGS / JAX_NUM_CPU_DEVICES)"}
    assert env["XLA_FLAGS"].count("device_count") == 1
    assert environment.prepare_jax_host_devices(4, environ={"JAX_NUM_CPU_DEVICES": "2"})["host_devices"] == 2


@pytest.mark.parametrize("kind,row", [
    ("TPU v5 lite", "Google TPU v5e"), ("TPU v4", "Google TPU v4"), ("TPU v6 lite", "Google TPU v6e (Trillium)"),
    ("TPU v5p", "Google TPU v5p"), ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"),
])
def test_nominal_matched_by_device_kind(kind, row):
    dev = {"id": "jax:tpu:0", "backend": "jax", "type": "tpu" if "TPU" in kind else "gpu", "name": kind}
    got = nominal.nominal_for(dev)
    assert got["kind"] == "datasheet" and got["row"] == row


def _no_jax_env(tmp_path) -> dict:
    """A PYTHONPATH entry whose `jax` package fails to import, as if not installed."""
    fake = tmp_path / "nojax" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named jax (test)')\n")
    from tests.conftest import REPO

    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"}


def test_without_jax_env_reports_it_and_torch_runs(tmp_path, write_suite):
    env = _no_jax_env(tmp_path)
    r = coherence("env", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["frameworks"]["jax"]["available"] is False
    assert doc["devices"]["jax"] == []
    assert doc["frameworks"]["torch"]["available"] is True
    suite = write_suite("name: t\ntiming: {warmup: 1, min_reps: 3, max_reps: 3}\n"
                        "probes:\n  memory.triad: {params: {size_mib: 4, dtype: fp32}}\n")
    r = coherence("run", "--suite", str(suite), "--backend", "jax", "--out", str(tmp_path / "r"), "--quiet", env=env)
    assert r.returncode == 2 and "--backend jax: JAX is not usable here" in r.stderr
    assert "Traceback" not in r.stderr
    r = coherence("run", "--suite", str(suite), "--out", str(tmp_path / "r"), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    cases = pd.read_parquet(os.path.join(r.stdout.strip(), "cases.parquet"))
    assert list(cases.status) == ["ok"] and list(cases.backend) == ["torch"]


@pytest.mark.slow
def test_run_torch_and_jax_side_by_side(tmp_path, write_suite):
    pytest.importorskip("jax")
    suite = write_suite("""
name: side-by-side
timing: {warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.1}
cpu_ranks: 2
probes:
  memory.triad: {params: {size_mib: 8, dtype: fp32}}
  collective.all_reduce: {params: {size_bytes: 65536, world_size: [2, 4]}}
""")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = ""
    r = coherence("run", "--suite", str(suite), "--backend", "torch,jax", "--out", str(tmp_path), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    run = r.stdout.strip()
    cases = pd.read_parquet(os.path.join(run, "cases.parquet"))
    assert set(cases.status) == {"ok"}, cases[["case_id", "reason"]].to_string()
    assert cases.case_id.is_unique
    by = {(b, p): g for (b, p), g in cases.groupby(["backend", "probe"])}
    assert list(by[("torch", "memory.triad")].device) == ["cpu:0"]
    assert list(by[("jax", "memory.triad")].device) == ["jax:cpu:0"]
    # torch: Gloo rank processes; JAX: a mesh of the 4 forced host devices, one process.
    assert sorted(by[("torch", "collective.all_reduce")].world_size) == [2, 4]
    jax_ar = by[("jax", "collective.all_reduce")].sort_values("world_size")
    assert list(jax_ar.world_size) == [2, 4]
    assert list(jax_ar.busbw_factor) == [1.0, 1.5]
    assert set(cases[cases.backend == "jax"].timer) == {"block_until_ready+perf_counter_ns"}
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    assert manifest["jax"]["forced_host_devices"] is True and manifest["jax"]["host_devices"] == 4
    assert manifest["jax"]["cpu_devices_seen"] == 4
    assert manifest["config"]["backend"] == "torch,jax"
    assert coherence("show", run).returncode == 0
    r = coherence("show", run, "--json")
    assert r.returncode == 0 and "jax:cpu:0-3" in {c["device"] for c in json.loads(r.stdout)}
