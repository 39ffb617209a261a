"""Decode probes (memory-bound): what generating one token per sequence costs.

- ``decode.projection``: the linear layers of a model shape as GEMV / skinny GEMM,
  x[batch, in] · W[in, out], batch 1…256. The weights dominate the traffic.
- ``decode.attention``: one query token per sequence against a KV cache of ``ctx``
  tokens, in two layouts: ``contiguous`` (K, V as [batch, kv_heads, ctx, head_dim],
  one fused SDPA call) and ``paged`` (16-token blocks scattered through a block table
  in a shared pool [blocks, 16, kv_heads, head_dim], the way vLLM stores them; on CPU
  read chunk by chunk with an online softmax so each gathered chunk stays in cache and the KV is read
  from memory once).
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

import math

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, Param, Probe, Work, register
from probes.torch.common import (
    DTYPE_BYTES,
    CudaGraphRunner,
    check_close,
    cache_bytes,
    matmul_for,
    require_memory,
    rotation_count,
    sdpa_backend,
    sdpa_for,
    torch_dtype,
)
from probes.gemm import gemm_skip_reason
from probes.native import native_path
from probes.models import PROJECTIONS, attention_flops, linear_bytes, linear_flops, load_model, model_names

BLOCK_TOKENS = 16
# Where the device ridge is unknown (CPU memory bandwidth has no nominal), cases below
# this arithmetic intensity are called memory-bound: server CPUs' ridges are ~10-30 FLOP/B.
FALLBACK_RIDGE = 16.0
# Kernels moving less than this per repetition are replayed from CUDA graphs on GPUs.
GRAPH_BELOW_BYTES = 64 * 2**20


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


class _RotatingKernel(Kernel):
    """Cycles through ``copies`` independent buffers, one per repetition (untimed
    switch), optionally replaying each copy's work from its own CUDA graph."""

    copies: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.index = 0
        self._graphs = None

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def step(self, i: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self) -> None:
        if self._graphs is not None:
            self._graphs[self.index]()
        else:
            self.step(self.index)

    def use_graphs(self, device: str, nbytes: float) -> None:
        if device.startswith("cuda") and nbytes < GRAPH_BELOW_BYTES:
            self._graphs = [CudaGraphRunner(lambda i=i: self.step(i), device) for i in range(self.copies)]
            self.extra["cuda_graph"] = True


# -- projections -------------------------------------------------------------------------
class ProjectionKernel(_RotatingKernel):
    def __init__(self, batch: int, in_f: int, out_f: int, dtype: str, device: str, copies: int, native: bool = True):
        super().__init__()
        import torch

        # A dtype the CPU has no arithmetic for is multiplied through fp32 (probes.native).
        self.matmul = matmul_for(native)

        dt = torch_dtype(dtype)
        gen = torch.Generator(device=device).manual_seed(7)
        self.copies, self.dtype, self.device = copies, dtype, device
        self.x = torch.randn(batch, in_f, device=device, generator=gen).to(dt)
        self.w = [(torch.randn(in_f, out_f, device=device, generator=gen) / math.sqrt(in_f)).to(dt) for _ in range(copies)]
        self.y = [torch.empty(batch, out_f, device=device, dtype=dt) for _ in range(copies)]
        self.extra = {"rotation_copies": copies, "weight_bytes": in_f * out_f * DTYPE_BYTES[dtype]}

    def step(self, i: int) -> None:
        self.matmul(self.x, self.w[i], out=self.y[i])

    def check(self) -> None:
        import torch

        out_f = self.w[0].shape[1]
        cols = torch.randperm(out_f, generator=torch.Generator().manual_seed(5))[:512].to(self.device)
        for i in {0, self.index}:
            want = self.x.double() @ self.w[i][:, cols].double()
            check_close(self.y[i][:, cols], want, self.dtype, f"projection copy {i}", self.extra)


@register
class DecodeProjection(Probe):
    name = "decode.projection"
    family = "decode"
    backends = ("torch", "jax")
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

    def prepare(self, ctx: CaseContext) -> Kernel:
        if ctx.backend == "jax":
            from probes.jax.decode import build_decode_projection

            return build_decode_projection(self, ctx)
        if reason := self.skip_reason(ctx.params, ctx.device_info, ctx.host):
            raise ProbeSkip(reason)
        in_f, out_f = sharded_shape(ctx.params).projection(ctx.params["proj"])
        work = self.work(ctx.params, ctx.device_info)
        copies = rotation_count(int(work.bytes), ctx.device, ctx.host)
        require_memory(ctx.device, int(copies * work.bytes + 4 * in_f * out_f), f"{self.name} ({copies} weight copies)")
        path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
        kernel = ProjectionKernel(ctx.params["batch"], in_f, out_f, ctx.params["dtype"], ctx.device, copies, path.native)
        work = path.record(work, kernel.extra)
        kernel.use_graphs(ctx.device, work.bytes)
        kernel.work, kernel.params = work, dict(ctx.params)
        return kernel


# -- attention ---------------------------------------------------------------------------
def attention_reference(q, k, v):
    """float64 attention of one query token per sequence: q [b, H, 1, d] against
    k, v [b, KV, L, d]; GQA by repeating each KV head for its group of query heads."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v64


def gather_blocks(pool, ids, b: int):
    """The blocks ``ids`` [b, n] of a pool [num_blocks, 16, KV, d] in token order, as a
    strided [b, KV, n·16, d] view of one gathered copy (no second permuting copy)."""
    import torch

    n = ids.shape[1]
    g = torch.index_select(pool, 0, ids.reshape(-1))  # [b*n, 16, KV, d]
    return g.view(b, n * pool.shape[1], pool.shape[2], pool.shape[3]).transpose(1, 2)


def paged_attention(q, k_pool, v_pool, block_table, chunk_blocks: int):
    """Attention of one query token per sequence over KV stored in scattered blocks.

    q [b, H, 1, d]; k_pool, v_pool [num_blocks, 16, KV, d] (vLLM's block layout for its
    flash-attention backend); block_table [b, n_blocks] (block ids in token order).
    Blocks are gathered ``chunk_blocks`` at a time and combined with an online (running
    max, running sum) softmax, so no full-length contiguous copy of the cache is made."""
    import torch

    b, heads, _, d = q.shape
    kv_heads = k_pool.shape[2]
    group = heads // kv_heads
    qg = q.reshape(b, kv_heads, group, d).float() if q.dtype != torch.float64 else q.reshape(b, kv_heads, group, d)
    scale = 1.0 / math.sqrt(d)
    run_max = run_sum = acc = None
    for start in range(0, block_table.shape[1], chunk_blocks):
        ids = block_table[:, start : start + chunk_blocks]
        # index_select, not advanced indexing: the same gather, several times faster on CPU.
        k = gather_blocks(k_pool, ids, b).to(qg.dtype)  # [b, KV, C*16, d]
        v = gather_blocks(v_pool, ids, b).to(qg.dtype)
        s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [b, KV, g, T]
        m = s.amax(dim=-1, keepdim=True)
        if run_max is None:
            p = torch.exp(s - m)
            run_max, run_sum, acc = m, p.sum(-1, keepdim=True), torch.matmul(p, v)
        else:
            new_max = torch.maximum(run_max, m)
            old = torch.exp(run_max - new_max)
            p = torch.exp(s - new_max)
            run_sum = run_sum * old + p.sum(-1, keepdim=True)
            acc = acc * old + torch.matmul(p, v)
            run_max = new_max
    return (acc / run_sum).reshape(b, heads, 1, d).to(q.dtype)


def paged_attention_gather_sdpa(q, k_pool, v_pool, block_table, gqa: bool):
    """The GPU method: one gather of every block into a contiguous-per-token copy, then
    the fused SDPA kernel over it. Moves the KV three times (read the pool, write the
    copy, read the copy) instead of once, but in three large kernels; the chunked online
    softmax above is launch-bound on GPUs (hundreds of small kernels per step)."""
    import torch.nn.functional as F

    b = q.shape[0]
    k = gather_blocks(k_pool, block_table, b)
    v = gather_blocks(v_pool, block_table, b)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


class AttentionKernel(_RotatingKernel):
    def __init__(self, shape, batch: int, ctx_len: int, layout: str, dtype: str, device: str, copies: int, host: dict,
                 native: bool = True):
        super().__init__()
        import torch

        # A dtype the CPU has no arithmetic for is computed in fp32 (probes.native); the
        # paged path below already computes every chunk in fp32.
        self.sdpa = sdpa_for(native)

        dt = torch_dtype(dtype)
        gen = torch.Generator(device=device).manual_seed(11)
        self.copies, self.dtype, self.device, self.layout = copies, dtype, device, layout
        self.gqa = shape.num_heads != shape.num_kv_heads
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.q = torch.randn(batch, h, 1, d, device=device, generator=gen).to(dt)
        self.out = [None] * copies
        if layout == "contiguous":
            self.k = [torch.randn(batch, kv, ctx_len, d, device=device, generator=gen).to(dt) for _ in range(copies)]
            self.v = [torch.randn(batch, kv, ctx_len, d, device=device, generator=gen).to(dt) for _ in range(copies)]
            self.extra["sdpa_backend"] = sdpa_backend(self.q, self.k[0], self.v[0], False, self.gqa)
        else:
            n_blocks = ctx_len // BLOCK_TOKENS
            total = copies * batch * n_blocks
            self.k_pool = torch.randn(total, BLOCK_TOKENS, kv, d, device=device, generator=gen).to(dt)
            self.v_pool = torch.randn(total, BLOCK_TOKENS, kv, d, device=device, generator=gen).to(dt)
            # Every sequence of every copy owns n_blocks blocks at random places in the pool.
            perm = torch.randperm(total, generator=torch.Generator().manual_seed(13)).to(device)
            self.tables = [perm[c * batch * n_blocks : (c + 1) * batch * n_blocks].reshape(batch, n_blocks) for c in range(copies)]
            chunk_bytes = 2 * batch * kv * BLOCK_TOKENS * d * DTYPE_BYTES[dtype]
            # A gathered chunk of a quarter of the LLC (L2 on GPUs) stays in cache while it
            # is used, so the KV crosses the memory bus once.
            target = max(2**20, (cache_bytes(device, host) or 4 * 2**20) // 4)
            self.chunk_blocks = max(1, min(n_blocks, target // max(1, chunk_bytes)))
            self.paged_method = "gather_sdpa" if str(device).startswith("cuda") else "chunked_online_softmax"
            self.extra.update(block_tokens=BLOCK_TOKENS, pool_blocks=total, pool_layout="[blocks, 16, kv_heads, head_dim]",
                              paged_method=self.paged_method)
            if self.paged_method == "gather_sdpa":
                # Actual traffic is ~3x the work model's minimum bytes (see the method).
                self.extra["kv_bytes_moved_factor"] = 3
            else:
                self.extra["chunk_blocks"] = self.chunk_blocks
        self.extra["rotation_copies"] = copies

    def step(self, i: int) -> None:
        if self.layout == "contiguous":
            # One query token attends to the whole cache: no causal mask (is_causal would
            # align top-left and let the token see only the first cache entry).
            self.out[i] = self.sdpa(self.q, self.k[i], self.v[i], enable_gqa=self.gqa)
        elif self.paged_method == "gather_sdpa":
            self.out[i] = paged_attention_gather_sdpa(self.q, self.k_pool, self.v_pool, self.tables[i], self.gqa)
        else:
            self.out[i] = paged_attention(self.q, self.k_pool, self.v_pool, self.tables[i], self.chunk_blocks)

    def kv_of(self, i: int, seq: int):
        """The K and V a sequence sees, in token order: [1, KV, L, d]."""
        if self.layout == "contiguous":
            return self.k[i][seq : seq + 1], self.v[i][seq : seq + 1]
        ids = self.tables[i][seq : seq + 1]
        return gather_blocks(self.k_pool, ids, 1), gather_blocks(self.v_pool, ids, 1)

    def check(self) -> None:
        """Sequence 0 (and the last) of the copy just run against float64."""
        i = self.index
        for seq in {0, self.q.shape[0] - 1}:
            k, v = self.kv_of(i, seq)
            want = attention_reference(self.q[seq : seq + 1], k, v)
            check_close(self.out[i][seq : seq + 1], want, self.dtype, f"{self.layout} attention, sequence {seq}", self.extra)


def kv_bytes(shape, batch: int, ctx_len: int, dtype: str) -> int:
    """KV cache of one layer: batch · 2 · kv_heads · head_dim · ctx · dtype bytes."""
    return batch * shape.kv_bytes_per_token_layer(DTYPE_BYTES[dtype]) * ctx_len


@register
class DecodeAttention(Probe):
    name = "decode.attention"
    family = "decode"
    backends = ("torch", "jax")
    description = "one query token per sequence against a KV cache of ctx tokens, contiguous or paged (16-token blocks)"
    params = {
        "model": _model_param(),
        "batch": Param(default=(1, 16, 64), type=int, minimum=1),
        "ctx": Param(default=(1024, 4096, 16384), type=int, minimum=BLOCK_TOKENS, help="tokens in the KV cache"),
        "layout": Param(default=("contiguous", "paged"), type=str, choices=("contiguous", "paged")),
        "dtype": _dtype_param(),
        "tp": _tp_param(),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        shape = sharded_shape(params)
        b, L, size = params["batch"], params["ctx"], DTYPE_BYTES[params["dtype"]]
        flops = attention_flops(b, 1, L, shape.num_heads, shape.head_dim, causal=False)
        # KV read once; the query read and the output written once.
        nbytes = kv_bytes(shape, b, L, params["dtype"]) + 2 * b * shape.q_dim * size
        return Work(flops=flops, bytes=float(nbytes), bound=_hint(flops, nbytes), dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        if params["layout"] == "paged" and params["ctx"] % BLOCK_TOKENS:
            return f"paged layout needs ctx divisible by the {BLOCK_TOKENS}-token block"
        return _tp_skip(params) or gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)

    def prepare(self, ctx: CaseContext) -> Kernel:
        if ctx.backend == "jax":
            from probes.jax.decode import build_decode_attention

            return build_decode_attention(self, ctx)
        if reason := self.skip_reason(ctx.params, ctx.device_info, ctx.host):
            raise ProbeSkip(reason)
        shape = sharded_shape(ctx.params)
        work = self.work(ctx.params, ctx.device_info)
        copies = rotation_count(int(work.bytes), ctx.device, ctx.host)
        require_memory(ctx.device, int(copies * work.bytes * 1.1 + 4 * kv_bytes(shape, ctx.params["batch"], ctx.params["ctx"], "fp32")),
                       f"{self.name} ({copies} KV copies)")
        p = ctx.params
        path = native_path(p["dtype"], ctx.device_info, ctx.host)
        kernel = AttentionKernel(shape, p["batch"], p["ctx"], p["layout"], p["dtype"], ctx.device, copies, ctx.host, path.native)
        work = path.record(work, kernel.extra)
        kernel.use_graphs(ctx.device, work.bytes)
        kernel.work, kernel.params = work, dict(p)
        return kernel


# -- a whole decoder layer ----------------------------------------------------------------
def rms_norm(x, weight, eps: float = 1e-5):
    import torch

    x32 = x.float() if x.dtype != torch.float64 else x
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(normed.dtype)).to(x.dtype)


class LayerWeights:
    """One layer's weights [in, out]. Dense: gate_up [hidden, 2·inter], down [inter,
    hidden], router None. MoE (probes/moe.py): router [hidden, E], gate_up [E, hidden,
    2·inter], down [E, inter, hidden]; ``routing`` holds the expert ids [b, k] the last
    forward pass chose (for the reference check)."""

    router = None
    routing = None

    def __init__(self, shape, dtype, device, gen):
        import torch

        h = shape.hidden_size

        def w(in_f, out_f, *lead):
            return (torch.randn(*lead, in_f, out_f, device=device, generator=gen) / math.sqrt(in_f)).to(dtype)

        self.qkv = w(*shape.projection("qkv"))
        self.o = w(*shape.projection("o"))
        if shape.is_moe:
            self.router = w(*shape.projection("router"))
            self.gate_up = w(*shape.projection("gate_up"), shape.num_experts)
            self.down = w(*shape.projection("down"), shape.num_experts)
        else:
            self.gate_up = w(*shape.projection("gate_up"))
            self.down = w(*shape.projection("down"))
        self.norm1 = (1.0 + 0.1 * torch.randn(h, device=device, generator=gen)).to(dtype)
        self.norm2 = (1.0 + 0.1 * torch.randn(h, device=device, generator=gen)).to(dtype)


def mlp_block(x, w, shape, matmul=None, route_check=None):
    """The layer's MLP on x [T, hidden] (already normed): the dense SwiGLU, or for an
    MoE shape the router and its chosen experts (probes/moe.py). float64 input takes
    the reference path (routing re-derived in float64, judged by ``route_check``);
    otherwise the experts chosen are left in ``w.routing``. ``w`` needs gate_up, down
    and, for MoE, router."""
    import torch
    import torch.nn.functional as F

    from probes import moe

    mm = matmul or torch.matmul
    if getattr(w, "router", None) is None:
        gate, up = mm(x, w.gate_up).chunk(2, dim=-1)
        return mm(F.silu(gate) * up, w.down)
    if x.dtype == torch.float64:
        return moe.moe_reference(x, w.router, w.gate_up, w.down, shape.experts_per_token, route_check,
                                 matmul64=matmul)
    y, w.routing = moe.moe_forward(x, w.router, w.gate_up, w.down, shape.experts_per_token, matmul)
    return y


def decoder_layer(x, w: LayerWeights, k_cache, v_cache, shape, matmul=None, route_check=None, sdpa=None):
    """One decode step of a Llama-style layer for x [b, hidden]; the new token's K and V
    go to the last cache slot (ctx - 1) and the query attends to all ctx slots. The MLP
    is ``mlp_block`` (dense or MoE; ``route_check`` judges a float64 pass's routing).
    ``matmul``/``sdpa`` replace torch's (the fp32-upcast ones of probes.native)."""
    import torch
    import torch.nn.functional as F

    mm = matmul or torch.matmul
    attend = sdpa or F.scaled_dot_product_attention
    b = x.shape[0]
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = mm(rms_norm(x, w.norm1), w.qkv)
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    k_cache[:, :, -1, :] = k.reshape(b, kv, d)
    v_cache[:, :, -1, :] = v.reshape(b, kv, d)
    q = q.reshape(b, h, 1, d)
    if x.dtype == torch.float64:
        attn = attention_reference(q, k_cache, v_cache)
    else:
        attn = attend(q, k_cache, v_cache, enable_gqa=h != kv)
    x = x + mm(attn.reshape(b, h * d), w.o)
    return x + mlp_block(rms_norm(x, w.norm2), w, shape, matmul, route_check)


class LayerKernel(_RotatingKernel):
    def __init__(self, shape, batch: int, ctx_len: int, dtype: str, device: str, copies: int, native: bool = True):
        super().__init__()
        import torch

        # A dtype the CPU has no arithmetic for is computed in fp32 (probes.native).
        self.matmul, self.sdpa = matmul_for(native), sdpa_for(native)

        dt = torch_dtype(dtype)
        gen = torch.Generator(device=device).manual_seed(17)
        self.shape, self.copies, self.dtype, self.device = shape, copies, dtype, device
        kv, d = shape.num_kv_heads, shape.head_dim
        self.x = torch.randn(batch, shape.hidden_size, device=device, generator=gen).to(dt)
        self.weights = [LayerWeights(shape, dt, device, gen) for _ in range(copies)]
        self.k = [torch.randn(batch, kv, ctx_len, d, device=device, generator=gen).to(dt) for _ in range(copies)]
        self.v = [torch.randn(batch, kv, ctx_len, d, device=device, generator=gen).to(dt) for _ in range(copies)]
        self.out = [None] * copies
        self.extra = {"rotation_copies": copies, "rotary": "omitted (elementwise, no memory traffic of note)"}
        if shape.is_moe:
            self.extra.update(num_experts=shape.num_experts, experts_per_token=shape.experts_per_token,
                              experts_touched_model=shape.experts_touched(batch))

    def step(self, i: int) -> None:
        self.out[i] = decoder_layer(self.x, self.weights[i], self.k[i], self.v[i], self.shape,
                                    matmul=self.matmul, sdpa=self.sdpa)

    def check(self) -> None:
        """Sequence 0 of the copy just run, recomputed in float64 (the weights cast a
        column block at a time to keep the reference's memory bounded)."""
        import torch

        i = self.index
        w = self.weights[i]

        def mm64(a, weight):
            return torch.cat([a @ weight[:, j : j + 4096].double() for j in range(0, weight.shape[1], 4096)], dim=-1)

        w64 = LayerWeights.__new__(LayerWeights)
        w64.qkv, w64.o, w64.gate_up, w64.down, w64.router = w.qkv, w.o, w.gate_up, w.down, w.router
        w64.norm1, w64.norm2 = w.norm1.double(), w.norm2.double()
        k64 = self.k[i][:1].double().clone()
        v64 = self.v[i][:1].double().clone()
        route = None
        if self.shape.is_moe:
            from probes.moe import RouteCheck

            route = RouteCheck(self.dtype, chosen=w.routing[:1])
            # What this copy's pass actually touched, all sequences (the work model's
            # experts_touched_model is the uniform-routing expectation).
            self.extra["experts_touched"] = int(w.routing.unique().numel())
        want = decoder_layer(self.x[:1].double(), w64, k64, v64, self.shape, matmul=mm64, route_check=route)
        if route is not None:
            route.note(self.extra)
        check_close(self.out[i][:1], want, self.dtype, "decoder layer", self.extra)


@register
class DecodeLayer(Probe):
    name = "decode.layer"
    family = "decode"
    backends = ("torch", "jax")
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

    def prepare(self, ctx: CaseContext) -> Kernel:
        shape = load_model(ctx.params["model"])
        if ctx.backend == "jax":
            if shape.is_moe:
                raise ProbeSkip(f"{shape.name}: the MoE layer (data-dependent routing, grouped expert GEMMs) "
                                "runs on the torch backend only")
            from probes.jax.decode import build_decode_layer

            return build_decode_layer(self, ctx)
        if reason := self.skip_reason(ctx.params, ctx.device_info, ctx.host):
            raise ProbeSkip(reason)
        work = self.work(ctx.params, ctx.device_info)
        copies = rotation_count(int(work.bytes), ctx.device, ctx.host)
        p = ctx.params
        # Each copy holds every expert, not only the ones a step touches.
        held = (shape.stored_weight_elements() - shape.weights_touched(p["batch"])) * DTYPE_BYTES[p["dtype"]]
        require_memory(ctx.device, int(copies * (work.bytes + held) * 1.2), f"{self.name} ({copies} copies of weights and KV)")
        path = native_path(p["dtype"], ctx.device_info, ctx.host)
        kernel = LayerKernel(shape, p["batch"], p["ctx"], p["dtype"], ctx.device, copies, path.native)
        work = path.record(work, kernel.extra)
        if not shape.is_moe:
            # The MoE block reads its routing back to size the expert GEMMs: not capturable.
            kernel.use_graphs(ctx.device, work.bytes)
        kernel.work, kernel.params = work, dict(p)
        return kernel
