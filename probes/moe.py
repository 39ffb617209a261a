"""The sparse mixture-of-experts MLP (Mixtral / Qwen3-MoE style), shared by the
prefill, decode and composite probes: its definition and the expected number of
experts a batch touches (the work models' input, probes.models). The compute path and
its float64 reference are in probes/torch/moe.py.

Block (as defined by Mixtral, arXiv:2401.04088 §2.1, and implemented by Hugging Face
transformers' ``MixtralSparseMoeBlock``; Qwen3-MoE with ``norm_topk_prob: true`` is the
same): for a token x (the output of the post-attention RMSNorm, ``hidden`` wide)

- router logits l = x · W_router, W_router [hidden, num_experts], no bias;
- the k = experts_per_token experts with the largest logits are selected;
- their gates are the softmax over those k logits only (equivalently: softmax over all
  experts, keep the top k, divide by their sum; transformers does it that way);
- y = Σ_j gate_j · SwiGLU_j(x), SwiGLU_e(x) = (silu(x·G_e) ⊙ (x·U_e)) · D_e, with the
  fused gate+up weight [G_e | U_e] [hidden, 2·inter] and down D_e [inter, hidden].
"""

from __future__ import annotations


def expected_experts(num_experts: int, experts_per_token: int, tokens: int) -> float:
    """Expected number of distinct experts ``tokens`` tokens touch in one layer:
    E · (1 − (1 − k/E)^tokens).

    Assumption: uniform, independent routing: each token picks k distinct experts, each
    expert with probability k/E, independently of the other tokens (what a router
    trained with a load-balancing loss aims for; the seeded random router here is
    close to it). 1 token touches exactly k; many tokens touch nearly all E. A dense
    model (E = k = 1) touches its one MLP for any tokens ≥ 1. Raises ValueError for
    k > E or negative tokens."""
    if experts_per_token > num_experts or experts_per_token < 1 or tokens < 0:
        raise ValueError(f"bad routing: {experts_per_token} of {num_experts} experts, {tokens} tokens")
    return num_experts * (1.0 - (1.0 - experts_per_token / num_experts) ** tokens)
