"""Probes that misbehave on purpose, for the runner's isolation and resume tests.

Loaded as a plugin (suite key `plugins`), never registered in production."""

from __future__ import annotations

import os
import signal
import time

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.registry import Kernel, Param, Probe, Work, register


class _Sleeper(Kernel):
    def __init__(self, seconds: float, log: str | None = None, tag: str = ""):
        super().__init__()
        self.seconds = seconds
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(tag + "\n")

    def run(self) -> None:
        time.sleep(self.seconds)


class _TestProbe(Probe):
    family = "overhead"
    device_types = ("cpu",)

    def work(self, params, device_info):
        return Work(bound="latency")


@register
class Raises(_TestProbe):
    name = "testing.raises"
    params = {}

    def prepare(self, ctx):
        raise RuntimeError("deliberate failure in prepare")


@register
class Skips(_TestProbe):
    """Skipped in prepare whatever the machine (a host-independent skipped case)."""

    name = "testing.skips"
    params = {}

    def prepare(self, ctx):
        raise ProbeSkip("skipped on purpose")


@register
class Sleeps(_TestProbe):
    """Each repetition sleeps `seconds`: overruns any timeout shorter than the reps."""

    name = "testing.sleeps"
    params = {"seconds": Param(default=(30.0,), type=float, minimum=0)}

    def prepare(self, ctx):
        return _Sleeper(ctx.params["seconds"])


@register
class Crashes(_TestProbe):
    """Kills its own worker process the way a native crash would."""

    name = "testing.crashes"
    params = {}

    def prepare(self, ctx):
        os.kill(os.getpid(), signal.SIGSEGV)


@register
class WrongResult(_TestProbe):
    name = "testing.wrong"
    params = {}

    def prepare(self, ctx):
        kernel = _Sleeper(0.0)

        def check():
            raise ProbeCheckFailed("output differs from the reference")

        kernel.check = check
        return kernel


@register
class Counter(_TestProbe):
    """Appends its case id to $COHERENCE_TEST_LOG each time it is prepared, then sleeps
    `seconds` per repetition: lets a test see which cases ran, and kill a run midway."""

    name = "testing.counter"
    params = {
        "i": Param(default=(0, 1, 2, 3, 4, 5), type=int),
        "seconds": Param(default=(0.05,), type=float, minimum=0),
    }

    def prepare(self, ctx):
        return _Sleeper(ctx.params["seconds"], os.environ.get("COHERENCE_TEST_LOG"), ctx.case_id)


class _AllReduce(Kernel):
    def __init__(self, ctx):
        super().__init__()
        import torch

        self.rank, self.ws = ctx.rank, ctx.world_size
        self.x = torch.full((1024,), float(ctx.rank + 1))

    def run(self) -> None:
        import torch.distributed as dist

        self.x.fill_(float(self.rank + 1))
        dist.all_reduce(self.x)

    def check(self) -> None:
        want = self.ws * (self.ws + 1) / 2
        if float(self.x[0]) != want:
            raise ProbeCheckFailed(f"sum {float(self.x[0])} != {want}")


@register
class RankedSum(_TestProbe):
    """A minimal multi-rank probe: all_reduce of rank+1 over the group."""

    name = "testing.ranked_sum"
    ranks = 0
    params = {"world_size": Param(default=("auto",), type=int, allow_auto=True, minimum=2)}

    def prepare(self, ctx):
        return _AllReduce(ctx)


@register
class AbsentRank(_TestProbe):
    """One rank (the last) never arrives at the collective: it blocks forever in
    prepare while the others wait in all_reduce until the group timeout."""

    name = "testing.absent_rank"
    ranks = 0
    params = {"world_size": Param(default=(2,), type=int, minimum=2)}

    def prepare(self, ctx):
        if ctx.rank == ctx.world_size - 1:
            while True:
                time.sleep(1)
        return _AllReduce(ctx)


class _WhoAmI(_Sleeper):
    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.extra["pid"] = os.getpid()


@register
class WhoAmI(_TestProbe):
    """Sleeps `seconds` per repetition and records the worker's pid in its extra: lets
    a test see which worker process ran a case (rounds: a fresh one per round)."""

    name = "testing.whoami"
    params = {
        "i": Param(default=(0, 1), type=int),
        "seconds": Param(default=(0.01,), type=float, minimum=0),
    }

    def prepare(self, ctx):
        return _WhoAmI(ctx.params["seconds"])


class _HangsWithChild(Kernel):
    """Starts a plain child process (not one of ours: no parent-death signal, the way
    a probe's own helper would be) and sleeps; hangs for ever when
    $COHERENCE_TEST_HANG is set, else each repetition sleeps `seconds`."""

    def __init__(self, seconds: float, log: str | None, tag: str):
        super().__init__()
        import subprocess
        import sys

        self.seconds = seconds
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(tag + "\n")
        self.hang = bool(os.environ.get("COHERENCE_TEST_HANG"))

    def run(self) -> None:
        while self.hang:
            time.sleep(1)
        time.sleep(self.seconds)

    def close(self) -> None:
        self.child.kill()
        self.child.wait()


@register
class HangsWithChild(_TestProbe):
    """A case that hangs (with $COHERENCE_TEST_HANG) with a child process of its own:
    what a kill of `coherence run` must not leave behind. Logs its case id to
    $COHERENCE_TEST_LOG once its child runs."""

    name = "testing.hangs_with_child"
    params = {"seconds": Param(default=(0.01,), type=float, minimum=0)}

    def prepare(self, ctx):
        return _HangsWithChild(ctx.params["seconds"], os.environ.get("COHERENCE_TEST_LOG"), ctx.case_id)
