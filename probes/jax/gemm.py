"""JAX matrix products: square and shaped GEMMs, and the rotating-copies matmul the
projection probes reuse.
"""

from __future__ import annotations

import math


from harness.registry import CaseContext, Kernel, kernel
from probes.gemm import CHECK_COLS, CHECK_ROWS, gemm_work
from probes.jax import common as J
from probes.jax.common import JaxKernel


# -- GEMM / projections (rotating copies) --------------------------------------------------
class MatmulKernel(JaxKernel):
    """y = x · W[i] for ``copies`` independent weights (rotated untimed); copies = 1 is
    a plain GEMM."""

    def __init__(self, m: int, n: int, k: int, dtype: str, device_id: str, copies: int = 1, seed: int = 4321):
        super().__init__()
        jax, jnp = J.jax_modules()
        dev = J.device(device_id)
        self.dtype, self.copies, self.index = dtype, copies, 0
        self.x = J.randn(seed, (m, k), dtype, dev, scale=1.0 / math.sqrt(k))
        self.w = [J.randn(seed + 1 + c, (k, n), dtype, dev) for c in range(copies)]
        prec = J.matmul_precision(dtype)
        self.fn = J.compiled(self, lambda x, w: jnp.matmul(x, w, precision=prec), self.x, self.w[0])
        self.outs = [None] * copies
        self.extra.update(precision=str(prec), rotation_copies=copies)

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def run(self):
        self.out = self.outs[self.index] = self.fn(self.x, self.w[self.index])
        return self.out

    def check(self) -> None:
        self.sync()
        i = self.index
        y = self.outs[i]
        m, n = y.shape
        rows = J.sample(m, CHECK_ROWS, 99)
        cols = J.sample(n, CHECK_COLS, 98)
        x64 = J.to64(self.x[rows])
        w64 = J.to64(self.w[i][:, cols])
        J.check_close(J.to64(y[rows][:, cols]), x64 @ w64, self.dtype, f"matmul copy {i}", self.extra)



@kernel(("gemm.square", "gemm.shaped"), "jax")
def build_gemm(probe, ctx: CaseContext) -> Kernel:
    m, n, k = probe.dims(ctx.params)
    work = gemm_work(m, n, k, ctx.params["dtype"])
    J.require_memory(ctx.device, int(work.bytes + 4 * (m * k + k * n)), f"{probe.name} {m}x{n}x{k}")
    matmul = MatmulKernel(m, n, k, ctx.params["dtype"], ctx.device)
    matmul.work, matmul.params = J.record_native(ctx, work, matmul), dict(ctx.params)
    return matmul
