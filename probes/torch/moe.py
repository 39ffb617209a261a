"""The torch side of the mixture-of-experts MLP (its definition: probes/moe.py): the
compute path the prefill, decode and composite kernels run, and its float64
reference with the check of the kernel's routing.

Weights are stored as one tensor per kind: router [hidden, E], gate_up [E, hidden,
2·inter], down [E, inter, hidden]. The compute path (``moe_forward``) runs grouped GEMMs:
one gate+up and one down GEMM per expert over the tokens routed to it (gathered), the
outputs scaled by their gates and summed back per token (``index_add_``); experts no
token chose are not touched. The routing follows from seeded weights and inputs, so it
is the same in every repetition and on every run.

The reference (``moe_reference``) recomputes the logits from the float64 input, sorts
them in float64 and takes the top k itself; it never trusts the kernel's routing. The
only exception is a near-tie: where the kernel's choice differs from float64's but
every expert it chose lies within the dtype's tolerance (``TOLERANCE`` × the RMS of the
token's logits) of float64's k-th logit, a choice the dtype cannot resolve, the
reference follows the kernel's choice and counts the tie. Any other difference is a
wrong routing and fails the check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.errors import ProbeCheckFailed
from probes.torch.common import TOLERANCE


def route(logits, k: int):
    """The kernel's routing of logits [T, E]: (gates [T, k] float32, expert ids [T, k]
    int64), the gates a softmax over the k largest logits (computed in float32, as
    transformers and vLLM do whatever the activation dtype)."""
    values, ids = logits.float().topk(k, dim=-1)
    return values.softmax(dim=-1), ids


def moe_forward(x, router, gate_up, down, k: int, matmul=None):
    """The MoE MLP of x [T, hidden] in x's dtype: (y [T, hidden], expert ids [T, k]).

    router [hidden, E], gate_up [E, hidden, 2·inter], down [E, inter, hidden] (an
    expert-parallel or tensor-parallel shard may have a smaller inter; the caller then
    reduces the partial outputs). ``matmul`` replaces torch.matmul (tests)."""
    import torch
    import torch.nn.functional as F

    mm = matmul or torch.matmul
    tokens = x.shape[0]
    gates, ids = route(mm(x, router), k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # Per expert, how many (token, slot) pairs chose it; one host read per call (the
    # grouped GEMM sizes are data-dependent, as in every MoE runtime).
    counts = torch.bincount(flat, minlength=router.shape[1]).tolist()
    token_of = order // k
    gate_of = gates.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
    inter = gate_up.shape[-1] // 2
    y = torch.zeros(tokens, down.shape[-1], device=x.device, dtype=x.dtype)
    start = 0
    for expert, n in enumerate(counts):
        if not n:
            continue
        rows = token_of[start : start + n]
        h = mm(x.index_select(0, rows), gate_up[expert])
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y.index_add_(0, rows, mm(act, down[expert]) * gate_of[start : start + n])
        start += n
    return y, ids


@dataclass
class RouteCheck:
    """What the float64 reference needs to judge the kernel's routing: the kernel's
    ``dtype`` (its tolerance sets the near-tie band), its chosen expert ids
    ``chosen`` [rows, k] for the rows being checked (None: follow float64's choice
    everywhere), and, filled in by the reference, ``near_ties`` (tokens where the
    kernel's different choice was accepted as a tie) and ``touched`` (distinct
    experts the checked rows used)."""

    dtype: str = "fp64"
    chosen: object = None
    near_ties: int = 0
    touched: set = field(default_factory=set)

    def note(self, extra: dict) -> None:
        extra["routing_near_ties"] = extra.get("routing_near_ties", 0) + self.near_ties


def reference_routing(logits64, k: int, check: RouteCheck | None = None):
    """Expert ids [T, k] (lists) chosen in float64 from logits64 [T, E] (sorted
    descending, ties by lower id), reconciled with the kernel's choice (see the module
    docstring). Raises ProbeCheckFailed for a wrong routing."""
    import torch

    chosen = None if check is None or check.chosen is None else check.chosen.tolist()
    band = TOLERANCE.get(check.dtype, 0.0) if check is not None else 0.0
    picks = []
    for t in range(logits64.shape[0]):
        row = logits64[t]
        want = sorted(range(row.numel()), key=lambda e: (-float(row[e]), e))[:k]
        if chosen is not None and set(chosen[t]) != set(want):
            kth = float(row[want[-1]])
            scale = float(torch.sqrt((row * row).mean()))
            worst = min(float(row[e]) for e in chosen[t])
            if len(set(chosen[t])) != k or worst < kth - band * max(scale, 1e-30):
                raise ProbeCheckFailed(
                    f"MoE routing of token {t}: kernel chose experts {sorted(chosen[t])}, float64 top-{k} is "
                    f"{sorted(want)} (k-th logit {kth:.6g}, the kernel's lowest {worst:.6g})")
            check.near_ties += 1
            want = list(chosen[t])
        picks.append(want)
    return picks


def moe_reference(x64, router, gate_up, down, k: int, check: RouteCheck | None = None, matmul64=None):
    """float64 MoE MLP of x64 [T, hidden] (float64): the logits x64 · W_router in float64,
    the top k re-derived in float64 (``reference_routing``), gates = softmax over the k
    float64 logits, and per token Σ gate · SwiGLU_expert(x) in float64 (each touched
    expert's weights cast once, by ``matmul64`` a column block at a time).
    Returns [T, hidden] float64; raises ProbeCheckFailed for a wrong routing."""
    import torch
    import torch.nn.functional as F

    if matmul64 is None:
        # Imported here: probes.torch.prefill imports this module.
        from probes.torch.common import matmul64
    logits = matmul64(x64, router)
    picks = reference_routing(logits, k, check)
    inter = gate_up.shape[-1] // 2
    out = torch.zeros(x64.shape[0], down.shape[-1], dtype=torch.float64, device=x64.device)
    users: dict[int, list[tuple[int, float]]] = {}
    for t, experts in enumerate(picks):
        gates = logits[t, experts].softmax(dim=-1)
        for e, g in zip(experts, gates.tolist()):
            users.setdefault(e, []).append((t, g))
    for e in sorted(users):
        rows = torch.tensor([t for t, _ in users[e]], device=x64.device)
        g = torch.tensor([gate for _, gate in users[e]], dtype=torch.float64, device=x64.device)
        h = matmul64(x64[rows], gate_up[e])
        act = F.silu(h[:, :inter]) * h[:, inter:]
        out[rows] += matmul64(act, down[e]) * g[:, None]
    if check is not None:
        check.touched |= set(users)
    return out
