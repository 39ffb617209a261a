"""Helpers shared by the JAX probes: devices, dtypes, memory checks, compilation,
float64 checks.

jax is imported inside the functions: probe modules are imported by `coherence list`
and by suite validation, which must not pay for (or require) JAX. Nothing here imports
torch.

JAX devices are named ``jax:<platform>:<index>`` (``jax:cpu:0``, ``jax:gpu:1``,
``jax:tpu:3``), see :func:`harness.environment.jax_devices`; a JAX kernel's ``run()``
returns its output so the JAX clock can ``block_until_ready`` on it, and the kernels
compile ahead of time in ``prepare`` (the compiling call is never a timed one).
"""

from __future__ import annotations

import math
import time

from dataclasses import replace

import numpy as np

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, Work
# Plain tables and a plain check; importing them does not import torch.
from probes.common import DTYPE_BYTES, TOLERANCE, judge_error, require_fits
from probes.native import native_path

__all__ = ["DTYPE_BYTES", "TOLERANCE"]

# Where JAX gives no last-level cache size (GPUs, TPUs), rotate buffers past this many
# bytes per "cache" (H100 L2 = 50 MiB; TPU VMEM 16-128 MiB).
ACCEL_CACHE_GUESS = 64 * 2**20


def is_jax_device(device: str) -> bool:
    return device.startswith("jax:")


def platform_of(device: str) -> str:
    """``jax:gpu:1`` -> ``gpu``."""
    return device.split(":")[1]


def jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"fp64": jnp.float64, "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[name]


def require_fp64(dtype: str) -> None:
    """fp64 needs ``jax_enable_x64``; switch it on for this (worker) process."""
    if dtype == "fp64":
        import jax

        if not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)


def device(device_id: str):
    """The jax.Device behind ``jax:<platform>:<index>``."""
    from harness.environment import jax_device_object

    dev = jax_device_object(device_id)
    if dev is None:
        raise ProbeSkip(f"no JAX device {device_id} in this process")
    return dev


def free_bytes(device_id: str) -> int | None:
    """Free memory where the buffers will live: ``memory_stats()`` where JAX exposes it
    (GPUs, TPUs: bytes_limit - bytes_in_use), else host memory."""
    try:
        stats = device(device_id).memory_stats() or {}
    except ProbeSkip:
        raise
    except Exception:  # noqa: BLE001 - no stats on this platform
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    from harness.environment import available_memory_bytes

    # min(MemAvailable, cgroup limit - usage): a container's limit OOM-kills before the host fills.
    return available_memory_bytes()[0]


def require_memory(device_id: str, needed: int, what: str, headroom: float = 0.8) -> None:
    require_fits(device_id, needed, free_bytes(device_id), what, headroom)


def cache_bytes(device_id: str, host: dict) -> int | None:
    """Last-level cache the buffers would sit in: the host's on CPU devices, a fixed
    guess on accelerators (JAX does not report L2/VMEM sizes)."""
    if platform_of(device_id) == "cpu":
        return host.get("last_level_cache_bytes")
    return ACCEL_CACHE_GUESS


def rotation_count(buffer_bytes: int, device_id: str, host: dict, factor: int = 4, limit: int = 64) -> int:
    """Copies of a buffer to cycle through so that consecutive repetitions never find
    it in the last-level cache (as probes.torch.common.rotation_count)."""
    llc = cache_bytes(device_id, host) or 0
    if buffer_bytes <= 0:
        return 1
    return max(1, min(limit, -(-factor * llc // buffer_bytes)))


def randn(key: int, shape, dtype: str, dev, scale: float = 1.0):
    """N(0, scale²) in the case's dtype, drawn on ``dev`` (random, never zeros)."""
    import jax

    with jax.default_device(dev):
        x = jax.random.normal(jax.random.key(key), shape, dtype=np.float32)
        if scale != 1.0:
            x = x * scale
        return x.astype(jnp_dtype(dtype)).block_until_ready()


def to64(x) -> np.ndarray:
    return np.asarray(np.asarray(x).astype(np.float64))


def relative_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    ref = float(np.linalg.norm(want))
    diff = float(np.linalg.norm(got - want))
    return diff / ref if ref else diff


def check_close(got, want, dtype: str, what: str, extra: dict) -> float:
    """Norm-wise relative error against a float64 reference within the dtype's tolerance
    (the same table as the torch probes); recorded in ``extra['rel_error']``."""
    return judge_error(relative_error(got, want), dtype, what, extra)


def compile_fn(fn, *args, donate: tuple = (), static: tuple = ()):
    """``jax.jit(fn)`` lowered and compiled for ``args`` now, so the compilation never
    lands in a timed repetition; returns (compiled, seconds it took)."""
    import jax

    t0 = time.perf_counter()
    # Full fp32 products everywhere, attention einsums included: XLA on GPUs otherwise
    # runs fp32 dots as TF32 (seen on an H100: fp32 attention 3.7e-4 off float64).
    # bf16/fp16 operands are unaffected.
    with jax.default_matmul_precision("highest"):
        compiled = jax.jit(fn, donate_argnums=donate, static_argnums=static).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def matmul_precision(dtype: str):
    """fp32 products at full fp32 precision (JAX's default on TPUs and some GPUs would
    use bf16/tf32 passes, which torch's fp32 default does not)."""
    import jax

    return jax.lax.Precision.HIGHEST if dtype in ("fp32", "fp64") else jax.lax.Precision.DEFAULT


def sample(n: int, count: int, seed: int, include=()) -> np.ndarray:
    """``count`` distinct indices below n (all of them if n <= count), with ``include``."""
    if n <= count:
        return np.arange(n)
    picked = np.random.default_rng(seed).permutation(n)[:count].tolist()
    keep = [i for i in include if 0 <= i < n]
    rest = [i for i in picked if i not in keep][: count - len(keep)]
    return np.array(sorted(keep + rest))


def silu64(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax64(s: np.ndarray, axis: int = -1) -> np.ndarray:
    s = s - s.max(axis=axis, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=axis, keepdims=True)


def rms_norm64(x: np.ndarray, w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


class JaxKernel(Kernel):
    """A prepared JAX case. ``run()`` dispatches the compiled computation and returns
    its output (stored in ``self.out``); the JAX clock blocks on it. ``sync()`` waits
    for whatever is still in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.out = None

    def sync(self) -> None:
        import jax

        if self.out is not None:
            jax.block_until_ready(self.out)

    def close(self) -> None:
        for name in list(vars(self)):
            if name not in ("extra", "work", "params"):
                setattr(self, name, None)


def donated(arr) -> bool:
    """Whether a donated input buffer was taken over by the computation (XLA:CPU
    ignores donation: the output is then a fresh buffer each repetition)."""
    try:
        return bool(arr.is_deleted())
    except Exception:  # noqa: BLE001
        return False


def padded_divisor(n: int, target: int) -> int:
    """The largest divisor of n not above target (at least 1)."""
    target = max(1, min(n, target))
    for c in range(target, 0, -1):
        if n % c == 0:
            return c
    return 1


def norm_scale(in_f: int) -> float:
    return 1.0 / math.sqrt(in_f)


# -- shared by the kernel modules -----------------------------------------------------------
def jax_modules():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def model_shape(params: dict):
    """The model shape one case computes: the whole layer, or one tensor-parallel
    rank's shard where the probe has a ``tp`` parameter (the torch kernels' rule)."""
    from probes.models import load_model

    shape = load_model(params["model"])
    tp = int(params.get("tp", 1) or 1)
    return shape.shard(tp) if tp != 1 else shape


def compiled(kernel: Kernel, fn, *args, donate=()):
    compiled, secs = compile_fn(fn, *args, donate=donate)
    kernel.extra["compile_s"] = round(kernel.extra.get("compile_s", 0.0) + secs, 4)
    return compiled



def record_native(ctx: CaseContext, work: Work, kernel: Kernel) -> Work:
    """Mark a case's dtype path (probes.native) in ``extra``; returns ``work``, for a dtype
    the CPU has no arithmetic for with ``peak_dtype`` fp32 (judged by the fp32 peak). No upcast is written here: XLA:CPU
    already computes bf16/fp16 dots in fp32 (measured on jax 0.10 at about the fp32 rate),
    so the emulated path is the compiler's own."""
    path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
    if path.checked and not path.native:
        path = replace(path, via=path.via.replace("upcast", "upcast (XLA:CPU's own)"))
    return path.record(work, kernel.extra)


