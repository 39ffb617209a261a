"""Overhead probes: what it costs to read the clock and to launch an empty operation.

- ``overhead.timer``: the gaps between consecutive ``perf_counter_ns`` reads in a tight
  loop. The median is the cost (and effective resolution) of a clock read; the tail is
  interruptions (preemption, steal, interrupts), which mode 4 reads as timer jitter.
- ``overhead.launch``: an in-place add on a one-element tensor, timed by the host clock
  including the device synchronization: the fixed cost every kernel launch pays
  (dispatch on the CPU; launch + synchronize on a GPU).
"""

from __future__ import annotations

from harness.registry import Param, Probe, Work, register


@register
class TimerResolution(Probe):
    name = "overhead.timer"
    family = "overhead"
    description = "gaps between consecutive perf_counter_ns reads (clock cost, resolution, jitter)"
    device_types = ("cpu",)
    params = {"reads": Param(default=(200_000,), type=int, minimum=100, help="clock reads per case")}

    def work(self, params: dict, device_info: dict) -> Work:
        return Work(bound="latency")


@register
class LaunchLatency(Probe):
    name = "overhead.launch"
    family = "overhead"
    description = "empty operation (1-element in-place add) launch + synchronize latency"
    device_types = ("cpu", "cuda")
    params = {}

    def work(self, params: dict, device_info: dict) -> Work:
        return Work(bound="latency")
