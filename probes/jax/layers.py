"""Model pieces the JAX prefill and decode kernels share: float64 attention reference,
SwiGLU, RMSNorm, one decoder layer's weights.

jax is imported inside the functions, never at module import.
"""

from __future__ import annotations

import math

import numpy as np

from probes.jax import common as J


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


def _swiglu(jnp, x, w_gate_up, w_down, prec):
    gu = jnp.matmul(x, w_gate_up, precision=prec)
    gate, up = jnp.split(gu, 2, axis=-1)
    import jax

    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jnp.matmul(act, w_down, precision=prec)


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
        self.norm1 = (J.randn(seed + 10, (h,), "fp32", dev, scale=0.1) + 1.0).astype(J.jnp_dtype(dtype))
        self.norm2 = (J.randn(seed + 11, (h,), "fp32", dev, scale=0.1) + 1.0).astype(J.jnp_dtype(dtype))

    def tree(self):
        return (self.qkv, self.o, self.gate_up, self.down, self.norm1, self.norm2)


def _layer64_weights(w: LayerWeights):
    return {n: J.to64(getattr(w, n)) for n in ("qkv", "o", "gate_up", "down", "norm1", "norm2")}
