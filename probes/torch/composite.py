"""The torch kernels of the composite serving probes (specs, work models and the
request timeline's columns in probes/composite.py): the miniature transformer's layers
(full and Megatron-sharded weights, decode and prefill layers, the MoE MLP), the
self-timing loops and segment timers, the tensor-parallel decode step and request
kernels with their float64 checks, and one builder per probe registered with
``harness.registry.kernel``. torch is imported inside the functions.
"""

from __future__ import annotations

import math
import os
import time

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.common import DTYPE_BYTES
from probes.composite import (
    ARRIVAL_SEED,
    OFFSET_PINGS,
    PAGED_BLOCK_TOKENS,
    REQUEST_COLUMNS,
    _boot_id,
    _request_columns,
    _wait_until,
    injected_delay,
    layer_seed,
)
from probes.models import PROJECTIONS, load_model
from probes.native import native_path
from probes.torch.common import (
    check_close,
    matmul_for,
    require_memory,
    rotation_count,
    sdpa_for,
    synchronize,
    torch_dtype,
)


# -- the model ----------------------------------------------------------------------------
class Weights:
    """One layer's weights [in, out] (fused QKV, O, fused gate+up, down) and norms.

    Dense: gate_up [hidden, 2·inter], down [inter, hidden], router None. MoE
    (probes/torch/moe.py): router [hidden, E], gate_up [E, hidden, 2·inter], down [E, inter,
    hidden]. ``routing`` maps where a forward pass ran (a decode position, or
    "prefill") to the expert ids [b or b·s, k] it chose there, for the float64 check."""

    def __init__(self, qkv, o, gate_up, down, norm1, norm2, router=None):
        self.qkv, self.o, self.gate_up, self.down, self.norm1, self.norm2 = qkv, o, gate_up, down, norm1, norm2
        self.router = router
        self.routing: dict = {}

    def nbytes(self) -> int:
        parts = (self.qkv, self.o, self.gate_up, self.down, self.norm1, self.norm2, self.router)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def full_layer(shape, dtype: str, device: str, seed: int, batch: int = 0, ctx: int = 0):
    """A layer's full (unsharded) weights, and a KV cache [batch, kv_heads, ctx, d] for
    each of K and V when ``batch``, drawn from ``seed`` in the case's dtype."""
    import torch

    dt = torch_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        t = torch.randn(*size, device=device, dtype=dt, generator=gen)
        return t.mul_(scale) if scale != 1.0 else t

    if shape.is_moe:
        # qkv, o, router, then every expert's gate+up and down (one tensor each).
        qkv, o, router = (randn(i, o, scale=1.0 / math.sqrt(i)) for i, o in map(shape.projection, ("qkv", "o", "router")))
        (h, f2), (f, _) = shape.projection("gate_up"), shape.projection("down")
        gate_up = randn(shape.num_experts, h, f2, scale=1.0 / math.sqrt(h))
        down = randn(shape.num_experts, f, h, scale=1.0 / math.sqrt(f))
        norms = [randn(shape.hidden_size, scale=0.1).add_(1.0) for _ in range(2)]
        w = Weights(qkv, o, gate_up, down, *norms, router=router)
    else:
        mats = [randn(i, o, scale=1.0 / math.sqrt(i)) for i, o in (shape.projection(p) for p in PROJECTIONS)]
        norms = [randn(shape.hidden_size, scale=0.1).add_(1.0) for _ in range(2)]
        w = Weights(*mats, *norms)
    if not batch:
        return w, None, None
    kv = (batch, shape.num_kv_heads, ctx, shape.head_dim)
    return w, randn(*kv), randn(*kv)


def shard_layer(w: Weights, shape, rank: int, tp: int) -> Weights:
    """Rank ``rank``'s Megatron shard of a full layer: its query heads' and KV heads'
    columns of QKV, its heads' rows of O, its slice of gate and of up, the same rows of
    down (of every expert, for an MoE layer); norms and the router replicated."""
    import torch

    if tp == 1:
        return w
    h, kv, d, inter = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size
    hl, kl, il = h // tp, kv // tp, inter // tp
    q = w.qkv[:, rank * hl * d : (rank + 1) * hl * d]
    k = w.qkv[:, h * d + rank * kl * d : h * d + (rank + 1) * kl * d]
    v = w.qkv[:, (h + kv) * d + rank * kl * d : (h + kv) * d + (rank + 1) * kl * d]
    # ``...`` covers the expert dimension of an MoE layer's [E, in, out] weights.
    gate = w.gate_up[..., rank * il : (rank + 1) * il]
    up = w.gate_up[..., inter + rank * il : inter + (rank + 1) * il]
    return Weights(
        torch.cat([q, k, v], dim=1).contiguous(),
        w.o[rank * hl * d : (rank + 1) * hl * d].contiguous(),
        torch.cat([gate, up], dim=-1).contiguous(),
        w.down[..., rank * il : (rank + 1) * il, :].contiguous(),
        w.norm1.clone(),
        w.norm2.clone(),
        router=None if w.router is None else w.router.clone(),
    )


def shard_kv(cache, rank: int, tp: int):
    kl = cache.shape[1] // tp
    return cache[:, rank * kl : (rank + 1) * kl].contiguous()


def decode_layer(x, w: Weights, k_cache, v_cache, pos: int, shape, reduce=None, matmul=None, sdpa=None):
    """One decode step of one layer (``shape`` = this rank's shard) for x [b, hidden]:
    the token's K/V written at ``pos``, attention over positions 0..pos, the row-parallel
    partial outputs passed through ``reduce`` (the all-reduce; identity unsharded).
    ``matmul``/``sdpa``: the GEMM and attention to use (probes.torch.common.matmul_for/sdpa_for:
    an fp32 upcast for a dtype the CPU has no arithmetic for); torch's own by default."""
    import torch
    import torch.nn.functional as F

    from probes.torch.decode import attention_reference, rms_norm

    mm = matmul or torch.matmul
    reduce = reduce or (lambda t: t)
    b = x.shape[0]
    h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    q, k, v = mm(rms_norm(x, w.norm1), w.qkv).split([h * d, kv * d, kv * d], dim=-1)
    k_cache[:, :, pos, :] = k.reshape(b, kv, d)
    v_cache[:, :, pos, :] = v.reshape(b, kv, d)
    q = q.reshape(b, h, 1, d)
    keys, values = k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1]
    if x.dtype == torch.float64:
        attn = attention_reference(q, keys, values)
    else:
        attn = (sdpa or F.scaled_dot_product_attention)(q, keys, values, enable_gqa=h != kv)
    x = x + reduce(mm(attn.reshape(b, h * d), w.o))
    return x + reduce(_mlp(rms_norm(x, w.norm2), w, shape, pos, mm))


def _mlp(x, w: Weights, shape, where, mm):
    """The layer's MLP on normed x [T, hidden]: the dense SwiGLU, or the MoE block
    (router, top-k, the chosen experts; its expert ids kept in ``w.routing[where]``).
    With a tensor-parallel shard the output is a partial sum (the caller reduces)."""
    import torch.nn.functional as F

    if w.router is None:
        gate, up = mm(x, w.gate_up).chunk(2, dim=-1)
        return mm(F.silu(gate) * up, w.down)
    from probes.torch.moe import moe_forward

    y, w.routing[where] = moe_forward(x, w.router, w.gate_up, w.down, shape.experts_per_token, mm)
    return y


def route_check(w: Weights, where, rows, dtype: str):
    """What the float64 reference needs to judge the routing of the kernel's rows
    ``rows`` at ``where`` (see Weights.routing); None for a dense layer."""
    if w.router is None:
        return None
    from probes.torch.moe import RouteCheck

    return RouteCheck(dtype, chosen=w.routing[where][rows])


def prefill_layer(x, w: Weights, shape, k_out, v_out, matmul=None, sdpa=None):
    """One layer at prefill for x [b, s, hidden]; its K and V [b, kv_heads, s, d] are
    written to ``k_out``/``v_out`` (the decode cache's prefix, or the send buffer).
    ``matmul``/``sdpa`` as in :func:`decode_layer`."""
    import torch
    import torch.nn.functional as F

    from probes.torch.prefill import rms_norm, split_qkv

    mm = matmul or torch.matmul
    b, s, _ = x.shape
    q, k, v = split_qkv(mm(rms_norm(x, w.norm1), w.qkv), shape)
    k_out.copy_(k)
    v_out.copy_(v)
    attn = (sdpa or F.scaled_dot_product_attention)(q, k, v, is_causal=True,
                                                    enable_gqa=shape.num_heads != shape.num_kv_heads)
    x = x + mm(attn.transpose(1, 2).reshape(b, s, shape.q_dim), w.o)
    y = _mlp(rms_norm(x, w.norm2).reshape(b * s, -1), w, shape, "prefill", mm)
    return x + y.view(b, s, -1)


def _weights64(w: Weights) -> Weights:
    """The matrices as they are (cast a block at a time by matmul64), norms in float64."""
    return Weights(w.qkv, w.o, w.gate_up, w.down, w.norm1.double(), w.norm2.double(), router=w.router)


# -- timing helpers -----------------------------------------------------------------------
class SegmentTimer:
    """Contiguous compute/comm segments of one step: perf_counter_ns at each boundary on
    the CPU; on CUDA an event recorded on the current stream at each boundary, read after
    the synchronize that ends the step."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.marks: list = []

    def _stamp(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter_ns()

    def start(self) -> None:
        self.marks = [("compute", self._stamp())]

    def switch(self, kind: str) -> None:
        self.marks.append((kind, self._stamp()))

    def stop(self) -> tuple[float, float, float]:
        """(step_s, compute_s, comm_s) of the step just ended."""
        self.marks.append(("end", self._stamp()))
        if self.cuda:
            synchronize(self.device)
        sums = {"compute": 0.0, "comm": 0.0}
        for (kind, t0), (_, t1) in zip(self.marks, self.marks[1:]):
            sums[kind] += t0.elapsed_time(t1) * 1e-3 if self.cuda else (t1 - t0) * 1e-9
        first, last = self.marks[0][1], self.marks[-1][1]
        total = first.elapsed_time(last) * 1e-3 if self.cuda else (last - first) * 1e-9
        return total, sums["compute"], sums["comm"]


def _dist():
    import torch.distributed as dist

    return dist


def _vote(value: int, device: str, world: int) -> int:
    """MAX of ``value`` over the ranks (the value itself with one rank)."""
    if world <= 1:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return int(t.item())


def _agree_or_raise(problem: str | None, rank: int, device: str, world: int, what: str) -> None:
    """Every rank fails together when any rank found a problem (none is left waiting)."""
    bad = _vote(1 if problem else 0, device, world)
    if problem:
        raise ProbeCheckFailed(f"{what} on rank {rank}: {problem}")
    if bad:
        raise ProbeCheckFailed(f"{what}: another rank's check failed")


def _timed_loop(policy, agree, rep, warm) -> tuple[list, int, str]:
    """The timing engine's loop (warm-up, then repetitions bounded by count and budget)
    for kernels that time themselves: ``rep()`` runs and records one repetition,
    ``warm()`` one untimed; ``agree(stop)`` makes every rank stop together."""
    warmup, t_w = 0, time.perf_counter()
    while not agree(warmup >= policy.warmup and time.perf_counter() - t_w >= policy.warmup_s):
        warm()
        warmup += 1
    count, start = 0, time.perf_counter()
    while count < policy.max_reps:
        if agree(count >= policy.min_reps and time.perf_counter() - start >= policy.budget_s):
            return count, warmup, "budget"
        rep()
        count += 1
    return count, warmup, "max_reps"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def spin(seconds: float, device: str) -> None:
    """Busy work for ``seconds`` on this rank: a host spin (on a GPU the stream idles
    meanwhile, which the segment events count as this rank's compute)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- CUDA graphs ---------------------------------------------------------------------------------
# Eager runs before a capture, on the capture's side stream: cuBLAS handles and workspaces,
# NCCL communicators and the allocator's blocks exist before the graph records addresses
# (torch.cuda.graph's documented warm-up, "Whole-network capture" in the CUDA semantics notes).
GRAPH_WARMUP = 3


def graph_collectives(world: int, backend: str | None) -> tuple[str | None, str]:
    """Where a captured TP step's all-reduces go, from the process group's backend:
    ``(placement, why)`` with placement None (one rank: no collective), "inside" (NCCL:
    torch captures NCCL collectives into a CUDA graph, since torch 1.10) or "outside"
    (any other backend, Gloo among them: its collectives are host-driven and cannot be
    captured, so the graph is cut at each one and it runs eagerly between replays)."""
    if world <= 1:
        return None, "one rank: no collective in the step"
    if str(backend or "").lower() == "nccl":
        return "inside", "NCCL all-reduces captured inside the step's graph"
    return "outside", (f"{backend} collectives cannot be captured in a CUDA graph: the graph is cut at each "
                       "all-reduce, which runs eagerly between the segments' replays")


def graph_plan(requested: bool, device: str, moe: bool, collectives: str | None, why: str) -> dict:
    """``extra["graph"]`` before any capture: {"requested", "applied" (False until a
    capture succeeds), "collectives", "reason"}. Not attempted (reason says why): not
    requested, a device other than CUDA (the case runs eagerly, it is not skipped), an
    MoE shape (its MLP reads the expert counts on the host: data-dependent sizes that a
    graph cannot hold). ``collectives``/``why``: :func:`graph_collectives`, or the
    request probes' own placement."""
    if not requested:
        return {"requested": False, "applied": False, "collectives": None, "reason": "graph=false: eager launches"}
    if not device.startswith("cuda"):
        return {"requested": True, "applied": False, "collectives": None,
                "reason": f"CUDA graphs need a CUDA device; {device} runs eagerly"}
    if moe:
        return {"requested": True, "applied": False, "collectives": None,
                "reason": "the MoE MLP reads its expert counts on the host (data-dependent sizes): not capturable; "
                          "runs eagerly"}
    return {"requested": True, "applied": False, "collectives": collectives, "reason": why}


def _begin_capture(graph, pool) -> None:
    """Start capturing into ``graph`` (memory from ``pool``) in thread-local error mode:
    only this thread's unsafe CUDA calls break the capture, so the NCCL watchdog thread
    polling earlier collectives' events meanwhile does not (cudaStreamBeginCapture's
    cudaStreamCaptureModeThreadLocal; torch.cuda.graph's capture_error_mode). torch
    builds older than 2.1 have no such argument and capture in their global mode."""
    try:
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
    except TypeError:
        graph.capture_begin(pool=pool)


def _end_capture(graph) -> None:
    """End a capture that raised midway (the stream leaves capture mode); its own error
    is secondary to the one that interrupted it."""
    try:
        graph.capture_end()
    except Exception:  # noqa: BLE001 - the capture's first error is the one reported
        pass


class SegmentGraphs:
    """One function captured as a chain of CUDA graphs cut at its collectives.

    ``capture(fn, stream)`` calls ``fn(reduce)`` once under capture on ``stream``
    (a side stream, as capture requires). ``cut=False``: ``reduce`` runs the all-reduce
    itself, so it is captured inside the single graph. ``cut=True``: ``reduce(t)`` ends
    the current graph, remembers t, and starts the next one; :meth:`replay` then
    replays segment i and all-reduces the i-th remembered tensor eagerly before segment
    i + 1 (``on_collective(t)`` does it, timed by the caller). The segments share one
    memory pool and always replay in capture order, as torch requires of graphs that
    share a pool (torch.cuda.graph_pool_handle docs)."""

    def __init__(self, cut: bool):
        self.cut = cut
        self.segments: list = []
        self.reduced: list = []
        self.out = None

    def capture(self, fn, stream) -> None:
        import torch

        pool = torch.cuda.graph_pool_handle()

        def begin():
            g = torch.cuda.CUDAGraph()
            self.segments.append(g)
            _begin_capture(g, pool)

        def cut(t):
            self.segments[-1].capture_end()
            self.reduced.append(t)
            begin()
            return t

        def inside(t):
            _dist().all_reduce(t)
            return t

        with torch.cuda.stream(stream):
            begin()
            try:
                self.out = fn(cut if self.cut else inside)
            except BaseException:
                _end_capture(self.segments[-1])
                raise
            self.segments[-1].capture_end()

    def replay(self, on_collective):
        for i, g in enumerate(self.segments):
            g.replay()
            if i < len(self.reduced):
                on_collective(self.reduced[i])
        return self.out


# -- tensor-parallel decode step (kernel) ----------------------------------------------------
class TPDecodeKernel(Kernel):
    def __init__(self, ctx: CaseContext, shape, layers: int, batch: int, ctx_len: int, dtype: str, copies: int,
                 graph: bool = False):
        super().__init__()
        import torch

        self.shape, self.layers, self.batch, self.ctx_len, self.dtype = shape, layers, batch, ctx_len, dtype
        self.rank, self.world, self.device, self.seed = ctx.rank, ctx.world_size, ctx.device, ctx.seed
        self.path = native_path(dtype, ctx.device_info, ctx.host)
        self.matmul, self.sdpa = matmul_for(self.path.native), sdpa_for(self.path.native)
        self.local = shape.shard(self.world)
        self.copies, self.index = copies, 0
        self.stack = []  # [copy][layer] -> (weights, k, v) of this rank's shard
        for c in range(copies):
            layers_c = []
            for layer in range(layers):
                w, k, v = full_layer(shape, dtype, self.device, layer_seed(self.seed, c, layer), batch, ctx_len)
                layers_c.append((shard_layer(w, shape, self.rank, self.world),
                                 shard_kv(k, self.rank, self.world), shard_kv(v, self.rank, self.world)))
                del w, k, v
            self.stack.append(layers_c)
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        self.x = torch.randn(batch, shape.hidden_size, device=self.device, dtype=torch_dtype(dtype), generator=gen)
        self.out = None
        self.timer = SegmentTimer(self.device)
        self.extra = {
            "tokens_per_step": batch,
            "world_size": self.world,
            "rank": self.rank,
            "layers": layers,
            "model_layers": shape.num_layers,
            "local_heads": self.local.num_heads,
            "local_kv_heads": self.local.num_kv_heads,
            "local_intermediate": self.local.intermediate_size,
            "allreduces_per_step": 2 * layers if self.world > 1 else 0,
            "allreduce_bytes": batch * shape.hidden_size * DTYPE_BYTES[dtype],
            "rotation_copies": copies,
            "threads": _threads(),
            "backend": str(_dist().get_backend()) if self.world > 1 else None,
        }
        self.inject_delay_s = injected_delay(self.rank)
        if self.inject_delay_s:
            self.extra["injected_delay_s"] = self.inject_delay_s
        self.graphs: list[SegmentGraphs] | None = None  # one per rotation copy once captured
        self.extra["graph"] = graph_plan(graph, self.device, shape.is_moe,
                                         *graph_collectives(self.world, self.extra["backend"]))

    def _reduce(self, t):
        self.timer.switch("comm")
        _dist().all_reduce(t)
        self.timer.switch("compute")
        return t

    def _layers(self, copy: int, reduce):
        """Every layer of one step on rotation copy ``copy`` (the new token at ctx − 1,
        the same slot at every step, so a captured step stays valid for each replay)."""
        x = self.x
        for w, k, v in self.stack[copy]:
            x = decode_layer(x, w, k, v, self.ctx_len - 1, self.local, reduce, self.matmul, self.sdpa)
        return x

    def capture(self) -> None:
        """Capture the step as CUDA graphs, one per rotation copy, when extra["graph"]
        says to try (see :func:`graph_plan`). NCCL: the all-reduces inside; if that
        capture raises on any rank, every rank captures again with them outside (the
        reason keeps the error). A capture that fails either way leaves the case eager
        with the reason recorded. Collective: every rank calls it."""
        g = self.extra["graph"]
        if not g["requested"] or not self.device.startswith("cuda") or self.shape.is_moe:
            return
        import torch

        def plain(t):
            _dist().all_reduce(t)
            return t

        reduce = plain if self.world > 1 else None
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                for copy in range(self.copies):
                    self._layers(copy, reduce)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        synchronize(self.device)
        first = g["collectives"]
        note = ""
        for attempt in (["inside", "outside"] if first == "inside" else [first]):
            graphs, error = [], None
            try:
                for copy in range(self.copies):
                    sg = SegmentGraphs(cut=attempt == "outside")
                    sg.capture(lambda r, c=copy: self._layers(c, r if self.world > 1 else None), stream)
                    graphs.append(sg)
                synchronize(self.device)
            except Exception as exc:  # noqa: BLE001 - recorded; the ranks agree just below
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if not _vote(1 if error else 0, self.device, self.world):
                self.graphs = graphs
                why = g["reason"] if attempt == first else (
                    f"NCCL capture with the all-reduces inside failed ({note}); they run eagerly between the "
                    "segments' replays")
                g.update(applied=True, collectives=attempt,
                         reason=f"applied: one graph per rotation copy ({self.copies}); {why}")
                return
            note = error or "another rank's capture failed"
        g.update(applied=False, collectives=None, reason=f"capture failed ({note}); runs eagerly")

    def _collective(self, t) -> None:
        self.timer.switch("comm")
        _dist().all_reduce(t)
        self.timer.switch("compute")

    def step(self):
        if self.inject_delay_s:
            # A straggler on purpose (coherence validate): extra compute before the first
            # all-reduce, so the other ranks wait for it inside the step.
            spin(self.inject_delay_s, self.device)
        if self.graphs is not None:
            return self.graphs[self.index].replay(self._collective)
        return self._layers(self.index, self._reduce if self.world > 1 else None)

    def run(self) -> None:
        self.timer.start()
        self.out = self.step()
        self.timer.stop()

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies
        synchronize(self.device)
        if self.world > 1:
            _dist().barrier()
            synchronize(self.device)

    def reference(self):
        """The step unsharded in float64: the full weights and cache of the copy just
        run, regenerated from their seeds, batch element 0."""
        from probes.torch.decode import decoder_layer
        from probes.torch.common import matmul64

        x = self.x[:1].double()
        for layer in range(self.layers):
            w, k, v = full_layer(self.shape, self.dtype, self.device, layer_seed(self.seed, self.index, layer),
                                 self.batch, self.ctx_len)
            # decode.decoder_layer: an independent implementation of the same layer (new
            # token at the last cache slot, ctx - 1).
            route = route_check(self.stack[self.index][layer][0], self.ctx_len - 1, slice(0, 1), self.dtype)
            x = decoder_layer(x, _weights64(w), k[:1].double(), v[:1].double(), self.shape, matmul=matmul64,
                              route_check=route)
            del w, k, v
        return x

    def check(self) -> None:
        import torch

        synchronize(self.device)
        problem = None
        try:
            if self.rank == 0:
                check_close(self.out[:1], self.reference(), self.dtype,
                            f"tensor-parallel decode step ({self.world} ranks) vs unsharded float64", self.extra)
            if self.world > 1:
                mine = self.out.clone()
                _dist().broadcast(mine, src=0)
                if not torch.allclose(self.out.double(), mine.double(), rtol=0, atol=0):
                    problem = "output differs from rank 0's after the all-reduces"
        except ProbeCheckFailed as exc:
            problem = str(exc)
        _agree_or_raise(problem, self.rank, self.device, self.world, "tensor-parallel decode step")

    def measure(self, policy):
        durations, compute, comm, starts = [], [], [], []

        def rep():
            self.before_each()
            starts.append(time.monotonic_ns())
            self.timer.start()
            self.out = self.step()
            total, c, m = self.timer.stop()
            durations.append(total)
            compute.append(c)
            comm.append(m)

        def warm():
            self.before_each()
            self.run()

        _, warmup, stop = _timed_loop(policy, lambda s: bool(_vote(int(s), self.device, self.world)), rep, warm)
        timer = "cuda_events per segment" if self.device.startswith("cuda") else "perf_counter_ns per segment"
        if self.graphs is not None and self.extra["graph"]["collectives"] == "inside":
            # One replay holds compute and all-reduces together: no boundary to time, so
            # no compute_s/comm_s columns (readers tolerate their absence) rather than a
            # split that would put the collectives in compute.
            self.sample_columns = {}
            timer = "cuda_events around each graph replay (compute and all-reduces inside one graph: not split)"
        else:
            self.sample_columns = {"compute_s": compute, "comm_s": comm}
        self.sample_t_start_ns = starts
        self.extra.update(warmup_steps=warmup + 1, stop_reason=stop, timer=timer)
        return durations

    def close(self) -> None:
        self.stack = []
        self.graphs = None


# -- requests -------------------------------------------------------------------------------
class RequestKernel(Kernel):
    """One request per repetition, colocated (1 rank) or disaggregated (2 ranks: rank 0
    prefills and sends the KV, rank 1 receives and decodes)."""

    def __init__(self, ctx: CaseContext, shape, p: dict, disagg: bool, copies: int):
        super().__init__()
        import torch

        self.shape, self.p, self.disagg = shape, p, disagg
        self.L, self.P, self.T, self.b = p["layers"], p["prompt"], p["tokens"], p["batch"]
        self.dtype, self.device, self.seed = p["dtype"], ctx.device, ctx.seed
        self.rank, self.world = ctx.rank, ctx.world_size
        self.path = native_path(self.dtype, ctx.device_info, ctx.host)
        self.matmul, self.sdpa = matmul_for(self.path.native), sdpa_for(self.path.native)
        self.prefills = not disagg or self.rank == 0
        self.decodes = not disagg or self.rank == 1
        self.copies, self.turn = copies, 0
        dt = torch_dtype(self.dtype)
        kv, d = shape.num_kv_heads, shape.head_dim
        # The same model on both sides: copy c of layer l from the same seed everywhere.
        self.stack = [[full_layer(shape, self.dtype, self.device, layer_seed(self.seed, c, layer))[0]
                       for layer in range(self.L)] for c in range(copies)]
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 7)
        self.prompt = torch.randn(self.b, self.P, shape.hidden_size, device=self.device, dtype=dt, generator=gen)
        if self.decodes:
            cache = (self.L, 2, self.b, kv, self.P + self.T, d)
            self.cache = torch.randn(*cache, device=self.device, dtype=dt, generator=gen)  # other data at first
        self.kv_layout = p.get("kv_layout", "contiguous")
        if disagg:
            self.kv_buf = torch.empty(self.L, 2, self.b, kv, self.P, d, device=self.device, dtype=dt)
            self._block_buf = torch.empty(self.b, kv, PAGED_BLOCK_TOKENS, d, device=self.device, dtype=dt)
            self.h_buf = torch.empty(self.b, shape.hidden_size, device=self.device, dtype=dt)
        self.record = None  # what the checked run saw
        self._threads = None
        if disagg and self.device.startswith("cpu"):
            # One request is in service at a time, so only one rank computes at any moment:
            # it gets every core, as the colocated probe does (the other waits in recv).
            self._threads = torch.get_num_threads()
            torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        self.offset_ns, self.offset_method, self.rtt_ns = 0, "one process", 0
        self.extra = {
            "layers": self.L, "prompt": self.P, "tokens": self.T, "batch": self.b,
            "arrival": p["arrival"], "rate": p["rate"] if p["arrival"] == "poisson" else None,
            "mode": "disaggregated" if disagg else "colocated",
            "role": ("prefill" if self.rank == 0 else "decode") if disagg else "prefill+decode",
            "kv_bytes": self.L * 2 * self.b * kv * self.P * d * DTYPE_BYTES[self.dtype],
            "rotation_copies": copies,
            "threads": _threads(),
            "ttft": ("arrival → the first output token (made by the prefill) on the decoding side: prefill done "
                     "(colocated), KV and token received (disaggregated)"),
            "tpot": "(e2e − ttft) / (T − 1)",
            "itl": "gaps between consecutive output tokens (T − 1 per request, extra.itl_s)",
            "model_layers": shape.num_layers,
            "decode_steps": self.T - 1,
        }
        self.step_graphs: list | None = None  # one CUDA graph per decode step, once captured
        self.graph_on = False  # every rank: the decode steps replay graphs (rotation per request)
        self.graph_out = self.last_out = self._final_want = None
        where = ("the KV send/recv runs eagerly between the prefill and the decode steps' graphs" if disagg
                 else "the prefill runs eagerly")
        self.extra["graph"] = graph_plan(bool(p.get("graph", False)), self.device, shape.is_moe,
                                         "outside" if disagg else None, where)

    # one request, in pieces --------------------------------------------------------------
    def _next_copy(self) -> list:
        c = self.turn % self.copies
        self.turn += 1
        return c

    def prefill(self):
        """Prefill the prompt; the KV into the decode cache (colocated) or the send
        buffer (disaggregated); returns the last position's hidden state [b, hidden]."""
        c = self._next_copy()
        x = self.prompt
        rec = self.record
        for layer, w in enumerate(self.stack[c]):
            dst = self.kv_buf[layer] if self.disagg else self.cache[layer, :, :, :, : self.P]
            if rec is not None:
                rec["prefill_in"].append(x[:1].clone())
            x = prefill_layer(x, w, self.shape, dst[0], dst[1], self.matmul, self.sdpa)
        if rec is not None:
            rec["prefill_copy"] = c
            rec["prefill_out"] = x[:1].clone()
        return x[:, -1].contiguous()

    def capture(self) -> None:
        """Capture each decode step (position prompt + j, rotation copy (j + 1) mod
        copies, every layer) as its own CUDA graph on the decoding rank, when
        extra["graph"] says to try: the input is a static hidden-state buffer, each
        step's graph reads the previous one's output, the cache is written in place.
        One graph per step, not one per loop, so the per-token stamps (ITL, TPOT) stay.
        The ranks agree: if the capture fails, the case runs eagerly with the reason.
        Every rank calls it."""
        g = self.extra["graph"]
        if not g["requested"] or not self.device.startswith("cuda") or self.shape.is_moe:
            return
        error = None
        if self.decodes:
            try:
                self._capture_steps()
            except Exception as exc:  # noqa: BLE001 - recorded; the ranks agree just below
                self.step_graphs = None
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if _vote(1 if error else 0, self.device, self.world):
            why = error or "the decoding rank's capture failed"
            g.update(applied=False, collectives=None, reason=f"capture failed ({why}); runs eagerly")
            return
        self.graph_on = True
        g.update(applied=True, reason=f"applied: one graph per decode step ({self.T - 1}) on the decoding rank; "
                                      f"{g['reason']}")

    def _capture_steps(self) -> None:
        import torch

        if self.disagg:
            self.h_static = self.h_buf.zero_()  # received anew by every request; finite for the warm-up
        else:
            self.h_static = torch.zeros(self.b, self.shape.hidden_size, device=self.device,
                                        dtype=torch_dtype(self.dtype))

        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up: the whole loop eagerly (positions ≥ prompt are rewritten by every
            # request before they are read).
            for _ in range(GRAPH_WARMUP):
                x = self.h_static
                for j in range(self.T - 1):
                    x = self._decode_step(x, (j + 1) % self.copies, self.P + j)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        synchronize(self.device)
        # One pool for all steps: they always replay in capture order.
        pool = torch.cuda.graph_pool_handle()
        graphs, x = [], self.h_static
        with torch.cuda.stream(stream):
            for j in range(self.T - 1):
                graph = torch.cuda.CUDAGraph()
                _begin_capture(graph, pool)
                try:
                    x = self._decode_step(x, (j + 1) % self.copies, self.P + j)
                except BaseException:
                    _end_capture(graph)
                    raise
                graph.capture_end()
                graphs.append(graph)
        synchronize(self.device)
        self.step_graphs, self.graph_out = graphs, x

    def _decode_step(self, x, copy: int, pos: int):
        for layer, w in enumerate(self.stack[copy]):
            x = decode_layer(x, w, self.cache[layer, 0], self.cache[layer, 1], pos, self.shape,
                             matmul=self.matmul, sdpa=self.sdpa)
        return x

    def decode(self, h, stamp):
        """T − 1 decode steps from hidden state h (output token 1 came out of the
        prefill; step j produces token j + 1); ``stamp()`` after each (synchronized).
        With graphs (and no recording run): h into the static input, then each step's
        graph replayed and stamped."""
        rec = self.record
        if self.step_graphs is not None and rec is None:
            if h is not self.h_static:
                self.h_static.copy_(h)
            for graph in self.step_graphs:
                graph.replay()
                stamp()
            self.last_out = self.graph_out
            return self.graph_out
        x = h
        for j in range(self.T - 1):
            c = self._next_copy()
            pos = self.P + j
            if rec is not None:
                rec["decode_copy"].append(c)
                rec["decode_in"].append([])
            for layer, w in enumerate(self.stack[c]):
                if rec is not None:
                    rec["decode_in"][-1].append(x[:1].clone())
                x = decode_layer(x, w, self.cache[layer, 0], self.cache[layer, 1], pos, self.shape,
                                 matmul=self.matmul, sdpa=self.sdpa)
            if rec is not None:
                rec["decode_in"][-1].append(x[:1].clone())
            stamp()
        self.last_out = x
        return x

    def _now(self) -> int:
        synchronize(self.device)
        return time.monotonic_ns()

    def _blocks(self):
        """(layer, k-or-v, token slice) of every 16-token block, in token order."""
        for layer in range(self.L):
            for kv in range(2):
                for start in range(0, self.P, PAGED_BLOCK_TOKENS):
                    yield layer, kv, slice(start, min(self.P, start + PAGED_BLOCK_TOKENS))

    def _send_kv(self, dist) -> None:
        if self.kv_layout != "paged":
            dist.send(self.kv_buf, 1)
            return
        for layer, kv, tokens in self._blocks():
            dist.send(self.kv_buf[layer, kv, :, :, tokens].contiguous(), 1)

    def _recv_kv(self, dist) -> None:
        if self.kv_layout != "paged":
            dist.recv(self.kv_buf, 0)
            return
        for layer, kv, tokens in self._blocks():
            block = self._block_buf[..., : tokens.stop - tokens.start, :]
            block = block.contiguous() if not block.is_contiguous() else block
            dist.recv(block, 0)
            self.kv_buf[layer, kv, :, :, tokens].copy_(block)

    def request(self, arrival_ns: int | None) -> dict:
        """Serve one request; the stamps this rank saw (its own clock)."""
        dist = _dist() if self.disagg else None
        st: dict = {}
        if self.graph_on:
            # The captured steps hold their rotation copies: every request uses the same
            # order (prefill copy 0, decode step j copy (j + 1) mod copies).
            self.turn = 0
        if self.prefills:
            if arrival_ns is not None:
                _wait_until(arrival_ns)
            st["a"] = arrival_ns if arrival_ns is not None else time.monotonic_ns()
            st["s"] = max(st["a"], time.monotonic_ns())
            h = self.prefill()
            st["p"] = self._now()
            if self.disagg:
                self._send_kv(dist)
                self.h_buf.copy_(h)
                dist.send(self.h_buf, 1)
            else:
                st["k"] = st["p"]
        if self.decodes:
            if self.disagg:
                self._recv_kv(dist)
                dist.recv(self.h_buf, 0)
                self.cache[:, :, :, :, : self.P].copy_(self.kv_buf)
                h = self.h_buf
                st["k"] = self._now()
            ends: list[int] = []
            self.decode(h, lambda: ends.append(self._now()))
            st["e"] = ends
        return st

    def run(self) -> None:
        self.request(None)

    # checks --------------------------------------------------------------------------------
    def checked_run(self) -> None:
        self.record = {"prefill_in": [], "decode_in": [], "decode_copy": []}
        self.request(None)

    def check(self) -> None:
        """The worker ran one request (untimed) already; run one more recording what each
        layer saw, then check it against float64 from the same inputs."""
        self.checked_run()
        problem = None
        try:
            if self.prefills:
                self._check_prefill()
            if self.disagg:
                problem = self._check_transfer()
            if self.decodes and problem is None:
                self._check_decode()
        except ProbeCheckFailed as exc:
            problem = str(exc)
        finally:
            self.record = None
        if self.graph_on:
            # The recorded run above is eager (a replay cannot record each layer's
            # input); the graphs now serve the same request (same inputs, same copies),
            # and their last output must match the float64 reference of the last step's
            # last layer. Every rank serves it, whatever the checks above found.
            self.request(None)
            if self.decodes and problem is None:
                try:
                    check_close(self.last_out[:1], self._final_want, self.dtype,
                                f"decode step {self.T - 1} replayed from its CUDA graph", self.extra)
                except ProbeCheckFailed as exc:
                    problem = str(exc)
        _agree_or_raise(problem, self.rank, self.device, self.world, f"{self.extra['mode']} request")

    def _check_prefill(self) -> None:
        from probes.torch.prefill import (
            causal_attention_reference,
            matmul64,
            mlp_reference,
            rms_norm,
            sample,
        )

        rec, shape = self.record, self.shape
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        src = self.kv_buf if self.disagg else self.cache[:, :, :, :, : self.P]
        pos = sample(self.P, 16, 93, include=(self.P - 1,)).to(self.device)
        for layer in range(self.L):
            w = self.seeded_weights(rec["prefill_copy"], layer)
            x0 = rec["prefill_in"][layer][0].double()
            n1 = rms_norm(x0, w.norm1.double())
            kv_all = matmul64(n1, w.qkv[:, h * d :])
            k = kv_all[:, : kv * d].view(self.P, kv, d).transpose(0, 1)
            v = kv_all[:, kv * d :].view(self.P, kv, d).transpose(0, 1)
            check_close(src[layer, 0, 0], k, self.dtype, f"prefill layer {layer} K", self.extra)
            check_close(src[layer, 1, 0], v, self.dtype, f"prefill layer {layer} V", self.extra)
            q = matmul64(n1[pos], w.qkv[:, : h * d]).view(-1, h, d).transpose(0, 1)
            attn = causal_attention_reference(q, k, v, pos, range(h), h // kv)
            x1 = x0[pos] + matmul64(attn.transpose(0, 1).reshape(-1, h * d), w.o)
            route = route_check(self.stack[rec["prefill_copy"]][layer], "prefill", pos, self.dtype)
            want = x1 + mlp_reference(rms_norm(x1, w.norm2.double()), w, shape, route)
            got = rec["prefill_in"][layer + 1][0, pos] if layer + 1 < self.L else rec["prefill_out"][0, pos]
            check_close(got, want, self.dtype, f"prefill layer {layer} output", self.extra)

    def _check_transfer(self) -> str | None:
        """Rank 0 sends the checksums of what it sent; rank 1 compares what it holds."""
        import torch

        from probes.torch.transfer import compare_checksums, kv_checksum

        mine = torch.stack([kv_checksum(self.kv_buf[layer]) for layer in range(self.L)] + [kv_checksum(self.h_buf)])
        bad = compare_checksums(mine, self.rank, 1 - self.rank)
        if self.rank == 0:
            return None
        self.extra["kv_checksum_layer0"] = [int(v) for v in mine[0].tolist()]
        if bad:
            return f"received KV checksum mismatch in layer(s) {bad} (index {self.L} = the hidden state)"
        return None

    def seeded_weights(self, copy: int, layer: int) -> Weights:
        """The weights as drawn from their seed (the references never trust the
        kernel's own copy)."""
        return full_layer(self.shape, self.dtype, self.device, layer_seed(self.seed, copy, layer))[0]

    def _check_decode(self) -> None:
        from probes.torch.decode import decoder_layer
        from probes.torch.common import matmul64

        rec = self.record
        for j in sorted({0, self.T - 2}):  # the first and the last decode step
            pos = self.P + j
            ins = rec["decode_in"][j]
            for layer in range(self.L):
                w = self.seeded_weights(rec["decode_copy"][j], layer)
                # The cache as step j found it (positions < pos), plus the slot decode.
                # decoder_layer (an independent implementation) writes the token's K/V to.
                k = self.cache[layer, 0, :1, :, : pos + 1].double().clone()
                v = self.cache[layer, 1, :1, :, : pos + 1].double().clone()
                route = route_check(self.stack[rec["decode_copy"][j]][layer], pos, slice(0, 1), self.dtype)
                want = decoder_layer(ins[layer].double(), _weights64(w), k, v, self.shape, matmul=matmul64,
                                     route_check=route)
                check_close(ins[layer + 1], want, self.dtype, f"decode step {j + 1} layer {layer}", self.extra)
        self._final_want = want  # the last step's last layer: what a graph replay must also give

    # timing --------------------------------------------------------------------------------
    def _clock_offset(self) -> None:
        """Rank 0's clock minus rank 1's: 0 when both run on one boot of one host
        (CLOCK_MONOTONIC is shared), else the ping-pong estimate with the least round
        trip (uncertainty ± rtt/2)."""
        import torch

        dist = _dist()
        dev = self.device if self.device.startswith("cuda") else "cpu"
        boot = torch.tensor([_boot_id()], dtype=torch.int64, device=dev)
        other = torch.empty_like(boot)
        if self.rank == 0:
            dist.send(boot, 1)
            dist.recv(other, 1)
        else:
            dist.recv(other, 0)
            dist.send(boot, 0)
        same = int(other.item()) == int(boot.item())
        buf = torch.zeros(2, dtype=torch.int64, device=dev)
        best = None
        for _ in range(OFFSET_PINGS):
            if self.rank == 1:
                t1 = time.monotonic_ns()
                dist.send(buf, 0)
                dist.recv(buf, 0)
                t3 = time.monotonic_ns()
                t2 = int(buf[0].item())
                if best is None or t3 - t1 < best[1]:
                    best = (t2 - (t1 + t3) // 2, t3 - t1)
            else:
                dist.recv(buf, 1)
                buf[0] = time.monotonic_ns()
                dist.send(buf, 1)
        result = torch.tensor(list(best) if best else [0, 0], dtype=torch.int64, device=dev)
        dist.broadcast(result, src=1)
        estimate, rtt = (int(v) for v in result.tolist())
        self.rtt_ns = rtt
        self.offset_ns = 0 if same else estimate
        self.offset_method = "same boot: CLOCK_MONOTONIC shared" if same else "ping-pong estimate (± rtt/2)"
        self.extra.update(clock_offset_ns=self.offset_ns, clock_offset_estimate_ns=estimate, clock_rtt_ns=rtt,
                          clock_offset_method=self.offset_method)

    def measure(self, policy):
        import numpy as np

        if self.disagg:
            self._clock_offset()
        poisson = self.p["arrival"] == "poisson"
        gaps = np.random.default_rng(ARRIVAL_SEED).exponential(1.0 / self.p["rate"], policy.max_reps) if poisson else None
        stamps: list[dict] = []
        state = {"t0": None}

        def agree(stop: bool) -> bool:
            return bool(_vote(int(stop), self.device, self.world))

        def rep():
            k = len(stamps)
            arrival = None
            if poisson and self.prefills:
                if state["t0"] is None:
                    state["t0"] = time.monotonic_ns()
                arrival = state["t0"] + int(float(np.sum(gaps[: k + 1])) * 1e9)
            stamps.append(self.request(arrival))

        count, warmup, stop = _timed_loop(policy, agree, rep, self.run)
        columns = self._columns(stamps, count)
        names = REQUEST_COLUMNS
        self.sample_columns = {n: columns[:, i].tolist() for i, n in enumerate(names) if n != "duration_s"}
        self.sample_t_start_ns = [int(v) for v in columns[:, len(names)].tolist()]
        # Every gap between consecutive output tokens of every request (vLLM's ITL list),
        # in request order: the collector scales them to the full model.
        self.extra["itl_s"] = [[float(f"{g:.6g}") for g in row] for row in columns[:, len(names) + 1:].tolist()]
        self.extra.update(requests=count, warmup_requests=warmup + 2, stop_reason=stop)
        if poisson:
            self.extra["interarrival_s"] = [float(f"{g:.6g}") for g in gaps[:count]]
            self.extra["arrival_seed"] = ARRIVAL_SEED
        return columns[:, 0].tolist()

    def _columns(self, stamps: list[dict], count: int):
        """Every rank ends up with the same request columns: rank 1's stamps (moved onto
        rank 0's clock) go to rank 0, which computes the columns and sends them back."""
        import numpy as np
        import torch

        n_cols = len(REQUEST_COLUMNS) + 1 + self.T - 1
        dev = self.device if self.device.startswith("cuda") else "cpu"
        if not self.disagg:
            return np.array([_request_columns(st, st, self.T) for st in stamps], dtype=np.float64).reshape(count, n_cols)
        dist = _dist()
        theirs = torch.zeros(count, self.T, dtype=torch.int64, device=dev)
        if self.rank == 1:
            theirs = torch.tensor([[st["k"], *st["e"]] for st in stamps], dtype=torch.int64, device=dev).reshape(count, self.T)
            theirs += self.offset_ns
            dist.send(theirs, 0)
            cols = torch.zeros(count, n_cols, dtype=torch.float64, device=dev)
            dist.recv(cols, 0)
            return cols.cpu().numpy()
        dist.recv(theirs, 1)
        rows = theirs.cpu().tolist()
        table = np.array([_request_columns(st, {"k": r[0], "e": r[1:]}, self.T) for st, r in zip(stamps, rows)],
                         dtype=np.float64).reshape(count, n_cols)
        dist.send(torch.tensor(table, dtype=torch.float64, device=dev), 1)
        return table

    def close(self) -> None:
        self.stack = []
        self.step_graphs = self.graph_out = self.last_out = None
        self.cache = self.kv_buf = None
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)


# -- builders ---------------------------------------------------------------------------------
def _prepare_agreement(ctx: CaseContext, build) -> Kernel:
    """``build()`` on every rank, then every rank leaves prepare the same way (or the
    others wait in the first collective until the group timeout): a rank that skipped
    or failed makes the others skip or fail with it.

    Unlike the collective probes' agreement (probes/torch/collective.py, which names the
    ranks that skipped or failed from every rank's code), one MAX vote is enough here:
    the other rank's own result carries its reason."""
    kernel, outcome = None, None
    try:
        kernel = build()
        synchronize(ctx.device)
    except Exception as exc:  # noqa: BLE001 - re-raised once the ranks agreed
        outcome = exc
    code = 0 if outcome is None else (1 if isinstance(outcome, ProbeSkip) else 2)
    worst = _vote(code, ctx.device, ctx.world_size)
    if outcome is not None:
        raise outcome
    if worst == 2:
        raise RuntimeError("another rank failed preparing the case")
    if worst == 1:
        raise ProbeSkip("another rank skipped the case (see its reason)")
    return kernel


@kernel("composite.tp_decode_step", "torch")
def build_tp_decode_step(probe, ctx: CaseContext) -> Kernel:
    params = {**ctx.params, "world_size": ctx.world_size}
    world = ctx.world_size

    def build() -> Kernel:
        shape = load_model(params["model"])
        work = probe.work(params, ctx.device_info)
        local = shape.shard(world)
        size = DTYPE_BYTES[params["dtype"]]
        per_copy = params["layers"] * (
            local.stored_weight_elements() * size  # every expert of an MoE layer
            + params["batch"] * local.kv_bytes_per_token_layer(size) * params["ctx"])
        copies = rotation_count(per_copy, ctx.device, ctx.host)
        sharing = world if ctx.device.startswith("cpu") else 1
        # The copies, plus one full layer and cache drawn at a time before slicing.
        full = shape.stored_weight_elements() * size
        full += params["batch"] * shape.kv_bytes_per_token_layer(size) * params["ctx"]
        require_memory(ctx.device, int((copies * per_copy + 2 * full) * sharing),
                       f"{probe.name} ({copies} copies of the {params['layers']}-layer shard × {sharing} rank(s))")
        kernel = TPDecodeKernel(ctx, shape, params["layers"], params["batch"], params["ctx"], params["dtype"], copies,
                                graph=bool(params.get("graph", False)))
        kernel.capture()
        kernel.work, kernel.params = kernel.path.record(work, kernel.extra), params
        return kernel

    return _prepare_agreement(ctx, build)


@kernel(("composite.colocated_request", "composite.disagg_request"), "torch")
def build_request(probe, ctx: CaseContext) -> Kernel:
    p = dict(ctx.params)

    def build() -> Kernel:
        shape = load_model(p["model"])
        size = DTYPE_BYTES[p["dtype"]]
        stack = p["layers"] * shape.stored_weight_elements() * size  # every expert of an MoE layer
        copies = rotation_count(stack, ctx.device, ctx.host)
        acts = p["batch"] * p["prompt"] * (shape.hidden_size * 8 + shape.intermediate_size * 4) * size
        cache = 2 * p["layers"] * p["batch"] * shape.kv_bytes_per_token_layer(size) * (p["prompt"] + p["tokens"])
        sharing = ctx.world_size if ctx.device.startswith("cpu") else 1
        require_memory(ctx.device, int((copies * stack + acts + cache) * sharing),
                       f"{probe.name} ({copies} copies of the {p['layers']}-layer stack)")
        kernel = RequestKernel(ctx, shape, p, probe.disagg, copies)
        kernel.capture()
        kernel.work, kernel.params = kernel.path.record(probe.work(p, ctx.device_info), kernel.extra), p
        return kernel

    return _prepare_agreement(ctx, build)
