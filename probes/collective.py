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
from probes._torch import DTYPE_BYTES, require_memory, synchronize, torch_dtype

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
        codes = rank_codes(1 if problem else 0, self.rank, self.n, self.device)
        if problem:
            raise ProbeCheckFailed(f"{self.op} on rank {self.rank} of {self.n}: {problem}")
        bad = [r for r, c in enumerate(codes) if c]
        if bad:
            raise ProbeCheckFailed(f"{self.op}: wrong result on rank(s) {', '.join(map(str, bad))}")


# -- the probes ----------------------------------------------------------------------
class _CollectiveProbe(Probe):
    family = "collective"
    # JAX: shard_map over a device mesh in one process (probes.jax_comm); broadcast and
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
            from probes.jax_comm import build_collective

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
