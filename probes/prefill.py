"""Prefill probes (compute-bound): what processing a prompt of ``seq`` tokens costs.

All four run on the torch backend (CPU and CUDA) for a model shape from
configs/models/ (param ``model``), ``batch`` sequences of ``seq`` tokens, in fp32,
bf16 or fp16 (dtypes the device has no fast path for are skipped, as for GEMMs).

- ``prefill.projection``: one linear layer, X[batch·seq, in] · W[in, out] for the
  fused QKV, attention output, fused gate+up and MLP down projections.
- ``prefill.attention``: causal self-attention through
  ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
  enable_gqa=num_heads != num_kv_heads)``, q [b, heads, s, d], k/v [b, kv_heads, s, d].
  The backend torch's dispatcher picks (flash, efficient, cudnn, math) is recorded in
  ``extra["sdpa_backend"]``.
- ``prefill.mlp``: the SwiGLU MLP of one layer on [batch·seq, hidden]:
  X·W_gate_up → (gate, up) → silu(gate)·up → ·W_down.
- ``prefill.layer``: one Llama-style decoder layer: RMSNorm, fused QKV, causal SDPA,
  output projection, residual, RMSNorm, SwiGLU MLP, residual. Rotary embedding is left
  out (elementwise on q and k, a fraction of a percent of the FLOPs).

Weights are stored [in, out] and applied with ``torch.matmul`` (X·W), like the GEMM
and decode probes. Inputs are random, scaled so every activation stays O(1): X ~ N(0, 1),
W ~ N(0, 1)/√in, q, k, v ~ N(0, 1).

Work models (2 FLOPs per multiply-add; bytes = each tensor read or written once):

- projection: ``linear_flops(b·s, in, out)`` = 2·b·s·in·out;
  ``linear_bytes`` = weights + input + output activations.
- attention: ``attention_flops(b, s, s, heads, d, causal=True)`` = 4·b·s²·heads·d / 2
  (QKᵀ and PV over the lower triangle); bytes = q, k, v read once and the output
  written once: (2·heads + 2·kv_heads)·b·s·d·dtype bytes.
- mlp: the two GEMMs (gate+up: 2·T·hidden·2·inter, down: 2·T·inter·hidden) plus the
  elementwise silu(gate)·up at 3 FLOPs per intermediate element (a convention: the
  sigmoid counted as one, the two multiplies as two); bytes = the two GEMMs'
  ``linear_bytes`` (weights once, each GEMM's input and output once: the intermediate
  is written by gate+up and read by down; the elementwise pass is not counted).
- MoE shapes (num_experts > 1; probes/moe.py): mlp is the router GEMM plus each
  token's k experts (T·k rows through gate+up and down, elementwise on T·k rows);
  bytes: the router's ``linear_bytes``, the weights of the experts the T tokens touch
  (expected distinct experts under uniform routing, E·(1 − (1 − k/E)^T)) once, and
  every routed row's GEMM inputs and outputs once. The layer uses it for its MLP.
- layer: the sum of the parts: the four projections, the attention and the MLP's
  elementwise FLOPs; RMSNorm and the residual adds (a few FLOPs per hidden element)
  are not counted. Bytes: the four projections' ``linear_bytes`` plus the attention's.

The bound hint (used only where the device ridge is unknown) is ``compute`` at an
arithmetic intensity of at least 16 FLOP/B, else ``memory``; with a known ridge the
harness decides.

Checks (once per case, after the first run), against float64 computed from the same
rounded inputs, norm-wise relative error within ``TOLERANCE[dtype]``:

- projection: 32 sampled rows × 256 sampled columns of the output.
- attention: batch element 0, query heads 0, 1 and heads-1 (head h reads KV head
  h // (heads / kv_heads): heads 0 and 1 share a KV head under GQA, which a kernel that
  paired the heads the other way, h % kv_heads, would not), 128 sampled query positions
  (the first and last included), softmax(QKᵀ/√d + M)·V with an explicit causal mask M.
- mlp: 32 sampled rows × 256 sampled columns of the output (the whole intermediate of
  those rows in float64).
- layer: batch element 0, 32 sampled positions (the last included) of the layer
  output, the whole layer recomputed in float64 (K and V for every position).
- MoE mlp and layer: the routing is re-derived in float64 from the float64 logits
  (probes.moe.moe_reference): a kernel that chose other experts fails, except at a
  tie within the dtype's tolerance (counted in ``extra["routing_near_ties"]``).

On CUDA, cases estimated under ~50 µs are replayed from a CUDA graph so the timing
measures the GPU work, not the Python launch path.
"""

from __future__ import annotations

import math

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, Param, Probe, Work, register
from probes.torch.common import (
    DTYPE_BYTES,
    CudaGraphRunner,
    check_close,
    matmul_for,
    require_memory,
    sdpa_backend,
    sdpa_for,
    torch_dtype,
)
from probes.gemm import gemm_skip_reason
from probes.native import NativePath, native_path
from probes.models import PROJECTIONS, attention_flops, linear_bytes, linear_flops, load_model, model_names

DTYPE_CHOICES = ("fp32", "bf16", "fp16")
CHECK_ROWS = 32
CHECK_COLS = 256
CHECK_QUERIES = 128
CHECK_LAYER_ROWS = 32
# silu(gate)·up per intermediate element: sigmoid (1) + two multiplies.
MLP_ELEMENTWISE_FLOPS = 3
RMS_EPS = 1e-5
# Where the device ridge is unknown, cases below this intensity are called memory-bound.
FALLBACK_RIDGE = 16.0
# CUDA graphs for cases estimated below this, at a rate a current datacenter GPU reaches
# (used only for that decision, never for reporting).
GRAPH_BELOW_S = 50e-6
GRAPH_RATE_GUESS = {"fp32": 5e13, "bf16": 4e14, "fp16": 4e14}
# Columns of a weight cast to float64 at a time in the references (bounds their memory).
REF_BLOCK = 4096


def _hint(flops: float, nbytes: float) -> str:
    return "memory" if nbytes and flops / nbytes < FALLBACK_RIDGE else "compute"


def _common_params() -> dict[str, Param]:
    return {
        "model": Param(default=("llama-3.1-8b",), type=str, choices=model_names(), help="shape in configs/models/"),
        "batch": Param(default=(1,), type=int, minimum=1, help="sequences"),
        "seq": Param(default=(512, 2048), type=int, minimum=1, help="prompt tokens per sequence"),
        "dtype": Param(default=("bf16",), type=str, choices=DTYPE_CHOICES),
    }


# -- work models -------------------------------------------------------------------------
def projection_work(shape, proj: str, batch: int, seq: int, dtype: str) -> Work:
    in_f, out_f = shape.projection(proj)
    t = batch * seq
    flops, nbytes = linear_flops(t, in_f, out_f), linear_bytes(t, in_f, out_f, DTYPE_BYTES[dtype])
    return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=dtype)


def attention_work(shape, batch: int, seq: int, dtype: str) -> Work:
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    flops = attention_flops(batch, seq, seq, h, d, causal=True)
    # q and the output: heads · d each; k and v: kv_heads · d each; per token.
    nbytes = float(DTYPE_BYTES[dtype] * batch * seq * d * (2 * h + 2 * kv))
    return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=dtype)


def mlp_work(shape, batch: int, seq: int, dtype: str) -> Work:
    """Dense: the two GEMMs and the elementwise product (module docstring). MoE
    (probes/moe.py): the router GEMM [T, hidden]·[hidden, E]; each of the T tokens
    through its k experts (T·k rows through gate+up and down, the elementwise product
    on T·k rows); bytes: the router's ``linear_bytes``, the weights of the experts the
    T tokens touch (expected under uniform routing, ``ModelShape.experts_touched``)
    once, and each routed row's input and output of both GEMMs once. The top-k,
    softmax, gather and weighted sum are not counted."""
    t, size = batch * seq, DTYPE_BYTES[dtype]
    rows = t * shape.experts_per_token  # (token, expert) pairs; t when dense
    flops = float(MLP_ELEMENTWISE_FLOPS * rows * shape.intermediate_size)
    nbytes = 0.0
    for proj in ("gate_up", "down"):
        in_f, out_f = shape.projection(proj)
        flops += linear_flops(rows, in_f, out_f)
        if shape.is_moe:
            nbytes += size * (shape.experts_touched(t) * in_f * out_f + rows * (in_f + out_f))
        else:
            nbytes += linear_bytes(t, in_f, out_f, size)
    if shape.is_moe:
        flops += linear_flops(t, *shape.projection("router"))
        nbytes += linear_bytes(t, *shape.projection("router"), size)
    return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=dtype)


def layer_work(shape, batch: int, seq: int, dtype: str) -> Work:
    parts = [projection_work(shape, p, batch, seq, dtype) for p in ("qkv", "o")]
    parts += [attention_work(shape, batch, seq, dtype), mlp_work(shape, batch, seq, dtype)]
    flops = sum(p.flops for p in parts)
    nbytes = sum(p.bytes for p in parts)
    return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=dtype)


def math_workspace_bytes(shape, batch: int, seq: int, dtype: str) -> int:
    """What SDPA's math fallback materializes: the score and probability matrices
    (taken at fp32 size) and, with GQA, K and V expanded to every query head."""
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    scores = 2 * 4 * batch * h * seq * seq
    expanded = 2 * batch * h * seq * d * DTYPE_BYTES[dtype] if h != kv else 0
    return scores + expanded


# -- float64 references ------------------------------------------------------------------
def matmul64(a64, weight, block: int = REF_BLOCK):
    """a64 (float64) · weight (any dtype), the weight cast to float64 a column block at a
    time so the reference never holds a whole float64 copy of a large weight."""
    import torch

    return torch.cat([a64 @ weight[:, j : j + block].double() for j in range(0, weight.shape[1], block)], dim=-1)


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
    """The MoE MLP of an MoE shape on [batch·seq, hidden] (probes/moe.py): router,
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
        from probes.moe import moe_forward

        self.y, self.w.routing = moe_forward(self.x, self.w.router, self.w.gate_up, self.w.down,
                                             self.shape.experts_per_token, self.matmul)

    def check(self) -> None:
        """32 sampled rows, all columns, routing re-derived in float64."""
        from probes.moe import RouteCheck, moe_reference

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
        from probes.moe import moe_forward

        y, w.routing = moe_forward(normed.reshape(b * s, -1), w.router, w.gate_up, w.down, shape.experts_per_token, mm)
        return x + y.view(b, s, -1)
    gate, up = mm(normed, w.gate_up).chunk(2, dim=-1)
    return x + mm(F.silu(gate) * up, w.down)


def mlp_reference(x64, w, shape, route_check=None):
    """float64 MLP of x64 [R, hidden] (already normed): the dense SwiGLU, or the MoE
    block with the routing re-derived in float64 (probes.moe.moe_reference, judged by
    ``route_check``). ``w``: gate_up, down and, for MoE, router (any dtype)."""
    import torch.nn.functional as F

    if getattr(w, "router", None) is not None:
        from probes.moe import moe_reference

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
            from probes.moe import RouteCheck

            # The kernel's routing of batch element 0's sampled positions (rows b·s + p).
            route = RouteCheck(self.dtype, chosen=w.routing[pos])
            self.extra["experts_touched"] = int(w.routing.unique().numel())
        want = x1 + mlp_reference(rms_norm(x1, w.norm2.double()), w, shape, route)
        if route is not None:
            route.note(self.extra)
        self.verify("decoder layer (batch 0)", self.out[0, pos], want)


# -- probes ------------------------------------------------------------------------------
class _PrefillProbe(Probe):
    family = "prefill"
    backends = ("torch", "jax")
    device_types = ("cpu", "cuda")

    def work(self, params: dict, device_info: dict) -> Work:  # pragma: no cover - interface
        raise NotImplementedError

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)

    def build(self, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, ctx: CaseContext) -> Kernel:
        if ctx.backend == "jax":
            kind = self.name.split(".", 1)[1]
            shape = load_model(ctx.params["model"])
            if shape.is_moe and kind in ("mlp", "layer"):
                raise ProbeSkip(f"{shape.name}: the MoE MLP (data-dependent routing, grouped expert GEMMs) "
                                "runs on the torch backend only")
            from probes.jax.prefill import build_prefill

            return build_prefill(self, ctx, kind)
        if reason := self.skip_reason(ctx.params, ctx.device_info, ctx.host):
            raise ProbeSkip(reason)
        shape = load_model(ctx.params["model"])
        work = self.work(ctx.params, ctx.device_info)
        path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
        if not path.native:
            # The operands (work.bytes, 2-byte elements) and their fp32 copies (twice that).
            require_memory(ctx.device, int(3 * work.bytes), f"{_what(self.name, ctx.params)} (fp32 upcast copies)")
        kernel = self.build(ctx, shape, work)
        kernel.use_path(path)
        work = path.record(work, kernel.extra)
        kernel.maybe_graph(work)
        kernel.work, kernel.params = work, dict(ctx.params)
        return kernel


def _what(name: str, p: dict) -> str:
    return f"{name} {p['model']} batch {p['batch']} seq {p['seq']} {p['dtype']}"


@register
class PrefillProjection(_PrefillProbe):
    name = "prefill.projection"
    description = "X[batch·seq, in] · W[in, out] for a model's QKV, O, gate+up and down projections"
    params = {
        "model": _common_params()["model"],
        "proj": Param(default=PROJECTIONS, type=str, choices=PROJECTIONS, help="qkv, o, gate_up, down"),
        **{k: v for k, v in _common_params().items() if k != "model"},
    }

    def work(self, params: dict, device_info: dict) -> Work:
        shape = load_model(params["model"])
        return projection_work(shape, params["proj"], params["batch"], params["seq"], params["dtype"])

    def build(self, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
        p = ctx.params
        in_f, out_f = shape.projection(p["proj"])
        require_memory(ctx.device, int(work.bytes), f"{_what(self.name, p)} {p['proj']} {in_f}->{out_f}")
        return ProjectionKernel(p["batch"] * p["seq"], in_f, out_f, p["dtype"], ctx.device)


@register
class PrefillAttention(_PrefillProbe):
    name = "prefill.attention"
    description = "causal SDPA over batch·seq tokens, q [b, heads, s, d], k/v [b, kv_heads, s, d] (GQA native)"
    params = _common_params()

    def work(self, params: dict, device_info: dict) -> Work:
        return attention_work(load_model(params["model"]), params["batch"], params["seq"], params["dtype"])

    def build(self, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
        p = ctx.params
        what = _what(self.name, p)
        require_memory(ctx.device, int(work.bytes), what)
        kernel = AttentionKernel(shape, p["batch"], p["seq"], p["dtype"], ctx.device)
        if kernel.extra["sdpa_backend"] == "math":
            try:
                require_memory(ctx.device, math_workspace_bytes(shape, p["batch"], p["seq"], p["dtype"]),
                               f"{what} (SDPA math fallback workspace)")
            except ProbeSkip:
                kernel.close()
                raise
        return kernel


@register
class PrefillMlp(_PrefillProbe):
    name = "prefill.mlp"
    description = "SwiGLU MLP of one layer on [batch·seq, hidden]: X·W_gate_up → silu(gate)·up → ·W_down"
    params = _common_params()

    def work(self, params: dict, device_info: dict) -> Work:
        return mlp_work(load_model(params["model"]), params["batch"], params["seq"], params["dtype"])

    def build(self, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
        p = ctx.params
        t = p["batch"] * p["seq"]
        if shape.is_moe:
            # every expert's weights and the router; per routed row: the gathered input,
            # gate+up (2·inter), act (inter), the weighted output; x and y.
            rows = t * shape.experts_per_token
            elements = (shape.stored_weight_elements() - shape.attention_weight_elements()
                        + rows * (2 * shape.hidden_size + 3 * shape.intermediate_size) + 2 * t * shape.hidden_size)
            require_memory(ctx.device, elements * DTYPE_BYTES[p["dtype"]], _what(self.name, p))
            return MoeMlpKernel(shape, t, p["dtype"], ctx.device)
        # weights, x, gate_up (2·inter), act (inter), y.
        elements = 3 * shape.hidden_size * shape.intermediate_size + t * (2 * shape.hidden_size + 3 * shape.intermediate_size)
        require_memory(ctx.device, elements * DTYPE_BYTES[p["dtype"]], _what(self.name, p))
        return MlpKernel(shape, t, p["dtype"], ctx.device)


@register
class PrefillLayer(_PrefillProbe):
    name = "prefill.layer"
    description = "one Llama-style decoder layer at prefill: RMSNorm, QKV, causal SDPA, O, residual, RMSNorm, SwiGLU MLP (no rotary)"
    params = _common_params()

    def work(self, params: dict, device_info: dict) -> Work:
        return layer_work(load_model(params["model"]), params["batch"], params["seq"], params["dtype"])

    def build(self, ctx: CaseContext, shape, work: Work) -> _PrefillKernel:
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
        what = _what(self.name, p)
        require_memory(ctx.device, needed, what)
        backend = self._backend(shape, p, ctx.device)
        if backend == "math":
            require_memory(ctx.device, needed + math_workspace_bytes(shape, p["batch"], p["seq"], p["dtype"]),
                           f"{what} (SDPA math fallback workspace)")
        kernel = LayerKernel(shape, p["batch"], p["seq"], p["dtype"], ctx.device)
        kernel.extra["sdpa_backend"] = backend
        kernel.extra["enable_gqa"] = shape.num_heads != shape.num_kv_heads
        return kernel

    @staticmethod
    def _backend(shape, p: dict, device: str) -> str:
        """The SDPA backend for the layer's q, k, v (strided views of the fused QKV
        output), asked on an uninitialized buffer of the real size."""
        import torch

        qkv = torch.empty(p["batch"], p["seq"], shape.projection("qkv")[1], device=device, dtype=torch_dtype(p["dtype"]))
        q, k, v = split_qkv(qkv, shape)
        backend = sdpa_backend(q, k, v, True, shape.num_heads != shape.num_kv_heads)
        del q, k, v, qkv
        return backend
