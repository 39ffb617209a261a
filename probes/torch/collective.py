"""torch.distributed kernels of the collective probes (specs in probes/collective.py):
the process-group helpers the ranks agree through (:func:`rank_codes`,
:func:`agree_on_check`, :func:`rank_floats`), nccl-tests' back-to-back loop
(:func:`back_to_back`), :class:`CollectiveKernel` for the seven collectives and
:class:`PairwiseKernel` for the link matrix, and their builders. Every rank runs the
builder; the ranks agree on its outcome (:func:`prepare_together`) so that none is left
waiting in a collective. torch is imported inside the functions.
"""

from __future__ import annotations

import os

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import CaseContext, Kernel, kernel
from probes.collective import (
    B2B_METHOD,
    DELAY_RANK_ENV,
    DELAY_S_ENV,
    DTYPE_BYTES,
    EPS,
    FILL_BLOCK,
    IN_PLACE,
    MIB,
    OPS,
    PRIME,
    ROOT,
    _pattern,
    buffer_bytes,
    check_indices,
    compare,
    expected_values,
    input_values,
    is_exact,
    layout,
    resolve_size,
    round_robin,
    value_period,
)
from probes.torch.common import require_memory, synchronize, torch_dtype


def values_at(tensor, idx):
    """``tensor`` at the positions ``idx`` (:func:`check_indices`, numpy) as a float64
    numpy array on the host: what :func:`compare` reads (numpy has no bf16, and the
    tensor may live on a GPU)."""
    import torch

    return tensor[torch.from_numpy(idx).to(tensor.device)].detach().to("cpu", torch.float64).numpy()


# -- the process group ---------------------------------------------------------------
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
        return compare(values_at(out, idx), want, self.exact, self.dtype, self.n)

    def check(self) -> None:
        """Check every rank's output; all ranks fail together if any rank's is wrong."""
        try:
            problem = self.local_check()
        except Exception as exc:  # noqa: BLE001 - still tell the other ranks
            problem = f"check raised {type(exc).__name__}: {exc}"
        agree_on_check(problem, self.op, "wrong result", self.rank, self.n, self.device)


# -- the builders of the seven collectives ----------------------------------------------
def _trial(probe, ctx: CaseContext) -> None:
    """Gloo's dtype coverage varies with the torch version: run the op once on a
    tiny buffer; a dtype it rejects skips the case (every rank gets the same error
    before any data moves)."""
    elem = DTYPE_BYTES[ctx.params["dtype"]]
    tiny = CollectiveKernel(probe.op, elem * ctx.world_size, ctx.params["dtype"], ctx.rank, ctx.world_size, ctx.device)
    try:
        tiny.run()
    except RuntimeError as exc:
        import torch

        raise ProbeSkip(
            f"Gloo (torch {torch.__version__}) does not run {probe.op} on {ctx.params['dtype']}: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None


def prepare_together(build, ctx: CaseContext, skip_together: bool = True) -> Kernel:
    """``build()`` on this rank, then one :func:`rank_codes` over the group: every rank
    must leave prepare the same way, or the others would wait in the first collective
    until the group timeout. This rank's own ProbeSkip or error is raised as it was;
    when only other ranks skipped or failed, a ProbeSkip ("rank(s) … skipped preparing
    the case") or a RuntimeError ("… failed …"). ``skip_together=False``: another
    rank's skip fails this one (pairwise)."""
    kernel, outcome = None, None
    try:
        kernel = build()
    except Exception as exc:  # noqa: BLE001 - re-raised below once the ranks agreed
        outcome = exc
    code = 0 if outcome is None else (1 if isinstance(outcome, ProbeSkip) else 2)
    codes = rank_codes(code, ctx.rank, ctx.world_size, ctx.device)
    if outcome is not None:
        raise outcome
    if any(codes):
        others = [r for r, c in enumerate(codes) if c]
        what = "failed" if 2 in codes or not skip_together else "skipped"
        msg = f"rank(s) {', '.join(map(str, others))} {what} preparing the case"
        if what == "failed":
            raise RuntimeError(msg)
        raise ProbeSkip(msg)
    return kernel


@kernel(tuple(f"collective.{op}" for op in OPS), "torch")
def build_collective(probe, ctx: CaseContext) -> Kernel:
    """One rank's :class:`CollectiveKernel` at the resolved size, after Gloo's dtype
    trial (:func:`_trial`) and the memory check of every buffer the ranks sharing this
    memory allocate."""
    params = {**ctx.params, "world_size": ctx.world_size}
    n, dtype = ctx.world_size, params["dtype"]

    def build() -> Kernel:
        if _in_group() and str(_dist().get_backend()) == "gloo" and dtype != "fp32":
            _trial(probe, ctx)
        resolved = probe.resolved(params)
        size = resolved["size_bytes"]
        elem = DTYPE_BYTES[dtype]
        sharing = ranks_sharing_memory(ctx)
        need = buffer_bytes(probe.op, size, n, elem) * sharing
        require_memory(
            ctx.device, need,
            f"{probe.name} at {size} bytes × {n} ranks ({sharing} rank(s) on {ctx.device})",
        )
        kernel = CollectiveKernel(probe.op, size, dtype, ctx.rank, n, ctx.device)
        kernel.params = resolved
        kernel.work = probe.work(resolved, ctx.device_info)
        synchronize(ctx.device)
        return kernel

    return prepare_together(build, ctx)


# -- the pairwise link matrix ----------------------------------------------------------
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
            if problem := compare(values_at(self.recv, idx), want, True, "fp32", 1):
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


@kernel("collective.pairwise", "torch")
def build_pairwise(probe, ctx: CaseContext) -> Kernel:
    """One rank's :class:`PairwiseKernel`; without a process group the case skips."""
    n = ctx.world_size

    def build() -> Kernel:
        if not _in_group():
            raise ProbeSkip("collective.pairwise needs a process group of 2 or more ranks")
        size = resolve_size("sendrecv", ctx.params["size_bytes"], n, DTYPE_BYTES["fp32"])
        sharing = ranks_sharing_memory(ctx)
        require_memory(ctx.device, 2 * size * sharing,
                       f"{probe.name} at {size} bytes ({sharing} rank(s) on {ctx.device})")
        kernel = PairwiseKernel(size, ctx.rank, n, ctx.device)
        kernel.params = {**ctx.params, "world_size": n, "size_bytes": size}
        kernel.work = probe.work(kernel.params, ctx.device_info)
        kernel.extra["devices"] = list(ctx.group_devices or [ctx.device] * n)
        synchronize(ctx.device)
        return kernel

    return prepare_together(build, ctx, skip_together=False)
