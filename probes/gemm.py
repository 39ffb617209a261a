"""Matrix-product probes: square and LLM-shaped GEMMs over sizes and dtypes.

Work model: 2·M·N·K FLOPs per product (a multiply-add is two operations); bytes =
reading A and B once and writing C once (the minimum traffic, so the arithmetic
intensity is an upper bound). The product is checked once per case against a float64
reference computed from the same rounded inputs on a sample of rows and columns.
"""

from __future__ import annotations

from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES, cpu_has

# The float64 check samples this many rows and columns of the product.
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


class _GemmProbe(Probe):
    family = "gemm"
    device_types = ("cpu", "cuda")

    def dims(self, params: dict) -> tuple[int, int, int]:  # pragma: no cover - interface
        raise NotImplementedError

    def work(self, params: dict, device_info: dict) -> Work:
        return gemm_work(*self.dims(params), params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)


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
