"""torch kernels of the overhead probes (probes.overhead): the clock-read loop (plain
Python; it runs where the torch backend's cases run) and the one-element add."""

from __future__ import annotations

import time

from harness.errors import ProbeCheckFailed
from harness.registry import CaseContext, Kernel, kernel


class TimerKernel(Kernel):
    def __init__(self, reads: int):
        super().__init__()
        self.reads = reads
        info = time.get_clock_info("perf_counter")
        self.extra = {"clock": info.implementation, "declared_resolution_s": info.resolution, "reads": reads}
        self.gaps: list[float] = []

    def _gaps(self, count: int) -> list[float]:
        clock = time.perf_counter_ns
        stamps = [0] * (count + 1)
        for i in range(count + 1):
            stamps[i] = clock()
        return [(b - a) * 1e-9 for a, b in zip(stamps, stamps[1:])]

    def run(self) -> None:
        self.gaps = self._gaps(1000)  # warm-up: the loop and the list are hot

    def check(self) -> None:
        if any(g < 0 for g in self.gaps):
            raise ProbeCheckFailed("perf_counter_ns went backwards")

    def measure(self, policy) -> list[float]:
        gaps = self._gaps(self.reads)
        if any(g < 0 for g in gaps):
            raise ProbeCheckFailed("perf_counter_ns went backwards")
        total = sum(gaps)
        long_gaps = [g for g in gaps if g > 10e-6]
        self.extra.update(
            zero_gaps=sum(1 for g in gaps if g == 0),
            interruptions_over_10us=len(long_gaps),
            interruptions_per_s=len(long_gaps) / total if total else None,
            # Share of the loop's wall time spent inside interruptions: a busy neighbour
            # lengthens preemptions more than it multiplies them.
            interrupted_share=sum(long_gaps) / total if total else None,
            max_gap_s=max(gaps),
        )
        return gaps


class LaunchKernel(Kernel):
    # The latency includes the synchronization: time it with the host clock.
    timer = "host"

    def __init__(self, device: str):
        super().__init__()
        import torch

        self.x = torch.zeros(1, dtype=torch.float32, device=device)
        self.calls = 0

    def run(self) -> None:
        self.x.add_(1.0)
        self.calls += 1

    def check(self) -> None:
        value = self.x.item()
        if value != float(self.calls):
            raise ProbeCheckFailed(f"after {self.calls} increments the tensor holds {value}")


@kernel("overhead.timer", "torch")
def build_timer(probe, ctx: CaseContext) -> Kernel:
    timer = TimerKernel(ctx.params["reads"])
    timer.work = probe.work(ctx.params, ctx.device_info)
    return timer


@kernel("overhead.launch", "torch")
def build_launch(probe, ctx: CaseContext) -> Kernel:
    launch = LaunchKernel(ctx.device)
    launch.work = probe.work(ctx.params, ctx.device_info)
    return launch
