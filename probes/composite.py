"""Composite serving probes: a miniature transformer served for real, built from the
same kernels as the isolated probes, so the isolated times can predict it (T_pred,
INDICATORS.md §2) and the gap shows cross-layer loss.

The model is a truncated stack of ``layers`` Llama-style decoder layers of a shape in
configs/models/ (RMSNorm, fused QKV, attention over a KV cache, output projection,
residual, RMSNorm, SwiGLU MLP, residual; no rotary embedding, no embedding table or LM
head: a token is its hidden state). Weights are N(0, 1/in), inputs N(0, 1).
For an MoE shape the MLP is the router and each token's top-k experts (probes/moe.py),
every expert split over the tensor-parallel ranks and the router replicated; in the
work models W_shard's MLP part is then, for FLOPs, each token's k experts (+ router)
and, for bytes, the experts the batch touches (expected under uniform routing, see
``ModelShape.weights_touched``); the checks re-derive the routing in float64.

``composite.tp_decode_step`` — one decode step of ``batch`` sequences at a KV cache of
``ctx`` tokens (the new token written at position ctx−1, the query attending to all ctx
tokens, as ``decode.layer``), tensor-parallel over ``world_size`` ranks, Megatron-style:
QKV and gate+up column-parallel (each rank: num_heads/n query heads, num_kv_heads/n KV
heads and its KV cache, intermediate/n of the MLP), O and down row-parallel, an
all-reduce (sum, in the activation dtype) of the partial outputs after the attention
block and after the MLP of every layer: 2·layers all-reduces of batch × hidden elements.
``world_size`` 1 runs the same step unsharded with no collective (the T(1) of scaling
efficiency T(1)/(n·T(n))). Gloo on the CPU, NCCL between GPUs.
Per step and per rank (sample columns): ``compute_s`` (time outside collectives),
``comm_s`` (time inside the all-reduces, waiting for peers included); ``duration_s`` =
that rank's step time = compute_s + comm_s (contiguous segments: perf_counter_ns
boundaries on the CPU, CUDA events recorded on the compute stream at every boundary
and read after a synchronize at the step's end on GPUs). Before every step (untimed)
the ranks meet at a barrier, so a step's comm_s is the wait for the slowest rank plus
the transfer. Work model (per rank: the rank's own shard; a CPU's ranks share one
device): FLOPs = layers × (2·batch·W_shard + 4·batch·(heads/n)·ctx·head_dim); bytes =
layers × (W_shard + KV_shard(ctx) + the new token's K/V + 2·batch·hidden) × dtype bytes,
W_shard = the shard's weight elements. Check (once per case): rank 0 recomputes the
step unsharded in float64 from the same weights (regenerated from their seeds) and the
same KV cache; every rank's output must match it within the dtype's tolerance.

``composite.colocated_request`` and ``composite.disagg_request`` — whole requests of
``tokens`` output tokens T: a prompt of ``prompt`` tokens (× ``batch`` sequences)
prefilled, which makes output token 1 (as in vLLM and MLPerf), then T − 1 decode steps
one at a time, each making the next token, the cache growing by one token per step.
Colocated: one rank does both, the prefill writing the KV straight into the decode
cache. Disaggregated (2 ranks): rank 0 prefills into a contiguous buffer [layers, K/V,
batch, kv_heads, prompt, head_dim] and sends it and the last prompt position's hidden
state with torch.distributed send/recv; rank 1 receives, copies the KV into its decode
cache and decodes. One request is in service at a time (no batching of requests, no
overlap of one request's decode with the next one's prefill). Arrivals: ``back_to_back``
(the next request arrives when the previous one is done: closed loop, one user) or
``poisson`` at ``rate`` requests/s (exponential gaps drawn once per case with a fixed
seed, the same for both probes, recorded in extra; a request that arrives while the
previous one is in service waits).

Request timeline (every time on rank 0's CLOCK_MONOTONIC; rank 1's stamps are moved
onto it by the clock offset, 0 on one host, else estimated by ping-pong, see extra):
arrival a → start s (queue) → prefill done p → first token and KV in place on the
decoding rank k (= p colocated) → decode step j done e_j, j = 1..T − 1. Output token 1
is the prefill's (its last hidden state; the LM head is outside the layers, see below)
and comes out at k: colocated at the end of the prefill, disaggregated when it reaches
the decode rank with the KV (the decode instance streams every token to the client, as
in vLLM's disaggregated prefill). Output token j + 1 is decode step j's, at e_j.
Columns (vLLM benchmarks/benchmark_serving.py definitions, formulas.request_latencies):
``queue_s`` = s − a, ``prefill_s`` = p − s, ``kv_transfer_s`` = k − p (0 colocated;
send, receive and the copy into the cache), ``decode_s`` = e_{T−1} − k, ``ttft_s`` =
k − a (arrival to the first output token, queueing included), ``tpot_s`` = (e2e −
ttft)/(T − 1), ``itl_max_s`` = the longest gap between consecutive tokens (every gap of
every request in extra ``itl_s``), and ``duration_s`` = e_{T−1} − a (end-to-end,
queueing included) = queue + prefill + kv_transfer + decode. Every rank of a request
case reports the same per-request values. The work model counts one request: the
prefill (``prefill.layer``'s model × layers) and T − 1 decode steps (weights once per
step, the KV read at each step's context).
Checks (once per case): prefill K/V and outputs per layer against float64 from the same
inputs (batch element 0), the received KV checksummed against the sender's (exact),
and decode steps 1 and T per layer against float64 from the same inputs and cache.

T_pred components (``Probe.components``): TP step: per layer decode.projection qkv, o,
gate_up, down and decode.attention (contiguous) at ``tp`` = world size, plus 2 per layer
collective.all_reduce of batch × hidden × dtype bytes at the same world size. Requests:
per layer prefill.projection ×4 and prefill.attention at (batch, prompt); per layer and
decode step decode.projection ×4 and decode.attention at the mean context
prompt + T//2; disaggregated adds transfer.kv_sendrecv (contiguous, ctx = prompt,
layers) × batch. RMSNorm, SiLU and residual adds are in no component.

Outside the layers (role ``outside``, not in T_pred: the truncated stack runs none of
them): the TP step adds decode.lm_head at ``tp`` = world size (embedding lookup, final
norm, LM head over vocab/tp); requests add prefill.lm_head once and decode.lm_head per
decode step (probes/model_ends.py). The collector builds the full-model figure from
them: layer time × num_layers / layers + these (INDICATORS.md §2, truncated models);
``extra.model_layers`` carries num_layers.

``graph`` (every composite; false by default and then left out of the case id): on
CUDA, true captures the decode work once as CUDA graphs (torch.cuda.CUDAGraph, after
warm-up on a side stream, static inputs and outputs) and replays them in the timed
loop, so the composite pays no per-kernel launch cost, like the isolated decode cases
it is predicted from. TP step: one graph per rotation copy holding every layer of the
step (the new token's position, ctx − 1, is the same at every step); the all-reduces
inside it when the group is NCCL (``collectives: inside``; the step is then one
replay, and compute_s/comm_s are not separable and not reported), else the graph is
cut at each all-reduce, which runs eagerly between the segments' replays
(``outside``). Requests: one graph per decode step position (prompt + j), replayed
step by step so the per-token stamps stay; the prefill and the KV send/recv run
eagerly; with graphs every request uses the rotation copies in the same order
(prefill copy 0, decode step j copy (j + 1) mod copies). MoE shapes are not captured
(the expert counts are read on the host). What was done is in ``extra["graph"]``:
requested, applied, collectives (inside/outside/None) and the reason; on a CPU the
case runs eagerly and says so (not skipped). The check replays the graph and compares
its output with the same float64 reference as the eager path.

Weights and KV caches are rotated like the decode probes': the layer stack exists in
enough copies to cover 4× the last-level cache (L2 on GPUs) and each forward pass
(step, prefill, decode step) uses the next copy, so a truncated 2-layer stack reads its
weights from memory as a whole model's would.

This module holds what the probes are (parameters, work models, skip rules, T_pred
components, the request columns) and imports no framework; the torch kernels and their
builders are in probes/torch/composite.py.
"""

from __future__ import annotations

import os
import time
import zlib

from harness.errors import ProbeSkip
from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES
from probes.gemm import gemm_skip_reason
# The parts outside the layers (components of role "outside"): importing them registers
# decode.lm_head and prefill.lm_head wherever the composites are.
from probes.model_ends import DecodeEnds, PrefillEnds
from probes.models import PROJECTIONS, attention_flops, load_model, model_names

DTYPES = ("fp32", "bf16")
ARRIVALS = ("back_to_back", "poisson")
ARRIVAL_SEED = 20240901  # the same Poisson arrivals for every request probe and run
OFFSET_PINGS = 16
# Kernel knobs the backends share: the straggler injected by `coherence validate` and
# the paged layout's block size (the disaggregated request's kv_layout=paged).
INJECT_ENV = "COHERENCE_INJECT_DELAY"
PAGED_BLOCK_TOKENS = 16


# -- parameters ---------------------------------------------------------------------------
def _model_param() -> Param:
    return Param(default=("tiny",), type=str, choices=model_names(), help="shape in configs/models/")


def _layers_param() -> Param:
    return Param(default=(2,), type=int, minimum=1, help="layers of the model's shape in the truncated stack")


def _dtype_param() -> Param:
    return Param(default=("fp32",), type=str, choices=DTYPES)


def _graph_param() -> Param:
    # implicit=False: graph=false (eager, what ran before the parameter existed) stays out
    # of the case id, so the eager cases keep their ids. Default (False,): both values by
    # default would double every composite, and on a CPU the graph case only repeats the
    # eager one (recorded as not applicable); a GPU suite names [true, false] where the
    # graph/eager pair is the finding (configs: the GPU check suite).
    return Param(default=(False,), type=bool, implicit=False,
                 help="true: on CUDA, capture each decode step once as a CUDA graph and replay it "
                      "(elsewhere accepted, recorded as not applicable, run eagerly)")


def _request_params() -> dict:
    return {
        "model": _model_param(),
        "layers": _layers_param(),
        "prompt": Param(default=(256,), type=int, minimum=16, help="prompt tokens per sequence"),
        "tokens": Param(default=(16,), type=int, minimum=2, help="output tokens T (one decode step each)"),
        "batch": Param(default=(1,), type=int, minimum=1, help="sequences per request"),
        "dtype": _dtype_param(),
        "arrival": Param(default=("back_to_back",), type=str, choices=ARRIVALS),
        "rate": Param(default=(4.0,), type=float, minimum=1e-6, help="requests/s of the poisson arrivals"),
        "graph": _graph_param(),
    }


# -- the model ----------------------------------------------------------------------------
def layer_seed(seed: int, copy: int, layer: int) -> int:
    """The seed of rotation copy ``copy`` of layer ``layer``: the same on every rank, so
    both sides of a disaggregated request hold the same model and a check can redraw it."""
    return zlib.crc32(f"{seed}/{copy}/{layer}".encode())


# -- work models ----------------------------------------------------------------------------
def decode_step_work(shape, batch: int, ctx: int, layers: int, dtype: str) -> tuple[float, float]:
    """FLOPs and bytes of one decode step of ``layers`` layers of ``shape`` (a shard or
    the whole layer) at a KV cache of ``ctx`` tokens (the new one included).
    MLP terms: FLOPs count each token's k experts (and the router); the weight bytes
    count the experts the batch's tokens touch (``ModelShape.weights_touched``,
    uniform routing), the whole MLP when dense."""
    size = DTYPE_BYTES[dtype]
    weights = shape.weights_touched(batch)
    flops = 2.0 * batch * shape.layer_weight_elements()
    flops += attention_flops(batch, 1, ctx, shape.num_heads, shape.head_dim, causal=False)
    kv_read = batch * shape.kv_bytes_per_token_layer(size) * ctx
    nbytes = weights * size + kv_read + batch * shape.kv_bytes_per_token_layer(size) + 2 * batch * shape.hidden_size * size
    return layers * flops, float(layers * nbytes)


def request_work(shape, batch: int, prompt: int, tokens: int, layers: int, dtype: str) -> tuple[float, float]:
    """One request of ``tokens`` output tokens: the prefill of ``prompt`` tokens (which
    makes output token 1) and ``tokens`` − 1 decode steps, the j-th at a context of
    prompt + j."""
    from probes.prefill import layer_work

    pre = layer_work(shape, batch, prompt, dtype)
    flops, nbytes = layers * pre.flops, layers * pre.bytes
    for j in range(1, tokens):
        f, b = decode_step_work(shape, batch, prompt + j, layers, dtype)
        flops, nbytes = flops + f, nbytes + b
    return flops, float(nbytes)


def decode_projection_parts(shape, params: dict, count: float, **fields) -> list[dict]:
    """The ``decode.projection`` components of ``count`` decode layers at ``params["batch"]``
    sequences: ``[{"probe", "params", "count", **fields}]`` (``fields``: role, rank).

    Dense: qkv, o, gate_up and down once per layer at the batch. MoE: qkv and o at the
    batch; gate_up and down once per expert touched, E_t = shape.experts_touched(batch)
    (uniform routing, probes.moe.expected_experts), each over the batch·k/E_t tokens routed
    to it on average, rounded to whole tokens (at batch 1, top-2: two experts of one token
    each, exact). The router GEMM (hidden × experts, under 0.1 % of one expert's weights
    for Mixtral) has no isolated case and is left out of T_pred."""
    batch = int(params["batch"])
    if not shape.is_moe:
        return [{"probe": "decode.projection", "params": {**params, "proj": proj}, "count": count, **fields}
                for proj in PROJECTIONS]
    touched = shape.experts_touched(batch)
    per_expert = max(1, round(batch * shape.experts_per_token / touched))
    parts = [{"probe": "decode.projection", "params": {**params, "proj": proj}, "count": count, **fields}
             for proj in ("qkv", "o")]
    parts += [{"probe": "decode.projection", "params": {**params, "batch": per_expert, "proj": proj},
               "count": count * touched, **fields} for proj in ("gate_up", "down")]
    return parts


def _hint(flops: float, nbytes: float) -> str:
    return "memory" if nbytes and flops / nbytes < 16.0 else "compute"


# -- run-time facts every backend's kernels read (no framework) ------------------------------
def injected_delay(rank: int) -> float:
    """Seconds of extra compute per step for this rank, from ``COHERENCE_INJECT_DELAY=
    rank:seconds`` (set by `coherence validate` to slow one rank; recorded in the case's
    extra so a perturbed run says so). 0 when unset or for other ranks."""
    spec = os.environ.get(INJECT_ENV, "")
    if not spec:
        return 0.0
    try:
        who, seconds = spec.split(":", 1)
        return float(seconds) if int(who) == rank else 0.0
    except ValueError:
        raise ProbeSkip(f"{INJECT_ENV}={spec!r}: expected rank:seconds") from None


# -- tensor-parallel decode step -----------------------------------------------------------
def _shape_skip(params: dict, world: int, device_info: dict, host: dict) -> str | None:
    shape = load_model(params["model"])
    if params["layers"] > shape.num_layers:
        return f"{shape.name} has {shape.num_layers} layers, {params['layers']} asked"
    return gemm_skip_reason(params["dtype"], device_info or {}, host or {}, emulated_ok=True)


@register
class TPDecodeStep(Probe):
    name = "composite.tp_decode_step"
    family = "composite"
    description = ("a tensor-parallel decode step of a truncated model (Megatron sharding, KV cache, 2 all-reduces "
                   "per layer); per rank compute_s and comm_s")
    device_types = ("cpu", "cuda")
    ranks = 0
    min_world_size = 1
    params = {
        "model": _model_param(),
        "layers": _layers_param(),
        "batch": Param(default=(1, 8), type=int, minimum=1, help="sequences (one new token each)"),
        "ctx": Param(default=(1024,), type=int, minimum=2, help="tokens in the KV cache, the new one included"),
        "dtype": _dtype_param(),
        "world_size": Param(default=("auto",), type=int, allow_auto=True, minimum=1,
                            help="tensor-parallel ranks; auto = every size from 1 up to the ranks available"),
        "graph": _graph_param(),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        world = params["world_size"] if params["world_size"] != "auto" else 1
        local = load_model(params["model"]).shard(world)
        flops, nbytes = decode_step_work(local, params["batch"], params["ctx"], params["layers"], params["dtype"])
        return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        world = params["world_size"]
        if world != "auto" and (reason := load_model(params["model"]).shard_reason(world)):
            return reason
        return _shape_skip(params, world, device_info, host)

    def components(self, params: dict, world_size: int) -> list[dict]:
        p, n = params, world_size
        common = {"model": p["model"], "batch": p["batch"], "dtype": p["dtype"], "tp": n}
        parts = decode_projection_parts(load_model(p["model"]), common, p["layers"], role="compute")
        parts.append({"probe": "decode.attention", "params": {**common, "ctx": p["ctx"], "layout": "contiguous"},
                      "count": p["layers"], "role": "compute"})
        if n > 1:
            size = p["batch"] * load_model(p["model"]).hidden_size * DTYPE_BYTES[p["dtype"]]
            parts.append({"probe": "collective.all_reduce",
                          "params": {"size_bytes": size, "dtype": p["dtype"], "world_size": n},
                          "count": 2 * p["layers"], "role": "collective"})
        # Outside the layers (not run by the truncated step; the full-model step adds it).
        parts.append({"probe": DecodeEnds.name, "params": {"model": p["model"], "batch": p["batch"],
                                                            "dtype": p["dtype"], "tp": n},
                      "count": 1, "role": "outside"})
        return parts


# -- requests -------------------------------------------------------------------------------
# Per-request sample columns, in the order _request_columns returns them.
REQUEST_COLUMNS = ("duration_s", "ttft_s", "tpot_s", "queue_s", "prefill_s", "kv_transfer_s", "decode_s", "itl_max_s")


def _request_columns(front: dict, back: dict, tokens: int) -> list[float]:
    """One request's row from the prefill side's stamps (a arrival, s start, p prefill
    done) and the decoding side's (k first token and KV in place, e[j] decode step j
    done, T − 1 of them), all in ns on rank 0's clock: the REQUEST_COLUMNS in seconds
    (duration = e2e), then the arrival (ns), then the T − 1 inter-token gaps (s).

    Definitions as vLLM's benchmarks/benchmark_serving.py computes them per request:
    output token 1 at k, token j + 1 at e[j]; TTFT = k − a; E2E = e[-1] − a;
    TPOT = (E2E − TTFT) / (T − 1); ITL = the gaps between consecutive tokens."""
    from harness.collector.formulas import request_latencies

    a, s, p = front["a"], front["s"], front["p"]
    k, e = back["k"], list(back["e"])
    ns = 1e-9
    # Relative to the arrival: ns since boot do not fit a double's precision in seconds.
    times = [(k - a) * ns, *((t - a) * ns for t in e)]
    lat = request_latencies(0.0, times)
    itl = lat["itl_s"]
    return [lat["e2e_s"], lat["ttft_s"], lat["tpot_s"], (s - a) * ns, (p - s) * ns, (k - p) * ns, (e[-1] - k) * ns,
            max(itl) if itl else float("nan"), float(a), *itl]


def _wait_until(t_ns: int) -> None:
    """Sleep (then spin for the last 0.2 ms) until CLOCK_MONOTONIC reaches t_ns."""
    while True:
        left = t_ns - time.monotonic_ns()
        if left <= 0:
            return
        if left > 300_000:
            time.sleep((left - 200_000) * 1e-9)


def _boot_id() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            text = f.read().strip()
    except OSError:
        import socket

        text = socket.gethostname()
    return zlib.crc32(text.encode()) or 1


class _RequestProbe(Probe):
    family = "composite"
    device_types = ("cpu", "cuda")
    params = _request_params()
    disagg = False

    def work(self, params: dict, device_info: dict) -> Work:
        shape = load_model(params["model"])
        flops, nbytes = request_work(shape, params["batch"], params["prompt"], params["tokens"], params["layers"],
                                     params["dtype"])
        return Work(flops=flops, bytes=nbytes, bound=_hint(flops, nbytes), dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return _shape_skip(params, 1, device_info, host)

    def components(self, params: dict, world_size: int) -> list[dict]:
        p, L, T = params, params["layers"], params["tokens"]
        decode_rank = 1 if self.disagg else 0
        pre = {"model": p["model"], "batch": p["batch"], "seq": p["prompt"], "dtype": p["dtype"]}
        dec = {"model": p["model"], "batch": p["batch"], "dtype": p["dtype"]}
        shape = load_model(p["model"])
        if shape.is_moe:
            # prefill.mlp runs the router and the routed experts' grouped GEMMs itself.
            parts = [{"probe": "prefill.projection", "params": {**pre, "proj": proj}, "count": L, "role": "compute"}
                     for proj in ("qkv", "o")]
            parts.append({"probe": "prefill.mlp", "params": pre, "count": L, "role": "compute"})
        else:
            parts = [{"probe": "prefill.projection", "params": {**pre, "proj": proj}, "count": L, "role": "compute"}
                     for proj in PROJECTIONS]
        parts.append({"probe": "prefill.attention", "params": pre, "count": L, "role": "compute"})
        if self.disagg:
            parts.append({"probe": "transfer.kv_sendrecv",
                          "params": {"model": p["model"], "ctx": p["prompt"], "layers": L,
                                     "layout": p.get("kv_layout", "contiguous"),
                                     "dtype": p["dtype"]},
                          "count": p["batch"], "role": "transfer"})
        # T − 1 decode steps (the prefill makes token 1), step j at context prompt + j:
        # mean context prompt + T/2.
        parts += decode_projection_parts(shape, dec, (T - 1) * L, role="compute", rank=decode_rank)
        parts.append({"probe": "decode.attention",
                      "params": {**dec, "ctx": p["prompt"] + T // 2, "layout": "contiguous"},
                      "count": (T - 1) * L, "role": "compute", "rank": decode_rank})
        # Outside the layers (not run by the truncated request; the full-model request
        # adds them): the prefill's embedding + LM head for token 1, then one per decode step.
        parts.append({"probe": PrefillEnds.name, "params": {**pre}, "count": 1, "role": "outside"})
        parts.append({"probe": DecodeEnds.name, "params": {**dec}, "count": T - 1, "role": "outside",
                      "rank": decode_rank})
        return parts


@register
class ColocatedRequest(_RequestProbe):
    name = "composite.colocated_request"
    description = "requests (prefill, then T decode steps) on one device; per request TTFT, TPOT, e2e, queue"
    ranks = 1


@register
class DisaggRequest(_RequestProbe):
    name = "composite.disagg_request"
    description = ("requests prefilled on rank 0, KV cache sent (send/recv) to rank 1, decoded there; "
                   "per request TTFT, TPOT, e2e, KV transfer")
    ranks = 2
    disagg = True
    params = {**_request_params(),
              "kv_layout": Param(default=("contiguous",), type=str, choices=("contiguous", "paged"), implicit="contiguous",
                                 help="contiguous: the KV in one message; paged: one message per 16-token block, "
                                      "layer and K/V (gathered and scattered on each side)")}