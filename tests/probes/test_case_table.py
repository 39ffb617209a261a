"""The quick suite's planned cases on fixed stand-in machines, against a golden table.

``tests/fixtures/quick_cases.json`` holds, for ``configs/quick.yaml`` planned for the
``torch,jax`` backends on each stand-in machine of :data:`MACHINES` (host facts and
device lists written out here: cpu flags, cache, memory, cores, CPU, CUDA and JAX
devices), every case's id, probe, backend, device group, params, timing, skip reason,
components and implied_by, and for each case that is not skipped and has no "auto"
parameter its spec work model (``registry.get(probe)().work(params, device_info)``).
It was written with the code of commit 14013f3, before the probes were split into
spec and kernel modules (issue 15): that split must plan the same cases with the same
work. Nothing here reads this host, so the table is the same on every machine.

Regenerate (only for a deliberate change of the suite or the planner) with
``python tests/probes/test_case_table.py --write``. To write it with an older
checkout, run that checkout's code alone: the editable install of this one otherwise
supplies modules the older one lacks (harness.plan), which :func:`_planner` refuses.
``python -S`` with the checkout and the venv's site-packages on PYTHONPATH, plus a
``coherence-0.1.0.dist-info`` there with that checkout's entry points, does it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from harness import registry

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "quick_cases.json"
SUITE = "quick"
BACKENDS = "torch,jax"

GIB = 1 << 30
X86_ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
           "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def machine(name: str, cores: int, flags: set, llc_bytes: int, memory_bytes: int, jax_devices: int,
            gpus: int = 0, gpu: tuple = ("", "", 0)):
    """A stand-in machine: its host facts (what harness.plan.host_facts gives) and its
    devices (the shape harness.environment.torch_devices() and jax_devices() give):
    the CPU, ``gpus`` CUDA devices ``gpu`` = (name, compute capability, memory bytes),
    and ``jax_devices`` JAX devices (of the GPUs where there are some, else host devices)."""
    host = {"usable_cores": cores, "usable_cores_note": "", "last_level_cache_bytes": llc_bytes,
            "cpu_isa": {f: f in flags for f in X86_ISA}, "memory_available_bytes": memory_bytes * 3 // 4,
            "cpu_model": name}
    devices = [{"id": "cpu:0", "backend": "torch", "type": "cpu", "index": 0, "name": name,
                "memory_bytes": memory_bytes, "platform": "cpu",
                "extra": {"threads": cores, "logical_cores": cores}}]
    gpu_name, cc, gpu_bytes = gpu
    devices += [{"id": f"cuda:{i}", "backend": "torch", "type": "cuda", "index": i, "name": gpu_name,
                 "memory_bytes": gpu_bytes, "platform": "cuda",
                 "extra": {"compute_capability": cc, "multiprocessors": 80, "l2_cache_size": 6 << 20,
                           "pci_address": f"0000:{0x17 + i:02x}:00.0"}} for i in range(gpus)]
    plat, jax_name, jax_bytes = ("gpu", gpu_name, gpu_bytes) if gpus else ("cpu", name, memory_bytes)
    devices += [{"id": f"jax:{plat}:{i}", "backend": "jax", "type": plat, "index": i, "name": jax_name,
                 "memory_bytes": jax_bytes, "platform": "cuda" if gpus else "cpu",
                 "extra": {"global_id": i, "process_index": 0, "device_kind": jax_name}} for i in range(jax_devices)]
    return host, devices


MACHINES = {
    # A 16-core x86-64 with AVX-512 BF16 but no FP16 arithmetic or AMX (a Zen 4) and
    # four JAX host devices: no case is skipped, so every case but the "auto" ones has
    # its work model in the table.
    "workstation": machine("Stand-in x86-64 16-core", 16,
                           set(X86_ISA) - {"avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"},
                           32 << 20, 64 * GIB, 4),
    # A 1-core AVX2 VM with 2 GiB and two JAX host devices: the planner's skip reasons
    # (Gloo ranks above the core limit, a mesh larger than the JAX devices); its bf16
    # and fp16 cases plan, emulated.
    "small_vm": machine("Stand-in x86-64 1-core VM", 1, {"avx", "avx2", "fma", "f16c"}, 4 << 20, 2 * GIB, 2),
    # Two compute-capability-7.0 GPUs (V100s, no bf16) on an AVX-512 host, JAX on the
    # GPUs: the GPU-only probes (host-device transfers, launch overhead) and GPU skips.
    "gpu_node": machine("Stand-in x86-64 8-core", 8, {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                                                      "avx512vl", "avx512_vnni"}, 16 << 20, 128 * GIB, 2,
                        gpus=2, gpu=("Tesla V100-SXM2-32GB", "7.0", 32 * GIB)),
}


def _planner():
    """``plan`` from harness.plan where the redesign put it, else harness.runner."""
    from harness import registry

    try:
        from harness.plan import plan
    except ImportError:
        from harness.runner import plan
    # An old checkout on PYTHONPATH beside an editable install of a newer one can import
    # harness.plan from the install: the table would then mix two versions.
    here = Path(sys.modules[plan.__module__].__file__).parent
    if here != Path(registry.__file__).parent:
        raise RuntimeError(f"{plan.__module__} from {here}, harness.registry from {Path(registry.__file__).parent}")
    return plan


def case_table(host: dict, devices: list[dict]) -> list[dict]:
    """The quick suite's planned cases on one stand-in machine, in plan order."""
    from harness import registry
    from harness.config import load_suite

    registry.discover()
    suite = load_suite(SUITE)
    info = {d["id"]: d for d in devices}
    rows = []
    for case in _planner()(suite, list(suite.probes), devices, BACKENDS, host):
        row = {
            "case_id": case.case_id, "probe": case.probe, "backend": case.backend, "device": case.device,
            "params": case.params, "timing": case.timing, "skip": case.skip, "world_size": case.world_size,
            "group_devices": case.group_devices, "components": case.components, "implied_by": case.implied_by,
        }
        if case.skip is None and "auto" not in case.params.values():
            work = registry.get(case.probe)().work(case.params, info[case.group_devices[0]])
            row["work"] = dataclasses.asdict(work)
        rows.append(row)
    # Through JSON, so tuples and lists (and ints and floats of one value) compare alike.
    return json.loads(json.dumps(rows))


def _at_implicit_values_dropped(row: dict) -> dict:
    """The row with the parameters that sit at their ``implicit`` value
    (harness.registry.Param) left out, on both sides of the comparison: a parameter
    added to a probe after its cases were first run is, at that value, what ran before
    it existed, and is left out of the case id for that reason (decode.attention's
    ``tp: 1`` and ``kernel: default``, the composites' ``graph: false``). Any other
    value of such a parameter still counts."""
    specs = registry.get(row["probe"]).params
    params = {k: v for k, v in row["params"].items()
              if not (k in specs and specs[k].implicit is not None and v == specs[k].implicit)}
    return {**row, "params": params}


def tables() -> dict[str, list[dict]]:
    return {name: case_table(*spec) for name, spec in MACHINES.items()}


def _differences(want: list[dict], got: list[dict]) -> list[str]:
    w, g = {r["case_id"]: r for r in want}, {r["case_id"]: r for r in got}
    lines = [f"missing: {cid}" for cid in w if cid not in g]
    lines += [f"new: {cid}" for cid in g if cid not in w]
    for cid in w.keys() & g.keys():
        keys = sorted(k for k in w[cid].keys() | g[cid].keys() if w[cid].get(k) != g[cid].get(k))
        lines += [f"{cid}: {k} was {w[cid].get(k)!r}, now {g[cid].get(k)!r}" for k in keys]
    return lines


@pytest.mark.parametrize("name", list(MACHINES))
def test_quick_suite_plans_the_golden_cases(name, monkeypatch):
    # Planner inputs from the environment, held at their defaults.
    for var in ("COHERENCE_JAX_NUM_PROCESSES", "COHERENCE_PLUGINS", "COHERENCE_CPU_FLAGS_OFF", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    registry.discover()
    want = [_at_implicit_values_dropped(r) for r in json.loads(GOLDEN.read_text())[name]]
    got = [_at_implicit_values_dropped(r) for r in case_table(*MACHINES[name])]
    diff = _differences(want, got)
    if diff:
        pytest.fail(f"{name}: {len(diff)} differences from {GOLDEN.name}:\n" + "\n".join(sorted(diff)), pytrace=False)
    # Same cases, same order (the order rounds shuffle from and rank pools group by).
    assert [r["case_id"] for r in got] == [r["case_id"] for r in want]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {sys.argv[0]} --write  (rewrites {GOLDEN})")
    golden = tables()
    # One case a line: a change to one case is a one-line diff.
    GOLDEN.write_text("{\n" + ",\n".join(
        f"{json.dumps(name)}: [\n" + ",\n".join(json.dumps(row) for row in table) + "\n]"
        for name, table in golden.items()) + "\n}\n")
    for name, table in golden.items():
        print(f"{name}: {len(table)} cases, {sum(bool(r['skip']) for r in table)} skipped, "
              f"{sum('work' in r for r in table)} with work")
