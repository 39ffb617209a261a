"""JAX collectives (``shard_map`` over a device mesh): the kernel and the builder of the
five collectives JAX has (broadcast and reduce are torch-only).

Collectives run in one process over a one-axis mesh ``("x",)`` of the case's devices
(world size = mesh size); rank r of probes.collective is the r-th device of the mesh.
The operations and their torch counterparts:

- all_reduce: ``lax.psum``; all_gather: ``lax.all_gather(tiled=True)``;
  reduce_scatter: ``lax.psum_scatter(tiled=True)``; all_to_all:
  ``lax.all_to_all(split_axis=0, concat_axis=0, tiled=True)``; sendrecv:
  ``lax.ppermute`` over the ring r -> r+1.

Sizes, input values, expected values, exactness and busbw factors are those of
probes.collective (nccl-tests conventions), so the rows compare one to one with the
torch rows. Every device's output is checked once per case.

Under ``jax.distributed`` (multi-host, see harness.worker.init_jax_distributed) the mesh
takes the first ``world_size`` devices of ``jax.devices(platform)`` across hosts; each
process fills and checks the shards of its own devices.
"""


from __future__ import annotations

import numpy as np

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes import collective as C
from probes.jax import common as J
from probes.jax.common import DTYPE_BYTES, JaxKernel


def _mesh_devices(ctx: CaseContext, n: int) -> list:
    import jax

    platform = J.platform_of(ctx.device)
    if jax.process_count() > 1:
        devs = sorted(jax.devices(platform), key=lambda d: d.id)
    else:
        devs = [J.device(d) for d in ctx.group_devices]
    if len(devs) < n:
        raise ProbeSkip(f"needs {n} JAX {platform} devices, {len(devs)} available")
    return devs[:n]


class JaxCollectiveKernel(JaxKernel):
    def __init__(self, op: str, size_bytes: int, dtype: str, devices: list):
        super().__init__()
        import jax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        n = len(devices)
        self.op, self.n, self.dtype = op, n, dtype
        elem = DTYPE_BYTES[dtype]
        self.layout = C.layout(op, size_bytes, n, elem)
        self.chunk = self.layout["chunk"]
        self.period = C.value_period(op, n, dtype)
        self.exact = C.is_exact(op, n, dtype)
        self.mesh = Mesh(np.array(devices), ("x",))
        self.devices = devices
        sharding = NamedSharding(self.mesh, P("x"))
        dt = J.jnp_dtype(dtype)
        in_numel = self.layout["in_numel"]
        k = np.arange(in_numel, dtype=np.int64)
        local = [d for d in devices if d.process_index == jax.process_index()]
        shards = []
        for d in local:
            rank = devices.index(d)
            values = C.input_values(op, rank, n, k, self.chunk, self.period).astype(np.float32)
            shards.append(jax.device_put(values.reshape(1, in_numel).astype(dt), d))
        self.inp = jax.make_array_from_single_device_arrays((n, in_numel), sharding, shards)
        chunk = self.chunk
        ring = [(i, (i + 1) % n) for i in range(n)]

        def body(x):  # x: this device's [1, in_numel]
            v = x[0]
            if op == "all_reduce":
                y = jax.lax.psum(v, "x")
            elif op == "all_gather":
                y = jax.lax.all_gather(v, "x", tiled=True)
            elif op == "reduce_scatter":
                y = jax.lax.psum_scatter(v, "x", scatter_dimension=0, tiled=True)
            elif op == "all_to_all":
                y = jax.lax.all_to_all(v.reshape(n, chunk), "x", 0, 0, tiled=True).reshape(-1)
            elif op == "sendrecv":
                y = jax.lax.ppermute(v, "x", ring)
            else:  # pragma: no cover - guarded by the probe classes
                raise ValueError(op)
            return y[None]

        fn = jax.shard_map(body, mesh=self.mesh, in_specs=P("x"), out_specs=P("x"))
        self.fn = J.compile_fn(fn, self.inp)[0]
        self.extra.update(
            op=op, size_bytes=size_bytes, root=None,
            rank_in_bytes=in_numel * elem,
            rank_out_bytes=(self.layout["out_numel"] or in_numel) * elem,
            check="exact" if self.exact else f"relative {n * C.EPS[dtype]:.2g}",
            backend="jax shard_map", mesh=[str(d) for d in devices],
            jax_primitive={"all_reduce": "psum", "all_gather": "all_gather", "reduce_scatter": "psum_scatter",
                           "all_to_all": "all_to_all", "sendrecv": "ppermute"}[op],
            before_each="none (inputs are not overwritten; each repetition waits for the previous one)",
        )

    def run(self):
        self.out = self.fn(self.inp)
        return self.out

    def check(self) -> None:
        self.sync()
        bad = []
        for shard in self.out.addressable_shards:
            rank = self.devices.index(shard.device)
            got_all = np.asarray(shard.data)[0]
            idx = C.check_indices(got_all.size, self.chunk)
            want = C.expected_values(self.op, rank, self.n, idx, self.chunk, self.period)
            if want is None:
                continue
            if problem := C.compare(got_all[idx], want, self.exact, self.dtype, self.n):
                bad.append(f"rank {rank}: {problem}")
        if bad:
            raise ProbeCheckFailed(f"{self.op}: " + "; ".join(bad[:4]))


# broadcast and reduce have no JAX primitive of their own: torch kernels only.
JAX_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "sendrecv")


@kernel(tuple(f"collective.{op}" for op in JAX_OPS), "jax")
def build_collective(probe, ctx: CaseContext) -> Kernel:
    n = ctx.world_size
    params = {**ctx.params, "world_size": n}
    resolved = probe.resolved(params)
    size = resolved["size_bytes"]
    elem = DTYPE_BYTES[params["dtype"]]
    devices = _mesh_devices(ctx, n)
    # All mesh devices of a CPU share the host memory.
    sharing = n if J.platform_of(ctx.device) == "cpu" else 1
    J.require_memory(ctx.device, C.buffer_bytes(probe.op, size, n, elem) * sharing * 2,
                     f"{probe.name} at {size} bytes × {n} devices")
    kernel = JaxCollectiveKernel(probe.op, size, params["dtype"], devices)
    kernel.params = resolved
    kernel.work = probe.work(resolved, ctx.device_info)
    return kernel
