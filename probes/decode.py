"""Decode probes (memory-bound): what generating one token per sequence costs.

- ``decode.projection``: the linear layers of a model shape as GEMV / skinny GEMM,
  x[batch, in] · W[in, out], batch 1…256. The weights dominate the traffic.
- ``decode.attention``: one query token per sequence against a KV cache of ``ctx``
  tokens, in two layouts: ``contiguous`` (K, V as [batch, kv_heads, ctx, head_dim],
  one fused SDPA call) and ``paged`` (16-token blocks scattered through a block table
  in a shared pool [blocks, 16, kv_heads, head_dim], the way vLLM stores them; on CPU
  read chunk by chunk with an online softmax so each gathered chunk stays in cache and the KV is read
  from memory once). The paged layout's ``kernel`` chooses how the pool is read
  (:data:`PAGED_KERNELS`): ``gather_sdpa`` gathers every block into a contiguous copy
  and runs SDPA (the KV crosses memory three times: the baseline a serving engine
  would not use), ``chunked`` is the online softmax above, ``flex`` is PyTorch's
  FlexAttention reading K and V in place through a block mask built from the block
  table (compiled with ``torch.compile``), and ``default`` (left out of the case id)
  is what each device ran before the choice existed: ``gather_sdpa`` on CUDA,
  ``chunked`` elsewhere, so the older cases keep their ids and meaning. The contiguous
  layout has one kernel (fused SDPA); any other ``kernel`` value is skipped there, and
  every paged kernel's layout penalty is paired with the contiguous ``default`` case.
- ``decode.layer``: one whole Llama-style decoder layer for one new token per sequence
  at batch B: RMSNorm, fused QKV, append K/V to the cache, attention over the cache,
  output projection, residual, RMSNorm, SwiGLU MLP, residual. Rotary embedding is
  left out (elementwise on q/k, no memory traffic of note). For an MoE shape
  (num_experts > 1) the MLP is the router and each token's top-k experts
  (probes/moe.py: grouped GEMMs per expert, gates a softmax over the top-k logits);
  the work model counts each token's k experts in the FLOPs and, in the bytes, the
  attention, the router and the experts the batch touches (expected distinct experts
  under uniform routing: E·(1 − (1 − k/E)^batch), k at batch 1); ``extra`` records the
  experts the seeded routing actually touched. The float64 check re-derives the
  routing (a wrong routing fails it). MoE layers skip CUDA graphs (the expert GEMM
  sizes are read back from the routing) and the JAX backend.

Decode measures memory, not cache: every probe cycles through enough copies of its
weights and KV cache to cover 4× the last-level cache (L2 on GPUs); the switch to the
next copy happens untimed before each repetition. KV bytes per layer per sequence are
2 · kv_heads · head_dim · ctx · dtype bytes. SDPA's ``is_causal`` is top-left aligned,
so the single-token step never uses it (the query attends to the whole cache).
On CUDA the smallest kernels are replayed from CUDA graphs so the launch cost is not
what gets timed.

``decode.projection`` and ``decode.attention`` take ``tp`` (default 1, left out of the
case id): one tensor-parallel rank's shard, as ``composite.tp_decode_step`` runs it —
QKV with heads/tp query and kv_heads/tp KV heads, O with heads/tp·head_dim inputs,
gate+up with 2·intermediate/tp outputs, down with intermediate/tp inputs; attention
over heads/tp and kv_heads/tp. A shape that does not divide is skipped.
"""

from __future__ import annotations

from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES
from probes.gemm import gemm_skip_reason
from probes.models import PROJECTIONS, attention_flops, linear_bytes, linear_flops, load_model, model_names

BLOCK_TOKENS = 16
# decode.attention's paged-layout kernels. "default" resolves per device (module text);
# the others name one method on every device.
PAGED_KERNELS = ("default", "gather_sdpa", "chunked", "flex")
# Kernels only the torch backend has; another backend (JAX: a lax.scan online softmax,
# which is "chunked") skips them rather than run its own method under their name.
TORCH_ONLY_KERNELS = ("gather_sdpa", "flex")
# Where the device ridge is unknown (CPU memory bandwidth has no nominal), cases below
# this arithmetic intensity are called memory-bound: server CPUs' ridges are ~10-30 FLOP/B.
FALLBACK_RIDGE = 16.0


def _hint(flops: float, nbytes: float) -> str:
    return "memory" if nbytes and flops / nbytes < FALLBACK_RIDGE else "compute"


def _model_param() -> Param:
    return Param(default=("llama-3.1-8b",), type=str, choices=model_names(), help="shape in configs/models/")


def _dtype_param() -> Param:
    return Param(default=("bf16",), type=str, choices=("fp32", "bf16", "fp16"))


def _tp_param() -> Param:
    return Param(default=(1,), type=int, minimum=1, implicit=1,
                 help="tensor-parallel ranks: one rank's shard (heads/tp, kv_heads/tp, intermediate/tp), "
                      "as the TP composite runs it; 1 = the whole layer")


def sharded_shape(params: dict):
    """The model shape one tensor-parallel rank holds (``tp`` parameter, default 1)."""
    return load_model(params["model"]).shard(int(params.get("tp", 1)))


def _tp_skip(params: dict) -> str | None:
    return load_model(params["model"]).shard_reason(int(params.get("tp", 1)))


def kv_bytes(shape, batch: int, ctx_len: int, dtype: str) -> int:
    """KV cache of one layer: batch · 2 · kv_heads · head_dim · ctx · dtype bytes."""
    return batch * shape.kv_bytes_per_token_layer(DTYPE_BYTES[dtype]) * ctx_len


@register
class DecodeProjection(Probe):
    name = "decode.projection"
    family = "decode"
    rotated = "weight copies"  # what the rotation copies hold, for the memory skip's text
    description = "x[batch, in] · W[in, out] for one token per sequence (GEMV / skinny GEMM), weights rotated past the LLC"
    params = {
        "model": _model_param(),
        "proj": Param(default=PROJECTIONS, type=str, choices=PROJECTIONS, help="qkv, o, gate_up, down"),
        "batch": Param(default=(1, 8, 32, 128, 256), type=int, minimum=1),
        "dtype": _dtype_param(),
        "tp": _tp_param(),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        in_f, out_f = sharded_shape(params).projection(params["proj"])
        b, size = params["batch"], DTYPE_BYTES[params["dtype"]]
        flops, nbytes = linear_flops(b, in_f, out_f), linear_bytes(b, in_f, out_f, size)
        return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return _tp_skip(params) or gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)

    def device_bytes(self, params: dict, copies: int, nbytes: float) -> int:
        """Device memory the kernel needs for ``copies`` rotation copies (``nbytes``: the
        work model's bytes per repetition): the copies and an fp32 weight's worth."""
        in_f, out_f = sharded_shape(params).projection(params["proj"])
        return int(copies * nbytes + 4 * in_f * out_f)


def paged_kernel_skip(params: dict, device_info: dict) -> str | None:
    """Why decode.attention's ``kernel`` cannot apply to this case, or None.

    The contiguous layout runs fused SDPA only: a ``kernel`` other than ``default``
    there would be a second id for the same measurement. ``gather_sdpa`` and ``flex``
    are torch kernels; a device of another backend (``device_info["backend"]``) skips
    them. Parameters without ``kernel`` (results of older runs) mean ``default``."""
    kernel = params.get("kernel", "default")
    if kernel == "default":
        return None
    if params["layout"] != "paged":
        return (f"kernel={kernel} chooses the paged layout's kernel; the contiguous layout runs fused SDPA "
                "as kernel=default, the twin each paged kernel's layout penalty is paired with")
    backend = device_info.get("backend")
    if kernel in TORCH_ONLY_KERNELS and backend not in (None, "torch"):
        return (f"kernel={kernel} is a torch kernel; the {backend} backend reads the paged pool chunk by chunk "
                "(kernel=default or chunked)")
    return None


@register
class DecodeAttention(Probe):
    name = "decode.attention"
    family = "decode"
    rotated = "KV copies"
    description = "one query token per sequence against a KV cache of ctx tokens, contiguous or paged (16-token blocks)"
    params = {
        "model": _model_param(),
        "batch": Param(default=(1, 16, 64), type=int, minimum=1),
        "ctx": Param(default=(1024, 4096, 16384), type=int, minimum=BLOCK_TOKENS, help="tokens in the KV cache"),
        "layout": Param(default=("contiguous", "paged"), type=str, choices=("contiguous", "paged")),
        # Added after the first runs: "default" keeps their ids (Param.implicit).
        "kernel": Param(default=("default",), type=str, choices=PAGED_KERNELS, implicit="default",
                        help="paged layout's kernel: gather_sdpa (gather, then SDPA), chunked (online softmax "
                             "over block chunks), flex (FlexAttention in place through the block table); "
                             "default = gather_sdpa on CUDA, chunked elsewhere"),
        "dtype": _dtype_param(),
        "tp": _tp_param(),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        # The minimum traffic whatever the kernel: a kernel that moves more (gather_sdpa)
        # shows it as a lower fraction of the memory roofline, which is the finding.
        shape = sharded_shape(params)
        b, L, size = params["batch"], params["ctx"], DTYPE_BYTES[params["dtype"]]
        flops = attention_flops(b, 1, L, shape.num_heads, shape.head_dim, causal=False)
        # KV read once; the query read and the output written once.
        nbytes = kv_bytes(shape, b, L, params["dtype"]) + 2 * b * shape.q_dim * size
        return Work(flops=flops, bytes=float(nbytes), bound=_hint(flops, nbytes), dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        if params["layout"] == "paged" and params["ctx"] % BLOCK_TOKENS:
            return f"paged layout needs ctx divisible by the {BLOCK_TOKENS}-token block"
        return (paged_kernel_skip(params, device_info) or _tp_skip(params)
                or gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True))

    def device_bytes(self, params: dict, copies: int, nbytes: float) -> int:
        """Device memory the kernel needs for ``copies`` KV copies (``nbytes``: the work
        model's bytes per repetition), with room for the check's fp32 casts."""
        shape = sharded_shape(params)
        return int(copies * nbytes * 1.1 + 4 * kv_bytes(shape, params["batch"], params["ctx"], "fp32"))


@register
class DecodeLayer(Probe):
    name = "decode.layer"
    family = "decode"
    rotated = "copies of weights and KV"
    description = ("one Llama-style decoder layer (attention + SwiGLU MLP, or router + top-k experts for MoE "
                   "shapes) for one new token per sequence")
    params = {
        "model": _model_param(),
        "batch": Param(default=(1, 16, 64), type=int, minimum=1),
        "ctx": Param(default=(4096,), type=int, minimum=2, help="tokens in the KV cache, the new one included"),
        "dtype": _dtype_param(),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        shape = load_model(params["model"])
        b, L, size = params["batch"], params["ctx"], DTYPE_BYTES[params["dtype"]]
        # FLOPs: every token through attention, the router and its k experts. Bytes: the
        # weights a step reads (attention, router and the experts the b tokens touch,
        # expected under uniform routing; the whole layer when dense), once.
        flops = 2.0 * b * shape.layer_weight_elements()
        flops += attention_flops(b, 1, L, shape.num_heads, shape.head_dim, causal=False)
        weights = shape.weights_touched(b)
        # weights once, KV read once (ctx tokens), the new K/V written, x in and out.
        nbytes = (weights + 2 * shape.hidden_size) * size + kv_bytes(shape, b, L, params["dtype"])
        nbytes += b * (shape.kv_bytes_per_token_layer(size) + 2 * shape.hidden_size * size)
        return Work(flops=flops, bytes=float(nbytes), bound=_hint(flops, nbytes), dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)

    def device_bytes(self, params: dict, copies: int, nbytes: float) -> int:
        """Device memory the kernel needs for ``copies`` copies of the weights and KV
        (``nbytes``: the work model's bytes per repetition)."""
        shape = load_model(params["model"])
        # Each copy holds every expert, not only the ones a step touches (0 when dense).
        held = shape.stored_weight_elements() - shape.weights_touched(params["batch"])
        return int(copies * (nbytes + held * DTYPE_BYTES[params["dtype"]]) * 1.2)
