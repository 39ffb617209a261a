"""Torch kernels of the decode probes (specs in probes/decode.py): the rotating-copies
kernels of ``decode.projection``, ``decode.attention`` (contiguous SDPA; the paged
block pool gathered for SDPA, read chunk by chunk with an online softmax, or read in
place by FlexAttention through a block mask, as the case's ``kernel`` says) and
``decode.layer`` (one Llama-style decoder layer, dense or MoE), their float64
references, and one builder per probe. The layer pieces (``attention_reference``,
``rms_norm``, ``decoder_layer``) also serve the composite and model-ends kernels.

torch is imported inside the functions, never at module import.
"""

from __future__ import annotations

import math

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.decode import BLOCK_TOKENS, sharded_shape
from probes.models import load_model
from probes.native import native_path
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

# Kernels moving less than this per repetition are replayed from CUDA graphs on GPUs.
GRAPH_BELOW_BYTES = 64 * 2**20


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


def _build(probe, ctx: CaseContext, make, graphs: bool = True) -> Kernel:
    """The builders' common part: the spec's work model, enough copies to rotate past
    4× the LLC, skip unless the spec's ``device_bytes`` fit, then the kernel
    ``make(copies, native)`` with its dtype path recorded and, for a small kernel on
    CUDA (``graphs``), its copies captured in CUDA graphs."""
    work = probe.work(ctx.params, ctx.device_info)
    copies = rotation_count(int(work.bytes), ctx.device, ctx.host)
    require_memory(ctx.device, probe.device_bytes(ctx.params, copies, work.bytes),
                   f"{probe.name} ({copies} {probe.rotated})")
    path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
    built = make(copies, path.native)
    work = path.record(work, built.extra)
    if graphs:
        built.use_graphs(ctx.device, work.bytes)
    built.work, built.params = work, dict(ctx.params)
    return built


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


@kernel("decode.projection", "torch")
def build_decode_projection(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    in_f, out_f = sharded_shape(p).projection(p["proj"])
    return _build(probe, ctx, lambda copies, native: ProjectionKernel(p["batch"], in_f, out_f, p["dtype"], ctx.device,
                                                                      copies, native))


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


def paged_attention_gather_sdpa(q, k_pool, v_pool, block_table, gqa: bool, sdpa=None):
    """``kernel=gather_sdpa`` (the CUDA default): one gather of every block into a
    contiguous-per-token copy, then the fused SDPA kernel over it (``sdpa``: the
    fp32-upcast one of probes.native for an emulated dtype; torch's by default). Moves
    the KV three times (read the pool, write the copy, read the copy) instead of once,
    but in three large kernels; the chunked online softmax above is launch-bound on GPUs
    (hundreds of small kernels per step). Shapes as :func:`paged_attention`."""
    import torch.nn.functional as F

    b = q.shape[0]
    k = gather_blocks(k_pool, block_table, b)
    v = gather_blocks(v_pool, block_table, b)
    return (sdpa or F.scaled_dot_product_attention)(q, k, v, enable_gqa=gqa)


# FlexAttention's default query block (torch.nn.attention.flex_attention's
# _DEFAULT_SPARSE_BLOCK_SIZE); one decode token fits in one.
FLEX_Q_BLOCK = 128


def pool_as_sequence(pool):
    """A block pool [num_blocks, 16, KV, d] viewed, without a copy, as one sequence
    [1, KV, num_blocks·16, d] holding every token of the pool (strided: the last dim
    stays contiguous, which is all FlexAttention's kernels require). The block mask of
    :func:`paged_block_mask` picks each query row's blocks out of it."""
    n, t, kv, d = pool.shape
    return pool.view(1, n * t, kv, d).transpose(1, 2)


def paged_block_mask(table, pool_blocks: int):
    """The FlexAttention ``BlockMask`` that lets query row b attend to exactly the pool
    blocks ``table[b]`` (block_table [b, n], int, block ids in the pool of
    ``pool_blocks`` 16-token blocks) of :func:`pool_as_sequence`'s view.

    Each block is given as a *full* block (``full_kv_indices``), so no mask_mod runs
    per score; the partial-block lists are empty. The index tensors are padded to the
    pool's width because BlockMask densifies them with the index tensor's last dim as
    the column count, as torch's own PagedAttention.convert_logical_block_mask pads to
    n_pages (torch/nn/attention/experimental/_paged_attention.py). Softmax does not
    depend on the order of the keys, so the blocks need no logical reordering.
    Raises ImportError where torch has no FlexAttention (before 2.5)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    b, n = table.shape
    dev = table.device
    full = torch.zeros(b, 1, 1, pool_blocks, dtype=torch.int32, device=dev)
    full[:, 0, 0, :n] = table.to(torch.int32)
    full_num = torch.full((b, 1, 1), n, dtype=torch.int32, device=dev)
    empty_num = torch.zeros(b, 1, 1, dtype=torch.int32, device=dev)
    return BlockMask.from_kv_blocks(empty_num, torch.zeros_like(full), full_num, full,
                                    BLOCK_SIZE=(FLEX_Q_BLOCK, BLOCK_TOKENS),
                                    seq_lengths=(1, pool_blocks * BLOCK_TOKENS))


def compiled_flex_attention():
    """``flex_attention`` under ``torch.compile`` (fused Triton kernels on CUDA, the
    inductor C++ template on CPU; uncompiled it is a slow reference that materialises
    the scores). ``fullgraph=True``: a graph break or dynamo's recompile limit (one
    graph per shape, ``dynamic=False``) raises, failing the case with its reason,
    instead of silently running eager flex. Raises ProbeSkip where torch has no
    FlexAttention."""
    import torch

    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise ProbeSkip(f"kernel=flex needs torch.nn.attention.flex_attention (torch >= 2.5): {exc}") from None
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


# The paged kernel a ``kernel`` value runs, and the method name recorded in
# extra["paged_method"] (the first two are the names older runs recorded).
PAGED_METHODS = {"gather_sdpa": "gather_sdpa", "chunked": "chunked_online_softmax", "flex": "flex_attention"}
# How many times each method moves the KV across memory per step (the work model
# counts once): the gather reads the pool, writes the copy, SDPA reads the copy; a
# chunk of the online softmax is read from cache after its gather; flex reads in place.
KV_BYTES_MOVED = {"gather_sdpa": 3, "chunked": 1, "flex": 1}


def resolve_paged_kernel(kernel: str, device: str) -> str:
    """The paged kernel a case runs: ``kernel`` itself, or for ``default`` the one
    decode.attention ran on that device before the parameter existed (gather_sdpa on
    CUDA, where the chunked loop is launch-bound; chunked elsewhere), which keeps those
    cases' ids and meaning. Raises ValueError for a name not in PAGED_METHODS."""
    if kernel == "default":
        return "gather_sdpa" if str(device).startswith("cuda") else "chunked"
    if kernel not in PAGED_METHODS:
        raise ValueError(f"unknown paged kernel {kernel!r} (known: default, {', '.join(PAGED_METHODS)})")
    return kernel


class AttentionKernel(_RotatingKernel):
    """decode.attention: q [batch, H, 1, d] against ``copies`` KV caches, contiguous
    ([batch, KV, ctx, d] each, fused SDPA) or paged (one pool [copies·batch·ctx/16, 16,
    KV, d] per K and V, a block table [batch, ctx/16] per copy) read by the paged
    ``kernel`` (:func:`resolve_paged_kernel`; ignored for contiguous). ``native``: the
    dtype has CPU arithmetic (else SDPA runs upcast to fp32, probes.native)."""

    def __init__(self, shape, batch: int, ctx_len: int, layout: str, dtype: str, device: str, copies: int, host: dict,
                 native: bool = True, kernel: str = "default"):
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
            self.paged_kernel = resolve_paged_kernel(kernel, device)
            self.extra.update(block_tokens=BLOCK_TOKENS, pool_blocks=total, pool_layout="[blocks, 16, kv_heads, head_dim]",
                              paged_kernel=self.paged_kernel, paged_method=PAGED_METHODS[self.paged_kernel],
                              kv_bytes_moved_factor=KV_BYTES_MOVED[self.paged_kernel])
            if self.paged_kernel == "chunked":
                self.extra["chunk_blocks"] = self.chunk_blocks
            elif self.paged_kernel == "flex":
                self.flex = compiled_flex_attention()
                # Views of the pools and one block mask per copy, built once, untimed.
                self.k_seq, self.v_seq = pool_as_sequence(self.k_pool), pool_as_sequence(self.v_pool)
                self.masks = [paged_block_mask(t, total) for t in self.tables]
                self.extra["flex"] = "torch.compile(flex_attention), full blocks of the block table, in place"
        self.extra["rotation_copies"] = copies

    def step(self, i: int) -> None:
        if self.layout == "contiguous":
            # One query token attends to the whole cache: no causal mask (is_causal would
            # align top-left and let the token see only the first cache entry).
            self.out[i] = self.sdpa(self.q, self.k[i], self.v[i], enable_gqa=self.gqa)
        elif self.paged_kernel == "gather_sdpa":
            self.out[i] = paged_attention_gather_sdpa(self.q, self.k_pool, self.v_pool, self.tables[i], self.gqa,
                                                      self.sdpa)
        elif self.paged_kernel == "flex":
            self.out[i] = self.flex(self.q, self.k_seq, self.v_seq, block_mask=self.masks[i], enable_gqa=self.gqa)
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


@kernel("decode.attention", "torch")
def build_decode_attention(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    # Results and suites from before the kernel parameter have none: "default".
    return _build(probe, ctx, lambda copies, native: AttentionKernel(sharded_shape(p), p["batch"], p["ctx"], p["layout"],
                                                                     p["dtype"], ctx.device, copies, ctx.host, native,
                                                                     p.get("kernel", "default")))


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

    from probes.torch import moe

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
            from probes.torch.moe import RouteCheck

            route = RouteCheck(self.dtype, chosen=w.routing[:1])
            # What this copy's pass actually touched, all sequences (the work model's
            # experts_touched_model is the uniform-routing expectation).
            self.extra["experts_touched"] = int(w.routing.unique().numel())
        want = decoder_layer(self.x[:1].double(), w64, k64, v64, self.shape, matmul=mm64, route_check=route)
        if route is not None:
            route.note(self.extra)
        check_close(self.out[i][:1], want, self.dtype, "decoder layer", self.extra)


@kernel("decode.layer", "torch")
def build_decode_layer(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    shape = load_model(p["model"])
    # The MoE block reads its routing back to size the expert GEMMs: not capturable.
    return _build(probe, ctx, lambda copies, native: LayerKernel(shape, p["batch"], p["ctx"], p["dtype"], ctx.device,
                                                                 copies, native),
                  graphs=not shape.is_moe)
