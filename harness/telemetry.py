"""Background telemetry sampler: host and GPU state while cases run.

Runs as a thread in the runner process (the worker that times the cases is another
process, so sampling does not share its interpreter). Each tick appends long-format
rows ``(t_s, case_id, source, metric, value)``:

- host (psutil, /proc/stat): ``cpu_util_pct``, ``cpu_freq_mhz``, ``steal_pct`` (share
  of CPU time stolen by the hypervisor since the previous tick), ``iowait_pct``;
- per NVIDIA GPU (pynvml, when NVML initializes): ``sm_clock_mhz``, ``mem_clock_mhz``,
  ``clock_event_reasons`` (the NVML bitmask as a number), ``power_w``, ``temperature_c``,
  ``gpu_util_pct``, ``mem_util_pct``, ``mem_used_bytes``; ``foreign_gpu_procs`` and
  ``foreign_gpu_mem_bytes`` (NVML compute processes outside the run's process tree).

Foreign load per case (issue 18): when ``case_id`` is set and cleared, the sampler
reads every /proc/[pid]/stat and /proc/stat; at the end of the case it appends
``foreign_cpu_case_pct`` (CPU time, utime + stime, of processes outside the run's
process tree over the case, as a percent of the machine's CPU time in the same window),
``steal_case_pct`` and ``case_window_s`` (source ``host``). CPU time is counted in
clock ticks (10 ms at the usual USER_HZ of 100), so a window shorter than
``MIN_WINDOW_S`` (0.25 s) is widened back to the latest earlier case boundary that makes
it that long: the load of the quarter second around a 4 ms case, rather than 0 or 1
tick of it (which read as 0 % or 100 %). The run's tree is the
process that made the sampler and every descendant by the ppid chain (workers, their
children, resource trackers, ranks).

The sampler only reads; it never changes a device setting.
"""

from __future__ import annotations

import os
import collections
import threading
import time

import numpy as np
import pandas as pd

from harness.store import TELEMETRY_COLUMNS


def read_proc_stat_cpu(path: str = "/proc/stat") -> dict | None:
    """Aggregate CPU tick counters from the first line of /proc/stat."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
    try:
        with open(path, encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:]]
    return dict(zip(names, values))


def cpu_shares(prev: dict, cur: dict) -> dict:
    """Percent of CPU time in steal and iowait between two /proc/stat readings.
    guest time is already counted in user, so it is left out of the total."""
    keys = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    total = sum(cur.get(k, 0) - prev.get(k, 0) for k in keys)
    if total <= 0:
        return {}
    return {
        "steal_pct": 100.0 * (cur.get("steal", 0) - prev.get("steal", 0)) / total,
        "iowait_pct": 100.0 * (cur.get("iowait", 0) - prev.get("iowait", 0)) / total,
    }


# -- foreign load ------------------------------------------------------------------------
# /proc/[pid]/stat (proc(5)): "pid (comm) state ppid ..."; after the ")" that closes the
# command name (which may itself hold spaces and parentheses) field 4 is ppid, 14/15
# utime/stime and 22 starttime, in clock ticks (USER_HZ) — the unit of /proc/stat.
def read_process_table(proc: str = "/proc") -> dict[int, tuple[int, int, int]]:
    """{pid: (ppid, utime + stime ticks, starttime ticks)} of every process readable
    under ``proc``; processes that vanish or cannot be read are left out."""
    out = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat"), "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        try:
            out[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]))
        except (IndexError, ValueError):
            continue
    return out


def process_tree(table: dict[int, tuple[int, int, int]], root: int) -> set[int]:
    """``root`` and every descendant of it in ``table`` (by the ppid chain)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in ours:
                ours.add(child)
                todo.append(child)
    return ours


def foreign_ticks(prev: dict, cur: dict, ours: set[int]) -> int:
    """CPU ticks used between two process tables by processes not in ``ours``: the
    growth of utime + stime of each process seen in both (same pid and start time), and
    all of it for a process that started in between. A process that ended in between
    loses its last interval (its time goes to its parent's cutime, not counted)."""
    total = 0
    for pid, (_, ticks, start) in cur.items():
        if pid in ours:
            continue
        before = prev.get(pid)
        if before is not None and before[2] == start:
            total += max(0, ticks - before[1])
        else:
            total += ticks
    return total


def machine_ticks(prev: dict, cur: dict) -> int:
    """All CPU ticks of the machine between two /proc/stat readings (guest time is part
    of user, so it is left out); the capacity the foreign share is a share of."""
    keys = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return sum(cur.get(k, 0) - prev.get(k, 0) for k in keys)


MIN_WINDOW_S = 0.25


def run_root_pid(environ=None) -> int:
    """The process whose tree is "ours": this process; under a launcher (torchrun,
    srun: LOCAL_RANK set and WORLD_SIZE > 1) its parent, whose children are all the local
    ranks — a sibling rank on the same node is not a neighbour."""
    env = os.environ if environ is None else environ
    try:
        launched = "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        launched = False
    return os.getppid() if launched else os.getpid()


def foreign_gpu_processes(nv, handle, ours: set[int]) -> tuple[int, float]:
    """(count, used GPU memory in bytes) of the NVML compute processes on one GPU whose
    pid is not in ``ours`` (nvmlDeviceGetComputeRunningProcesses). Inside a container
    NVML may report host pids: those count as foreign, which they are unless the run
    itself spans the namespace."""
    procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    theirs = [p for p in procs if int(p.pid) not in ours]
    mem = sum(float(p.usedGpuMemory) for p in theirs if isinstance(getattr(p, "usedGpuMemory", None), int))
    return len(theirs), mem


class _Nvml:
    """The NVML readings, or nothing when NVML is absent (no driver, no GPU).

    Every GPU of the node is read (source ``gpu:<NVML index>``, as in runs written before
    the mapping existed), and each tick also records ``cuda_ordinal``: the ``cuda:N`` of
    this process that GPU is (-1: not visible here, or not placeable). The mapping is by PCI
    bus id / UUID (harness.gpumap), because NVML's index ignores CUDA_VISIBLE_DEVICES and
    CUDA's order; ``cuda_bus_ids`` (PCI address per CUDA ordinal, from torch device
    properties) is the best evidence when the caller has it. ``environ`` defaults to
    os.environ. A GPU behind several visible MIG devices records one ordinal row per device.
    """

    def __init__(self, environ=None, cuda_bus_ids: list[str | None] | None = None) -> None:
        self.handles = []
        self.reason = ""
        self.ordinals: dict[int, list[int]] = {}
        self.map_notes: list[str] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...
            self.reason = f"{type(exc).__name__}: {exc}"
            return
        self._map(os.environ if environ is None else environ, cuda_bus_ids)

    def _map(self, environ, cuda_bus_ids) -> None:
        from harness.gpumap import match_cuda_to_nvml, nvml_gpus, torch_cuda_bus_ids

        if cuda_bus_ids is None:
            cuda_bus_ids = torch_cuda_bus_ids()
        matches, self.map_notes = match_cuda_to_nvml(
            nvml_gpus(self.nv, self.handles), visible=environ.get("CUDA_VISIBLE_DEVICES"),
            device_order=environ.get("CUDA_DEVICE_ORDER"), cuda_bus_ids=cuda_bus_ids)
        for m in matches.values():
            self.ordinals.setdefault(m.nvml_index, []).append(m.ordinal)

    def read(self) -> list[tuple[str, str, float]]:
        out = []
        nv = getattr(self, "nv", None)
        for i, h in enumerate(self.handles):
            src = f"gpu:{i}"
            out.extend((src, "cuda_ordinal", float(n)) for n in self.ordinals.get(i, [-1]))
            readers = (
                ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                ("mem_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
                ("clock_event_reasons", lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h)
                 if hasattr(nv, "nvmlDeviceGetCurrentClocksEventReasons")
                 else nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)),
                ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                ("gpu_util_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                ("mem_util_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).memory),
                ("mem_used_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
            )
            for metric, read in readers:
                try:
                    out.append((src, metric, float(read())))
                except Exception:  # noqa: BLE001 - a metric a GPU doesn't support is just absent
                    continue
        return out

    def close(self) -> None:
        if self.handles:
            try:
                self.nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def gpu_sources(telemetry: pd.DataFrame, device: str) -> tuple[list[str] | None, str]:
    """The telemetry sources (``gpu:<NVML index>``) of one CUDA device ``cuda:N``.

    Runs that record ``cuda_ordinal`` rows are mapped by them (PCI bus id / UUID, see
    _Nvml); an ordinal no GPU claims gives ``None`` (never another GPU's rows). Runs written
    before that metric existed only have NVML's index: ``gpu:N`` is taken, and the second
    value says so (it is wrong under CUDA_VISIBLE_DEVICES or a non-PCI CUDA order).
    Returns ``(sources or None, how)``; raises nothing."""
    kind, _, idx = str(device).partition(":")
    if kind not in ("cuda", "gpu") or not idx.isdigit():
        return None, f"{device}: not an NVIDIA device id (cuda:N)"
    if telemetry is None or not len(telemetry) or "metric" not in telemetry.columns:
        return None, "no telemetry"
    ords = telemetry[telemetry["metric"] == "cuda_ordinal"]
    if not len(ords):
        return [f"gpu:{idx}"], f"{device} -> gpu:{idx} by index (run predates the PCI bus id mapping)"
    hit = sorted(set(ords.loc[ords["value"] == float(idx), "source"]))
    if not hit:
        return None, f"{device}: no NVML GPU recorded as this process's cuda:{idx}"
    return hit, f"{device} -> {', '.join(hit)} by PCI bus id / UUID"


def case_gpu_sources(telemetry: pd.DataFrame, device: str) -> list[str]:
    """NVML sources of every GPU of a case's device group ([] if any member is unplaced,
    or the case runs on no NVIDIA GPU)."""
    from harness.results import device_members

    out: list[str] = []
    for member in device_members(device):
        found, _ = gpu_sources(telemetry, member)
        if not found:
            return []
        out.extend(s for s in found if s not in out)
    return out


class TelemetrySampler:
    """Samples every ``interval_s`` in a daemon thread; ``take()`` hands over the rows
    collected since the last call (so the runner stores them with the case)."""

    def __init__(self, t0_ns: int, interval_s: float = 0.2, proc_stat: str = "/proc/stat",
                 proc: str = "/proc", root_pid: int | None = None):
        self.t0_ns = t0_ns
        self.interval_s = interval_s
        self.proc_stat = proc_stat
        self.proc = proc
        self.root_pid = run_root_pid() if root_pid is None else root_pid
        self._case_id = ""
        self._window = None
        self._boundaries: collections.deque = collections.deque(maxlen=256)
        self._rows: list[tuple] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.nvml_reason = ""

    def start(self) -> "TelemetrySampler":
        self._thread = threading.Thread(target=self._loop, name="coherence-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def case_id(self) -> str:
        return self._case_id

    @case_id.setter
    def case_id(self, value: str) -> None:
        """Setting the case starts its foreign-load window, clearing it (or setting
        another) ends the window and appends the case's foreign-load rows."""
        snap = self._snapshot()
        with self._lock:
            if self._case_id and self._window is not None:
                start = self._window
                for earlier in reversed(self._boundaries):  # newest first
                    if (snap[0] - start[0]) * 1e-9 >= MIN_WINDOW_S:
                        break
                    if earlier[0] < start[0]:
                        start = earlier
                self._rows.extend(self._window_rows(self._case_id, start, snap))
            self._boundaries.append(snap)
            self._case_id = value or ""
            self._window = snap if value else None

    def _snapshot(self) -> tuple[int, dict | None, dict]:
        return time.monotonic_ns(), read_proc_stat_cpu(self.proc_stat), read_process_table(self.proc)

    def _window_rows(self, case: str, start: tuple, end: tuple) -> list[tuple]:
        (t0, stat0, table0), (t1, stat1, table1) = start, end
        if not stat0 or not stat1:
            return []
        total = machine_ticks(stat0, stat1)
        if total <= 0:
            return []
        # Our tree at the end plus at the start: a worker that ended during the case was
        # ours at the start; one that began was ours at the end.
        ours = process_tree(table1, self.root_pid) | process_tree(table0, self.root_pid)
        foreign = foreign_ticks(table0, table1, ours)
        steal = stat1.get("steal", 0) - stat0.get("steal", 0)
        t_s = (t1 - self.t0_ns) * 1e-9
        return [(t_s, case, "host", "foreign_cpu_case_pct", 100.0 * min(1.0, foreign / total)),
                (t_s, case, "host", "steal_case_pct", 100.0 * steal / total),
                (t_s, case, "host", "case_window_s", (t1 - t0) * 1e-9)]

    def take(self) -> pd.DataFrame:
        with self._lock:
            rows, self._rows = self._rows, []
        return pd.DataFrame(rows, columns=TELEMETRY_COLUMNS)

    def _loop(self) -> None:
        import psutil

        nvml = _Nvml()
        self.nvml_reason = nvml.reason
        psutil.cpu_percent(interval=None)  # first call primes the counter
        prev = read_proc_stat_cpu(self.proc_stat)
        try:
            while not self._stop.wait(self.interval_s):
                t_s = (time.monotonic_ns() - self.t0_ns) * 1e-9
                case = self.case_id
                rows = [("host", "cpu_util_pct", psutil.cpu_percent(interval=None))]
                freq = psutil.cpu_freq()
                if freq is not None and freq.current:
                    rows.append(("host", "cpu_freq_mhz", float(freq.current)))
                cur = read_proc_stat_cpu(self.proc_stat)
                if prev and cur:
                    rows.extend(("host", k, v) for k, v in cpu_shares(prev, cur).items())
                prev = cur
                rows.extend(nvml.read())
                if nvml.handles:
                    rows.extend(self._foreign_gpu(nvml))
                with self._lock:
                    self._rows.extend((t_s, case, src, metric, float(value)) for src, metric, value in rows)
        finally:
            nvml.close()

    def _foreign_gpu(self, nvml) -> list[tuple[str, str, float]]:
        ours = process_tree(read_process_table(self.proc), self.root_pid)
        out = []
        for i, h in enumerate(nvml.handles):
            try:
                count, mem = foreign_gpu_processes(nvml.nv, h, ours)
            except Exception:  # noqa: BLE001 - NVML without process queries (vGPU, old driver)
                continue
            out += [(f"gpu:{i}", "foreign_gpu_procs", float(count)), (f"gpu:{i}", "foreign_gpu_mem_bytes", mem)]
        return out


def summarize_case(telemetry: pd.DataFrame, device: str | None = None) -> dict:
    """Per-case means of the host metrics that later indicators need (mode 2, mode 4),
    and the foreign load (issue 18; shares of the machine's CPU time, 0–1):

    - ``foreign_cpu_share``: from the case windows' ``foreign_cpu_case_pct``, weighted by
      ``case_window_s`` (a case run in several rounds has one window per round);
    - ``steal_share``: from ``steal_case_pct`` likewise, else the mean tick ``steal_pct``;
    - ``foreign_gpu_procs``: the most NVML compute processes not ours seen on any GPU.
    Keys are absent when the telemetry does not have them (runs made before).
    ``gpu_util_pct`` is the mean over the case's own GPUs when ``device`` (``cuda:0``,
    ``cuda:0-3``) is given: found by PCI bus id (gpu_sources), not the node's mean."""
    out = {}
    if telemetry is None or not len(telemetry):
        return out
    host = telemetry[telemetry["source"] == "host"]
    for metric in ("cpu_util_pct", "steal_pct"):
        values = host.loc[host["metric"] == metric, "value"]
        if len(values):
            out[metric] = float(values.mean())
    gpu = telemetry[telemetry["metric"] == "gpu_util_pct"]
    if device is not None and len(gpu):
        gpu = gpu[gpu["source"].isin(case_gpu_sources(telemetry, device))]
    if len(gpu):
        out["gpu_util_pct"] = float(gpu["value"].mean())
    windows = host.loc[host["metric"] == "case_window_s", "value"].to_numpy(dtype=float)
    for metric, key in (("foreign_cpu_case_pct", "foreign_cpu_share"), ("steal_case_pct", "steal_share")):
        values = host.loc[host["metric"] == metric, "value"].to_numpy(dtype=float)
        if not len(values):
            continue
        weights = windows if len(windows) == len(values) and windows.sum() > 0 else None
        out[key] = float(np.average(values, weights=weights)) / 100.0
    if "steal_share" not in out and "steal_pct" in out:
        out["steal_share"] = out["steal_pct"] / 100.0
    procs = telemetry[telemetry["metric"] == "foreign_gpu_procs"]
    if len(procs):
        out["foreign_gpu_procs"] = int(procs["value"].max())
    return out
