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

__all__ = ["NvmlNotSupported", "RecordedNvml", "load_record", "record", "RECORD_PATH"]

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


def _try(fn, *args):
    try:
        v = fn(*args)
    except Exception:  # noqa: BLE001 - NotSupported / a call this pynvml lacks: left out
        return None
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def record(nvml=None, environ=None, cuda_bus_ids: list | None = None, pseudonym=None) -> dict | None:
    """A recording (the module docstring's format) of what NVML answers on this machine,
    for ``coherence env --capture`` to write at ``DEST/.coherence/nvml.json``.

    ``nvml``: pynvml (default) or a stand-in; ``environ``: the process environment whose
    CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER are kept (default os.environ); ``cuda_bus_ids``:
    CUDA's PCI address per ordinal (harness.gpumap.torch_cuda_bus_ids). ``pseudonym``
    (``str -> str``) replaces UUIDs and serials, and the UUIDs inside CUDA_VISIBLE_DEVICES,
    consistently (``--anonymize``). None when NVML does not start (no driver, no GPU)."""
    import os

    if nvml is None:
        try:
            import pynvml as nvml
        except Exception:  # noqa: BLE001
            return None
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001
        return None
    anon = pseudonym or (lambda s: s)
    try:
        env = os.environ if environ is None else environ
        out: dict = {"driver_version": _try(nvml.nvmlSystemGetDriverVersion),
                     "cuda_driver_version": _try(nvml.nvmlSystemGetCudaDriverVersion),
                     "nvml_version": _try(nvml.nvmlSystemGetNVMLVersion)}
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(int(nvml.nvmlDeviceGetCount()))]
        names: dict[str, str] = {}
        gpus = []
        for h in handles:
            g: dict = {}
            for key, call in (("name", "nvmlDeviceGetName"), ("uuid", "nvmlDeviceGetUUID"),
                              ("serial", "nvmlDeviceGetSerial"),
                              ("virtualization_mode", "nvmlDeviceGetVirtualizationMode"),
                              ("persistence_mode", "nvmlDeviceGetPersistenceMode"),
                              ("power_limit_mw", "nvmlDeviceGetPowerManagementLimit"),
                              ("power_mw", "nvmlDeviceGetPowerUsage")):
                fn = getattr(nvml, call, None)
                g[key] = _try(fn, h) if fn else None
            pci = _try(nvml.nvmlDeviceGetPciInfo, h)
            g["bus_id"] = _try(lambda p: p.busId, pci) if pci is not None else None
            mem = _try(nvml.nvmlDeviceGetMemoryInfo, h)
            g["memory_total_bytes"] = getattr(mem, "total", None)
            g["memory_used_bytes"] = getattr(mem, "used", None)
            clocks = {k: _try(nvml.nvmlDeviceGetMaxClockInfo, h, c) for k, c in (
                ("sm", getattr(nvml, "NVML_CLOCK_SM", 1)), ("mem", getattr(nvml, "NVML_CLOCK_MEM", 2)))}
            g["max_clocks_mhz"] = {k: v for k, v in clocks.items() if v is not None} or None
            ecc = _try(getattr(nvml, "nvmlDeviceGetEccMode", lambda h: None), h)
            g["ecc_mode"] = list(ecc) if ecc else None
            g["temperature_c"] = _try(nvml.nvmlDeviceGetTemperature, h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
            util = _try(nvml.nvmlDeviceGetUtilizationRates, h)
            g["utilization"] = [util.gpu, util.memory] if util is not None else None
            cc = _try(getattr(nvml, "nvmlDeviceGetCudaComputeCapability", lambda h: None), h)
            g["compute_capability"] = list(cc) if cc else None
            attrs = _try(getattr(nvml, "nvmlDeviceGetAttributes", lambda h: None), h)
            g["multiprocessor_count"] = getattr(attrs, "multiprocessorCount", None)
            g["pcie"] = {k: _try(getattr(nvml, c, lambda h: None), h) for k, c in (
                ("current_generation", "nvmlDeviceGetCurrPcieLinkGeneration"),
                ("max_generation", "nvmlDeviceGetMaxPcieLinkGeneration"),
                ("current_width", "nvmlDeviceGetCurrPcieLinkWidth"), ("max_width", "nvmlDeviceGetMaxPcieLinkWidth"))}
            mig = _try(getattr(nvml, "nvmlDeviceGetMigMode", lambda h: None), h)
            g["mig_mode"] = list(mig) if mig else None
            if mig and mig[0]:
                g["mig_devices"] = []
                for k in range(int(_try(nvml.nvmlDeviceGetMaxMigDeviceCount, h) or 0)):
                    mh = _try(nvml.nvmlDeviceGetMigDeviceHandleByIndex, h, k)
                    if mh is None:
                        continue
                    ma = _try(getattr(nvml, "nvmlDeviceGetAttributes", lambda h: None), mh)
                    mm = _try(nvml.nvmlDeviceGetMemoryInfo, mh)
                    g["mig_devices"].append({
                        "uuid": _try(nvml.nvmlDeviceGetUUID, mh), "name": _try(nvml.nvmlDeviceGetName, mh),
                        "memory_total_bytes": getattr(mm, "total", None),
                        "multiprocessor_count": getattr(ma, "multiprocessorCount", None),
                        "gpu_instance_slice_count": getattr(ma, "gpuInstanceSliceCount", None),
                        "compute_instance_slice_count": getattr(ma, "computeInstanceSliceCount", None)})
            links = []
            for link in range(18):  # NVML_NVLINK_MAX_LINKS
                state = _try(nvml.nvmlDeviceGetNvLinkState, h, link)
                if state is None:
                    break
                rem = _try(nvml.nvmlDeviceGetNvLinkRemotePciInfo, h, link) if state else None
                kind = _try(getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", lambda h, l: None), h, link)
                bus = getattr(rem, "busId", None)
                links.append({"active": bool(state), "remote_bus_id": bus.decode() if isinstance(bus, bytes) else bus,
                              "remote_type": {0: "gpu", 1: "ibmnpu", 2: "switch"}.get(kind)})
            g["nvlink"] = links or None
            for key in ("uuid", "serial"):
                if g.get(key):
                    names[g[key]] = g[key] = anon(g[key])
            for m in g.get("mig_devices") or []:
                if m.get("uuid"):
                    names[m["uuid"]] = m["uuid"] = anon(m["uuid"])
            gpus.append({k: v for k, v in g.items() if v is not None})
        out["gpus"] = gpus
        p2p, topo = {}, {}
        for i in range(len(handles)):
            for j in range(i + 1, len(handles)):
                caps = {n: _try(nvml.nvmlDeviceGetP2PStatus, handles[i], handles[j], c)
                        for n, c in (("read", 0), ("write", 1), ("nvlink", 2), ("atomics", 3))}
                p2p[f"{i},{j}"] = {k: v for k, v in caps.items() if v is not None}
                t = _try(nvml.nvmlDeviceGetTopologyCommonAncestor, handles[i], handles[j])
                if t is not None:
                    topo[f"{i},{j}"] = t
        out["p2p"], out["topology"] = p2p, topo
        penv = {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER") if k in env}
        if "CUDA_VISIBLE_DEVICES" in penv and pseudonym:
            # UUIDs (or prefixes of them) listed in the variable follow the same pseudonyms.
            penv["CUDA_VISIBLE_DEVICES"] = ",".join(
                next((new for old, new in names.items() if tok.strip() and old.startswith(tok.strip())), tok)
                if not tok.strip().lstrip("-").isdigit() else tok
                for tok in penv["CUDA_VISIBLE_DEVICES"].split(","))
        out["process_environ"] = penv
        if cuda_bus_ids:
            out["cuda_bus_ids"] = list(cuda_bus_ids)
        return {k: v for k, v in out.items() if v is not None}
    finally:
        _try(nvml.nvmlShutdown)
