"""The torch kernels of the prefill probes (their spec, work models and checks:
probes/prefill.py): projection, causal attention, SwiGLU or MoE MLP and one decoder
layer, the float64 references they are checked against (also used by the composite
probes), and the kernel builder ``build_prefill``, registered for all four.
"""

from __future__ import annotations

import math

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, Work, kernel
from probes.models import PROJECTIONS, load_model
from probes.native import NativePath, native_path
from probes.prefill import (
    CHECK_COLS,
    CHECK_LAYER_ROWS,
    CHECK_QUERIES,
    CHECK_ROWS,
    GRAPH_BELOW_S,
    GRAPH_RATE_GUESS,
    RMS_EPS,
    math_workspace_bytes,
)
from probes.torch.common import (
    matmul64,
    DTYPE_BYTES,
    CudaGraphRunner,
    check_close,
    matmul_for,
    require_memory,
    sdpa_backend,
    sdpa_for,
    torch_dtype,
)
from probes.torch.moe import RouteCheck, moe_forward, moe_reference


# -- float64 references ------------------------------------------------------------------
def rms_norm(x, weight, eps: float = RMS_EPS):
    """RMSNorm over the last dim, computed in fp32 (float64 for float64 input)."""
    import torch

    x32 = x if x.dtype == torch.float64 else x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(normed.dtype)).to(x.dtype)


def causal_attention_reference(q, k, v, positions, head_ids, group: int):
    """float64 causal attention for selected query heads and positions of one sequence.

    q [len(head_ids), R, d]: the queries of heads ``head_ids`` at token ``positions``
    (R of them); k, v [kv_heads, s, d]: every token's keys and values. Query head h
    reads KV head h // group (GQA by repeating each KV head for its group, the order
    torch's ``enable_gqa`` uses). Returns [len(head_ids), R, d]:
    softmax(q·kᵀ/√d + M)·v with M = -inf where the key's position is after the query's.
    """
    import torch

    d, s = q.shape[-1], k.shape[-2]
    positions = positions.to(q.device)
    keys = torch.arange(s, device=q.device)
    mask = torch.zeros(positions.numel(), s, dtype=torch.float64, device=q.device)
    mask.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))
    out = []
    for i, h in enumerate(head_ids):
        kv = int(h) // group
        scores = q[i].double() @ k[kv].double().transpose(0, 1) / math.sqrt(d) + mask
        out.append(scores.softmax(dim=-1) @ v[kv].double())
    return torch.stack(out)


def sample(n: int, count: int, seed: int, include=()):
    """``count`` distinct indices below n (all of them if n <= count), with ``include``."""
    import torch

    if n <= count:
        return torch.arange(n)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    keep = [i for i in include if 0 <= i < n]
    rest = [i for i in picked if i not in keep][: count - len(keep)]
    return torch.tensor(sorted(keep + rest))


# -- kernels -----------------------------------------------------------------------------
class _PrefillKernel(Kernel):
    """Common parts: random inputs in the case's dtype, an optional CUDA graph around
    ``step``, the float64 comparison."""

    def __init__(self, dtype: str, device: str, seed: int):
        super().__init__()
        import torch

        self.dtype, self.device = dtype, device
        self._dt = torch_dtype(dtype)
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._graph = None
        self.use_path(native_path(dtype, {}, {}))
        if device.startswith("cuda"):
            self.extra["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        self.extra["float32_matmul_precision"] = torch.get_float32_matmul_precision()

    def use_path(self, path: NativePath) -> None:
        """Compute through ``path`` (probes.native): torch's own matmul and SDPA for a
        native dtype, the fp32-upcast ones for a dtype the CPU has no arithmetic for."""
        self.matmul, self.sdpa = matmul_for(path.native), sdpa_for(path.native)

    def randn(self, *size: int, scale: float = 1.0):
        """N(0, scale²) drawn directly in the case's dtype (no fp32 staging copy)."""
        import torch

        t = torch.randn(*size, device=self.device, dtype=self._dt, generator=self._gen)
        return t.mul_(scale) if scale != 1.0 else t

    def step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self) -> None:
        if self._graph is not None:
            self._graph()
        else:
            self.step()

    def maybe_graph(self, work: Work) -> None:
        if getattr(getattr(self, "shape", None), "is_moe", False):
            return  # the MoE block reads its routing back to size the expert GEMMs: not capturable
        if self.device.startswith("cuda") and work.flops / GRAPH_RATE_GUESS[self.dtype] < GRAPH_BELOW_S:
            self._graph = CudaGraphRunner(self.step, self.device)
            self.extra["cuda_graph"] = True

    def verify(self, what: str, got, want) -> None:
        check_close(got, want, self.dtype, what, self.extra)

    def close(self) -> None:
        self._graph = None
        for name in list(vars(self)):
            if name not in ("extra", "work", "params", "dtype", "device"):
                setattr(self, name, None)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class ProjectionKernel(_PrefillKernel):
    def __init__(self, tokens: int, in_f: int, out_f: int, dtype: str, device: str):
        super().__init__(dtype, device, seed=101)
        import torch

        self.x = self.randn(tokens, in_f)
        self.w = self.randn(in_f, out_f, scale=1.0 / math.sqrt(in_f))
        self.y = torch.empty(tokens, out_f, device=device, dtype=self._dt)

    def step(self) -> None:
        self.matmul(self.x, self.w, out=self.y)

    def check(self) -> None:
        m, n = self.y.shape
        rows = sample(m, CHECK_ROWS, 99).to(self.device)
        cols = sample(n, CHECK_COLS, 98).to(self.device)
        want = self.x[rows].double() @ self.w[:, cols].double()
        self.verify("projection", self.y[rows][:, cols], want)


class AttentionKernel(_PrefillKernel):
    def __init__(self, shape, batch: int, seq: int, dtype: str, device: str):
        super().__init__(dtype, device, seed=202)
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.group = h // kv
        self.gqa = h != kv
        self.q = self.randn(batch, h, seq, d)
        self.k = self.randn(batch, kv, seq, d)
        self.v = self.randn(batch, kv, seq, d)
        self.out = None
        self.extra["sdpa_backend"] = sdpa_backend(self.q, self.k, self.v, True, self.gqa)
        self.extra["enable_gqa"] = self.gqa

    def step(self) -> None:
        self.out = self.sdpa(self.q, self.k, self.v, is_causal=True, enable_gqa=self.gqa)

    def check(self) -> None:
        # Heads 0 and 1 read the same KV head under GQA (h // group) but different ones
        # if a kernel tiled the KV heads (h % kv_heads); the last head reads the last KV head.
        heads = sorted({0, min(1, self.q.shape[1] - 1), self.q.shape[1] - 1})
        seq = self.q.shape[2]
        pos = sample(seq, CHECK_QUERIES, 97, include=(0, seq - 1)).to(self.device)
        q = self.q[0, heads][:, pos]
        want = causal_attention_reference(q, self.k[0], self.v[0], pos, heads, self.group)
        self.verify("causal attention (batch 0, heads " + ",".join(map(str, heads)) + ")", self.out[0, heads][:, pos], want)


class MlpKernel(_PrefillKernel):
    def __init__(self, shape, tokens: int, dtype: str, device: str):
        super().__init__(dtype, device, seed=303)
        import torch

        hid, inter = shape.hidden_size, shape.intermediate_size
        self.x = self.randn(tokens, hid)
        self.w_gate_up = self.randn(hid, 2 * inter, scale=1.0 / math.sqrt(hid))
        self.w_down = self.randn(inter, hid, scale=1.0 / math.sqrt(inter))
        self.gate_up = torch.empty(tokens, 2 * inter, device=device, dtype=self._dt)
        self.act = torch.empty(tokens, inter, device=device, dtype=self._dt)
        self.y = torch.empty(tokens, hid, device=device, dtype=self._dt)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        self.matmul(self.x, self.w_gate_up, out=self.gate_up)
        gate, up = self.gate_up.chunk(2, dim=-1)
        F.silu(gate, inplace=True)
        torch.mul(gate, up, out=self.act)
        self.matmul(self.act, self.w_down, out=self.y)

    def check(self) -> None:
        import torch.nn.functional as F

        m, n = self.y.shape
        rows = sample(m, CHECK_ROWS, 96).to(self.device)
        cols = sample(n, CHECK_COLS, 95).to(self.device)
        gate, up = matmul64(self.x[rows].double(), self.w_gate_up).chunk(2, dim=-1)
        want = (F.silu(gate) * up) @ self.w_down[:, cols].double()
        self.verify("SwiGLU MLP", self.y[rows][:, cols], want)


class MoeMlpKernel(_PrefillKernel):
    """The MoE MLP of an MoE shape on [batch·seq, hidden] (probes/moe.py, probes/torch/moe.py): router,
    top-k, grouped expert GEMMs, gate-weighted sum."""

    def __init__(self, shape, tokens: int, dtype: str, device: str):
        super().__init__(dtype, device, seed=303)
        self.shape = shape
        self.x = self.randn(tokens, shape.hidden_size)
        self.w = MoeWeights(shape, self)
        self.y = None
        self.extra.update(num_experts=shape.num_experts, experts_per_token=shape.experts_per_token,
                          experts_touched_model=shape.experts_touched(tokens))

    def step(self) -> None:
        self.y, self.w.routing = moe_forward(self.x, self.w.router, self.w.gate_up, self.w.down,
                                             self.shape.experts_per_token, self.matmul)

    def check(self) -> None:
        """32 sampled rows, all columns, routing re-derived in float64."""
        rows = sample(self.y.shape[0], CHECK_ROWS, 96).to(self.device)
        route = RouteCheck(self.dtype, chosen=self.w.routing[rows])
        self.extra["experts_touched"] = int(self.w.routing.unique().numel())
        want = moe_reference(self.x[rows].double(), self.w.router, self.w.gate_up, self.w.down,
                             self.shape.experts_per_token, route)
        route.note(self.extra)
        self.verify("MoE MLP", self.y[rows], want)


class MoeWeights:
    """An MoE MLP's weights: router [hidden, E], gate_up [E, hidden, 2·inter], down
    [E, inter, hidden]; ``routing``: the expert ids [T, k] of the last pass."""

    routing = None

    def __init__(self, shape, kernel: _PrefillKernel):
        h, f, e = shape.hidden_size, shape.intermediate_size, shape.num_experts
        self.router = kernel.randn(h, e, scale=1.0 / math.sqrt(h))
        self.gate_up = kernel.randn(e, h, 2 * f, scale=1.0 / math.sqrt(h))
        self.down = kernel.randn(e, f, h, scale=1.0 / math.sqrt(f))


class LayerWeights:
    """One layer's weights; for an MoE shape gate_up/down are per expert and
    ``router`` is set (``MoeWeights``), else ``router`` is None."""

    router = None
    routing = None

    def __init__(self, shape, kernel: _PrefillKernel):
        def w(proj):
            in_f, out_f = shape.projection(proj)
            return kernel.randn(in_f, out_f, scale=1.0 / math.sqrt(in_f))

        if shape.is_moe:
            self.qkv, self.o = w("qkv"), w("o")
            moe = MoeWeights(shape, kernel)
            self.router, self.gate_up, self.down = moe.router, moe.gate_up, moe.down
        else:
            self.qkv, self.o, self.gate_up, self.down = (w(p) for p in PROJECTIONS)
        h = shape.hidden_size
        self.norm1 = kernel.randn(h, scale=0.1).add_(1.0)
        self.norm2 = kernel.randn(h, scale=0.1).add_(1.0)


def split_qkv(qkv, shape):
    """Fused QKV output [b, s, (H + 2·KV)·d] → q [b, H, s, d], k and v [b, KV, s, d]
    (strided views, head dim contiguous)."""
    b, s, _ = qkv.shape
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    return (
        q.view(b, s, h, d).transpose(1, 2),
        k.view(b, s, kv, d).transpose(1, 2),
        v.view(b, s, kv, d).transpose(1, 2),
    )


def prefill_layer(x, w: LayerWeights, shape, matmul=None, sdpa=None):
    """One Llama-style decoder layer at prefill for x [b, s, hidden] (no rotary).
    ``matmul``/``sdpa`` replace torch's (the fp32-upcast ones of probes.native)."""
    import torch
    import torch.nn.functional as F

    mm = matmul or torch.matmul
    attend = sdpa or F.scaled_dot_product_attention
    b, s, _ = x.shape
    q, k, v = split_qkv(mm(rms_norm(x, w.norm1), w.qkv), shape)
    attn = attend(q, k, v, is_causal=True, enable_gqa=shape.num_heads != shape.num_kv_heads)
    x = x + mm(attn.transpose(1, 2).reshape(b, s, shape.q_dim), w.o)
    normed = rms_norm(x, w.norm2)
    if getattr(w, "router", None) is not None:
        y, w.routing = moe_forward(normed.reshape(b * s, -1), w.router, w.gate_up, w.down, shape.experts_per_token, mm)
        return x + y.view(b, s, -1)
    gate, up = mm(normed, w.gate_up).chunk(2, dim=-1)
    return x + mm(F.silu(gate) * up, w.down)


def mlp_reference(x64, w, shape, route_check=None):
    """float64 MLP of x64 [R, hidden] (already normed): the dense SwiGLU, or the MoE
    block with the routing re-derived in float64 (probes.torch.moe.moe_reference, judged by
    ``route_check``). ``w``: gate_up, down and, for MoE, router (any dtype)."""
    import torch.nn.functional as F

    if getattr(w, "router", None) is not None:
        return moe_reference(x64, w.router, w.gate_up, w.down, shape.experts_per_token, route_check)
    gate, up = matmul64(x64, w.gate_up).chunk(2, dim=-1)
    return matmul64(F.silu(gate) * up, w.down)


class LayerKernel(_PrefillKernel):
    def __init__(self, shape, batch: int, seq: int, dtype: str, device: str):
        super().__init__(dtype, device, seed=404)
        self.shape = shape
        self.w = LayerWeights(shape, self)
        if shape.is_moe:
            self.extra.update(num_experts=shape.num_experts, experts_per_token=shape.experts_per_token,
                              experts_touched_model=shape.experts_touched(batch * seq))
        self.x = self.randn(batch, seq, shape.hidden_size)
        self.out = None
        self.extra["rotary"] = "omitted (elementwise on q and k)"

    def step(self) -> None:
        self.out = prefill_layer(self.x, self.w, self.shape, self.matmul, self.sdpa)

    def check(self) -> None:
        """Batch element 0 at sampled positions, the whole layer in float64."""
        shape, w = self.shape, self.w
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        seq = self.x.shape[1]
        pos = sample(seq, CHECK_LAYER_ROWS, 94, include=(seq - 1,)).to(self.device)
        x0 = self.x[0].double()
        n1 = rms_norm(x0, w.norm1.double())
        kv_all = matmul64(n1, w.qkv[:, h * d :])  # every position's K and V: [s, 2·KV·d]
        k = kv_all[:, : kv * d].view(seq, kv, d).transpose(0, 1)
        v = kv_all[:, kv * d :].view(seq, kv, d).transpose(0, 1)
        q = matmul64(n1[pos], w.qkv[:, : h * d]).view(-1, h, d).transpose(0, 1)  # [H, R, d]
        attn = causal_attention_reference(q, k, v, pos, range(h), h // kv)
        x1 = x0[pos] + matmul64(attn.transpose(0, 1).reshape(-1, h * d), w.o)
        route = None
        if shape.is_moe:
            # The kernel's routing of batch element 0's sampled positions (rows b·s + p).
            route = RouteCheck(self.dtype, chosen=w.routing[pos])
            self.extra["experts_touched"] = int(w.routing.unique().numel())
        want = x1 + mlp_reference(rms_norm(x1, w.norm2.double()), w, shape, route)
        if route is not None:
            route.note(self.extra)
        self.verify("decoder layer (batch 0)", self.out[0, pos], want)


# -- builders ----------------------------------------------------------------------------
def _what(name: str, p: dict) -> str:
    return f"{name} {p['model']} batch {p['batch']} seq {p['seq']} {p['dtype']}"


def _projection(probe, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
    p = ctx.params
    in_f, out_f = shape.projection(p["proj"])
    require_memory(ctx.device, int(work.bytes), f"{_what(probe.name, p)} {p['proj']} {in_f}->{out_f}")
    return ProjectionKernel(p["batch"] * p["seq"], in_f, out_f, p["dtype"], ctx.device)


def _attention(probe, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
    p = ctx.params
    what = _what(probe.name, p)
    require_memory(ctx.device, int(work.bytes), what)
    built = AttentionKernel(shape, p["batch"], p["seq"], p["dtype"], ctx.device)
    if built.extra["sdpa_backend"] == "math":
        try:
            require_memory(ctx.device, math_workspace_bytes(shape, p["batch"], p["seq"], p["dtype"]),
                           f"{what} (SDPA math fallback workspace)")
        except ProbeSkip:
            built.close()
            raise
    return built


def _mlp(probe, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
    p = ctx.params
    t = p["batch"] * p["seq"]
    if shape.is_moe:
        # every expert's weights and the router; per routed row: the gathered input,
        # gate+up (2·inter), act (inter), the weighted output; x and y.
        rows = t * shape.experts_per_token
        elements = (shape.stored_weight_elements() - shape.attention_weight_elements()
                    + rows * (2 * shape.hidden_size + 3 * shape.intermediate_size) + 2 * t * shape.hidden_size)
        require_memory(ctx.device, elements * DTYPE_BYTES[p["dtype"]], _what(probe.name, p))
        return MoeMlpKernel(shape, t, p["dtype"], ctx.device)
    # weights, x, gate_up (2·inter), act (inter), y.
    elements = 3 * shape.hidden_size * shape.intermediate_size + t * (2 * shape.hidden_size + 3 * shape.intermediate_size)
    require_memory(ctx.device, elements * DTYPE_BYTES[p["dtype"]], _what(probe.name, p))
    return MlpKernel(shape, t, p["dtype"], ctx.device)


def _layer(probe, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
    p = ctx.params
    size = DTYPE_BYTES[p["dtype"]]
    t = p["batch"] * p["seq"]
    weights = shape.stored_weight_elements()
    qkv_out = shape.projection("qkv")[1]
    # Live activations at the peak (per token): x, the fp32 norm, qkv, attention
    # output and its reshaped copy, x after attention, gate+up, silu, product, y
    # (an MoE token has k expert rows of the MLP's, plus their gathered inputs).
    k = shape.experts_per_token
    act = t * (2 * shape.hidden_size * 4 // size + qkv_out + 2 * shape.q_dim + 3 * shape.hidden_size
               + 4 * k * shape.intermediate_size + (k * shape.hidden_size if shape.is_moe else 0))
    needed = (weights + act) * size
    what = _what(probe.name, p)
    require_memory(ctx.device, needed, what)
    backend = _layer_backend(shape, p, ctx.device)
    if backend == "math":
        require_memory(ctx.device, needed + math_workspace_bytes(shape, p["batch"], p["seq"], p["dtype"]),
                       f"{what} (SDPA math fallback workspace)")
    built = LayerKernel(shape, p["batch"], p["seq"], p["dtype"], ctx.device)
    built.extra["sdpa_backend"] = backend
    built.extra["enable_gqa"] = shape.num_heads != shape.num_kv_heads
    return built


def _layer_backend(shape, p: dict, device: str) -> str:
    """The SDPA backend for the layer's q, k, v (strided views of the fused QKV
    output), asked on an uninitialized buffer of the real size."""
    import torch

    qkv = torch.empty(p["batch"], p["seq"], shape.projection("qkv")[1], device=device, dtype=torch_dtype(p["dtype"]))
    q, k, v = split_qkv(qkv, shape)
    backend = sdpa_backend(q, k, v, True, shape.num_heads != shape.num_kv_heads)
    del q, k, v, qkv
    return backend


# Each probe's own part of its kernel: its memory needs and its kernel class.
_MAKE = {"prefill.projection": _projection, "prefill.attention": _attention, "prefill.mlp": _mlp,
         "prefill.layer": _layer}


@kernel(tuple(_MAKE), "torch")
def build_prefill(probe, ctx: CaseContext) -> Kernel:
    """The torch kernel of a prefill case: the probe's own part (``_MAKE``: memory
    needs, kernel class) inside what all four share: the fp32 copies' memory for a
    dtype the CPU has no arithmetic for, the dtype path (probes.native), a CUDA graph
    for a short case, the case's work and params."""
    # By class, so that a subclass (a test's probe of another name) builds as its base.
    make = next(_MAKE[c.name] for c in type(probe).__mro__ if getattr(c, "name", None) in _MAKE)
    shape = load_model(ctx.params["model"])
    work = probe.work(ctx.params, ctx.device_info)
    path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
    if not path.native:
        # The operands (work.bytes, 2-byte elements) and their fp32 copies (twice that).
        require_memory(ctx.device, int(3 * work.bytes), f"{_what(probe.name, ctx.params)} (fp32 upcast copies)")
    built = make(probe, ctx, shape, work)
    built.use_path(path)
    work = path.record(work, built.extra)
    built.maybe_graph(work)
    built.work, built.params = work, dict(ctx.params)
    return built
