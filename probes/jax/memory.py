"""JAX STREAM kernels (``coherence run --backend jax``): copy, scale, add, triad.

See probes/jax/__init__.py for what differs from the torch kernels.
"""

from __future__ import annotations


import numpy as np

from harness.errors import ProbeCheckFailed
from harness.registry import CaseContext, Kernel, kernel
from probes.memory import CHECK_POINTS, CHECK_TOLERANCE, MIB, SCALAR, array_bytes, reference
from probes.jax import common as J
from probes.jax.common import DTYPE_BYTES, JaxKernel




# -- memory: STREAM ------------------------------------------------------------------------
class StreamKernel(JaxKernel):
    """copy c = a, scale b = q·c, add c = a + b, triad a = b + q·c; the written array is
    donated to its own update."""

    def __init__(self, op: str, elements: int, dtype: str, device_id: str):
        super().__init__()
        jax, jnp = J.jax_modules()
        J.require_fp64(dtype)
        dev = J.device(device_id)
        self.op, self.dtype = op, dtype
        dt = J.jnp_dtype(dtype)
        with jax.default_device(dev):
            keys = jax.random.split(jax.random.key(1234), 3)
            # Random, never zeros.
            self.arr = {n: (jax.random.uniform(k, (elements,), dtype=jnp.float32) + 1.0).astype(dt).block_until_ready()
                        for n, k in zip("abc", keys)}
        # (output name, input names, function of the inputs): the output array is passed
        # first and donated.
        self.spec = {
            "copy": ("c", ("a",), lambda a: jnp.copy(a)),
            "scale": ("b", ("c",), lambda c: (SCALAR * c).astype(dt)),
            "add": ("c", ("a", "b"), lambda a, b: a + b),
            "triad": ("a", ("b", "c"), lambda b, c: (b + SCALAR * c).astype(dt)),
        }[op]
        out_name, in_names, f = self.spec
        self.fn = J.compiled(self, lambda o, *ins: f(*ins), self.arr[out_name], *(self.arr[n] for n in in_names), donate=(0,))
        self.extra.update(elements=elements, array_bytes=elements * DTYPE_BYTES[dtype], scalar=SCALAR)

    def run(self):
        out_name, in_names, _ = self.spec
        old = self.arr[out_name]
        self.out = self.arr[out_name] = self.fn(old, *(self.arr[n] for n in in_names))
        if "donation_honored" not in self.extra:
            self.extra["donation_honored"] = J.donated(old)
        return self.out

    def check(self) -> None:
        self.sync()
        a, b, c = (self.arr[n] for n in "abc")
        n = a.shape[0]
        idx = np.random.default_rng(5).integers(0, n, min(CHECK_POINTS, n))
        a64, b64, c64 = (J.to64(x[idx]) for x in (a, b, c))
        got, want = reference(self.op, a64, b64, c64)
        err = float(np.max(np.abs(got - want) / np.abs(want)))
        if not err <= CHECK_TOLERANCE[self.dtype]:
            raise ProbeCheckFailed(f"{self.op}: max relative error {err:.3g} > {CHECK_TOLERANCE[self.dtype]:g}")
        self.extra["max_rel_error"] = err
        if self.op == "copy":
            try:
                same = self.arr["c"].unsafe_buffer_pointer() == self.arr["a"].unsafe_buffer_pointer()
            except Exception:  # noqa: BLE001 - not every platform exposes buffer pointers
                same = False
            if same:
                raise ProbeCheckFailed("copy: output aliases the input buffer (nothing was copied)")


@kernel(("memory.copy", "memory.scale", "memory.add", "memory.triad"), "jax")
def build_stream(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    nbytes = array_bytes(p["size_mib"], J.platform_of(ctx.device) == "cpu", J.cache_bytes(ctx.device, ctx.host))
    J.require_memory(ctx.device, 4 * nbytes, f"{probe.name} (3 arrays of {nbytes // MIB} MiB + output)")
    resolved = {**p, "size_mib": nbytes // MIB}
    stream = StreamKernel(probe.op, nbytes // DTYPE_BYTES[p["dtype"]], p["dtype"], ctx.device)
    stream.work = probe.work(resolved, ctx.device_info)
    stream.params = resolved
    return stream
