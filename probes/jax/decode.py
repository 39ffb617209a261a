"""JAX kernels of the decode probes (specs in probes/decode.py): ``decode.projection``
as the rotating-copies matmul of probes/jax/gemm.py, ``decode.attention`` (contiguous
``jax.nn.dot_product_attention``, or the paged block pool read by a ``lax.scan`` over
gathered chunks with an online softmax) and ``decode.layer`` (one dense decoder layer),
each checked against float64, and one builder per probe.

jax is imported inside the functions, never at module import.
"""

from __future__ import annotations

import math

import numpy as np

from harness.errors import ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.decode import BLOCK_TOKENS, sharded_shape
from probes.jax import common as J
from probes.jax.common import DTYPE_BYTES, JaxKernel
from probes.jax.gemm import MatmulKernel
from probes.jax.layers import LayerWeights, _layer64_weights, _rms, _swiglu, attention64
from probes.models import load_model

MIB = 2**20


def _build(probe, ctx: CaseContext, make) -> Kernel:
    """The builders' common part: the spec's work model, enough copies to rotate past
    4× the LLC, skip unless the spec's ``device_bytes`` fit, then the kernel
    ``make(copies)`` with its dtype path recorded."""
    work = probe.work(ctx.params, ctx.device_info)
    copies = J.rotation_count(int(work.bytes), ctx.device, ctx.host)
    J.require_memory(ctx.device, probe.device_bytes(ctx.params, copies, work.bytes),
                     f"{probe.name} ({copies} {probe.rotated})")
    built = make(copies)
    built.work, built.params = J.record_native(ctx, work, built), dict(ctx.params)
    return built


class _RotatingKernel(JaxKernel):
    """Cycles through ``copies`` input sets, one per repetition (untimed switch): the
    compiled ``fn`` is called on ``inputs(i)``; ``check`` compares each (output,
    float64 reference, what) that ``expected(i)`` gives for the copy just run."""

    def __init__(self, dtype: str, copies: int) -> None:
        super().__init__()
        self.dtype, self.copies, self.index = dtype, copies, 0
        self.outs = [None] * copies

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def inputs(self, i: int) -> tuple:  # pragma: no cover - interface
        raise NotImplementedError

    def expected(self, i: int):  # pragma: no cover - interface
        raise NotImplementedError

    def run(self):
        i = self.index
        self.out = self.outs[i] = self.fn(*self.inputs(i))
        return self.out

    def check(self) -> None:
        self.sync()
        for got, want, what in self.expected(self.index):
            J.check_close(J.to64(got), want, self.dtype, what, self.extra)


@kernel("decode.projection", "jax")
def build_decode_projection(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    in_f, out_f = sharded_shape(p).projection(p["proj"])
    return _build(probe, ctx, lambda copies: MatmulKernel(p["batch"], out_f, in_f, p["dtype"], ctx.device, copies, seed=7))


# -- decode attention ----------------------------------------------------------------------
def paged_attention_fn(batch: int, heads: int, kv_heads: int, d: int, n_blocks: int, chunk: int):
    """One query token per sequence over KV in a block pool [blocks, 16, KV, d], read
    ``chunk`` blocks at a time through the block table with an online softmax."""
    jax, jnp = J.jax_modules()
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(d)
    n_chunks = n_blocks // chunk

    def attend(q, k_pool, v_pool, table):
        qg = q.reshape(batch, kv_heads, group, d).astype(jnp.float32)
        tables = table.reshape(batch, n_chunks, chunk).transpose(1, 0, 2)  # [chunks, b, C]

        def step(carry, ids):
            run_max, run_sum, acc = carry
            k = k_pool[ids].reshape(batch, chunk * BLOCK_TOKENS, kv_heads, d).astype(jnp.float32)
            v = v_pool[ids].reshape(batch, chunk * BLOCK_TOKENS, kv_heads, d).astype(jnp.float32)
            s = jnp.einsum("bkgd,btkd->bkgt", qg, k) * scale
            m = jnp.maximum(run_max, s.max(-1, keepdims=True))
            old = jnp.exp(run_max - m)
            pr = jnp.exp(s - m)
            run_sum = run_sum * old + pr.sum(-1, keepdims=True)
            acc = acc * old + jnp.einsum("bkgt,btkd->bkgd", pr, v)
            return (m, run_sum, acc), None

        init = (jnp.full((batch, kv_heads, group, 1), -jnp.inf, jnp.float32),
                jnp.zeros((batch, kv_heads, group, 1), jnp.float32),
                jnp.zeros((batch, kv_heads, group, d), jnp.float32))
        (_, run_sum, acc), _ = jax.lax.scan(step, init, tables)
        return (acc / run_sum).reshape(batch, 1, heads, d).astype(q.dtype)

    return attend


class DecodeAttentionKernel(_RotatingKernel):
    def __init__(self, shape, batch: int, ctx_len: int, layout: str, dtype: str, device_id: str, copies: int, host: dict):
        super().__init__(dtype, copies)
        jax, jnp = J.jax_modules()
        dev = J.device(device_id)
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.layout = layout
        self.q = J.randn(11, (batch, 1, h, d), dtype, dev)
        if layout == "contiguous":
            self.k = [J.randn(100 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
            self.v = [J.randn(200 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
            self.fn = J.compiled(self, lambda q, k, v: jax.nn.dot_product_attention(q, k, v), self.q, self.k[0], self.v[0])
            self.extra["attention"] = "jax.nn.dot_product_attention (no mask: the token sees the whole cache)"
        else:
            n_blocks = ctx_len // BLOCK_TOKENS
            total = copies * batch * n_blocks
            self.k_pool = J.randn(12, (total, BLOCK_TOKENS, kv, d), dtype, dev)
            self.v_pool = J.randn(13, (total, BLOCK_TOKENS, kv, d), dtype, dev)
            perm = np.random.default_rng(13).permutation(total).astype(np.int32)
            self.tables = [jax.device_put(perm[c * batch * n_blocks:(c + 1) * batch * n_blocks].reshape(batch, n_blocks), dev)
                           for c in range(copies)]
            chunk_bytes = 2 * batch * kv * BLOCK_TOKENS * d * DTYPE_BYTES[dtype]
            target = max(MIB, (J.cache_bytes(device_id, host) or 4 * MIB) // 4)
            chunk = J.padded_divisor(n_blocks, max(1, target // max(1, chunk_bytes)))
            self.fn = J.compiled(self, paged_attention_fn(batch, h, kv, d, n_blocks, chunk),
                                 self.q, self.k_pool, self.v_pool, self.tables[0])
            self.extra.update(block_tokens=BLOCK_TOKENS, chunk_blocks=chunk, pool_blocks=total,
                              attention="lax.scan over gathered block chunks, online softmax")
        self.extra.update(rotation_copies=copies, layout_dims="[batch, ctx, kv_heads, head_dim]")

    def inputs(self, i: int) -> tuple:
        if self.layout == "contiguous":
            return self.q, self.k[i], self.v[i]
        return self.q, self.k_pool, self.v_pool, self.tables[i]

    def kv_of(self, i: int, seq: int):
        if self.layout == "contiguous":
            return J.to64(self.k[i][seq]), J.to64(self.v[i][seq])
        ids = np.asarray(self.tables[i][seq])
        kp, vp = J.to64(self.k_pool[ids]), J.to64(self.v_pool[ids])
        return kp.reshape(-1, *kp.shape[2:]), vp.reshape(-1, *vp.shape[2:])

    def expected(self, i: int):
        for seq in sorted({0, self.q.shape[0] - 1}):
            k, v = self.kv_of(i, seq)
            want = attention64(J.to64(self.q[seq]), k, v, False)
            yield self.outs[i][seq], want, f"{self.layout} attention, sequence {seq}"


@kernel("decode.attention", "jax")
def build_decode_attention(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    return _build(probe, ctx, lambda copies: DecodeAttentionKernel(sharded_shape(p), p["batch"], p["ctx"], p["layout"],
                                                                   p["dtype"], ctx.device, copies, ctx.host))


def decode_layer_fn(shape, dtype):
    """One decode step: the cache holds ctx-1 earlier tokens (slots 0..ctx-2); the new
    token's K/V (slot ctx-1) join the softmax, and are returned as outputs (JAX arrays
    are immutable: writing them into the cache would copy it unless donated)."""
    jax, jnp = J.jax_modules()
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    group = h // kv
    prec = J.matmul_precision(dtype)

    def layer(x, k_cache, v_cache, qkv_w, o_w, gu_w, d_w, n1, n2):
        b = x.shape[0]
        qkv = jnp.matmul(_rms(jnp, x, n1), qkv_w, precision=prec)
        q, k, v = jnp.split(qkv, [h * d, h * d + kv * d], axis=-1)
        qg = q.reshape(b, kv, group, d).astype(jnp.float32)
        k_new = k.reshape(b, kv, d)
        v_new = v.reshape(b, kv, d)
        scale = 1.0 / math.sqrt(d)
        s_old = jnp.einsum("bkgd,btkd->bkgt", qg, k_cache[:, :-1].astype(jnp.float32)) * scale
        s_new = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(jnp.float32))[..., None] * scale
        s = jnp.concatenate([s_old, s_new], axis=-1)
        pr = jax.nn.softmax(s, axis=-1)
        attn = (jnp.einsum("bkgt,btkd->bkgd", pr[..., :-1], v_cache[:, :-1].astype(jnp.float32))
                + pr[..., -1:] * v_new.astype(jnp.float32)[:, :, None, :])
        x = x + jnp.matmul(attn.reshape(b, h * d).astype(x.dtype), o_w, precision=prec)
        return x + _swiglu(jnp, _rms(jnp, x, n2), gu_w, d_w, prec), k_new, v_new

    return layer


class DecodeLayerKernel(_RotatingKernel):
    def __init__(self, shape, batch: int, ctx_len: int, dtype: str, device_id: str, copies: int):
        super().__init__(dtype, copies)
        dev = J.device(device_id)
        kv, d = shape.num_kv_heads, shape.head_dim
        self.shape = shape
        self.x = J.randn(17, (batch, shape.hidden_size), dtype, dev)
        self.weights = [LayerWeights(shape, dtype, dev, 1000 + 20 * c) for c in range(copies)]
        self.k = [J.randn(300 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
        self.v = [J.randn(400 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
        self.fn = J.compiled(self, decode_layer_fn(shape, dtype), *self.inputs(0))
        self.extra.update(rotation_copies=copies, rotary="omitted (elementwise, no memory traffic of note)",
                          kv_append="the new token's K/V are outputs (cache slot ctx-1), the cache is not copied")

    def inputs(self, i: int) -> tuple:
        return (self.x, self.k[i], self.v[i], *self.weights[i].tree())

    def expected(self, i: int):
        s = self.shape
        h, kv, d = s.num_heads, s.num_kv_heads, s.head_dim
        w = _layer64_weights(self.weights[i])
        x0 = J.to64(self.x[0:1])
        qkv = J.rms_norm64(x0, w["norm1"]) @ w["qkv"]
        q, k_new, v_new = np.split(qkv, [h * d, h * d + kv * d], axis=-1)
        k = J.to64(self.k[i][0]).copy()
        v = J.to64(self.v[i][0]).copy()
        k[-1], v[-1] = k_new.reshape(kv, d), v_new.reshape(kv, d)
        attn = attention64(q.reshape(1, h, d), k, v, False).reshape(1, h * d)
        x1 = x0 + attn @ w["o"]
        gate, up = np.split(J.rms_norm64(x1, w["norm2"]) @ w["gate_up"], 2, axis=-1)
        want = x1 + (J.silu64(gate) * up) @ w["down"]
        yield self.outs[i][0][0:1], want, "decoder layer"


@kernel("decode.layer", "jax")
def build_decode_layer(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    shape = load_model(p["model"])
    if shape.is_moe:
        raise ProbeSkip(f"{shape.name}: the MoE layer (data-dependent routing, grouped expert GEMMs) "
                        "runs on the torch backend only")
    return _build(probe, ctx, lambda copies: DecodeLayerKernel(shape, p["batch"], p["ctx"], p["dtype"], ctx.device,
                                                               copies))
