"""Run one JAX probe case in-process, the way the worker does, on 4 forced host devices.

Importing this module sets XLA_FLAGS (4 CPU host devices) unless something already
chose a count: test modules import it at collection, before any test starts JAX.
"""

from __future__ import annotations

import os

from harness import environment, registry
from harness.execute import case_context, prepare_case, run_case
from tests.probes.helpers import host

if environment._configured_host_devices(os.environ) is None:
    environment.prepare_jax_host_devices(4)

TIMING = {"warmup": 1, "warmup_s": 0.0, "min_reps": 3, "max_reps": 5, "budget_s": 0.2}


def jax_device(device: str = "jax:cpu:0") -> dict:
    return next(d for d in environment.jax_devices() if d["id"] == device)


def spec(probe: str, params: dict, world_size: int = 1, device: str = "jax:cpu:0") -> dict:
    registry.discover()
    group = [f"jax:cpu:{i}" for i in range(world_size)] if world_size > 1 else [device]
    gid = f"jax:cpu:0-{world_size - 1}" if world_size > 1 else device
    return {
        "case_id": registry.case_id(probe, params, gid),
        "probe": probe,
        "params": params,
        "device": group[0],
        "device_info": jax_device(group[0]),
        "backend": "jax",
        "host": host(),
        "seed": 0,
        "world_size": world_size,
        "group_devices": group,
        "timing": dict(TIMING),
    }


def run(probe: str, params: dict, world_size: int = 1) -> dict:
    return run_case(spec(probe, params, world_size))


def prepare(probe: str, params: dict, world_size: int = 1):
    """The prepared kernel (first run and check not yet done) and its context."""
    return prepare_case(case_context(spec(probe, params, world_size)))
