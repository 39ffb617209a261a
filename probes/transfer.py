"""Transfer probes: moving bytes between host and device, between devices, and moving
one request's KV cache in the layouts serving systems use.

Raw copies (payload of ``size_bytes``, random bytes, checked once per case):

- ``transfer.h2d`` / ``transfer.d2h``: host → device and device → host, from/to a
  pinned (page-locked, ``pin_memory()``) or a pageable (plain CPU tensor) host buffer.
  CUDA only: on a CPU-only node they plan no case.
- ``transfer.d2d``: from the case's GPU to the next one (cuda:i → cuda:i+1 mod n):
  a direct peer copy where ``torch.cuda.can_device_access_peer`` allows it, else staged
  explicitly through a pinned host buffer (d2h, then h2d ordered by events);
  ``extra["path"]`` says which. One GPU: skipped with the reason.
- ``transfer.local``: a copy inside one device's memory (on the CPU a memcpy).

KV-cache transfer (one request of ``ctx`` tokens, every layer — or the first ``layers``
— of a model shape; per layer K and V of [kv_heads, ctx, head_dim]):

- ``layout=contiguous``: the whole request in one buffer [layers, 2, kv_heads, ctx,
  head_dim], moved by one copy.
- ``layout=layerwise``: one tensor per layer (as per-layer KV caches are held), moved
  one layer at a time, the way layer-wise streaming sends it. Each layer's latency is
  also timed on its own (see ``per_layer_*`` in extra).
- ``layout=paged``: per layer a pool [2, pool_blocks, kv_heads, 16, head_dim] (K and V
  pools side by side, 16-token blocks as in ``probes.decode``) holding the request's
  blocks at the scattered places its block table names, among other requests' blocks
  (the pool has twice the request's blocks). Moving it = per layer a gather
  (``index_select`` by the source table) → copy → scatter (``index_copy_`` into the
  destination pool at the places the destination's own table names).

``transfer.kv`` moves it inside one process: ``path=d2d`` to a second buffer on the same
device (on the CPU: between two buffers in host memory; paged d2d is gather → scatter,
the middle copy has nowhere to go), ``path=d2h2d`` through a host staging buffer (pinned
on GPUs): device → host → device. ``transfer.kv_sendrecv`` moves it between two rank
processes with ``torch.distributed`` send/recv (NCCL between GPUs, Gloo on the CPU):
rank 0 holds the source, rank 1 receives into its own layout.

Work model (every probe in this family): ``bytes`` = the payload delivered to the
destination (the size of the copy; the request's KV bytes, layers · ctx · 2 · kv_heads ·
head_dim · dtype bytes, the same for all three layouts, so contiguous / paged bandwidth
is the layout penalty directly); ``flops`` = 0. ``bound`` = ``link`` where the payload
crosses a link (h2d, d2h, d2d, d2h2d on a GPU, send/recv), ``memory`` where it stays in
one memory (local, KV d2d, anything on the CPU). Memory-bound rows still count the
payload once, not the read + write traffic (2 × payload, in ``extra
["memory_traffic_bytes"]``) that ``memory.copy`` counts STREAM-style.

Integrity: raw copies compare destination and source bytes once (all of them up to
64 MiB, else 16 chunks of 1 MiB spread over the buffer and the tail). KV transfers in
one process compare the destination reassembled in token order with the source, layer
by layer, exactly (``torch.equal``). Between processes the sender sends, after the
first transfer, a position-weighted checksum per layer of its KV in token order; the
receiver computes the same over what it received (reassembled in token order) and the
verdict is all-reduced, so a mismatch fails the case on both ranks (not as a timeout).

This module is what each probe *is*: parameters, work models, sizes, the KV layout's
facts and the skip rules; it imports no framework. How torch measures them is in
``probes/torch/transfer.py``, how JAX does in ``probes/jax/transfer.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from harness.registry import CaseContext, Kernel, Param, Probe, Work, register
from probes.common import DTYPE_BYTES
from probes.models import load_model, model_names

KIB, MIB, GIB = 2**10, 2**20, 2**30
BLOCK_TOKENS = 16
# "auto" size: min(AUTO_CAP, free memory / AUTO_FRACTION) of every memory the copy touches.
AUTO_CAP = GIB
AUTO_FRACTION = 4
SIZES = (4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB, "auto")
FULL_CHECK_BYTES = 64 * MIB
CHECK_CHUNKS, CHECK_CHUNK_BYTES = 16, MIB
# The paged pool holds this many times the request's blocks (other requests' blocks).
POOL_FACTOR = 2
# Untimed passes in which each layer of a layer-wise/paged transfer is timed on its own.
PER_LAYER_PASSES = 3
CHECKSUM_MODULUS = 65521
# What an in-process KV transfer's check establishes (torch and JAX alike).
KV_EXACT = "exact: destination reassembled in token order equals the source, layer by layer"


# -- shared helpers ------------------------------------------------------------------------
def resolve_size(value, devices: list[str], free_bytes: Callable[[str], int | None]) -> int:
    """size_bytes as given, or auto = min(1 GiB, 1/4 of the free memory of every memory
    the copy touches), rounded down to a MiB. ``free_bytes`` is the backend's
    (probes.torch.common.free_bytes); it is asked only for auto."""
    if value != "auto":
        return int(value)
    free = [f for f in (free_bytes(d) for d in devices) if f]
    size = min([AUTO_CAP, *(f // AUTO_FRACTION for f in free)])
    return max(4 * KIB, size - size % MIB)


def _size_param() -> Param:
    return Param(
        default=SIZES,
        type=int,
        allow_auto=True,
        minimum=1,
        help="bytes per copy; auto = min(1 GiB, 1/4 of the free memory it touches)",
    )


def _copy_work(params: dict, bound: str, link: str | None = None) -> Work:
    size = params["size_bytes"]
    if size == "auto":
        raise ValueError("size_bytes=auto is resolved on the device")
    return Work(flops=0.0, bytes=float(size), bound=bound, link=link)


def resolve_kernel(kernel: Kernel, probe: Probe, ctx: CaseContext, **resolved) -> Kernel:
    """``kernel`` with the case's params, ``resolved`` (what the device settled: an
    auto size, the layers moved) in place of the planned values, and the probe's work
    for them. Every transfer builder, torch and JAX, ends with it."""
    kernel.params = {**ctx.params, **resolved}
    kernel.work = probe.work(kernel.params, ctx.device_info)
    return kernel


# -- raw copies ----------------------------------------------------------------------------
class _HostDeviceProbe(Probe):
    family = "transfer"
    device_types = ("cuda",)
    direction: str
    params = {
        "size_bytes": _size_param(),
        "memory": Param(default=("pinned", "pageable"), type=str, choices=("pinned", "pageable"),
                        help="host buffer: page-locked (pin_memory) or plain"),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        return _copy_work(params, "link", link="host")


@register
class HostToDevice(_HostDeviceProbe):
    name = "transfer.h2d"
    direction = "h2d"
    description = "host → device copy of size_bytes from a pinned or pageable host buffer"


@register
class DeviceToHost(_HostDeviceProbe):
    name = "transfer.d2h"
    direction = "d2h"
    description = "device → host copy of size_bytes into a pinned or pageable host buffer"


def d2d_work(params: dict, link: str) -> Work:
    """Work of one device-to-device copy, judged against the link it crosses: ``link`` is
    the destination device id for a peer copy (its pair link, harness.nominal.peer_link)
    or ``"host"`` when staged through host memory (host_link_Bps, never NVLink)."""
    return _copy_work(params, "link", link=link)


@register
class DeviceToDevice(Probe):
    name = "transfer.d2d"
    family = "transfer"
    description = "copy from this GPU to the next: peer-to-peer where allowed, else staged through pinned host memory"
    device_types = ("cuda",)
    params = {"size_bytes": _size_param()}

    def work(self, params: dict, device_info: dict) -> Work:
        return _copy_work(params, "link")


@register
class LocalCopy(Probe):
    name = "transfer.local"
    family = "transfer"
    description = "copy of size_bytes inside one device's memory (a memcpy on the CPU)"
    device_types = ("cpu", "cuda")
    params = {"size_bytes": _size_param()}

    def work(self, params: dict, device_info: dict) -> Work:
        return _copy_work(params, "memory")


# -- one request's KV cache ----------------------------------------------------------------
@dataclass(frozen=True)
class KVSpec:
    """The KV cache of one request: ``layers`` layers of K and V [kv_heads, ctx, head_dim]."""

    layers: int
    kv_heads: int
    ctx: int
    head_dim: int
    dtype: str

    @property
    def layer_shape(self) -> tuple:
        return (2, self.kv_heads, self.ctx, self.head_dim)

    @property
    def layer_bytes(self) -> int:
        return 2 * self.kv_heads * self.ctx * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes

    @property
    def blocks(self) -> int:
        return self.ctx // BLOCK_TOKENS

    @property
    def block_bytes(self) -> int:
        """One 16-token block of K (or of V) of one layer."""
        return self.kv_heads * BLOCK_TOKENS * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def pool_blocks(self) -> int:
        return POOL_FACTOR * self.blocks

    def store_bytes(self, layout: str) -> int:
        return self.total_bytes * (POOL_FACTOR if layout == "paged" else 1)


def kv_spec(params: dict) -> KVSpec:
    shape = load_model(params["model"])
    layers = shape.num_layers if params.get("layers", "auto") == "auto" else min(int(params["layers"]), shape.num_layers)
    return KVSpec(layers, shape.num_kv_heads, int(params["ctx"]), shape.head_dim, params["dtype"])


def _model_param() -> Param:
    return Param(default=("llama-3.1-8b",), type=str, choices=model_names(), help="shape in configs/models/")


def _kv_params() -> dict:
    return {
        "model": _model_param(),
        "ctx": Param(default=(4096,), type=int, minimum=BLOCK_TOKENS, help="tokens of the request"),
        "layers": Param(default=("auto",), type=int, allow_auto=True, minimum=1,
                        help="layers moved; auto = all of the model's"),
        "layout": Param(default=("contiguous", "layerwise", "paged"), type=str,
                        choices=("contiguous", "layerwise", "paged")),
    }


def _dtype_param() -> Param:
    return Param(default=("bf16",), type=str, choices=("bf16", "fp16", "fp32"))


def _kv_skip(params: dict) -> str | None:
    if params["layout"] == "paged" and params["ctx"] % BLOCK_TOKENS:
        return f"paged layout needs ctx divisible by the {BLOCK_TOKENS}-token block (ctx={params['ctx']})"
    return None


def _kv_extra(spec: KVSpec, layout: str) -> dict:
    extra = {
        "layout": layout,
        "kv_bytes": spec.total_bytes,
        "layer_bytes": spec.layer_bytes,
        "layers": spec.layers,
    }
    if layout == "paged":
        extra.update(block_tokens=BLOCK_TOKENS, blocks=spec.blocks, block_bytes=spec.block_bytes,
                     pool_blocks=spec.pool_blocks)
    return extra


def _kv_bound(path: str, device_type: str) -> str:
    return "link" if path == "d2h2d" and device_type == "cuda" else "memory"


def kv_mismatch(layout: str, layer: int, first: list | None) -> str:
    """Why an in-process KV check failed: ``layer`` of the destination differs from the
    source; ``first`` = the first differing element [K/V, head, token, dim] if known."""
    where = f" (first differing element [K/V, head, token, dim] = {first})" if first is not None else ""
    return f"{layout} KV layer {layer} differs from the source after the transfer{where}"


class _KVProbe(Probe):
    """What both KV transfers share: the request's parameters and the paged skip rule."""

    family = "transfer"
    device_types = ("cpu", "cuda")

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return _kv_skip(params)


@register
class KVTransfer(_KVProbe):
    name = "transfer.kv"
    description = "one request's KV cache (all layers) moved in one process: contiguous, layer by layer, or as scattered 16-token blocks"
    params = {
        **_kv_params(),
        "path": Param(default=("d2d", "d2h2d"), type=str, choices=("d2d", "d2h2d"),
                      help="d2d: to a second buffer on the device; d2h2d: through a host staging buffer"),
        "dtype": _dtype_param(),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        spec = kv_spec(params)
        bound = _kv_bound(params["path"], (device_info or {}).get("type", "cpu"))
        # Through the host, the payload crosses the host link down then up, one after the
        # other: judged against host_link_Bps, it can reach at most half of it.
        link = "host" if params["path"] == "d2h2d" and bound == "link" else None
        return Work(flops=0.0, bytes=float(spec.total_bytes), bound=bound, dtype=params["dtype"], link=link)


@register
class KVSendRecv(_KVProbe):
    name = "transfer.kv_sendrecv"
    description = "one request's KV cache sent from rank 0 to rank 1 (send/recv: NCCL between GPUs, Gloo on CPU), checksummed on arrival"
    ranks = 2
    params = {**_kv_params(), "dtype": _dtype_param()}

    def work(self, params: dict, device_info: dict) -> Work:
        spec = kv_spec(params)
        return Work(flops=0.0, bytes=float(spec.total_bytes), bound="link", dtype=params["dtype"])
