from __future__ import annotations

import math

import pytest

from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import decode
from probes.models import load_model
from probes.torch import decode as torch_decode  # the torch kernels (registers their builders)
from probes.native import cpu_native
from tests.probes.helpers import cpu_device, host, run

FAST = {"min_reps": 2, "max_reps": 3, "budget_s": 0.1}


def test_kv_bytes_formula_hand_computed():
    # llama-3.1-8b: 8 kv heads x 128 dims; llama-2-7b: 32 x 128 (no GQA)
    assert decode.kv_bytes(load_model("llama-3.1-8b"), 1, 4096, "bf16") == 2 * 8 * 128 * 4096 * 2 == 16_777_216
    assert decode.kv_bytes(load_model("llama-2-7b"), 2, 1000, "fp32") == 2 * (2 * 32 * 128 * 1000 * 4)


def test_attention_work_model_hand_computed():
    w = decode.DecodeAttention().work({"model": "llama-3.1-70b", "batch": 4, "ctx": 8192, "layout": "paged", "dtype": "bf16"}, {})
    assert w.flops == 4 * 4 * 64 * 8192 * 128  # QK and PV for one query token, 64 heads
    assert w.bytes == 4 * 2 * 8 * 128 * 8192 * 2 + 2 * 4 * 64 * 128 * 2
    assert w.bound == "memory"  # intensity ~ heads/kv_heads = 8 FLOP/B


def test_projection_work_model_hand_computed():
    w = decode.DecodeProjection().work({"model": "llama-3.1-8b", "proj": "qkv", "batch": 1, "dtype": "bf16"}, {})
    assert w.flops == 2 * 4096 * 6144
    assert w.bytes == 2 * (4096 * 6144 + 4096 + 6144)
    assert w.bound == "memory"
    big = decode.DecodeProjection().work({"model": "llama-3.1-8b", "proj": "qkv", "batch": 256, "dtype": "bf16"}, {})
    assert big.bound == "compute"


def test_layer_work_model_counts_weights_and_kv():
    shape = load_model("tiny")
    w = decode.DecodeLayer().work({"model": "tiny", "batch": 2, "ctx": 512, "dtype": "fp32"}, {})
    weights = 1024 * 1536 + 1024 * 1024 + 1024 * 2 * 2816 + 2816 * 1024
    assert w.flops == 2 * 2 * weights + 4 * 2 * 16 * 512 * 64
    assert w.bytes >= weights * 4 + decode.kv_bytes(shape, 2, 512, "fp32")


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_runs_and_checks(layout, dtype):
    r = run("decode.attention", {"model": "tiny", "batch": 2, "ctx": 256, "layout": layout, "dtype": dtype}, FAST)
    assert r["status"] == "ok", r
    # Run on any CPU, bf16 included (emulated through fp32 where the CPU has no bf16
    # arithmetic, and marked so; both machines are asserted in test_native.py).
    assert r["extra"].get("native", True) is cpu_native(dtype, host()).native
    assert r["extra"]["rotation_copies"] >= 1
    if layout == "contiguous":
        assert r["extra"]["sdpa_backend"] and not r["extra"]["sdpa_backend"].startswith("unknown")


def _attention_kernel(layout, batch=2, ctx=512):
    params = {"model": "tiny", "batch": batch, "ctx": ctx, "layout": layout, "dtype": "fp32"}
    return prepare_case(CaseContext("id", "decode.attention", params, "cpu:0", cpu_device(), "torch", host()))


def test_paged_layout_reads_the_same_kv_as_contiguous():
    import torch

    paged = _attention_kernel("paged")
    contiguous = _attention_kernel("contiguous")
    # Scatter the contiguous cache of copy 0 into the paged pool through its block table.
    kv, d = contiguous.k[0].shape[1], contiguous.k[0].shape[-1]
    for seq in range(2):
        ids = paged.tables[0][seq]
        blocks_k = contiguous.k[0][seq].reshape(kv, -1, decode.BLOCK_TOKENS, d).permute(1, 2, 0, 3)
        blocks_v = contiguous.v[0][seq].reshape(kv, -1, decode.BLOCK_TOKENS, d).permute(1, 2, 0, 3)
        paged.k_pool[ids] = blocks_k
        paged.v_pool[ids] = blocks_v
        k, v = paged.kv_of(0, seq)
        assert torch.equal(k, contiguous.k[0][seq : seq + 1]) and torch.equal(v, contiguous.v[0][seq : seq + 1])
    paged.q.copy_(contiguous.q)
    paged.index = contiguous.index = 0
    paged.run()
    contiguous.run()
    assert torch.allclose(paged.out[0], contiguous.out[0], rtol=1e-5, atol=1e-6)
    # The blocks really are scattered: consecutive blocks of a sequence are not neighbours.
    table = paged.tables[0][0]
    assert (table[1:] - table[:-1] != 1).any()


def test_paged_online_softmax_matches_reference_across_chunks():
    import torch

    k = _attention_kernel("paged", batch=1, ctx=1024)
    k.chunk_blocks = 5  # uneven chunks: 64 blocks in 13 chunks
    k.index = 0
    k.run()
    kk, vv = k.kv_of(0, 0)
    want = torch_decode.attention_reference(k.q, kk, vv)
    assert torch.allclose(k.out[0].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_wrong_attention_fails_the_check(layout):
    kernel = _attention_kernel(layout)
    kernel.run()
    kernel.check()
    kernel.out[kernel.index] = kernel.out[kernel.index] * 1.01
    with pytest.raises(ProbeCheckFailed):
        kernel.check()


def test_single_token_step_does_not_use_top_left_causal_mask():
    """With is_causal=True a 1-token query would attend to the first cache entry only;
    the probe's output must equal full attention over the cache."""
    import torch
    import torch.nn.functional as F

    kernel = _attention_kernel("contiguous", batch=1, ctx=64)
    kernel.run()
    q, k, v = kernel.q, kernel.k[kernel.index], kernel.v[kernel.index]
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not torch.allclose(kernel.out[kernel.index], top_left)
    assert torch.allclose(kernel.out[kernel.index].double(), torch_decode.attention_reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_projection_and_layer_run_and_check():
    r = run("decode.projection", {"model": "tiny", "proj": "down", "batch": 3, "dtype": "fp32"}, FAST)
    assert r["status"] == "ok", r
    # Weights rotated past 4x the LLC: consecutive repetitions never hit in cache.
    llc = host()["last_level_cache_bytes"]
    assert r["extra"]["rotation_copies"] * r["work"]["bytes"] >= 4 * llc or r["extra"]["rotation_copies"] == 64
    r = run("decode.layer", {"model": "tiny", "batch": 2, "ctx": 128, "dtype": "fp32"}, FAST)
    assert r["status"] == "ok", r
    assert r["extra"]["rel_error"] < 1e-5


def test_wrong_projection_and_layer_fail_the_check():
    ctx = CaseContext("id", "decode.projection", {"model": "tiny", "proj": "o", "batch": 2, "dtype": "fp32"}, "cpu:0", cpu_device(), "torch", host())
    kernel = prepare_case(ctx)
    kernel.run()
    kernel.check()
    kernel.y[kernel.index].mul_(1.01)
    with pytest.raises(ProbeCheckFailed):
        kernel.check()
    ctx = CaseContext("id", "decode.layer", {"model": "tiny", "batch": 1, "ctx": 64, "dtype": "fp32"}, "cpu:0", cpu_device(), "torch", host())
    layer = prepare_case(ctx)
    layer.run()
    layer.check()
    layer.out[layer.index] = layer.out[layer.index] * 1.01
    with pytest.raises(ProbeCheckFailed):
        layer.check()


def test_rotation_count_covers_four_llc():
    from probes.torch.common import rotation_count

    h = {"last_level_cache_bytes": 32 * 2**20}
    assert rotation_count(8 * 2**20, "cpu:0", h) == 16
    assert rotation_count(200 * 2**20, "cpu:0", h) == 1
    assert rotation_count(1, "cpu:0", h) == 64  # capped
    assert math.ceil(4 * 32 / 3) == rotation_count(3 * 2**20, "cpu:0", h)


def test_the_gpu_paged_method_computes_the_same_attention():
    """gather+SDPA (the CUDA default) and the chunked online softmax (the CPU default)
    agree, and the check catches a wrong result of the GPU method."""
    import torch

    kernel = _attention_kernel("paged", batch=3, ctx=256)
    kernel.index = 0
    kernel.run()
    chunked = kernel.out[0].clone()
    assert kernel.paged_kernel == "chunked"
    kernel.paged_kernel = "gather_sdpa"
    kernel.run()
    kernel.check()
    assert torch.allclose(kernel.out[0], chunked, rtol=1e-5, atol=1e-6)
    kernel.out[0] = kernel.out[0] * 1.01
    with pytest.raises(ProbeCheckFailed):
        kernel.check()


# -- MoE (mixtral-8x7b, tiny-moe) --------------------------------------------------------------
def _mixtral_layer(batch: int):
    return decode.DecodeLayer().work({"model": "mixtral-8x7b", "batch": batch, "ctx": 4096, "dtype": "fp32"}, {})


def test_mixtral_layer_bytes_are_attention_router_and_two_experts_at_batch_1():
    # From Mixtral's config.json: hidden 4096, 32 heads, 8 KV heads of 128, experts of
    # 14336, 8 experts, top-2. One token touches the attention, the router and 2 experts.
    attention = 4096 * (4096 + 2 * 8 * 128) + 4096 * 4096
    router = 4096 * 8
    expert = 4096 * 2 * 14336 + 14336 * 4096
    weights = attention + router + 2 * expert
    assert weights == pytest.approx(394e6, rel=2e-3)  # "about 394 M weight elements"
    kv_read = 2 * 8 * 128 * 4096 * 4
    w = _mixtral_layer(1)
    assert w.bytes == pytest.approx(weights * 4 + kv_read, rel=0.02)
    assert w.bytes < (attention + router + 3 * expert) * 4  # not a third expert, nor all 8
    # FLOPs: the token through its 2 experts, the router and attention over 4096 tokens.
    assert w.flops == 2 * weights + 4 * 32 * 4096 * 128


def test_mixtral_layer_bytes_at_batch_64_are_close_to_all_eight_experts():
    attention = 4096 * (4096 + 2 * 8 * 128) + 4096 * 4096
    expert = 4096 * 2 * 14336 + 14336 * 4096
    kv_read = 64 * 2 * 8 * 128 * 4096 * 4
    w = _mixtral_layer(64)
    touched = (w.bytes - kv_read) / 4 - attention - 4096 * 8
    assert touched / expert == pytest.approx(8.0, rel=1e-3)
    # FLOPs still count each token's 2 experts, not all 8.
    assert w.flops == 64 * 2 * (attention + 4096 * 8 + 2 * expert) + 4 * 64 * 32 * 4096 * 128


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_moe_layer_runs_and_checks_the_routing(dtype):
    r = run("decode.layer", {"model": "tiny-moe", "batch": 4, "ctx": 64, "dtype": dtype}, FAST)
    assert r["status"] == "ok", r
    x = r["extra"]
    assert x["num_experts"] == 8 and x["experts_per_token"] == 2
    assert 2 <= x["experts_touched"] <= 8 and x["experts_touched_model"] == pytest.approx(8 * (1 - 0.75**4))
    assert "routing_near_ties" in x and "cuda_graph" not in x


def _moe_layer_kernel():
    ctx = CaseContext("id", "decode.layer", {"model": "tiny-moe", "batch": 3, "ctx": 32, "dtype": "fp32"}, "cpu:0",
                      cpu_device(), "torch", host())
    return prepare_case(ctx)


def test_a_wrong_routing_fails_the_moe_layer_check(monkeypatch):
    from probes.torch import moe

    layer = _moe_layer_kernel()
    layer.run()
    layer.check()  # the right routing passes

    def lowest_k(logits, k):  # the k experts with the *smallest* logits
        values, ids = (-logits.float()).topk(k, dim=-1)
        return (-values).softmax(dim=-1), ids

    monkeypatch.setattr(moe, "route", lowest_k)
    layer.run()
    with pytest.raises(ProbeCheckFailed, match="routing"):
        layer.check()


def test_unnormalized_gates_fail_the_moe_layer_check(monkeypatch):
    from probes.torch import moe

    layer = _moe_layer_kernel()

    def softmax_all_no_renorm(logits, k):  # the right experts, gates not renormalized over the top k
        probs = logits.float().softmax(dim=-1)
        return probs.topk(k, dim=-1)

    monkeypatch.setattr(moe, "route", softmax_all_no_renorm)
    layer.run()
    with pytest.raises(ProbeCheckFailed, match="decoder layer"):
        layer.check()


def test_moe_layer_on_jax_is_skipped_with_its_reason():
    from importlib import import_module

    from harness.errors import ProbeSkip

    import_module("probes.jax.decode")  # registers the JAX builders
    ctx = CaseContext("id", "decode.layer", {"model": "tiny-moe", "batch": 1, "ctx": 32, "dtype": "fp32"}, "cpu:0",
                      cpu_device(), "jax", host())
    with pytest.raises(ProbeSkip, match="MoE .*torch backend only"):
        prepare_case(ctx)


def test_moe_routing_is_reproducible_from_the_seeds():
    a, b = _moe_layer_kernel(), _moe_layer_kernel()
    for k in (a, b):
        k.run()
    ids_a, ids_b = a.weights[a.index].routing, b.weights[b.index].routing
    assert ids_a.shape == (3, 2) and ids_a.tolist() == ids_b.tolist()
    a.run()  # the same copy's inputs route the same way every repetition
    assert a.weights[a.index].routing.tolist() == ids_a.tolist()
