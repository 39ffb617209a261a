"""torch STREAM kernels: copy, scale, add, triad on device memory (probes.memory says
what is measured and how the bytes count)."""

from __future__ import annotations

from harness.errors import ProbeCheckFailed
from harness.registry import CaseContext, Kernel, kernel
from probes.memory import CHECK_POINTS, CHECK_TOLERANCE, MIB, SCALAR, array_bytes, reference
from probes.torch.common import DTYPE_BYTES, cache_bytes, require_memory, synchronize, torch_dtype


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
        got, want = reference(self.op, a, b, c)
        err = ((got - want).abs() / want.abs()).max().item()
        if not err <= CHECK_TOLERANCE[self.dtype]:
            raise ProbeCheckFailed(f"{self.op}: max relative error {err:.3g} > {CHECK_TOLERANCE[self.dtype]:g}")
        self.extra["max_rel_error"] = err

    def close(self) -> None:
        del self.a, self.b, self.c


@kernel(("memory.copy", "memory.scale", "memory.add", "memory.triad"), "torch")
def build_stream(probe, ctx: CaseContext) -> Kernel:
    nbytes = array_bytes(ctx.params["size_mib"], ctx.device.startswith("cpu"), cache_bytes(ctx.device, ctx.host))
    require_memory(ctx.device, 3 * nbytes, f"{probe.name} (3 arrays of {nbytes // MIB} MiB)")
    resolved = {**ctx.params, "size_mib": nbytes // MIB}
    stream = StreamKernel(probe.op, nbytes // DTYPE_BYTES[ctx.params["dtype"]], ctx.params["dtype"], ctx.device)
    stream.work = probe.work(resolved, ctx.device_info)
    stream.params = resolved
    return stream
