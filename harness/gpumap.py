"""Which NVML device is this process's ``cuda:N``: matched by PCI bus id or UUID, never by index.

NVML numbers every GPU of the node in PCI bus order and does not look at
``CUDA_VISIBLE_DEVICES``; the CUDA runtime numbers only the visible devices, in the order
that variable lists them, and by default (``CUDA_DEVICE_ORDER=FASTEST_FIRST``) puts the
fastest model first. So NVML index N and ``cuda:N`` are the same board only by accident
(pynvml issue 28; CUDA C Programming Guide, "CUDA Environment Variables").

The mapping, best evidence first:

1. the PCI address CUDA reports for the device (torch ``get_device_properties(n)``:
   ``pci_domain_id``/``pci_bus_id``/``pci_device_id``) matched to NVML's
   ``nvmlDeviceGetPciInfo().busId``;
2. else ``CUDA_VISIBLE_DEVICES``: ``GPU-…``/``MIG-…`` entries (or unique prefixes of them,
   as CUDA accepts) matched to ``nvmlDeviceGetUUID`` of a GPU or of its MIG devices; plain
   integers index CUDA's own enumeration, which equals NVML's PCI order when
   ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or when every GPU is the same model (FASTEST_FIRST only
   reorders different models; equal ones stay in PCI order);
3. else unknown, with the reason. An unknown mapping is never filled in by index.

Pure functions over plain data (no NVML, no torch import) so recorded machines and tests
can drive them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["pci_address", "parse_visible_devices", "NvmlGpu", "CudaMatch", "match_cuda_to_nvml", "nvml_gpus"]

_BUS = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})(?:\.([0-7]))?$")


def pci_address(value=None, *, domain: int | None = None, bus: int | None = None,
                device: int | None = None, function: int = 0) -> str | None:
    """A PCI address in one spelling, ``dddd:bb:dd.f`` lower case (None if unreadable).

    ``value`` is NVML's busId (``00000000:32:00.0``: 8-digit domain), ``nvidia-smi``'s or
    sysfs's (``0000:32:00.0``), or bytes of either. Without ``value``, the address is built
    from the integers CUDA reports (torch device properties ``pci_domain_id``,
    ``pci_bus_id``, ``pci_device_id``; the function number is 0 for a GPU)."""
    if value is None:
        if bus is None or device is None:
            return None
        return f"{int(domain or 0):04x}:{int(bus):02x}:{int(device):02x}.{int(function)}"
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    m = _BUS.match(str(value).strip())
    if not m:
        return None
    dom, b, d, f = m.groups()
    return f"{int(dom or '0', 16):04x}:{int(b, 16):02x}:{int(d, 16):02x}.{int(f or '0')}"


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES``: None when unset (every GPU visible), [] when
    it hides all (empty, or a first entry that names nothing such as ``-1``). CUDA stops at
    the first invalid entry, so a negative index ends the list."""
    if value is None:
        return None
    out = []
    for tok in (t.strip() for t in value.split(",")):
        if not tok:
            break
        if re.fullmatch(r"-?\d+", tok):
            if int(tok) < 0:
                break
            out.append(str(int(tok)))
        else:
            out.append(tok)
    return out


@dataclass
class NvmlGpu:
    """What NVML says of one physical GPU: its NVML ``index``, PCI ``bus_id`` (any
    spelling), ``uuid`` (``GPU-…``), ``name`` and the UUIDs of its MIG devices (``MIG-…``)."""

    index: int
    bus_id: str | None = None
    uuid: str | None = None
    name: str | None = None
    mig_uuids: list[str] = field(default_factory=list)


@dataclass
class CudaMatch:
    """``cuda:ordinal`` is NVML GPU ``nvml_index`` (a MIG device of it when ``mig_uuid``),
    found ``how`` (a sentence naming the evidence)."""

    ordinal: int
    nvml_index: int
    how: str
    mig_uuid: str | None = None


def _by_uuid(token: str, gpus: list[NvmlGpu]) -> tuple[NvmlGpu, str | None] | None | str:
    """The GPU (and MIG UUID) a UUID entry or unique prefix names; a str on ambiguity."""
    hits = []
    for g in gpus:
        if g.uuid and g.uuid.lower().startswith(token.lower()):
            hits.append((g, None))
        for m in g.mig_uuids:
            if m.lower().startswith(token.lower()):
                hits.append((g, m))
    if len(hits) > 1:
        return f"CUDA_VISIBLE_DEVICES entry {token!r} is a prefix of {len(hits)} NVML UUIDs"
    return hits[0] if hits else None


def match_cuda_to_nvml(gpus: list[NvmlGpu], *, visible: str | None = None, device_order: str | None = None,
                       cuda_bus_ids: list[str | None] | None = None) -> tuple[dict[int, CudaMatch], list[str]]:
    """Map each CUDA ordinal of this process to an NVML GPU.

    ``gpus``: NVML's devices (any order); ``visible``/``device_order``: the process's
    ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` (None when unset); ``cuda_bus_ids``:
    the PCI address CUDA reports per ordinal (from torch device properties), when known.
    Returns ``({ordinal: CudaMatch}, notes)``; an ordinal that cannot be placed is absent
    and a note says why. Raises nothing.
    """
    notes: list[str] = []
    by_bus = {pci_address(g.bus_id): g for g in gpus if pci_address(g.bus_id)}
    out: dict[int, CudaMatch] = {}
    if cuda_bus_ids:
        for n, bus in enumerate(cuda_bus_ids):
            g = by_bus.get(pci_address(bus)) if bus else None
            if g is None:
                notes.append(f"cuda:{n}: PCI address {bus!r} from CUDA matches no NVML GPU")
                continue
            out[n] = CudaMatch(n, g.index, f"PCI bus id {pci_address(bus)} (CUDA device properties = NVML busId)")
        return out, notes
    pci_order = sorted(gpus, key=lambda g: (pci_address(g.bus_id) or "~", g.index))
    if any(pci_address(g.bus_id) is None for g in gpus):
        notes.append("an NVML GPU has no readable busId; PCI order taken as NVML's index order")
        pci_order = sorted(gpus, key=lambda g: g.index)
    names = {g.name for g in gpus if g.name}
    unknown_names = any(not g.name for g in gpus)
    pci_ordered = (device_order or "").strip().upper() == "PCI_BUS_ID"
    same_model = len(names) <= 1
    why_order = ("CUDA_DEVICE_ORDER=PCI_BUS_ID" if pci_ordered else
                 "all GPUs are one model, so CUDA's FASTEST_FIRST order is PCI order" if same_model and not unknown_names
                 else "NVML gave no model names; GPUs taken as one model (FASTEST_FIRST = PCI order)")
    entries = parse_visible_devices(visible)
    if entries is None:
        entries = [str(i) for i in range(len(gpus))]
        src = "CUDA_VISIBLE_DEVICES unset"
    else:
        src = f"CUDA_VISIBLE_DEVICES={visible}"
    for n, tok in enumerate(entries):
        if tok.isdigit():
            if not (pci_ordered or same_model):
                notes.append(f"cuda:{n}: {src} names an index into CUDA's FASTEST_FIRST order and the GPUs "
                             f"are different models ({', '.join(sorted(names))}); without CUDA's PCI address "
                             f"the board is unknown")
                continue
            k = int(tok)
            if k >= len(pci_order):
                notes.append(f"cuda:{n}: {src} names index {k}, but NVML sees {len(pci_order)} GPUs")
                break  # CUDA stops at the first entry that names no device
            g = pci_order[k]
            out[n] = CudaMatch(n, g.index, f"{src}: entry {k} of the PCI-ordered GPUs ({why_order}); "
                                           f"busId {pci_address(g.bus_id)}")
        else:
            hit = _by_uuid(tok, gpus)
            if isinstance(hit, str):
                notes.append(f"cuda:{n}: {hit}")
                break
            if hit is None:
                notes.append(f"cuda:{n}: {src}: entry {tok!r} matches no NVML GPU or MIG UUID")
                break
            g, mig = hit
            out[n] = CudaMatch(n, g.index, f"{src}: UUID {tok} = NVML GPU {g.index}"
                               + (f" (MIG device {mig})" if mig else ""), mig_uuid=mig)
    return out, notes


def _s(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def nvml_gpus(nv, handles: list) -> list[NvmlGpu]:
    """NvmlGpu per handle from a live (or recorded / fake) pynvml module ``nv``; a call this
    pynvml or GPU lacks leaves its field None. MIG device UUIDs are read through
    ``nvmlDeviceGetMaxMigDeviceCount`` / ``nvmlDeviceGetMigDeviceHandleByIndex`` (NVML API
    reference, "Multi Instance GPU Management")."""
    out = []
    for i, h in enumerate(handles):
        g = NvmlGpu(index=i)
        for attr, call, conv in (("bus_id", "nvmlDeviceGetPciInfo", lambda p: _s(getattr(p, "busId", None))),
                                 ("uuid", "nvmlDeviceGetUUID", _s), ("name", "nvmlDeviceGetName", _s)):
            fn = getattr(nv, call, None)
            try:
                setattr(g, attr, conv(fn(h)) if fn else None)
            except Exception:  # noqa: BLE001 - NVMLError_NotSupported, a fake without the call
                pass
        try:
            cur = nv.nvmlDeviceGetMigMode(h)[0]
            if cur:
                for k in range(int(nv.nvmlDeviceGetMaxMigDeviceCount(h))):
                    try:
                        g.mig_uuids.append(_s(nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetMigDeviceHandleByIndex(h, k))))
                    except Exception:  # noqa: BLE001 - an empty MIG slot raises NotFound
                        continue
        except Exception:  # noqa: BLE001 - no MIG support / pynvml without MIG calls
            pass
        out.append(g)
    return out


def torch_cuda_bus_ids() -> list[str | None] | None:
    """PCI address per CUDA ordinal from torch, only when this process already imported
    torch and initialized CUDA (never imports or initializes it: the telemetry thread and
    the fingerprint must not pay for or trigger a CUDA context). None otherwise, or on ROCm.
    Source: torch.cuda.get_device_properties (pci_domain_id, pci_bus_id, pci_device_id)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is None or getattr(torch.version, "hip", None) or not torch.cuda.is_initialized():
            return None
        out = []
        for n in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(n)
            out.append(pci_address(domain=getattr(p, "pci_domain_id", 0), bus=getattr(p, "pci_bus_id", None),
                                   device=getattr(p, "pci_device_id", None)))
        return out if out and all(out) else None
    except Exception:  # noqa: BLE001 - an old torch without the fields, a broken driver
        return None
