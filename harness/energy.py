"""Energy of a case's timed repetitions: meters read around the timed loop only.

One reading per case (harness.execute.run_case), kept in the worker result as
``result["energy"]``::

    {"joules": float | None,   # energy over the window, summed over the metered devices
     "window_s": float,        # host seconds (CLOCK_MONOTONIC) from the first to the last reading
     "method": "nvml_energy_counter" | "nvml_power_integral" | "rapl" | None,
     "scope": str,             # what was metered: "cuda:0", "cuda:0+cuda:1", "cpu package 0+1"
     "reason": str | None,     # why joules is null, or a caveat on the figure
     "reps": int,              # timed repetitions inside the window
     "host": str}              # the node (harness.ranks.combine counts a shared meter once)

Meters:

- NVIDIA GPU: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver was last
  reloaded; Volta and newer, NVML API reference "Device Queries") read before and after
  the loop. The NVML device of ``cuda:N`` is found by PCI bus id / UUID
  (:mod:`harness.gpumap`), never by index. A MIG device has no counter of its own: the
  reading is the whole board's, and the reason says so.
- A GPU without the counter (``NVML_ERROR_NOT_SUPPORTED``): ``nvmlDeviceGetPowerUsage``
  (mW) sampled every :data:`POWER_PERIOD_S` by a thread during the loop, integrated by the
  trapezoid rule over the samples' own timestamps (method ``nvml_power_integral``). The
  driver may average its power reading over a longer period than the sampling one
  (NVML API reference, nvmlDeviceGetPowerUsage), so this is the coarser method.
- CPU: RAPL through the Linux powercap class (``/sys/class/powercap/intel-rapl:N``, the
  package zones; AMD Zen registers its RAPL MSRs through the same driver). The energy is
  the sum over package zones of the growth of ``energy_uj``; a counter that wrapped is
  unwrapped with the zone's ``max_energy_range_uj`` (Linux powercap sysfs docs,
  Documentation/power/powercap/powercap.rst). The package meters everything running on
  it, not only this case. Absent (VMs, most containers) or ``energy_uj`` readable by root
  only (Linux 5.10+, after CVE-2020-8694 "PLATYPUS") -> null with the path named.

The window. It runs from the start of the first timed repetition to the end of the
last. The untimed work between repetitions is inside it: a kernel's ``before_each``
(buffer rotation) and, for multi-rank cases, the ranks' one-integer all-reduce that
agrees to stop. So J per repetition = the window's energy / ``reps`` includes that
work. That is small next to a repetition, but not nothing for microsecond kernels.

Short windows. Neither counter is continuous: NVML documents no update period for the
energy counter and it is seen to step on the order of tens of milliseconds; RAPL's
energy status registers update about every millisecond (Intel SDM vol. 3B, "RAPL
Interfaces": ~976 us unit of time). A window shorter than :data:`NVML_MIN_WINDOW_S` /
:data:`RAPL_MIN_WINDOW_S` keeps its joules (a reading is still a reading, and several
rounds' figures can be compared) but the reason says the window is below the counter's
resolution; a counter that did not advance at all gives null joules (zero energy on a
powered device is the resolution, not a measurement).

Nothing here raises into the case: every failure is a reading with ``joules`` None and a
reason. pynvml is imported lazily, on the first GPU case.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import threading
import time

__all__ = [
    "METHODS", "NVML_MIN_WINDOW_S", "RAPL_MIN_WINDOW_S", "POWER_PERIOD_S", "POWERCAP_ROOT",
    "empty_reading", "device_kind", "rapl_zones", "rapl_delta_uj", "trapezoid_j", "interpolate", "clip_from",
    "CaseEnergy", "reset_nvml",
]

METHODS = ("nvml_energy_counter", "nvml_power_integral", "rapl")
# Below these windows the counter's own update step is a large share of the reading.
NVML_MIN_WINDOW_S = 0.05
RAPL_MIN_WINDOW_S = 0.01
# The power sampler's period: NVML's power reading itself refreshes no faster than this.
POWER_PERIOD_S = 0.015
POWERCAP_ROOT = "/sys/class/powercap"
# Top-level RAPL zones only (intel-rapl:0); intel-rapl:0:1 (core, uncore, dram) are parts
# of a package and would double count; intel-rapl-mmio:0 repeats package 0 on some parts.
_ZONE = re.compile(r"^intel-rapl:(\d+)$")


def empty_reading(scope: str, reason: str, window_s: float = 0.0, reps: int = 0) -> dict:
    """A reading with no joules: ``reason`` says why (never empty)."""
    return {"joules": None, "window_s": float(window_s), "method": None, "scope": scope,
            "reason": reason or "not measured", "reps": int(reps), "host": platform.node()}


def device_kind(device: str) -> tuple[str, int | None]:
    """``("gpu", ordinal)`` for ``cuda:N`` / ``jax:gpu:N`` / ``jax:cuda:N``, ``("cpu",
    None)`` for ``cpu``, ``cpu:N``, ``jax:cpu:N`` and plugin CPU devices (``numpy:cpu:0``),
    else ``(first token, None)``: a device no meter here knows (``mps``, ...)."""
    parts = str(device).lower().split(":")
    ordinal = int(parts[-1]) if parts[-1].isdigit() else 0
    if "cuda" in parts or "gpu" in parts:
        return "gpu", ordinal
    if "cpu" in parts:
        return "cpu", None
    return parts[0], None


# -- RAPL (powercap) ----------------------------------------------------------------------
def _read_text(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def rapl_zones(root: str = POWERCAP_ROOT) -> tuple[list[dict], str | None]:
    """The readable RAPL package zones under ``root``: ``[{"path", "name", "index",
    "max_uj"}]`` (by index), or ``([], reason)`` naming the path that is absent or
    unreadable. A zone whose ``name`` is not ``package-N`` (``psys``: the whole platform,
    which contains the packages) is left out so nothing is counted twice."""
    if not os.path.isdir(root):
        return [], f"{root} is absent (no powercap driver here: a VM or container hides RAPL)"
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        return [], f"{root} cannot be listed: {exc.strerror or exc}"
    zones = []
    for entry in names:
        m = _ZONE.match(entry)
        if not m:
            continue
        path = os.path.join(root, entry)
        try:
            name = _read_text(os.path.join(path, "name"))
        except OSError:
            name = ""
        if not name.startswith("package"):
            continue
        energy = os.path.join(path, "energy_uj")
        try:
            int(_read_text(energy))
        except PermissionError:
            return [], (f"{energy} is readable by root only (Linux 5.10+ after CVE-2020-8694, PLATYPUS); "
                        "run as root or grant read access to measure CPU energy")
        except (OSError, ValueError) as exc:
            return [], f"{energy} cannot be read: {getattr(exc, 'strerror', None) or exc}"
        try:
            max_uj = int(_read_text(os.path.join(path, "max_energy_range_uj")))
        except (OSError, ValueError):
            max_uj = None
        zones.append({"path": path, "name": name, "index": int(m.group(1)), "max_uj": max_uj})
    if not zones:
        return [], f"{root} has no intel-rapl:N package zone (no RAPL on this CPU, or the driver is not loaded)"
    zones.sort(key=lambda z: z["index"])
    return zones, None


def rapl_delta_uj(before: int, after: int, max_uj: int | None) -> int | None:
    """Growth of a zone's ``energy_uj`` (uJ) from ``before`` to ``after``. The counter
    runs from 0 to ``max_energy_range_uj`` and starts again at 0 (powercap docs), so a
    smaller ``after`` is one wrap: ``after + max_uj - before``. None when it wrapped and
    the range is unknown. More than one wrap in a window cannot be seen."""
    if after >= before:
        return after - before
    if not max_uj:
        return None
    return after + max_uj - before


# -- NVML ---------------------------------------------------------------------------------
_NVML: dict = {}


def reset_nvml() -> None:
    """Forget the cached NVML session (tests swap the pynvml module)."""
    _NVML.clear()


def _nvml_session() -> tuple[object, list, str | None]:
    """``(pynvml, [handle per NVML index], reason)``: NVML initialized once per process
    and kept (nvmlInit costs tens of ms; the worker runs many cases)."""
    if "nv" not in _NVML:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            _NVML.update(nv=pynvml, handles=handles, reason=None)
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, DriverNotLoaded
            _NVML.update(nv=None, handles=[], reason=f"NVML unavailable ({type(exc).__name__}: {exc})"[:300])
    return _NVML["nv"], _NVML["handles"], _NVML["reason"]


def _nvml_handle(ordinal: int, environ=None) -> tuple[object, object, str | None, str | None]:
    """``(pynvml, handle, note, reason)`` of CUDA ordinal ``ordinal``: the NVML device is
    matched by PCI bus id / UUID (harness.gpumap), never by index; reason set (handle
    None) when NVML is absent or the ordinal cannot be placed; note set for a MIG device
    (its counter is the whole board's)."""
    from harness.gpumap import match_cuda_to_nvml, nvml_gpus, torch_cuda_bus_ids

    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "version", None), "hip", None):
        return None, None, None, "ROCm GPU: NVML does not see it, and no AMD energy meter is implemented"
    nv, handles, reason = _nvml_session()
    if reason:
        return None, None, None, reason
    environ = os.environ if environ is None else environ
    matches, notes = match_cuda_to_nvml(nvml_gpus(nv, handles), visible=environ.get("CUDA_VISIBLE_DEVICES"),
                                        device_order=environ.get("CUDA_DEVICE_ORDER"),
                                        cuda_bus_ids=torch_cuda_bus_ids())
    m = matches.get(ordinal)
    if m is None:
        why = "; ".join(n for n in notes if n.startswith(f"cuda:{ordinal}:")) or "; ".join(notes)
        return None, None, None, f"cuda:{ordinal} matches no NVML device" + (f" ({why})" if why else "")
    note = (f"MIG device {m.mig_uuid}: NVML meters the whole GPU {m.nvml_index}, other instances included"
            if m.mig_uuid else None)
    return nv, handles[m.nvml_index], note, None


def _not_supported(nv, exc: Exception) -> bool:
    """An NVMLError meaning the GPU lacks the call (pynvml: NVMLError_NotSupported,
    value NVML_ERROR_NOT_SUPPORTED = 3)."""
    code = getattr(nv, "NVML_ERROR_NOT_SUPPORTED", 3)
    return getattr(exc, "value", None) == code or "NotSupported" in type(exc).__name__


def trapezoid_j(samples: list[tuple[float, float]]) -> float | None:
    """Energy (J) of power samples ``[(t_s, watts)]`` in time order by the trapezoid
    rule over their own timestamps; None with fewer than two samples."""
    if len(samples) < 2:
        return None
    return sum(0.5 * (w0 + w1) * (t1 - t0) for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


def interpolate(samples: list[tuple[float, float]], t: float) -> float:
    """The value of ``[(t_s, value)]`` (time order, at least one) at ``t``: linear
    between the samples around it, the first / last value outside them."""
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return samples[-1][1]


def clip_from(samples: list[tuple[float, float]], t: float) -> list[tuple[float, float]]:
    """``samples`` from time ``t`` on, starting with the interpolated value at ``t``
    (unchanged when ``t`` is before the first sample)."""
    if not samples or t <= samples[0][0]:
        return list(samples)
    return [(t, interpolate(samples, t))] + [s for s in samples if s[0] > t]


class _Sampler:
    """A thread calling ``read() -> float`` every ``period_s`` from :meth:`start` to
    :meth:`stop`, both of which take a sample themselves, so the samples span the
    window. ``samples``: ``[(time.monotonic() s, value)]``; a failing read is skipped
    and its error kept (first three)."""

    def __init__(self, read, period_s: float = POWER_PERIOD_S):
        self.read, self.period_s = read, period_s
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            value = float(self.read())
            self.samples.append((time.monotonic(), value))
        except Exception as exc:  # noqa: BLE001 - kept as the reading's reason
            if len(self.errors) < 3:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="coherence-energy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Join the thread and take the last sample; a second call does nothing."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None
            self._sample()


# -- one case -----------------------------------------------------------------------------
class CaseEnergy:
    """The energy meter of one case over ``devices`` (the devices this process drives:
    one for a single-device case or a rank, the group for a mesh case).

    :meth:`start` before the first timed repetition, :meth:`stop` after the last (the
    device synchronized), then :meth:`reading` with the number of timed repetitions.
    :meth:`wrap` gives a clock that starts the meter at its first timed repetition, so
    harness.timing.measure's warm-up stays outside the window. A kernel that times
    itself (its own ``measure``, warm-up inside) is metered with ``start(track=True)``:
    the meter is sampled every :data:`POWER_PERIOD_S` and :meth:`trim` cuts the window
    to start at its first timed repetition (``Kernel.sample_t_start_ns``, CLOCK_MONOTONIC
    like these samples). ``powercap_root`` (default :data:`POWERCAP_ROOT`) and
    ``environ`` are parameters so tests can use a fake tree / environment. Never raises.
    """

    def __init__(self, devices: list[str], powercap_root: str | None = None, environ=None):
        self.devices = list(dict.fromkeys(devices))
        self.method: str | None = None
        self.scope = "+".join(self.devices)
        self.reason: str | None = None
        self.notes: list[str] = []
        self.t0 = self.t1 = None
        self._before: list = []
        self._after: list = []
        self._sampler: _Sampler | None = None
        self._prev: list | None = None
        self._total = 0.0
        try:
            self._setup(POWERCAP_ROOT if powercap_root is None else powercap_root, environ)
        except Exception as exc:  # noqa: BLE001 - a meter's failure is a reason, never the case's
            self.method, self.reason = None, f"energy meter setup failed: {type(exc).__name__}: {exc}"[:300]

    def _setup(self, powercap_root: str, environ) -> None:
        kinds = {device_kind(d) for d in self.devices}
        types = {k for k, _ in kinds}
        if not self.devices:
            self.reason = "no device to meter"
        elif types == {"cpu"}:
            self.zones, self.reason = rapl_zones(powercap_root)
            if self.zones:
                self.method = "rapl"
                self.scope = "cpu package " + "+".join(str(z["index"]) for z in self.zones)
            else:
                self.scope = "cpu package"
        elif types == {"gpu"}:
            self._setup_nvml(sorted(o for _, o in kinds), environ)
        else:
            self.reason = f"no energy meter for device {', '.join(self.devices)}"

    def _setup_nvml(self, ordinals: list[int], environ) -> None:
        self.handles = []
        for o in ordinals:
            nv, handle, note, reason = _nvml_handle(o, environ)
            if reason:
                self.reason = reason
                return
            self.nv = nv
            self.handles.append(handle)
            if note:
                self.notes.append(note)
        self.method = "nvml_energy_counter"
        try:
            for h in self.handles:
                self.nv.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception as exc:  # noqa: BLE001
            if not _not_supported(self.nv, exc):
                self.method = None
                self.reason = f"nvmlDeviceGetTotalEnergyConsumption failed: {type(exc).__name__}: {exc}"[:300]
                return
            self.method = "nvml_power_integral"
            self.notes.append("GPU has no NVML energy counter (NOT_SUPPORTED): NVML power samples integrated "
                              f"every {POWER_PERIOD_S * 1000:.0f} ms")

    # The readings -----------------------------------------------------------------------
    def _read(self) -> list:
        """Raw counters: uJ per RAPL zone, or mJ per NVML device."""
        if self.method == "rapl":
            return [int(_read_text(os.path.join(z["path"], "energy_uj"))) for z in self.zones]
        return [int(self.nv.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]

    def _delta_j(self, before: list, after: list) -> float:
        """Joules between two raw readings, summed over the meters; ValueError when a
        RAPL counter went backwards with no known range."""
        if self.method == "rapl":
            total = 0
            for z, b, a in zip(self.zones, before, after):
                d = rapl_delta_uj(b, a, z["max_uj"])
                if d is None:
                    raise ValueError(f"{z['path']}/energy_uj went backwards and max_energy_range_uj is unreadable")
                total += d
            return total * 1e-6
        return sum(a - b for b, a in zip(before, after)) * 1e-3  # mJ -> J

    def _cumulative_j(self) -> float:
        """Joules since the first call (a tracked counter's sample value)."""
        raw = self._read()
        if self._prev is not None:
            self._total += self._delta_j(self._prev, raw)
        self._prev = raw
        return self._total

    def _power_w(self) -> float:
        return sum(self.nv.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000.0  # mW -> W

    def start(self, track: bool = False) -> None:
        """Read the meter(s) at the start of the timed window (once; later calls do
        nothing). ``track``: sample the counter through the window, for :meth:`trim`."""
        if self.t0 is not None:
            return
        try:
            if self.method == "nvml_power_integral":
                self._sampler = _Sampler(self._power_w)
                self._sampler.start()
            elif self.method is not None and track:
                self._sampler = _Sampler(self._cumulative_j)
                self._sampler.start()
            elif self.method is not None:
                self._before = self._read()
        except Exception as exc:  # noqa: BLE001
            self.method, self.reason = None, f"energy reading at start failed: {type(exc).__name__}: {exc}"[:300]
        self.t0 = time.monotonic()

    def stop(self) -> None:
        """Read the meter(s) at the end of the timed window (once)."""
        if self.t0 is None or self.t1 is not None:
            return
        self.t1 = time.monotonic()
        if self.method is None:
            return
        try:
            if self._sampler is not None:
                self._sampler.stop()
            else:
                self._after = self._read()
        except Exception as exc:  # noqa: BLE001
            self.method, self.reason = None, f"energy reading at end failed: {type(exc).__name__}: {exc}"[:300]

    def trim(self, t_first_s: float | None) -> None:
        """Start the window at ``t_first_s`` (time.monotonic seconds: the first timed
        repetition of a kernel that warmed up inside its own measure). Without a time,
        or without tracked samples, the window stays whole and a note says so."""
        samples = self._sampler.samples if self._sampler is not None else []
        if t_first_s is None or len(samples) < 2 or self.t0 is None:
            self.notes.append("metered around the kernel's own measure, its warm-up included")
            return
        if not samples[0][0] <= t_first_s < samples[-1][0]:
            self.notes.append("the kernel's first timed repetition is outside the metered window (another clock?): "
                              "window kept whole, its warm-up included")
            return
        if t_first_s > self.t0:
            self._sampler.samples = clip_from(samples, t_first_s)
            self.t0 = t_first_s
            self.notes.append("window cut to the kernel's first timed repetition (counter sampled every "
                              f"{POWER_PERIOD_S * 1000:.0f} ms, interpolated)")

    def discard(self) -> None:
        """Forget a started window (a custom measure that declined, returning None)."""
        self.close()
        self._sampler = None
        self._prev, self._total = None, 0.0
        self.t0 = self.t1 = None
        self._before, self._after = [], []

    def close(self) -> None:
        """Stop the sampler thread if one runs (its samples stay for :meth:`reading`)."""
        if self._sampler is not None:
            self._sampler.stop()

    def wrap(self, clock):
        """``clock`` (harness.timing.Clock) with the meter started before its first
        ``time`` call: the first timed repetition, after measure's warm-up and sync."""
        return _MeteredClock(clock, self)

    def _joules(self) -> tuple[float | None, str | None]:
        if self._sampler is not None:
            samples = self._sampler.samples
            if len(samples) < 2:
                errors = "; ".join(self._sampler.errors)
                return None, "fewer than two meter samples in the window" + (f" ({errors})" if errors else "")
            if self.method == "nvml_power_integral":
                return trapezoid_j(samples), None
            return samples[-1][1] - samples[0][1], None
        if len(self._before) != len(self._after) or not self._before:
            return None, "meter not read around the timed window"
        return self._delta_j(self._before, self._after), None

    def reading(self, reps: int) -> dict:
        """This case's reading (the dict described in the module docstring) for ``reps``
        timed repetitions. Never raises."""
        if self.method is None or self.t0 is None or self.t1 is None:
            why = self.reason or "the timed loop did not run"
            return empty_reading(self.scope, why, 0.0 if self.t0 is None or self.t1 is None else self.t1 - self.t0, reps)
        window = self.t1 - self.t0
        if self._sampler is not None and len(self._sampler.samples) >= 2:
            # The samples bracket [t0, t1]; the energy is theirs, so is the window.
            window = self._sampler.samples[-1][0] - self._sampler.samples[0][0]
        try:
            joules, why = self._joules()
        except Exception as exc:  # noqa: BLE001
            joules, why = None, f"{type(exc).__name__}: {exc}"[:300]
        notes = list(self.notes)
        floor = RAPL_MIN_WINDOW_S if self.method == "rapl" else NVML_MIN_WINDOW_S
        if joules is not None and joules <= 0:
            joules, why = None, f"the meter did not advance in {window * 1000:.1f} ms (its update step, not a measurement)"
        elif joules is not None and window < floor:
            notes.append(f"window {window * 1000:.1f} ms < {floor * 1000:.0f} ms: counter resolution")
        if joules is None:
            return {**empty_reading(self.scope, "; ".join([why or "not measured", *notes]), window, reps),
                    "method": self.method}
        return {"joules": float(joules), "window_s": float(window), "method": self.method, "scope": self.scope,
                "reason": "; ".join(notes) or None, "reps": int(reps), "host": platform.node()}


class _MeteredClock:
    """A timing clock that starts a :class:`CaseEnergy` at its first timed repetition."""

    def __init__(self, clock, energy: CaseEnergy):
        self._clock, self._energy = clock, energy
        self.name = clock.name

    def sync(self) -> None:
        self._clock.sync()

    def time(self, fn) -> float:
        if self._energy.t0 is None:
            self._energy.start()
        return self._clock.time(fn)

    def __getattr__(self, name):
        return getattr(self._clock, name)
