from __future__ import annotations

import pytest

from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import overhead
from tests.probes.helpers import cpu_device, host, run


def test_timer_gaps_are_the_samples():
    result = run("overhead.timer", {"reads": 5000})
    assert result["status"] == "ok"
    gaps = result["durations_s"]
    assert len(gaps) == 5000 and min(gaps) >= 0
    assert result["stop_reason"] == "custom"
    # The median clock read on any machine is well under a millisecond.
    assert sorted(gaps)[2500] < 1e-3
    assert result["extra"]["interruptions_over_10us"] == sum(g > 10e-6 for g in gaps)
    lost = sum(g for g in gaps if g > 10e-6) / sum(gaps)
    assert result["extra"]["interrupted_share"] == pytest.approx(lost)


def test_launch_latency_counts_and_checks():
    result = run("overhead.launch", {}, {"min_reps": 50, "max_reps": 50})
    assert result["status"] == "ok" and len(result["durations_s"]) == 50


def test_launch_check_catches_a_lost_increment():
    ctx = CaseContext("id", "overhead.launch", {}, "cpu:0", cpu_device(), "torch", host())
    kernel = prepare_case(ctx)
    kernel.run()
    kernel.check()
    kernel.calls += 1  # pretend a launch happened that never ran
    with pytest.raises(ProbeCheckFailed):
        kernel.check()
