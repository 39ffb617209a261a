"""Model shapes (configs/models/*.yaml) and the work models of their layers.

Each shape file names its source. The formulas count FLOPs as 2 per multiply-add and
bytes as the minimum traffic: every weight, activation and KV element read or written
once.

MoE shapes (``num_experts`` > 1, ``experts_per_token`` = k, ``intermediate_size`` = one
expert's) have a router (hidden -> num_experts) and num_experts SwiGLU experts per
layer (probes/moe.py). Their work models count each token's k experts in the FLOPs and,
in the bytes, the weights of the experts a pass actually touches: the expected number
of distinct experts under uniform routing (``experts_touched``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import yaml

from harness.errors import UserError

MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
REQUIRED = ("name", "source", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


@dataclass(frozen=True)
class ModelShape:
    name: str
    source: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 0
    num_experts: int = 1
    experts_per_token: int = 1

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        """A sparse mixture-of-experts MLP (more than one expert per layer)."""
        return self.num_experts > 1

    def projection(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a linear layer: fused QKV, attention output,
        fused gate+up of the (SwiGLU) MLP, MLP down (of one expert, for an MoE shape),
        and the MoE router (hidden -> num_experts)."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "qkv": (h, self.q_dim + 2 * self.kv_dim),
            "o": (self.q_dim, h),
            "gate_up": (h, 2 * f),
            "down": (f, h),
            "router": (h, self.num_experts),
        }[name]

    def attention_weight_elements(self) -> int:
        """QKV and O weights of one layer."""
        return sum(i * o for i, o in (self.projection("qkv"), self.projection("o")))

    def expert_weight_elements(self) -> int:
        """gate+up and down of one expert's SwiGLU MLP (the dense MLP: E = 1)."""
        return sum(i * o for i, o in (self.projection("gate_up"), self.projection("down")))

    def router_weight_elements(self) -> int:
        """hidden · num_experts for an MoE shape; 0 for a dense one (no router)."""
        return self.hidden_size * self.num_experts if self.is_moe else 0

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts ``tokens`` tokens route to in one layer (uniform
        routing, see probes.moe.expected_experts): k at 1 token, → E for many; 1 for a
        dense shape."""
        from probes.moe import expected_experts

        return expected_experts(self.num_experts, self.experts_per_token, tokens)

    def weights_touched(self, tokens: int) -> float:
        """Weight elements a forward pass of ``tokens`` tokens reads in one layer:
        attention + router + the expected touched experts' MLPs (each read once).
        For a dense shape: every weight of the layer."""
        return (self.attention_weight_elements() + self.router_weight_elements()
                + self.experts_touched(tokens) * self.expert_weight_elements())

    def stored_weight_elements(self) -> int:
        """Weight elements one layer holds in memory: attention, router, all experts."""
        return (self.attention_weight_elements() + self.router_weight_elements()
                + self.num_experts * self.expert_weight_elements())

    def shard_reason(self, tp: int) -> str | None:
        """Why this shape cannot be split over ``tp`` tensor-parallel ranks, or None."""
        for what, n in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp:
                return f"{self.name}: {what} {n} is not divisible by tp={tp}"
        return None

    def shard(self, tp: int) -> "ModelShape":
        """One tensor-parallel rank's part of a layer (Megatron-style): num_heads/tp query
        heads and num_kv_heads/tp KV heads (column-parallel QKV, row-parallel O),
        intermediate_size/tp of the MLP (column-parallel gate+up, row-parallel down);
        hidden_size unchanged. An MoE shape splits every expert the same way (tensor-
        parallel experts, as Megatron's and vLLM's TP MoE do without expert parallelism)
        and keeps the whole router on every rank, so every rank routes alike.
        tp=1 is the shape itself."""
        if tp == 1:
            return self
        if reason := self.shard_reason(tp):
            raise ValueError(reason)
        return replace(self, num_heads=self.num_heads // tp, num_kv_heads=self.num_kv_heads // tp,
                       intermediate_size=self.intermediate_size // tp)

    def layer_weight_elements(self) -> int:
        """Weights one token multiplies by per layer: attention, the router, and one
        expert's MLP per routed expert (k of them). 2 FLOPs each: a token's MLP FLOPs
        count its k experts."""
        return (self.attention_weight_elements() + self.router_weight_elements()
                + self.expert_weight_elements() * self.experts_per_token)

    def kv_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer: 2 · kv_heads · head_dim · dtype bytes."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes


PROJECTIONS = ("qkv", "o", "gate_up", "down")


def model_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in MODELS_DIR.glob("*.yaml")))


@lru_cache(maxsize=None)
def load_model(name: str) -> ModelShape:
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown model shape '{name}' (known: {', '.join(model_names())})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}")
    known = set(ModelShape.__dataclass_fields__)
    extra = [k for k in doc if k not in known]
    if extra:
        raise UserError(f"{path}: unknown key '{extra[0]}'")
    bad = [k for k, v in doc.items() if k not in ("name", "source") and (not isinstance(v, int) or isinstance(v, bool))]
    if bad:
        raise UserError(f"{path}: {bad[0]} must be an integer, got {doc[bad[0]]!r}")
    shape = ModelShape(**doc)
    if not 1 <= shape.experts_per_token <= shape.num_experts:
        raise UserError(f"{path}: experts_per_token {shape.experts_per_token} must be between 1 and "
                        f"num_experts {shape.num_experts}")
    if shape.num_heads % shape.num_kv_heads:
        raise UserError(f"{path}: num_heads {shape.num_heads} is not a multiple of num_kv_heads {shape.num_kv_heads}")
    return shape


# -- work models ------------------------------------------------------------------------
def attention_flops(batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, causal: bool) -> float:
    """QKᵀ and PV: 2 · 2 · b · heads · q_len · kv_len · d; causal prefill (q_len == kv_len)
    computes half the score matrix: 4·b·s²·h·d / 2."""
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    return flops / 2 if causal else flops


def linear_flops(tokens: int, in_features: int, out_features: int) -> float:
    return 2.0 * tokens * in_features * out_features


def linear_bytes(tokens: int, in_features: int, out_features: int, dtype_bytes: int) -> float:
    """Weights once, input and output activations once."""
    return float(dtype_bytes * (in_features * out_features + tokens * (in_features + out_features)))
