"""Collective probes: torch.distributed collectives across the ranks of one group.

One probe per operation: ``collective.all_reduce``, ``.all_gather``,
``.reduce_scatter``, ``.broadcast``, ``.reduce``, ``.all_to_all`` and ``.sendrecv``
(a ring: every rank sends to rank+1 and receives from rank−1 in one
``batch_isend_irecv``). The harness starts the ranks (Gloo on the CPU, NCCL with one
rank per GPU; or the launcher's group under torchrun) and hands each rank a case; every
world size from 2 up to the ranks available is swept (parameter ``world_size``).

Sizes and bandwidths follow nccl-tests (doc/PERFORMANCE.md there):

- ``size_bytes`` is the buffer the operation is named by: the whole (gathered) buffer
  for all_gather and reduce_scatter (each rank contributes or receives size/n), the
  per-rank send buffer for all_to_all (size/n to each peer), the bytes each rank sends
  for sendrecv, the buffer itself for the rest.
- algbw = size / time; busbw = algbw × factor with the factor of :func:`busbw_factor`:
  all_reduce 2(n−1)/n; all_gather, reduce_scatter, all_to_all (n−1)/n; broadcast,
  reduce, sendrecv 1. The harness computes both from the work model
  (``Work.collective``) at the median of the per-repetition durations, each of which is
  the slowest rank's (a collective ends when its last rank does).

The size is rounded *down* to a whole number of elements, and for the operations that
split the buffer in n chunks (all_gather, reduce_scatter, all_to_all) to a multiple of
n elements, so every rank moves the same number of elements; the size actually moved is
what the work model and ``resolved_params`` hold (1 KiB of fp32 over 3 ranks moves 1020
bytes). A size below one element per rank is skipped with the reason.

Inputs are small integers laid out so that the exact result is representable in the
dtype and depends on the rank and the element index (a chunk in the wrong slot, a rank
missing from a sum or a stale buffer changes the values): every rank checks its output
once per case, at every element of small buffers and at 64 Ki sampled elements plus
every chunk boundary of large ones, against :func:`expected_values`. Only the root
checks a reduce. A failed check on any rank fails the case on every rank (the ranks
agree on the outcome, so none is left waiting in a collective).

Two figures per case, side by side (issue 19):

- ``busbw_Bps`` (column ``busbw_method`` = ``per_rep_p50``): the median of the
  per-repetition distribution below, every repetition barriered and timed at its
  slowest rank. It keeps the tails and stragglers, and at small sizes it reads lower
  than nccl-tests.
- ``busbw_b2b_Bps`` (``busbw_b2b_method``): nccl-tests' own figure, a loop of k
  iterations with nothing between them, averaged (:func:`back_to_back`, run once per
  case before the repetitions; its details in ``extra["b2b"]``). Torch kernels only.

``collective.pairwise`` (:class:`Pairwise`) is not a collective but the link matrix of
the group: every ordered pair of ranks, N − 1 rounds of disjoint pairs.

Before each repetition (untimed) in-place operations get their input back
(all_reduce and reduce; Gloo's reduce also overwrites non-root buffers), the device is
synchronized and the ranks meet at a ``dist.barrier()``, so every timed repetition
starts with all ranks present, as nccl-tests aligns ranks before it times (the
timing loop's own stop/continue vote is an all-reduce too, but the refill after it
would skew the start by a memory copy).
"""

from __future__ import annotations

import os
from typing import ClassVar

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, Param, Probe, Work, register
from probes.torch.common import DTYPE_BYTES, require_memory, synchronize, torch_dtype

KIB, MIB = 2**10, 2**20
OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "all_to_all", "sendrecv")
# Operations that sum the ranks' inputs.
REDUCING = frozenset({"all_reduce", "reduce", "reduce_scatter"})
# Operations whose buffer is split into one chunk per rank.
CHUNKED = frozenset({"all_gather", "reduce_scatter", "all_to_all"})
# Operations that overwrite their input: refilled before every repetition.
IN_PLACE = frozenset({"all_reduce", "reduce"})
ROOT = 0  # broadcast source, reduce destination
DTYPES = ("fp32", "bf16", "fp16")
# Largest integer up to which every integer is exactly representable.
EXACT_INT = {"fp32": 2**24, "bf16": 2**8, "fp16": 2**11}
# Period of the value pattern of the data-moving operations (a prime below EXACT_INT,
# so that shifted patterns rarely coincide).
PRIME = {"fp32": 65521, "bf16": 251, "fp16": 2039}
EPS = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
CHECK_POINTS = 65536
FILL_BLOCK = 1 << 22  # elements filled per step (bounds the int64 index temporaries)
DEFAULT_SIZES = tuple(KIB * 4**i for i in range(10))  # 1 KiB, 4 KiB, ... 256 MiB


# -- the pure part: sizes, factors, values (no process group needed) -------------------
def busbw_factor(op: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor of ``op`` at ``n`` ranks."""
    if op not in OPS:
        raise ValueError(f"unknown collective {op!r}")
    if n < 1:
        raise ValueError(f"world size must be positive, got {n}")
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in CHUNKED:
        return (n - 1) / n
    return 1.0


def resolve_size(op: str, size_bytes: int, n: int, elem_bytes: int) -> int:
    """The size actually moved: ``size_bytes`` rounded down to whole elements, and to a
    multiple of n elements for the chunked operations. 0 when nothing is left."""
    unit = elem_bytes * (n if op in CHUNKED else 1)
    return (int(size_bytes) // unit) * unit


def layout(op: str, size_bytes: int, n: int, elem_bytes: int) -> dict:
    """Element counts of one rank's buffers for a resolved size: ``numel`` (elements of
    the named buffer), ``chunk`` (elements per rank's chunk, = numel for unchunked
    operations), ``in_numel``, ``out_numel`` (0 where the operation works in place)."""
    numel = size_bytes // elem_bytes
    chunk = numel // n if op in CHUNKED else numel
    if op == "all_gather":
        return {"numel": numel, "chunk": chunk, "in_numel": chunk, "out_numel": numel}
    if op == "reduce_scatter":
        return {"numel": numel, "chunk": chunk, "in_numel": numel, "out_numel": chunk}
    if op in ("all_to_all", "sendrecv"):
        return {"numel": numel, "chunk": chunk, "in_numel": numel, "out_numel": numel}
    return {"numel": numel, "chunk": chunk, "in_numel": numel, "out_numel": 0}  # in place


def buffer_bytes(op: str, size_bytes: int, n: int, elem_bytes: int) -> int:
    """Bytes one rank allocates: its buffers, plus the pristine copy of in-place inputs."""
    lay = layout(op, size_bytes, n, elem_bytes)
    copies = 2 if op in IN_PLACE else 1
    return (copies * lay["in_numel"] + lay["out_numel"]) * elem_bytes


def value_period(op: str, n: int, dtype: str) -> int:
    """Period of the value pattern 1 + (index + offset) % period. For sums, small enough
    that n ranks' values add up exactly (n × period ≤ the dtype's exact-integer range)."""
    if op in REDUCING:
        return max(1, min(PRIME[dtype], EXACT_INT[dtype] // n))
    return PRIME[dtype]


def is_exact(op: str, n: int, dtype: str) -> bool:
    """Whether the expected result is exactly representable (always, except sums over
    more ranks than the dtype has exact integers for: bf16 beyond 256 ranks)."""
    return op not in REDUCING or n * value_period(op, n, dtype) <= EXACT_INT[dtype]


def _pattern(k, offset, period: int):
    return 1 + (k + offset) % period


def input_values(op: str, rank: int, n: int, k, chunk: int, period: int):
    """The values (int64 tensor) of ``rank``'s input buffer at positions ``k`` (int64)."""
    if op == "all_gather":
        # Rank r's chunk lands at r·chunk in the gathered buffer; its values are the
        # pattern at those global positions, offset by the source rank.
        return _pattern(rank * chunk + k, rank, period)
    if op == "all_to_all":
        # Chunk j of rank i carries source id i·n + j.
        return _pattern(k, rank * n + k // chunk, period)
    return _pattern(k, rank, period)


def expected_values(op: str, rank: int, n: int, k, chunk: int, period: int, root: int = ROOT):
    """What ``rank``'s output holds at positions ``k`` (int64 tensor) after ``op``, as an
    int64 tensor; None where the rank's output is unspecified (reduce off the root)."""
    if op == "all_reduce":
        return sum(_pattern(k, q, period) for q in range(n))
    if op == "reduce":
        return sum(_pattern(k, q, period) for q in range(n)) if rank == root else None
    if op == "reduce_scatter":
        return sum(_pattern(rank * chunk + k, q, period) for q in range(n))
    if op == "broadcast":
        return _pattern(k, root, period)
    if op == "all_gather":
        return _pattern(k, k // chunk, period)
    if op == "all_to_all":
        # Slot i of rank j holds chunk j of rank i.
        src, t = k // chunk, k % chunk
        return _pattern(rank * chunk + t, src * n + rank, period)
    if op == "sendrecv":
        return _pattern(k, (rank - 1) % n, period)
    raise ValueError(f"unknown collective {op!r}")


def check_indices(numel: int, chunk: int):
    """Positions checked: all of a small buffer; else CHECK_POINTS evenly spread plus
    the first and last element of every chunk (where misplaced chunks show)."""
    import torch

    if numel <= 2 * CHECK_POINTS:
        return torch.arange(numel, dtype=torch.int64)
    spread = torch.linspace(0, numel - 1, CHECK_POINTS, dtype=torch.float64).round().to(torch.int64)
    starts = torch.arange(0, numel, max(1, chunk), dtype=torch.int64)
    ends = (starts + max(1, chunk) - 1).clamp(max=numel - 1)
    return torch.unique(torch.cat([spread, starts, ends, torch.tensor([numel - 1])]))


def compare(got, want, exact: bool, dtype: str, n: int) -> str | None:
    """None when ``got`` (any float tensor) matches ``want`` (int64), else what differs."""
    import torch

    got = got.detach().to("cpu", torch.float64)
    want = want.to(torch.float64)
    if exact:
        bad = got != want
    else:
        bad = (got - want).abs() > n * EPS[dtype] * want.abs()
    bad |= ~torch.isfinite(got)
    count = int(bad.sum())
    if not count:
        return None
    first = int(bad.nonzero()[0, 0])
    return (
        f"{count} of {got.numel()} checked elements differ"
        f"{'' if exact else ' beyond tolerance'}; first at checked position {first}: "
        f"got {got[first].item():g}, want {want[first].item():g}"
    )


# -- the kernel ----------------------------------------------------------------------
B2B_METHOD = "mean of k back-to-back iterations after one barrier, averaged over ranks (nccl-tests)"


def _dist():
    import torch.distributed as dist

    return dist


def _in_group() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _all_gather_single(out, inp) -> None:
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp)


def _reduce_scatter_single(out, inp) -> None:
    dist = _dist()
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp)


def rank_codes(code: int, rank: int, n: int, device: str) -> list[int]:
    """Every rank's ``code`` (0 = fine), by an all-reduce over the default group; just
    ``[code]``-in-place without a group (unit tests, one rank)."""
    if n <= 1 or not _in_group():
        codes = [0] * max(1, n)
        codes[rank if n > 1 else 0] = code
        return codes
    import torch

    flags = torch.zeros(n, dtype=torch.int32, device=device if device.startswith("cuda") else "cpu")
    flags[rank] = code
    _dist().all_reduce(flags)
    return [int(c) for c in flags.tolist()]


def agree_on_check(problem: str | None, label: str, wrong: str, rank: int, n: int, device: str) -> None:
    """Every rank's check outcome, shared (:func:`rank_codes`) so that all ranks fail
    together: raises ProbeCheckFailed with this rank's ``problem`` (``label`` on rank r
    of n: problem), or, when only other ranks had one, "``label``: ``wrong`` on rank(s)
    …". Returns when every rank was fine."""
    codes = rank_codes(1 if problem else 0, rank, n, device)
    if problem:
        raise ProbeCheckFailed(f"{label} on rank {rank} of {n}: {problem}")
    bad = [r for r, c in enumerate(codes) if c]
    if bad:
        raise ProbeCheckFailed(f"{label}: {wrong} on rank(s) {', '.join(map(str, bad))}")


def rank_floats(values, rank: int, n: int, device: str, op: str = "sum") -> list[float]:
    """Every rank's float row in one all-reduce: this rank's ``values`` (a list of m
    floats) in row ``rank`` of an n × m float64 tensor, zeros elsewhere, summed over the
    group (``op="max"``: the element-wise maximum, for values every rank fills in
    part). Returns the n × m rows as lists. Without a group: this rank's row only."""
    values = [float(v) for v in values]
    if n <= 1 or not _in_group():
        return [values]
    import torch

    dist = _dist()
    on = device if device.startswith("cuda") else "cpu"
    table = torch.zeros((n, len(values)), dtype=torch.float64, device=on)
    table[rank] = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(table, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return table.cpu().tolist()


def back_to_back(run, policy, rank: int, n: int, device: str) -> dict:
    """The back-to-back figure of a collective, as nccl-tests times it (its "time"
    column, src/common.cu there): warm-up iterations, one barrier, then ``iters`` calls of
    ``run`` with nothing between them, the device synchronized once at the end; each
    rank's elapsed time / iters, averaged over the ranks (nccl-tests' default
    ``-a 1``). busbw = size / ``time_s`` × the op's factor (harness.runner.case_row,
    column ``busbw_b2b_Bps``).

    ``policy`` (harness.timing.TimingPolicy) bounds the loop like the per-repetition
    one: ``policy.warmup`` (at least 1) untimed iterations, then iters = as many as fit
    in ``budget_s`` at the warm-up's pace, clamped to [min_reps, max_reps]. The ranks
    agree on the pace (the slowest rank's) with one all-reduce, so they all run the same
    count. Returns {"iters", "warmup", "time_s" (mean over ranks, seconds per
    iteration), "rank_time_s" (one per rank), "max_time_s", "method"}."""
    import time

    grouped = n > 1 and _in_group()
    warmup = max(1, int(policy.warmup))
    synchronize(device)
    if grouped:
        _dist().barrier()
    t0 = time.perf_counter()
    for _ in range(warmup):
        run()
    synchronize(device)
    pace = (time.perf_counter() - t0) / warmup
    pace = max(row[0] for row in rank_floats([pace], rank, n, device, "max"))
    fit = int(policy.budget_s / pace) if pace > 0 else policy.max_reps
    iters = max(1, min(policy.max_reps, max(policy.min_reps, fit)))
    if grouped:
        _dist().barrier()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    synchronize(device)
    mine = (time.perf_counter() - t0) / iters
    per_rank = [row[0] for row in rank_floats([mine], rank, n, device)]
    return {
        "iters": iters,
        "warmup": warmup,
        "time_s": sum(per_rank) / len(per_rank),
        "rank_time_s": per_rank,
        "max_time_s": max(per_rank),
        "method": B2B_METHOD,
    }


def ranks_sharing_memory(ctx: CaseContext) -> int:
    """How many ranks allocate from the memory this rank's buffers live in: one per GPU;
    on the CPU every rank of this node (the harness's own CPU ranks are all ``cpu:0``;
    under torchrun at most LOCAL_WORLD_SIZE of them are on this node)."""
    if not ctx.device.startswith("cpu"):
        return 1
    count = (ctx.group_devices or [ctx.device]).count(ctx.device)
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        count = min(count, int(local))
    return max(1, count)


class CollectiveKernel(Kernel):
    """One rank's part of one collective: buffers filled, the op, its check."""

    def __init__(self, op: str, size_bytes: int, dtype: str, rank: int, n: int, device: str, root: int = ROOT):
        super().__init__()
        import torch

        self.op, self.size_bytes, self.dtype = op, size_bytes, dtype
        self.rank, self.n, self.device, self.root = rank, n, device, root
        elem = DTYPE_BYTES[dtype]
        self.layout = layout(op, size_bytes, n, elem)
        self.chunk = self.layout["chunk"]
        self.period = value_period(op, n, dtype)
        self.exact = is_exact(op, n, dtype)
        dt = torch_dtype(dtype)
        self.inp = torch.empty(self.layout["in_numel"], dtype=dt, device=device)
        self._fill(self.inp)
        self.out = torch.empty(self.layout["out_numel"], dtype=dt, device=device) if self.layout["out_numel"] else None
        if self.out is not None:
            # Not zeros and not the answer: a collective that writes nothing fails.
            self.out.fill_(-1.0)
        self.pristine = self.inp.clone() if op in IN_PLACE else None
        self.left, self.right = (rank - 1) % n, (rank + 1) % n
        self.extra = {
            "op": op,
            "size_bytes": size_bytes,
            "root": root if op in ("broadcast", "reduce") else None,
            "rank_in_bytes": self.layout["in_numel"] * elem,
            "rank_out_bytes": self.layout["out_numel"] * elem,
            "check": "exact" if self.exact else f"relative {n * EPS[dtype]:.2g}",
            "before_each": ("refill input, " if op in IN_PLACE else "") + "synchronize, barrier",
        }
        self.backend = _dist().get_backend() if _in_group() else None
        if self.backend:
            self.extra["backend"] = str(self.backend)

    def _fill(self, tensor) -> None:
        import torch

        for start in range(0, tensor.numel(), FILL_BLOCK):
            end = min(tensor.numel(), start + FILL_BLOCK)
            k = torch.arange(start, end, dtype=torch.int64, device=tensor.device)
            tensor[start:end] = input_values(self.op, self.rank, self.n, k, self.chunk, self.period).to(tensor.dtype)

    @property
    def output(self):
        """The buffer the result lands in on this rank."""
        return self.out if self.out is not None else self.inp

    def run(self) -> None:
        dist = _dist()
        op = self.op
        if op == "all_reduce":
            dist.all_reduce(self.inp)
        elif op == "reduce":
            dist.reduce(self.inp, dst=self.root)
        elif op == "broadcast":
            dist.broadcast(self.inp, src=self.root)
        elif op == "all_gather":
            _all_gather_single(self.out, self.inp)
        elif op == "reduce_scatter":
            _reduce_scatter_single(self.out, self.inp)
        elif op == "all_to_all":
            dist.all_to_all_single(self.out, self.inp)
        elif op == "sendrecv":
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, self.inp, self.right),
                dist.P2POp(dist.irecv, self.out, self.left),
            ])
            for work in works:
                work.wait()
        else:  # pragma: no cover - guarded by the probe classes
            raise ValueError(op)

    def before_each(self) -> None:
        if self.pristine is not None:
            self.inp.copy_(self.pristine)
        synchronize(self.device)
        if _in_group():
            _dist().barrier()
            synchronize(self.device)

    def measure(self, policy) -> None:
        """Before the barriered repetitions, the back-to-back figure (:func:`back_to_back`)
        into ``extra["b2b"]``; returns None, so the timing engine then times the
        per-repetition distribution as for any kernel. Without a process group (one
        rank, unit tests) there is no loop to time."""
        if self.n > 1 and _in_group():
            self.extra["b2b"] = back_to_back(self.run, policy, self.rank, self.n, self.device)
            if self.pristine is not None:
                # The loop summed the in-place buffer k times over: give the input back.
                self.inp.copy_(self.pristine)
                synchronize(self.device)
        return None

    def local_check(self) -> str | None:
        """This rank's verdict on its output: None, or what is wrong."""
        out = self.output
        idx = check_indices(out.numel(), self.chunk)
        want = expected_values(self.op, self.rank, self.n, idx, self.chunk, self.period, self.root)
        if want is None:
            return None
        got = out[idx.to(out.device)]
        return compare(got, want, self.exact, self.dtype, self.n)

    def check(self) -> None:
        """Check every rank's output; all ranks fail together if any rank's is wrong."""
        try:
            problem = self.local_check()
        except Exception as exc:  # noqa: BLE001 - still tell the other ranks
            problem = f"check raised {type(exc).__name__}: {exc}"
        agree_on_check(problem, self.op, "wrong result", self.rank, self.n, self.device)


# -- the probes ----------------------------------------------------------------------
class _CollectiveProbe(Probe):
    family = "collective"
    # JAX: shard_map over a device mesh in one process (probes.jax.collective); broadcast and
    # reduce have no JAX primitive of their own and stay torch-only.
    backends = ("torch", "jax")
    device_types = ("cpu", "cuda")
    ranks = 0
    op: ClassVar[str]
    params = {
        "size_bytes": Param(
            default=DEFAULT_SIZES,
            type=int,
            minimum=1,
            help="bytes of the named buffer (nccl-tests convention); rounded down to whole elements per rank",
        ),
        "dtype": Param(default=("fp32",), type=str, choices=DTYPES),
        "world_size": Param(
            default=("auto",), type=int, allow_auto=True, minimum=2,
            help="ranks; auto = every size from 2 up to the ranks available",
        ),
    }

    def resolved(self, params: dict) -> dict:
        n = params["world_size"]
        size = resolve_size(self.op, params["size_bytes"], n, DTYPE_BYTES[params["dtype"]])
        return {**params, "size_bytes": size}

    def work(self, params: dict, device_info: dict) -> Work:
        n = params["world_size"]
        size = resolve_size(self.op, params["size_bytes"], n, DTYPE_BYTES[params["dtype"]])
        return Work(
            flops=0.0,
            bytes=float(size),
            bound="link",
            dtype=params["dtype"],
            collective={"op": self.op, "size_bytes": size, "busbw_factor": busbw_factor(self.op, n)},
        )

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        n, dtype = params["world_size"], params["dtype"]
        if n == "auto":
            return None
        if resolve_size(self.op, params["size_bytes"], n, DTYPE_BYTES[dtype]) == 0:
            unit = DTYPE_BYTES[dtype] * (n if self.op in CHUNKED else 1)
            return (
                f"size_bytes={params['size_bytes']} is below one {dtype} element per rank "
                f"({unit} bytes at world size {n})"
            )
        if dtype == "bf16" and (device_info or {}).get("type") == "cuda":
            cc = ((device_info.get("extra") or {}).get("compute_capability")) or ""
            try:
                major = int(str(cc).split(".")[0])
            except ValueError:
                major = None
            if major is not None and major < 8 and device_info.get("platform") != "rocm":
                return f"bf16 needs compute capability 8.0 or later; {device_info.get('name')} has {cc}"
        return None

    def _trial(self, ctx: CaseContext) -> None:
        """Gloo's dtype coverage varies with the torch version: run the op once on a
        tiny buffer; a dtype it rejects skips the case (every rank gets the same error
        before any data moves)."""
        elem = DTYPE_BYTES[ctx.params["dtype"]]
        tiny = CollectiveKernel(self.op, elem * ctx.world_size, ctx.params["dtype"], ctx.rank, ctx.world_size, ctx.device)
        try:
            tiny.run()
        except RuntimeError as exc:
            import torch

            raise ProbeSkip(
                f"Gloo (torch {torch.__version__}) does not run {self.op} on {ctx.params['dtype']}: "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None

    def prepare(self, ctx: CaseContext) -> Kernel:
        if ctx.backend == "jax":
            from probes.jax.collective import build_collective

            return build_collective(self, ctx)
        params = {**ctx.params, "world_size": ctx.world_size}
        n, dtype = ctx.world_size, params["dtype"]
        kernel = None
        outcome = None
        try:
            if _in_group() and str(_dist().get_backend()) == "gloo" and dtype != "fp32":
                self._trial(ctx)
            if reason := self.skip_reason(params, ctx.device_info, ctx.host):
                raise ProbeSkip(reason)
            resolved = self.resolved(params)
            size = resolved["size_bytes"]
            elem = DTYPE_BYTES[dtype]
            sharing = ranks_sharing_memory(ctx)
            need = buffer_bytes(self.op, size, n, elem) * sharing
            require_memory(
                ctx.device, need,
                f"{self.name} at {size} bytes × {n} ranks ({sharing} rank(s) on {ctx.device})",
            )
            kernel = CollectiveKernel(self.op, size, dtype, ctx.rank, n, ctx.device)
            kernel.params = resolved
            kernel.work = self.work(resolved, ctx.device_info)
            synchronize(ctx.device)
        except Exception as exc:  # noqa: BLE001 - re-raised below once the ranks agreed
            outcome = exc
        # Every rank must leave prepare the same way, or the others would wait in the
        # first collective until the group timeout.
        code = 0 if outcome is None else (1 if isinstance(outcome, ProbeSkip) else 2)
        codes = rank_codes(code, ctx.rank, n, ctx.device)
        if outcome is not None:
            raise outcome
        if any(codes):
            others = [r for r, c in enumerate(codes) if c]
            what = "failed" if 2 in codes else "skipped"
            msg = f"rank(s) {', '.join(map(str, others))} {what} preparing the case"
            if what == "failed":
                raise RuntimeError(msg)
            raise ProbeSkip(msg)
        return kernel


@register
class AllReduce(_CollectiveProbe):
    name = "collective.all_reduce"
    op = "all_reduce"
    description = "sum of every rank's buffer on every rank; busbw factor 2(n−1)/n"


@register
class AllGather(_CollectiveProbe):
    name = "collective.all_gather"
    op = "all_gather"
    description = "each rank's size/n chunk to every rank (size = gathered buffer); busbw factor (n−1)/n"


@register
class ReduceScatter(_CollectiveProbe):
    name = "collective.reduce_scatter"
    op = "reduce_scatter"
    description = "chunk r of the sum to rank r (size = full input buffer); busbw factor (n−1)/n"


@register
class Broadcast(_CollectiveProbe):
    backends = ("torch",)
    name = "collective.broadcast"
    op = "broadcast"
    description = "rank 0's buffer to every rank; busbw factor 1"


@register
class Reduce(_CollectiveProbe):
    backends = ("torch",)
    name = "collective.reduce"
    op = "reduce"
    description = "sum of every rank's buffer on rank 0; busbw factor 1"


@register
class AllToAll(_CollectiveProbe):
    name = "collective.all_to_all"
    op = "all_to_all"
    description = "chunk j of rank i to slot i of rank j (size = per-rank buffer); busbw factor (n−1)/n"


@register
class SendRecv(_CollectiveProbe):
    name = "collective.sendrecv"
    op = "sendrecv"
    description = "ring: send size bytes to rank+1, receive as many from rank−1; busbw factor 1"


# -- the pairwise link matrix ----------------------------------------------------------
# Test hook (tests/probes/test_pairwise.py), not a setting: the rank named by
# COHERENCE_TEST_LINK_DELAY_RANK sleeps COHERENCE_TEST_LINK_DELAY_S_PER_MIB seconds per
# MiB it sends or receives, inside the timed transfer, so its links read slow the way a
# throttled NIC would, without root, network namespaces or tc.
DELAY_RANK_ENV = "COHERENCE_TEST_LINK_DELAY_RANK"
DELAY_S_ENV = "COHERENCE_TEST_LINK_DELAY_S_PER_MIB"


def round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair of ``n`` ranks once (the circle
    method of round-robin tournaments: rank 0 stays, the others rotate one seat per
    round). Even n: n − 1 rounds of n/2 pairs; odd n: n rounds of (n − 1)/2 pairs, one
    rank idle in each. Pairs are (lower, higher). Raises ValueError for n < 2."""
    if n < 2:
        raise ValueError(f"a pairwise schedule needs at least 2 ranks, got {n}")
    m = n + (n % 2)  # odd: a phantom rank m − 1; its partner idles that round
    seats = list(range(m))
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = seats[i], seats[m - 1 - i]
            if a < n and b < n:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        seats = [seats[0], seats[-1], *seats[1:-1]]
    return rounds


def _link_delay(rank: int) -> float:
    """Seconds per byte the test hook adds on this rank (0 when unset or another rank)."""
    who, per_mib = os.environ.get(DELAY_RANK_ENV, ""), os.environ.get(DELAY_S_ENV, "")
    try:
        return float(per_mib) / MIB if who.strip() and int(who) == rank and per_mib else 0.0
    except ValueError:
        return 0.0


class PairwiseKernel(Kernel):
    """One rank's part of a pairwise sweep: every round of :func:`round_robin`, each
    pair's lower rank sends ``size_bytes`` to the higher, then the other way; every
    transfer starts after a barrier of the whole group, so the pairs of one round move
    data at the same time and the rounds do not overlap.

    One repetition = one sweep. The kernel times itself (:meth:`measure`): the sweep's
    duration is the sample; inside it each transfer is timed on both ends, and a link's
    time per repetition is the later end's (like a collective, a transfer is done when
    its last rank is). Afterwards ``extra`` of rank 0 holds the matrix:
    ``matrix_Bps[i][j]`` = size / median over repetitions of the i → j time (row =
    sender, B/s, None on the diagonal), ``matrix_best_Bps`` at the shortest time,
    ``hosts`` (each rank's host name), ``devices``, ``rounds``. A run of several rounds
    keeps the latest round's matrix (a case's extra is its latest round's); the sweep
    durations of every round are samples.

    Per-pair times are not sample rows: samples.parquet has one row per rank and
    repetition, and the matrix would need one per ordered pair."""

    timer = "host"

    def __init__(self, size_bytes: int, rank: int, n: int, device: str):
        super().__init__()
        import torch

        self.size_bytes, self.rank, self.n, self.device = size_bytes, rank, n, device
        numel = size_bytes // DTYPE_BYTES["fp32"]
        self.send = torch.empty(numel, dtype=torch.float32, device=device)
        k = torch.arange(numel, dtype=torch.int64, device=device)
        self.send.copy_(_pattern(k, rank, PRIME["fp32"]).to(torch.float32))
        self.recv = torch.full((numel,), -1.0, dtype=torch.float32, device=device)
        self.rounds = round_robin(n)
        # (src, dst) -> this rank's time of each transfer it took part in, per sweep.
        self.times: dict[tuple[int, int], list[float]] = {}
        self.delay_s_per_byte = _link_delay(rank)
        self.verify = True  # the worker's first (untimed) run checks what arrives
        self.problems: list[str] = []
        self.extra = {"size_bytes": size_bytes, "rounds": len(self.rounds), "transfers_per_rank": 2 * (n - 1),
                      "before_each": "barrier before every transfer"}
        if self.delay_s_per_byte:
            self.extra["test_link_delay_s_per_MiB"] = self.delay_s_per_byte * MIB

    def _transfer(self, src: int, dst: int) -> None:
        import time

        dist = _dist()
        dist.barrier()
        synchronize(self.device)
        if self.rank not in (src, dst):
            return
        if self.verify and self.rank == dst:
            self.recv.fill_(-1.0)
        t0 = time.perf_counter()
        if self.rank == src:
            dist.send(self.send, dst)
        else:
            dist.recv(self.recv, src)
        synchronize(self.device)
        if self.delay_s_per_byte:
            time.sleep(self.delay_s_per_byte * self.size_bytes)
        self.times.setdefault((src, dst), []).append(time.perf_counter() - t0)
        if self.verify and self.rank == dst:
            idx = check_indices(self.recv.numel(), self.recv.numel())
            want = _pattern(idx, src, PRIME["fp32"])
            if problem := compare(self.recv[idx.to(self.recv.device)], want, True, "fp32", 1):
                self.problems.append(f"from rank {src}: {problem}")

    def run(self) -> None:
        for pairs in self.rounds:
            for a, b in pairs:
                self._transfer(a, b)
            for a, b in pairs:
                self._transfer(b, a)
        self.verify = False

    def check(self) -> None:
        """Every rank received each peer's pattern; all ranks fail together if not."""
        agree_on_check("; ".join(self.problems), "pairwise", "wrong data received", self.rank, self.n, self.device)

    def measure(self, policy) -> list[float]:
        """The sweeps timed by harness.timing.measure (warm-up, count and budget, the
        ranks voting to stop together), then the matrix gathered from every rank's
        transfer times of the timed sweeps. Returns this rank's sweep durations."""
        import torch

        from harness.timing import HostClock, measure

        dist = _dist()
        vote = torch.zeros(1, dtype=torch.int32, device=self.device if self.device.startswith("cuda") else "cpu")

        def agree(stop: bool) -> bool:
            vote.fill_(1 if stop else 0)
            dist.all_reduce(vote, op=dist.ReduceOp.MAX)
            return bool(vote.item())

        m = measure(self.run, HostClock(lambda: synchronize(self.device)), policy, None, agree)
        self.sample_t_start_ns = list(m.t_start_ns)
        # The worker records a self-timed kernel as warm-up 1, stop "custom": the real ones.
        self.extra.update(warmup=m.warmup + 1, stop_reason=m.stop_reason)
        self._gather_matrix(len(m.durations_s))
        return list(m.durations_s)

    def _gather_matrix(self, reps: int) -> None:
        """Each link's time per timed sweep = the later of its two ends (an element-wise
        max over ranks of an n² × reps table), reduced to B/s on rank 0's extra."""
        import socket

        import numpy as np
        import torch

        n = self.n
        on = self.device if self.device.startswith("cuda") else "cpu"
        table = torch.zeros((n, n, max(reps, 1)), dtype=torch.float64)
        for (src, dst), times in self.times.items():
            # The last ``reps`` entries: the timed sweeps (the earlier ones warmed up).
            tail = times[len(times) - reps:] if reps else []
            table[src, dst, : len(tail)] = torch.tensor(tail, dtype=torch.float64)
        table = table.to(on)
        _dist().all_reduce(table, op=_dist().ReduceOp.MAX)
        table = table.cpu().numpy()
        hosts = _gather_names(socket.gethostname(), self.rank, n, self.device)
        if self.rank != 0:
            return
        per = table[:, :, :reps]
        med, best = [[None] * n for _ in range(n)], [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j and reps and np.all(per[i, j] > 0):
                    med[i][j] = self.size_bytes / float(np.median(per[i, j]))
                    best[i][j] = self.size_bytes / float(per[i, j].min())
        self.extra.update(matrix_Bps=med, matrix_best_Bps=best, hosts=hosts, timed_sweeps=reps,
                          matrix="row = sending rank, column = receiving rank; B/s at the median transfer time")


def _gather_names(name: str, rank: int, n: int, device: str) -> list[str]:
    """Every rank's ``name`` (≤ 255 UTF-8 bytes), rank order, by one all-reduce of bytes."""
    raw = list(name.encode()[:255])
    rows = rank_floats([len(raw), *raw, *([0] * (255 - len(raw)))], rank, n, device)
    return [bytes(int(b) for b in row[1: 1 + int(row[0])]).decode(errors="replace") for row in rows]


@register
class Pairwise(Probe):
    """``collective.pairwise``: the N × N link matrix of a rank group (every ordered pair
    of ranks, per direction) in N − 1 rounds of disjoint pairs (N for odd N), so its time
    grows with N, not N². Mode 3 reads the matrix (harness.collector.links): the slowest
    link and node against the group median, and the accessible capacity fraction."""

    name = "collective.pairwise"
    family = "collective"
    # torch.distributed point-to-point only: a JAX mesh has no send/recv between two
    # chosen devices that the harness could time per pair (ppermute moves every pair of
    # a permutation at once, as one program).
    backends = ("torch",)
    device_types = ("cpu", "cuda")
    ranks = 0
    description = "N×N send/recv bandwidth matrix, N−1 rounds of disjoint pairs; finds the slow link or node"
    params = {
        "size_bytes": Param(default=(MIB, 16 * MIB), type=int, minimum=4,
                            help="bytes of each transfer (fp32, rounded down to whole elements)"),
        "world_size": Param(default=("auto",), type=int, allow_auto=True, minimum=2,
                            help="ranks; auto = every size from 2 up to the ranks available"),
    }

    def work(self, params: dict, device_info: dict) -> Work:
        """Per sweep the group moves size bytes over every ordered pair: n(n − 1) × size."""
        n = int(params["world_size"])
        size = resolve_size("sendrecv", params["size_bytes"], n, DTYPE_BYTES["fp32"])
        return Work(flops=0.0, bytes=float(n * (n - 1) * size), bound="link", dtype="fp32")

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        return None

    def prepare(self, ctx: CaseContext) -> Kernel:
        n = ctx.world_size
        kernel, outcome = None, None
        try:
            if not _in_group():
                raise ProbeSkip("collective.pairwise needs a process group of 2 or more ranks")
            size = resolve_size("sendrecv", ctx.params["size_bytes"], n, DTYPE_BYTES["fp32"])
            sharing = ranks_sharing_memory(ctx)
            require_memory(ctx.device, 2 * size * sharing,
                           f"{self.name} at {size} bytes ({sharing} rank(s) on {ctx.device})")
            kernel = PairwiseKernel(size, ctx.rank, n, ctx.device)
            kernel.params = {**ctx.params, "world_size": n, "size_bytes": size}
            kernel.work = self.work(kernel.params, ctx.device_info)
            kernel.extra["devices"] = list(ctx.group_devices or [ctx.device] * n)
            synchronize(ctx.device)
        except Exception as exc:  # noqa: BLE001 - re-raised once the ranks agreed
            outcome = exc
        if not _in_group():
            raise outcome
        code = 0 if outcome is None else (1 if isinstance(outcome, ProbeSkip) else 2)
        codes = rank_codes(code, ctx.rank, n, ctx.device)
        if outcome is not None:
            raise outcome
        if any(codes):
            raise RuntimeError(f"rank(s) {', '.join(str(r) for r, c in enumerate(codes) if c)} failed preparing the case")
        return kernel
