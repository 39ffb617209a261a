"""Helpers shared by the torch probes: dtypes, memory checks, device facts.

torch is imported inside the functions: probe modules are imported by `coherence
list` and by suite validation, which must not pay for (or require) torch.
"""

from __future__ import annotations

from probes.common import DTYPE_BYTES, TOLERANCE, cpu_has, judge_error, require_fits  # noqa: F401 - the torch kernels' names



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
    from harness.environment import available_memory_bytes

    # min(MemAvailable, cgroup limit - usage): a container's limit OOM-kills before the host fills.
    return available_memory_bytes()[0]


def require_memory(device: str, needed: int, what: str, headroom: float = 0.8) -> None:
    """Skip (with the figures) rather than allocate what the device can't hold."""
    require_fits(device, needed, free_bytes(device), what, headroom)


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


def check_close(got, want, dtype: str, what: str, extra: dict) -> float:
    """The correctness check every kernel uses: norm-wise relative error against the
    float64 reference within the dtype's tolerance, recorded in ``extra['rel_error']``;
    a larger error fails the case."""
    return judge_error(relative_error(got, want), dtype, what, extra)


def upcast_matmul(a, b, out=None):
    """a · b for a dtype the CPU has no arithmetic for (probes.native): both operands are
    upcast to fp32 (in every repetition: the data lives in its own dtype), multiplied by
    the fp32 GEMM, and the product rounded back to ``a``'s dtype, into ``out`` if given.
    Same shapes and broadcasting as ``torch.matmul``."""
    import torch

    y = torch.matmul(a.float(), b.float())
    if out is not None:
        return out.copy_(y)
    return y.to(a.dtype)


def upcast_sdpa(q, k, v, **kwargs):
    """``scaled_dot_product_attention`` computed in fp32 from q, k, v in their own dtype
    (the emulated path of probes.native), the output rounded back to q's dtype."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


def matmul_for(native: bool):
    """``torch.matmul`` where the dtype is native, else :func:`upcast_matmul`."""
    import torch

    return torch.matmul if native else upcast_matmul


def sdpa_for(native: bool):
    """``F.scaled_dot_product_attention`` where the dtype is native, else :func:`upcast_sdpa`."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention if native else upcast_sdpa


def sdpa_backend(q, k, v, is_causal: bool, enable_gqa: bool) -> str:
    """The backend torch's dispatcher picks for this SDPA call (flash, efficient,
    cudnn, math), asked the way the dispatcher itself decides."""
    import torch

    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal, enable_gqa=enable_gqa)
        return SDPBackend(choice).name.lower()
    except Exception as exc:  # noqa: BLE001 - private API; say so rather than guess
        return f"unknown ({type(exc).__name__})"


def rotation_count(buffer_bytes: int, device: str, host: dict, factor: int = 4, limit: int = 64) -> int:
    """How many copies of a buffer to cycle through so that consecutive repetitions
    never find it in the last-level cache: enough copies to cover factor × LLC (L2 on
    GPUs), at least 1. A buffer already larger than that needs no rotation."""
    llc = cache_bytes(device, host) or 0
    if buffer_bytes <= 0:
        return 1
    return max(1, min(limit, -(-factor * llc // buffer_bytes)))


class CudaGraphRunner:
    """Replays ``fn`` from a captured CUDA graph: for kernels so small that the CPU
    launch cost would be timed instead of the GPU work. Capture happens on a side
    stream after a warm-up, as torch.cuda.graphs requires."""

    def __init__(self, fn, device: str):
        import torch

        stream = torch.cuda.Stream(device=torch.device(device))
        stream.wait_stream(torch.cuda.current_stream(torch.device(device)))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(torch.device(device)).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def __call__(self) -> None:
        self.graph.replay()


# Columns of a weight cast to float64 at a time in the references (bounds their memory).
REF_BLOCK = 4096


def matmul64(a64, weight, block: int = REF_BLOCK):
    """a64 (float64) · weight (any dtype), the weight cast to float64 a column block at a
    time so the reference never holds a whole float64 copy of a large weight."""
    import torch

    return torch.cat([a64 @ weight[:, j : j + block].double() for j in range(0, weight.shape[1], block)], dim=-1)
