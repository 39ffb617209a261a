from __future__ import annotations

import pytest

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.execute import prepare_case
from harness.registry import CaseContext, kernel_entry
from probes import prefill
from probes.jax import prefill as jax_prefill
from probes.models import load_model
from probes.torch import moe as torch_moe
from probes.torch import prefill as torch_prefill
from tests.probes.helpers import cpu_device, host, run

FAST = {"warmup": 1, "min_reps": 2, "max_reps": 3, "budget_s": 0.05}
PROBES = {
    "prefill.projection": prefill.PrefillProjection,
    "prefill.attention": prefill.PrefillAttention,
    "prefill.mlp": prefill.PrefillMlp,
    "prefill.layer": prefill.PrefillLayer,
}


def _params(probe: str, **over) -> dict:
    p = {"model": "tiny", "batch": 1, "seq": 64, "dtype": "fp32"}
    if probe == "prefill.projection":
        p["proj"] = "qkv"
    return {**p, **over}


def _kernel(probe: str, **over):
    params = _params(probe, **over)
    ctx = CaseContext("id", probe, params, "cpu:0", cpu_device(), "torch", host())
    return prepare_case(ctx)


# -- work models ---------------------------------------------------------------------------
def test_projection_work_hand_computed():
    w = prefill.PrefillProjection().work({"model": "llama-3.1-8b", "proj": "qkv", "batch": 1, "seq": 512, "dtype": "bf16"}, {})
    assert w.flops == 2 * 512 * 4096 * 6144 == 25_769_803_776
    assert w.bytes == 2 * (4096 * 6144 + 512 * (4096 + 6144))
    assert w.bound == "compute" and w.dtype == "bf16"
    # llama-2-7b has no GQA: K and V as wide as Q, so the fused QKV is 3 x 4096 wide.
    w7 = prefill.PrefillProjection().work({"model": "llama-2-7b", "proj": "qkv", "batch": 2, "seq": 256, "dtype": "fp32"}, {})
    assert w7.flops == 2 * 512 * 4096 * 12288
    assert w7.bytes == 4 * (4096 * 12288 + 512 * (4096 + 12288))
    down = prefill.PrefillProjection().work({"model": "llama-3.1-8b", "proj": "down", "batch": 1, "seq": 2048, "dtype": "bf16"}, {})
    assert down.flops == 2 * 2048 * 14336 * 4096
    # One token is a GEMV: memory-bound where the ridge is unknown.
    gemv = prefill.PrefillProjection().work({"model": "llama-3.1-8b", "proj": "o", "batch": 1, "seq": 1, "dtype": "bf16"}, {})
    assert gemv.bound == "memory"


def test_attention_work_hand_computed():
    w = prefill.PrefillAttention().work({"model": "llama-3.1-70b", "batch": 1, "seq": 2048, "dtype": "bf16"}, {})
    assert w.flops == 4 * 1 * 2048**2 * 64 * 128 / 2 == 68_719_476_736
    # q and output: 64 heads each; k and v: 8 kv heads each; 128 dims, 2 bytes.
    assert w.bytes == 2 * 2048 * 128 * (64 + 64 + 8 + 8)
    assert w.bound == "compute"
    # Same query heads (32 x 128) for llama-2-7b and llama-3.1-8b: same FLOPs; K/V 32 vs 8 heads.
    p = {"batch": 2, "seq": 512, "dtype": "bf16"}
    w7 = prefill.PrefillAttention().work({"model": "llama-2-7b", **p}, {})
    w8 = prefill.PrefillAttention().work({"model": "llama-3.1-8b", **p}, {})
    assert w7.flops == w8.flops == 4 * 2 * 512**2 * 32 * 128 / 2
    assert w7.bytes == 2 * 2 * 512 * 128 * (32 + 32 + 32 + 32)
    assert w8.bytes == 2 * 2 * 512 * 128 * (32 + 32 + 8 + 8)


def test_mlp_and_layer_work_are_sums_of_parts():
    t = 2 * 64  # tiny: hidden 1024, intermediate 2816, 16 x 64 q heads, 4 x 64 kv heads
    mlp = prefill.PrefillMlp().work({"model": "tiny", "batch": 2, "seq": 64, "dtype": "fp32"}, {})
    assert mlp.flops == 2 * t * 1024 * 5632 + 2 * t * 2816 * 1024 + 3 * t * 2816
    assert mlp.bytes == 4 * (1024 * 5632 + t * (1024 + 5632)) + 4 * (2816 * 1024 + t * (2816 + 1024))
    layer = prefill.PrefillLayer().work({"model": "tiny", "batch": 2, "seq": 64, "dtype": "fp32"}, {})
    qkv = 2 * t * 1024 * 1536
    o = 2 * t * 1024 * 1024
    attn = 4 * 2 * 64**2 * 16 * 64 / 2
    assert layer.flops == qkv + o + attn + mlp.flops
    attn_bytes = 4 * t * 64 * (16 + 16 + 4 + 4)
    proj_bytes = 4 * (1024 * 1536 + t * (1024 + 1536)) + 4 * (1024 * 1024 + t * 2048)
    assert layer.bytes == proj_bytes + attn_bytes + mlp.bytes


def test_default_grids():
    for cls in PROBES.values():
        assert cls.family == "prefill"
        assert cls.params["model"].default == ("llama-3.1-8b",)
        assert cls.params["batch"].default == (1,)
        assert cls.params["seq"].default == (512, 2048)
        assert cls.params["dtype"].default == ("bf16",)
        assert set(cls.params["dtype"].choices) == {"fp32", "bf16", "fp16"}
        assert {"tiny", "llama-2-7b", "llama-3.1-70b", "mixtral-8x7b"} <= set(cls.params["model"].choices)
    assert prefill.PrefillProjection.params["proj"].default == ("qkv", "o", "gate_up", "down")


# -- running -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("probe", list(PROBES))
def test_runs_ok_on_cpu(probe, dtype):
    # Every CPU runs bf16 (natively or through fp32, probes.native): no skip.
    params = _params(probe, dtype=dtype, batch=2)
    r = run(probe, params, FAST)
    assert r["status"] == "ok", r
    assert r["resolved_params"] == params
    assert r["work"]["flops"] == PROBES[probe]().work(params, {}).flops > 0
    assert r["work"]["dtype"] == dtype
    assert r["extra"]["rel_error"] < {"fp32": 1e-5, "bf16": 1e-2}[dtype]
    if probe in ("prefill.attention", "prefill.layer"):
        backend = r["extra"]["sdpa_backend"]
        assert backend and not backend.startswith("unknown"), backend
        assert r["extra"]["enable_gqa"] is True  # tiny: 16 q heads, 4 kv heads


def test_projection_covers_every_projection_shape():
    shape = load_model("tiny")
    for proj in ("o", "gate_up", "down"):
        k = _kernel("prefill.projection", proj=proj, seq=8)
        assert tuple(k.w.shape) == shape.projection(proj) and k.x.shape[0] == 8
        k.run()
        k.check()
        k.close()


def test_fp16_on_a_cpu_without_it_is_measured_through_fp32():
    r = run("prefill.attention", _params("prefill.attention", dtype="fp16"), FAST, isa={"avx2": True, "fma": True})
    assert r["status"] == "ok", r.get("reason")
    assert r["extra"]["native"] is False and r["work"]["peak_dtype"] == "fp32"


def test_too_big_is_skipped_before_allocating():
    with pytest.raises(ProbeSkip, match="MiB"):
        _kernel("prefill.layer", model="llama-3.1-70b", batch=64, seq=131072)


# -- checks --------------------------------------------------------------------------------
OUTPUT = {"prefill.projection": "y", "prefill.attention": "out", "prefill.mlp": "y", "prefill.layer": "out"}


@pytest.mark.parametrize("probe", list(PROBES))
def test_scaled_output_fails_the_check(probe):
    kernel = _kernel(probe)
    kernel.run()
    kernel.check()
    getattr(kernel, OUTPUT[probe]).mul_(1.01)  # a kernel that is off by 1 %
    with pytest.raises(ProbeCheckFailed, match="relative error"):
        kernel.check()


def test_gqa_attention_matches_the_reference():
    shape = load_model("tiny")
    assert shape.num_heads != shape.num_kv_heads
    kernel = _kernel("prefill.attention", seq=96)
    kernel.run()
    kernel.check()
    assert kernel.gqa and kernel.extra["rel_error"] < 1e-5


def test_gqa_head_mapping_is_checked():
    """Query head h reads KV head h // group; a kernel pairing heads the other way
    (tiling the KV heads, h % kv_heads) must fail."""
    import torch.nn.functional as F

    kernel = _kernel("prefill.attention", seq=64)
    kernel.run()
    group = kernel.group
    tiled_k, tiled_v = kernel.k.repeat(1, group, 1, 1), kernel.v.repeat(1, group, 1, 1)
    kernel.out = F.scaled_dot_product_attention(kernel.q, tiled_k, tiled_v, is_causal=True)
    with pytest.raises(ProbeCheckFailed):
        kernel.check()


def test_attention_without_gqa_runs():
    r = run("prefill.attention", _params("prefill.attention", model="llama-2-7b", seq=32), FAST)
    assert r["status"] == "ok", r
    assert r["extra"]["enable_gqa"] is False and r["extra"]["rel_error"] < 1e-5


def test_causal_reference_masks_the_future():
    import torch

    q = torch.randn(2, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 5, 8, dtype=torch.float64)
    v = torch.randn(1, 5, 8, dtype=torch.float64)
    pos = torch.tensor([0, 2, 4])
    out = torch_prefill.causal_attention_reference(q, k, v, pos, [0, 1], group=2)
    # Position 0 sees only itself; the last position sees everything (plain softmax).
    assert torch.allclose(out[:, 0], v[0, 0].expand(2, 8))
    full = (q[1, 2] @ k[0].T / 8**0.5).softmax(-1) @ v[0]
    assert torch.allclose(out[1, 2], full)


# -- MoE (tiny-moe: hidden 1024, 8 experts of 704, top-2) ----------------------------------------
def test_moe_mlp_work_by_hand():
    t, h, f = 2 * 64, 1024, 704
    w = prefill.PrefillMlp().work({"model": "tiny-moe", "batch": 2, "seq": 64, "dtype": "fp32"}, {})
    rows = 2 * t  # each token through its 2 experts
    flops = 2 * t * h * 8 + rows * (2 * h * 2 * f + 2 * f * h) + 3 * rows * f
    assert w.flops == flops
    touched = 8 * (1 - 0.75**t)  # 128 tokens: all 8 experts (to 1e-15)
    weights = touched * (h * 2 * f + f * h)
    acts = rows * (h + 2 * f) + rows * (f + h)
    assert w.bytes == pytest.approx(4 * (h * 8 + t * (h + 8) + weights + acts))
    one = prefill.PrefillMlp().work({"model": "tiny-moe", "batch": 1, "seq": 1, "dtype": "fp32"}, {})
    assert one.bytes == pytest.approx(4 * (h * 8 + (h + 8) + 2 * (h * 2 * f + f * h) + 2 * (h + 2 * f) + 2 * (f + h)))
    layer = prefill.PrefillLayer().work({"model": "tiny-moe", "batch": 2, "seq": 64, "dtype": "fp32"}, {})
    shape = load_model("tiny-moe")
    parts = [prefill.projection_work(shape, p, 2, 64, "fp32") for p in ("qkv", "o")]
    parts += [prefill.attention_work(shape, 2, 64, "fp32"), w]
    assert layer.flops == pytest.approx(sum(p.flops for p in parts))
    assert layer.bytes == pytest.approx(sum(p.bytes for p in parts))


@pytest.mark.parametrize("probe", ["prefill.mlp", "prefill.layer"])
def test_moe_mlp_and_layer_run_and_check(probe):
    r = run(probe, _params(probe, model="tiny-moe", batch=2, seq=32), FAST)
    assert r["status"] == "ok", r
    assert r["extra"]["experts_touched"] == 8 and r["extra"]["rel_error"] < 1e-4  # 64 tokens reach every expert


@pytest.mark.parametrize("probe", ["prefill.mlp", "prefill.layer"])
def test_a_wrong_routing_fails_the_moe_prefill_check(monkeypatch, probe):
    kernel = _kernel(probe, model="tiny-moe", seq=32)
    kernel.run()
    kernel.check()

    def shifted(logits, k):  # every token sent to the next experts over
        gates, ids = logits.float().topk(k, dim=-1)
        return gates.softmax(-1), (ids + 1) % logits.shape[-1]

    monkeypatch.setattr(torch_moe, "route", shifted)
    kernel.run()
    with pytest.raises(ProbeCheckFailed, match="routing"):
        kernel.check()


@pytest.mark.parametrize("probe", ["prefill.mlp", "prefill.layer"])
def test_moe_on_jax_is_skipped_with_its_reason(probe):
    assert kernel_entry(PROBES[probe], "jax").build is jax_prefill.build_prefill
    ctx = CaseContext("id", probe, _params(probe, model="tiny-moe"), "cpu:0", cpu_device(), "jax", host())
    with pytest.raises(ProbeSkip, match="MoE .*torch backend only"):
        prepare_case(ctx)
