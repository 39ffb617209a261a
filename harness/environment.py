"""Environment fingerprint: what this run ran on, and how each fact was found.

``collect()`` returns the JSON document written into every run's manifest and printed by
``coherence env --json``. Every leaf fact is ``{"value": ..., "source": "..."}`` (see
:func:`fact`); where a fact cannot be read its value is None and the source says why.
Sections that depend on an optional component (a framework, NVML) carry a plain
``available`` bool and, when False, a ``reason`` string.

``torch_devices()`` and ``jax_devices()`` list the execution devices the runner can use.

torch, jax and pynvml are imported lazily inside functions, never at module import, so
``coherence --help`` stays fast and works where they are missing. Nothing here raises.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import sys
from typing import Any

from harness.virtualization import HostView, Runner, detect, order_layers, summarize, _Layers

ANON_SALT_ENV = "COHERENCE_ANON_SALT"
_DEFAULT_SALT = "coherence-anon-v1"


def fact(value: Any, source: str) -> dict:
    """One observed fact and how it was observed (a file and field, an API call)."""
    return {"value": value, "source": source}


def is_fact(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"value", "source"}


def _unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason}


def _safe(fn, *args, default=None, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - discovery must never raise
        return default if default is not None else _unavailable(f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- parsing helpers

def _parse_cpuinfo(text: str) -> list[dict]:
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, val = line.partition(":")
        if sep:
            cur.setdefault(key.strip(), val.strip())
    if cur:
        blocks.append(cur)
    return blocks


def _parse_size(text: str | None) -> int | None:
    """'32K' -> 32768, '2M', '1024 kB', '12345' -> bytes."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text.strip(), re.IGNORECASE)
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


def _parse_cpulist(text: str | None) -> list[int]:
    out: list[int] = []
    for part in (text or "").strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _meminfo(view: HostView) -> dict[str, int]:
    text = view.text("/proc/meminfo") or ""
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        parts = val.split()
        if parts and parts[0].isdigit():
            n = int(parts[0])
            out[key.strip()] = n * 1024 if len(parts) > 1 and parts[1].lower() == "kb" else n
    return out


def _cpu_dirs(view: HostView) -> list[str]:
    names = view.listdir("/sys/devices/system/cpu") or []
    return sorted((n for n in names if re.fullmatch(r"cpu\d+", n)), key=lambda n: int(n[3:]))


# ----------------------------------------------------------------------------- cpu

ARM_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu", "0x48": "HiSilicon",
    "0x4e": "NVIDIA", "0x50": "APM", "0x51": "Qualcomm", "0x61": "Apple", "0x6d": "Microsoft",
    "0xc0": "Ampere",
}
ARM_PARTS = {
    ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2", ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd84"): "Neoverse-V3", ("0x41", "0xd8e"): "Neoverse-N3",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd03"): "Cortex-A53",
    ("0xc0", "0xac3"): "AmpereOne", ("0x48", "0xd01"): "Kunpeng-920",
}
X86_ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
           "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
ARM_ISA = {"neon": ("asimd", "neon"), "asimd_fp16": ("asimdhp",), "sve": ("sve",), "sve2": ("sve2",),
           "bf16": ("bf16",), "i8mm": ("i8mm",), "sme": ("sme",)}


def _cpu_identity(view: HostView) -> dict:
    text, why = view.read("/proc/cpuinfo")
    if text is None:
        model = None
        src = why
        if view.live:
            model = platform.processor() or None
            src = "platform.processor()" if model else why
        return {"blocks": [], "vendor": fact(None, why), "model_name": fact(model, src),
                "family": fact(None, why), "model": fact(None, why), "stepping": fact(None, why),
                "arch_family": None}
    blocks = _parse_cpuinfo(text)
    cpu0 = next((b for b in blocks if "processor" in b or "model name" in b or "CPU implementer" in b),
                blocks[0] if blocks else {})
    if "CPU implementer" in cpu0:  # arm64
        impl = cpu0.get("CPU implementer", "").lower()
        part = cpu0.get("CPU part", "").lower()
        vendor = ARM_IMPLEMENTERS.get(impl, impl or None)
        if "model name" in cpu0:
            name, nsrc = cpu0["model name"], "/proc/cpuinfo model name"
        else:
            core = ARM_PARTS.get((impl, part))
            name = f"{vendor} {core}" if core else f"{vendor} part {part}"
            nsrc = "/proc/cpuinfo CPU implementer/CPU part (lookup table)"
        return {"blocks": blocks, "arch_family": "arm",
                "vendor": fact(vendor, "/proc/cpuinfo CPU implementer"),
                "model_name": fact(name, nsrc),
                "family": fact(cpu0.get("CPU architecture"), "/proc/cpuinfo CPU architecture"),
                "model": fact(part or None, "/proc/cpuinfo CPU part"),
                "stepping": fact(cpu0.get("CPU revision"), "/proc/cpuinfo CPU revision")}

    def num(key):
        v = cpu0.get(key)
        if v is None:
            return fact(None, f"/proc/cpuinfo has no '{key}' field")
        return fact(int(v) if v.isdigit() else v, f"/proc/cpuinfo {key}")

    vendor = cpu0.get("vendor_id")
    name = cpu0.get("model name") or cpu0.get("cpu") or cpu0.get("uarch")
    return {"blocks": blocks, "arch_family": "x86" if "flags" in cpu0 else None,
            "vendor": fact(vendor, "/proc/cpuinfo vendor_id" if vendor else "/proc/cpuinfo has no vendor_id"),
            "model_name": fact(name, "/proc/cpuinfo model name" if name else "/proc/cpuinfo has no model name"),
            "family": num("cpu family"), "model": num("model"), "stepping": num("stepping")}


def cpu_model_name(view: HostView | None = None) -> str:
    view = view or HostView()
    name = _cpu_identity(view)["model_name"]["value"]
    return name or platform.processor() or platform.machine() or "cpu"


def _cpu_topology(view: HostView, blocks: list[dict]) -> dict:
    out: dict[str, dict] = {}
    # Logical cores.
    n_proc = sum(1 for b in blocks if "processor" in b)
    if n_proc:
        out["logical_cores"] = fact(n_proc, "/proc/cpuinfo processor entries")
    elif view.live and os.cpu_count():
        out["logical_cores"] = fact(os.cpu_count(), "os.cpu_count()")
    else:
        online = view.first_line("/sys/devices/system/cpu/online")
        out["logical_cores"] = (fact(len(_parse_cpulist(online)), "/sys/devices/system/cpu/online")
                                if online else fact(None, "/proc/cpuinfo and /sys/devices/system/cpu/online unreadable"))
    # The affinity set: the logical CPUs this process may run on (taskset, cpuset cgroup).
    allowed: list[int] | None = None
    if view.live and hasattr(os, "sched_getaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        out["usable_cores"] = fact(len(allowed), "os.sched_getaffinity(0)")
    else:
        status = view.text("/proc/self/status") or ""
        m = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
        allowed = _safe_cpulist(m.group(1)) if m else None
        # The raw mask may also hold possible-but-offline CPUs (the kernel reports the
        # mask as set); sched_getaffinity would leave those out, so do the same here.
        online = _safe_cpulist(view.first_line("/sys/devices/system/cpu/online"))
        if allowed and online and set(allowed) & set(online):
            allowed = sorted(set(allowed) & set(online))
        out["usable_cores"] = (fact(len(allowed), "/proc/self/status Cpus_allowed_list") if allowed
                               else fact(None, "no Cpus_allowed_list in /proc/self/status (non-live root)"))

    # Physical cores and sockets: sysfs topology, then cpuinfo ids, then psutil.
    pairs, pkgs = set(), set()
    core_of: dict[int, tuple[str, str]] = {}
    for cpu in _cpu_dirs(view):
        pkg = view.first_line(f"/sys/devices/system/cpu/{cpu}/topology/physical_package_id")
        core = view.first_line(f"/sys/devices/system/cpu/{cpu}/topology/core_id")
        if pkg is None or core is None:
            continue
        pairs.add((pkg, core))
        pkgs.add(pkg)
        core_of[int(cpu[3:])] = (pkg, core)
    if not core_of:
        core_of = {int(b["processor"]): (b.get("physical id"), b["core id"]) for b in blocks
                   if "core id" in b and str(b.get("processor", "")).isdigit()}
    out["usable_physical_cores"] = _usable_physical(allowed, core_of)
    if pairs:
        src = "/sys/devices/system/cpu/cpu*/topology/{physical_package_id,core_id}"
        out["physical_cores"] = fact(len(pairs), src)
        out["sockets"] = fact(len(pkgs), "/sys/devices/system/cpu/cpu*/topology/physical_package_id")
    else:
        ids = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
        if ids:
            out["physical_cores"] = fact(len(ids), "/proc/cpuinfo physical id/core id")
            out["sockets"] = fact(len({p for p, _ in ids}), "/proc/cpuinfo physical id")
        else:
            pc = None
            if view.live:
                try:
                    import psutil
                    pc = psutil.cpu_count(logical=False)
                except Exception:  # noqa: BLE001
                    pc = None
            out["physical_cores"] = (fact(pc, "psutil.cpu_count(logical=False)") if pc
                                     else fact(None, "no sysfs topology, no cpuinfo core ids"))
            out["sockets"] = fact(None, "no sysfs topology, no cpuinfo physical ids")

    # NUMA.
    nodes = [n for n in (view.listdir("/sys/devices/system/node") or []) if re.fullmatch(r"node\d+", n)]
    if nodes:
        out["numa_nodes"] = fact(len(nodes), "/sys/devices/system/node/node*")
        out["numa_cpus"] = fact({n: view.first_line(f"/sys/devices/system/node/{n}/cpulist") for n in nodes},
                                "/sys/devices/system/node/node*/cpulist")
    else:
        why = "/sys/devices/system/node absent (kernel without NUMA support?)"
        out["numa_nodes"] = fact(None, why)
        out["numa_cpus"] = fact(None, why)
    return out


def _safe_cpulist(text: str | None, limit: int = 1 << 16) -> list[int] | None:
    """A cpulist ("0-3,8-11") from a possibly damaged file: None if unparseable or absurd
    (more than ``limit`` CPUs), so one bad file does not lose the whole topology."""
    if not text or not re.fullmatch(r"[\d,\-\s]+", text):
        return None
    try:
        spans = [p.split("-", 1) if "-" in p else [p, p] for p in text.strip().split(",") if p.strip()]
        if sum(int(b) - int(a) + 1 for a, b in spans) > limit:
            return None
        return _parse_cpulist(text)
    except ValueError:
        return None


def _usable_physical(allowed: list[int] | None, core_of: dict[int, tuple]) -> dict:
    """Physical cores behind the affinity set: distinct (package, core) pairs of the
    allowed logical CPUs. SMT siblings share one core's FMA units, so two allowed
    siblings count once (the compute a process can reach)."""
    if not allowed:
        return fact(None, "affinity set unknown")
    if not core_of:
        return fact(None, "no core topology (sysfs topology or cpuinfo core id) to fold SMT siblings")
    known = [c for c in allowed if c in core_of]
    if not known:
        return fact(None, "no allowed CPU has a core topology")
    src = "distinct (physical_package_id, core_id) of the affinity set's CPUs"
    if len(known) < len(allowed):  # offline or topology-less CPUs in the mask: not usable
        src += f" ({len(allowed) - len(known)} allowed CPU(s) without topology left out)"
    return fact(len({core_of[c] for c in known}), src)


def _isa(arch_family: str | None, blocks: list[dict]) -> dict:
    cpu0 = blocks[0] if blocks else {}
    if arch_family == "x86":
        flags = set(cpu0.get("flags", "").split())
        return fact({f: f in flags for f in X86_ISA}, "/proc/cpuinfo flags")
    if arch_family == "arm":
        feats = set(cpu0.get("Features", "").split())
        return fact({k: any(n in feats for n in names) for k, names in ARM_ISA.items()},
                    "/proc/cpuinfo Features")
    return fact(None, "no x86 flags or arm Features line in /proc/cpuinfo")


def _cpu_arch(view: HostView, arch_family: str | None) -> dict:
    """Machine architecture (uname -m style): /proc/sys/kernel/arch, else what cpuinfo shows
    (a ``flags`` line: x86_64; ``CPU implementer`` with ``CPU architecture: 8``: aarch64)."""
    arch = view.first_line("/proc/sys/kernel/arch")
    if arch:
        return fact(arch, "/proc/sys/kernel/arch")
    if view.live:
        return fact(platform.machine() or None, "platform.machine()")
    if arch_family == "x86":
        return fact("x86_64", "/proc/cpuinfo has x86 flags (64-bit assumed: 32-bit x86 is out of scope)")
    if arch_family == "arm":
        return fact("aarch64", "/proc/cpuinfo has CPU implementer (arm64 kernel)")
    return fact(None, "no /proc/sys/kernel/arch and /proc/cpuinfo does not tell")


def _cpu_flags(arch_family: str | None, blocks: list[dict]) -> dict:
    """Every ISA flag the kernel prints for cpu0, as printed (sorted, lower case): the
    ``flags`` line on x86, the ``Features`` line on arm64 (asimd, asimdhp, sve, sve2, bf16,
    i8mm, ...; Linux Documentation/arch/arm64/elf_hwcaps.rst). The CPU peak rules in
    configs/accelerators.yaml match these exact names, so nothing is renamed here."""
    cpu0 = next((b for b in blocks if "flags" in b or "Features" in b), {})
    key = "Features" if arch_family == "arm" or "Features" in cpu0 else "flags"
    if key not in cpu0:
        return fact(None, "no x86 flags or arm Features line in /proc/cpuinfo")
    return fact(sorted({f.lower() for f in cpu0[key].split()}), f"/proc/cpuinfo {key} (cpu0)")


SVE_VL_PATH = "/proc/sys/abi/sve_default_vector_length"


def _sve_vector_bits(view: HostView, flags: list[str] | None) -> dict:
    """SVE vector length in bits, from /proc/sys/abi/sve_default_vector_length (bytes).

    That file holds the *default* length given to new processes (Linux
    Documentation/arch/arm64/sve.rst); an administrator may set it below the hardware
    maximum, and a process may raise its own with prctl(PR_SVE_SET_VL). It is what
    code compiled for "scalable" vectors gets, so it is what the peak is derived from; on
    the cores we know (Neoverse V1: 256, V2: 128) default and maximum agree unless lowered."""
    if not flags or "sve" not in flags:
        return fact(None, "no sve in /proc/cpuinfo Features")
    val = view.first_line(SVE_VL_PATH)
    if val is None:
        return fact(None, f"{SVE_VL_PATH} unreadable (SVE present; vector length unknown)")
    try:
        nbytes = int(val)
    except ValueError:
        return fact(None, f"{SVE_VL_PATH} unparseable: {val[:40]!r}")
    if nbytes <= 0 or nbytes % 16 or nbytes > 256:  # architectural: 128..2048 bits in 128-bit steps
        return fact(None, f"{SVE_VL_PATH} = {nbytes} bytes is not a valid SVE vector length")
    return fact(nbytes * 8, f"{SVE_VL_PATH} ({nbytes} bytes; the default length, may be below the maximum)")


def _caches(view: HostView) -> tuple[dict, dict]:
    """({"L1d": {"size_bytes", "instances", "total_bytes"}, ...}, last_level_cache_bytes fact)."""
    seen: dict[str, dict] = {}
    src = "/sys/devices/system/cpu/cpu*/cache/index*"
    for cpu in _cpu_dirs(view):
        base = f"/sys/devices/system/cpu/{cpu}/cache"
        for idx in view.listdir(base) or []:
            if not idx.startswith("index"):
                continue
            level = view.first_line(f"{base}/{idx}/level")
            ctype = view.first_line(f"{base}/{idx}/type") or ""
            size = _parse_size(view.first_line(f"{base}/{idx}/size"))
            shared = view.first_line(f"{base}/{idx}/shared_cpu_list") or cpu
            if not level or size is None:
                continue
            name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(ctype, "")
            entry = seen.setdefault(name, {"level": int(level), "size": size, "instances": set()})
            entry["instances"].add(shared)
    caches: dict[str, dict] = {}
    for name in sorted(seen, key=lambda n: (seen[n]["level"], n)):
        e = seen[name]
        caches[name] = {
            "size_bytes": fact(e["size"], f"{src}/size (per instance)"),
            "instances": fact(len(e["instances"]), f"{src}/shared_cpu_list (distinct sets)"),
            "total_bytes": fact(e["size"] * len(e["instances"]), "size_bytes x instances"),
        }
    if seen:
        top = max(seen.values(), key=lambda e: e["level"])
        llc_name = [n for n, e in seen.items() if e is top][0]
        llc = fact(top["size"] * len(top["instances"]), f"{llc_name} size x instances ({src})")
        return caches, llc
    if view.live and hasattr(os, "sysconf"):
        for level, key in ((3, "SC_LEVEL3_CACHE_SIZE"), (2, "SC_LEVEL2_CACHE_SIZE")):
            try:
                val = os.sysconf(key)
            except (ValueError, OSError):
                val = 0
            if val and val > 0:
                caches[f"L{level}"] = {"size_bytes": fact(val, f"os.sysconf({key})"),
                                       "instances": fact(None, "unknown without sysfs cache topology"),
                                       "total_bytes": fact(None, "unknown without sysfs cache topology")}
                return caches, fact(val, f"os.sysconf({key}) (one instance; count unknown)")
    return caches, fact(None, f"{src} absent")


def _frequency(view: HostView, blocks: list[dict], model_name: str | None) -> dict:
    out: dict[str, dict] = {}
    cf = "/sys/devices/system/cpu/cpu0/cpufreq"
    cur = view.first_line(f"{cf}/scaling_cur_freq")
    mx = view.first_line(f"{cf}/cpuinfo_max_freq")
    psu = None
    if view.live:
        try:
            import psutil
            psu = psutil.cpu_freq()
        except Exception:  # noqa: BLE001
            psu = None
    if cur and cur.isdigit():
        out["current_mhz"] = fact(int(cur) / 1000.0, f"{cf}/scaling_cur_freq")
    else:
        mhz = [float(b["cpu MHz"]) for b in blocks if b.get("cpu MHz", "").replace(".", "", 1).isdigit()]
        if mhz:
            out["current_mhz"] = fact(round(sum(mhz) / len(mhz), 3), "/proc/cpuinfo cpu MHz (mean over cpus)")
        elif psu and psu.current:
            out["current_mhz"] = fact(float(psu.current), "psutil.cpu_freq().current")
        else:
            out["current_mhz"] = fact(None, f"no {cf}, no cpu MHz in /proc/cpuinfo, psutil has none")
    if mx and mx.isdigit():
        out["max_mhz"] = fact(int(mx) / 1000.0, f"{cf}/cpuinfo_max_freq")
    elif psu and psu.max:
        out["max_mhz"] = fact(float(psu.max), "psutil.cpu_freq().max")
    else:
        out["max_mhz"] = fact(None, f"no {cf}/cpuinfo_max_freq (no cpufreq driver; common in VMs)"
                              + ("; psutil.cpu_freq().max is 0" if psu is not None else ""))
    out["measured_mhz"] = _measured_clock(view, mx)
    m = re.search(r"@\s*([\d.]+)\s*GHz", model_name or "")
    out["nominal_mhz"] = (fact(float(m.group(1)) * 1000.0, "/proc/cpuinfo model name '@ x.xxGHz'") if m
                          else fact(None, "model name has no '@ x.xxGHz' suffix"))
    gov = view.first_line(f"{cf}/scaling_governor")
    out["governor"] = fact(gov, f"{cf}/scaling_governor") if gov else fact(None, f"{cf}/scaling_governor absent")
    return out


def _measured_clock(view: HostView, cpufreq_max: str | None) -> dict:
    """The core clock measured once per boot (harness.cpuclock), in MHz, where cpufreq
    gives no maximum. Live: the per-boot cache, measured and written on first use.
    Captured root: the cache copied into the snapshot, never a measurement."""
    if cpufreq_max and cpufreq_max.isdigit():
        return fact(None, "not needed: cpufreq cpuinfo_max_freq is given")
    from harness import cpuclock

    hz, how = cpuclock.clock_hz(view.root, live=view.live, environ=view.env)
    return fact(round(hz / 1e6, 3) if hz else None, how)


def _cgroup_entries(view: HostView) -> dict[str, str]:
    """controller -> cgroup path (v2 unified hierarchy under key '')."""
    out = {}
    for line in (view.text("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctl in parts[1].split(",") if parts[1] else [""]:
                out[ctl] = parts[2]
    return out


def _cgroup_dirs(view: HostView, ctl: str) -> tuple[str, list[str]]:
    """("v2"|"v1"|"", [cgroup directories from the process's leaf up to the hierarchy root]).

    Limits are enforced at every level of the hierarchy, so the one in force is the
    smallest along this path (Linux Documentation/admin-guide/cgroup-v2.rst, "Top-down
    constraint"); a Kubernetes pod's quota sits on the pod's cgroup, a parent of the
    container's leaf. Directories that do not exist under the root are left out (a
    cgroup namespace shows the container's own cgroup as "/")."""
    ent = _cgroup_entries(view)

    def walk(mount: str, rel: str) -> list[str]:
        parts = [x for x in rel.strip("/").split("/") if x and x != ".."]
        out = []
        for i in range(len(parts), -1, -1):
            d = os.path.join(mount, *parts[:i]) if i else mount
            if view.isdir(d):
                out.append(d)
        return out

    if "" in ent and view.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2", walk("/sys/fs/cgroup", ent[""])
    if ctl in ent:
        mounts = [f"/sys/fs/cgroup/{ctl}"] + (["/sys/fs/cgroup/cpu,cpuacct"] if ctl == "cpu" else [])
        for mount in mounts:
            dirs = walk(mount, ent[ctl])
            if dirs:
                return "v1", dirs
    if "" in ent:  # v2 without cgroup.controllers visible (minimal snapshots): still walk
        dirs = walk("/sys/fs/cgroup", ent[""])
        if dirs:
            return "v2", dirs
    return "", []


def _cgroup_cpu_limit(view: HostView) -> dict:
    """CPU quota in cores (quota / period), the smallest over the cgroup hierarchy.

    v2: ``cpu.max`` = "<quota|max> <period>"; v1: ``cpu.cfs_quota_us`` (-1 = none) over
    ``cpu.cfs_period_us`` (kernel docs: cgroup-v2.rst "cpu.max", cgroup-v1 sched-bwc.rst).
    Returns a fact; value None when no level limits the CPU, with the levels read."""
    version, dirs = _cgroup_dirs(view, "cpu")
    if not dirs:
        return fact(None, "no cgroup cpu hierarchy found under /sys/fs/cgroup (no limit known)")
    best, best_src, read, bad = None, None, [], []
    for d in dirs:
        if version == "v2":
            val = view.first_line(f"{d}/cpu.max")
            if not val:
                continue
            read.append(f"{d}/cpu.max")
            quota, _, period = val.partition(" ")
            if quota == "max":
                continue
            try:
                cores = int(quota) / int(period or 100000)
            except (ValueError, ZeroDivisionError):
                bad.append(f"{d}/cpu.max unparseable: {val[:40]}")
                continue
            src = f"{d}/cpu.max ({quota}/{period or 100000})"
        else:
            val = view.first_line(f"{d}/cpu.cfs_quota_us")
            if not val:
                continue
            read.append(f"{d}/cpu.cfs_quota_us")
            if val.strip() == "-1":
                continue
            per = view.first_line(f"{d}/cpu.cfs_period_us") or "100000"
            try:
                cores = int(val) / int(per)
            except (ValueError, ZeroDivisionError):
                bad.append(f"{d}/cpu.cfs_quota_us unparseable: {val[:40]}")
                continue
            src = f"{d}/cpu.cfs_quota_us / cpu.cfs_period_us ({val}/{per})"
        if cores > 0 and (best is None or cores < best):
            best, best_src = cores, src
    if best is not None:
        others = len(read) - 1
        return fact(round(best, 3), f"{best_src}, smallest of {len(read)} cgroup level(s)" if others else best_src)
    if not read:
        return fact(None, "; ".join(bad) or f"no readable cpu.max / cpu.cfs_quota_us in {dirs[0]} or its parents")
    return fact(None, f"no CPU limit ({', '.join(read[:3])}{'…' if len(read) > 3 else ''}: max / -1)"
                + (f"; {'; '.join(bad)}" if bad else ""))


# v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX × page size).
_NO_MEMORY_LIMIT = 1 << 60


def _cgroup_memory(view: HostView) -> tuple[dict, dict]:
    """(limit fact, usage fact): the smallest memory limit over the cgroup hierarchy
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and the usage charged to the level
    that sets it (v2 ``memory.current``, v1 ``memory.usage_in_bytes``); kernel docs
    cgroup-v2.rst "memory.max", cgroup-v1 memory.rst. Value None: no limit / unreadable."""
    version, dirs = _cgroup_dirs(view, "memory")
    if not dirs:
        why = "no cgroup memory hierarchy found under /sys/fs/cgroup (no limit known)"
        return fact(None, why), fact(None, why)
    lim_name, use_name = (("memory.max", "memory.current") if version == "v2"
                          else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
    best, best_dir, read, bad = None, None, [], []
    for d in dirs:
        val = view.first_line(f"{d}/{lim_name}")
        if not val:
            continue
        read.append(f"{d}/{lim_name}")
        if val == "max":
            continue
        if not val.isdigit():
            bad.append(f"{d}/{lim_name} unparseable: {val[:40]}")
            continue
        n = int(val)
        if n >= _NO_MEMORY_LIMIT:
            continue
        if best is None or n < best:
            best, best_dir = n, d
    if best is None:
        why = ("; ".join(bad) if bad and not read else
               f"no memory limit ({', '.join(read[:3])}: max)" if read else
               f"no readable {lim_name} in {dirs[0]} or its parents")
        return fact(None, why), fact(None, "no memory limit, usage not needed")
    src = f"{best_dir}/{lim_name}" + (f", smallest of {len(read)} cgroup level(s)" if len(read) > 1 else "")
    use = view.first_line(f"{best_dir}/{use_name}")
    usage = (fact(int(use), f"{best_dir}/{use_name}") if use and use.isdigit()
             else fact(None, f"{best_dir}/{use_name} unreadable"))
    return fact(best, src), usage


def available_memory_bytes(view: HostView | None = None) -> tuple[int | None, str]:
    """Host memory a new allocation can take: min(MemAvailable, cgroup limit - usage).

    A container's cgroup memory limit kills the process (OOM) long before the host runs
    out, so checks made before allocating must count it. Returns (bytes, how it was
    computed) or (None, why unknown). Live by default."""
    view = view or HostView()
    mi = _meminfo(view)
    host = mi.get("MemAvailable")
    src = "/proc/meminfo MemAvailable"
    if host is None and view.live:
        try:
            import psutil
            host, src = int(psutil.virtual_memory().available), "psutil.virtual_memory().available"
        except Exception:  # noqa: BLE001
            host = None
    limit, usage = _safe(_cgroup_memory, view, default=(fact(None, ""), fact(None, "")))
    if limit["value"] is None:
        return (host, src) if host is not None else (None, "MemAvailable unreadable, no cgroup limit")
    left = max(0, limit["value"] - (usage["value"] or 0))
    if host is None or left < host:
        return left, f"cgroup limit - usage ({limit['source']} - {usage['source']})"
    return host, src + f" (below cgroup headroom {left} B)"


def _cpu_section(view: HostView) -> dict:
    ident = _cpu_identity(view)
    blocks = ident["blocks"]
    out = {"vendor": ident["vendor"], "model_name": ident["model_name"], "family": ident["family"],
           "model": ident["model"], "stepping": ident["stepping"]}
    out.update(_safe(_cpu_topology, view, blocks, default={}))
    out["cgroup_cpu_limit_cores"] = _safe(_cgroup_cpu_limit, view, default=fact(None, "cgroup read failed"))
    out["isa"] = _isa(ident["arch_family"], blocks)
    out["arch"] = _cpu_arch(view, ident["arch_family"])
    out["flags"] = _cpu_flags(ident["arch_family"], blocks)
    out["sve_vector_bits"] = _safe(_sve_vector_bits, view, out["flags"]["value"],
                                   default=fact(None, "SVE vector length read failed"))
    caches, llc = _safe(_caches, view, default=({}, fact(None, "cache scan failed")))
    out["caches"] = caches
    out["last_level_cache_bytes"] = llc
    out["frequency"] = _safe(_frequency, view, blocks, ident["model_name"]["value"],
                             default={"current_mhz": fact(None, "frequency read failed")})
    return out


# ----------------------------------------------------------------------------- memory / os / python

def _memory_section(view: HostView) -> dict:
    mi = _meminfo(view)
    out: dict[str, Any] = {}
    psu = None
    if (not mi) and view.live:
        try:
            import psutil
            psu = psutil.virtual_memory()
        except Exception:  # noqa: BLE001
            psu = None
    for key, field, attr in (("total_bytes", "MemTotal", "total"), ("available_bytes", "MemAvailable", "available")):
        if field in mi:
            out[key] = fact(mi[field], f"/proc/meminfo {field}")
        elif psu is not None:
            out[key] = fact(int(getattr(psu, attr)), f"psutil.virtual_memory().{attr}")
        else:
            out[key] = fact(None, f"/proc/meminfo has no {field}")
    limit, usage = _safe(_cgroup_memory, view, default=(fact(None, "cgroup read failed"),) * 2)
    out["cgroup_limit_bytes"] = limit
    out["cgroup_usage_bytes"] = usage
    # What the checks before allocating use: min(MemAvailable, cgroup limit - usage).
    alloc, how = _safe(available_memory_bytes, view, default=(None, "allocatable memory unknown"))
    out["allocatable_bytes"] = fact(alloc, how)
    hp = {}
    for key, field in (("total", "HugePages_Total"), ("free", "HugePages_Free"),
                       ("page_size_bytes", "Hugepagesize"), ("anon_huge_bytes", "AnonHugePages")):
        hp[key] = fact(mi[field], f"/proc/meminfo {field}") if field in mi else fact(None, f"/proc/meminfo has no {field}")
    thp_path = "/sys/kernel/mm/transparent_hugepage/enabled"
    thp = view.first_line(thp_path)
    m = re.search(r"\[(\w+)\]", thp or "")
    hp["transparent"] = fact(m.group(1), thp_path) if m else fact(None, f"{thp_path} unreadable")
    out["hugepages"] = hp
    return out


def _os_section(view: HostView) -> dict:
    out: dict[str, Any] = {}
    rel = None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = view.text(path)
        if text is not None:
            rel = (path, {})
            for line in text.splitlines():
                k, sep, v = line.partition("=")
                if sep:
                    rel[1][k.strip()] = v.strip().strip('"').strip("'")
            break
    for key, field in (("distro", "PRETTY_NAME"), ("id", "ID"), ("version_id", "VERSION_ID")):
        if rel and field in rel[1]:
            out[key] = fact(rel[1][field], f"{rel[0]} {field}")
        else:
            out[key] = fact(None, "/etc/os-release absent" if not rel else f"{rel[0]} has no {field}")
    if not rel and view.live:
        out["distro"] = fact(platform.platform(), "platform.platform()")
    release, src = view.kernel_release()
    out["kernel_release"] = fact(release, src)
    arch = view.first_line("/proc/sys/kernel/arch")
    if arch:
        out["arch"] = fact(arch, "/proc/sys/kernel/arch")
    elif view.live:
        out["arch"] = fact(platform.machine(), "platform.machine()")
    else:
        out["arch"] = fact(None, "/proc/sys/kernel/arch absent")
    out["system"] = fact(platform.system(), "platform.system()") if view.live else fact("Linux", "inspected root")
    return out


def _python_section() -> dict:
    return {
        "version": fact(platform.python_version(), "platform.python_version()"),
        "implementation": fact(platform.python_implementation(), "platform.python_implementation()"),
        "executable": fact(sys.executable, "sys.executable"),
        "compiler": fact(platform.python_compiler(), "platform.python_compiler()"),
    }


def _host_section(view: HostView) -> dict:
    out: dict[str, Any] = {}
    hn = view.first_line("/proc/sys/kernel/hostname")
    if hn:
        out["hostname"] = fact(hn, "/proc/sys/kernel/hostname")
    elif view.live:
        out["hostname"] = fact(socket.gethostname(), "socket.gethostname()")
    else:
        hn = view.first_line("/etc/hostname")
        out["hostname"] = fact(hn, "/etc/hostname") if hn else fact(None, "no /proc/sys/kernel/hostname or /etc/hostname")
    mid, why = view.read("/etc/machine-id")
    out["machine_id"] = fact(mid.strip() or None, "/etc/machine-id") if mid is not None else fact(None, why)
    dmi = "/sys/class/dmi/id"
    for key in ("sys_vendor", "product_name", "product_serial", "product_uuid", "board_serial"):
        val, why = view.read(f"{dmi}/{key}")
        out[f"dmi_{key}"] = fact(val.strip() or None, f"{dmi}/{key}") if val is not None else fact(None, why)
    return out


# ----------------------------------------------------------------------------- frameworks

def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _torch_info() -> dict:
    try:
        import torch
    except ImportError as e:
        return _unavailable(f"not installed ({e})")
    except Exception as e:  # noqa: BLE001
        return _unavailable(f"import failed: {type(e).__name__}: {e}")
    out: dict[str, Any] = {"available": True, "version": fact(torch.__version__, "torch.__version__")}
    tv = getattr(torch, "version", None)
    out["cuda_version"] = fact(getattr(tv, "cuda", None), "torch.version.cuda (build)")
    out["hip_version"] = fact(getattr(tv, "hip", None), "torch.version.hip (build)")
    out["git_version"] = fact(getattr(tv, "git_version", None), "torch.version.git_version")
    try:
        out["cudnn_version"] = fact(torch.backends.cudnn.version(), "torch.backends.cudnn.version()")
    except Exception as e:  # noqa: BLE001
        out["cudnn_version"] = fact(None, f"torch.backends.cudnn.version() failed: {e}")
    try:
        out["cuda_available"] = fact(bool(torch.cuda.is_available()), "torch.cuda.is_available()")
        out["cuda_device_count"] = fact(int(torch.cuda.device_count()), "torch.cuda.device_count()")
    except Exception as e:  # noqa: BLE001
        out["cuda_available"] = fact(None, f"torch.cuda.is_available() failed: {e}")
    try:
        mps = torch.backends.mps.is_available()
        out["mps_available"] = fact(bool(mps), "torch.backends.mps.is_available()")
    except Exception:  # noqa: BLE001
        out["mps_available"] = fact(False, "torch.backends.mps missing")
    out["num_threads"] = fact(torch.get_num_threads(), "torch.get_num_threads()")
    return out


def _jax_info() -> dict:
    try:
        import jax
    except ImportError:
        return _unavailable("not installed")
    except Exception as e:  # noqa: BLE001
        return _unavailable(f"import failed: {type(e).__name__}: {e}")
    out: dict[str, Any] = {"available": True, "version": fact(getattr(jax, "__version__", None), "jax.__version__")}
    jl = _dist_version("jaxlib")
    out["jaxlib_version"] = fact(jl, "importlib.metadata.version('jaxlib')" if jl else "jaxlib metadata not found")
    try:
        out["default_backend"] = fact(jax.default_backend(), "jax.default_backend()")
    except Exception as e:  # noqa: BLE001
        out["default_backend"] = fact(None, f"jax.default_backend() failed: {e}")
    return out


def _pynvml_info() -> dict:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return _unavailable("not installed")
    except Exception as e:  # noqa: BLE001
        return _unavailable(f"import failed: {type(e).__name__}: {e}")
    v = _dist_version("nvidia-ml-py") or _dist_version("pynvml")
    return {"available": True, "version": fact(v, "importlib.metadata.version('nvidia-ml-py')" if v
                                               else "package metadata not found")}


# ----------------------------------------------------------------------------- devices

def _cpu_memory_bytes() -> int | None:
    mi = _meminfo(HostView())
    if "MemTotal" in mi:
        return mi["MemTotal"]
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        return None


def torch_devices() -> list[dict]:
    """Devices PyTorch can run on here: cpu:0 always, every cuda:i (ROCm too), mps:0. [] without torch."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - ImportError, or a broken install
        return []
    devices: list[dict] = []
    try:
        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        threads = None
    devices.append({"id": "cpu:0", "backend": "torch", "type": "cpu", "index": 0,
                    "name": cpu_model_name(), "memory_bytes": _cpu_memory_bytes(), "platform": "cpu",
                    "extra": {"threads": threads, "logical_cores": os.cpu_count()}})
    hip = getattr(getattr(torch, "version", None), "hip", None)
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        n = 0
    for i in range(n):
        try:
            p = torch.cuda.get_device_properties(i)
            extra = {"compute_capability": f"{p.major}.{p.minor}",
                     "multiprocessors": getattr(p, "multi_processor_count", None)}
            if hip:
                extra["gcn_arch"] = getattr(p, "gcnArchName", None)
            for attr in ("L2_cache_size", "pci_bus_id"):
                if hasattr(p, attr):
                    extra[attr.lower()] = getattr(p, attr)
            if hasattr(p, "pci_bus_id") and hasattr(p, "pci_device_id"):
                # The board's PCI address as CUDA sees it: how cuda:i is matched to NVML.
                from harness.gpumap import pci_address
                extra["pci_address"] = pci_address(domain=getattr(p, "pci_domain_id", 0), bus=p.pci_bus_id,
                                                   device=p.pci_device_id)
            devices.append({"id": f"cuda:{i}", "backend": "torch", "type": "cuda", "index": i,
                            "name": p.name, "memory_bytes": int(p.total_memory),
                            "platform": "rocm" if hip else "cuda", "extra": extra})
        except Exception as e:  # noqa: BLE001
            devices.append({"id": f"cuda:{i}", "backend": "torch", "type": "cuda", "index": i,
                            "name": None, "memory_bytes": None, "platform": "rocm" if hip else "cuda",
                            "extra": {"error": f"{type(e).__name__}: {e}"}})
    try:
        if torch.backends.mps.is_available():
            mem = None
            try:
                mem = int(torch.mps.recommended_max_memory())
            except Exception:  # noqa: BLE001
                pass
            devices.append({"id": "mps:0", "backend": "torch", "type": "mps", "index": 0,
                            "name": f"Apple GPU (MPS) on {cpu_model_name()}", "memory_bytes": mem,
                            "platform": "mps", "extra": {}})
    except Exception:  # noqa: BLE001
        pass
    return devices


def _jax_platform(dev) -> str:
    plat = getattr(dev, "platform", "unknown")
    if plat == "gpu":
        try:
            pv = str(dev.client.platform_version).lower()
            return "rocm" if "rocm" in pv else "cuda"
        except Exception:  # noqa: BLE001
            return "gpu"
    return plat


def _jax_local_devices() -> list[tuple[str, object]]:
    """(id, jax.Device) for the local devices of JAX's default backend and of its CPU
    backend, numbered per platform: ``jax:gpu:0``, ``jax:cpu:3``. The ``jax:`` prefix
    keeps them apart from torch's ``cpu:0``/``cuda:0`` when both backends run."""
    import jax

    found = []
    for backend in (None, "cpu"):
        try:
            devs = jax.local_devices(backend=backend) if backend else jax.local_devices()
        except Exception:  # noqa: BLE001
            try:
                devs = jax.devices(backend) if backend else jax.devices()
            except Exception:  # noqa: BLE001
                devs = []
        found.extend(devs)
    out, seen, counters = [], set(), {}
    for d in found:
        plat = getattr(d, "platform", "unknown")
        key = (plat, getattr(d, "id", None))
        if key in seen:
            continue
        seen.add(key)
        idx = counters.get(plat, 0)
        counters[plat] = idx + 1
        out.append((f"jax:{plat}:{idx}", d))
    return out


def jax_device_object(device_id: str):
    """The jax.Device named ``jax:<platform>:<index>`` in this process, or None."""
    for did, dev in _jax_local_devices():
        if did == device_id:
            return dev
    return None


def jax_devices() -> list[dict]:
    """Devices JAX can run on here (local devices of the default backend and the CPU),
    ids ``jax:<platform>:<index>``; memory facts from ``memory_stats()`` where JAX
    exposes them (GPUs, TPUs). [] without jax."""
    try:
        import jax  # noqa: F401
    except Exception:  # noqa: BLE001
        return []
    out = []
    for did, d in _jax_local_devices():
        plat, idx = did.split(":")[1], int(did.split(":")[2])
        mem, stats = None, None
        try:
            stats = d.memory_stats() or None
            mem = (stats or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001
            pass
        extra = {"global_id": getattr(d, "id", None), "process_index": getattr(d, "process_index", None)}
        if stats:
            extra["memory_stats"] = {k: stats[k] for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use",
                                                           "largest_free_block_bytes") if k in stats}
        for attr in ("coords", "core_on_chip"):
            if hasattr(d, attr):
                try:
                    v = getattr(d, attr)
                    extra[attr] = list(v) if isinstance(v, (tuple, list)) else v
                except Exception:  # noqa: BLE001
                    pass
        name = getattr(d, "device_kind", plat)
        if plat == "cpu":
            # XLA calls every host device "cpu": name the CPU, as torch's cpu:0 does.
            extra["device_kind"] = name
            name = cpu_model_name()
            mem = mem or _cpu_memory_bytes()
        out.append({"id": did, "backend": "jax", "type": plat, "index": idx,
                    "name": name, "memory_bytes": mem,
                    "platform": _jax_platform(d), "extra": extra})
    return out


# Host devices the JAX backend forces on a CPU-only node, so the collective probes have
# a mesh (XLA's --xla_force_host_platform_device_count; must be set before JAX starts).
JAX_HOST_DEVICES = 4
_HOST_FLAG = "--xla_force_host_platform_device_count"


def _configured_host_devices(environ) -> int | None:
    """Host device count the environment already asks XLA for, or None."""
    for token in environ.get("XLA_FLAGS", "").split():
        if token.startswith(_HOST_FLAG + "="):
            try:
                return int(token.split("=", 1)[1])
            except ValueError:
                return None
    value = environ.get("JAX_NUM_CPU_DEVICES", "")
    return int(value) if value.strip().isdigit() else None


def prepare_jax_host_devices(count: int = JAX_HOST_DEVICES, environ=None) -> dict:
    """Before JAX initializes (in this process and in the workers it spawns, which
    inherit the environment): force ``count`` CPU host devices unless the user already
    chose a number. Returns what was done, for the manifest's ``jax`` section.

    Forcing only adds host devices; a GPU or TPU backend is untouched. If JAX is
    already initialized here the flag can't take effect and the record says so."""
    import sys

    environ = os.environ if environ is None else environ
    have = _configured_host_devices(environ)
    if have is not None:
        return {"forced_host_devices": False, "host_devices": have,
                "how": "left as configured (XLA_FLAGS / JAX_NUM_CPU_DEVICES)"}
    initialized = False
    jax_mod = sys.modules.get("jax")
    if jax_mod is not None:
        try:
            from jax._src import xla_bridge  # noqa: PLC0415 - private: is a backend up yet?

            initialized = bool(getattr(xla_bridge, "_backends", {}))
        except Exception:  # noqa: BLE001
            initialized = True
    flags = environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = f"{flags} {_HOST_FLAG}={count}".strip()
    record = {"forced_host_devices": True, "host_devices": count,
              "how": f"XLA_FLAGS={_HOST_FLAG}={count} set before JAX initialized"}
    if initialized:
        record.update(forced_host_devices=False, host_devices=None,
                      how="JAX was already initialized in this process; XLA_FLAGS set for the workers only")
    return record


# ----------------------------------------------------------------------------- NVIDIA (NVML)

VIRT_MODES = {0: "NONE", 1: "PASSTHROUGH", 2: "VGPU", 3: "HOST_VGPU", 4: "HOST_VSGA"}


def _s(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _nv(nvml, name: str, *args, transform=None) -> dict:
    fn = getattr(nvml, name, None)
    src = f"pynvml.{name}"
    if fn is None:
        return fact(None, f"{src} missing in this pynvml")
    try:
        v = _s(fn(*args))
        return fact(transform(v) if transform else v, src)
    except Exception as e:  # noqa: BLE001 - NVMLError_NotSupported etc.
        return fact(None, f"{src}: {e or type(e).__name__}")


def _cuda_version_str(v) -> str:
    v = int(v)
    return f"{v // 1000}.{(v % 1000) // 10}"


def nvidia_info(nvml=None, environ=None, cuda_bus_ids: list | None = None) -> dict:
    """Per-GPU facts from NVML; ``{"available": False, "reason": ...}`` if NVML can't start.

    ``nvml``: the pynvml module (default) or a stand-in with its calls (a recording, see
    harness.nvml_record). ``environ`` (default os.environ) gives CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER; ``cuda_bus_ids`` the PCI address CUDA reports per ordinal (torch
    device properties). From them ``cuda_map`` says which NVML GPU each ``cuda:N`` of this
    process is, by PCI bus id / UUID (harness.gpumap), never by index. A recording
    (``nvml.doc``) supplies its own ``process_environ`` and ``cuda_bus_ids``.
    """
    recorded = getattr(nvml, "doc", None)  # a harness.nvml_record.RecordedNvml
    if environ is None and isinstance(recorded, dict):
        # A captured machine: the process environment and CUDA's PCI addresses it recorded.
        environ = dict(recorded.get("process_environ") or {})
        cuda_bus_ids = cuda_bus_ids or recorded.get("cuda_bus_ids")
    environ = os.environ if environ is None else environ
    if nvml is None and cuda_bus_ids is None:
        from harness.gpumap import torch_cuda_bus_ids
        cuda_bus_ids = torch_cuda_bus_ids()  # live, after torch_devices() started CUDA
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return _unavailable("pynvml not installed")
        except Exception as e:  # noqa: BLE001
            return _unavailable(f"pynvml import failed: {e}")
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001
        return _unavailable(f"NVML init failed: {e or type(e).__name__}")
    try:
        out: dict[str, Any] = {"available": True}
        out["driver_version"] = _nv(nvml, "nvmlSystemGetDriverVersion")
        out["cuda_driver_version"] = _nv(nvml, "nvmlSystemGetCudaDriverVersion", transform=_cuda_version_str)
        out["nvml_version"] = _nv(nvml, "nvmlSystemGetNVMLVersion")
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as e:  # noqa: BLE001
            out["gpus"] = []
            out["reason"] = f"nvmlDeviceGetCount failed: {e}"
            return out
        gpus = []
        for i in range(count):
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception as e:  # noqa: BLE001
                gpus.append({"index": i, "error": f"nvmlDeviceGetHandleByIndex: {e}"})
                continue
            gpus.append(_gpu(nvml, i, h, out))
        out["gpus"] = gpus
        out["links"] = gpu_links(nvml, count)
        out["cuda_map"] = _cuda_map(nvml, count, environ, cuda_bus_ids)
        return out
    except Exception as e:  # noqa: BLE001
        return _unavailable(f"NVML query failed: {type(e).__name__}: {e}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


P2P_CAPS = {"read": 0, "write": 1, "nvlink": 2, "atomics": 3}  # NVML_P2P_CAPS_INDEX_*
P2P_STATUS = {0: "ok", 1: "chipset not supported", 2: "gpu not supported", 3: "iohub topology not supported",
              4: "disabled by registry key", 5: "not supported", 6: "unknown"}
TOPOLOGY = {0: "same board (internal)", 10: "single PCIe switch", 20: "multiple PCIe switches",
            30: "PCIe host bridge", 40: "same NUMA node (inter-host-bridge)", 50: "across NUMA nodes (SMP interconnect)"}
NVLINK_MAX_LINKS = 18


def gpu_links(nvml, count: int) -> dict:
    """Link facts per GPU and per GPU pair: active NVLinks per GPU, and for each pair the
    NVML P2P capability status (read, write, NVLink, atomics) and the PCIe topology
    level of their common ancestor."""
    per_gpu = []
    handles = []
    for i in range(count):
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(i)
        except Exception:  # noqa: BLE001
            handles.append(None)
            continue
        handles.append(h)
        active, source = 0, "pynvml.nvmlDeviceGetNvLinkState"
        supported = False
        remotes: list[dict] = []
        for link in range(NVLINK_MAX_LINKS):
            try:
                state = nvml.nvmlDeviceGetNvLinkState(h, link)
            except Exception:  # noqa: BLE001 - NotSupported / InvalidArgument past the last link
                continue
            supported = True
            active += 1 if state else 0
            if state:
                remotes.append(_nvlink_remote(nvml, h, link))
        per_gpu.append({"index": i, "nvlink_active_links": fact(active if supported else None,
                                                                  source if supported else f"{source}: not supported"),
                        "nvlink_remotes": remotes})
    pairs = []
    for i in range(count):
        for j in range(i + 1, count):
            if handles[i] is None or handles[j] is None:
                continue
            pair = {"gpus": [i, j]}
            for cap, index in P2P_CAPS.items():
                pair[f"p2p_{cap}"] = _nv(nvml, "nvmlDeviceGetP2PStatus", handles[i], handles[j], index,
                                         transform=lambda v: P2P_STATUS.get(int(v), str(v)))
            pair["topology"] = _nv(nvml, "nvmlDeviceGetTopologyCommonAncestor", handles[i], handles[j],
                                   transform=lambda v: TOPOLOGY.get(int(v), str(v)))
            pair["nvlink_links"] = _pair_nvlinks(nvml, handles, per_gpu, i, j)
            pairs.append(pair)
    return {"per_gpu": per_gpu, "pairs": pairs}


def _nvlink_remote(nvml, h, link: int) -> dict:
    """What an active NVLink reaches: the remote PCI address and kind (gpu | switch)."""
    from harness.gpumap import pci_address

    rem: dict[str, Any] = {"link": link, "bus_id": None, "type": None}
    try:
        rem["bus_id"] = pci_address(_s(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
    except Exception:  # noqa: BLE001 - not supported by this GPU/driver/pynvml
        pass
    try:
        kind = int(nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link))
        rem["type"] = {0: "gpu", 1: "ibmnpu", 2: "switch"}.get(kind, str(kind))
    except Exception:  # noqa: BLE001
        pass
    return rem


def _pair_nvlinks(nvml, handles: list, per_gpu: list[dict], i: int, j: int) -> dict:
    """Active NVLinks joining GPUs i and j, as a fact.

    Direct links are those of i whose remote PCI address is j's (bridges, hybrid cube mesh).
    Through NVSwitch every GPU reaches every other over all its switch links, so the pair
    gets the smaller of the two GPUs' switch-link counts. 0 when neither holds: the pair
    talks over PCIe, whatever the product's datasheet says about optional bridges."""
    from harness.gpumap import pci_address

    src = "pynvml.nvmlDeviceGetNvLinkState + nvmlDeviceGetNvLinkRemotePciInfo/RemoteDeviceType"
    by_index = {g["index"]: g for g in per_gpu}
    gi, gj = by_index.get(i), by_index.get(j)
    if gi is None or gj is None:
        return fact(None, f"{src}: no NVLink facts for GPU {i} or {j}")
    if gi["nvlink_active_links"]["value"] is None or gj["nvlink_active_links"]["value"] is None:
        return fact(0, f"{src}: NVLink not supported on GPU {i} or {j} (PCIe only)")
    try:
        bus_j = pci_address(_s(nvml.nvmlDeviceGetPciInfo(handles[j]).busId))
        bus_i = pci_address(_s(nvml.nvmlDeviceGetPciInfo(handles[i]).busId))
    except Exception as e:  # noqa: BLE001
        return fact(None, f"{src}: PCI bus id unreadable ({e})")
    direct = sum(1 for r in gi.get("nvlink_remotes", []) if r.get("bus_id") and r["bus_id"] == bus_j)
    back = sum(1 for r in gj.get("nvlink_remotes", []) if r.get("bus_id") and r["bus_id"] == bus_i)
    if direct or back:
        return fact(max(direct, back), f"{src}: direct links between {bus_i} and {bus_j}")
    sw_i = sum(1 for r in gi.get("nvlink_remotes", []) if r.get("type") == "switch")
    sw_j = sum(1 for r in gj.get("nvlink_remotes", []) if r.get("type") == "switch")
    if sw_i and sw_j:
        return fact(min(sw_i, sw_j), f"{src}: through NVSwitch ({sw_i} and {sw_j} switch links)")
    if any(r.get("bus_id") is None and r.get("type") is None for r in gi.get("nvlink_remotes", [])):
        return fact(None, f"{src}: GPU {i} has active NVLinks whose far end NVML does not name")
    return fact(0, f"{src}: no active NVLink joins GPU {i} and {j} (PCIe)")


def _cuda_map(nvml, count: int, environ, cuda_bus_ids) -> dict:
    """``{"cuda:N": {"nvml_index", "how", "mig_uuid"}, "notes": [...]}`` (harness.gpumap)."""
    from harness.gpumap import match_cuda_to_nvml, nvml_gpus

    handles = []
    for i in range(count):
        try:
            handles.append(nvml.nvmlDeviceGetHandleByIndex(i))
        except Exception:  # noqa: BLE001
            return {"notes": [f"NVML GPU {i}: no handle; mapping unknown"]}
    matches, notes = match_cuda_to_nvml(nvml_gpus(nvml, handles), visible=environ.get("CUDA_VISIBLE_DEVICES"),
                                        device_order=environ.get("CUDA_DEVICE_ORDER"), cuda_bus_ids=cuda_bus_ids)
    out: dict[str, Any] = {f"cuda:{m.ordinal}": {"nvml_index": m.nvml_index, "how": m.how, "mig_uuid": m.mig_uuid}
                           for m in matches.values()}
    out["notes"] = notes
    return out


def _gpu(nvml, i: int, h, system: dict) -> dict:
    g: dict[str, Any] = {"index": i}
    g["name"] = _nv(nvml, "nvmlDeviceGetName", h)
    g["uuid"] = _nv(nvml, "nvmlDeviceGetUUID", h)
    g["serial"] = _nv(nvml, "nvmlDeviceGetSerial", h)
    g["pci_bus_id"] = _nv(nvml, "nvmlDeviceGetPciInfo", h, transform=lambda p: _s(getattr(p, "busId", None)))
    g["memory_total_bytes"] = _nv(nvml, "nvmlDeviceGetMemoryInfo", h, transform=lambda m: int(m.total))
    g["compute_capability"] = _nv(nvml, "nvmlDeviceGetCudaComputeCapability", h,
                                  transform=lambda cc: f"{cc[0]}.{cc[1]}")
    g["multiprocessors"] = _nv(nvml, "nvmlDeviceGetAttributes", h,
                               transform=lambda a: getattr(a, "multiprocessorCount", None))
    g["driver_version"] = system["driver_version"]
    g["cuda_driver_version"] = system["cuda_driver_version"]
    g["pcie"] = {
        "current_generation": _nv(nvml, "nvmlDeviceGetCurrPcieLinkGeneration", h),
        "max_generation": _nv(nvml, "nvmlDeviceGetMaxPcieLinkGeneration", h),
        "current_width": _nv(nvml, "nvmlDeviceGetCurrPcieLinkWidth", h),
        "max_width": _nv(nvml, "nvmlDeviceGetMaxPcieLinkWidth", h),
    }
    mig = _nv(nvml, "nvmlDeviceGetMigMode", h)
    if mig["value"] is not None:
        cur, pend = mig["value"]
        g["mig"] = {"current": fact(bool(cur), mig["source"] + " [current]"),
                    "pending": fact(bool(pend), mig["source"] + " [pending]")}
        if cur:
            g["mig"]["max_instances"] = _nv(nvml, "nvmlDeviceGetMaxMigDeviceCount", h)
            g["mig"]["devices"] = _mig_devices(nvml, h, g["mig"]["max_instances"]["value"])
    else:
        g["mig"] = {"current": fact(None, mig["source"]), "pending": fact(None, mig["source"])}
    g["virtualization_mode"] = _nv(nvml, "nvmlDeviceGetVirtualizationMode", h,
                                   transform=lambda m: VIRT_MODES.get(int(m), f"UNKNOWN({int(m)})"))
    g["persistence_mode"] = _nv(nvml, "nvmlDeviceGetPersistenceMode", h, transform=lambda m: bool(m))
    g["power_limit_w"] = _nv(nvml, "nvmlDeviceGetPowerManagementLimit", h, transform=lambda mw: mw / 1000.0)
    g["enforced_power_limit_w"] = _nv(nvml, "nvmlDeviceGetEnforcedPowerLimit", h, transform=lambda mw: mw / 1000.0)
    sm = getattr(nvml, "NVML_CLOCK_SM", 1)
    mem = getattr(nvml, "NVML_CLOCK_MEM", 2)
    g["clocks_max_sm_mhz"] = _nv(nvml, "nvmlDeviceGetMaxClockInfo", h, sm)
    g["clocks_max_mem_mhz"] = _nv(nvml, "nvmlDeviceGetMaxClockInfo", h, mem)
    ecc = _nv(nvml, "nvmlDeviceGetEccMode", h)
    g["ecc_enabled"] = (fact(bool(ecc["value"][0]), ecc["source"] + " [current]")
                        if isinstance(ecc["value"], (list, tuple)) else ecc)
    return g


def _mig_devices(nvml, h, max_count) -> list[dict]:
    """The MIG devices of a GPU: UUID, name, SMs and slice counts (nvmlDeviceGetAttributes),
    which size a slice's nominal peaks (harness.nominal)."""
    out = []
    for k in range(int(max_count or 0)):
        try:
            mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
        except Exception:  # noqa: BLE001 - empty slot
            continue
        d: dict[str, Any] = {"slot": k, "uuid": _nv(nvml, "nvmlDeviceGetUUID", mh),
                             "name": _nv(nvml, "nvmlDeviceGetName", mh),
                             "memory_total_bytes": _nv(nvml, "nvmlDeviceGetMemoryInfo", mh,
                                                       transform=lambda m: int(m.total))}
        attrs = _nv(nvml, "nvmlDeviceGetAttributes", mh)
        a = attrs["value"]
        for key, attr in (("multiprocessors", "multiprocessorCount"),
                          ("gpu_instance_slices", "gpuInstanceSliceCount"),
                          ("compute_instance_slices", "computeInstanceSliceCount")):
            d[key] = fact(getattr(a, attr, None) if a is not None else None, attrs["source"])
        out.append(d)
    return out


def gpu_virtualization_layers(nvidia: dict) -> list[dict]:
    """Layers for virtualization.layers from NVML: virtualization mode != NONE, MIG enabled."""
    layers = _Layers()
    if not nvidia.get("available"):
        return []
    for g in nvidia.get("gpus", []):
        name = (g.get("name") or {}).get("value") or "GPU"
        mode = (g.get("virtualization_mode") or {}).get("value")
        if mode and mode != "NONE":
            layers.add("gpu_virtualization", mode.lower().replace("_", "-"),
                       f"GPU {g['index']} ({name}): nvmlDeviceGetVirtualizationMode = {mode}")
        mig = (g.get("mig") or {}).get("current") or {}
        if mig.get("value"):
            layers.add("gpu_virtualization", "mig", f"GPU {g['index']} ({name}): MIG mode enabled (nvmlDeviceGetMigMode)")
    return layers.all()


# ----------------------------------------------------------------------------- anonymization

def pseudonym(value: str, prefix: str, salt: str | None = None) -> str:
    """Stable salted-hash pseudonym, e.g. host-3fa2c1d0. Same input + salt -> same output."""
    salt = salt if salt is not None else os.environ.get(ANON_SALT_ENV, _DEFAULT_SALT)
    digest = hashlib.sha256(f"{salt}\x00{prefix}\x00{value}".encode()).hexdigest()
    return f"{prefix}-{digest[:8]}"


def _anonymize(doc: dict, salt: str | None) -> dict:
    replacements: dict[str, str] = {}

    def swap(f: dict, prefix: str) -> None:
        if is_fact(f) and isinstance(f["value"], str) and f["value"]:
            new = pseudonym(f["value"], prefix, salt)
            replacements[f["value"]] = new
            f["value"] = new
            f["source"] += " (anonymized)"

    host = doc.get("host", {})
    swap(host.get("hostname", {}), "host")
    for key in ("machine_id", "dmi_product_serial", "dmi_product_uuid", "dmi_board_serial"):
        swap(host.get(key, {}), "id")
    for g in (doc.get("nvidia") or {}).get("gpus", []) or []:
        swap(g.get("uuid", {}), "gpu")
        swap(g.get("serial", {}), "gpu-serial")
        for m in (g.get("mig") or {}).get("devices") or []:
            swap(m.get("uuid", {}), "mig")  # MIG UUIDs are as identifying as the GPU's
    home = os.path.expanduser("~")

    patterns = [(re.compile(r"(?<![A-Za-z0-9])" + re.escape(old) + r"(?![A-Za-z0-9])"), new)
                for old, new in replacements.items() if len(old) >= 4]
    hexid = re.compile(r"\b(?=[0-9]*[a-f])[0-9a-f]{12,}\b")  # container ids; not plain numbers

    def scrub(s: str) -> str:
        for pat, new in patterns:
            s = pat.sub(new, s)
        s = hexid.sub(lambda m: pseudonym(m.group(0), "id", salt), s)
        if home and home != "/" and s.startswith(home):
            s = "~" + s[len(home):]
        return s

    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, str):
            return scrub(obj)
        return obj

    for key in ("host", "cpu", "memory", "virtualization", "python", "nvidia", "nominal"):
        # nvidia/nominal: the cuda_map names GPUs and MIG devices by UUID (CUDA_VISIBLE_DEVICES)
        if key in doc:
            doc[key] = walk(doc[key])
    return doc


# ----------------------------------------------------------------------------- collect

def _framework_versions_only() -> dict:
    out = {}
    for name, dist in (("torch", "torch"), ("jax", "jax"), ("pynvml", "nvidia-ml-py")):
        v = _dist_version(dist)
        src = f"importlib.metadata.version('{dist}') (not imported)"
        out[name] = {"available": True, "version": fact(v, src)} if v else _unavailable("not installed")
    return out


SYSROOT_NOT_PROBED = "not probed: sysroot (a captured machine; only its files are read)"


def _nvidia_from_record(view: HostView) -> dict:
    """NVML facts of a captured machine from its recording (harness.nvml_record), if any."""
    try:
        from harness import nvml_record
    except ImportError:
        return _unavailable(SYSROOT_NOT_PROBED)
    path = view.path(nvml_record.RECORD_PATH)
    if not os.path.exists(path):
        return _unavailable(f"{SYSROOT_NOT_PROBED}; no NVML recording ({nvml_record.RECORD_PATH})")
    return nvidia_info(nvml=nvml_record.RecordedNvml(nvml_record.load_record(path)))


def nominal_section(doc: dict, *, live: bool) -> dict:
    """Nominal peaks per device id of a fingerprint: ``{"cpu:0": {...}}``.

    The CPU entry is what harness.nominal.cpu_nominal returns (rule, cores, clock_hz,
    clock_source, flop_per_cycle, vector_bits, compute_flops, memory_Bps, source, notes);
    GPU entries are added by the GPU lookup, keyed by device id. ``live=False`` measures
    nothing (the clock comes from the snapshot's per-boot cache). Never raises: an entry
    that cannot be derived is ``{"kind": "unknown", "notes": why}``."""
    from harness import nominal

    out: dict[str, Any] = {}
    try:
        out["cpu:0"] = nominal.cpu_nominal(doc, live=live)
    except Exception as e:  # noqa: BLE001 - a table or rule bug must not hide the fingerprint
        out["cpu:0"] = {"kind": "unknown", "compute_flops": {}, "notes": f"{type(e).__name__}: {e}"}
    try:
        out.update(nominal.gpu_nominals(doc))
    except Exception as e:  # noqa: BLE001
        out["gpu"] = {"kind": "unknown", "compute_flops": {}, "notes": f"{type(e).__name__}: {e}"}
    return out


def collect(anonymize: bool = False, *, root: str = "/", env: dict | None = None,
            run: Runner | None = None, salt: str | None = None, live: bool | None = None,
            import_frameworks: bool = True, view: HostView | None = None,
            with_nominal: bool = False) -> dict:
    """The environment fingerprint (JSON-serialisable). Never raises.

    ``root``/``env``/``run`` point discovery at a fake machine (tests). ``live`` controls the
    sections that can only describe the running interpreter (frameworks, devices, NVML);
    by default they are inspected only when ``root`` is the real ``/``.
    ``import_frameworks=False`` skips importing torch/jax (about 1-2 s for torch): framework
    versions then come from package metadata and the device lists stay empty.
    ``salt`` (or $COHERENCE_ANON_SALT) keys the pseudonyms used when ``anonymize`` is set.
    ``view``: read through this HostView instead (harness.capture records what is read).
    ``live=False`` with a root other than ``/`` is the sysroot path: files only, no command,
    no framework or NVML probing (an NVML recording in the snapshot is replayed), nothing
    measured. ``with_nominal`` adds ``doc["nominal"]`` (:func:`nominal_section`).
    """
    view = view or HostView(root, env, run)
    live = view.live if live is None else live
    not_live = SYSROOT_NOT_PROBED if not view.live else "not inspected (non-live root)"
    doc: dict[str, Any] = {"anonymized": bool(anonymize)}
    if not view.live:
        doc["sysroot"] = os.path.abspath(view.root)
    doc["host"] = _safe(_host_section, view)
    doc["cpu"] = _safe(_cpu_section, view)
    doc["memory"] = _safe(_memory_section, view)
    doc["os"] = _safe(_os_section, view)
    doc["python"] = _safe(_python_section) if view.live else _unavailable(not_live)
    if live and import_frameworks:
        doc["frameworks"] = {"torch": _safe(_torch_info), "jax": _safe(_jax_info), "pynvml": _safe(_pynvml_info)}
        doc["devices"] = {"torch": _safe(torch_devices, default=[]), "jax": _safe(jax_devices, default=[])}
        doc["nvidia"] = _safe(nvidia_info)
    elif live:
        doc["frameworks"] = _safe(_framework_versions_only)
        doc["devices"] = {"torch": [], "jax": []}
        doc["nvidia"] = _safe(nvidia_info)
    else:
        doc["frameworks"] = {k: _unavailable(not_live) for k in ("torch", "jax", "pynvml")}
        doc["devices"] = {"torch": [], "jax": []}
        doc["nvidia"] = _safe(_nvidia_from_record, view) if not view.live else _unavailable(not_live)
    try:
        virt = detect(view=view)
        virt["layers"] = order_layers(virt["layers"] + gpu_virtualization_layers(doc["nvidia"]))
        virt["summary"] = summarize(virt["layers"])
    except Exception as e:  # noqa: BLE001
        virt = {"layers": [], "steal_time": {"available": False, "steal_ticks": None, "source": "/proc/stat"},
                "summary": "unknown", "notes": [f"detection error: {e}"]}
    doc["virtualization"] = virt
    if with_nominal:
        doc["nominal"] = _safe(nominal_section, doc, live=live)
    if anonymize:
        doc = _safe(_anonymize, doc, salt, default=doc)
    return doc
