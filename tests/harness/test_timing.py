"""The timing engine's stopping rules, with a fake clock."""

from __future__ import annotations

import time

import pytest

from harness.errors import UserError
from harness.timing import Clock, HostClock, TimingPolicy, measure


class FakeClock(Clock):
    """Each repetition 'takes' the next of the given durations, and sleeps it so the
    budget (host time) advances too."""

    name = "fake"

    def __init__(self, duration: float):
        self.duration = duration
        self.synced = 0

    def sync(self):
        self.synced += 1

    def time(self, fn):
        fn()
        time.sleep(self.duration)
        return self.duration


def test_stops_at_max_reps_when_budget_is_large():
    calls = []
    m = measure(lambda: calls.append(1), FakeClock(0.0), TimingPolicy(warmup=3, min_reps=2, max_reps=7, budget_s=100))
    assert m.warmup == 3 and len(m.durations_s) == 7 and m.stop_reason == "max_reps"
    assert len(calls) == 10
    assert len(m.t_start_ns) == 7 and m.t_start_ns == sorted(m.t_start_ns)


def test_budget_stops_after_min_reps():
    m = measure(lambda: None, FakeClock(0.02), TimingPolicy(warmup=0, min_reps=3, max_reps=1000, budget_s=0.1))
    assert m.stop_reason == "budget"
    assert 3 <= len(m.durations_s) <= 8


def test_min_reps_beats_budget():
    m = measure(lambda: None, FakeClock(0.01), TimingPolicy(warmup=0, min_reps=5, max_reps=10, budget_s=0.0))
    assert len(m.durations_s) == 5


def test_warmup_seconds_extends_warmup():
    m = measure(lambda: time.sleep(0.01), FakeClock(0.0), TimingPolicy(warmup=1, warmup_s=0.1, min_reps=1, max_reps=1))
    assert m.warmup >= 5


def test_before_each_runs_untimed_before_every_repetition():
    order = []
    measure(lambda: order.append("run"), FakeClock(0.0), TimingPolicy(warmup=1, min_reps=2, max_reps=2),
            before_each=lambda: order.append("prep"))
    assert order == ["prep", "run"] * 3


def test_host_clock_synchronizes_around_the_work():
    events = []
    clock = HostClock(sync=lambda: events.append("sync"))
    took = clock.time(lambda: (events.append("work"), time.sleep(0.01)))
    assert events == ["sync", "work", "sync"]
    assert 0.009 < took < 1.0


@pytest.mark.parametrize("data,message", [
    ({"max_reps": 1.5}, "max_reps: expected int"),
    ({"budget_s": -1}, "must not be negative"),
    ({"min_reps": 0}, "min_reps: must be at least 1"),
    ({"warmup": True}, "warmup: expected int"),
])
def test_policy_validation(data, message):
    with pytest.raises(UserError, match=message):
        TimingPolicy.from_dict(data)
