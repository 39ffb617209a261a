"""Background telemetry sampler: host and GPU state while cases run.

Runs as a thread in the runner process (the worker that times the cases is another
process, so sampling does not share its interpreter). Each tick appends long-format
rows ``(t_s, case_id, source, metric, value)``:

- host (psutil, /proc/stat): ``cpu_util_pct``, ``cpu_freq_mhz``, ``steal_pct`` (share
  of CPU time stolen by the hypervisor since the previous tick), ``iowait_pct``;
- per NVIDIA GPU (pynvml, when NVML initializes): ``sm_clock_mhz``, ``mem_clock_mhz``,
  ``clock_event_reasons`` (the NVML bitmask as a number), ``power_w``, ``temperature_c``,
  ``gpu_util_pct``, ``mem_util_pct``, ``mem_used_bytes``.

The sampler only reads; it never changes a device setting.
"""

from __future__ import annotations

import os
import threading
import time
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
        from harness.gpumap import match_cuda_to_nvml, nvml_gpus

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


class TelemetrySampler:
    """Samples every ``interval_s`` in a daemon thread; ``take()`` hands over the rows
    collected since the last call (so the runner stores them with the case)."""

    def __init__(self, t0_ns: int, interval_s: float = 0.2, proc_stat: str = "/proc/stat"):
        self.t0_ns = t0_ns
        self.interval_s = interval_s
        self.proc_stat = proc_stat
        self.case_id = ""
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
                with self._lock:
                    self._rows.extend((t_s, case, src, metric, float(value)) for src, metric, value in rows)
        finally:
            nvml.close()


def summarize_case(telemetry: pd.DataFrame) -> dict:
    """Per-case means of the host metrics that later indicators need (mode 2, mode 4)."""
    out = {}
    if telemetry is None or not len(telemetry):
        return out
    host = telemetry[telemetry["source"] == "host"]
    for metric in ("cpu_util_pct", "steal_pct"):
        values = host.loc[host["metric"] == metric, "value"]
        if len(values):
            out[metric] = float(values.mean())
    gpu = telemetry[telemetry["metric"] == "gpu_util_pct"]
    if len(gpu):
        out["gpu_util_pct"] = float(gpu["value"].mean())
    return out
