from __future__ import annotations

import time

import pytest

from harness.telemetry import TelemetrySampler, cpu_shares, read_proc_stat_cpu, summarize_case


def test_steal_share_from_proc_stat_deltas(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    prev = read_proc_stat_cpu(str(stat))
    stat.write_text("cpu  160 0 70 900 10 0 0 90 30 0\n")
    cur = read_proc_stat_cpu(str(stat))
    shares = cpu_shares(prev, cur)
    # deltas: user 60, system 20, idle 100, steal 50 -> total 230; guest is inside user
    assert shares["steal_pct"] == pytest.approx(100 * 50 / 230)
    assert shares["iowait_pct"] == 0.0


def test_sampler_tags_rows_with_the_running_case():
    sampler = TelemetrySampler(time.monotonic_ns(), interval_s=0.02).start()
    sampler.case_id = "case-a"
    time.sleep(0.3)
    sampler.case_id = ""
    rows = sampler.take()
    sampler.stop()
    assert len(rows) and set(rows["case_id"]) <= {"case-a", ""}
    assert "case-a" in set(rows["case_id"])
    assert {"cpu_util_pct"} <= set(rows["metric"])
    assert rows["t_s"].is_monotonic_increasing
    summary = summarize_case(rows[rows["case_id"] == "case-a"])
    assert 0 <= summary["cpu_util_pct"] <= 100
