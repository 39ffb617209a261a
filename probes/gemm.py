"""Matrix-product probes: square and LLM-shaped GEMMs over sizes and dtypes.

Work model: 2·M·N·K FLOPs per product (a multiply-add is two operations); bytes =
reading A and B once and writing C once (the minimum traffic, so the arithmetic
intensity is an upper bound). The product is checked once per case against a float64
reference computed from the same rounded inputs on a sample of rows and columns.
"""

from __future__ import annotations

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, Param, Probe, Work, register
from probes.torch.common import DTYPE_BYTES, check_close, cpu_has, matmul_for, require_memory, torch_dtype
from probes.native import native_path

CHECK_ROWS = 32
CHECK_COLS = 256
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def gemm_work(m: int, n: int, k: int, dtype: str) -> Work:
    size = DTYPE_BYTES[dtype]
    return Work(flops=2.0 * m * n * k, bytes=float(size * (m * k + k * n + m * n)), dtype=dtype)


def gemm_skip_reason(dtype: str, device_info: dict, host: dict, *, emulated_ok: bool = False) -> str | None:
    """Why a matmul-heavy case of ``dtype`` cannot run on this device, or None.

    With ``emulated_ok`` (probes that compute a non-native dtype through an fp32 upcast,
    see probes.native) a CPU never skips. Without it a CPU dtype with no native path is
    skipped rather than timed through the framework's scalar fallback (fp16 and bf16 run
    about 100x slower than fp32 there). bf16 on CUDA GPUs below compute capability 8.0
    (no bf16 tensor cores) is skipped either way."""
    if device_info.get("type") == "cpu" and not emulated_ok:
        if dtype == "fp16" and not cpu_has(host, "avx512_fp16", "amx_fp16"):
            return "fp16 matmul has no native path on this CPU (no avx512_fp16/amx_fp16): ~100x slower than fp32"
        if dtype == "bf16" and not cpu_has(host, "avx512_bf16", "amx_bf16", "sve_bf16", "bf16"):
            return "bf16 matmul has no native path on this CPU (no avx512_bf16/amx_bf16): emulated"
    if device_info.get("type") == "cuda" and dtype == "bf16":
        cc = (device_info.get("extra") or {}).get("compute_capability")
        if cc and float(cc) < 8.0 and device_info.get("platform") != "rocm":
            return f"bf16 tensor cores need compute capability 8.0+, this GPU is {cc}"
    return None


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
        import torch

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


class _GemmProbe(Probe):
    family = "gemm"
    backends = ("torch", "jax")
    device_types = ("cpu", "cuda")

    def dims(self, params: dict) -> tuple[int, int, int]:  # pragma: no cover - interface
        raise NotImplementedError

    def work(self, params: dict, device_info: dict) -> Work:
        return gemm_work(*self.dims(params), params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)

    def prepare(self, ctx: CaseContext) -> Kernel:
        if ctx.backend == "jax":
            from probes.jax.gemm import build_gemm

            return build_gemm(self, ctx)
        reason = self.skip_reason(ctx.params, ctx.device_info, ctx.host)
        if reason:
            raise ProbeSkip(reason)
        m, n, k = self.dims(ctx.params)
        work = gemm_work(m, n, k, ctx.params["dtype"])
        path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
        # fp32 staging copies of A and B exist briefly while the inputs are made; an
        # emulated dtype also holds fp32 copies of A, B and C while it multiplies.
        staging = 4 * (m * k + k * n) + (0 if path.native else 4 * (m * k + k * n + m * n))
        require_memory(ctx.device, int(work.bytes + staging), f"{self.name} {m}x{n}x{k}")
        kernel = GemmKernel(m, n, k, ctx.params["dtype"], ctx.device, native=path.native)
        work = path.record(work, kernel.extra)
        kernel.work = work
        kernel.params = dict(ctx.params)
        return kernel


@register
class GemmSquare(_GemmProbe):
    name = "gemm.square"
    description = "C[n,n] = A[n,n] · B[n,n]"
    params = {
        "n": Param(default=(1024, 2048, 4096), type=int, minimum=1, help="matrix side"),
        "dtype": Param(default=("fp32", "bf16"), type=str, choices=DTYPE_CHOICES),
    }

    def dims(self, params: dict) -> tuple[int, int, int]:
        return params["n"], params["n"], params["n"]


@register
class GemmShaped(_GemmProbe):
    name = "gemm.shaped"
    description = "C[m,n] = A[m,k] · B[k,n] for LLM projection shapes (m = tokens, k = input features, n = output features)"
    params = {
        # Llama-3.1-8B (hidden 4096, 32 q heads / 8 kv heads of 128, MLP 14336) at 512 tokens:
        # fused QKV 4096->6144, output 4096->4096, gate+up 4096->28672, down 14336->4096.
        "mnk": Param(
            default=("512x6144x4096", "512x4096x4096", "512x28672x4096", "512x4096x14336"),
            type=str,
            pattern=r"[1-9]\d*x[1-9]\d*x[1-9]\d*",
            help="MxNxK, e.g. 512x6144x4096",
        ),
        "dtype": Param(default=("fp32", "bf16"), type=str, choices=DTYPE_CHOICES),
    }

    def dims(self, params: dict) -> tuple[int, int, int]:
        m, n, k = (int(x) for x in params["mnk"].split("x"))
        return m, n, k
