"""The MoE block (probes/moe.py, probes/torch/moe.py) and the MoE fields of model
shapes: expected touched experts, Mixtral's gates (softmax over the top-k logits), the
grouped expert GEMMs against a per-token loop, the float64 reference re-deriving the
routing (a wrong routing fails it, a tie the dtype cannot resolve does not), shape
validation."""

from __future__ import annotations

import math

import pytest

from harness.errors import ProbeCheckFailed, UserError
from probes import models, moe
from probes.models import load_model
from probes.torch import moe as torch_moe


def _weights(hidden=16, inter=8, experts=6, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    router = torch.randn(hidden, experts, generator=g) / math.sqrt(hidden)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=g) / math.sqrt(hidden)
    down = torch.randn(experts, inter, hidden, generator=g) / math.sqrt(inter)
    x = torch.randn(10, hidden, generator=g)
    return x, router, gate_up, down


def _per_token(x, router, gate_up, down, k):
    """Hugging Face's formulation, token by token: softmax over all experts, keep the
    top k, divide by their sum, add the gate-weighted expert outputs."""
    import torch
    import torch.nn.functional as F

    inter = gate_up.shape[-1] // 2
    out = torch.zeros(x.shape[0], down.shape[-1], dtype=torch.float64)
    for t in range(x.shape[0]):
        probs = (x[t].double() @ router.double()).softmax(-1)
        top, ids = probs.topk(k)
        top = top / top.sum()
        for p, e in zip(top.tolist(), ids.tolist()):
            h = x[t].double() @ gate_up[e].double()
            out[t] += p * ((F.silu(h[:inter]) * h[inter:]) @ down[e].double())
    return out


# -- expected experts ------------------------------------------------------------------------
def test_expected_experts_formula():
    assert moe.expected_experts(8, 2, 1) == pytest.approx(2.0)  # one token: exactly its k
    assert moe.expected_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2)) == pytest.approx(3.5)
    assert moe.expected_experts(8, 2, 64) == pytest.approx(8.0, abs=1e-6)  # nearly all of them
    assert moe.expected_experts(128, 8, 1) == pytest.approx(8.0)
    assert moe.expected_experts(1, 1, 5) == 1.0  # dense: its one MLP
    assert moe.expected_experts(8, 2, 0) == 0.0
    with pytest.raises(ValueError):
        moe.expected_experts(4, 5, 1)


def test_dense_shapes_touch_every_weight_once():
    for name in ("tiny", "llama-3.1-8b", "llama-2-7b", "llama-3.1-70b"):
        s = load_model(name)
        every = sum(i * o for i, o in (s.projection(p) for p in models.PROJECTIONS))
        assert not s.is_moe and s.router_weight_elements() == 0
        assert s.weights_touched(1) == s.weights_touched(64) == s.stored_weight_elements() == every
        assert s.layer_weight_elements() == every


def test_mixtral_weight_counts_by_hand():
    s = load_model("mixtral-8x7b")
    attention = 4096 * (4096 + 2 * 1024) + 4096 * 4096
    expert = 4096 * 2 * 14336 + 14336 * 4096
    assert s.is_moe and s.router_weight_elements() == 4096 * 8
    assert s.weights_touched(1) == pytest.approx(attention + 4096 * 8 + 2 * expert)
    assert s.weights_touched(1) == pytest.approx(394.3e6, rel=2e-3)  # "about 394 M"
    assert s.stored_weight_elements() == attention + 4096 * 8 + 8 * expert
    assert s.layer_weight_elements() == attention + 4096 * 8 + 2 * expert


def test_qwen3_moe_shape_is_from_its_config():
    s = load_model("qwen3-30b-a3b")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (2048, 48, 32, 4, 128)
    assert (s.num_experts, s.experts_per_token, s.intermediate_size) == (128, 8, 768)
    assert "huggingface.co/Qwen/Qwen3-30B-A3B" in s.source
    assert s.projection("o") == (4096, 2048)  # q_dim 32·128 is twice the hidden size


@pytest.mark.parametrize("body, culprit", [
    ("num_experts: 2\nexperts_per_token: 3\n", "experts_per_token"),
    ("num_experts: eight\n", "num_experts"),
])
def test_bad_moe_fields_are_user_errors(tmp_path, monkeypatch, body, culprit):
    head = ("name: bad\nsource: test\nhidden_size: 8\nnum_layers: 1\nnum_heads: 2\nnum_kv_heads: 1\n"
            "head_dim: 4\nintermediate_size: 8\n")
    (tmp_path / "bad.yaml").write_text(head + body)
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    models.load_model.cache_clear()
    try:
        with pytest.raises(UserError, match=culprit):
            models.load_model("bad")
    finally:
        models.load_model.cache_clear()


# -- the block -------------------------------------------------------------------------------
def test_gates_are_a_softmax_over_the_top_k_logits():
    import torch

    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 2.9, -4.0]])
    gates, ids = torch_moe.route(logits, 2)
    assert ids.tolist() == [[1, 3], [0, 2]]
    want = torch.tensor([[2.0, 1.5], [3.0, 2.9]]).softmax(-1)
    assert torch.allclose(gates, want)
    # the same as softmax over all experts, top k, renormalized (transformers' way)
    full = logits.softmax(-1).gather(1, ids)
    assert torch.allclose(gates, full / full.sum(-1, keepdim=True))


def test_grouped_gemms_equal_the_per_token_definition():
    x, router, gate_up, down = _weights()
    y, ids = torch_moe.moe_forward(x, router, gate_up, down, 2)
    assert ids.shape == (10, 2)
    want = _per_token(x, router, gate_up, down, 2)
    assert (y.double() - want).norm() / want.norm() < 1e-6


def test_reference_matches_and_rejects_a_wrong_routing():
    x, router, gate_up, down = _weights()
    y, ids = torch_moe.moe_forward(x, router, gate_up, down, 2)
    check = torch_moe.RouteCheck("fp32", chosen=ids)
    ref = torch_moe.moe_reference(x.double(), router, gate_up, down, 2, check)
    assert (y.double() - ref).norm() / ref.norm() < 1e-6
    assert check.near_ties == 0 and check.touched == set(ids.unique().tolist())
    wrong = ids.clone()
    wrong[3] = (ids[3] + 1) % 6  # experts well below the top 2 of token 3
    logits = x[3].double() @ router.double()
    assert sorted(wrong[3].tolist()) != sorted(logits.topk(2).indices.tolist())
    with pytest.raises(ProbeCheckFailed, match="routing of token 3"):
        torch_moe.moe_reference(x.double(), router, gate_up, down, 2, torch_moe.RouteCheck("fp32", chosen=wrong))


def test_a_tie_the_dtype_cannot_resolve_follows_the_kernel():
    import torch

    # hidden = experts and an identity router: the logits are x itself.
    router = torch.eye(4)
    gate_up = torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(1))
    down = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(2))
    x64 = torch.tensor([[1.0, 0.5, 0.5 + 1e-6, -2.0]], dtype=torch.float64)  # experts 1 and 2 tie
    chosen = torch.tensor([[0, 1]])  # float64 says {0, 2}; within bf16's (and fp32's) band
    tie = torch_moe.RouteCheck("bf16", chosen=chosen)
    torch_moe.moe_reference(x64, router, gate_up, down, 2, tie)
    assert tie.near_ties == 1 and tie.touched == {0, 1}
    far = torch.tensor([[0, 3]])  # expert 3 is 2.5 below the 2nd logit: a wrong routing
    with pytest.raises(ProbeCheckFailed):
        torch_moe.moe_reference(x64, router, gate_up, down, 2, torch_moe.RouteCheck("bf16", chosen=far))
