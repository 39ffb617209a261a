"""JAX implementations of the probes (``coherence run --backend jax``).

Each probe class keeps one name, one parameter grid and one work model for both
backends; its ``prepare`` hands a JAX case (``ctx.backend == "jax"``) to a builder
here. The kernels follow the torch ones: the same shapes, random inputs, rotation past
4× the last-level cache, and the same float64 checks and tolerances. Differences that
come from JAX itself are recorded in ``extra``:

- Every computation is ``jax.jit``-compiled ahead of time in ``prepare``
  (``extra["compile_s"]``), so no timed repetition compiles.
- JAX arrays are immutable; where torch writes into an output buffer, the JAX kernel
  donates the old output (``donate_argnums``) so XLA may reuse it in place. XLA:CPU
  ignores donation (``extra["donation_honored"]`` says whether it was): each
  repetition then writes a fresh buffer.
- fp32 products use ``Precision.HIGHEST`` (no bf16/tf32 passes), as torch's fp32.
- Attention is ``jax.nn.dot_product_attention`` (layout [batch, tokens, heads, dim],
  GQA native); the paged layout is a ``lax.scan`` over chunks of blocks gathered by
  the block table with an online softmax, as the torch probe does it.
- Collectives are ``shard_map`` over a one-axis mesh of the case's devices in one
  process: psum, all_gather, psum_scatter, all_to_all, ppermute (a ring), with the
  input values, expected values and busbw factors of probes.collective.

jax is imported inside the functions, never at module import.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, Work
from probes import _jax as J
from probes._jax import DTYPE_BYTES, JaxKernel
from probes.native import native_path

MIB = 2**20
SCALAR = 3.0
CHECK_POINTS = 65536
STREAM_TOLERANCE = {"fp64": 1e-12, "fp32": 1e-6, "bf16": 1e-2}
BLOCK_TOKENS = 16


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def _shape(params: dict):
    """The model shape one case computes: the whole layer, or one tensor-parallel
    rank's shard where the probe has a ``tp`` parameter (the torch kernels' rule)."""
    from probes.models import load_model

    shape = load_model(params["model"])
    tp = int(params.get("tp", 1) or 1)
    return shape.shard(tp) if tp != 1 else shape


def _compiled(kernel: Kernel, fn, *args, donate=()):
    compiled, secs = J.compile_fn(fn, *args, donate=donate)
    kernel.extra["compile_s"] = round(kernel.extra.get("compile_s", 0.0) + secs, 4)
    return compiled


# -- memory: STREAM ------------------------------------------------------------------------
class StreamKernel(JaxKernel):
    """copy c = a, scale b = q·c, add c = a + b, triad a = b + q·c; the written array is
    donated to its own update."""

    def __init__(self, op: str, elements: int, dtype: str, device_id: str):
        super().__init__()
        jax, jnp = _jax()
        J.require_fp64(dtype)
        dev = J.device(device_id)
        self.op, self.dtype = op, dtype
        dt = J.jnp_dtype(dtype)
        with jax.default_device(dev):
            keys = jax.random.split(jax.random.key(1234), 3)
            # Random, never zeros.
            self.arr = {n: (jax.random.uniform(k, (elements,), dtype=jnp.float32) + 1.0).astype(dt).block_until_ready()
                        for n, k in zip("abc", keys)}
        # (output name, input names, function of the inputs): the output array is passed
        # first and donated.
        self.spec = {
            "copy": ("c", ("a",), lambda a: jnp.copy(a)),
            "scale": ("b", ("c",), lambda c: (SCALAR * c).astype(dt)),
            "add": ("c", ("a", "b"), lambda a, b: a + b),
            "triad": ("a", ("b", "c"), lambda b, c: (b + SCALAR * c).astype(dt)),
        }[op]
        out_name, in_names, f = self.spec
        self.fn = _compiled(self, lambda o, *ins: f(*ins), self.arr[out_name], *(self.arr[n] for n in in_names), donate=(0,))
        self.extra.update(elements=elements, array_bytes=elements * DTYPE_BYTES[dtype], scalar=SCALAR)

    def run(self):
        out_name, in_names, _ = self.spec
        old = self.arr[out_name]
        self.out = self.arr[out_name] = self.fn(old, *(self.arr[n] for n in in_names))
        if "donation_honored" not in self.extra:
            self.extra["donation_honored"] = J.donated(old)
        return self.out

    def check(self) -> None:
        self.sync()
        a, b, c = (self.arr[n] for n in "abc")
        n = a.shape[0]
        idx = np.random.default_rng(5).integers(0, n, min(CHECK_POINTS, n))
        a64, b64, c64 = (J.to64(x[idx]) for x in (a, b, c))
        got, want = {
            "copy": (c64, a64),
            "scale": (b64, SCALAR * c64),
            "add": (c64, a64 + b64),
            "triad": (a64, b64 + SCALAR * c64),
        }[self.op]
        err = float(np.max(np.abs(got - want) / np.abs(want)))
        if not err <= STREAM_TOLERANCE[self.dtype]:
            raise ProbeCheckFailed(f"{self.op}: max relative error {err:.3g} > {STREAM_TOLERANCE[self.dtype]:g}")
        self.extra["max_rel_error"] = err
        if self.op == "copy":
            try:
                same = self.arr["c"].unsafe_buffer_pointer() == self.arr["a"].unsafe_buffer_pointer()
            except Exception:  # noqa: BLE001 - not every platform exposes buffer pointers
                same = False
            if same:
                raise ProbeCheckFailed("copy: output aliases the input buffer (nothing was copied)")


def build_stream(probe, ctx: CaseContext) -> Kernel:
    from probes.memory import MIB as _MIB

    p = ctx.params
    if p["size_mib"] == "auto":
        floor = 64 * _MIB if J.platform_of(ctx.device) == "cpu" else 256 * _MIB
        nbytes = max(4 * (J.cache_bytes(ctx.device, ctx.host) or 0), floor)
    else:
        nbytes = int(p["size_mib"]) * _MIB
    J.require_memory(ctx.device, 4 * nbytes, f"{probe.name} (3 arrays of {nbytes // _MIB} MiB + output)")
    resolved = {**p, "size_mib": nbytes // _MIB}
    kernel = StreamKernel(probe.op, nbytes // DTYPE_BYTES[p["dtype"]], p["dtype"], ctx.device)
    kernel.work = probe.work(resolved, ctx.device_info)
    kernel.params = resolved
    return kernel


# -- GEMM / projections (rotating copies) --------------------------------------------------
class MatmulKernel(JaxKernel):
    """y = x · W[i] for ``copies`` independent weights (rotated untimed); copies = 1 is
    a plain GEMM."""

    def __init__(self, m: int, n: int, k: int, dtype: str, device_id: str, copies: int = 1, seed: int = 4321):
        super().__init__()
        jax, jnp = _jax()
        dev = J.device(device_id)
        self.dtype, self.copies, self.index = dtype, copies, 0
        self.x = J.randn(seed, (m, k), dtype, dev, scale=1.0 / math.sqrt(k))
        self.w = [J.randn(seed + 1 + c, (k, n), dtype, dev) for c in range(copies)]
        prec = J.matmul_precision(dtype)
        self.fn = _compiled(self, lambda x, w: jnp.matmul(x, w, precision=prec), self.x, self.w[0])
        self.outs = [None] * copies
        self.extra.update(precision=str(prec), rotation_copies=copies)

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def run(self):
        self.out = self.outs[self.index] = self.fn(self.x, self.w[self.index])
        return self.out

    def check(self) -> None:
        self.sync()
        i = self.index
        y = self.outs[i]
        m, n = y.shape
        rows = J.sample(m, 32, 99)
        cols = J.sample(n, 256, 98)
        x64 = J.to64(self.x[rows])
        w64 = J.to64(self.w[i][:, cols])
        J.check_close(J.to64(y[rows][:, cols]), x64 @ w64, self.dtype, f"matmul copy {i}", self.extra)


def _record_native(ctx: CaseContext, work: Work, kernel: Kernel) -> Work:
    """Mark a case's dtype path (probes.native) in ``extra``; returns ``work``, for a dtype
    the CPU has no arithmetic for with ``peak_dtype`` fp32 (judged by the fp32 peak). No upcast is written here: XLA:CPU
    already computes bf16/fp16 dots in fp32 (measured on jax 0.10 at about the fp32 rate),
    so the emulated path is the compiler's own."""
    path = native_path(ctx.params["dtype"], ctx.device_info, ctx.host)
    if path.checked and not path.native:
        path = replace(path, via=path.via.replace("upcast", "upcast (XLA:CPU's own)"))
    return path.record(work, kernel.extra)


def build_gemm(probe, ctx: CaseContext) -> Kernel:
    from probes.gemm import gemm_work

    if reason := probe.skip_reason(ctx.params, ctx.device_info, ctx.host):
        raise ProbeSkip(reason)
    m, n, k = probe.dims(ctx.params)
    work = gemm_work(m, n, k, ctx.params["dtype"])
    J.require_memory(ctx.device, int(work.bytes + 4 * (m * k + k * n)), f"{probe.name} {m}x{n}x{k}")
    kernel = MatmulKernel(m, n, k, ctx.params["dtype"], ctx.device)
    work = _record_native(ctx, work, kernel)
    kernel.work, kernel.params = work, dict(ctx.params)
    return kernel


def build_decode_projection(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    if reason := probe.skip_reason(p, ctx.device_info, ctx.host):
        raise ProbeSkip(reason)
    in_f, out_f = _shape(p).projection(p["proj"])
    work = probe.work(p, ctx.device_info)
    copies = J.rotation_count(int(work.bytes), ctx.device, ctx.host)
    J.require_memory(ctx.device, int(copies * work.bytes + 4 * in_f * out_f), f"{probe.name} ({copies} weight copies)")
    kernel = MatmulKernel(p["batch"], out_f, in_f, p["dtype"], ctx.device, copies, seed=7)
    work = _record_native(ctx, work, kernel)
    kernel.work, kernel.params = work, dict(p)
    return kernel


# -- attention -----------------------------------------------------------------------------
def attention64(q, k, v, causal: bool, q_positions=None):
    """float64 attention: q [R, H, d], k/v [L, KV, d] (one sequence); query head h reads
    KV head h // (H / KV). Causal: query at position p sees keys 0..p."""
    h, kv = q.shape[1], k.shape[1]
    group = h // kv
    k64 = np.repeat(k, group, axis=1)
    v64 = np.repeat(v, group, axis=1)
    s = np.einsum("rhd,lhd->hrl", q, k64) / math.sqrt(q.shape[-1])
    if causal:
        mask = np.arange(k.shape[0])[None, :] > np.asarray(q_positions)[:, None]
        s = np.where(mask[None], -np.inf, s)
    return np.einsum("hrl,lhd->rhd", J.softmax64(s), v64)


class PrefillAttentionKernel(JaxKernel):
    def __init__(self, shape, batch: int, seq: int, dtype: str, device_id: str):
        super().__init__()
        jax, jnp = _jax()
        dev = J.device(device_id)
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.dtype = dtype
        self.q = J.randn(202, (batch, seq, h, d), dtype, dev)
        self.k = J.randn(203, (batch, seq, kv, d), dtype, dev)
        self.v = J.randn(204, (batch, seq, kv, d), dtype, dev)
        self.fn = _compiled(self, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
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
        pos = J.sample(seq, 128, 97, include=(0, seq - 1))
        q = J.to64(self.q[0][pos])  # [R, H, d]
        want = attention64(q, J.to64(self.k[0]), J.to64(self.v[0]), True, pos)[:, heads]
        got = J.to64(self.out[0][pos])[:, heads]
        J.check_close(got, want, self.dtype, "causal attention (batch 0, heads " + ",".join(map(str, heads)) + ")",
                      self.extra)


def _swiglu(jnp, x, w_gate_up, w_down, prec):
    gu = jnp.matmul(x, w_gate_up, precision=prec)
    gate, up = jnp.split(gu, 2, axis=-1)
    import jax

    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jnp.matmul(act, w_down, precision=prec)


class MlpKernel(JaxKernel):
    def __init__(self, shape, tokens: int, dtype: str, device_id: str):
        super().__init__()
        jax, jnp = _jax()
        dev = J.device(device_id)
        hid, inter = shape.hidden_size, shape.intermediate_size
        self.dtype = dtype
        self.x = J.randn(303, (tokens, hid), dtype, dev)
        self.wgu = J.randn(304, (hid, 2 * inter), dtype, dev, scale=1.0 / math.sqrt(hid))
        self.wd = J.randn(305, (inter, hid), dtype, dev, scale=1.0 / math.sqrt(inter))
        prec = J.matmul_precision(dtype)
        self.fn = _compiled(self, lambda x, a, b: _swiglu(jnp, x, a, b, prec), self.x, self.wgu, self.wd)

    def run(self):
        self.out = self.fn(self.x, self.wgu, self.wd)
        return self.out

    def check(self) -> None:
        self.sync()
        m, n = self.out.shape
        rows, cols = J.sample(m, 32, 96), J.sample(n, 256, 95)
        gu = J.to64(self.x[rows]) @ J.to64(self.wgu)
        gate, up = np.split(gu, 2, axis=-1)
        want = (J.silu64(gate) * up) @ J.to64(self.wd[:, cols])
        J.check_close(J.to64(self.out[rows][:, cols]), want, self.dtype, "SwiGLU MLP", self.extra)


def _rms(jnp, x, w, eps=1e-5):
    x32 = x.astype(jnp.float32)
    n = x32 * (1.0 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return (n * w.astype(jnp.float32)).astype(x.dtype)


class LayerWeights:
    def __init__(self, shape, dtype, dev, seed):
        names = ("qkv", "o", "gate_up", "down")
        for j, name in enumerate(names):
            in_f, out_f = shape.projection(name)
            setattr(self, name, J.randn(seed + j, (in_f, out_f), dtype, dev, scale=1.0 / math.sqrt(in_f)))
        h = shape.hidden_size
        _, jnp = _jax()
        self.norm1 = (J.randn(seed + 10, (h,), "fp32", dev, scale=0.1) + 1.0).astype(J.jnp_dtype(dtype))
        self.norm2 = (J.randn(seed + 11, (h,), "fp32", dev, scale=0.1) + 1.0).astype(J.jnp_dtype(dtype))

    def tree(self):
        return (self.qkv, self.o, self.gate_up, self.down, self.norm1, self.norm2)


def prefill_layer_fn(shape, dtype):
    jax, jnp = _jax()
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


def _layer64_weights(w: LayerWeights):
    return {n: J.to64(getattr(w, n)) for n in ("qkv", "o", "gate_up", "down", "norm1", "norm2")}


class PrefillLayerKernel(JaxKernel):
    def __init__(self, shape, batch: int, seq: int, dtype: str, device_id: str):
        super().__init__()
        dev = J.device(device_id)
        self.shape, self.dtype = shape, dtype
        self.w = LayerWeights(shape, dtype, dev, 404)
        self.x = J.randn(400, (batch, seq, shape.hidden_size), dtype, dev)
        self.fn = _compiled(self, prefill_layer_fn(shape, dtype), self.x, *self.w.tree())
        self.extra.update(rotary="omitted (elementwise on q and k)", attention="jax.nn.dot_product_attention(is_causal=True)")

    def run(self):
        self.out = self.fn(self.x, *self.w.tree())
        return self.out

    def check(self) -> None:
        self.sync()
        s = self.shape
        h, kv, d = s.num_heads, s.num_kv_heads, s.head_dim
        seq = self.x.shape[1]
        pos = J.sample(seq, 32, 94, include=(seq - 1,))
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


def build_prefill(probe, ctx: CaseContext, kind: str) -> Kernel:
    p = ctx.params
    if reason := probe.skip_reason(p, ctx.device_info, ctx.host):
        raise ProbeSkip(reason)
    shape = _shape(p)
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
    work = _record_native(ctx, work, kernel)
    kernel.work, kernel.params = work, dict(p)
    return kernel


# -- decode attention ----------------------------------------------------------------------
def paged_attention_fn(batch: int, heads: int, kv_heads: int, d: int, n_blocks: int, chunk: int):
    """One query token per sequence over KV in a block pool [blocks, 16, KV, d], read
    ``chunk`` blocks at a time through the block table with an online softmax."""
    jax, jnp = _jax()
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


class DecodeAttentionKernel(JaxKernel):
    def __init__(self, shape, batch: int, ctx_len: int, layout: str, dtype: str, device_id: str, copies: int, host: dict):
        super().__init__()
        jax, jnp = _jax()
        dev = J.device(device_id)
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.dtype, self.layout, self.copies, self.index = dtype, layout, copies, 0
        self.q = J.randn(11, (batch, 1, h, d), dtype, dev)
        self.outs = [None] * copies
        if layout == "contiguous":
            self.k = [J.randn(100 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
            self.v = [J.randn(200 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
            self.fn = _compiled(self, lambda q, k, v: jax.nn.dot_product_attention(q, k, v), self.q, self.k[0], self.v[0])
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
            self.fn = _compiled(self, paged_attention_fn(batch, h, kv, d, n_blocks, chunk),
                                self.q, self.k_pool, self.v_pool, self.tables[0])
            self.extra.update(block_tokens=BLOCK_TOKENS, chunk_blocks=chunk, pool_blocks=total,
                              attention="lax.scan over gathered block chunks, online softmax")
        self.extra.update(rotation_copies=copies, layout_dims="[batch, ctx, kv_heads, head_dim]")

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def run(self):
        i = self.index
        if self.layout == "contiguous":
            self.out = self.outs[i] = self.fn(self.q, self.k[i], self.v[i])
        else:
            self.out = self.outs[i] = self.fn(self.q, self.k_pool, self.v_pool, self.tables[i])
        return self.out

    def kv_of(self, i: int, seq: int):
        if self.layout == "contiguous":
            return J.to64(self.k[i][seq]), J.to64(self.v[i][seq])
        ids = np.asarray(self.tables[i][seq])
        kp, vp = J.to64(self.k_pool[ids]), J.to64(self.v_pool[ids])
        return kp.reshape(-1, *kp.shape[2:]), vp.reshape(-1, *vp.shape[2:])

    def check(self) -> None:
        self.sync()
        i = self.index
        for seq in sorted({0, self.q.shape[0] - 1}):
            k, v = self.kv_of(i, seq)
            want = attention64(J.to64(self.q[seq]), k, v, False)
            J.check_close(J.to64(self.outs[i][seq]), want, self.dtype, f"{self.layout} attention, sequence {seq}", self.extra)


def build_decode_attention(probe, ctx: CaseContext) -> Kernel:
    from probes.decode import kv_bytes
    p = ctx.params
    if reason := probe.skip_reason(p, ctx.device_info, ctx.host):
        raise ProbeSkip(reason)
    shape = _shape(p)
    work = probe.work(p, ctx.device_info)
    copies = J.rotation_count(int(work.bytes), ctx.device, ctx.host)
    J.require_memory(ctx.device, int(copies * work.bytes * 1.1 + 4 * kv_bytes(shape, p["batch"], p["ctx"], "fp32")),
                     f"{probe.name} ({copies} KV copies)")
    kernel = DecodeAttentionKernel(shape, p["batch"], p["ctx"], p["layout"], p["dtype"], ctx.device, copies, ctx.host)
    work = _record_native(ctx, work, kernel)
    kernel.work, kernel.params = work, dict(p)
    return kernel


def decode_layer_fn(shape, dtype):
    """One decode step: the cache holds ctx-1 earlier tokens (slots 0..ctx-2); the new
    token's K/V (slot ctx-1) join the softmax, and are returned as outputs (JAX arrays
    are immutable: writing them into the cache would copy it unless donated)."""
    jax, jnp = _jax()
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


class DecodeLayerKernel(JaxKernel):
    def __init__(self, shape, batch: int, ctx_len: int, dtype: str, device_id: str, copies: int):
        super().__init__()
        dev = J.device(device_id)
        kv, d = shape.num_kv_heads, shape.head_dim
        self.shape, self.dtype, self.copies, self.index = shape, dtype, copies, 0
        self.x = J.randn(17, (batch, shape.hidden_size), dtype, dev)
        self.weights = [LayerWeights(shape, dtype, dev, 1000 + 20 * c) for c in range(copies)]
        self.k = [J.randn(300 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
        self.v = [J.randn(400 + c, (batch, ctx_len, kv, d), dtype, dev) for c in range(copies)]
        self.fn = _compiled(self, decode_layer_fn(shape, dtype), self.x, self.k[0], self.v[0], *self.weights[0].tree())
        self.outs = [None] * copies
        self.extra.update(rotation_copies=copies, rotary="omitted (elementwise, no memory traffic of note)",
                          kv_append="the new token's K/V are outputs (cache slot ctx-1), the cache is not copied")

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def run(self):
        i = self.index
        self.out = self.outs[i] = self.fn(self.x, self.k[i], self.v[i], *self.weights[i].tree())
        return self.out

    def check(self) -> None:
        self.sync()
        i, s = self.index, self.shape
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
        J.check_close(J.to64(self.outs[i][0][0:1]), want, self.dtype, "decoder layer", self.extra)


def build_decode_layer(probe, ctx: CaseContext) -> Kernel:
    p = ctx.params
    if reason := probe.skip_reason(p, ctx.device_info, ctx.host):
        raise ProbeSkip(reason)
    shape = _shape(p)
    work = probe.work(p, ctx.device_info)
    copies = J.rotation_count(int(work.bytes), ctx.device, ctx.host)
    J.require_memory(ctx.device, int(copies * work.bytes * 1.2), f"{probe.name} ({copies} copies of weights and KV)")
    kernel = DecodeLayerKernel(shape, p["batch"], p["ctx"], p["dtype"], ctx.device, copies)
    work = _record_native(ctx, work, kernel)
    kernel.work, kernel.params = work, dict(p)
    return kernel
