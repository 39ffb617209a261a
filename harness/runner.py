"""The runner: suite -> planned cases -> isolated worker -> result store.

Each case runs in a worker process (see :mod:`harness.worker`) under a hard timeout.
An exception in a probe, a crash of the worker, or an overrun ends that case with a
status and a reason, and the run goes on with a fresh worker. Every finished case is
written to the store before the next starts.

Rounds (suite key ``rounds``, ``coherence run --rounds N``): the suite runs N times.
Each round starts a fresh worker (so a new process, allocator state and rank pools
per round, the way pyperf spreads values over worker processes,
https://pyperf.readthedocs.io/en/latest/run_benchmark.html, and asv repeats a
benchmark in several processes, its ``processes`` attribute,
https://asv.readthedocs.io/en/stable/benchmarks.html) and runs the cases in an
order shuffled with that round's seed (manifest ``round_seeds``), so every case runs
at a different time of the run and slow drift of the machine shows up as
between-round spread instead of as a difference between cases. See
:func:`round_order`, :func:`round_timing` and :func:`pool_rounds`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.markup import escape

from harness import SCHEMA_VERSION, __version__, interrupts, nominal, registry
from harness.config import Suite, check_run_config, parse_suite
from harness.errors import UserError
from harness.results import rep_durations
from harness.stats import rate, summarize
from harness.store import RunStore, new_run_id
from harness.telemetry import TelemetrySampler, summarize_case

WORKER_READY_TIMEOUT_S = 300.0


# -- the worker handle -----------------------------------------------------------------
class WorkerHandle:
    """A worker process and the pipe to it."""

    def __init__(self, plugins: list[str]):
        self.plugins = plugins
        self.proc = None
        self.conn = None

    def ensure(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            return
        from harness.worker import worker_main

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        # Our pid and whether we start it from our main thread: the worker arms its
        # parent-death signal only then (harness.lifeline), else it watches getppid().
        self.proc = ctx.Process(target=worker_main, name="coherence-worker",
                                args=(child, self.plugins, os.getpid(),
                                      threading.current_thread() is threading.main_thread()))
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(WORKER_READY_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"worker did not start within {WORKER_READY_TIMEOUT_S:.0f} s")
        try:
            hello = parent.recv()
        except EOFError:
            code = self.proc.exitcode
            self.kill()
            raise RuntimeError(f"worker exited during start-up ({_exit_text(code)})") from None
        if not hello.get("ready"):
            self.kill()
            raise RuntimeError(f"worker failed to start: {hello.get('reason')}")

    def run(self, spec: dict, timeout_s: float) -> dict:
        self.ensure()
        try:
            self.conn.send(spec)
        except (BrokenPipeError, OSError):
            code = self._wait_exit()
            self.kill()
            return {"status": "failed", "reason": f"worker process died ({_exit_text(code)})"}
        if not self.conn.poll(timeout_s):
            self.kill()
            return {"status": "timeout", "reason": f"exceeded the case timeout of {timeout_s:g} s; worker killed"}
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self._wait_exit()
            self.kill()
            return {"status": "failed", "reason": f"worker process died ({_exit_text(code)})"}

    def _wait_exit(self):
        self.proc.join(timeout=5)
        return self.proc.exitcode

    def kill(self) -> None:
        """Kill the worker and everything in its session (ranks it may have started)."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(None)
            self.proc.join(timeout=10)
        except (BrokenPipeError, OSError):
            pass
        self.kill()


def _exit_text(code) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# -- rows ------------------------------------------------------------------------------
def case_row(case: registry.PlannedCase, result: dict, device_nominal: dict) -> dict:
    """One cases.parquet row from a worker result (or the result pooled over rounds by
    :func:`pool_rounds`), per schema v2.

    The statistics are those of all the durations given (every round pooled). Round
    columns: ``rounds`` (int: rounds with samples), ``round_p50_s`` and
    ``round_p99_s`` (JSON text lists of floats, one per round with samples, in round
    order) from ``result["round_durations_s"]``; a plain result is one round.

    Energy columns (issue 16; older runs lack them) from ``result["energy"]``
    (harness.energy; for a pooled result the latest round's reading): ``energy_j`` (J
    per timed repetition: joules over the repetitions inside the metered window, summed
    over the case's devices), ``avg_power_w`` (joules / window seconds),
    ``energy_method``, ``energy_scope``, ``energy_reason`` (why the figures are null, or
    a caveat on them), ``flops_per_j`` and ``bytes_per_j`` (work per repetition /
    ``energy_j``). Null when not measured, with the reason."""
    stats = summarize(result.get("durations_s", []))
    per_round = result.get("round_durations_s")
    if per_round is None:
        per_round = [result.get("durations_s") or []]
    per_round = [d for d in per_round if len(d)]
    round_stats = [summarize(d) for d in per_round]
    work = result.get("work") or {}
    flops, nbytes = work.get("flops"), work.get("bytes")
    row = {
        "case_id": case.case_id,
        "probe": case.probe,
        "family": case.family,
        "backend": case.backend,
        "device": case.device,
        "params": json.dumps(case.params, sort_keys=False),
        "status": result["status"],
        "reason": result.get("reason", ""),
        **stats,
        "warmup": result.get("warmup"),
        "flops": flops,
        "bytes": nbytes,
        "flops_per_s": rate(flops, stats["p50_s"]),
        "bytes_per_s": rate(nbytes, stats["p50_s"]),
        "best_flops_per_s": rate(flops, stats["min_s"]),
        "best_bytes_per_s": rate(nbytes, stats["min_s"]),
        "bound": None,
        "roofline_fraction": None,
        "dtype": work.get("dtype"),
        "arithmetic_intensity": (flops / nbytes) if flops and nbytes else None,
        "resolved_params": json.dumps(result.get("resolved_params") or case.params),
        "stop_reason": result.get("stop_reason"),
        "timer": result.get("timer"),
        "timing": json.dumps(case.timing),
        "nominal_kind": device_nominal.get("kind"),
        "extra": json.dumps(
            {**(result.get("extra") or {}), **({"components": case.components} if case.components else {})},
            default=str),
        "implied_by": json.dumps(case.implied_by) if case.implied_by else None,
        "detail": result.get("detail", ""),
        "rounds": len(round_stats),
        "round_p50_s": json.dumps([r["p50_s"] for r in round_stats]),
        "round_p99_s": json.dumps([r["p99_s"] for r in round_stats]),
    }
    row.update(energy_columns(result, flops, nbytes))
    if case.world_size > 1:
        row["world_size"] = case.world_size
        per_rank = result.get("rank_durations_s") or []
        row["rank_p50_s"] = json.dumps([summarize(d)["p50_s"] for d in per_rank])
    collective = work.get("collective")
    if collective:
        size, factor = collective["size_bytes"], collective["busbw_factor"]
        row["algbw_Bps"] = rate(size, stats["p50_s"])
        row["busbw_Bps"] = row["algbw_Bps"] * factor if row["algbw_Bps"] else None
        best = rate(size, stats["min_s"])
        row["best_busbw_Bps"] = best * factor if best else None
        row["collective_op"] = collective["op"]
        row["busbw_factor"] = factor
        # Which figure busbw_Bps is: the p50 of barriered repetitions (slowest rank).
        # Beside it nccl-tests' back-to-back figure where the kernel timed one
        # (probes.collective.back_to_back: extra["b2b"]); columns added in issue 19.
        row["busbw_method"] = "per_rep_p50"
        b2b = (result.get("extra") or {}).get("b2b") or {}
        b2b_s = b2b.get("time_s") if isinstance(b2b, dict) else None
        row["algbw_b2b_Bps"] = rate(size, b2b_s) if b2b_s else None
        row["busbw_b2b_Bps"] = row["algbw_b2b_Bps"] * factor if row["algbw_b2b_Bps"] else None
        row["busbw_b2b_method"] = b2b.get("method") if row["busbw_b2b_Bps"] else None
    if result["status"] == "ok" and work:
        # An emulated dtype (a CPU's bf16 through fp32) is judged by the peak of the
        # arithmetic it ran on (Work.peak_dtype), for the ridge as for the fraction.
        judged = work.get("peak_dtype") or work.get("dtype")
        tf32, why = nominal.tf32_judgement(case.device, judged, result.get("extra"), device_nominal)
        if tf32:  # the case says so in its extra
            judged = tf32
            row["extra"] = json.dumps({**json.loads(row["extra"]), "judged_against": why}, default=str)
        bound = nominal.bound_for(flops or 0.0, nbytes or 0.0, device_nominal, judged, work.get("bound"))
        row["bound"] = bound
        if collective:
            # Collectives are judged by bus bandwidth against the link, as nccl-tests do.
            # The group's own links (NVML pair matrix: its ring's slowest hop), not a datasheet figure.
            link = nominal.group_link_Bps(device_nominal, list(case.group_devices))
            row["roofline_fraction"] = row["busbw_Bps"] / link if link and row["busbw_Bps"] else None
        else:
            link = work.get("link") or False
            if not link and bound == "link" and len(case.group_devices) == 2:
                # Point-to-point between two ranks (send/recv): that one pair's link
                # (an MI300X pair has one xGMI link, not the aggregate of seven).
                link = str(case.group_devices[1])
            row["roofline_fraction"] = nominal.roofline_fraction(
                bound, row["flops_per_s"], row["bytes_per_s"], device_nominal, judged, link=link,
            )
    return row


def energy_columns(result: dict, flops, nbytes) -> dict:
    """The energy columns of a cases row (see :func:`case_row`) from a worker result's
    ``energy`` reading; every figure None, with ``energy_reason``, when there is none."""
    reading = result.get("energy")
    out = {"energy_j": None, "avg_power_w": None, "energy_method": None, "energy_scope": None,
           "energy_reason": None, "flops_per_j": None, "bytes_per_j": None}
    if not isinstance(reading, dict):
        out["energy_reason"] = f"no energy reading (case {result.get('status', 'unknown')})"
        return out
    out["energy_method"] = reading.get("method")
    out["energy_scope"] = reading.get("scope") or None
    out["energy_reason"] = reading.get("reason")
    joules, reps, window = reading.get("joules"), reading.get("reps") or 0, reading.get("window_s") or 0.0
    if joules is None or not math.isfinite(joules) or joules <= 0:
        out["energy_reason"] = out["energy_reason"] or "energy not measured"
        return out
    if reps <= 0:
        out["energy_reason"] = "; ".join(filter(None, [out["energy_reason"], "no timed repetitions in the window"]))
        return out
    energy_j = joules / reps
    out["energy_j"] = energy_j
    out["avg_power_w"] = joules / window if window > 0 else None
    out["flops_per_j"] = flops / energy_j if flops else None
    out["bytes_per_j"] = nbytes / energy_j if nbytes else None
    return out


def samples_frame(case_id: str, result: dict, t0_ns: int, round_index: int | None = None,
                  rep0: int = 0) -> pd.DataFrame:
    """Every timed repetition of every rank (rank 0 only for single-rank cases), with
    the kernel's per-repetition columns (Kernel.sample_columns) as extra float columns
    (NaN where a rank has no value).

    ``rep`` counts from ``rep0`` (the repetitions the case's earlier rounds took), so
    it stays unique per case over rounds; ``round_index`` given adds the ``round``
    column (else the store adds it)."""
    per_rank = result.get("rank_durations_s") or [result.get("durations_s") or []]
    starts_per_rank = result.get("rank_t_start_ns") or [result.get("t_start_ns") or []]
    columns_per_rank = result.get("rank_sample_columns") or [result.get("sample_columns") or {}]
    names = list(dict.fromkeys(k for cols in columns_per_rank for k in cols))
    frames = []
    for rank, durations in enumerate(per_rank):
        starts = starts_per_rank[rank] if rank < len(starts_per_rank) else []
        t_start = [(s - t0_ns) * 1e-9 for s in starts] if len(starts) == len(durations) else [float("nan")] * len(durations)
        mine = columns_per_rank[rank] if rank < len(columns_per_rank) else {}
        extra_columns = {}
        for name in names:
            values = list(mine.get(name) or [])[: len(durations)]
            extra_columns[name] = pd.Series(values + [float("nan")] * (len(durations) - len(values)), dtype="float64")
        frames.append(pd.DataFrame({
            "case_id": case_id,
            "rank": rank,
            "rep": range(rep0, rep0 + len(durations)),
            "t_start_s": t_start,
            "duration_s": durations,
            **extra_columns,
        }))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case_id", "rank", "rep", "t_start_s", "duration_s"])
    if round_index is not None:
        out["round"] = pd.Series([int(round_index)] * len(out), dtype="int64")
    return out


# -- the run ---------------------------------------------------------------------------
@dataclass
class RunOutcome:
    """How a run ended: its folder, the cases by status, and ``interrupted``: the
    signal number when SIGINT/SIGTERM stopped it (harness.interrupts), else None."""

    path: Path
    counts: dict = field(default_factory=dict)
    interrupted: int | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal when interrupted (130 SIGINT, 143 SIGTERM, the shell's
        convention); else 1 when a case failed or timed out, 0 otherwise."""
        if self.interrupted:
            return 128 + self.interrupted
        return 1 if self.counts.get("failed", 0) or self.counts.get("timeout", 0) else 0


def cpu_description(env: dict, *, live: bool = True) -> dict:
    """What harness.nominal needs to derive the CPU's peak (see
    :func:`harness.nominal.cpu_description`): physical cores of the affinity set capped by
    the cgroup CPU quota; the cpufreq maximum clock, else the clock measured once per boot
    (harness.cpuclock; measured now only when ``live``), else unknown."""
    return nominal.cpu_description(env, live=live)


# -- rounds ----------------------------------------------------------------------------
# The status a case gets over rounds is the worst of its rounds' (higher is worse).
# ``interrupted`` (a round a signal stopped, re-run by --resume) outranks them all, so
# a partial run shows the case as unfinished.
STATUS_SEVERITY = {"ok": 0, "skipped": 1, "timeout": 2, "failed": 3, "interrupted": 4}


def new_round_seeds(rounds: int) -> list[int]:
    """One fresh 32-bit seed per round (recorded in the manifest, so a round's order
    can be replayed, and a resume runs the same orders)."""
    return [int.from_bytes(os.urandom(4), "little") for _ in range(rounds)]


def round_order(cases: list[registry.PlannedCase], seed: int) -> list[registry.PlannedCase]:
    """The cases in one round's order, shuffled with ``random.Random(seed)``.

    Single-rank cases are shuffled one by one. Multi-rank cases that share a group
    shape (the rank pool that serves them, see harness.worker.run_multi_rank) are
    shuffled among themselves and placed as one block at a shuffled position among the
    rest: a fully interleaved order would restart the pool of ranks (process spawn,
    framework import, group set-up: seconds each) at nearly every multi-rank case. So
    every case moves in time from round to round, multi-rank ones too, at the cost of
    a block's cases staying next to each other within a round."""
    rng = random.Random(seed)
    units: list[list] = []
    blocks: dict[tuple, list] = {}
    for case in cases:
        if case.world_size > 1:
            key = (case.world_size, tuple(case.group_devices))
            if key not in blocks:
                blocks[key] = []
                units.append(blocks[key])
            blocks[key].append(case)
        else:
            units.append([case])
    for block in blocks.values():
        rng.shuffle(block)
    rng.shuffle(units)
    return [c for unit in units for c in unit]


def round_timing(timing: dict, rounds: int) -> dict:
    """A case's timing policy for one of ``rounds`` rounds, so that N rounds cost about
    what one round of the suite's policy costs (issue 18: rounds=3 must not triple
    the suite):

    - ``budget_s`` / N and ``max_reps`` / N (rounded up): the repetitions the budget
      or the cap allowed are spread over the rounds;
    - ``min_reps``: ceil(min_reps / N), so the pooled case still has at least the
      suite's ``min_reps``; a slow case (bounded by min_reps) then costs what it did
      with one round, not N times that (keeping min_reps per round would triple the
      slowest cases, which dominate a suite's time). Each round keeps at least 2
      repetitions (the fewest that give a per-round spread), at most ``max_reps``;
    - a fixed count (``min_reps == max_reps``) is split the same way. For the serving
      composites, whose repetitions are requests, a round then replays the first
      ceil(count / N) arrivals of the same seeded stream: a Poisson queue is shorter
      than with one round, so compare runs made with the same ``rounds`` (the
      manifest records it);
    - ``warmup`` and ``warmup_s`` are kept: each round is a fresh worker, cold again.

    ``timing`` is the planned case's timing dict (TimingPolicy keys, maybe
    ``timeout_s``, which stays per round). Raises nothing; rounds < 2 returns it as is."""
    if rounds <= 1:
        return dict(timing)
    out = dict(timing)
    lo, hi = int(timing.get("min_reps", 1)), int(timing.get("max_reps", 1))
    budget = float(timing.get("budget_s", 0.0))
    per_lo = min(hi, max(2, math.ceil(lo / rounds)))
    out["min_reps"] = max(1, per_lo)
    out["max_reps"] = max(out["min_reps"], math.ceil(hi / rounds))
    out["budget_s"] = budget / rounds
    return out


def merge_status(per_round: list[tuple[int, str, str]], rounds: int) -> tuple[str, str]:
    """A case's status and reason over its rounds ``[(round, status, reason), ...]``:
    ``ok`` when every round is ok; otherwise the worst status of the rounds (failed >
    timeout > skipped > ok; an unknown status counts as failed) with the reason of the
    first round that was not ok, prefixed ``round k:`` when the suite has more than
    one round (a planned skip is the same every round and keeps its reason as is)."""
    bad = [(r, st, why) for r, st, why in sorted(per_round, key=lambda x: x[0]) if st != "ok"]
    if not bad:
        return "ok", ""
    worst = max((st for _, st, _ in bad), key=lambda st: STATUS_SEVERITY.get(st, 3))
    first_round, first_status, first_reason = bad[0]
    if rounds <= 1 or all(st == "skipped" for _, st, _ in bad) and len(bad) == len(per_round):
        return worst, first_reason
    return worst, f"round {first_round}: {first_reason}"


def pool_rounds(history: list[dict], rounds: int) -> dict:
    """One result from a case's per-round results (``history``: dicts with ``round``,
    ``status``, ``reason``, ``durations_s`` and, for multi-rank cases,
    ``rank_durations_s``; the last one is the latest round, a full worker result).

    Durations are concatenated in round order (the pooled statistics of cases.parquet),
    ``round_durations_s`` keeps them per round; status and reason per
    :func:`merge_status`; every other field (work, extra, timer, ...) is the latest
    round's."""
    history = sorted(history, key=lambda h: h["round"])
    latest = history[-1]
    status, reason = merge_status([(h["round"], h["status"], h.get("reason", "")) for h in history], rounds)
    out = {**latest, "status": status, "reason": reason}
    out["round_durations_s"] = [list(h.get("durations_s") or []) for h in history]
    out["durations_s"] = [d for per in out["round_durations_s"] for d in per]
    ranks = max((len(h.get("rank_durations_s") or []) for h in history), default=0)
    if ranks:
        out["rank_durations_s"] = [
            [d for h in history for d in ((h.get("rank_durations_s") or [])[k] if k < len(h.get("rank_durations_s") or []) else [])]
            for k in range(ranks)
        ]
    return out


def _history_from_store(store: RunStore) -> tuple[dict, dict, dict]:
    """What a resumed run pools its new rounds with: per case, the finished rounds
    (status, reason, durations as the runner summarized them), the next ``rep`` number,
    and the telemetry of those rounds."""
    history: dict[str, list[dict]] = {}
    for line in store.journal_rows():
        if _interrupted_line(line):
            continue  # re-run by this resume, not pooled
        history.setdefault(line["case_id"], []).append({
            "round": int(line.get("_round", 0)),
            "status": line.get("_round_status", line.get("status")),
            "reason": line.get("_round_reason", line.get("reason", "")),
            "durations_s": [], "rank_durations_s": [],
        })
    samples = store.committed("samples")
    next_rep: dict[str, int] = {}
    for (case_id, rnd), s in samples.groupby(["case_id", "round"], sort=False):
        entry = next((h for h in history.get(case_id, []) if h["round"] == rnd), None)
        if entry is None:
            continue
        s = s.sort_values(["rep", "rank"])
        entry["durations_s"] = rep_durations(s, case_id).tolist()  # the slowest rank per repetition
        if s["rank"].nunique() > 1:
            entry["rank_durations_s"] = [g["duration_s"].tolist() for _, g in s.groupby("rank", sort=True)]
        next_rep[case_id] = max(next_rep.get(case_id, 0), int(s["rep"].max()) + 1)
    telemetry = store.committed("telemetry")
    frames = {cid: t.drop(columns=["round"]) for cid, t in telemetry.groupby("case_id", sort=False)} if len(telemetry) else {}
    return history, next_rep, frames


def execute(
    cases: list[registry.PlannedCase],
    store: RunStore,
    devices: list[dict],
    device_nominals: dict,
    host: dict,
    plugins: list[str],
    timeout_override: float | None,
    progress=None,
    t0_ns: int | None = None,
    group_timeout_s: float = 60.0,
    rounds: int = 1,
    seeds: list[int] | None = None,
) -> RunOutcome:
    """Run the (case, round) pairs not yet in the store; return the counts by status
    of all cases (one per case, its status over the rounds).

    ``rounds`` rounds, round r in :func:`round_order` with ``seeds[r]`` and a fresh
    worker, each case with :func:`round_timing`. After each round of a case its row is
    rewritten pooled over its rounds so far (:func:`pool_rounds`). ``seeds`` default to
    fresh ones; a resume passes the manifest's."""
    t0_ns = t0_ns or time.monotonic_ns()
    rounds = max(1, int(rounds))
    seeds = list(seeds or [])
    if len(seeds) < rounds:
        seeds += new_round_seeds(rounds - len(seeds))
    store.case_order = [c.case_id for c in cases]
    done = store.finished_rounds()
    history, next_rep, round_telemetry = _history_from_store(store) if done else ({}, {}, {})
    by_id = {d["id"]: d for d in devices}
    sampler = TelemetrySampler(t0_ns).start()
    total = len(cases) * rounds
    remaining = sum(1 for r in range(rounds) for c in cases if (c.case_id, r) not in done)
    task = progress.add_task("cases", total=total, completed=total - remaining) if progress else None
    try:
        for rnd in range(rounds):
            todo = [c for c in round_order(cases, seeds[rnd]) if (c.case_id, rnd) not in done]
            if not todo:
                continue
            # A fresh worker (and rank pools) per round.
            worker = WorkerHandle(plugins)
            current = None  # the case in flight: run, not yet committed
            try:
                for case in todo:
                    if progress:
                        label = case.case_id if rounds == 1 else f"[round {rnd + 1}/{rounds}] {case.case_id}"
                        progress.update(task, description=escape(label))
                    current = case
                    result, telemetry = _run_one(case, rnd, rounds, worker, sampler, by_id, host, timeout_override,
                                                 group_timeout_s)
                    # A signal now waits until the case is committed (harness.interrupts).
                    with interrupts.deferred():
                        _commit_case(case, rnd, rounds, result, telemetry, history, next_rep, round_telemetry, store,
                                     device_nominals, t0_ns)
                        current = None
                    if progress:
                        progress.advance(task)
            except interrupts.RunInterrupted as exc:
                # SIGINT/SIGTERM (run_command): end the worker and its ranks now, then
                # record the case they were in as interrupted (--resume re-runs it).
                worker.kill()
                if current is not None:
                    _commit_interrupted(current, rnd, rounds, exc.name, history, round_telemetry, store,
                                        device_nominals)
                raise
            except BaseException:
                # Any other way out (KeyboardInterrupt outside `coherence run`, a bug):
                # the worker and its ranks must not outlive the runner either.
                worker.kill()
                raise
            finally:
                worker.close()
    finally:
        sampler.stop()
    counts: dict = {}
    for row in store.case_rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return RunOutcome(path=store.path, counts=counts)


def _commit_case(case, rnd: int, rounds: int, result: dict, telemetry, history: dict, next_rep: dict,
                 round_telemetry: dict, store: RunStore, device_nominals: dict, t0_ns: int) -> None:
    """Pool one finished round of ``case`` with its earlier rounds and make it durable
    (samples and telemetry parts, then its journal line); updates the running
    ``history``, ``next_rep`` and ``round_telemetry``."""
    mine = history.setdefault(case.case_id, [])
    mine.append({**result, "round": rnd})
    pooled = pool_rounds(mine, rounds)
    # Keep only what pooling needs from earlier rounds (not the work, extra, ...).
    mine[-1] = {k: result.get(k) for k in ("status", "reason", "durations_s", "rank_durations_s")}
    mine[-1]["round"] = rnd
    tele_all = pd.concat([t for t in (round_telemetry.get(case.case_id), telemetry)
                          if t is not None and len(t)] or [telemetry], ignore_index=True)
    round_telemetry[case.case_id] = tele_all
    row = case_row(case, pooled, device_nominals.get(case.group_devices[0], {}))
    # Telemetry summaries over all the case's rounds, like its statistics.
    row.update(summarize_case(tele_all, case.device))
    row["_round_status"] = result["status"]
    row["_round_reason"] = result.get("reason", "")
    rep0 = next_rep.get(case.case_id, 0)
    frame = samples_frame(case.case_id, result, t0_ns, round_index=rnd, rep0=rep0)
    if len(frame):
        next_rep[case.case_id] = int(frame["rep"].max()) + 1
    store.append_case(row, frame, telemetry, round_index=rnd)


def _commit_interrupted(case, rnd: int, rounds: int, signal_name: str, history: dict, round_telemetry: dict,
                        store: RunStore, device_nominals: dict) -> None:
    """Record the round of ``case`` a signal stopped as ``interrupted`` (reason naming
    the signal), pooled with its finished rounds so a partial run shows what it had.
    No samples, no telemetry part: the round did not finish, and ``--resume`` re-runs
    it (:meth:`RunStore.finished_rounds` does not count the line)."""
    reason = f"interrupted by {signal_name}; coherence run --resume re-runs it"
    result = {"status": "interrupted", "reason": reason}
    pooled = pool_rounds([*history.get(case.case_id, []), {**result, "round": rnd}], rounds)
    row = case_row(case, pooled, device_nominals.get(case.group_devices[0], {}))
    earlier = round_telemetry.get(case.case_id)
    if earlier is not None and len(earlier):
        row.update(summarize_case(earlier, case.device))
    row["_round_status"] = "interrupted"
    row["_round_reason"] = reason
    store.append_case(row, pd.DataFrame(), None, round_index=rnd)


def _interrupted_line(line: dict) -> bool:
    """A journal line that records a round stopped by a signal (not a finished round)."""
    return line.get("_round_status") == "interrupted"


def _run_one(case, rnd: int, rounds: int, worker: "WorkerHandle", sampler, by_id: dict, host: dict,
             timeout_override: float | None, group_timeout_s: float) -> tuple[dict, pd.DataFrame]:
    """One round of one case in ``worker``: its result and the telemetry taken while it ran."""
    sampler.take()  # telemetry between cases is not this case's
    sampler.case_id = case.case_id
    timeout_s = timeout_override or case.timing["timeout_s"]
    if case.skip:
        result = {"status": "skipped", "reason": case.skip}
    else:
        spec = {
            "case_id": case.case_id,
            "probe": case.probe,
            "params": case.params,
            "device": case.group_devices[0],
            "device_info": by_id[case.group_devices[0]],
            "world_size": case.world_size,
            "group_devices": case.group_devices,
            "group_timeout_s": min(group_timeout_s, timeout_s),
            "backend": case.backend,
            "host": host,
            # Stable across runs and rounds (str hash() is salted per process): every
            # round measures the same inputs.
            "seed": zlib.crc32(case.case_id.encode()),
            "timing": {k: v for k, v in round_timing(case.timing, rounds).items() if k != "timeout_s"},
        }
        try:
            result = worker.run(spec, timeout_s)
        except RuntimeError as exc:
            result = {"status": "failed", "reason": str(exc)}
    sampler.case_id = ""
    return result, sampler.take()


def start_run(
    suite: Suite,
    suite_doc: dict,
    out: Path,
    devices: list[dict],
    probe_filter: tuple[str, ...],
    backend: str,
    label: str,
    timeout_override: float | None,
    env: dict,
) -> tuple[RunStore, dict]:
    """Create the run folder and its partial manifest."""
    run_id = new_run_id()
    device_nominals = device_nominal_table(devices, env, suite.nominal)
    manifest = {
        "label": label,
        "host": env.get("host", {}).get("hostname", {}).get("value"),
        "environment": env,
        "config": {
            "suite": suite_doc,
            "suite_source": suite.source,
            "resolved": suite.as_dict(),
            "devices": [d["id"] for d in devices],
            "probe_filter": list(probe_filter),
            "backend": backend,
            "timeout_override_s": timeout_override,
        },
        "devices": [{**d, "nominal": device_nominals[d["id"]]} for d in devices],
        "versions": versions(),
    }
    store = RunStore.create(out, run_id, manifest)
    return store, device_nominals


def device_nominal_table(devices: list[dict], env: dict, overrides: dict, *, live: bool = True) -> dict:
    """{device id: nominal} for the run's devices. CPU devices get
    :func:`harness.nominal.cpu_nominal` of the run's environment document, the same
    figures ``coherence env`` prints, so runs are judged against them."""
    table = nominal.load_table()
    out = {
        d["id"]: (nominal.cpu_nominal(env, live=live, device=d, overrides=overrides, table=table)
                  if d["type"] == "cpu" else nominal.nominal_for(d, overrides=overrides, table=table))
        for d in devices
    }
    # GPU pair links from what NVML says joins them (NVLink count, else PCIe), per direction.
    return nominal.attach_gpu_links(out, env.get("nvidia"), table)


def versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"coherence": __version__, "schema_version": SCHEMA_VERSION, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "scipy", "jax", "jaxlib", "nvidia-ml-py"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def suite_from_manifest(manifest: dict) -> Suite:
    config = manifest.get("config") or {}
    if "suite" not in config:
        raise UserError(f"run {manifest.get('run_id')}: manifest has no suite config; cannot resume")
    # What the resume replays besides the suite (devices, backend, --timeout, ...).
    check_run_config(config, f"run {manifest.get('run_id')}: manifest.json config")
    return parse_suite(config["suite"], config.get("suite_source", "manifest"))
