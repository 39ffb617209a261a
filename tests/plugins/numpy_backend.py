"""A third backend, from a plugin: pure NumPy kernels for memory.triad and gemm.square.

Loaded with ``COHERENCE_PLUGINS=tests.plugins.numpy_backend`` (or a suite's
``plugins``), it adds the ``numpy`` backend (``coherence run --backend numpy``, device
``numpy:cpu:0``) without editing any file under ``harness/`` or ``probes/``: the
probes' specs (parameters, work model, skip rules, the STREAM reference) are the
shipped ones; only the kernels are new. It is the shape of any new backend: one
:class:`harness.backends.Backend` and one builder per probe registered with
:func:`harness.registry.kernel`.
"""

from __future__ import annotations

import os

import numpy as np

from harness import backends, environment
from harness.errors import ProbeCheckFailed
from harness.registry import CaseContext, Kernel, kernel
from probes.common import DTYPE_BYTES, judge_error, require_fits
from probes.gemm import CHECK_COLS, CHECK_ROWS, gemm_work
from probes.memory import CHECK_POINTS, CHECK_TOLERANCE, MIB, SCALAR, array_bytes, reference

NAME = "numpy"
DTYPES = {"fp64": np.float64, "fp32": np.float32}


def _devices(env: dict | None) -> list[dict]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [{"id": f"{NAME}:cpu:0", "backend": NAME, "type": "cpu", "index": 0, "name": environment.cpu_model_name(),
             "memory_bytes": memory, "platform": "cpu", "extra": {"numpy": np.__version__}}]


backends.register(backends.Backend(NAME, _devices, groups="none"))


def _dtype(name: str):
    from harness.errors import ProbeSkip

    if name not in DTYPES:
        raise ProbeSkip(f"NumPy has no {name} arithmetic")
    return DTYPES[name]


class NumpyKernel(Kernel):
    """NumPy calls return when the work is done: the host clock times them as they are."""

    timer = "host"

    def __init__(self, dtype: str, seed: int):
        super().__init__()
        self.dtype, self.np_dtype = dtype, _dtype(dtype)
        self.rng = np.random.default_rng(seed)


class TriadKernel(NumpyKernel):
    """a = b + q·c over NumPy arrays (``np.multiply`` then ``np.add`` into ``a``)."""

    def __init__(self, elements: int, dtype: str):
        super().__init__(dtype, 1234)
        self.a, self.b, self.c = (self.rng.random(elements).astype(self.np_dtype) + 1 for _ in range(3))
        self.extra = {"elements": elements, "array_bytes": elements * DTYPE_BYTES[dtype], "scalar": SCALAR}

    def run(self) -> None:
        np.multiply(self.c, SCALAR, out=self.a)
        np.add(self.a, self.b, out=self.a)

    def check(self) -> None:
        idx = np.random.default_rng(5).integers(0, self.a.size, min(CHECK_POINTS, self.a.size))
        got, want = reference("triad", *(x[idx].astype(np.float64) for x in (self.a, self.b, self.c)))
        err = float(np.max(np.abs(got - want) / np.abs(want)))
        if not err <= CHECK_TOLERANCE[self.dtype]:
            raise ProbeCheckFailed(f"triad: max relative error {err:.3g} > {CHECK_TOLERANCE[self.dtype]:g}")
        self.extra["max_rel_error"] = err


@kernel("memory.triad", NAME)
def build_triad(probe, ctx: CaseContext) -> Kernel:
    nbytes = array_bytes(ctx.params["size_mib"], True, ctx.host.get("last_level_cache_bytes"))
    require_fits(ctx.device, 3 * nbytes, environment.available_memory_bytes()[0], f"{probe.name} (3 arrays)")
    resolved = {**ctx.params, "size_mib": nbytes // MIB}
    triad = TriadKernel(nbytes // DTYPE_BYTES[ctx.params["dtype"]], ctx.params["dtype"])
    triad.work, triad.params = probe.work(resolved, ctx.device_info), resolved
    return triad


class MatmulKernel(NumpyKernel):
    """C = A · B with ``np.matmul`` into a preallocated C."""

    def __init__(self, n: int, dtype: str):
        super().__init__(dtype, 4321)
        self.a = (self.rng.standard_normal((n, n)) / n**0.5).astype(self.np_dtype)
        self.b = self.rng.standard_normal((n, n)).astype(self.np_dtype)
        self.c = np.empty((n, n), dtype=self.np_dtype)

    def run(self) -> None:
        np.matmul(self.a, self.b, out=self.c)

    def check(self) -> None:
        rows = np.random.default_rng(99).permutation(self.c.shape[0])[:CHECK_ROWS]
        cols = np.random.default_rng(98).permutation(self.c.shape[1])[:CHECK_COLS]
        want = self.a[rows].astype(np.float64) @ self.b[:, cols].astype(np.float64)
        got = self.c[np.ix_(rows, cols)].astype(np.float64)
        judge_error(float(np.linalg.norm(got - want) / np.linalg.norm(want)), self.dtype, "gemm", self.extra)


@kernel("gemm.square", NAME)
def build_square(probe, ctx: CaseContext) -> Kernel:
    n = ctx.params["n"]
    work = gemm_work(n, n, n, ctx.params["dtype"])
    require_fits(ctx.device, int(work.bytes), environment.available_memory_bytes()[0], f"{probe.name} {n}x{n}x{n}")
    matmul = MatmulKernel(n, ctx.params["dtype"])
    matmul.work, matmul.params = work, dict(ctx.params)
    return matmul
