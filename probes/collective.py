"""Collective probes: collectives across the ranks of one group (the specs; the kernels
are in probes/torch/collective.py and probes/jax/collective.py).

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

from typing import ClassVar

from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES

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
    """The values (int64) of ``rank``'s input buffer at positions ``k`` (an int64 torch
    tensor or numpy array; the result is of the same kind)."""
    if op == "all_gather":
        # Rank r's chunk lands at r·chunk in the gathered buffer; its values are the
        # pattern at those global positions, offset by the source rank.
        return _pattern(rank * chunk + k, rank, period)
    if op == "all_to_all":
        # Chunk j of rank i carries source id i·n + j.
        return _pattern(k, rank * n + k // chunk, period)
    return _pattern(k, rank, period)


def expected_values(op: str, rank: int, n: int, k, chunk: int, period: int, root: int = ROOT):
    """What ``rank``'s output holds at positions ``k`` (int64 tensor or numpy array) after
    ``op``, as int64 of the same kind; None where the rank's output is unspecified
    (reduce off the root)."""
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
    the first and last element of every chunk (where misplaced chunks show). An int64
    numpy array, sorted (torch kernels index with ``torch.from_numpy`` of it)."""
    import numpy as np

    if numel <= 2 * CHECK_POINTS:
        return np.arange(numel, dtype=np.int64)
    spread = np.linspace(0, numel - 1, CHECK_POINTS, dtype=np.float64).round().astype(np.int64)
    starts = np.arange(0, numel, max(1, chunk), dtype=np.int64)
    ends = np.minimum(starts + max(1, chunk) - 1, numel - 1)
    return np.unique(np.concatenate([spread, starts, ends, np.array([numel - 1], dtype=np.int64)]))


def compare(got, want, exact: bool, dtype: str, n: int) -> str | None:
    """None when ``got`` matches ``want``, else what differs. Both are arrays numpy reads
    as float64 (a kernel hands its output over as a host float64 array: numpy has no
    bf16 of its own)."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if exact:
        bad = got != want
    else:
        bad = np.abs(got - want) > n * EPS[dtype] * np.abs(want)
    bad |= ~np.isfinite(got)
    count = int(bad.sum())
    if not count:
        return None
    first = int(np.flatnonzero(bad)[0])
    return (
        f"{count} of {got.size} checked elements differ"
        f"{'' if exact else ' beyond tolerance'}; first at checked position {first}: "
        f"got {float(got[first]):g}, want {float(want[first]):g}"
    )


# Kernels record it with their back-to-back figure (probes/torch/collective.py).
B2B_METHOD = "mean of k back-to-back iterations after one barrier, averaged over ranks (nccl-tests)"


# -- the probes ----------------------------------------------------------------------
class _CollectiveProbe(Probe):
    family = "collective"
    # Kernels: torch.distributed (probes.torch.collective) for all seven; JAX shard_map
    # over a device mesh in one process (probes.jax.collective) for five: broadcast and
    # reduce have no JAX primitive of their own.
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
    name = "collective.broadcast"
    op = "broadcast"
    description = "rank 0's buffer to every rank; busbw factor 1"


@register
class Reduce(_CollectiveProbe):
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


@register
class Pairwise(Probe):
    """``collective.pairwise``: the N × N link matrix of a rank group (every ordered pair
    of ranks, per direction) in N − 1 rounds of disjoint pairs (N for odd N), so its time
    grows with N, not N². Mode 3 reads the matrix (harness.collector.links): the slowest
    link and node against the group median, and the accessible capacity fraction."""

    name = "collective.pairwise"
    family = "collective"
    # Only a torch kernel (torch.distributed point-to-point): a JAX mesh has no send/recv
    # between two chosen devices that the harness could time per pair (ppermute moves
    # every pair of a permutation at once, as one program).
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
