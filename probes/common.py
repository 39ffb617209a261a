"""Backend-neutral facts every probe layer shares: dtype sizes, check tolerances, the
memory-fit rule and CPU feature tests.

Imports no framework: spec modules (probes/<family>.py) and every backend's kernels
(probes/torch/, probes/jax/, a plugin's) use these.
"""

from __future__ import annotations

from harness.errors import ProbeCheckFailed, ProbeSkip

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}

# Relative (norm-wise) error allowed against a float64 reference computed from the
# same rounded inputs: accumulation error plus rounding of the output.
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


def require_fits(device: str, needed: int, free: int | None, what: str, headroom: float = 0.8) -> None:
    """The check behind every backend's require_memory: ``needed`` bytes against
    ``headroom`` × the ``free`` bytes that backend reports (None: unknown, no check)."""
    if free is not None and needed > headroom * free:
        raise ProbeSkip(
            f"{what} needs {needed / 2**20:.0f} MiB but {device} has {free / 2**20:.0f} MiB free "
            f"(limit {headroom:.0%} of free)"
        )


def cpu_has(host: dict, *flags: str) -> bool:
    isa = host.get("cpu_isa") or {}
    return any(bool(isa.get(f)) for f in flags)


def judge_error(err: float, dtype: str, what: str, extra: dict) -> float:
    """The correctness verdict every backend's kernels share: ``err`` (the norm-wise
    relative error against the float64 reference computed from the same rounded
    inputs) is recorded in ``extra['rel_error']`` and must be within the dtype's
    :data:`TOLERANCE`, else :class:`~harness.errors.ProbeCheckFailed`."""
    tol = TOLERANCE[dtype]
    extra["rel_error"] = err
    if not err <= tol:
        raise ProbeCheckFailed(f"{what}: relative error {err:.3g} against float64 reference exceeds {tol:g}")
    return err
