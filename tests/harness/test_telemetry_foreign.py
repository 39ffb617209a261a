"""Foreign load attribution (harness.telemetry): CPU time of processes outside the run's
process tree, per case, as a share of the machine; NVML processes not ours."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from harness.telemetry import (
    TelemetrySampler,
    foreign_gpu_processes,
    foreign_ticks,
    process_tree,
    read_process_table,
    summarize_case,
)

BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


def fake_proc(root, procs: dict[int, tuple[int, int, int, int]], stat: dict[str, int]):
    """A /proc tree: pid -> (ppid, utime, stime, starttime); /proc/stat's cpu line."""
    root.mkdir(exist_ok=True)
    for pid, (ppid, ut, st, start) in procs.items():
        (root / str(pid)).mkdir(exist_ok=True)
        # comm with a space and a parenthesis, as real command names can have
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(ut), str(st)] + ["0"] * 6 + [str(start)] + ["0"] * 10
        (root / str(pid) / "stat").write_text(f"{pid} (we (ird) name) " + " ".join(fields) + "\n")
    keys = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    (root / "stat").write_text("cpu  " + " ".join(str(stat.get(k, 0)) for k in keys) + " 0 0\ncpu0 1 1 1 1\n")


def test_process_table_parses_names_with_spaces_and_parentheses(tmp_path):
    fake_proc(tmp_path, {1: (0, 5, 5, 1), 42: (1, 100, 20, 7)}, {})
    assert read_process_table(str(tmp_path)) == {1: (0, 10, 1), 42: (1, 120, 7)}


def test_tree_and_foreign_ticks_on_a_fake_proc():
    # 10 = the run, 11 its worker, 12 the worker's child, 13 a resource tracker of 10;
    # 20 a neighbour, 21 its child, 30 a neighbour that started between the readings.
    prev = {1: (0, 0, 1), 10: (1, 50, 2), 11: (10, 100, 3), 12: (11, 10, 4), 13: (10, 1, 5),
            20: (1, 200, 6), 21: (20, 0, 7), 40: (1, 99, 8)}
    cur = {1: (0, 0, 1), 10: (1, 60, 2), 11: (10, 300, 3), 12: (11, 90, 4), 13: (10, 2, 5),
           20: (1, 260, 6), 21: (20, 40, 7), 30: (1, 15, 9), 40: (1, 5, 99)}
    ours = process_tree(cur, 10)
    assert ours == {10, 11, 12, 13}
    # neighbour +60, its child +40, a new process 15, pid 40 reused (new start time): 5
    assert foreign_ticks(prev, cur, ours) == 60 + 40 + 15 + 5
    # our own workers, however busy, are not foreign
    assert foreign_ticks(prev, cur, ours | {20, 21, 30, 40}) == 0


def test_case_window_share_from_a_fake_proc(tmp_path):
    """The window rows: foreign ticks over the machine's ticks in the same window."""
    proc = tmp_path / "proc"
    fake_proc(proc, {10: (1, 0, 0, 1), 11: (10, 0, 0, 2), 20: (1, 0, 0, 3)},
              {"user": 1000, "idle": 1000, "steal": 0})
    s = TelemetrySampler(time.monotonic_ns(), proc_stat=str(proc / "stat"), proc=str(proc), root_pid=10)
    s.case_id = "case-a"
    # 400 machine ticks pass: our worker used 150, the neighbour 100, the hypervisor stole 40
    fake_proc(proc, {10: (1, 0, 0, 1), 11: (10, 100, 50, 2), 20: (1, 80, 20, 3)},
              {"user": 1250, "idle": 1110, "steal": 40})
    s.case_id = ""
    rows = s.take()
    got = {m: v for m, v in zip(rows["metric"], rows["value"])}
    assert set(rows["case_id"]) == {"case-a"}
    assert got["foreign_cpu_case_pct"] == pytest.approx(25.0) and got["steal_case_pct"] == pytest.approx(10.0)
    summary = summarize_case(rows)
    assert summary["foreign_cpu_share"] == pytest.approx(0.25) and summary["steal_share"] == pytest.approx(0.10)


def test_summary_weights_rounds_by_window_and_old_telemetry_has_no_keys():
    rows = pd.DataFrame({"t_s": [1.0] * 6, "case_id": "c", "source": "host",
                         "metric": ["foreign_cpu_case_pct", "steal_case_pct", "case_window_s"] * 2,
                         "value": [10.0, 0.0, 1.0, 70.0, 3.0, 3.0]})
    s = summarize_case(rows)
    assert s["foreign_cpu_share"] == pytest.approx((10 * 1 + 70 * 3) / 4 / 100)
    assert s["steal_share"] == pytest.approx(9 / 4 / 100)
    old = pd.DataFrame({"t_s": [1.0, 2.0], "case_id": "c", "source": "host", "metric": ["cpu_util_pct", "steal_pct"],
                        "value": [50.0, 4.0]})
    s = summarize_case(old)
    assert "foreign_cpu_share" not in s and s["steal_share"] == pytest.approx(0.04)


def _orphan_busy_loop() -> int:
    """A busy loop that is NOT our descendant: a shell starts it in the background and
    exits, so it is re-parented (to init or a subreaper) — a neighbour's process."""
    out = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 & echo $!', BUSY],
                         capture_output=True, text=True, timeout=30, start_new_session=True)
    return int(out.stdout.strip())


def test_a_real_busy_neighbour_is_counted_and_our_busy_worker_is_not():
    orphan = _orphan_busy_loop()
    worker = subprocess.Popen([sys.executable, "-c", BUSY])  # our child, as a worker is
    try:
        deadline = time.time() + 10
        while time.time() < deadline:  # the orphan's shell parent must have exited
            table = read_process_table()
            if orphan in table and table[orphan][0] != os.getpid() and worker.pid in table:
                break
            time.sleep(0.05)
        prev = read_process_table()
        time.sleep(0.5)
        cur = read_process_table()
        ours = process_tree(cur, os.getpid())
        assert worker.pid in ours and orphan not in ours
        orphan_used = cur[orphan][1] - prev[orphan][1]
        worker_used = cur[worker.pid][1] - prev[worker.pid][1]
        assert orphan_used > 0 and worker_used > 0  # both ran (any machine, any load)
        counted = foreign_ticks(prev, cur, ours)
        assert counted >= orphan_used
        # counting our worker too would add exactly its ticks: it is left out
        assert foreign_ticks(prev, cur, ours - {worker.pid}) == counted + worker_used
    finally:
        worker.kill()
        worker.wait(timeout=10)
        try:
            os.kill(orphan, 9)
        except ProcessLookupError:
            pass


def test_nvml_processes_not_ours():
    procs = [SimpleNamespace(pid=10, usedGpuMemory=1 << 30), SimpleNamespace(pid=77, usedGpuMemory=2 << 30),
             SimpleNamespace(pid=78, usedGpuMemory=None)]
    nv = SimpleNamespace(nvmlDeviceGetComputeRunningProcesses=lambda h: procs)
    assert foreign_gpu_processes(nv, object(), {10, 11}) == (2, float(2 << 30))
    assert foreign_gpu_processes(nv, object(), {10, 77, 78}) == (0, 0.0)


def test_launched_ranks_share_the_launchers_tree():
    from harness.telemetry import run_root_pid

    assert run_root_pid({}) == os.getpid()
    assert run_root_pid({"LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == os.getppid()
    assert run_root_pid({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}) == os.getpid()


def test_a_short_case_window_is_widened_to_the_earlier_boundaries(tmp_path, monkeypatch):
    """A case far shorter than a clock tick: its window goes back to earlier case
    boundaries until it spans MIN_WINDOW_S, so its share is the load around it."""
    import harness.telemetry as tm

    proc = tmp_path / "proc"
    ticks = [0, int(0.1e9), int(0.1e9), int(0.3e9)]  # the four case boundaries below
    monkeypatch.setattr(tm.time, "monotonic_ns", lambda: ticks.pop(0) if len(ticks) > 1 else ticks[0])
    fake_proc(proc, {10: (1, 0, 0, 1), 20: (1, 0, 0, 3)}, {"user": 0, "idle": 0})
    s = TelemetrySampler(0, proc_stat=str(proc / "stat"), proc=str(proc), root_pid=10)
    s.case_id = "long"                      # t = 0
    fake_proc(proc, {10: (1, 0, 0, 1), 20: (1, 30, 0, 3)}, {"user": 30, "idle": 30})
    s.case_id = ""                          # t = 0.1 s: 30 of 60 ticks foreign
    s.case_id = "short"                     # t = 0.1 s
    fake_proc(proc, {10: (1, 0, 0, 1), 20: (1, 30, 0, 3)}, {"user": 30, "idle": 31})
    s.case_id = ""                          # t = 0.3 s: 0.2 s < MIN_WINDOW_S
    rows = s.take()
    got = rows[rows["case_id"] == "short"].set_index("metric")["value"]
    # widened back to t = 0 (the earlier boundary): 30 foreign ticks of 61
    assert got["foreign_cpu_case_pct"] == pytest.approx(100 * 30 / 61)
    assert got["case_window_s"] == pytest.approx(0.3)
