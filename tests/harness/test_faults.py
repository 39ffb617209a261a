"""Faults of the process around a run (issue 17): the run-folder lock, workers that die
with their parent, and SIGINT/SIGTERM on `coherence run`.

Processes "of ours" are found by a marker in their environment (every process a run
starts inherits it: worker, reaper, ranks, resource tracker, a probe's own child), so
the checks hold on any machine and never touch another process. Zombies count as gone:
they run nothing, and in a container whose PID 1 does not reap they stay listed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from harness import interrupts
from harness.errors import UserError
from harness.runlock import LOCK_NAME, RunLock
from tests.conftest import REPO, coherence

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists() or not hasattr(os, "fork"),
                                reason="needs Linux /proc to find the processes of a run")

# The hanging case (with $COHERENCE_TEST_HANG) and quick counters; rounds: 1 keeps the
# run short.
SUITE = """
plugins: [tests.plugins.fault_probes]
rounds: 1
timeout_s: 60
timing: {warmup: 0, min_reps: 2, max_reps: 2, budget_s: 10}
probes:
  testing.hangs_with_child: {}
  testing.counter:
    params: {i: [0, 1, 2], seconds: 0.02}
"""
HANG_CASE = "testing.hangs_with_child[seconds=0.01]@cpu:0"
COUNTERS = [f"testing.counter[i={i},seconds=0.02]@cpu:0" for i in range(3)]
WAIT_S = 180  # start-up of a run on a loaded 2-core machine (torch import in the worker)


# -- helpers ---------------------------------------------------------------------------
def ours(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``marker``."""
    needle = f"COHERENCE_FAULT_MARK={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def wait_none_left(marker: str, within_s: float) -> list[int]:
    """Poll until no process of ``marker`` is left or ``within_s`` passed; the survivors."""
    deadline = time.monotonic() + within_s
    while True:
        left = ours(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Run:
    """A `coherence run` (or resume) in the background, with the marker, the hang
    switch and the prepare log in its environment."""

    def __init__(self, tmp_path: Path, args: list[str], hang: bool, marker: str | None = None):
        self.marker = marker or uuid.uuid4().hex
        self.log = tmp_path / "prepared.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "COHERENCE_TEST_LOG": str(self.log),
               "COHERENCE_FAULT_MARK": self.marker}
        env.pop("COHERENCE_TEST_HANG", None)
        if hang:
            env["COHERENCE_TEST_HANG"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", *args, "--quiet", "--no-report"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_hung(self) -> None:
        """Until the hanging case runs (its child started, its case id logged)."""
        wait_for(lambda: HANG_CASE in lines(self.log), "the hanging case", self.proc)

    def finish(self, timeout: float = WAIT_S) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode, err


def start_hung_run(tmp_path: Path, write_suite) -> tuple[Run, Path]:
    suite = write_suite(SUITE)
    out = tmp_path / "results"
    run = Run(tmp_path, ["--suite", str(suite), "--out", str(out), "--devices", "cpu"], hang=True)
    run.wait_hung()
    return run, out


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def journal(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines() if line.strip()]


def one_line(err: str) -> str:
    text = [line for line in err.splitlines() if line.strip()]
    assert len(text) == 1, err
    assert "Traceback" not in err
    return text[0]


def assert_exact(run: Path) -> None:
    """Complete, each case once, each sample once, and export takes it (it refuses
    duplicate records)."""
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    cases = pd.read_parquet(run / "cases.parquet")
    assert sorted(cases["case_id"]) == sorted([HANG_CASE, *COUNTERS])
    samples = pd.read_parquet(run / "samples.parquet")
    assert not samples.duplicated(["case_id", "rank", "round", "rep"]).any()
    assert samples.groupby("case_id").size().to_dict() == {c: 2 for c in cases.loc[cases["status"] == "ok", "case_id"]}
    exported = coherence("export", str(run), timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip()


# -- the lock --------------------------------------------------------------------------
HOLDER = """
import sys, time
from harness.runlock import RunLock
RunLock(sys.argv[1], "coherence run --resume").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_in_one_line_naming_the_holder_and_a_dead_holder_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            RunLock(tmp_path, "coherence collect").acquire()
        message = str(refused.value)
        assert message == (f"run {tmp_path.name} is in use by pid {holder.pid} (coherence run --resume); "
                           "wait for it or stop it")
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder, the kernel drops the flock
        holder.wait(timeout=30)
    # The file still names the dead holder; the lock is free all the same.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with RunLock(tmp_path, "coherence collect") as lock:
        assert lock.held
        assert json.loads((tmp_path / LOCK_NAME).read_text()) | {"since": None} == {
            "pid": os.getpid(), "command": "coherence collect", "since": None}
    # Released: taken again at once, also by a second open file in this process.
    RunLock(tmp_path, "x").acquire().release()


def test_the_lock_excludes_a_second_open_file_in_the_same_process(tmp_path):
    first = RunLock(tmp_path, "coherence run").acquire()
    try:
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} \\(coherence run\\)"):
            RunLock(tmp_path, "coherence collect").acquire()
    finally:
        first.release()


def test_collect_of_a_run_in_use_is_refused_in_one_line_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from harness.cli import main

    run = tmp_path / "20260101-000000-abcd"
    run.mkdir()
    (run / "manifest.json").write_text("{}")  # never read: the lock comes first
    with RunLock(run, "coherence run --resume"):
        result = CliRunner().invoke(main, ["collect", str(run)], catch_exceptions=False)
    assert result.exit_code == 2
    assert one_line(result.stderr if hasattr(result, "stderr") else result.output) == (
        f"coherence: error: run {run.name} is in use by pid {os.getpid()} (coherence run --resume); "
        "wait for it or stop it")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "manifest.json"]


# -- the journal of an interrupted round --------------------------------------------
def test_an_interrupted_round_is_not_finished_and_its_rerun_is_no_duplicate(tmp_path):
    from harness.store import RunStore

    store = RunStore.create(tmp_path, "20260101-000000-abcd", {"environment": {}, "config": {}})
    store.append_case({"case_id": "a", "status": "ok", "_round_status": "ok"}, pd.DataFrame(), None, round_index=0)
    store.append_case({"case_id": "b", "status": "interrupted", "reason": "interrupted by SIGTERM",
                       "_round_status": "interrupted"}, pd.DataFrame(), None, round_index=0)
    assert store.finished_rounds() == {("a", 0)}  # --resume runs b's round 0 again
    assert [r["status"] for r in store.case_rows()] == ["ok", "interrupted"]
    store.append_case({"case_id": "b", "status": "ok", "_round_status": "ok"}, pd.DataFrame(), None, round_index=0)
    # The same (case, round) journaled again after an interruption is not damage.
    assert store.finished_rounds() == {("a", 0), ("b", 0)}
    assert [r["status"] for r in store.case_rows()] == ["ok", "ok"]


def test_a_worker_whose_runner_is_gone_ends_quietly():
    import multiprocessing

    from harness.execute import send as _send

    runner_end, worker_end = multiprocessing.Pipe()
    runner_end.close()
    assert _send(worker_end, {"status": "ok"}) is False  # no BrokenPipeError
    worker_end.close()


# -- the signal gate -------------------------------------------------------------------
def test_a_signal_inside_a_commit_waits_for_its_end_and_only_the_first_one_raises():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    gate = interrupts.install()
    try:
        committed = []
        with pytest.raises(interrupts.RunInterrupted) as stopped:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler has run by now (main thread, between bytecodes)
                committed.append(True)
        assert committed == [True]
        assert stopped.value.name == "SIGTERM" and stopped.value.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # a second signal during the clean-up: noted, not raised
        time.sleep(0.01)
        assert gate.pending == signal.SIGTERM
    finally:
        interrupts.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_outside_a_commit_raises_at_once_with_the_shell_exit_code():
    interrupts.install()
    try:
        with pytest.raises(interrupts.RunInterrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted long before
        assert stopped.value.exit_code == 130
    finally:
        interrupts.uninstall()


# -- dying with the parent -------------------------------------------------------------
ORPHAN = """
import os, subprocess, sys
code = ("import sys, time; from harness import lifeline; "
        "print(lifeline.die_with_parent(int(sys.argv[1]), main_thread=sys.argv[2] == '1'), flush=True); "
        "time.sleep(120)")
child = subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), sys.argv[1]], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)  # holds no pipe of the test's
print(child.pid, child.stdout.readline().strip(), flush=True)
os._exit(0)  # the parent dies without a word to its child
"""


@pytest.mark.parametrize("main_thread, how", [("1", "pdeathsig"), ("0", "watchdog")])
def test_a_child_ends_within_a_second_of_its_parent(main_thread, how):
    if how == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    marker = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-c", ORPHAN, main_thread], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "COHERENCE_FAULT_MARK": marker})
    pid, armed = out.stdout.split()
    assert armed == how
    assert wait_none_left(marker, 1.0) == [], describe(ours(marker))


REAPED = """
import os, subprocess, sys, time
from harness import lifeline
os.setsid()
reaper = lifeline.start_group_reaper()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],  # not ours: no pdeathsig
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(reaper, child.pid, flush=True)
time.sleep(120)
"""


def test_the_group_reaper_takes_what_the_worker_started_when_the_worker_dies():
    marker = uuid.uuid4().hex
    worker = subprocess.Popen([sys.executable, "-c", REAPED], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), "COHERENCE_FAULT_MARK": marker})
    try:
        reaper, child = map(int, worker.stdout.readline().split())
        assert {worker.pid, reaper, child} <= set(ours(marker))
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        assert wait_none_left(marker, 1.0) == [], describe(ours(marker))
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)


HOGGING = """
import time
from harness.validate import Perturbation
with Perturbation("hog", {"hog_processes": 2}) as hogs:
    print(*hogs.pids, flush=True)
    time.sleep(120)
"""


def test_a_killed_validate_leaves_no_busy_loop_behind():
    """validate's noisy neighbour: busy loops in their own sessions, so only the
    parent-death signal (harness.lifeline) ends them when validate is SIGKILLed."""
    marker = uuid.uuid4().hex
    validate = subprocess.Popen([sys.executable, "-c", HOGGING], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), "COHERENCE_FAULT_MARK": marker})
    try:
        hogs = [int(pid) for pid in validate.stdout.readline().split()]
        assert len(hogs) == 2 and set(hogs) <= set(ours(marker))
    finally:
        validate.kill()
        validate.wait(timeout=30)
    assert wait_none_left(marker, 1.0) == [], describe(ours(marker))


# -- coherence run under faults -------------------------------------------------------
@pytest.mark.slow
def test_sigkill_of_the_run_during_a_hung_case_leaves_no_process_of_ours(tmp_path, write_suite):
    run, _ = start_hung_run(tmp_path, write_suite)
    # The worker, its reaper, the case's own child and the resource tracker, at least.
    before = ours(run.marker)
    assert len(before) >= 4, describe(before)
    run.proc.kill()
    run.proc.wait(timeout=30)
    assert wait_none_left(run.marker, 2.0) == [], describe(ours(run.marker))
    run.proc.stderr.close()
    run.proc.stdout.close()


def assert_stopped(run: Run, sig: int, out: Path, folder_name: str | None = None) -> Path:
    """``run`` got ``sig``: exit 128 + sig, one line saying how to resume, nothing of it
    left running a second later, the run partial with the hanging case interrupted."""
    rc, err = run.finish()
    assert rc == 128 + sig
    name = signal.Signals(sig).name
    folder = only_run(out)
    assert one_line(err) == (f"coherence: interrupted by {name}; run {folder.name} is partial: "
                             f"coherence run --resume {folder.name} --out {out} completes it")
    assert wait_none_left(run.marker, 1.0) == [], describe(ours(run.marker))
    assert json.loads((folder / "manifest.json").read_text())["status"] == "partial"
    stopped = [row for row in journal(folder) if row["case_id"] == HANG_CASE]
    assert stopped[-1]["status"] == "interrupted"
    assert stopped[-1]["reason"] == f"interrupted by {name}; coherence run --resume re-runs it"
    return folder


@pytest.mark.slow
def test_sigint_and_sigterm_stop_with_130_and_143_and_concurrent_resumes_keep_the_run_exact(tmp_path, write_suite):
    """One story, to start as few runs as possible (each imports torch in a fresh worker):
    SIGINT stops a run in its hanging case; a first resume runs that case again (it
    hangs again) while a second resume is refused in one line naming the first one's
    pid; SIGTERM stops the first resume; a last resume completes the run, exact."""
    run, out = start_hung_run(tmp_path, write_suite)
    run.proc.send_signal(signal.SIGINT)
    folder = assert_stopped(run, signal.SIGINT, out)
    # Readers take the interrupted case as it is.
    shown = coherence("show", str(folder), "--json", timeout=300)
    assert shown.returncode in (0, 1), shown.stderr  # 1: --fail-on case (a case not ok)
    assert {c["case_id"]: c["status"] for c in json.loads(shown.stdout)}[HANG_CASE] == "interrupted"

    first = Run(tmp_path, ["--resume", folder.name, "--out", str(out)], hang=True)
    wait_for(lambda: lines(first.log).count(HANG_CASE) == 2, "the first resume to run the hanging case", first.proc)
    second = coherence("run", "--resume", folder.name, "--out", str(out), "--quiet", "--no-report", timeout=300)
    assert second.returncode == 2, second.stderr
    assert one_line(second.stderr) == (f"coherence: error: run {folder.name} is in use by pid {first.proc.pid} "
                                       "(coherence run --resume); wait for it or stop it")
    first.proc.send_signal(signal.SIGTERM)
    assert assert_stopped(first, signal.SIGTERM, out) == folder

    last = Run(tmp_path, ["--resume", folder.name, "--out", str(out)], hang=False)
    rc, err = last.finish()
    assert rc == 0, err
    assert_exact(folder)
    prepared = lines(run.log)
    assert prepared.count(HANG_CASE) == 3  # run, first resume, last resume; never the refused one
    for case_id in COUNTERS:  # each counter ran once: those finished before SIGINT were kept
        assert prepared.count(case_id) == 1, case_id
    sessions = json.loads((folder / "manifest.json").read_text())["sessions"]
    assert len(sessions) == 3  # the run and the two resumes that held the lock
    again = coherence("run", "--resume", folder.name, "--out", str(out), "--quiet", timeout=300)
    assert again.returncode == 2 and "already complete" in one_line(again.stderr)
