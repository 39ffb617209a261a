"""Probes that misbehave on purpose, for the runner's isolation and resume tests.

Loaded as a plugin (suite key `plugins`), never registered in production."""

from __future__ import annotations

import os
import signal
import time

from harness.errors import ProbeCheckFailed
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
