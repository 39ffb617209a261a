"""Run one probe case in-process, the way the worker does."""

from __future__ import annotations

from functools import lru_cache

from harness import environment, registry
from harness.execute import run_case
from harness.plan import host_facts


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


def altered_probe(base: type, name: str, alter) -> type:
    """A test probe ``name`` with ``base``'s spec, measured by ``base``'s own torch kernel
    after ``alter(kernel, ctx)`` has changed it (a rank that corrupts what it sends or
    receives), so a test sees the real check catch the fault. Registered as a probe and
    as its torch kernel; importing the test module again registers the same thing."""
    probe = registry.register(type(base)(f"Altered{base.__name__}", (base,), {
        "name": name, "__module__": __name__, "__qualname__": f"altered[{name}]"}))

    def build(spec, ctx):
        kernel = registry.kernel_entry(base, "torch").build(spec, ctx)
        alter(kernel, ctx)
        return kernel

    build.__qualname__ = f"altered[{name}].build"
    registry.kernel(name, "torch")(build)
    return probe
