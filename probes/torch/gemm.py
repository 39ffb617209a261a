"""torch matrix-product kernels for gemm.square and gemm.shaped (probes.gemm says what
is measured: 2·M·N·K FLOPs, A and B read once, C written once)."""

from __future__ import annotations

from harness.registry import CaseContext, Kernel, kernel
from probes.gemm import CHECK_COLS, CHECK_ROWS, gemm_work
from probes.native import native_path
from probes.torch.common import check_close, matmul_for, require_memory, torch_dtype


class GemmKernel(Kernel):
    def __init__(self, m: int, n: int, k: int, dtype: str, device: str, native: bool = True):
        super().__init__()
        import torch

        # A dtype the CPU has no arithmetic for is multiplied through fp32 (probes.native).
        self.matmul = matmul_for(native)

        dt = torch_dtype(dtype)
        gen = torch.Generator(device=device).manual_seed(4321)
        # Scaled so that the products stay O(1) in every dtype.
        self.a = (torch.randn(m, k, device=device, generator=gen) / k**0.5).to(dt)
        self.b = torch.randn(k, n, device=device, generator=gen).to(dt)
        self.c = torch.empty(m, n, device=device, dtype=dt)
        self.dtype, self.device = dtype, device
        if device.startswith("cuda"):
            self.extra["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        self.extra["float32_matmul_precision"] = torch.get_float32_matmul_precision()

    def run(self) -> None:
        self.matmul(self.a, self.b, out=self.c)

    def check(self) -> None:
        import torch

        m, n = self.c.shape
        gen = torch.Generator().manual_seed(99)
        rows = torch.randperm(m, generator=gen)[: min(CHECK_ROWS, m)].to(self.device)
        cols = torch.randperm(n, generator=gen)[: min(CHECK_COLS, n)].to(self.device)
        want = self.a[rows].double() @ self.b[:, cols].double()
        check_close(self.c[rows][:, cols], want, self.dtype, "gemm", self.extra)

    def close(self) -> None:
        del self.a, self.b, self.c


@kernel(("gemm.square", "gemm.shaped"), "torch")
def build_gemm(probe, ctx: CaseContext) -> Kernel:
    m, n, k = probe.dims(ctx.params)
    work = gemm_work(m, n, k, ctx.params["dtype"])
    path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
    # fp32 staging copies of A and B exist briefly while the inputs are made; an
    # emulated dtype also holds fp32 copies of A, B and C while it multiplies.
    staging = 4 * (m * k + k * n) + (0 if path.native else 4 * (m * k + k * n + m * n))
    require_memory(ctx.device, int(work.bytes + staging), f"{probe.name} {m}x{n}x{k}")
    gemm = GemmKernel(m, n, k, ctx.params["dtype"], ctx.device, native=path.native)
    gemm.work = path.record(work, gemm.extra)
    gemm.params = dict(ctx.params)
    return gemm
