"""Run one probe case in-process, the way the worker does."""

from __future__ import annotations

from functools import lru_cache

from harness import environment, registry
from harness.plan import host_facts
from harness.execute import run_case


@lru_cache(maxsize=1)
def host() -> dict:
    return host_facts(environment.collect())


def cpu_device() -> dict:
    return device_info("cpu:0")


def device_info(device: str) -> dict:
    return next(d for d in environment.torch_devices() if d["id"] == device)


def run(probe: str, params: dict, timing: dict | None = None, device: str = "cpu:0", isa: dict | None = None) -> dict:
    """One case through the worker. ``isa``: the cpuinfo flags of a stand-in CPU to give
    the probe instead of this host's (what its native-path decisions read)."""
    registry.discover()
    spec = {
        "case_id": registry.case_id(probe, params, device),
        "probe": probe,
        "params": params,
        "device": device,
        "device_info": device_info(device),
        "backend": "torch",
        "host": host() if isa is None else {**host(), "cpu_isa": dict(isa)},
        "seed": 0,
        "timing": {"warmup": 1, "warmup_s": 0.0, "min_reps": 3, "max_reps": 5, "budget_s": 0.2, **(timing or {})},
    }
    return run_case(spec)
