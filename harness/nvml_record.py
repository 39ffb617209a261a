"""NVML answers from a recording, for machines fingerprinted from a sysroot.

NVML talks to the kernel driver, so a captured machine (``coherence env --sysroot DIR``)
cannot run it. A snapshot carries instead ``DIR/.coherence/nvml.json``: what the NVML calls
of the fingerprint returned on that machine. :class:`RecordedNvml` answers those calls
with the pynvml names and shapes, so :func:`harness.environment.nvidia_info` and the
telemetry mapping run unchanged on it; a call the recording lacks raises
:class:`NvmlNotSupported`, which those readers already treat as "not supported here".

Record format (JSON; every key optional except ``gpus``)::

    {"driver_version": "550.54.15", "cuda_driver_version": 12040, "nvml_version": "12.550.54.15",
     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-…", "serial": "…",
               "bus_id": "00000000:18:00.0", "memory_total_bytes": 85520809984,
               "compute_capability": [9, 0], "multiprocessor_count": 132,
               "pcie": {"current_generation": 5, "max_generation": 5, "current_width": 16, "max_width": 16},
               "mig_mode": [1, 1], "virtualization_mode": 0,
               "mig_devices": [{"uuid": "MIG-…", "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
                                "memory_total_bytes": 10200547328, "multiprocessor_count": 16,
                                "gpu_instance_slice_count": 1, "compute_instance_slice_count": 1}],
               "nvlink": [{"active": true, "remote_bus_id": "00000000:19:00.0", "remote_type": "gpu"}],
               "power_mw": 71000, "utilization": [0, 0], "memory_used_bytes": 0}],
     "p2p": {"0,1": {"read": 0, "write": 0, "nvlink": 0, "atomics": 0}},
     "topology": {"0,1": 10}}

Sources of the shapes: NVML API reference (docs.nvidia.com/deploy/nvml-api), pynvml's
bindings (nvidia-ml-py). Numbers are as NVML returns them (power in mW, bytes, MHz).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from harness.errors import UserError

__all__ = ["NvmlNotSupported", "RecordedNvml", "load_record", "RECORD_PATH"]

#: where a snapshot keeps its NVML recording, relative to the sysroot
RECORD_PATH = ".coherence/nvml.json"

_REMOTE_TYPES = {"gpu": 0, "ibmnpu": 1, "switch": 2}  # NVML_NVLINK_DEVICE_TYPE_*


class NvmlNotSupported(Exception):
    """The recording holds no answer for this call (NVML's NVML_ERROR_NOT_SUPPORTED)."""


def load_record(path: str | Path) -> dict:
    """The recording at ``path`` (a JSON file as in the module docstring). Raises UserError
    naming the file when it is unreadable, not JSON, or has no ``gpus`` list."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{p}: cannot read the NVML recording ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{p}: NVML recording is not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), list) \
            or not all(isinstance(g, dict) for g in doc["gpus"]):
        raise UserError(f"{p}: NVML recording must be an object with a 'gpus' list of objects")
    return doc


class _Handle:
    def __init__(self, index: int, rec: dict, parent: "_Handle | None" = None):
        self.index, self.rec, self.parent = index, rec, parent


class RecordedNvml:
    """A pynvml stand-in answering from a recording (``doc``: the dict of load_record).

    Implements the calls harness.environment and harness.telemetry make; anything else is
    absent (AttributeError) and a recorded-as-missing answer raises NvmlNotSupported."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self, doc: dict):
        self.doc = doc
        self._handles = [_Handle(i, g) for i, g in enumerate(doc.get("gpus") or [])]

    # -- helpers
    def _get(self, h: _Handle, key: str):
        v = h.rec.get(key)
        if v is None:
            raise NvmlNotSupported(f"not in the recording: {key}")
        return v

    def _sys(self, key: str):
        v = self.doc.get(key)
        if v is None:
            raise NvmlNotSupported(f"not in the recording: {key}")
        return v

    # -- system
    def nvmlInit(self): return None
    def nvmlShutdown(self): return None
    def nvmlSystemGetDriverVersion(self): return self._sys("driver_version")
    def nvmlSystemGetCudaDriverVersion(self): return self._sys("cuda_driver_version")
    def nvmlSystemGetNVMLVersion(self): return self._sys("nvml_version")
    def nvmlDeviceGetCount(self): return len(self._handles)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= int(i) < len(self._handles):
            raise NvmlNotSupported(f"no GPU {i} in the recording")
        return self._handles[int(i)]

    # -- identity
    def nvmlDeviceGetName(self, h): return self._get(h, "name")
    def nvmlDeviceGetUUID(self, h): return self._get(h, "uuid")
    def nvmlDeviceGetSerial(self, h): return self._get(h, "serial")
    def nvmlDeviceGetPciInfo(self, h): return SimpleNamespace(busId=self._get(h, "bus_id"))
    def nvmlDeviceGetCudaComputeCapability(self, h): return tuple(self._get(h, "compute_capability"))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self._get(h, "memory_total_bytes"), used=h.rec.get("memory_used_bytes", 0))

    def nvmlDeviceGetAttributes(self, h):
        """MIG/GPU attributes (NVML's nvmlDeviceAttributes_t subset)."""
        return SimpleNamespace(multiprocessorCount=self._get(h, "multiprocessor_count"),
                               gpuInstanceSliceCount=h.rec.get("gpu_instance_slice_count"),
                               computeInstanceSliceCount=h.rec.get("compute_instance_slice_count"),
                               memorySizeMB=(h.rec.get("memory_total_bytes") or 0) >> 20)

    # -- PCIe
    def nvmlDeviceGetCurrPcieLinkGeneration(self, h): return self._pcie(h, "current_generation")
    def nvmlDeviceGetMaxPcieLinkGeneration(self, h): return self._pcie(h, "max_generation")
    def nvmlDeviceGetCurrPcieLinkWidth(self, h): return self._pcie(h, "current_width")
    def nvmlDeviceGetMaxPcieLinkWidth(self, h): return self._pcie(h, "max_width")

    def _pcie(self, h, key):
        v = (h.rec.get("pcie") or {}).get(key)
        if v is None:
            raise NvmlNotSupported(f"not in the recording: pcie.{key}")
        return v

    # -- MIG
    def nvmlDeviceGetMigMode(self, h): return tuple(self._get(h, "mig_mode"))
    def nvmlDeviceGetMaxMigDeviceCount(self, h): return len(h.rec.get("mig_devices") or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        migs = h.rec.get("mig_devices") or []
        if not 0 <= int(k) < len(migs):
            raise NvmlNotSupported(f"no MIG device {k}")
        return _Handle(int(k), migs[int(k)], parent=h)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h):
        if h.parent is None:
            raise NvmlNotSupported("not a MIG device handle")
        return h.parent

    # -- settings
    def nvmlDeviceGetVirtualizationMode(self, h): return self._get(h, "virtualization_mode")
    def nvmlDeviceGetPersistenceMode(self, h): return self._get(h, "persistence_mode")
    def nvmlDeviceGetPowerManagementLimit(self, h): return self._get(h, "power_limit_mw")
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return self._get(h, "power_limit_mw")
    def nvmlDeviceGetEccMode(self, h): return tuple(self._get(h, "ecc_mode"))

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        clocks = h.rec.get("max_clocks_mhz") or {}
        v = clocks.get("sm" if kind == self.NVML_CLOCK_SM else "mem")
        if v is None:
            raise NvmlNotSupported("not in the recording: max_clocks_mhz")
        return v

    # -- readings (telemetry)
    def nvmlDeviceGetClockInfo(self, h, kind): return self.nvmlDeviceGetMaxClockInfo(h, kind)
    def nvmlDeviceGetPowerUsage(self, h): return self._get(h, "power_mw")
    def nvmlDeviceGetTemperature(self, h, sensor): return self._get(h, "temperature_c")

    def nvmlDeviceGetUtilizationRates(self, h):
        gpu, mem = self._get(h, "utilization")
        return SimpleNamespace(gpu=gpu, memory=mem)

    # -- NVLink and topology
    def _link(self, h, link):
        links = h.rec.get("nvlink")
        if links is None or not 0 <= int(link) < len(links):
            raise NvmlNotSupported(f"no NVLink {link} in the recording")
        return links[int(link)]

    def nvmlDeviceGetNvLinkState(self, h, link): return 1 if self._link(h, link).get("active") else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        bus = self._link(h, link).get("remote_bus_id")
        if bus is None:
            raise NvmlNotSupported("no remote PCI info recorded")
        return SimpleNamespace(busId=bus)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        return _REMOTE_TYPES.get(str(self._link(h, link).get("remote_type", "gpu")).lower(), 0)

    def _pair(self, table: str, a: _Handle, b: _Handle):
        recs = self.doc.get(table) or {}
        for key in (f"{a.index},{b.index}", f"{b.index},{a.index}"):
            if key in recs:
                return recs[key]
        raise NvmlNotSupported(f"not in the recording: {table} {a.index},{b.index}")

    def nvmlDeviceGetP2PStatus(self, a, b, cap_index):
        caps = self._pair("p2p", a, b)
        name = {0: "read", 1: "write", 2: "nvlink", 3: "atomics"}.get(int(cap_index))
        if name not in caps:
            raise NvmlNotSupported(f"not in the recording: p2p {name}")
        return caps[name]

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b): return self._pair("topology", a, b)
