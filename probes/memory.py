"""STREAM-style memory bandwidth probes: copy, scale, add, triad on device memory.

Bytes are counted the STREAM way: every array element read or written once per
repetition, no write-allocate traffic (copy and scale move 2 arrays, add and triad 3).
Each array is at least 4 × the last-level cache of the device (L3 on CPUs, L2 on
GPUs), so the kernels stream from memory, not from cache. The initial values are
random and every case checks its output against a float64 reference at sampled
indices.
"""

from __future__ import annotations

from typing import ClassVar

from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES

MIB = 2**20
# The auto size's floor: 64 MiB on a CPU, 256 MiB on an accelerator (whose L2 may be
# unknown to its framework).
CPU_FLOOR_BYTES = 64 * MIB
ACCEL_FLOOR_BYTES = 256 * MIB
SCALAR = 3.0
CHECK_POINTS = 65536
CHECK_TOLERANCE = {"fp64": 1e-12, "fp32": 1e-6, "bf16": 1e-2}


def array_bytes(size_mib, on_cpu: bool, llc_bytes: int | None) -> int:
    """Bytes per array: the requested MiB, or auto = max(4 × the last-level cache of the
    device the arrays live on (``llc_bytes``, None when unknown), the floor for a CPU or
    an accelerator)."""
    if size_mib != "auto":
        return int(size_mib) * MIB
    return max(4 * (llc_bytes or 0), CPU_FLOOR_BYTES if on_cpu else ACCEL_FLOOR_BYTES)


def reference(op: str, a, b, c):
    """(got, want) of one STREAM op from float64 copies of the three arrays after it
    ran (any array type with ``+`` and ``*``): each op reads arrays it does not write,
    so after any number of repetitions its output is a function of its inputs."""
    # Only the named op is computed: an array it does not touch may be None.
    return {
        "copy": lambda: (c, a),
        "scale": lambda: (b, SCALAR * c),
        "add": lambda: (c, a + b),
        "triad": lambda: (a, b + SCALAR * c),
    }[op]()


class _StreamProbe(Probe):
    family = "memory"
    device_types = ("cpu", "cuda")
    params = {
        "size_mib": Param(
            default=("auto",),
            type=int,
            allow_auto=True,
            minimum=1,
            help="MiB per array; auto = max(4 × last-level cache, 64 MiB CPU / 256 MiB GPU)",
        ),
        "dtype": Param(default=("fp64",), type=str, choices=("fp64", "fp32", "bf16")),
    }
    op: ClassVar[str]
    arrays: ClassVar[int]  # arrays touched per element (STREAM counting)
    flops_per_element: ClassVar[int]

    def work(self, params: dict, device_info: dict) -> Work:
        elements = params["size_mib"] * MIB // DTYPE_BYTES[params["dtype"]]
        return Work(
            flops=float(self.flops_per_element * elements),
            bytes=float(self.arrays * elements * DTYPE_BYTES[params["dtype"]]),
            bound="memory",
            dtype=params["dtype"],
        )


@register
class Copy(_StreamProbe):
    name = "memory.copy"
    description = "c = a (STREAM copy, 2 arrays per element)"
    op, arrays, flops_per_element = "copy", 2, 0


@register
class Scale(_StreamProbe):
    name = "memory.scale"
    description = "b = q·c (STREAM scale, 2 arrays per element)"
    op, arrays, flops_per_element = "scale", 2, 1


@register
class Add(_StreamProbe):
    name = "memory.add"
    description = "c = a + b (STREAM add, 3 arrays per element)"
    op, arrays, flops_per_element = "add", 3, 1


@register
class Triad(_StreamProbe):
    name = "memory.triad"
    description = "a = b + q·c (STREAM triad, 3 arrays per element)"
    op, arrays, flops_per_element = "triad", 3, 2
