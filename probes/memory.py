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

from harness.errors import ProbeCheckFailed
from harness.registry import CaseContext, Kernel, Param, Probe, Work, register
from probes.torch.common import DTYPE_BYTES, cache_bytes, require_memory, synchronize, torch_dtype

MIB = 2**20
MIN_ARRAY_BYTES = {"cpu": 64 * MIB, "cuda": 256 * MIB}
SCALAR = 3.0
CHECK_POINTS = 65536
CHECK_TOLERANCE = {"fp64": 1e-12, "fp32": 1e-6, "bf16": 1e-2}


def array_bytes(size_mib, device: str, host: dict) -> int:
    """Bytes per array: the requested MiB, or auto = max(4 × last-level cache, a floor)."""
    if size_mib != "auto":
        return int(size_mib) * MIB
    floor = MIN_ARRAY_BYTES.get(device.split(":")[0], 64 * MIB)
    llc = cache_bytes(device, host) or 0
    return max(4 * llc, floor)


class _StreamProbe(Probe):
    family = "memory"
    backends = ("torch", "jax")
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

    def prepare(self, ctx: CaseContext) -> Kernel:
        if ctx.backend == "jax":
            from probes.jax.memory import build_stream

            return build_stream(self, ctx)
        nbytes = array_bytes(ctx.params["size_mib"], ctx.device, ctx.host)
        require_memory(ctx.device, 3 * nbytes, f"{self.name} (3 arrays of {nbytes // MIB} MiB)")
        resolved = {**ctx.params, "size_mib": nbytes // MIB}
        kernel = StreamKernel(self.op, nbytes // DTYPE_BYTES[ctx.params["dtype"]], ctx.params["dtype"], ctx.device)
        kernel.work = self.work(resolved, ctx.device_info)
        kernel.params = resolved
        return kernel


class StreamKernel(Kernel):
    def __init__(self, op: str, elements: int, dtype: str, device: str):
        super().__init__()
        import torch

        self.op, self.dtype, self.device = op, dtype, device
        dt = torch_dtype(dtype)
        gen = torch.Generator(device=device).manual_seed(1234)
        # Random, never zeros: a zero page or a constant could be optimized away.
        self.a = torch.rand(elements, dtype=dt, device=device, generator=gen) + 1.0
        self.b = torch.rand(elements, dtype=dt, device=device, generator=gen) + 1.0
        self.c = torch.rand(elements, dtype=dt, device=device, generator=gen) + 1.0
        self.extra = {"elements": elements, "array_bytes": elements * DTYPE_BYTES[dtype], "scalar": SCALAR}
        self._run = {
            "copy": lambda: self.c.copy_(self.a),
            "scale": lambda: torch.mul(self.c, SCALAR, out=self.b),
            "add": lambda: torch.add(self.a, self.b, out=self.c),
            "triad": lambda: torch.add(self.b, self.c, alpha=SCALAR, out=self.a),
        }[op]

    def run(self) -> None:
        self._run()

    def check(self) -> None:
        """Each op reads arrays it does not write, so after any number of repetitions
        its output is a function of the (unchanged) inputs: check sampled indices."""
        import torch

        synchronize(self.device)
        n = self.a.numel()
        idx = torch.randint(0, n, (min(CHECK_POINTS, n),), device=self.device)
        a, b, c = (t[idx].double() for t in (self.a, self.b, self.c))
        got, want = {
            "copy": (c, a),
            "scale": (b, SCALAR * c),
            "add": (c, a + b),
            "triad": (a, b + SCALAR * c),
        }[self.op]
        err = ((got - want).abs() / want.abs()).max().item()
        if not err <= CHECK_TOLERANCE[self.dtype]:
            raise ProbeCheckFailed(f"{self.op}: max relative error {err:.3g} > {CHECK_TOLERANCE[self.dtype]:g}")
        self.extra["max_rel_error"] = err

    def close(self) -> None:
        del self.a, self.b, self.c


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
