"""JAX prefill kernels (the probes' spec: probes/prefill.py): projections, causal
attention, SwiGLU MLP, one decoder layer, checked as the torch kernels are, and the
builder ``build_prefill`` registered for all four probes. MoE shapes are skipped here
(their routed MLP runs on the torch backend only)."""

from __future__ import annotations

import math

import numpy as np

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.jax import common as J
from probes.jax.common import DTYPE_BYTES, JaxKernel
from probes.jax.gemm import MatmulKernel
from probes.jax.layers import LayerWeights, _layer64_weights, _rms, _swiglu, attention64
from probes.prefill import CHECK_COLS, CHECK_LAYER_ROWS, CHECK_QUERIES, CHECK_ROWS


class PrefillAttentionKernel(JaxKernel):
    def __init__(self, shape, batch: int, seq: int, dtype: str, device_id: str):
        super().__init__()
        jax, jnp = J.jax_modules()
        dev = J.device(device_id)
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.dtype = dtype
        self.q = J.randn(202, (batch, seq, h, d), dtype, dev)
        self.k = J.randn(203, (batch, seq, kv, d), dtype, dev)
        self.v = J.randn(204, (batch, seq, kv, d), dtype, dev)
        self.fn = J.compiled(self, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                            self.q, self.k, self.v)
        self.extra.update(attention="jax.nn.dot_product_attention(is_causal=True), implementation auto",
                          layout="[batch, seq, heads, head_dim]", enable_gqa=h != kv)

    def run(self):
        self.out = self.fn(self.q, self.k, self.v)
        return self.out

    def check(self) -> None:
        self.sync()
        h, seq = self.q.shape[2], self.q.shape[1]
        heads = sorted({0, min(1, h - 1), h - 1})
        pos = J.sample(seq, CHECK_QUERIES, 97, include=(0, seq - 1))
        q = J.to64(self.q[0][pos])  # [R, H, d]
        want = attention64(q, J.to64(self.k[0]), J.to64(self.v[0]), True, pos)[:, heads]
        got = J.to64(self.out[0][pos])[:, heads]
        J.check_close(got, want, self.dtype, "causal attention (batch 0, heads " + ",".join(map(str, heads)) + ")",
                      self.extra)


class MlpKernel(JaxKernel):
    def __init__(self, shape, tokens: int, dtype: str, device_id: str):
        super().__init__()
        jax, jnp = J.jax_modules()
        dev = J.device(device_id)
        hid, inter = shape.hidden_size, shape.intermediate_size
        self.dtype = dtype
        self.x = J.randn(303, (tokens, hid), dtype, dev)
        self.wgu = J.randn(304, (hid, 2 * inter), dtype, dev, scale=1.0 / math.sqrt(hid))
        self.wd = J.randn(305, (inter, hid), dtype, dev, scale=1.0 / math.sqrt(inter))
        prec = J.matmul_precision(dtype)
        self.fn = J.compiled(self, lambda x, a, b: _swiglu(jnp, x, a, b, prec), self.x, self.wgu, self.wd)

    def run(self):
        self.out = self.fn(self.x, self.wgu, self.wd)
        return self.out

    def check(self) -> None:
        self.sync()
        m, n = self.out.shape
        rows, cols = J.sample(m, CHECK_ROWS, 96), J.sample(n, CHECK_COLS, 95)
        gu = J.to64(self.x[rows]) @ J.to64(self.wgu)
        gate, up = np.split(gu, 2, axis=-1)
        want = (J.silu64(gate) * up) @ J.to64(self.wd[:, cols])
        J.check_close(J.to64(self.out[rows][:, cols]), want, self.dtype, "SwiGLU MLP", self.extra)


def prefill_layer_fn(shape, dtype):
    jax, jnp = J.jax_modules()
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    prec = J.matmul_precision(dtype)

    def layer(x, qkv_w, o_w, gu_w, d_w, n1, n2):
        b, s, _ = x.shape
        qkv = jnp.matmul(_rms(jnp, x, n1), qkv_w, precision=prec)
        q, k, v = jnp.split(qkv, [h * d, h * d + kv * d], axis=-1)
        attn = jax.nn.dot_product_attention(q.reshape(b, s, h, d), k.reshape(b, s, kv, d), v.reshape(b, s, kv, d),
                                            is_causal=True)
        x = x + jnp.matmul(attn.reshape(b, s, h * d), o_w, precision=prec)
        return x + _swiglu(jnp, _rms(jnp, x, n2), gu_w, d_w, prec)

    return layer


class PrefillLayerKernel(JaxKernel):
    def __init__(self, shape, batch: int, seq: int, dtype: str, device_id: str):
        super().__init__()
        dev = J.device(device_id)
        self.shape, self.dtype = shape, dtype
        self.w = LayerWeights(shape, dtype, dev, 404)
        self.x = J.randn(400, (batch, seq, shape.hidden_size), dtype, dev)
        self.fn = J.compiled(self, prefill_layer_fn(shape, dtype), self.x, *self.w.tree())
        self.extra.update(rotary="omitted (elementwise on q and k)", attention="jax.nn.dot_product_attention(is_causal=True)")

    def run(self):
        self.out = self.fn(self.x, *self.w.tree())
        return self.out

    def check(self) -> None:
        self.sync()
        s = self.shape
        h, kv, d = s.num_heads, s.num_kv_heads, s.head_dim
        seq = self.x.shape[1]
        pos = J.sample(seq, CHECK_LAYER_ROWS, 94, include=(seq - 1,))
        w = _layer64_weights(self.w)
        x0 = J.to64(self.x[0])
        n1 = J.rms_norm64(x0, w["norm1"])
        kv_all = n1 @ w["qkv"][:, h * d:]
        k = kv_all[:, : kv * d].reshape(seq, kv, d)
        v = kv_all[:, kv * d:].reshape(seq, kv, d)
        q = (n1[pos] @ w["qkv"][:, : h * d]).reshape(-1, h, d)
        attn = attention64(q, k, v, True, pos).reshape(len(pos), h * d)
        x1 = x0[pos] + attn @ w["o"]
        gate, up = np.split(J.rms_norm64(x1, w["norm2"]) @ w["gate_up"], 2, axis=-1)
        want = x1 + (J.silu64(gate) * up) @ w["down"]
        J.check_close(J.to64(self.out[0][pos]), want, self.dtype, "decoder layer (batch 0)", self.extra)


@kernel(("prefill.projection", "prefill.attention", "prefill.mlp", "prefill.layer"), "jax")
def build_prefill(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    kind = probe.name.split(".", 1)[1]
    shape = J.model_shape(p)
    if shape.is_moe and kind in ("mlp", "layer"):
        raise ProbeSkip(f"{shape.name}: the MoE MLP (data-dependent routing, grouped expert GEMMs) "
                        "runs on the torch backend only")
    work = probe.work(p, ctx.device_info)
    size = DTYPE_BYTES[p["dtype"]]
    t = p["batch"] * p["seq"]
    if kind == "projection":
        in_f, out_f = shape.projection(p["proj"])
        J.require_memory(ctx.device, int(work.bytes), f"{probe.name} {p['proj']}")
        kernel = MatmulKernel(t, out_f, in_f, p["dtype"], ctx.device, seed=101)
    elif kind == "attention":
        # XLA materializes the score matrix (fp32) on CPUs and where no fused kernel exists.
        J.require_memory(ctx.device, int(work.bytes) + 8 * p["batch"] * shape.num_heads * p["seq"] ** 2, probe.name)
        kernel = PrefillAttentionKernel(shape, p["batch"], p["seq"], p["dtype"], ctx.device)
    elif kind == "mlp":
        elements = 3 * shape.hidden_size * shape.intermediate_size + t * (2 * shape.hidden_size + 3 * shape.intermediate_size)
        J.require_memory(ctx.device, elements * size, probe.name)
        kernel = MlpKernel(shape, t, p["dtype"], ctx.device)
    else:
        J.require_memory(ctx.device, int(2 * work.bytes) + 8 * p["batch"] * shape.num_heads * p["seq"] ** 2, probe.name)
        kernel = PrefillLayerKernel(shape, p["batch"], p["seq"], p["dtype"], ctx.device)
    work = J.record_native(ctx, work, kernel)
    kernel.work, kernel.params = work, dict(p)
    return kernel
