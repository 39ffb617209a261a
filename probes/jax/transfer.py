"""How JAX measures the transfer probes (probes/transfer.py): raw copies inside a
device (a compiled ``jnp.copy``) or to the next device of the platform
(``jax.device_put``), and one request's KV cache in its three layouts moved inside a
device, through host memory or to a second device of one process; one kernel builder
per probe, registered with ``harness.registry.kernel``. The probes' facts (sizes, the
KV layout, skip rules) come from the spec module; jax is imported inside the functions."""

from __future__ import annotations

import numpy as np

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.jax import common as J
from probes.jax.common import JaxKernel
from probes.transfer import (
    AUTO_CAP,
    AUTO_FRACTION,
    BLOCK_TOKENS,
    KV_EXACT,
    POOL_FACTOR,
    KVSendRecv,
    kv_mismatch,
    kv_spec,
    resolve_kernel,
)


# -- transfers ------------------------------------------------------------------------------
def _random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


class DevicePutKernel(JaxKernel):
    """``size`` random bytes moved by one computation: a copy inside a device
    (``jnp.copy``, compiled) or ``jax.device_put`` to another device."""

    def __init__(self, size: int, src_dev, dst_dev, seed: int):
        super().__init__()
        import jax
        import jax.numpy as jnp

        self.host = _random_bytes(size, seed)
        self.src = jax.device_put(self.host, src_dev, may_alias=False).block_until_ready()
        self.dst_dev = dst_dev
        if dst_dev == src_dev:
            self.fn = J.compile_fn(lambda x: jnp.copy(x), self.src)[0]
            self.extra["path"] = "jnp.copy (compiled) inside the device"
        else:
            self.fn = lambda x: jax.device_put(x, dst_dev)
            self.extra["path"] = f"jax.device_put {src_dev} -> {dst_dev}"

    def run(self):
        self.out = self.fn(self.src)
        return self.out

    def check(self) -> None:
        self.sync()
        if self.out.devices() != {self.dst_dev}:
            raise ProbeCheckFailed(f"copy landed on {self.out.devices()}, not {self.dst_dev}")
        if not np.array_equal(np.asarray(self.out), self.host):
            raise ProbeCheckFailed("destination bytes differ from the source")
        try:
            if self.out.unsafe_buffer_pointer() == self.src.unsafe_buffer_pointer():
                raise ProbeCheckFailed("destination aliases the source buffer (nothing was copied)")
        except ProbeCheckFailed:
            raise
        except Exception:  # noqa: BLE001 - no buffer pointers on this platform
            pass


def _size(ctx: CaseContext) -> int:
    """size_bytes as given, or auto = min(1 GiB, 1/4 of the device's free memory) (not
    rounded to a MiB, unlike the torch kernels' auto)."""
    if ctx.params["size_bytes"] == "auto":
        return min(AUTO_CAP, (J.free_bytes(ctx.device) or 0) // AUTO_FRACTION)
    return int(ctx.params["size_bytes"])


@kernel("transfer.local", "jax")
def build_local(probe, ctx: CaseContext) -> Kernel:
    size = _size(ctx)
    J.require_memory(ctx.device, 3 * size, f"{probe.name} (2 buffers of {size} B)")
    dev = J.device(ctx.device)
    kernel = DevicePutKernel(size, dev, dev, ctx.seed + 1)
    llc = J.cache_bytes(ctx.device, ctx.host) or 0
    kernel.extra.update(size_bytes=size, memory_traffic_bytes=2 * size,
                        working_set_exceeds_llc=bool(llc) and 2 * size > llc)
    return resolve_kernel(kernel, probe, ctx, size_bytes=size)


# jax.device_put to the next device of the platform (the CPU's host devices too).
@kernel("transfer.d2d", "jax", device_types=("gpu", "tpu", "cpu"))
def build_d2d(probe, ctx: CaseContext) -> Kernel:
    import jax

    platform = J.platform_of(ctx.device)
    peers = [d for d in jax.local_devices(backend=platform)]
    if len(peers) < 2:
        raise ProbeSkip(f"one JAX {platform} device: nothing to copy to")
    src = J.device(ctx.device)
    dst = peers[(peers.index(src) + 1) % len(peers)]
    size = _size(ctx)
    J.require_memory(ctx.device, 3 * size, f"{probe.name} ({size} B)")
    kernel = DevicePutKernel(size, src, dst, ctx.seed + 1)
    kernel.extra["size_bytes"] = size
    if platform == "cpu":
        kernel.extra["note"] = "host devices share one memory: a memcpy between two buffers"
    return resolve_kernel(kernel, probe, ctx, size_bytes=size)


# -- one request's KV cache ----------------------------------------------------------------
class JaxKVStore:
    """One request's KV (layers × [2, kv, ctx, d]) on a JAX device: ``contiguous`` (one
    array [layers, 2, kv, ctx, d]), ``layerwise`` (one array per layer) or ``paged``
    (per layer a pool [2, pool_blocks, kv, 16, d] with the request's blocks at the
    places its table names; the other blocks hold other data)."""

    def __init__(self, spec, layout: str, values: list[np.ndarray], dev, table_seed: int, sign: float = 1.0):
        import jax

        self.spec, self.layout, self.dev = spec, layout, dev
        s = spec
        dt = J.jnp_dtype(s.dtype)
        put = lambda a: jax.device_put(np.asarray(a).astype(dt), dev, may_alias=False)  # noqa: E731
        if layout == "contiguous":
            self.buf = put(np.stack([v * sign for v in values]))
        elif layout == "layerwise":
            self.layers = [put(v * sign) for v in values]
        else:
            self.table = np.random.default_rng(table_seed).permutation(s.pool_blocks)[: s.blocks].astype(np.int32)
            self.table_dev = jax.device_put(self.table, dev)
            others = np.setdiff1d(np.arange(s.pool_blocks), self.table)
            self.pools = []
            for v in values:
                blocks = (v * sign).reshape(2, s.kv_heads, s.blocks, BLOCK_TOKENS, s.head_dim).transpose(0, 2, 1, 3, 4)
                pool = np.empty((2, s.pool_blocks, s.kv_heads, BLOCK_TOKENS, s.head_dim), np.float32)
                pool[:, self.table] = blocks
                pool[:, others] = np.tile(blocks * -0.5, (1, POOL_FACTOR - 1, 1, 1, 1))[:, : len(others)]
                self.pools.append(put(pool))

    def layer(self, i: int) -> np.ndarray:
        """Layer i in token order [2, kv, ctx, d], float64 on the host."""
        s = self.spec
        if self.layout == "contiguous":
            return J.to64(self.buf[i])
        if self.layout == "layerwise":
            return J.to64(self.layers[i])
        blocks = J.to64(self.pools[i])[:, self.table]  # [2, blocks, kv, 16, d]
        return blocks.transpose(0, 2, 1, 3, 4).reshape(2, s.kv_heads, s.ctx, s.head_dim)


class JaxKVTransferKernel(JaxKernel):
    """One request's KV moved: inside the device (``path=d2d``: compiled copies; paged:
    gather by the source table, scatter into the destination pool at its table),
    through host memory (``path=d2h2d``: ``np.copyto`` into a host buffer, then
    ``jax.device_put(may_alias=False)`` back), or to another device (``path=peer``:
    ``jax.device_put``; paged: gather, device_put, scatter)."""

    def __init__(self, spec, layout: str, path: str, src_dev, dst_dev, seed: int):
        super().__init__()
        import jax
        import jax.numpy as jnp

        self.spec, self.layout, self.path = spec, layout, path
        rng = np.random.default_rng(seed + 101)
        values = [rng.standard_normal(spec.layer_shape).astype(np.float32) for _ in range(spec.layers)]
        # Round to the dtype once so source and reference agree exactly.
        dt = J.jnp_dtype(spec.dtype)
        values = [np.asarray(np.asarray(v).astype(dt)).astype(np.float32) for v in values]
        self.src = JaxKVStore(spec, layout, values, src_dev, seed * 1000 + 1)
        self.dst = JaxKVStore(spec, layout, values, dst_dev, seed * 1000 + 2, sign=-1.0)
        self.dst_dev = dst_dev
        copy = J.compile_fn(lambda x: jnp.copy(x), self.src.buf if layout == "contiguous" else
                            (self.src.layers[0] if layout == "layerwise" else self.src.pools[0]))[0]
        if layout == "paged":
            self.gather = J.compile_fn(lambda pool, t: pool[:, t], self.src.pools[0], self.src.table_dev)[0]
            staged = self.gather(self.src.pools[0], self.src.table_dev)
            dst_table = jax.device_put(self.dst.table, dst_dev)
            self.dst_table = dst_table
            self.scatter = J.compile_fn(lambda pool, blocks, t: pool.at[:, t].set(blocks),
                                        self.dst.pools[0], jax.device_put(staged, dst_dev), dst_table, donate=(0,))[0]
            if path == "d2h2d":
                self.host = [np.empty(staged.shape, staged.dtype) for _ in range(spec.layers)]
        elif path == "d2h2d":
            if layout == "contiguous":
                self.host = np.empty(self.src.buf.shape, self.src.buf.dtype)
            else:
                self.host = [np.empty(x.shape, x.dtype) for x in self.src.layers]
        self.copy = copy
        self.extra.update({
            "layout": layout, "path": path, "kv_bytes": spec.total_bytes, "layer_bytes": spec.layer_bytes,
            "layers": spec.layers,
            "method": {"d2d": "compiled copy on the device", "d2h2d": "np.copyto into host memory, jax.device_put back",
                       "peer": f"jax.device_put {src_dev} -> {dst_dev}"}[path],
            "integrity": KV_EXACT,
        })
        if layout == "paged":
            self.extra["paged"] = "gather (compiled) -> move -> scatter into the destination pool (donated)"

    def _move(self, x, i=None):
        import jax

        if self.path == "d2d":
            return self.copy(x)
        if self.path == "peer":
            return jax.device_put(x, self.dst_dev)
        host = self.host if i is None else self.host[i]
        np.copyto(host, np.asarray(x))
        return jax.device_put(host, self.dst_dev, may_alias=False)

    def run(self):
        if self.layout == "contiguous":
            self.out = self.dst.buf = self._move(self.src.buf)
        elif self.layout == "layerwise":
            self.dst.layers = [self._move(x, i) for i, x in enumerate(self.src.layers)]
            self.out = self.dst.layers
        else:
            pools = []
            for i in range(self.spec.layers):
                blocks = self.gather(self.src.pools[i], self.src.table_dev)
                moved = blocks if self.path == "d2d" else self._move(blocks, i)
                pools.append(self.scatter(self.dst.pools[i], moved, self.dst_table))
            self.out = self.dst.pools = pools
        return self.out

    def check(self) -> None:
        self.sync()
        for i in range(self.spec.layers):
            got, want = self.dst.layer(i), self.src.layer(i)
            if not np.array_equal(got, want):
                bad = np.argwhere(got != want)
                raise ProbeCheckFailed(kv_mismatch(self.layout, i, bad[0].tolist()))


# One builder for both: transfer.kv_sendrecv is a move to the group's second device
# (one process, no send/recv), transfer.kv one inside the device or through the host.
@kernel(("transfer.kv", "transfer.kv_sendrecv"), "jax")
def build_kv(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    spec = kv_spec(p)
    src = J.device(ctx.device)
    peer = isinstance(probe, KVSendRecv)
    if peer:
        devs = [J.device(d) for d in (ctx.group_devices or [])[:2]]
        if len(devs) < 2 or devs[0] == devs[1]:
            raise ProbeSkip("needs 2 JAX devices")
        src, dst, path = devs[0], devs[1], "peer"
    else:
        dst, path = src, p["path"]
    per_store = spec.store_bytes(p["layout"])
    J.require_memory(ctx.device, 3 * per_store + 2 * spec.total_bytes, f"{probe.name} (source, destination, staging)")
    kernel = JaxKVTransferKernel(spec, p["layout"], path, src, dst, ctx.seed % 100000)
    if peer and J.platform_of(ctx.device) == "cpu":
        kernel.extra["note"] = "host devices share one memory: device_put is a memcpy"
    return resolve_kernel(kernel, probe, ctx, layers=spec.layers)
