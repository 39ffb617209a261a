"""The timing engine: warm-up, then repetitions bounded by count and by time budget.

Device work is asynchronous, so how a repetition is clocked depends on the device:
CUDA events on CUDA devices (recorded around the work, read after the end event has
completed), synchronize-then-clock on other accelerators, ``time.perf_counter_ns`` on
the CPU. Every sample also gets a host timestamp (CLOCK_MONOTONIC, shared by all
processes on the node) so drift and telemetry line up across workers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from harness.errors import UserError

# Upper bounds of the timing keys: counts (warmup, min_reps, max_reps) and seconds
# (warmup_s, budget_s, one week as harness.config.MAX_TIMEOUT_S).
MAX_REPS = 10_000_000
MAX_BUDGET_S = 7 * 24 * 3600.0
TIMING_KEYS = {
    "warmup": int,  # untimed repetitions before timing (at least)
    "warmup_s": float,  # ... and at least this many seconds of them
    "min_reps": int,  # timed repetitions, at least (the budget can't cut below this)
    "max_reps": int,  # timed repetitions, at most
    "budget_s": float,  # stop timing once this much time has been spent (after min_reps)
}


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 3
    warmup_s: float = 0.0
    min_reps: int = 5
    max_reps: int = 200
    budget_s: float = 2.0

    @classmethod
    def from_dict(cls, data: dict, where: str = "timing") -> "TimingPolicy":
        merged = {}
        for key, value in data.items():
            if key not in TIMING_KEYS:
                raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(TIMING_KEYS)})")
            want = TIMING_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                want is int and not isinstance(value, int)
            ):
                raise UserError(f"{where}.{key}: expected {want.__name__}, got {value!r}")
            # NaN passes a bare `value < 0`; inf or 1e300 seconds (or repetitions) never end.
            limit = MAX_REPS if want is int else MAX_BUDGET_S
            if value < 0:
                raise UserError(f"{where}.{key}: must not be negative, got {value!r}")
            if not value <= limit or not math.isfinite(value):
                raise UserError(f"{where}.{key}: must be a finite number from 0 to {limit:g}, got {value!r}")
            merged[key] = want(value)
        policy = cls(**merged)
        if policy.min_reps < 1:
            raise UserError(f"{where}.min_reps: must be at least 1")
        if policy.max_reps < policy.min_reps:
            raise UserError(f"{where}: max_reps ({policy.max_reps}) is below min_reps ({policy.min_reps})")
        return policy

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in TIMING_KEYS}


@dataclass
class Measurement:
    durations_s: list[float] = field(default_factory=list)
    # Host CLOCK_MONOTONIC timestamp (ns) at the start of each timed repetition.
    t_start_ns: list[int] = field(default_factory=list)
    warmup: int = 0
    stop_reason: str = ""  # "max_reps" | "budget" | "custom"
    timer: str = ""


class Clock:
    """Times one repetition of ``fn``; subclasses pick the method."""

    name = "host"

    def time(self, fn: Callable[[], None]) -> float:
        raise NotImplementedError

    def sync(self) -> None:
        pass


class HostClock(Clock):
    """perf_counter_ns around the work, synchronizing the device before and after."""

    def __init__(self, sync: Callable[[], None] | None = None, name: str = "perf_counter_ns"):
        self._sync = sync or (lambda: None)
        self.name = name

    def sync(self) -> None:
        self._sync()

    def time(self, fn: Callable[[], None]) -> float:
        self._sync()
        t0 = time.perf_counter_ns()
        fn()
        self._sync()
        return (time.perf_counter_ns() - t0) * 1e-9


class CudaEventClock(Clock):
    """CUDA events recorded on the current stream around the work."""

    name = "cuda_events"

    def __init__(self, device: str):
        import torch

        self._torch = torch
        self._device = torch.device(device)
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        self._torch.cuda.synchronize(self._device)

    def time(self, fn: Callable[[], None]) -> float:
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) * 1e-3  # ms -> s


class JaxClock(Clock):
    """JAX dispatch is asynchronous: wait for what is in flight, read perf_counter_ns,
    call the work, ``jax.block_until_ready`` on what it returns, read the clock again.
    The first (compiling) call of a computation is never timed: JAX kernels compile in
    ``prepare`` and the timing loop's warm-up runs before any timed repetition."""

    name = "block_until_ready+perf_counter_ns"

    def __init__(self, sync: Callable[[], None] | None = None):
        import jax

        self._block = jax.block_until_ready
        self._sync = sync or (lambda: None)

    def sync(self) -> None:
        self._sync()

    def time(self, fn: Callable[[], object]) -> float:
        self._sync()
        t0 = time.perf_counter_ns()
        out = fn()
        if out is not None:
            self._block(out)
        else:
            self._sync()
        return (time.perf_counter_ns() - t0) * 1e-9


def clock_for(device: str, kind: str = "device", sync: Callable[[], None] | None = None) -> Clock:
    """The clock a case on ``device`` uses. ``kind="host"`` forces synchronize-then-clock
    (used for latencies that include the synchronization itself). JAX devices
    (``jax:cpu:0``, ``jax:gpu:1``) get the :class:`JaxClock`; ``sync`` waits for the
    kernel's work in flight."""
    if device.startswith("jax:"):
        return JaxClock(sync)
    dev_type = device.split(":")[0]
    if dev_type == "cpu":
        return HostClock()
    import torch

    if dev_type == "cuda":
        if kind == "device":
            with torch.cuda.device(torch.device(device)):
                return CudaEventClock(device)
        dev = torch.device(device)
        return HostClock(lambda: torch.cuda.synchronize(dev), name="cuda_synchronize+perf_counter_ns")
    if dev_type == "mps":
        return HostClock(torch.mps.synchronize, name="mps_synchronize+perf_counter_ns")
    raise ValueError(f"no clock for device type {dev_type!r}")


def measure(
    run: Callable[[], None],
    clock: Clock,
    policy: TimingPolicy,
    before_each: Callable[[], None] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Measurement:
    """Warm up, then time repetitions of ``run`` until ``max_reps`` or, once
    ``min_reps`` are done, until ``budget_s`` of timed work has elapsed.

    In a multi-rank case every rank must run the same number of repetitions or the
    collectives deadlock: ``agree(stop)`` returns True when any rank wants to stop
    (an untimed all-reduce), so the ranks end warm-up and timing together."""
    before_each = before_each or (lambda: None)
    agree = agree or (lambda stop: stop)
    out = Measurement(timer=clock.name)

    warm_start = time.perf_counter()
    while True:
        done = out.warmup >= policy.warmup and time.perf_counter() - warm_start >= policy.warmup_s
        if agree(done):
            break
        before_each()
        run()
        out.warmup += 1
    clock.sync()

    loop_start = time.perf_counter()
    while len(out.durations_s) < policy.max_reps:
        over = len(out.durations_s) >= policy.min_reps and time.perf_counter() - loop_start >= policy.budget_s
        if agree(over):
            out.stop_reason = "budget"
            break
        before_each()
        out.t_start_ns.append(time.monotonic_ns())
        out.durations_s.append(clock.time(run))
    else:
        out.stop_reason = "max_reps"
    return out
