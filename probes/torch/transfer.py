"""How torch measures the transfer probes (probes/transfer.py): the raw copies (host
↔ device, device → device, inside one device) with their byte checks, one request's
KV cache in its three layouts (KVStore) moved inside one process or between two ranks
with torch.distributed send/recv, the position-weighted KV checksum (also used by
probes.composite), and one kernel builder per probe. torch is imported inside the
functions."""

from __future__ import annotations

import statistics

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.torch.common import cache_bytes, free_bytes, require_memory, rotation_count, synchronize, torch_dtype
from probes.transfer import (
    BLOCK_TOKENS,
    CHECK_CHUNK_BYTES,
    CHECK_CHUNKS,
    CHECKSUM_MODULUS,
    FULL_CHECK_BYTES,
    KV_EXACT,
    MIB,
    PER_LAYER_PASSES,
    POOL_FACTOR,
    KVSpec,
    _kv_extra,
    d2d_work,
    kv_mismatch,
    kv_spec,
    resolve_kernel,
    resolve_size,
)


# -- raw copies ----------------------------------------------------------------------------
def fill_random_bytes(t, gen) -> None:
    """Random bytes into a 1-D uint8 tensor (8 bytes per draw where it can)."""
    import torch

    n = t.numel()
    head = n - n % 8
    if head:
        t[:head].view(torch.int64).random_(generator=gen)
    if n > head:
        t[head:].random_(0, 256, generator=gen)


def random_bytes(n: int, device: str, seed: int, pin: bool = False):
    """n random bytes on ``device`` (host: pinned if asked), generated where it's fast."""
    import torch

    if device.startswith("cpu"):
        t = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        fill_random_bytes(t, torch.Generator().manual_seed(seed))
        return t
    t = torch.empty(n, dtype=torch.uint8, device=device)
    fill_random_bytes(t, torch.Generator(device=device).manual_seed(seed))
    return t


def same_bytes(a, b) -> tuple[bool, str]:
    """Do two 1-D uint8 tensors (any devices) hold the same bytes? All of them up to
    64 MiB; above, 16 chunks of 1 MiB spread evenly and the last chunk."""
    import torch

    n = a.numel()
    if b.numel() != n:
        return False, f"sizes differ ({n} vs {b.numel()} bytes)"
    if n <= FULL_CHECK_BYTES:
        ok = torch.equal(a, b.to(a.device))
        return ok, "all bytes compared"
    step = (n - CHECK_CHUNK_BYTES) // (CHECK_CHUNKS - 1)
    starts = sorted({i * step for i in range(CHECK_CHUNKS)} | {n - CHECK_CHUNK_BYTES})
    for s in starts:
        if not torch.equal(a[s : s + CHECK_CHUNK_BYTES].cpu(), b[s : s + CHECK_CHUNK_BYTES].cpu()):
            return False, f"bytes differ in the chunk at offset {s}"
    return True, f"{len(starts)} chunks of {CHECK_CHUNK_BYTES // MIB} MiB compared"


class CopyKernel(Kernel):
    """One copy of ``src`` into ``dst`` per repetition (``copy`` does it)."""

    def __init__(self, src, dst, copy, devices: list[str], extra: dict):
        super().__init__()
        self.src, self.dst, self._copy, self.devices = src, dst, copy, devices
        self.extra = dict(extra)

    def run(self) -> None:
        self._copy()

    def check(self) -> None:
        for d in self.devices:
            synchronize(d)
        ok, how = same_bytes(self.dst, self.src)
        if not ok:
            raise ProbeCheckFailed(f"destination differs from the source: {how}")
        self.extra["check"] = how

    def close(self) -> None:
        self.src = self.dst = self._copy = None


def _host_buffer(n: int, memory: str):
    import torch

    t = torch.empty(n, dtype=torch.uint8, pin_memory=memory == "pinned")
    t.zero_()  # touch every page now, not in the first timed copy
    return t


@kernel(("transfer.h2d", "transfer.d2h"), "torch")
def build_host_device(probe, ctx: CaseContext) -> Kernel:
    import torch

    size = resolve_size(ctx.params["size_bytes"], [ctx.device, "cpu:0"], free_bytes)
    memory = ctx.params["memory"]
    require_memory(ctx.device, size, f"{probe.name} (device buffer of {size} B)")
    require_memory("cpu:0", size, f"{probe.name} ({memory} host buffer of {size} B)")
    dev = random_bytes(size, ctx.device, ctx.seed + 1)
    host = _host_buffer(size, memory)
    pinned = memory == "pinned"
    if probe.direction == "h2d":
        host.copy_(dev)  # random source bytes, generated on the device
        src, dst = host, torch.empty_like(dev).zero_()
    else:
        src, dst = dev, host

    def copy():
        # Pinned: an async DMA; pageable: the driver stages through its own pinned
        # buffer and the call returns when done, so CUDA events bracket it either way.
        dst.copy_(src, non_blocking=pinned)

    kernel = CopyKernel(src, dst, copy, [ctx.device], {
        "direction": probe.direction, "memory": memory, "size_bytes": size,
        # Which nominal this is judged against: the PCIe host link, not NVLink.
        "nominal_link": "host_link_Bps",
    })
    return resolve_kernel(kernel, probe, ctx, size_bytes=size)


@kernel("transfer.d2d", "torch")
def build_d2d(probe, ctx: CaseContext) -> Kernel:
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        raise ProbeSkip(f"device-to-device copy needs a second GPU; {count} visible")
    src_dev = torch.device(ctx.device)
    dst_dev = torch.device("cuda", (src_dev.index + 1) % count)
    peer = bool(torch.cuda.can_device_access_peer(src_dev, dst_dev))
    size = resolve_size(ctx.params["size_bytes"], [str(src_dev), str(dst_dev)] + ([] if peer else ["cpu:0"]), free_bytes)
    require_memory(str(src_dev), size, f"{probe.name} (source buffer)")
    require_memory(str(dst_dev), size, f"{probe.name} (destination buffer)")
    src = random_bytes(size, str(src_dev), ctx.seed + 1)
    dst = torch.zeros(size, dtype=torch.uint8, device=dst_dev)
    extra = {"source": str(src_dev), "destination": str(dst_dev), "size_bytes": size}
    # The ceiling is the link the bytes actually cross: the pair's own link (NVML's
    # NVLinks between these two, else PCIe; on an MI300X one xGMI link, not all seven)
    # for a peer copy; the host link for a copy staged through host memory.
    link = str(dst_dev) if peer else "host"
    if peer:
        extra.update(path="peer", nominal_link=f"pair link {src_dev}-{dst_dev} (pair_links)")

        def copy():
            # torch enables peer access and copies on the source's current stream,
            # fenced against the destination's stream.
            dst.copy_(src, non_blocking=True)
    else:
        require_memory("cpu:0", size, f"{probe.name} (pinned staging buffer)")
        staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        s_src, s_dst = torch.cuda.current_stream(src_dev), torch.cuda.current_stream(dst_dev)
        down, up = torch.cuda.Event(), torch.cuda.Event()
        # Down then up, one after the other: against host_link_Bps it reaches at most half.
        extra.update(path="staged via host", nominal_link="host_link_Bps")

        def copy():
            staging.copy_(src, non_blocking=True)  # on the source's stream
            down.record(s_src)
            with torch.cuda.device(dst_dev):
                s_dst.wait_event(down)
                dst.copy_(staging, non_blocking=True)  # on the destination's stream
                up.record(s_dst)
            s_src.wait_event(up)  # the case's end event comes after the upload

    kernel = resolve_kernel(CopyKernel(src, dst, copy, [str(src_dev), str(dst_dev)], extra), probe, ctx, size_bytes=size)
    # Judged against the link the copy took, which only the device knows.
    kernel.work = d2d_work(kernel.params, link)
    return kernel


@kernel("transfer.local", "torch")
def build_local(probe, ctx: CaseContext) -> Kernel:
    import torch

    size = resolve_size(ctx.params["size_bytes"], [ctx.device], free_bytes)
    require_memory(ctx.device, 2 * size, f"{probe.name} (2 buffers of {size} B)")
    src = random_bytes(size, ctx.device, ctx.seed + 1)
    dst = torch.zeros(size, dtype=torch.uint8, device=ctx.device)
    llc = cache_bytes(ctx.device, ctx.host) or 0
    kernel = CopyKernel(src, dst, lambda: dst.copy_(src), [ctx.device], {
        "size_bytes": size,
        "memory_traffic_bytes": 2 * size,
        # No rotation: small sizes measure per-copy cost from cache, large ones memory.
        "working_set_exceeds_llc": bool(llc) and 2 * size > llc,
    })
    return resolve_kernel(kernel, probe, ctx, size_bytes=size)


# -- one request's KV cache ----------------------------------------------------------------
def layer_values(spec: KVSpec, device: str, gen):
    """The next layer's K and V in token order [2, kv_heads, ctx, head_dim], from gen."""
    import torch

    return torch.randn(spec.layer_shape, generator=gen, device=device).to(torch_dtype(spec.dtype))


def block_table(spec: KVSpec, seed: int, device: str):
    """The request's blocks in token order: distinct random places in the pool."""
    import torch

    perm = torch.randperm(spec.pool_blocks, generator=torch.Generator().manual_seed(seed))
    return perm[: spec.blocks].to(device)


class KVStore:
    """One request's KV cache on a device in one layout. ``table_seed`` picks where a
    paged store's blocks lie in its pool."""

    def __init__(self, spec: KVSpec, layout: str, device: str, table_seed: int = 0, pin: bool = False):
        import torch

        self.spec, self.layout, self.device = spec, layout, device
        dt = torch_dtype(spec.dtype)
        kw = {"dtype": dt, "device": device}
        if pin:
            kw = {"dtype": dt, "pin_memory": True}
        if layout == "contiguous":
            self.buf = torch.empty((spec.layers, *spec.layer_shape), **kw)
            self.layers = [self.buf[i] for i in range(spec.layers)]
        elif layout == "layerwise":
            self.layers = [torch.empty(spec.layer_shape, **kw) for _ in range(spec.layers)]
        elif layout == "paged":
            s = spec
            self.pools = [torch.empty(2, s.pool_blocks, s.kv_heads, BLOCK_TOKENS, s.head_dim, **kw) for _ in range(s.layers)]
            self.table = block_table(spec, table_seed, device)
            mask = torch.ones(s.pool_blocks, dtype=torch.bool)
            mask[self.table.cpu()] = False
            self.others = mask.nonzero().flatten().to(device)
        else:
            raise ValueError(f"unknown layout {layout!r}")

    # token order <-> blocks
    def _to_blocks(self, values):
        s = self.spec
        return values.view(2, s.kv_heads, s.blocks, BLOCK_TOKENS, s.head_dim).permute(0, 2, 1, 3, 4).contiguous()

    def _from_blocks(self, blocks):
        s = self.spec
        return blocks.permute(0, 2, 1, 3, 4).reshape(s.layer_shape)

    def fill(self, gen, sign: float = 1.0) -> None:
        """The request's KV (times ``sign``), layer after layer, from ``gen``."""
        for i in range(self.spec.layers):
            self.put_layer(i, layer_values(self.spec, self.device, gen), sign)

    def put_layer(self, i: int, values, sign: float = 1.0) -> None:
        """Layer i of the request (``values`` in token order, times ``sign``) into the
        store. A paged pool's other blocks (other requests') get values that differ
        from the request's everywhere: -sign/2 × its blocks, cycled (exact in any
        float format), so a gather or scatter at a wrong place shows."""
        self.write_layer(i, values if sign == 1.0 else values * sign)
        if self.layout == "paged" and POOL_FACTOR > 1:
            others = self._to_blocks(values * (-0.5 * sign)).repeat(1, POOL_FACTOR - 1, 1, 1, 1)
            self.pools[i].index_copy_(1, self.others, others)

    def write_layer(self, i: int, values) -> None:
        """Layer i's K and V in token order [2, kv, ctx, d] into the store."""
        if self.layout == "paged":
            self.pools[i].index_copy_(1, self.table, self._to_blocks(values))
        else:
            self.layers[i].copy_(values)

    def layer(self, i: int):
        """Layer i's K and V in token order [2, kv_heads, ctx, head_dim]."""
        import torch

        if self.layout == "paged":
            return self._from_blocks(torch.index_select(self.pools[i], 1, self.table))
        return self.layers[i]

    # paged transfers
    def gather(self, i: int, out) -> None:
        """Layer i's blocks, in table order, into ``out`` [2, blocks, kv, 16, d]."""
        import torch

        torch.index_select(self.pools[i], 1, self.table, out=out)

    def scatter(self, i: int, blocks) -> None:
        """``blocks`` [2, blocks, kv, 16, d] into layer i's pool at this store's table."""
        self.pools[i].index_copy_(1, self.table, blocks)

    def staging(self, device: str, pin: bool = False):
        import torch

        s = self.spec
        shape = (2, s.blocks, s.kv_heads, BLOCK_TOKENS, s.head_dim)
        if pin:
            return torch.empty(shape, dtype=torch_dtype(s.dtype), pin_memory=True)
        return torch.empty(shape, dtype=torch_dtype(s.dtype), device=device)


def kv_checksum(values):
    """Position-weighted checksum of one layer in token order: [sum, Σ xᵢ·(i mod 65521 + 1)]
    of the raw bits as integers (int64, wrapping: exact and order-independent, so the same
    on any device). The weights make a moved or swapped block change it."""
    import torch

    flat = values.contiguous().view(-1)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    ints = flat.view(as_int).to(torch.int64)
    weights = torch.arange(ints.numel(), device=ints.device, dtype=torch.int64) % CHECKSUM_MODULUS + 1
    return torch.stack([ints.sum(), (ints * weights).sum()])


def verify_kv(dst: KVStore, src: KVStore) -> None:
    """The destination reassembled in token order equals the source, layer by layer."""
    import torch

    for i in range(src.spec.layers):
        got, want = dst.layer(i), src.layer(i)
        if not torch.equal(got.to(want.device), want):
            bad = (got.to(want.device) != want).nonzero()
            raise ProbeCheckFailed(kv_mismatch(src.layout, i, bad[0].tolist() if len(bad) else None))


def compare_checksums(mine, rank: int, peer: int) -> list[int]:
    """Rank 0 sends its checksums (``mine``: one row per layer) to ``peer``; the other
    rank receives them and returns the rows where its own differ (the sender: none)."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        dist.send(mine, peer)
        return []
    sent = torch.empty_like(mine)
    dist.recv(sent, peer)
    return [i for i in range(len(mine)) if not torch.equal(mine[i], sent[i])]


def _per_layer_timing(step, layers: int, device: str, before_pass=None) -> dict:
    """Each layer's step timed on its own with the case's clock (CUDA events, or
    perf_counter on the CPU), PER_LAYER_PASSES untimed passes; medians per layer."""
    from harness.timing import clock_for

    clock = clock_for(device, "device")
    clock.sync()
    times = [[0.0] * PER_LAYER_PASSES for _ in range(layers)]
    for p in range(PER_LAYER_PASSES):
        if before_pass:
            before_pass()
        for i in range(layers):
            times[i][p] = clock.time(lambda i=i: step(i))
    per_layer = [statistics.median(t) for t in times]
    return {
        "per_layer_s": [float(f"{t:.4g}") for t in per_layer],
        "per_layer_p50_s": statistics.median(per_layer),
        "per_layer_method": f"each layer timed alone with the case's clock, median of {PER_LAYER_PASSES} untimed passes "
                            "(includes per-layer clock overhead); the timed samples are whole requests",
    }


class KVTransferKernel(Kernel):
    """One request's KV moved inside one process, rotating through ``copies``
    independent source/destination sets so consecutive repetitions find nothing in
    the last-level cache."""

    def __init__(self, spec: KVSpec, layout: str, path: str, device: str, copies: int, seed: int):
        super().__init__()
        import torch

        self.spec, self.layout, self.path, self.device, self.copies = spec, layout, path, device, copies
        self.index = 0
        cuda = device.startswith("cuda")
        self.non_blocking = cuda
        self.sets = []
        for c in range(copies):
            st = {
                "src": KVStore(spec, layout, device, table_seed=seed * 1000 + 2 * c + 1),
                "dst": KVStore(spec, layout, device, table_seed=seed * 1000 + 2 * c + 2),
            }
            if layout == "paged":
                st["stage"] = st["src"].staging(device)
            if path == "d2h2d":
                # Host staging (pinned on GPUs so the copies are DMA): the whole request.
                if layout == "paged":
                    st["host"] = [st["src"].staging("cpu", pin=cuda) for _ in range(spec.layers)]
                    st["stage_up"] = st["src"].staging(device)
                else:
                    st["host"] = KVStore(spec, layout, "cpu", pin=cuda)
            self.sets.append(st)
        # The same request in every set's source; every destination starts as other
        # data (the request negated), so a missing write shows.
        gen = torch.Generator(device=device).manual_seed(seed + 101)
        for i in range(spec.layers):
            values = layer_values(spec, device, gen)
            for st in self.sets:
                st["src"].put_layer(i, values)
                st["dst"].put_layer(i, values, sign=-1.0)
        self.extra = {
            **_kv_extra(spec, layout),
            "path": path,
            "rotation_copies": copies,
            # Read + write of every pass through memory (paged d2d: gather + scatter).
            "memory_traffic_bytes": spec.total_bytes * 2 * (2 if layout == "paged" else 1) if path == "d2d" else None,
            "link_crossings": 2 if path == "d2h2d" and cuda else 0,
            "staging": ("pinned host" if cuda else "host") if path == "d2h2d" else None,
            "integrity": KV_EXACT,
        }
        if layout == "paged" and path == "d2d":
            self.extra["paged_d2d"] = "gather → scatter (same memory: no copy between them)"

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def layer_step(self, i: int) -> None:
        """Move layer i of the current set (layer-wise and paged layouts)."""
        st, nb = self.sets[self.index], self.non_blocking
        src, dst = st["src"], st["dst"]
        if self.layout == "layerwise":
            if self.path == "d2d":
                dst.layers[i].copy_(src.layers[i], non_blocking=nb)
            else:
                host = st["host"].layers[i]
                host.copy_(src.layers[i], non_blocking=nb)
                dst.layers[i].copy_(host, non_blocking=nb)
        else:  # paged
            src.gather(i, st["stage"])
            if self.path == "d2d":
                dst.scatter(i, st["stage"])
            else:
                st["host"][i].copy_(st["stage"], non_blocking=nb)
                st["stage_up"].copy_(st["host"][i], non_blocking=nb)
                dst.scatter(i, st["stage_up"])

    def run(self) -> None:
        if self.layout == "contiguous":
            st, nb = self.sets[self.index], self.non_blocking
            if self.path == "d2d":
                st["dst"].buf.copy_(st["src"].buf, non_blocking=nb)
            else:
                st["host"].buf.copy_(st["src"].buf, non_blocking=nb)
                st["dst"].buf.copy_(st["host"].buf, non_blocking=nb)
            return
        for i in range(self.spec.layers):
            self.layer_step(i)

    def check(self) -> None:
        synchronize(self.device)
        st = self.sets[self.index]
        verify_kv(st["dst"], st["src"])

    def measure(self, policy):
        if self.layout != "contiguous":
            self.extra.update(_per_layer_timing(self.layer_step, self.spec.layers, self.device))
        # None: the harness times whole requests

    def close(self) -> None:
        self.sets = []


@kernel("transfer.kv", "torch")
def build_kv(probe, ctx: CaseContext) -> Kernel:
    spec = kv_spec(ctx.params)
    layout, path = ctx.params["layout"], ctx.params["path"]
    # Bytes touched per repetition: the source and the destination (plus the host
    # staging on the CPU, where it is the same memory).
    touched = spec.total_bytes * (2 if path == "d2d" or not ctx.device.startswith("cpu") else 3)
    copies = rotation_count(touched, ctx.device, ctx.host)
    per_set = 2 * spec.store_bytes(layout) + (2 * spec.layer_bytes if layout == "paged" else 0)
    host_per_set = spec.total_bytes if path == "d2h2d" else 0
    if ctx.device.startswith("cpu"):
        require_memory(ctx.device, copies * (per_set + host_per_set) + 4 * spec.layer_bytes,
                       f"{probe.name} ({copies} source/destination sets)")
    else:
        require_memory(ctx.device, copies * per_set + 4 * spec.layer_bytes, f"{probe.name} ({copies} source/destination sets)")
        if host_per_set:
            require_memory("cpu:0", copies * host_per_set, f"{probe.name} (pinned host staging)")
    kernel = KVTransferKernel(spec, layout, path, ctx.device, copies, ctx.seed)
    return resolve_kernel(kernel, probe, ctx, layers=spec.layers)


# -- between two processes -----------------------------------------------------------------
class KVSendRecvKernel(Kernel):
    """Rank 0 sends one request's KV to rank 1 (torch.distributed send/recv).

    contiguous: one message; layerwise: one message per layer; paged: per layer, the
    request's blocks gathered (index_select) into a staging buffer, sent as one message,
    received into a staging buffer and scattered (index_copy_) into the receiver's own
    pool at its own table's places. One message per layer, not per block: Gloo (and
    NCCL) pay a fixed cost per message, and layer-wise connectors batch a layer's
    blocks the same way; the scattered reads and writes are kept."""

    def __init__(self, spec: KVSpec, layout: str, device: str, rank: int, seed: int):
        super().__init__()
        import torch

        self.spec, self.layout, self.device, self.rank = spec, layout, device, rank
        self.peer = 1 - rank
        self.store = KVStore(spec, layout, device, table_seed=seed * 1000 + 1 + rank)
        # The receiver's memory starts as other data (another request, negated).
        self.store.fill(torch.Generator(device=device).manual_seed(seed + 101 + 1000 * rank), sign=1.0 - 2 * rank)
        self.stage = self.store.staging(device) if layout == "paged" else None
        self.extra = {
            **_kv_extra(spec, layout),
            "role": "sender" if rank == 0 else "receiver",
            "messages_per_transfer": 1 if layout == "contiguous" else spec.layers,
            "message_bytes": spec.total_bytes if layout == "contiguous" else spec.layer_bytes,
            "integrity": "position-weighted int64 checksum per layer in token order, sent by rank 0, compared on rank 1",
        }

    def layer_step(self, i: int) -> None:
        import torch.distributed as dist

        if self.layout == "layerwise":
            t = self.store.layers[i]
            dist.send(t, self.peer) if self.rank == 0 else dist.recv(t, self.peer)
        elif self.rank == 0:
            self.store.gather(i, self.stage)
            dist.send(self.stage, self.peer)
        else:
            dist.recv(self.stage, self.peer)
            self.store.scatter(i, self.stage)

    def run(self) -> None:
        import torch.distributed as dist

        if self.layout == "contiguous":
            buf = self.store.buf
            dist.send(buf, self.peer) if self.rank == 0 else dist.recv(buf, self.peer)
            return
        for i in range(self.spec.layers):
            self.layer_step(i)

    def checksums(self):
        import torch

        return torch.stack([kv_checksum(self.store.layer(i)) for i in range(self.spec.layers)])

    def check(self) -> None:
        import torch
        import torch.distributed as dist

        mine = self.checksums()
        bad_layers = compare_checksums(mine, self.rank, self.peer)
        # Both ranks learn the verdict, so both fail the case (rather than the sender
        # waiting in the next collective until the group timeout).
        verdict = torch.tensor([len(bad_layers)], dtype=torch.int64, device=mine.device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        if int(verdict.item()):
            if self.rank == 0:
                raise ProbeCheckFailed("the receiver (rank 1) reported a KV checksum mismatch")
            raise ProbeCheckFailed(f"{self.layout} KV received by rank 1: checksum mismatch in layer(s) {bad_layers}")
        self.extra["checksum_layer0"] = [int(x) for x in mine[0].tolist()]

    def measure(self, policy):
        if self.layout != "contiguous":
            import torch.distributed as dist

            self.extra.update(_per_layer_timing(self.layer_step, self.spec.layers, self.device, before_pass=dist.barrier))
            self.extra["per_layer_method"] += (
                "; on the receiver a layer's time runs from its recv call to the layer being in place")

    def close(self) -> None:
        self.store = self.stage = None


def _any_rank(flag: bool, device: str) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32, device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@kernel("transfer.kv_sendrecv", "torch")
def build_kv_sendrecv(probe, ctx: CaseContext) -> Kernel:
    spec = kv_spec(ctx.params)
    need = spec.store_bytes(ctx.params["layout"]) + 6 * spec.layer_bytes
    if ctx.device.startswith("cpu"):
        need *= 2  # both ranks share the host's memory
    try:
        require_memory(ctx.device, need, f"{probe.name} (rank {ctx.rank}'s KV store)")
        reason = ""
    except ProbeSkip as exc:
        reason = str(exc)
    # A rank that skipped alone would leave the other waiting in send/recv until the
    # group timeout: every rank skips if any has to.
    if _any_rank(bool(reason), ctx.device):
        raise ProbeSkip(reason or "another rank cannot hold its KV store (see that rank's reason)")
    kernel = KVSendRecvKernel(spec, ctx.params["layout"], ctx.device, ctx.rank, ctx.seed)
    return resolve_kernel(kernel, probe, ctx, layers=spec.layers)
