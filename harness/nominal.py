"""Nominal peaks of a device: the "N" rung of the capacity ladder (INDICATORS.md §1).

Accelerators are looked up in ``configs/accelerators.yaml`` by their class name (what
``torch.cuda.get_device_name`` or JAX's ``device_kind`` reports); CPUs are derived from
cores × clock × FLOP/cycle per dtype, by the ISA rules in the same file's ``cpu`` section;
the user may override any field. Every figure says where it came from (``kind``,
``source``, ``notes``); a device nothing matches is ``unknown``, never guessed.

``cpu_nominal(env_doc, live=...)`` is the one path from an environment document to the CPU's
peaks (``coherence env`` prints it, the runner judges runs against it): the rules see the
raw /proc/cpuinfo ``flags`` (x86) or ``Features`` (arm64) names, the SVE vector length read
from the machine, the physical cores of the affinity set capped by the cgroup CPU quota,
and the cpufreq maximum clock or else the clock measured once per boot (harness.cpuclock).

The helpers ``ridge``, ``bound_for`` and ``roofline_fraction`` turn a case's work model and
measured rates into the ``bound`` and ``roofline_fraction`` columns of cases.parquet.

Only PyYAML is imported; no framework.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError

__all__ = [
    "DTYPES",
    "DEFAULT_TABLE_PATH",
    "NominalError",
    "load_table",
    "nominal_for",
    "cpu_description",
    "cpu_nominal",
    "ridge",
    "bound_for",
    "roofline_fraction",
]

#: dtype keys a compute dict may hold (int8 counts operations, the rest FLOPs).
DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")

DEFAULT_TABLE_PATH = Path(__file__).resolve().parent.parent / "configs" / "accelerators.yaml"

_BANDWIDTH_FIELDS = ("memory_Bps", "link_Bps", "host_link_Bps")
_ROW_REQUIRED = ("name", "match", "source", "compute", "memory_Bps")
_ROW_OPTIONAL = ("vendor", "examples", "link_Bps", "host_link_Bps", "notes",
                 "link_direction", "nvlink_link_Bps", "pair_link_Bps", "sms", "memory_GB")
#: optional GPU-row numbers: per-link NVLink rate and one peer pair's link (B/s per
#: direction), the full part's SM count and memory size in GB (MIG slices are scaled by them)
_GPU_FIELDS = ("nvlink_link_Bps", "pair_link_Bps", "sms", "memory_GB")
_RULE_REQUIRED = ("name", "label", "when", "dtypes", "source")
_RULE_OPTIONAL = ("note", "scale", "vector_bits")
_WHEN_KEYS = (
    "vendor", "arch", "family", "models", "model_min", "model_max", "model_name",
    "flags_all", "flags_any", "flags_none",
)
_ALT_KEYS = ("flop_per_cycle", "flags_all", "flags_any", "models", "via")
_SCALES = ("sve_vector_bits",)
_OVERRIDE_KEYS = ("compute_flops", *_BANDWIDTH_FIELDS, "note") + DTYPES


class NominalError(UserError, ValueError):
    """A bad accelerator table or a bad override; the message names the row/key."""


# ------------------------------------------------------------------------------ loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``989.4e12`` / ``1e12`` as floats.

    YAML 1.1 (PyYAML) only accepts exponents with a sign and a dot (``9.894e+14``), so
    plain ``3.35e12`` would otherwise load as a string.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

_cache: dict[tuple[str, int, int], dict] = {}


def load_table(path: str | Path | None = None) -> dict:
    """Load and validate the accelerator table (default: configs/accelerators.yaml).

    Returns ``{"version", "accelerators": [row, ...], "cpu": {...}, "path"}`` with each
    row's ``match`` also compiled into ``_regexes``. Raises :class:`NominalError` (a
    ``ValueError``) naming the row and key on any defect.
    """
    p = Path(path) if path is not None else DEFAULT_TABLE_PATH
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    except OSError as e:
        raise NominalError(f"accelerator table {p}: cannot read ({e.strerror})") from None
    if key in _cache:
        return _cache[key]
    try:
        with open(p, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise NominalError(f"accelerator table {p}: not valid YAML ({e})") from None
    table = _validate(doc, p)
    _cache[key] = table
    return table


def _validate(doc: Any, p: Path) -> dict:
    where = f"accelerator table {p}"
    if not isinstance(doc, dict):
        raise NominalError(f"{where}: top level must be a mapping")
    rows = doc.get("accelerators")
    if not isinstance(rows, list) or not rows:
        raise NominalError(f"{where}: key 'accelerators' must be a non-empty list")
    out_rows = []
    names: set[str] = set()
    for i, row in enumerate(rows):
        label = f"{where}: accelerators[{i}]"
        if not isinstance(row, dict):
            raise NominalError(f"{label}: must be a mapping")
        if isinstance(row.get("name"), str) and row["name"].strip():
            label = f"{where}: row '{row['name']}'"
        for k in _ROW_REQUIRED:
            if k not in row:
                raise NominalError(f"{label}: key '{k}' missing")
        for k in row:
            if k not in _ROW_REQUIRED and k not in _ROW_OPTIONAL:
                raise NominalError(f"{label}: unknown key '{k}'")
        if not isinstance(row["name"], str) or not row["name"].strip():
            raise NominalError(f"{label}: key 'name' must be a non-empty string")
        if row["name"] in names:
            raise NominalError(f"{label}: key 'name' duplicates an earlier row")
        names.add(row["name"])
        if not isinstance(row["source"], str) or not row["source"].strip():
            raise NominalError(f"{label}: key 'source' must be a non-empty string")
        m = row["match"]
        if isinstance(m, str):
            m = [m]
        if not isinstance(m, list) or not m or not all(isinstance(x, str) and x for x in m):
            raise NominalError(f"{label}: key 'match' must be a non-empty list of regexes")
        regexes = []
        for x in m:
            try:
                regexes.append(re.compile(x, re.IGNORECASE))
            except re.error as e:
                raise NominalError(f"{label}: key 'match': bad regex {x!r} ({e})") from None
        compute = row["compute"]
        if not isinstance(compute, dict):
            raise NominalError(f"{label}: key 'compute' must be a mapping of dtype to FLOP/s")
        clean_compute = {}
        for d, v in compute.items():
            if d not in DTYPES:
                raise NominalError(
                    f"{label}: key 'compute.{d}': unknown dtype (known: {', '.join(DTYPES)})")
            clean_compute[d] = _positive(v, f"{label}: key 'compute.{d}'")
        clean = {
            "name": row["name"],
            "vendor": row.get("vendor"),
            "match": list(m),
            "source": row["source"].strip(),
            "compute": clean_compute,
            "notes": str(row.get("notes") or "").strip(),
            "examples": list(row.get("examples") or []),
            "_regexes": regexes,
        }
        for k in _BANDWIDTH_FIELDS + _GPU_FIELDS:
            v = row.get(k)
            clean[k] = None if v is None else _positive(v, f"{label}: key '{k}'")
        # Link figures are used per direction (a one-way copy, nccl-tests' busbw); a table
        # that states another convention would be misread, so it is refused.
        direction = row.get("link_direction")
        if direction not in (None, "per_direction"):
            raise NominalError(f"{label}: key 'link_direction': only 'per_direction' is understood, "
                               f"got {direction!r} (halve a bidirectional total)")
        clean["link_direction"] = direction
        if not all(isinstance(x, str) for x in clean["examples"]):
            raise NominalError(f"{label}: key 'examples' must be a list of strings")
        out_rows.append(clean)
    # Every example must resolve to its own row: catches a catch-all placed too early.
    for row in out_rows:
        for ex in row["examples"]:
            hit = _match_row(out_rows, ex)
            if hit is not row:
                got = hit["name"] if hit else "no row"
                raise NominalError(
                    f"{where}: row '{row['name']}': key 'examples': {ex!r} resolves to "
                    f"{got!r} (reorder rows or tighten 'match')")
    cpu = _validate_cpu(doc.get("cpu"), where)
    return {"version": doc.get("version"), "accelerators": out_rows, "cpu": cpu, "path": str(p)}


def _validate_cpu(cpu: Any, where: str) -> dict:
    if cpu is None:
        return {"rules": [], "memory_Bps": None, "link_Bps": None, "host_link_Bps": None}
    if not isinstance(cpu, dict):
        raise NominalError(f"{where}: key 'cpu' must be a mapping")
    for k in cpu:
        if k not in ("rules", *_BANDWIDTH_FIELDS):
            raise NominalError(f"{where}: cpu: unknown key '{k}'")
    out = {}
    for k in _BANDWIDTH_FIELDS:
        v = cpu.get(k)
        out[k] = None if v is None else _positive(v, f"{where}: cpu: key '{k}'")
    rules = cpu.get("rules") or []
    if not isinstance(rules, list):
        raise NominalError(f"{where}: cpu: key 'rules' must be a list")
    out_rules = []
    for i, r in enumerate(rules):
        label = f"{where}: cpu rule [{i}]"
        if not isinstance(r, dict):
            raise NominalError(f"{label}: must be a mapping")
        if isinstance(r.get("name"), str):
            label = f"{where}: cpu rule '{r['name']}'"
        for k in _RULE_REQUIRED:
            if k not in r:
                raise NominalError(f"{label}: key '{k}' missing")
        for k in r:
            if k not in _RULE_REQUIRED and k not in _RULE_OPTIONAL:
                raise NominalError(f"{label}: unknown key '{k}'")
        for k in ("name", "label", "source"):
            if not isinstance(r[k], str) or not r[k].strip():
                raise NominalError(f"{label}: key '{k}' must be a non-empty string")
        when = r["when"]
        if not isinstance(when, dict):
            raise NominalError(f"{label}: key 'when' must be a mapping")
        for k in when:
            if k not in _WHEN_KEYS:
                raise NominalError(f"{label}: key 'when.{k}': unknown condition")
        for k in ("vendor", "arch", "model_name"):
            if k in when:
                try:
                    re.compile(str(when[k]))
                except re.error as e:
                    raise NominalError(f"{label}: key 'when.{k}': bad regex ({e})") from None
        if r.get("scale") is not None and r["scale"] not in _SCALES:
            raise NominalError(f"{label}: key 'scale': must be one of {', '.join(_SCALES)}")
        dts = r["dtypes"]
        if not isinstance(dts, dict) or not dts:
            raise NominalError(f"{label}: key 'dtypes' must be a non-empty mapping")
        clean_dts = {}
        for d, spec in dts.items():
            if d not in DTYPES:
                raise NominalError(f"{label}: key 'dtypes.{d}': unknown dtype")
            alts = spec if isinstance(spec, list) else [{"flop_per_cycle": spec}]
            clean_alts = []
            for j, a in enumerate(alts):
                al = f"{label}: key 'dtypes.{d}[{j}]'"
                if not isinstance(a, dict) or "flop_per_cycle" not in a:
                    raise NominalError(f"{al}: needs 'flop_per_cycle'")
                for k in a:
                    if k not in _ALT_KEYS:
                        raise NominalError(f"{al}: unknown key '{k}'")
                models = a.get("models") or []
                if not isinstance(models, list) or any(_as_int(x) is None for x in models):
                    raise NominalError(f"{al}.models: must be a list of model numbers")
                clean_alts.append({
                    "flop_per_cycle": _positive(a["flop_per_cycle"], f"{al}.flop_per_cycle"),
                    "flags_all": [str(x) for x in a.get("flags_all") or []],
                    "flags_any": [str(x) for x in a.get("flags_any") or []],
                    "models": [_as_int(x) for x in models],
                    "via": str(a.get("via") or ""),
                })
            clean_dts[d] = clean_alts
        vbits = r.get("vector_bits")
        if vbits is not None and (isinstance(vbits, bool) or not isinstance(vbits, int) or vbits <= 0):
            raise NominalError(f"{label}: key 'vector_bits' must be a positive integer")
        out_rules.append({
            "name": r["name"], "label": r["label"], "when": dict(when), "dtypes": clean_dts,
            "source": r["source"], "note": str(r.get("note") or ""), "scale": r.get("scale"),
            "vector_bits": vbits,
        })
    out["rules"] = out_rules
    return out


def _positive(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise NominalError(f"{what}: must be a positive number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise NominalError(f"{what}: must be a positive number, got {v!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise NominalError(f"{what}: must be a positive number, got {v!r}")
    return f


def _match_row(rows: list[dict], name: str) -> dict | None:
    for row in rows:
        for rx in row["_regexes"]:
            if rx.search(name):
                return row
    return None


# ------------------------------------------------------------------------------ lookup

def _empty(device_class: str, kind: str, source: str, notes: str) -> dict:
    return {
        "device_class": device_class,
        "kind": kind,
        "source": source,
        "compute_flops": {},
        "memory_Bps": None,
        "link_Bps": None,
        "host_link_Bps": None,
        "notes": notes,
    }


def nominal_for(
    device: dict,
    cpu: dict | None = None,
    overrides: dict | None = None,
    table: dict | None = None,
) -> dict:
    """The nominal peaks of one device.

    ``device``: ``{"id": "cuda:0", "type": "cuda"|"cpu"|"tpu"|"gpu"|"mps", "name": ...}``.
    ``cpu``: for CPU devices, the plain description (vendor, family, model, model_name,
    flags, cores, max_mhz, mhz_source; optional arch, threads_per_core, sve_vector_bits).
    ``overrides``: ``{key: {field: value}}`` with key a device type, class name or id
    (applied in that order, the id last); fields: memory_Bps, link_Bps, host_link_Bps,
    compute_flops (a dtype mapping, merged) or a dtype name directly, and ``note``.

    Returns device_class, kind (datasheet | derived | override | unknown), source,
    compute_flops, memory_Bps, link_Bps, host_link_Bps and notes; plus ``row`` (table row
    name, datasheet), ``rule`` and ``flop_per_cycle`` (derived), ``base_kind`` and
    ``overridden`` (the list of overridden fields).
    """
    if not isinstance(device, dict):
        raise NominalError(f"nominal_for: device must be a mapping, got {type(device).__name__}")
    if table is None:
        table = load_table()
    dtype_ = str(device.get("type") or "").lower()
    name = str(device.get("name") or "")
    if dtype_ == "cpu":
        desc = cpu if cpu is not None else device.get("cpu")
        res = _derive_cpu(desc, name, table)
    else:
        res = _lookup(name, table)
        res = _mig_scale(res, device, table)
    res["device_id"] = device.get("id")
    return _apply_overrides(res, device, overrides)


def _lookup(name: str, table: dict) -> dict:
    if not name:
        return _empty("", "unknown", "", "device reports no class name; no table row can match")
    row = _match_row(table["accelerators"], name)
    if row is None:
        return _empty(
            name, "unknown", "",
            f"no row of {Path(table.get('path') or 'the accelerator table').name} matched "
            f"the device class name {name!r}; nominal peaks unknown (set them with overrides)")
    rx = next(r.pattern for r in row["_regexes"] if r.search(name))
    notes = f"matched row '{row['name']}' by /{rx}/; dense figures (no sparsity)"
    if row["notes"]:
        notes += f"; {row['notes']}"
    res = {
        "device_class": name,
        "kind": "datasheet",
        "source": row["source"],
        "compute_flops": dict(row["compute"]),
        "memory_Bps": row["memory_Bps"],
        "link_Bps": row["link_Bps"],
        "host_link_Bps": row["host_link_Bps"],
        "notes": notes,
        "row": row["name"],
    }
    return res


# ------------------------------------------------------------------------------ GPU partitions and links

#: a MIG device's class name ends in its profile: "... MIG 1g.10gb" (compute slices, memory GB)
_MIG_RE = re.compile(r"\bMIG\s+(\d+)g\.(\d+)gb\b", re.IGNORECASE)
#: A100/H100/H200 MIG: 7 compute (GPC) slices and 8 memory slices per GPU (NVIDIA Multi-Instance
#: GPU User Guide, "Supported MIG Profiles", docs.nvidia.com/datacenter/tesla/mig-user-guide)
MIG_COMPUTE_SLICES = 7
MIG_MEMORY_SLICES = 8


def mig_profile(device: dict) -> dict | None:
    """The MIG profile of a device, or None for a whole GPU.

    ``device``: as for nominal_for; the profile is read from the class name CUDA reports
    for a MIG device ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") or from ``device["mig"]``
    (``{"profile": "1g.10gb"}``), its SM count from ``device["extra"]["multiprocessors"]``
    (torch's multi_processor_count) or ``device["mig"]["multiprocessors"]`` (NVML
    nvmlDeviceGetAttributes). Returns ``{"profile", "compute_slices", "memory_GB", "sms"}``
    (``compute_slices``/``memory_GB`` None when the profile cannot be parsed)."""
    mig = device.get("mig") if isinstance(device.get("mig"), dict) else {}
    name = str(device.get("name") or "")
    if not mig and "MIG" not in name.upper().split():
        return None
    m = _MIG_RE.search(name) or re.fullmatch(r"\s*(\d+)g\.(\d+)gb\s*", str(mig.get("profile") or ""), re.IGNORECASE)
    sms = mig.get("multiprocessors") or (device.get("extra") or {}).get("multiprocessors")
    return {"profile": f"{m.group(1)}g.{m.group(2)}gb" if m else None,
            "compute_slices": int(m.group(1)) if m else None,
            "memory_GB": int(m.group(2)) if m else None,
            "sms": int(sms) if isinstance(sms, (int, float)) and not isinstance(sms, bool) and sms > 0 else None}


def _mig_scale(res: dict, device: dict, table: dict) -> dict:
    """A MIG slice's peaks: the whole GPU's row scaled by the slice's share, never the row.

    compute × SMs of the slice / SMs of the full part (the row's ``sms``), else × compute
    slices / 7; memory bandwidth × memory slices / 8, the slices being the profile's memory
    over one eighth of the part's (row ``memory_GB``): memory bandwidth is split with the
    memory controllers and L2 slices a GPU instance owns (MIG User Guide, "Terminology").
    No peer link (MIG devices have no P2P/NVLink); the PCIe host link is shared with the
    other slices and kept as the board's. What cannot be scaled is unknown, with the reason."""
    prof = mig_profile(device)
    if prof is None:
        return res
    res = copy.deepcopy(res)
    row = next((r for r in table["accelerators"] if r["name"] == res.get("row")), None)
    res["mig"] = prof
    res["link_Bps"] = None
    if row is None or prof["compute_slices"] is None:
        why = ("no datasheet row for the parent GPU" if row is None
               else f"MIG profile of {device.get('name')!r} not understood")
        res.update(kind="unknown", compute_flops={}, memory_Bps=None,
                   notes=f"MIG slice: {why}; peaks unknown (the whole GPU's row would overstate it)")
        return res
    if prof["sms"] and row.get("sms"):
        fc, how_c = prof["sms"] / row["sms"], f"compute × {prof['sms']}/{int(row['sms'])} SMs"
    else:
        fc = prof["compute_slices"] / MIG_COMPUTE_SLICES
        how_c = f"compute × {prof['compute_slices']}/{MIG_COMPUTE_SLICES} GPC slices (SM count unknown)"
    res["compute_flops"] = {d: v * fc for d, v in res["compute_flops"].items()}
    if row.get("memory_GB"):
        slices = max(1, min(MIG_MEMORY_SLICES, round(prof["memory_GB"] * MIG_MEMORY_SLICES / row["memory_GB"])))
        res["memory_Bps"] = row["memory_Bps"] * slices / MIG_MEMORY_SLICES
        how_m = f"memory × {slices}/{MIG_MEMORY_SLICES} slices ({prof['memory_GB']} of {row['memory_GB']:g} GB)"
    else:
        res["memory_Bps"] = None
        how_m = "memory bandwidth unknown (row gives no memory size to count slices)"
    res["kind"] = "derived"
    res["inputs"] = [f"MIG {prof['profile']} of {row['name']}", how_c, how_m]
    res["notes"] = (f"MIG {prof['profile']} of '{row['name']}': {how_c}; {how_m}; no peer link; "
                    f"host link shared with the other slices. " + res["notes"])
    return res


#: PCIe bandwidth per lane per direction in B/s by generation, as PCI-SIG quotes them
#: (x16: 4, 8, 16, 32, 64, 128 GB/s for gen 1-6); raw rates less line coding.
PCIE_LANE_Bps = {1: 0.25e9, 2: 0.5e9, 3: 1.0e9, 4: 2.0e9, 5: 4.0e9, 6: 8.0e9}


def pcie_Bps(generation, width) -> float | None:
    """Per-direction PCIe bandwidth of a link (generation 1-6, lanes), None if unknown."""
    try:
        g, w = int(generation), int(width)
    except (TypeError, ValueError):
        return None
    return PCIE_LANE_Bps[g] * w if g in PCIE_LANE_Bps and w > 0 else None


def _fv(obj, *keys):
    for k in keys:
        obj = (obj or {}).get(k) if isinstance(obj, dict) else None
    return obj.get("value") if isinstance(obj, dict) and "value" in obj else obj


def _gpu_pcie(g: dict) -> tuple[float | None, str]:
    """The GPU's own PCIe link per direction: the highest generation the device and slot
    allow (the current one drops at idle to save power) at the trained width."""
    gen = _fv(g, "pcie", "max_generation") or _fv(g, "pcie", "current_generation")
    width = _fv(g, "pcie", "current_width") or _fv(g, "pcie", "max_width")
    return pcie_Bps(gen, width), f"PCIe gen{gen} x{width}"


def pair_key(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def attach_gpu_links(nominals: dict[str, dict], nvidia: dict | None, table: dict | None = None) -> dict:
    """Give every GPU nominal the links NVML says join it to each other GPU of the run.

    ``nominals``: ``{device id: nominal}`` (changed in place and returned); ``nvidia``: the
    environment's NVML section (harness.environment.nvidia_info: ``gpus``, ``links.pairs``
    with ``nvlink_links``, ``cuda_map``). For each pair of cuda devices:
    active NVLinks between them × the row's per-link rate (``nvlink_link_Bps``, per
    direction), else their PCIe link (the slower of the two, per direction), else the
    row's ``pair_link_Bps`` (a fully connected part: AMD MI300X, one xGMI link per pair).
    A bridge the datasheet offers but NVML does not report active does not count.
    A GPU's ``host_link_Bps`` becomes the PCIe link NVML reports for it (highest generation
    the device and slot allow × trained width), the row's kept as ``host_link_Bps_row``.
    Each nominal gets ``pair_links`` (``"a|b" -> {link_Bps, via, links, source}``, the
    whole matrix) and its ``link_Bps`` becomes the figure for a collective over all the
    run's GPUs (group_link_Bps), the row's figure kept as ``link_Bps_row``.
    """
    gpus = sorted(k for k, n in nominals.items() if str(k).split(":")[0] in ("cuda", "rocm", "gpu"))
    nv = nvidia if isinstance(nvidia, dict) and nvidia.get("available") else {}
    cmap = nv.get("cuda_map") or {}
    by_index = {g.get("index"): g for g in nv.get("gpus") or []}
    for d in gpus:
        # The host link the GPU actually trained (a x16 card in a x8 slot gets half the
        # datasheet's), when NVML reports it; a user override wins.
        g = by_index.get((cmap.get(d) or {}).get("nvml_index"))
        n = nominals[d]
        fig, how = _gpu_pcie(g or {})
        if g and fig and "host_link_Bps" not in (n.get("overridden") or []) and fig != n.get("host_link_Bps"):
            n["host_link_Bps_row"] = n.get("host_link_Bps")
            n["host_link_Bps"] = fig
            n["notes"] = (n.get("notes") or "") + f"; host_link_Bps from NVML: {how} ({fig / 1e9:g} GB/s per direction)"
    if len(gpus) < 2:
        return nominals
    pair_facts = {tuple(sorted(p.get("gpus") or [])): p for p in (nv.get("links") or {}).get("pairs") or []}
    rows = {r["name"]: r for r in (table or load_table())["accelerators"]}
    matrix: dict[str, dict] = {}
    for x in range(len(gpus)):
        for y in range(x + 1, len(gpus)):
            a, b = gpus[x], gpus[y]
            na, nb = nominals[a], nominals[b]
            row = rows.get(na.get("row") or "") or {}
            entry = {"link_Bps": None, "via": None, "links": None, "source": ""}
            if na.get("mig") or nb.get("mig"):
                entry["source"] = "MIG devices have no peer link (P2P is not supported between MIG devices)"
            elif a in cmap and b in cmap:
                ia, ib = cmap[a]["nvml_index"], cmap[b]["nvml_index"]
                pf = pair_facts.get(tuple(sorted((ia, ib)))) or {}
                n = _fv(pf, "nvlink_links")
                if n and row.get("nvlink_link_Bps"):
                    entry.update(link_Bps=n * row["nvlink_link_Bps"], via="nvlink", links=n,
                                 source=f"NVML: {n} active NVLinks between NVML GPUs {ia} and {ib} × "
                                        f"{row['nvlink_link_Bps'] / 1e9:g} GB/s per link per direction ('{row['name']}')")
                elif n == 0:
                    pa, da = _gpu_pcie(by_index.get(ia) or {})
                    pb, db = _gpu_pcie(by_index.get(ib) or {})
                    figs = [v for v in (pa, pb) if v]
                    topo = _fv(pf, "topology")
                    entry.update(link_Bps=min(figs) if len(figs) == 2 else None, via="pcie", links=0,
                                 source=f"NVML: no active NVLink between NVML GPUs {ia} and {ib}; PCIe "
                                        f"({da} and {db}, per direction" + (f"; {topo}" if topo else "") + ")")
                else:
                    entry["source"] = (f"NVML: NVLink between NVML GPUs {ia} and {ib} unknown"
                                       + ("" if n is None else " (row has no per-link rate)"))
            elif row.get("pair_link_Bps"):
                entry.update(link_Bps=row["pair_link_Bps"], via="peer link", links=1,
                             source=f"'{row['name']}': one direct link per GPU pair, "
                                    f"{row['pair_link_Bps'] / 1e9:g} GB/s per direction (datasheet)")
            else:
                entry["source"] = "no NVML mapping of these devices and no per-pair figure in the row"
            matrix[pair_key(a, b)] = entry
    for d in gpus:
        n = nominals[d]
        n["pair_links"] = matrix
        n["inputs"] = list(n.get("inputs") or []) + [
            f"link to {next((x for x in k.split('|') if x != d), d)}: "
            + (f"{e['link_Bps'] / 1e9:g} GB/s per direction ({e['via']}"
               + (f", {e['links']} links" if e.get("links") else "") + ")" if e["link_Bps"] else "unknown")
            for k, e in matrix.items() if d in k.split("|")]
    for d in gpus:
        n = nominals[d]
        n["link_Bps_row"] = n.get("link_Bps")
        whole = group_link_Bps(n, gpus)
        if whole and "link_Bps" not in (n.get("overridden") or []):
            n["link_Bps"] = whole
            n["notes"] = (n.get("notes") or "") + (f"; link_Bps = a collective over the run's {len(gpus)} GPUs "
                                                  f"(slowest ring hop per NVML): {whole / 1e9:g} GB/s per direction")
    return nominals


def gpu_devices_from_env(doc: dict) -> list[dict]:
    """The GPU devices of an environment document as nominal_for takes them.

    Live: torch's cuda devices (``doc["devices"]["torch"]``: name, SMs, PCI address). A
    captured machine (no torch): NVML's GPUs through ``doc["nvidia"]["cuda_map"]`` (the
    recorded CUDA_VISIBLE_DEVICES / PCI addresses): a MIG device takes its MIG name, SM
    count and profile from NVML. GPUs NVML sees that no cuda:N maps to are left out."""
    torch_gpus = [d for d in ((doc.get("devices") or {}).get("torch") or []) if d.get("type") == "cuda"]
    if torch_gpus:
        return [dict(d) for d in torch_gpus]
    nv = doc.get("nvidia") or {}
    if not nv.get("available"):
        return []
    by_index = {g.get("index"): g for g in nv.get("gpus") or []}
    out = []
    for cid, m in (nv.get("cuda_map") or {}).items():
        if not str(cid).startswith("cuda:") or not isinstance(m, dict):
            continue
        g = by_index.get(m.get("nvml_index")) or {}
        dev = {"id": cid, "type": "cuda", "name": _fv(g.get("name")),
               "extra": {"multiprocessors": _fv(g.get("multiprocessors")), "nvml_index": m.get("nvml_index")}}
        if m.get("mig_uuid"):
            mig = next((d for d in (g.get("mig") or {}).get("devices") or []
                        if _fv(d.get("uuid")) == m["mig_uuid"]), None)
            if mig is None:
                dev["mig"] = {"profile": None}
            else:
                dev["name"] = _fv(mig.get("name")) or dev["name"]
                dev["mig"] = {"multiprocessors": _fv(mig.get("multiprocessors"))}
                dev["extra"]["multiprocessors"] = None
        out.append(dev)
    return sorted(out, key=lambda d: int(d["id"].split(":")[1]))


def gpu_nominals(doc: dict, table: dict | None = None) -> dict[str, dict]:
    """``{device id: nominal}`` for the GPUs of an environment document (what ``coherence
    env`` prints and ``run`` judges against): the datasheet row, a MIG slice scaled or
    unknown, and the pair links NVML reports (attach_gpu_links). {} without GPUs."""
    table = table or load_table()
    out = {d["id"]: nominal_for(d, table=table) for d in gpu_devices_from_env(doc)}
    return attach_gpu_links(out, doc.get("nvidia"), table)


def peer_link(nominal: dict, peer: str) -> dict | None:
    """The pair_links entry between this device (``nominal['device_id']``) and ``peer``."""
    return (nominal.get("pair_links") or {}).get(pair_key(str(nominal.get("device_id")), peer))


def group_link_Bps(nominal: dict, members: list[str]) -> float | None:
    """Per-direction link figure a collective over ``members`` is judged against (busbw).

    With a pair matrix: the slowest hop of the ring members[0] → members[1] → … → members[0]
    (a ring's busbw is bounded by its slowest link, nccl-tests' PERFORMANCE.md), except that
    on a fully connected part (row ``pair_link_Bps``: every pair one direct link) a group of
    k uses k-1 links per GPU at once. Without one: the device's ``link_Bps``."""
    links = nominal.get("pair_links") or {}
    members = list(members or [])
    if len(members) < 2 or not links:
        return nominal.get("link_Bps")
    hops = [links.get(pair_key(members[i], members[(i + 1) % len(members)])) for i in range(len(members))]
    if any(h is None or not h.get("link_Bps") for h in hops):
        return None
    if all(h.get("via") == "peer link" for h in hops):
        full = nominal.get("link_Bps_row")
        agg = hops[0]["link_Bps"] * (len(members) - 1)
        return min(agg, full) if full else agg
    return min(h["link_Bps"] for h in hops)


def tf32_judgement(device: str, dtype: str | None, extra: dict | None, nominal: dict) -> tuple[str | None, str]:
    """Whether an fp32 case on an NVIDIA GPU is judged against the TF32 peak.

    PyTorch runs fp32 matmuls and convolutions on TF32 tensor cores when
    ``torch.backends.cuda.matmul.allow_tf32`` is true or ``torch.get_float32_matmul_precision()``
    is "high"/"medium" (PyTorch docs, "TensorFloat-32 (TF32) on Ampere (and later) devices");
    the probe records both in its extra (``allow_tf32``, ``float32_matmul_precision``). Such a
    case did tensor-core work, so its fraction is against ``compute_flops["tf32"]``.
    JAX on a GPU runs fp32 dots at its DEFAULT precision as TF32 (JAX docs, "jax.default_
    matmul_precision"); its probes record the precision of their dots (``precision``) and
    pin HIGHEST for fp32, so only a dot left at DEFAULT/HIGH is judged against TF32.
    Returns ``("tf32", why)`` or ``(None, "")``."""
    extra = extra or {}
    gpu = str(device).startswith(("cuda", "jax:gpu", "gpu"))
    if dtype != "fp32" or not gpu or not (nominal.get("compute_flops") or {}).get("tf32"):
        return None, ""
    jax_prec = extra.get("precision")  # JAX probes: the lax.Precision of their dots
    if isinstance(jax_prec, str) and jax_prec and "HIGHEST" not in jax_prec.upper():
        return "tf32", f"fp32 dots ran at JAX precision {jax_prec} (TF32 on the GPU): judged against the TF32 peak"
    prec = extra.get("float32_matmul_precision")
    if extra.get("allow_tf32") or prec in ("high", "medium"):
        how = ", ".join(x for x in (f"allow_tf32={extra.get('allow_tf32')}" if "allow_tf32" in extra else "",
                                    f"float32_matmul_precision={prec}" if prec else "") if x)
        return "tf32", f"fp32 matmuls ran as TF32 ({how}): judged against the TF32 peak"
    return None, ""


# ------------------------------------------------------------------------------ CPU

def _flags(desc: dict) -> set[str]:
    fl = desc.get("flags") or []
    if isinstance(fl, str):
        fl = fl.split()
    return {str(x).lower() for x in fl}


def _as_int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        s = str(v).strip()
        return int(s, 16) if s.lower().startswith("0x") else int(s)
    except ValueError:
        return None


def _when_holds(when: dict, desc: dict, flags: set[str]) -> bool:
    for k, want in when.items():
        if k in ("vendor", "arch", "model_name"):
            have = desc.get(k)
            if have is None or not re.search(str(want), str(have), re.IGNORECASE):
                return False
        elif k == "family":
            fam = _as_int(desc.get("family"))
            wants = want if isinstance(want, list) else [want]
            if fam is None or fam not in [_as_int(w) for w in wants]:
                return False
        elif k == "models":
            mod = _as_int(desc.get("model"))
            if mod is None or mod not in [_as_int(w) for w in want]:
                return False
        elif k == "model_min":
            mod = _as_int(desc.get("model"))
            if mod is None or mod < _as_int(want):
                return False
        elif k == "model_max":
            mod = _as_int(desc.get("model"))
            if mod is None or mod > _as_int(want):
                return False
        elif k == "flags_all":
            if not all(str(f).lower() in flags for f in want):
                return False
        elif k == "flags_any":
            if not any(str(f).lower() in flags for f in want):
                return False
        elif k == "flags_none":
            if any(str(f).lower() in flags for f in want):
                return False
    return True


def _alt_holds(alt: dict, flags: set[str], desc: dict | None = None) -> bool:
    """An alternative applies when its flags are present and, if it lists ``models``, the
    CPU's model is one of them (a feature some kernels do not print, e.g. amx_fp16)."""
    if alt["flags_all"] and not all(f.lower() in flags for f in alt["flags_all"]):
        return False
    if alt["flags_any"] and not any(f.lower() in flags for f in alt["flags_any"]):
        return False
    if alt.get("models"):
        mod = _as_int((desc or {}).get("model"))
        if mod is None or mod not in alt["models"]:
            return False
    return True


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _as_cores(v: Any) -> float | None:
    """A core count: int, or a float for a fractional CPU quota (2.5 CPUs of time)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f <= 0:
        return None
    return int(f) if f == int(f) else f


def _derive_cpu(desc: dict | None, name: str, table: dict) -> dict:
    cpu_tab = table.get("cpu") or {}
    if not isinstance(desc, dict):
        return _empty(name, "unknown", "",
                      "CPU device without a CPU description (vendor, flags, cores, clock); "
                      "nominal peaks unknown")
    device_class = str(desc.get("model_name") or name or "CPU")
    flags = _flags(desc)
    rule = next((r for r in cpu_tab.get("rules", []) if _when_holds(r["when"], desc, flags)),
                None)
    mem_note = ("memory bandwidth: no reliable nominal for a CPU (VM share, unknown channel "
                "population); unknown unless overridden (overrides: cpu: memory_Bps)")

    # Cores: the description's count; SMT siblings folded into cores (they share the FMA
    # units) unless the description already counts physical cores.
    cores_raw = _as_cores(desc.get("cores"))
    tpc = _as_int(desc.get("threads_per_core")) or 1
    core_note = str(desc.get("cores_source") or "")
    cores = cores_raw
    if cores_raw and tpc > 1 and not desc.get("cores_physical"):
        cores = _as_cores(max(1, math.ceil(cores_raw / tpc)))
        core_note = f"{cores_raw} logical CPUs / {tpc} threads per core = {cores} cores"
    mhz = desc.get("max_mhz")
    try:
        mhz = float(mhz) if mhz is not None else None
    except (TypeError, ValueError):
        mhz = None
    if mhz is not None and (not math.isfinite(mhz) or mhz <= 0):
        mhz = None
    mhz_src = desc.get("mhz_source") or "unspecified"
    inputs = {"cores": cores, "cores_source": core_note or None,
              "clock_hz": mhz * 1e6 if mhz else None,
              "clock_source": mhz_src if mhz else (desc.get("mhz_source") or "clock unknown")}

    if rule is None:
        res = _empty(device_class, "unknown", "",
                     f"no CPU rule matched (vendor={desc.get('vendor')!r}, "
                     f"family={desc.get('family')!r}, {len(flags)} flags); compute unknown; "
                     + mem_note)
        return {**res, **inputs, "rule": None, "flop_per_cycle": {}, "vector_bits": None}

    # FLOP/cycle per dtype from the first applicable alternative.
    scale, scale_note = 1.0, ""
    vector_bits = rule.get("vector_bits")
    if rule["scale"] == "sve_vector_bits":
        vl = _as_int(desc.get("sve_vector_bits"))
        if vl and vl > 0:
            scale = vl / 128.0
            vector_bits = vl
            scale_note = f"SVE vector length {vl} bits (figures × {vl}/128)"
        else:
            vector_bits = 128
            scale_note = "SVE vector length not given: 128 bits assumed"
    fpc: dict[str, float] = {}
    via: dict[str, str] = {}
    for d, alts in rule["dtypes"].items():
        for a in alts:
            if _alt_holds(a, flags, desc):
                fpc[d] = a["flop_per_cycle"] * scale
                via[d] = a["via"]
                break

    base = {
        "device_class": device_class,
        "source": rule["source"],
        "memory_Bps": cpu_tab.get("memory_Bps"),
        "link_Bps": cpu_tab.get("link_Bps"),
        "host_link_Bps": cpu_tab.get("host_link_Bps"),
        "rule": rule["name"],
        "flop_per_cycle": fpc,
        "vector_bits": vector_bits,
        **inputs,
    }
    if not cores or not mhz:
        missing = " and ".join(x for x, bad in (("core count", not cores), ("clock", not mhz)) if bad)
        why = f" ({mhz_src})" if not mhz and desc.get("mhz_source") else ""
        return {
            **base, "kind": "unknown", "compute_flops": {},
            "notes": f"CPU rule '{rule['name']}' ({rule['label']}) matched but the {missing} "
                     f"is unknown{why}, so compute cannot be derived; {mem_note}",
        }

    ghz = mhz / 1000.0
    compute = {d: cores * mhz * 1e6 * v for d, v in fpc.items()}
    parts = []
    for d in DTYPES:
        if d in fpc:
            unit = "OP/cycle" if d == "int8" else "FLOP/cycle"
            parts.append(f"{d}: {_fmt_num(cores)} cores × {_fmt_num(round(ghz, 6))} GHz × "
                         f"{_fmt_num(fpc[d])} {unit} ({via[d] or rule['label']})")
    absent = [d for d in DTYPES if d not in fpc]
    notes = "; ".join(parts)
    extra = [f"rule '{rule['name']}': {rule['label']}",
             f"clock {_fmt_num(round(mhz, 3))} MHz from {mhz_src}"]
    if core_note:
        extra.append(f"cores: {core_note}")
    if scale_note:
        extra.append(scale_note)
    if absent:
        extra.append(f"no fast path on this CPU for {', '.join(absent)} (absent)")
    if rule["note"]:
        extra.append(rule["note"].rstrip("."))
    extra.append(mem_note)
    return {**base, "kind": "derived", "compute_flops": compute,
            "notes": notes + "; " + "; ".join(extra)}


# ------------------------------------------------------------------------------ CPU from env

def _env_fact(env: dict, *path: str) -> dict:
    node: Any = env
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and "value" in node:
        return node
    return {"value": None if isinstance(node, dict) and not node else node, "source": ""}


def _env_value(env: dict, *path: str) -> Any:
    return _env_fact(env, *path).get("value")


def cpu_description(env: dict, *, live: bool) -> dict:
    """The plain CPU description :func:`nominal_for` derives a peak from, built from an
    environment document (``harness.environment.collect()``; older documents load too).

    ``cores``: physical cores of the affinity set (``cpu.usable_physical_cores``; else the
    machine's physical cores, or logical CPUs / threads per core), capped by the cgroup CPU
    quota ``cpu.cgroup_cpu_limit_cores`` (the smallest up the hierarchy; a fractional quota
    gives fractional cores: 2.5 CPUs of time are 2.5 cores' worth of FMA issue).
    ``max_mhz``: cpufreq ``cpuinfo_max_freq`` wins; else the clock measured once per boot
    (``cpu.frequency.measured_mhz``, harness.cpuclock); else, only when ``live``, measured
    now (and kept for the boot); else None with the reason in ``mhz_source`` (the peak is
    then unknown: the TSC/base rate in "cpu MHz" is never used as a guess).
    ``flags``: the raw /proc/cpuinfo ``flags`` (x86) or ``Features`` (arm64) names.
    """
    if not isinstance(env, dict):
        env = {}
    logical = _env_value(env, "cpu", "logical_cores")
    physical = _env_value(env, "cpu", "physical_cores")
    usable = _env_value(env, "cpu", "usable_cores")
    phys_aff = _env_value(env, "cpu", "usable_physical_cores")
    tpc = max(1, round(logical / physical)) if logical and physical else 1
    if phys_aff:
        cores, src = phys_aff, f"{phys_aff} physical cores in the affinity set"
    elif usable and logical and physical:
        cores = max(1, math.ceil(usable * physical / logical))
        src = f"{usable} usable logical CPUs × {physical}/{logical} physical/logical = {cores} cores"
    elif physical:
        cores, src = physical, f"{physical} physical cores (affinity set unknown)"
    elif usable or logical:
        n = usable or logical
        cores, src = n, f"{n} logical CPUs (no core topology; SMT siblings not folded)"
    else:
        cores, src = None, "core count unknown"
    limit = _as_cores(_env_value(env, "cpu", "cgroup_cpu_limit_cores"))
    if cores and limit and limit < cores:
        src += f", capped by the cgroup CPU quota {limit:g} ({_env_fact(env, 'cpu', 'cgroup_cpu_limit_cores').get('source') or 'cgroup'})"
        cores = limit

    max_mhz = _env_value(env, "cpu", "frequency", "max_mhz")
    mhz_source = _env_fact(env, "cpu", "frequency", "max_mhz").get("source") or "cpu.frequency.max_mhz"
    if not max_mhz:
        why = [mhz_source] if _env_fact(env, "cpu", "frequency", "max_mhz").get("source") else []
        measured = _env_fact(env, "cpu", "frequency", "measured_mhz")
        max_mhz, mhz_source = measured.get("value"), measured.get("source") or ""
        if not max_mhz:
            if measured.get("source"):
                why.append(measured["source"])
            if live:
                from harness import cpuclock
                hz, how = cpuclock.clock_hz("/", live=True)
                max_mhz, mhz_source = (hz / 1e6 if hz else None), how
                if not hz:
                    why.append(how)
            if not max_mhz:
                mhz_source = "clock unknown: " + ("; ".join(why) or "no cpufreq maximum, no measured clock")
    flags = _env_value(env, "cpu", "flags")
    if not isinstance(flags, list):  # documents written before the raw flags were kept
        isa = _env_value(env, "cpu", "isa") or {}
        flags = [k for k, v in isa.items() if v] if isinstance(isa, dict) else []
    return {
        "vendor": _env_value(env, "cpu", "vendor"),
        "family": _env_value(env, "cpu", "family"),
        "model": _env_value(env, "cpu", "model"),
        "model_name": _env_value(env, "cpu", "model_name"),
        "arch": _env_value(env, "cpu", "arch") or _env_value(env, "os", "arch"),
        "flags": flags,
        "sve_vector_bits": _env_value(env, "cpu", "sve_vector_bits"),
        "cores": _as_cores(cores),
        "cores_physical": True,
        "cores_source": src,
        "threads_per_core": tpc,
        "max_mhz": max_mhz,
        "mhz_source": mhz_source,
    }


def cpu_nominal(env_doc: dict, *, live: bool, device: dict | None = None,
                overrides: dict | None = None, table: dict | None = None) -> dict:
    """The CPU's nominal peaks with the inputs they were derived from.

    ``env_doc``: an environment document (``harness.environment.collect()``, live or from a
    ``--sysroot``). ``live``: may the clock be measured now when the document has none
    (False for a captured machine: never measure, the clock is then unknown).
    ``device``: the runner's CPU device (default ``{"id": "cpu:0", "type": "cpu"}``);
    ``overrides``: as for :func:`nominal_for`.

    Returns the :func:`nominal_for` dict (kind, source, compute_flops in FLOP/s per dtype,
    memory_Bps, notes, ...) with the inputs: ``rule`` (configs/accelerators.yaml cpu rule
    name, or None), ``cores`` (physical cores in the affinity set capped by the CPU quota),
    ``clock_hz`` and ``clock_source``, ``flop_per_cycle`` {dtype: FLOP per cycle per core},
    ``vector_bits`` (FMA datapath width the rule assumes; the SVE length on SVE rules).
    compute_flops = cores × clock_hz × flop_per_cycle. Never raises on a bad document
    (unknowns are said in ``notes``); raises :class:`NominalError` on bad overrides.
    """
    desc = cpu_description(env_doc, live=live)
    dev = dict(device or {"id": "cpu:0", "type": "cpu"})
    dev.setdefault("type", "cpu")
    dev.setdefault("name", desc.get("model_name") or "cpu")
    return nominal_for(dev, cpu=desc, overrides=overrides, table=table)


# ------------------------------------------------------------------------------ overrides

def _apply_overrides(res: dict, device: dict, overrides: dict | None) -> dict:
    res = copy.deepcopy(res)
    res.setdefault("row", None)
    res["base_kind"] = res["kind"]
    res["overridden"] = []
    if not overrides:
        return res
    if not isinstance(overrides, dict):
        raise NominalError(f"overrides must be a mapping of device id/type to fields, "
                           f"got {type(overrides).__name__}")
    keys = []
    for k in (device.get("type"), device.get("name"), device.get("id")):
        if k and k in overrides and k not in keys:
            keys.append(k)
    applied: list[str] = []
    user_notes: list[str] = []
    for k in keys:
        ov = overrides[k]
        if not isinstance(ov, dict):
            raise NominalError(f"overrides.{k}: must be a mapping of field to value")
        for field, val in ov.items():
            where = f"overrides.{k}.{field}"
            if field not in _OVERRIDE_KEYS:
                raise NominalError(f"{where}: unknown field (known: compute_flops, "
                                   f"{', '.join(_BANDWIDTH_FIELDS)}, note, or a dtype name)")
            if field == "note":
                user_notes.append(str(val))
            elif field == "compute_flops":
                if not isinstance(val, dict):
                    raise NominalError(f"{where}: must be a mapping of dtype to FLOP/s")
                for d, v in val.items():
                    if d not in DTYPES:
                        raise NominalError(f"{where}.{d}: unknown dtype "
                                           f"(known: {', '.join(DTYPES)})")
                    _set_compute(res, d, v, f"{where}.{d}")
                    applied.append(f"compute_flops.{d}")
            elif field in DTYPES:
                _set_compute(res, field, val, where)
                applied.append(f"compute_flops.{field}")
            else:
                res[field] = None if val is None else _positive(val, where)
                applied.append(field)
    if not applied and not user_notes:
        return res
    uniq = list(dict.fromkeys(applied))
    res["overridden"] = uniq
    if uniq:
        res["kind"] = "override"
        via = ", ".join(f"'{k}'" for k in keys)
        res["notes"] = (f"user override of {', '.join(uniq)} (overrides {via}); "
                        f"other fields {res['base_kind']}: " + res["notes"])
        res["source"] = ("user override" + (f" over {res['source']}" if res["source"] else ""))
    if user_notes:
        res["notes"] += "; user note: " + "; ".join(user_notes)
    return res


def _set_compute(res: dict, dtype: str, val: Any, where: str) -> None:
    if val is None:
        res["compute_flops"].pop(dtype, None)
    else:
        res["compute_flops"][dtype] = _positive(val, where)


# ------------------------------------------------------------------------------ roofline

def ridge(nominal: dict, dtype: str | None) -> float | None:
    """Ridge point (FLOP per byte) = nominal compute of ``dtype`` / nominal memory B/s."""
    if not nominal or not dtype:
        return None
    c = (nominal.get("compute_flops") or {}).get(dtype)
    m = nominal.get("memory_Bps")
    if not c or not m or c <= 0 or m <= 0:
        return None
    return float(c) / float(m)


def bound_for(
    flops: float,
    bytes_: float,
    nominal: dict,
    dtype: str | None,
    hint: str | None = None,
) -> str:
    """Which resource bounds a case: ``compute`` | ``memory`` | ``link`` | ``latency``.

    No work at all → latency. A probe that declares ``hint="link"`` moves its bytes over a
    link (transfer, collective), so it is link-bound whatever its intensity. Otherwise no
    FLOPs → memory; with a known ridge the arithmetic intensity decides (intensity ≥ ridge →
    compute); without one the hint, else compute.
    """
    flops = float(flops or 0)
    bytes_ = float(bytes_ or 0)
    if flops == 0 and bytes_ == 0:
        return "latency"
    if hint == "link":
        return "link"
    if flops == 0:
        return "memory"
    r = ridge(nominal, dtype)
    if r is not None:
        if bytes_ == 0:
            return "compute"
        return "compute" if flops / bytes_ >= r else "memory"
    return hint if hint else "compute"


def roofline_fraction(
    bound: str,
    flops_per_s: float | None,
    bytes_per_s: float | None,
    nominal: dict,
    dtype: str | None,
    link: bool | str = False,
) -> float | None:
    """Achieved / nominal of the bounding resource, or None where either is unknown.

    compute → flops_per_s / compute_flops[dtype]; memory → bytes_per_s / memory_Bps;
    link → bytes_per_s / link_Bps. ``link=True`` judges a memory-bound case's bytes against
    the device link instead of memory (the bytes crossed a link); ``link="host"`` judges
    memory/link-bound bytes against host_link_Bps (PCIe host↔device copies); ``link="cuda:1"``
    (a peer device id) judges them against the pair link to that device (``pair_links``,
    attach_gpu_links), unknown (None) where the pair's link is unknown.
    """
    if not nominal or bound == "latency":
        return None
    if bound == "compute":
        if not dtype or flops_per_s is None:
            return None
        peak = (nominal.get("compute_flops") or {}).get(dtype)
        achieved = flops_per_s
    elif bound in ("memory", "link"):
        if bytes_per_s is None:
            return None
        if link == "host":
            peak = nominal.get("host_link_Bps")
        elif isinstance(link, str) and ":" in link:
            # A point-to-point case names its peer: judged against that one pair's link
            # (NVML's NVLinks or PCIe between the two; MI300X: one xGMI link), per direction.
            pair = peer_link(nominal, link)
            peak = pair.get("link_Bps") if pair else None
        elif bound == "link" or link:
            peak = nominal.get("link_Bps")
        else:
            peak = nominal.get("memory_Bps")
        achieved = bytes_per_s
    else:
        return None
    if not peak or peak <= 0:
        return None
    return float(achieved) / float(peak)
