"""Helpers shared by the torch probes: dtypes, memory checks, device facts.

torch is imported inside the functions: probe modules are imported by `coherence
list` and by suite validation, which must not pay for (or require) torch.
"""

from __future__ import annotations

from harness.errors import ProbeSkip

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}

# Relative (norm-wise) error allowed against a float64 reference computed from the
# same rounded inputs: accumulation error plus rounding of the output.
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


def torch_dtype(name: str):
    import torch

    return {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
    elif device.startswith("mps"):
        torch.mps.synchronize()


def free_bytes(device: str) -> int | None:
    """Free memory where the buffers will live."""
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def require_memory(device: str, needed: int, what: str, headroom: float = 0.8) -> None:
    """Skip (with the figures) rather than allocate what the device can't hold."""
    free = free_bytes(device)
    if free is not None and needed > headroom * free:
        raise ProbeSkip(
            f"{what} needs {needed / 2**20:.0f} MiB but {device} has {free / 2**20:.0f} MiB free "
            f"(limit {headroom:.0%} of free)"
        )


def cache_bytes(device: str, host: dict) -> int | None:
    """Last-level cache of the device the buffers live on (L2 on CUDA GPUs)."""
    if device.startswith("cuda"):
        import torch

        return int(getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0)) or None
    return host.get("last_level_cache_bytes")


def relative_error(result, reference) -> float:
    """Norm-wise relative error ||result - reference|| / ||reference|| in float64."""
    diff = (result.double() - reference.double()).norm().item()
    ref = reference.double().norm().item()
    return diff / ref if ref else diff


def cpu_has(host: dict, *flags: str) -> bool:
    isa = host.get("cpu_isa") or {}
    return any(bool(isa.get(f)) for f in flags)
