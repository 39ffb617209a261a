"""Multi-rank cases: a pool of rank processes in one torch.distributed group.

On one node the harness starts its own ranks: ``world_size`` processes (spawned by
the case worker, so they share its session and die with it), a rendezvous on
127.0.0.1 at a free port, NCCL between GPUs (one rank per GPU), Gloo on the CPU. The
group is created once and serves case after case of the same shape; after any case
that did not end ``ok`` the pool is torn down, because a failed collective can leave
the group unusable.

Every group has a timeout (``init_process_group(timeout=...)``): a rank that never
arrives makes the others' collective raise instead of hanging. The pool waits for
every rank's answer up to that timeout plus a grace period; a rank that stays silent
(stuck outside a collective) ends the case as ``timeout``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta

STARTUP_GRACE_S = 120.0  # importing torch in N fresh processes on a loaded 2-core machine


def answer_grace_s(timeout_s: float) -> float:
    """How long past the group timeout to wait for a rank's answer: long enough for
    ranks whose collective timed out to report, short enough that a rank stuck outside
    any collective ends the case soon after the timeout."""
    return max(2.0, min(15.0, 0.5 * timeout_s))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(devices: list[str]) -> str:
    return "nccl" if devices[0].startswith("cuda") else "gloo"


def init_group(rank: int, world_size: int, device: str, init_method: str | None, timeout_s: float) -> None:
    """Join the default process group (env:// under torchrun, tcp:// when we spawn)."""
    import torch
    import torch.distributed as dist

    backend = backend_for([device])
    kwargs = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": timedelta(seconds=timeout_s)}
    if init_method:
        kwargs["init_method"] = init_method
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(**kwargs)


def rank_main(conn, rank: int, world_size: int, port: int, devices: list[str], timeout_s: float, plugins: list[str], threads: int,
              parent_pid: int | None = None, parent_main_thread: bool = True) -> None:
    """A rank process: join the group, then run the rank's part of each case sent.

    It dies with the process that started it (``parent_pid``, the case worker; see
    :func:`harness.lifeline.die_with_parent`), and a parent gone mid-case gets no
    answer and no BrokenPipeError traceback."""
    from harness import lifeline
    from harness.execute import run_case, send

    lifeline.die_with_parent(parent_pid, parent_main_thread)
    try:
        from harness import registry

        registry.discover(plugins)
        import torch

        if devices[rank].startswith("cpu"):
            # CPU ranks share the cores: don't let each one spin a thread per core.
            torch.set_num_threads(threads)
        init_group(rank, world_size, devices[rank], f"tcp://127.0.0.1:{port}", timeout_s)
    except Exception as exc:  # noqa: BLE001 - reported to the pool, which fails the case
        send(conn, {"ready": False, "reason": f"rank {rank}: {type(exc).__name__}: {exc}"[:500]})
        return
    if not send(conn, {"ready": True, "pid": os.getpid()}):
        return
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            break
        if spec is None:
            break
        try:
            result = run_case({**spec, "rank": rank, "world_size": world_size, "group_devices": devices})
        except Exception as exc:  # noqa: BLE001
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
        if not send(conn, result):
            break
    try:
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class RankPool:
    """``world_size`` rank processes on ``devices`` (one entry per rank)."""

    def __init__(self, devices: list[str], timeout_s: float, plugins: list[str]):
        self.devices = list(devices)
        self.world_size = len(devices)
        self.timeout_s = timeout_s
        self.plugins = plugins
        self.procs: list = []
        self.conns: list = []

    @property
    def key(self) -> tuple:
        return (tuple(self.devices), self.timeout_s)

    def start(self) -> str | None:
        """Start the ranks and wait until all joined; the failure reason, or None."""
        ctx = multiprocessing.get_context("spawn")
        port = free_port()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // self.world_size)
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=rank_main,
                args=(child, rank, self.world_size, port, self.devices, self.timeout_s, self.plugins, threads,
                      os.getpid(), threading.current_thread() is threading.main_thread()),
                name=f"coherence-rank{rank}",
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        answers = self._gather(STARTUP_GRACE_S + self.timeout_s)
        failed = [a for a in answers if a is None or not a.get("ready")]
        if failed:
            silent = [str(r) for r, a in enumerate(answers) if a is None]
            reasons = [a["reason"] for a in answers if a is not None and not a.get("ready")]
            self.close()
            if silent:
                return f"rank(s) {', '.join(silent)} never joined the group: " + "; ".join(reasons)[:400]
            return "group start failed: " + "; ".join(reasons)[:500]
        return None

    def _gather(self, timeout_s: float) -> list:
        """One message from every rank, or None for ranks silent past the deadline
        (or dead)."""
        deadline = time.monotonic() + timeout_s
        answers: list = [None] * self.world_size
        pending = set(range(self.world_size))
        while pending and time.monotonic() < deadline:
            for rank in list(pending):
                conn = self.conns[rank]
                try:
                    if conn.poll(0.01):
                        answers[rank] = conn.recv()
                        pending.discard(rank)
                    elif not self.procs[rank].is_alive() and not conn.poll(0):
                        pending.discard(rank)  # died without answering
                except (EOFError, OSError):
                    pending.discard(rank)
        return answers

    def run(self, spec: dict) -> list:
        """Every rank's result for one case; None where a rank did not answer."""
        for conn in self.conns:
            conn.send(spec)
        return self._gather(self.timeout_s + answer_grace_s(self.timeout_s))

    def exit_codes(self) -> list:
        return [p.exitcode for p in self.procs]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


def combine(results: list, world_size: int) -> dict:
    """One case result from the ranks' results: status from the worst rank, durations
    per repetition = the slowest rank (a collective ends when its last rank does),
    every rank's own durations kept."""
    silent = [r for r, res in enumerate(results) if res is None]
    if silent:
        reason = (
            f"rank(s) {', '.join(map(str, silent))} did not answer within the group timeout "
            "(hung outside a collective, or dead)"
        )
        others = [f"rank {r}: {res['reason']}" for r, res in enumerate(results) if res and res.get("reason")]
        return {"status": "timeout", "reason": "; ".join([reason, *others])[:1000]}
    bad = [(r, res) for r, res in enumerate(results) if res["status"] != "ok"]
    if bad:
        timed_out = any(_is_timeout(res.get("reason", "")) for _, res in bad)
        statuses = {res["status"] for _, res in bad}
        status = "timeout" if timed_out else ("failed" if "failed" in statuses else statuses.pop())
        reason = "; ".join(f"rank {r}: {res.get('reason', '')}" for r, res in bad)
        out = {"status": status, "reason": reason[:1000], "detail": bad[0][1].get("detail", "")}
        out["extra"] = bad[0][1].get("extra") or {}
        return out
    per_rank = [res["durations_s"] for res in results]
    reps = min(len(d) for d in per_rank)
    first = results[0]
    return {
        **first,
        "durations_s": [max(d[i] for d in per_rank) for i in range(reps)],
        "t_start_ns": [min(res["t_start_ns"][i] for res in results) for i in range(reps)] if all(
            len(res.get("t_start_ns") or []) >= reps for res in results) else [],
        "rank_durations_s": [d[:reps] for d in per_rank],
        "rank_t_start_ns": [(res.get("t_start_ns") or [])[:reps] for res in results],
        # Per-repetition columns besides the duration (Kernel.sample_columns), per rank.
        "sample_columns": {k: v[:reps] for k, v in (first.get("sample_columns") or {}).items()},
        "rank_sample_columns": [
            {k: v[:reps] for k, v in (res.get("sample_columns") or {}).items()} for res in results
        ],
        "extra": {**(first.get("extra") or {}), "ranks": [res.get("extra") or {} for res in results]},
        "world_size": world_size,
        "energy": combine_energy([res.get("energy") for res in results]),
    }


def combine_energy(readings: list) -> dict:
    """One energy reading (harness.energy) from the ranks' readings.

    Ranks that metered the same thing (same ``host`` and ``scope``: CPU ranks of one
    node all read the same package counters; two ranks on one GPU read one board) are
    counted once, by their lowest rank, and the scope says which ranks were left out
    (the others would double count). Distinct meters (a GPU per rank, a node per CPU
    rank group) are summed and their scopes joined with ``+``; the window is the longest
    counted rank's. A counted rank without joules leaves the sum null (a partial sum
    would read as a lower energy), with that rank's reason. Methods that differ are
    joined with ``+``. ``reps`` is rank 0's (the ranks agree on stopping)."""
    if not readings or readings[0] is None:
        return {"joules": None, "window_s": 0.0, "method": None, "scope": "",
                "reason": "rank 0 returned no energy reading", "reps": 0}
    first = readings[0]
    if len(readings) == 1:
        return dict(first)
    groups: dict = {}
    silent = []
    for r, rd in enumerate(readings):
        if not rd:
            silent.append(f"rank {r}: no energy reading")
            continue
        groups.setdefault((rd.get("host"), rd.get("scope")), []).append(r)
    counted = [ranks[0] for ranks in groups.values()]
    scopes = []
    for ranks in groups.values():
        rd = readings[ranks[0]]
        scope = str(rd.get("scope", ""))
        if len(ranks) > 1:
            scope += (f" (rank {ranks[0]} of ranks {', '.join(map(str, ranks))}: "
                      f"they share {'the package' if rd.get('method') == 'rapl' or scope.startswith('cpu') else 'it'})")
        scopes.append(scope)
    missing = [r for r in counted if readings[r].get("joules") is None]
    notes = [f"rank {r}: {readings[r]['reason']}" for r in counted if readings[r].get("reason")]
    methods = list(dict.fromkeys(readings[r].get("method") for r in counted if readings[r].get("method")))
    out = {
        **first,
        "joules": None if (missing or silent) else float(sum(readings[r]["joules"] for r in counted)),
        "window_s": max(float(readings[r].get("window_s") or 0.0) for r in counted),
        "method": "+".join(methods) or None,
        "scope": "+".join(scopes),
        "reason": "; ".join(silent + notes)[:500] or None,
        "reps": int(first.get("reps") or 0),
    }
    return out


def _is_timeout(reason: str) -> bool:
    text = reason.lower()
    return "timed out" in text or "timeout" in text or "deadline" in text
