"""Prefill probes (compute-bound): what processing a prompt of ``seq`` tokens costs.

All four run on the torch backend (CPU and CUDA; kernels in probes/torch/prefill.py)
and on JAX (probes/jax/prefill.py; dense shapes only) for a model shape from
configs/models/ (param ``model``), ``batch`` sequences of ``seq`` tokens, in fp32,
bf16 or fp16 (dtypes the device has no fast path for are skipped, as for GEMMs).
This module is the probes' spec: parameters, work models, skip rules and the
constants the kernels share; it imports no framework.

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
  (probes.torch.moe.moe_reference): a kernel that chose other experts fails, except at a
  tie within the dtype's tolerance (counted in ``extra["routing_near_ties"]``).

On CUDA, cases estimated under ~50 µs are replayed from a CUDA graph so the timing
measures the GPU work, not the Python launch path.
"""

from __future__ import annotations

from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES
from probes.gemm import gemm_skip_reason
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


# -- probes ------------------------------------------------------------------------------
class _PrefillProbe(Probe):
    family = "prefill"
    device_types = ("cpu", "cuda")
    params = _common_params()
    # The work model of a case, f(shape, batch, seq, dtype) (one of the functions above).
    work_model = None

    def work(self, params: dict, device_info: dict) -> Work:
        return self.work_model(load_model(params["model"]), params["batch"], params["seq"], params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return gemm_skip_reason(params["dtype"], device_info, host, emulated_ok=True)


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


@register
class PrefillAttention(_PrefillProbe):
    name = "prefill.attention"
    description = "causal SDPA over batch·seq tokens, q [b, heads, s, d], k/v [b, kv_heads, s, d] (GQA native)"
    work_model = staticmethod(attention_work)


@register
class PrefillMlp(_PrefillProbe):
    name = "prefill.mlp"
    description = "SwiGLU MLP of one layer on [batch·seq, hidden]: X·W_gate_up → silu(gate)·up → ·W_down"
    work_model = staticmethod(mlp_work)


@register
class PrefillLayer(_PrefillProbe):
    name = "prefill.layer"
    description = "one Llama-style decoder layer at prefill: RMSNorm, QKV, causal SDPA, O, residual, RMSNorm, SwiGLU MLP (no rotary)"
    work_model = staticmethod(layer_work)
