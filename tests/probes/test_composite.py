"""Composite probes: work models by hand, Megatron sharding equal to the unsharded layer,
the correctness checks failing on a wrong step, per-rank compute/comm columns adding up
to the step time, request timelines (TTFT < e2e, queueing under an overloaded Poisson
stream), and the planned T_pred components."""

from __future__ import annotations

import numpy as np
import pytest

from harness import registry
from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import composite
from probes.models import load_model
from probes.torch import composite as torch_composite
from tests.probes.helpers import cpu_device, host, run

FAST = {"warmup": 1, "min_reps": 3, "max_reps": 4, "budget_s": 0.05}
TP = {"model": "tiny", "layers": 2, "batch": 2, "ctx": 64, "dtype": "fp32", "world_size": 1}
REQ = {"model": "tiny", "layers": 2, "prompt": 32, "tokens": 4, "batch": 1, "dtype": "fp32",
       "arrival": "back_to_back", "rate": 4.0}


def _ctx(probe: str, params: dict, rank: int = 0, world: int = 1) -> CaseContext:
    registry.discover()
    return CaseContext("id", probe, params, "cpu:0", cpu_device(), "torch", host(), seed=3, rank=rank, world_size=world,
                       group_devices=["cpu:0"] * world)


# -- work models -----------------------------------------------------------------------------
def test_tp_work_model_hand_computed():
    # tiny: hidden 1024, 16 heads, 4 KV heads, head_dim 64, intermediate 2816.
    w = composite.TPDecodeStep().work({**TP, "batch": 4, "ctx": 1000, "world_size": 2}, {})
    weights = 1024 * (8 * 64 + 2 * 2 * 64) + 8 * 64 * 1024 + 1024 * 2 * 1408 + 1408 * 1024  # one rank's shard
    assert w.flops == 2 * (2 * 4 * weights + 4 * 4 * 8 * 1000 * 64)
    kv_read = 4 * 2 * 2 * 64 * 4 * 1000
    assert w.bytes == 2 * (weights * 4 + kv_read + 4 * 2 * 2 * 64 * 4 + 2 * 4 * 1024 * 4)
    one = composite.TPDecodeStep().work({**TP, "batch": 4, "ctx": 1000, "world_size": 1}, {})
    assert one.flops == pytest.approx(2 * w.flops)  # the shards add up to the whole step


def test_request_work_model_is_prefill_plus_growing_decode_steps():
    from probes.prefill import layer_work

    shape = load_model("tiny")
    w = composite.ColocatedRequest().work({**REQ, "prompt": 100, "tokens": 3}, {})
    pre = layer_work(shape, 1, 100, "fp32")
    # 3 output tokens: the prefill makes token 1, decode steps 1 and 2 make tokens 2 and 3.
    steps = [composite.decode_step_work(shape, 1, 100 + j, 2, "fp32") for j in (1, 2)]
    assert w.flops == pytest.approx(2 * pre.flops + sum(f for f, _ in steps))
    assert w.bytes == pytest.approx(2 * pre.bytes + sum(b for _, b in steps))
    # The j-th step attends to prompt + j tokens: attention FLOPs grow by 4·heads·d per step.
    assert steps[1][0] - steps[0][0] == 2 * 4 * 16 * 64


def test_shards_recompose_the_unsharded_layer():
    import torch

    shape = load_model("tiny")
    w, k, v = torch_composite.full_layer(shape, "fp32", "cpu", 5, 2, 16)
    x = torch.randn(2, shape.hidden_size, dtype=torch.float64)
    from probes.torch.prefill import matmul64

    want = torch_composite.decode_layer(x, torch_composite._weights64(w), k.double().clone(), v.double().clone(), 15,
                                        shape, matmul=matmul64)
    partials = []
    for tp in (2, 4):
        local = shape.shard(tp)
        outs = []
        for r in range(tp):
            ws = torch_composite.shard_layer(w, shape, r, tp)
            ks, vs = torch_composite.shard_kv(k, r, tp).double(), torch_composite.shard_kv(v, r, tp).double()
            outs.append((ws, ks, vs))

        # The all-reduce by hand: run every rank's layer with a reduce that sums the
        # partials over the ranks (computed on the fly, rank by rank, in float64).
        def layer_all_ranks(x):
            import torch.nn.functional as F

            from probes.torch.decode import attention_reference, rms_norm

            h, kvh, d = local.num_heads, local.num_kv_heads, local.head_dim
            parts = []
            for ws, ks, vs in outs:
                q, kk, vv = (rms_norm(x, ws.norm1.double()) @ ws.qkv.double()).split([h * d, kvh * d, kvh * d], -1)
                ks[:, :, 15], vs[:, :, 15] = kk.reshape(2, kvh, d), vv.reshape(2, kvh, d)
                attn = attention_reference(q.reshape(2, h, 1, d), ks, vs)
                parts.append(attn.reshape(2, h * d) @ ws.o.double())
            x = x + sum(parts)
            parts = []
            for ws, _, _ in outs:
                gate, up = (rms_norm(x, ws.norm2.double()) @ ws.gate_up.double()).chunk(2, -1)
                parts.append((F.silu(gate) * up) @ ws.down.double())
            return x + sum(parts)

        got = layer_all_ranks(x)
        partials.append(float((got - want).abs().max()))
    assert max(partials) < 1e-9


def test_shard_reason_and_skip():
    shape = load_model("tiny")
    assert shape.shard_reason(2) is None and shape.shard_reason(4) is None
    assert "num_kv_heads 4 is not divisible by tp=8" in shape.shard_reason(8)
    reason = composite.TPDecodeStep().skip_reason({**TP, "world_size": 3}, {"type": "cpu"}, {})
    assert reason and "not divisible by tp=3" in reason
    assert "has 4 layers" in composite.TPDecodeStep().skip_reason({**TP, "layers": 5}, {"type": "cpu"}, {})


def test_decode_probes_tp_parameter_shards_and_keeps_old_ids():
    from probes import decode

    registry.discover()
    w1 = decode.DecodeProjection().work({"model": "tiny", "proj": "gate_up", "batch": 1, "dtype": "fp32"}, {})
    w2 = decode.DecodeProjection().work({"model": "tiny", "proj": "gate_up", "batch": 1, "dtype": "fp32", "tp": 2}, {})
    assert w2.flops == w1.flops / 2 == 2 * 1024 * 2816
    a = decode.DecodeAttention().work({"model": "tiny", "batch": 1, "ctx": 64, "layout": "contiguous", "dtype": "fp32",
                                       "tp": 4}, {})
    assert a.flops == 4 * 4 * 64 * 64  # 16 heads / 4
    # tp=1 is left out of the case id: the cases from before the parameter keep their ids.
    assert registry.case_id("decode.projection", {"model": "tiny", "proj": "o", "batch": 1, "dtype": "fp32", "tp": 1},
                            "cpu:0") == "decode.projection[model=tiny,proj=o,batch=1,dtype=fp32]@cpu:0"
    assert ",tp=2]" in registry.case_id("decode.projection", {"model": "tiny", "proj": "o", "batch": 1, "tp": 2}, "cpu:0")


def test_tp_projection_and_attention_run_sharded():
    r = run("decode.projection", {"model": "tiny", "proj": "qkv", "batch": 1, "dtype": "fp32", "tp": 2}, FAST)
    assert r["status"] == "ok", r
    assert r["work"]["flops"] == 2 * 1024 * (8 + 2 + 2) * 64
    r = run("decode.attention", {"model": "tiny", "batch": 1, "ctx": 64, "layout": "contiguous", "dtype": "fp32", "tp": 2},
            FAST)
    assert r["status"] == "ok", r


# -- the TP step, one rank -----------------------------------------------------------------------
def test_tp_step_one_rank_columns_add_up():
    r = run("composite.tp_decode_step", TP, {"min_reps": 4, "max_reps": 6, "budget_s": 0.05})
    assert r["status"] == "ok", r
    d = np.array(r["durations_s"])
    cols = r["sample_columns"]
    assert set(cols) == {"compute_s", "comm_s"} and len(cols["compute_s"]) == len(d) >= 4
    assert np.allclose(np.array(cols["compute_s"]) + np.array(cols["comm_s"]), d, rtol=1e-9, atol=1e-9)
    assert all(c == 0 for c in cols["comm_s"])  # one rank: no collective
    assert r["extra"]["tokens_per_step"] == 2 and r["extra"]["rel_error"] < 1e-4
    assert len(r["t_start_ns"]) == len(d)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_weight_fails_the_tp_check(dtype):
    params = {**TP, "dtype": dtype}
    if composite.TPDecodeStep().skip_reason(params, cpu_device(), host()):
        pytest.skip("bf16 has no native path on this CPU")
    kernel = prepare_case(_ctx("composite.tp_decode_step", params))
    kernel.run()
    kernel.check()
    w = kernel.stack[kernel.index][1][0]
    w.down.mul_(1.05)  # one weight of the step scaled: the regenerated reference differs
    kernel.run()
    with pytest.raises(ProbeCheckFailed, match="unsharded float64"):
        kernel.check()


# -- requests, colocated ------------------------------------------------------------------------
def test_colocated_request_timeline():
    r = run("composite.colocated_request", REQ, {"warmup": 0, "min_reps": 4, "max_reps": 4, "budget_s": 0.0})
    assert r["status"] == "ok", r
    c = {k: np.array(v) for k, v in r["sample_columns"].items()}
    e2e = np.array(r["durations_s"])
    assert set(c) == {"ttft_s", "tpot_s", "queue_s", "prefill_s", "kv_transfer_s", "decode_s", "itl_max_s"}
    assert (c["kv_transfer_s"] == 0).all()
    # Colocated TTFT ends at the first token out of the prefill (vLLM, MLPerf): no decode step in it.
    assert (c["ttft_s"] < e2e).all()
    assert np.allclose(c["ttft_s"], c["queue_s"] + c["prefill_s"], rtol=1e-9, atol=1e-9)
    # T = 4 tokens: 3 inter-token gaps per request, summing to e2e - TTFT; the worst is itl_max.
    itl = np.array(r["extra"]["itl_s"])
    assert itl.shape == (4, 3)
    assert np.allclose(itl.sum(axis=1), e2e - c["ttft_s"], rtol=1e-5, atol=1e-8)
    assert np.allclose(itl.max(axis=1), c["itl_max_s"], rtol=1e-5, atol=1e-8)
    assert r["extra"]["model_layers"] == 4 and r["extra"]["decode_steps"] == 3
    assert np.allclose(c["queue_s"] + c["prefill_s"] + c["kv_transfer_s"] + c["decode_s"], e2e, rtol=1e-9, atol=1e-9)
    # e2e = TTFT + (T - 1) · TPOT (vLLM's definitions), T = 4.
    assert np.allclose(c["ttft_s"] + 3 * c["tpot_s"], e2e, rtol=1e-9, atol=1e-9)
    assert (c["queue_s"] < 0.05).all()  # back to back: nobody waits
    assert r["extra"]["rel_error"] < 1e-4


@pytest.mark.slow
def test_poisson_arrivals_above_the_service_rate_queue():
    timing = {"warmup": 0, "min_reps": 6, "max_reps": 6, "budget_s": 0.0}
    r = run("composite.colocated_request", {**REQ, "arrival": "poisson", "rate": 1000.0}, timing)
    assert r["status"] == "ok", r
    queue = np.array(r["sample_columns"]["queue_s"])
    gaps = r["extra"]["interarrival_s"]
    assert len(gaps) == 6 and r["extra"]["arrival_seed"] == composite.ARRIVAL_SEED
    # 1000 requests/s against a service time of tens of ms: each waits for those before it.
    assert (np.diff(queue) > 0).all() and queue[-1] > 3 * np.median(r["sample_columns"]["prefill_s"])
    assert (np.array(r["sample_columns"]["ttft_s"]) >= queue).all()
    # The arrivals are the recorded gaps: sample start times are the arrival times.
    starts = np.array(r["t_start_ns"], dtype=np.float64) * 1e-9
    assert np.allclose(np.diff(starts), gaps[1:], atol=2e-6)
    # A slow stream: no queueing.
    slow = run("composite.colocated_request", {**REQ, "arrival": "poisson", "rate": 2.0},
               {"warmup": 0, "min_reps": 2, "max_reps": 2, "budget_s": 0.0})
    assert slow["status"] == "ok" and max(slow["sample_columns"]["queue_s"]) < 0.05


def test_a_wrong_decode_or_prefill_fails_the_request_check():
    kernel = prepare_case(_ctx("composite.colocated_request", REQ))
    kernel.run()
    kernel.check()
    for c in range(kernel.copies):
        kernel.stack[c][0].o.mul_(1.05)
    with pytest.raises(ProbeCheckFailed):
        kernel.check()


def test_arrival_columns_from_stamps():
    # 4 tokens: token 1 at k = 130 (out of the prefill, KV in place), tokens 2-4 at 150, 170, 200.
    cols = composite._request_columns({"a": 0, "s": 10, "p": 110}, {"k": 130, "e": [150, 170, 200]}, 4)
    ns = 1e-9
    names = composite.REQUEST_COLUMNS
    assert names[:8] == ("duration_s", "ttft_s", "tpot_s", "queue_s", "prefill_s", "kv_transfer_s", "decode_s",
                         "itl_max_s")
    # e2e 200, TTFT 130, TPOT (200 - 130) / 3, queue 10, prefill 100, KV 20, decode 70, worst gap 30.
    assert cols[:8] == pytest.approx([200 * ns, 130 * ns, 70 / 3 * ns, 10 * ns, 100 * ns, 20 * ns, 70 * ns, 30 * ns])
    assert cols[8] == 0.0  # the arrival (ns)
    assert cols[9:] == pytest.approx([20 * ns, 20 * ns, 30 * ns])  # the ITL gaps


# -- components in a planned quick run --------------------------------------------------------
def test_quick_plan_holds_every_component_case():
    import json

    from harness.config import load_suite
    from harness.plan import plan
    from harness.runner import case_row

    suite = load_suite("quick")
    cases = plan(suite, suite.probes, [cpu_device()], "torch", host())
    ids = {c.case_id: c for c in cases}
    composites = [c for c in cases if c.family == "composite"]
    assert {c.probe for c in composites} == {"composite.tp_decode_step", "composite.colocated_request",
                                             "composite.disagg_request"}
    assert {c.world_size for c in composites if c.probe == "composite.tp_decode_step"} == {1, 2}
    for c in composites:
        assert c.components, c.case_id
        for part in c.components:
            assert part["case_id"] in ids, part
            assert part["role"] in ("compute", "collective", "transfer", "outside") and part["count"] >= 1
        # The parts outside the layers (embedding, final norm, LM head) of the full-model figure.
        outside = {ids[p["case_id"]].probe: p for p in c.components if p["role"] == "outside"}
        if c.probe == "composite.tp_decode_step":
            assert set(outside) == {"decode.lm_head"} and outside["decode.lm_head"]["count"] == 1
        else:
            assert set(outside) == {"prefill.lm_head", "decode.lm_head"}
            assert outside["decode.lm_head"]["count"] == c.params["tokens"] - 1
    tp2 = next(c for c in composites if c.probe == "composite.tp_decode_step" and c.world_size == 2)
    roles = {ids[p["case_id"]].probe: p for p in tp2.components}
    assert roles["collective.all_reduce"]["count"] == 4
    ar = ids[roles["collective.all_reduce"]["case_id"]]
    assert ar.params["size_bytes"] == 1 * 1024 * 4 and ar.world_size == 2 and ar.implied_by == [tp2.case_id]
    assert ids[roles["decode.projection"]["case_id"]].params["tp"] == 2
    disagg = next(c for c in composites if c.probe == "composite.disagg_request")
    transfer = [p for p in disagg.components if p["role"] == "transfer"]
    assert len(transfer) == 1 and ids[transfer[0]["case_id"]].probe == "transfer.kv_sendrecv"
    # A component the suite already has is reused, not duplicated or marked implied.
    qkv = "decode.projection[model=tiny,proj=qkv,batch=1,dtype=fp32]@cpu:0"
    assert qkv in ids and not ids[qkv].implied_by and len([c for c in cases if c.case_id == qkv]) == 1
    # The components go into the composite's extra and implied_by into the cases table.
    row = case_row(tp2, {"status": "ok", "durations_s": [1.0], "extra": {"x": 1}}, {})
    assert json.loads(row["extra"])["components"] == tp2.components
    assert json.loads(case_row(ar, {"status": "ok", "durations_s": [1.0]}, {})["implied_by"]) == [tp2.case_id]


# -- real ranks (Gloo on 127.0.0.1) -----------------------------------------------------------------
def run_ranks(probe: str, params: dict, world: int, timing: dict) -> dict:
    from harness.worker import run_multi_rank

    registry.discover()
    devices = ["cpu:0"] * world
    spec = {
        "case_id": registry.case_id(probe, params, registry.group_id(devices)), "probe": probe, "params": params,
        "device": "cpu:0", "device_info": cpu_device(), "backend": "torch", "host": host(), "seed": 0,
        "world_size": world, "group_devices": devices, "group_timeout_s": 60.0,
        "timing": {"warmup": 1, "warmup_s": 0.0, "min_reps": 3, "max_reps": 5, "budget_s": 0.2, **timing},
    }
    result, pool = run_multi_rank(spec, None, [])
    if pool is not None:
        pool.close()
    return result


@pytest.mark.slow
def test_tp_step_on_two_gloo_ranks():
    r = run_ranks("composite.tp_decode_step", {**TP, "world_size": 2}, 2, {"min_reps": 4, "max_reps": 6})
    assert r["status"] == "ok", r
    assert r["world_size"] == 2 and len(r["rank_sample_columns"]) == 2
    for rank in range(2):
        d = np.array(r["rank_durations_s"][rank])
        cols = r["rank_sample_columns"][rank]
        assert np.allclose(np.array(cols["compute_s"]) + np.array(cols["comm_s"]), d, rtol=1e-9, atol=1e-9)
        assert min(cols["comm_s"]) > 0  # four all-reduces per step
    ranks = r["extra"]["ranks"]
    assert ranks[0]["backend"] == "gloo" and ranks[0]["local_heads"] == 8 and ranks[0]["allreduces_per_step"] == 4
    assert ranks[0]["rel_error"] < 1e-4
    # The samples frame: one row per rank per step, the columns beside duration_s.
    from harness.runner import samples_frame

    frame = samples_frame("c", r, 0)
    assert set(frame["rank"]) == {0, 1} and {"compute_s", "comm_s"} <= set(frame.columns)
    assert frame["compute_s"].notna().all()


@pytest.mark.slow
def test_disagg_request_on_two_gloo_ranks():
    r = run_ranks("composite.disagg_request", REQ, 2, {"warmup": 0, "min_reps": 4, "max_reps": 4, "budget_s": 0.0})
    assert r["status"] == "ok", r
    c0, c1 = r["rank_sample_columns"]
    assert c0 == c1 and r["rank_durations_s"][0] == r["rank_durations_s"][1]  # request-level values
    kv, e2e = np.array(c0["kv_transfer_s"]), np.array(r["durations_s"])
    assert (kv > 0).all() and (np.array(c0["ttft_s"]) < e2e).all()
    assert np.allclose(np.array(c0["queue_s"]) + c0["prefill_s"] + kv + c0["decode_s"], e2e, rtol=1e-9, atol=1e-9)
    sender, receiver = r["extra"]["ranks"]
    assert sender["role"] == "prefill" and receiver["role"] == "decode"
    assert receiver["kv_checksum_layer0"] and receiver["rel_error"] < 1e-4
    assert sender["clock_offset_method"].startswith("same boot") and sender["clock_rtt_ns"] > 0


# -- MoE (tiny-moe: 8 experts of 704, top-2) -------------------------------------------------------
def test_moe_decode_step_work_counts_touched_experts():
    shape = load_model("tiny-moe")
    attention = 1024 * (1024 + 2 * 256) + 1024 * 1024
    expert = 1024 * 2 * 704 + 704 * 1024
    f1, b1 = composite.decode_step_work(shape, 1, 100, 1, "fp32")
    kv = 2 * 4 * 64 * 4
    assert b1 == (attention + 1024 * 8 + 2 * expert) * 4 + 100 * kv + kv + 2 * 1024 * 4
    assert f1 == 2 * (attention + 1024 * 8 + 2 * expert) + 4 * 16 * 100 * 64
    f4, b4 = composite.decode_step_work(shape, 4, 100, 1, "fp32")
    touched = 8 * (1 - 0.75**4)
    assert b4 == pytest.approx((attention + 1024 * 8 + touched * expert) * 4 + 4 * 101 * kv + 8 * 1024 * 4)
    assert f4 == 4 * 2 * (attention + 1024 * 8 + 2 * expert) + 4 * 4 * 16 * 100 * 64


def test_moe_shards_sum_to_the_unsharded_mlp():
    import torch

    shape = load_model("tiny-moe")
    w, _, _ = torch_composite.full_layer(shape, "fp32", "cpu", 9)
    assert w.gate_up.shape == (8, 1024, 2 * 704) and w.router.shape == (1024, 8)
    x = torch.randn(5, 1024, generator=torch.Generator().manual_seed(4))
    want = torch_composite._mlp(x, w, shape, 0, torch.matmul)
    for tp in (2, 4):
        parts = [torch_composite._mlp(x, torch_composite.shard_layer(w, shape, r, tp), shape.shard(tp), 0,
                                      torch.matmul)
                 for r in range(tp)]
        assert torch.allclose(sum(parts), want, rtol=1e-4, atol=1e-5)
    assert w.routing[0].shape == (5, 2)


MOE_REQ = {**REQ, "model": "tiny-moe", "layers": 1, "prompt": 16, "tokens": 2}


def test_moe_tp_step_runs_and_checks():
    r = run("composite.tp_decode_step", {**TP, "model": "tiny-moe"}, FAST)
    assert r["status"] == "ok", r


def test_a_wrong_routing_fails_the_moe_composite_checks(monkeypatch):
    from probes.torch import moe

    tp = prepare_case(_ctx("composite.tp_decode_step", {**TP, "model": "tiny-moe"}))
    req = prepare_case(_ctx("composite.colocated_request", MOE_REQ))
    tp.run()
    tp.check()
    req.run()
    req.check()

    def shifted(logits, k):
        gates, ids = logits.float().topk(k, dim=-1)
        return gates.softmax(-1), (ids + 3) % logits.shape[-1]

    monkeypatch.setattr(moe, "route", shifted)
    tp.run()
    with pytest.raises(ProbeCheckFailed, match="routing"):
        tp.check()
    req.run()
    with pytest.raises(ProbeCheckFailed, match="routing"):
        req.check()


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_moe_decode_components_cover_the_experts_touched(batch):
    # T_pred of an MoE decode step: the isolated projections must read what the step reads
    # (attention + the touched experts' weights), not one dense expert per layer.
    registry.discover()
    shape = load_model("mixtral-8x7b")
    common = {"model": "mixtral-8x7b", "batch": batch, "dtype": "fp32", "tp": 1}
    parts = composite.decode_projection_parts(shape, common, 2)
    weight_bytes = 0.0
    for part in parts:
        if part["params"]["proj"] in ("gate_up", "down"):
            i, o = shape.projection(part["params"]["proj"])
            weight_bytes += part["count"] * i * o * 4
    expected = 2 * shape.experts_touched(batch) * shape.expert_weight_elements() * 4
    assert weight_bytes == pytest.approx(expected, rel=1e-9)
    counts = {(p["params"]["proj"], p["params"]["batch"]): p["count"] for p in parts}
    if batch == 1:  # top-2: two experts of one token each, per layer
        assert counts[("gate_up", 1)] == pytest.approx(4) and counts[("qkv", 1)] == 2
    if batch == 64:  # nearly all 8 experts, 16 tokens each on average
        assert counts[("gate_up", 16)] == pytest.approx(2 * 8, rel=1e-6)


def test_dense_decode_components_are_one_mlp_per_layer():
    shape = load_model("tiny")
    parts = composite.decode_projection_parts(shape, {"model": "tiny", "batch": 4, "dtype": "fp32", "tp": 1}, 3)
    assert sorted(p["params"]["proj"] for p in parts) == sorted(["qkv", "o", "gate_up", "down"])
    assert all(p["count"] == 3 and p["params"]["batch"] == 4 for p in parts)


def test_moe_request_prefill_uses_the_moe_mlp_case():
    registry.discover()
    comp = registry.get("composite.colocated_request")()
    params = {"model": "tiny-moe", "layers": 2, "prompt": 16, "tokens": 4, "batch": 1, "dtype": "fp32",
              "arrival": "back_to_back", "rate": 1.0}
    probes = [(p["probe"], p["params"].get("proj")) for p in comp.components(params, 1)]
    assert ("prefill.mlp", None) in probes and ("prefill.projection", "gate_up") not in probes


# -- CUDA graphs (graph=true|false) ----------------------------------------------------------------
OLD_TP_ID = "composite.tp_decode_step[model=tiny,layers=2,batch=1,ctx=512,dtype=fp32,world_size=1]@cpu:0"
OLD_REQ_ID = ("composite.disagg_request[model=tiny,layers=2,prompt=32,tokens=4,batch=1,dtype=fp32,arrival=poisson,"
              "rate=8]@cpu:0-1")


@pytest.mark.parametrize("probe", ["composite.tp_decode_step", "composite.colocated_request",
                                   "composite.disagg_request"])
def test_graph_parameter_plans_eager_by_default_and_keeps_eager_ids(probe):
    registry.discover()
    cls = registry.get(probe)
    # Default grid: eager only; a suite naming [true, false] plans both.
    assert cls.validate_params({}, "suite")["graph"] == [False]
    both = cls.expand(cls.validate_params({"graph": [True, False], "batch": [1]}, "suite"))
    ids = [registry.case_id(probe, p, "cpu:0") for p in both]
    assert len(both) == 2 and len(set(ids)) == 2
    graph, eager = (ids if "graph=True" in ids[0] else ids[::-1])
    assert ",graph=True" in graph and "graph" not in eager  # eager: the id it had before


def test_graph_ids_match_the_ids_from_before_the_parameter():
    registry.discover()
    tp = {"model": "tiny", "layers": 2, "batch": 1, "ctx": 512, "dtype": "fp32", "world_size": 1}
    assert registry.case_id("composite.tp_decode_step", {**tp, "graph": False}, "cpu:0") == OLD_TP_ID
    assert registry.case_id("composite.tp_decode_step", {**tp, "graph": True}, "cpu:0") == OLD_TP_ID.replace(
        "world_size=1]", "world_size=1,graph=True]")
    req = {"model": "tiny", "layers": 2, "prompt": 32, "tokens": 4, "batch": 1, "dtype": "fp32", "arrival": "poisson",
           "rate": 8.0, "graph": False, "kv_layout": "contiguous"}
    assert registry.case_id("composite.disagg_request", req, "cpu:0-1") == OLD_REQ_ID


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_graph_value_is_a_one_line_user_error(bad):
    from harness.errors import UserError

    registry.discover()
    with pytest.raises(UserError) as err:
        composite.TPDecodeStep.validate_params({"graph": [bad]}, "suite.composite.tp_decode_step")
    assert "\n" not in str(err.value) and "suite.composite.tp_decode_step.graph: expected bool" in str(err.value)


def test_graph_components_are_the_eager_ones():
    # κ's T_pred: the same isolated cases with or without graphs (their ids unchanged).
    for cls, params in ((composite.TPDecodeStep, TP), (composite.ColocatedRequest, REQ)):
        assert cls().components({**params, "graph": True}, 1) == cls().components({**params, "graph": False}, 1)


@pytest.mark.parametrize("probe,params", [("composite.tp_decode_step", TP), ("composite.colocated_request", REQ)])
def test_a_cpu_graph_case_runs_eagerly_and_says_so(probe, params):
    r = run(probe, {**params, "graph": True}, FAST)
    assert r["status"] == "ok", r  # accepted, not skipped
    assert r["extra"]["graph"] == {"requested": True, "applied": False, "collectives": None,
                                   "reason": "CUDA graphs need a CUDA device; cpu:0 runs eagerly"}
    assert r["extra"]["rel_error"] < 1e-4
    eager = run(probe, {**params, "graph": False}, FAST)
    assert eager["extra"]["graph"]["requested"] is False and eager["extra"]["graph"]["applied"] is False


def test_graph_collectives_from_the_group_backend():
    assert torch_composite.graph_collectives(1, None)[0] is None
    assert torch_composite.graph_collectives(1, "nccl")[0] is None
    assert torch_composite.graph_collectives(2, "nccl")[0] == "inside"
    assert torch_composite.graph_collectives(4, "NCCL")[0] == "inside"
    placement, why = torch_composite.graph_collectives(2, "gloo")
    assert placement == "outside" and why.startswith("gloo collectives cannot be captured")
    plan = torch_composite.graph_plan(True, "cuda:0", False, *torch_composite.graph_collectives(2, "gloo"))
    assert plan["requested"] and not plan["applied"] and plan["collectives"] == "outside"
    assert not torch_composite.graph_plan(True, "cuda:0", True, "inside", "")["collectives"]  # MoE: not tried
    assert "MoE" in torch_composite.graph_plan(True, "cuda:0", True, "inside", "")["reason"]
    assert torch_composite.graph_plan(True, "cpu:0", False, "inside", "")["reason"].startswith("CUDA graphs need")


# Stand-ins for torch.cuda's capture API: a capture runs nothing on a device here, it
# notes the boundaries and which all-reduces happened while capturing; a replay is logged.
class _FakeCuda:
    def __init__(self, fail_capture_when=None):
        self.capturing = False
        self.log: list = []
        self.fail = fail_capture_when  # "all_reduce": the collective raises under capture; "begin": every capture

    def install(self, monkeypatch):
        import contextlib

        import torch

        fake = self

        class Graph:
            def __init__(self):
                self.n = len([e for e in fake.log if e[0] == "begin"])

            def capture_begin(self, pool=None, capture_error_mode="global"):
                assert capture_error_mode == "thread_local"  # the NCCL watchdog polls meanwhile
                if fake.fail == "begin":
                    raise RuntimeError("capture not permitted")
                fake.capturing = True
                fake.log.append(("begin", self.n))

            def capture_end(self):
                fake.capturing = False
                fake.log.append(("end", self.n))

            def replay(self):
                fake.log.append(("replay", self.n))

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class Dist:
            @staticmethod
            def all_reduce(t, op=None):
                if fake.capturing and fake.fail == "all_reduce":
                    raise RuntimeError("collective not capturable")
                fake.log.append(("all_reduce_captured" if fake.capturing else "all_reduce", id(t)))

            @staticmethod
            def get_backend():
                return "nccl"

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        monkeypatch.setattr(torch_composite, "_dist", lambda: Dist)
        monkeypatch.setattr(torch_composite, "synchronize", lambda device: None)
        monkeypatch.setattr(torch_composite, "_vote", lambda value, device, world: value)


def _tp_kernel_as_if_on_cuda(world: int, backend: str):
    """A CPU TP kernel (unsharded tiny weights) that believes it is rank 0 of ``world``
    ranks on cuda:0 with ``backend``: the capture logic runs, the arithmetic stays CPU."""
    kernel = prepare_case(_ctx("composite.tp_decode_step", {**TP, "graph": True}))
    kernel.device, kernel.world = "cuda:0", world
    kernel.extra["graph"] = torch_composite.graph_plan(True, "cuda:0", False,
                                                       *torch_composite.graph_collectives(world, backend))
    return kernel


def test_nccl_capture_puts_the_all_reduces_inside_one_graph(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    kernel = _tp_kernel_as_if_on_cuda(2, "nccl")
    kernel.capture()
    g = kernel.extra["graph"]
    assert g["applied"] and g["collectives"] == "inside", g
    assert len(kernel.graphs) == kernel.copies
    assert all(len(sg.segments) == 1 and not sg.reduced for sg in kernel.graphs)
    # 2 all-reduces per layer captured in each copy's graph.
    assert sum(e[0] == "all_reduce_captured" for e in fake.log) == 2 * TP["layers"] * kernel.copies
    fake.log.clear()
    kernel.step()
    assert [e[0] for e in fake.log] == ["replay"]  # one replay, no eager collective


@pytest.mark.parametrize("backend,fail", [("gloo", None), ("nccl", "all_reduce")])
def test_uncapturable_collectives_run_eagerly_between_segments(monkeypatch, backend, fail):
    fake = _FakeCuda(fail_capture_when=fail)
    fake.install(monkeypatch)
    kernel = _tp_kernel_as_if_on_cuda(2, backend)
    kernel.capture()
    g = kernel.extra["graph"]
    assert g["applied"] and g["collectives"] == "outside", g
    if fail:  # NCCL capture raised: recorded, then cut at the collectives
        assert "collective not capturable" in g["reason"]
    per_step = 2 * TP["layers"]
    assert all(len(sg.segments) == per_step + 1 and len(sg.reduced) == per_step for sg in kernel.graphs)
    fake.log.clear()
    kernel.timer.start()
    out = kernel.step()
    kernel.timer.stop()
    kinds = [e[0] for e in fake.log]
    assert kinds == ["replay", "all_reduce"] * per_step + ["replay"]
    # The eager all-reduces act on the tensors the next segment reads, in capture order.
    sg = kernel.graphs[kernel.index]
    assert [e[1] for e in fake.log if e[0] == "all_reduce"] == [id(t) for t in sg.reduced]
    assert out is sg.out and [m[0] for m in kernel.timer.marks].count("comm") == per_step


def test_a_failed_capture_leaves_the_case_eager_with_the_reason(monkeypatch):
    fake = _FakeCuda(fail_capture_when="begin")
    fake.install(monkeypatch)
    kernel = _tp_kernel_as_if_on_cuda(1, "nccl")
    kernel.capture()
    g = kernel.extra["graph"]
    assert not g["applied"] and kernel.graphs is None
    assert g["reason"].startswith("capture failed (RuntimeError: capture not permitted)")


class _StepStandIn:
    """Stands in for one captured decode step: replay() recomputes it eagerly from its
    static input into its static output (``shift`` moves the baked-in position: a
    wrong capture)."""

    def __init__(self, kernel, j, src, dst, shift=0):
        self.k, self.j, self.src, self.dst, self.shift = kernel, j, src, dst, shift

    def replay(self):
        k = self.k
        self.dst.copy_(k._decode_step(self.src, (self.j + 1) % k.copies, k.P + self.j + self.shift))


def _request_with_stand_in_graphs(shift: int):
    import torch

    kernel = prepare_case(_ctx("composite.colocated_request", {**REQ, "graph": True}))
    bufs = [torch.zeros(kernel.b, kernel.shape.hidden_size) for _ in range(kernel.T)]
    kernel.h_static, kernel.graph_out = bufs[0], bufs[-1]
    kernel.step_graphs = [_StepStandIn(kernel, j, bufs[j], bufs[j + 1], shift if j == kernel.T - 2 else 0)
                          for j in range(kernel.T - 1)]
    kernel.graph_on = True
    return kernel


def test_the_request_check_judges_the_replayed_steps():
    kernel = _request_with_stand_in_graphs(0)
    kernel.run()
    kernel.check()  # the replay gives the float64 reference's last step
    assert kernel.last_out is kernel.graph_out
    bad = _request_with_stand_in_graphs(-1)  # the last step captured at the wrong position
    bad.run()
    with pytest.raises(ProbeCheckFailed, match="replayed from its CUDA graph"):
        bad.check()


class _TPStandIn:
    """Stands in for one rotation copy's captured step: replay() recomputes it eagerly
    (``scale`` ≠ 1: a capture that gives a wrong output)."""

    def __init__(self, kernel, copy, scale=1.0):
        self.k, self.copy, self.scale = kernel, copy, scale

    def replay(self, on_collective):
        return self.k._layers(self.copy, None) * self.scale


def test_the_tp_check_judges_the_replayed_step():
    kernel = prepare_case(_ctx("composite.tp_decode_step", {**TP, "graph": True}))
    kernel.graphs = [_TPStandIn(kernel, c) for c in range(kernel.copies)]
    kernel.before_each()
    kernel.run()
    kernel.check()
    kernel.graphs = [_TPStandIn(kernel, c, scale=1.01) for c in range(kernel.copies)]
    kernel.run()
    with pytest.raises(ProbeCheckFailed, match="unsharded float64"):
        kernel.check()
