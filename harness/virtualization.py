"""Virtualization discovery: every layer between the workload and the hardware.

``detect()`` reports *all* layers that apply (hypervisor, the VMM on top of it, container
runtimes, orchestrators, sandboxes), not only the outermost one as ``systemd-detect-virt``
does, and for each layer the evidence lines that led to it, so a reader can judge the
claim. GPU virtualization (vGPU, passthrough, MIG) comes from NVML and is merged in by
``harness.environment.collect()``.

All reads go through :class:`HostView`, which takes a root directory, an environment
dict and a command runner, so tests can point detection at a fake filesystem tree.
Nothing here raises: a failed read becomes a reason string or simply no evidence.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Callable, Iterable

# A command runner takes (argv, timeout_s) and returns stdout; it may raise on failure.
Runner = Callable[[list, float], str]

# Nesting order of layer groups, outermost first (used for the summary and the layer list).
LAYER_ORDER = ("hypervisor", "sandbox", "container", "gpu_virtualization")


def _run_command(argv: list, timeout: float) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, errors="replace",
        env={**os.environ, "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()
        raise RuntimeError(f"exit {proc.returncode}" + (f": {err[0]}" if err else ""))
    return proc.stdout


# The Linux cpuid driver (/dev/cpu/N/cpuid): a 16-byte read at offset L returns leaf L's
# EAX, EBX, ECX, EDX (subleaf in the offset's high 32 bits). A snapshot stores the leaves it
# read in "<device>.leaves" text, one "0x<offset> <32 hex digits>" per line, rather than a
# sparse file of a gigabyte's apparent size that git and tar would expand.
CPUID_DEVICE = re.compile(r"/?dev/cpu/\d+/cpuid")
LEAVES_SUFFIX = ".leaves"


def read_leaves(text: str) -> dict[int, bytes]:
    """Parse a ``cpuid.leaves`` file: {offset: bytes}. Raises ValueError on a bad line."""
    out: dict[int, bytes] = {}
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {no}: want '0x<offset> <hex bytes>'")
        out[int(parts[0], 16)] = bytes.fromhex(parts[1])
    return out


def write_leaves(leaves: dict[int, bytes]) -> str:
    """The text of a ``cpuid.leaves`` file for {offset: bytes} (inverse of read_leaves)."""
    lines = ["# CPUID leaves read by coherence: offset (leaf; subleaf << 32) and EAX..EDX bytes"]
    lines += [f"{off:#x} {data.hex()}" for off, data in sorted(leaves.items())]
    return "\n".join(lines) + "\n"


def _no_commands(argv: list, timeout: float) -> str:
    raise RuntimeError("commands disabled when inspecting a non-live root")


class HostView:
    """Read-only view of a machine: files under ``root``, an environment, a command runner.

    With ``root="/"`` (the default) this is the live machine and commands really run.
    With any other root, commands are disabled unless a runner is injected, so a fake
    tree never mixes with facts from the real machine.
    """

    def __init__(self, root: str = "/", env: dict | None = None, run: Runner | None = None):
        self.root = root or "/"
        self.live = os.path.realpath(self.root) == "/"
        self.env = dict(os.environ) if env is None else dict(env)
        self._run = run if run is not None else (_run_command if self.live else _no_commands)
        self._cache: dict = {}

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))

    def read_bytes(self, p: str, limit: int = 4 << 20) -> bytes:
        """The first ``limit`` bytes of ``p`` under the root. Raises OSError."""
        chunks, total = [], 0
        with open(self.path(p), "rb", buffering=0) as f:
            # Small reads: procfs sysctl files fail with ENOMEM on huge buffers.
            while total < limit:
                chunk = f.read(min(65536, limit - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        return b"".join(chunks)

    def read(self, p: str, limit: int = 4 << 20) -> tuple[str | None, str]:
        """(text, "") on success, (None, reason) on failure. Cached per view."""
        key = ("read", p)
        if key not in self._cache:
            try:
                self._cache[key] = (self.read_bytes(p, limit).decode("utf-8", "replace"), "")
            except FileNotFoundError:
                self._cache[key] = (None, f"{p} not found")
            except PermissionError:
                self._cache[key] = (None, f"{p} not readable (permission denied)")
            except OSError as e:
                self._cache[key] = (None, f"{p} unreadable: {e.strerror or e}")
        return self._cache[key]

    def text(self, p: str) -> str | None:
        return self.read(p)[0]

    def first_line(self, p: str) -> str | None:
        t = self.text(p)
        if t is None:
            return None
        t = t.strip().replace("\x00", " ").strip()
        return t.splitlines()[0].strip() if t else ""

    def pread(self, p: str, n: int, offset: int) -> tuple[bytes | None, str]:
        """(n bytes at offset, "") or (None, reason). A CPUID device (/dev/cpu/N/cpuid) of a
        captured root may be stored as ``cpuid.leaves`` text instead (see :func:`read_leaves`)."""
        try:
            fd = os.open(self.path(p), os.O_RDONLY)
        except FileNotFoundError:
            if not self.live and CPUID_DEVICE.fullmatch(p) and os.path.exists(self.path(p + LEAVES_SUFFIX)):
                return self._pread_leaves(p, n, offset)
            return None, f"{p} not found"
        except PermissionError:
            return None, f"{p} not readable (permission denied)"
        except OSError as e:
            return None, f"{p} unopenable: {e.strerror or e}"
        try:
            data = os.pread(fd, n, offset)
        except OSError as e:
            return None, f"{p} read at {offset:#x} failed: {e.strerror or e}"
        finally:
            os.close(fd)
        if len(data) < n:
            return None, f"{p} short read at {offset:#x}"
        return data, ""

    def _pread_leaves(self, p: str, n: int, offset: int) -> tuple[bytes | None, str]:
        src = p + LEAVES_SUFFIX
        try:
            with open(self.path(src), encoding="ascii", errors="replace") as f:
                leaves = read_leaves(f.read())
        except (OSError, ValueError) as e:
            return None, f"{src} unreadable: {e}"
        data = leaves.get(offset)
        if data is None or len(data) < n:
            return None, f"{p} short read at {offset:#x} (leaf not in {src})"
        return data[:n], ""

    def exists(self, p: str) -> bool:
        return os.path.lexists(self.path(p))

    def isdir(self, p: str) -> bool:
        return os.path.isdir(self.path(p))

    def listdir(self, p: str) -> list[str] | None:
        try:
            # ".keep" holds otherwise empty directories of a snapshot in git.
            return sorted(n for n in os.listdir(self.path(p)) if n != ".keep")
        except OSError:
            return None

    def run(self, argv: list, timeout: float = 2.0) -> tuple[str | None, str]:
        """(stdout, "") or (None, reason). Cached per view."""
        key = ("run", tuple(argv))
        if key not in self._cache:
            try:
                out = self._run(list(argv), timeout)
                self._cache[key] = (out if isinstance(out, str) else str(out), "")
            except FileNotFoundError:
                self._cache[key] = (None, f"{argv[0]} not installed")
            except subprocess.TimeoutExpired:
                self._cache[key] = (None, f"{argv[0]} timed out after {timeout}s")
            except Exception as e:  # noqa: BLE001 - never raise from detection
                self._cache[key] = (None, f"{argv[0]} failed: {e}")
        return self._cache[key]

    def kernel_release(self) -> tuple[str | None, str]:
        rel = self.first_line("/proc/sys/kernel/osrelease")
        if rel:
            return rel, "/proc/sys/kernel/osrelease"
        if self.live:
            try:
                return os.uname().release, "os.uname().release"
            except Exception:  # noqa: BLE001
                pass
        return None, "/proc/sys/kernel/osrelease unreadable"


# ----------------------------------------------------------------------------- helpers

def cpuinfo_flags(view: HostView) -> set[str] | None:
    """The first processor's ISA flags (x86 "flags", arm "Features"), or None if unreadable."""
    text = view.text("/proc/cpuinfo")
    if text is None:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return set()


# CPUID leaf 0x40000000 vendor signatures (EBX, ECX, EDX) -> hypervisor kind.
CPUID_VENDORS = {
    "KVMKVMKVM": "kvm",
    "Linux KVM Hv": "kvm",  # KVM exposing Hyper-V enlightenments
    "Microsoft Hv": "hyper-v",
    "VMwareVMware": "vmware",
    "XenVMMXenVMM": "xen",
    "TCGTCGTCGTCG": "qemu",  # QEMU pure emulation (no KVM)
    "VBoxVBoxVBox": "virtualbox",
    "bhyve bhyve": "bhyve",
    "lrpepyh vr": "parallels",
    "prl hyperv": "parallels",
    "ACRNACRNACRN": "acrn",
    "QNXQVMBSQG": "qnx",
    "EVMMEVMMEVMM": "evmm",
    "SRESRESRESRE": "sre",
    "Jailhouse": "jailhouse",
    "HAXMHAXMHAXM": "haxm",
}

# lscpu "Hypervisor vendor:" values and /sys/hypervisor/type values -> kind.
NAMED_VENDORS = {
    "kvm": "kvm", "microsoft": "hyper-v", "vmware": "vmware", "xen": "xen", "qemu": "qemu",
    "tcg": "qemu", "virtualbox": "virtualbox", "innotek": "virtualbox", "bhyve": "bhyve",
    "parallels": "parallels", "acrn": "acrn", "qnx": "qnx", "zvm": "zvm", "ibm/s390": "zvm",
    "apple": "apple", "spectrum": "spectrum",
}

# DMI substrings (case-insensitive) that identify a virtual machine: (pattern, kind).
DMI_VIRTUAL = (
    ("qemu", "qemu"),
    ("standard pc (", "qemu"),
    ("kvm", "kvm"),
    ("vmware", "vmware"),
    ("virtualbox", "virtualbox"),
    ("innotek", "virtualbox"),
    ("xen", "xen"),
    ("bochs", "qemu"),
    ("bhyve", "bhyve"),
    ("parallels", "parallels"),
    ("cloud hypervisor", "cloud-hypervisor"),
    ("openstack", "kvm"),
    ("apple virtualization", "apple"),
)
# Cloud vendors: these also appear on bare-metal instances (e.g. "Amazon EC2"/"m7i.metal"),
# so they name the platform but do not prove a hypervisor on their own.
DMI_CLOUDS = (
    ("amazon ec2", "Amazon EC2"),
    ("google compute engine", "Google Compute Engine"),
    ("google", "Google Cloud"),
    ("alibaba cloud", "Alibaba Cloud"),
    ("oraclecloud", "Oracle Cloud"),
    ("digitalocean", "DigitalOcean"),
    ("hetzner", "Hetzner"),
    ("scaleway", "Scaleway"),
    ("tencent cloud", "Tencent Cloud"),
    ("microsoft corporation", "Microsoft"),
)
DMI_FIELDS = ("sys_vendor", "product_name", "product_version", "bios_vendor", "board_vendor",
              "chassis_vendor", "chassis_asset_tag")

# User-space VMMs that run on top of a kernel hypervisor (reported as their own layer).
VMMS = {"qemu", "firecracker", "cloud-hypervisor", "crosvm", "wsl2", "nitro"}


class _Layers:
    """Accumulates evidence per (layer, kind) in discovery order."""

    def __init__(self):
        self._layers: list[dict] = []

    def add(self, layer: str, kind: str, evidence: str | Iterable[str] = (), **extra) -> dict:
        for entry in self._layers:
            if entry["layer"] == layer and entry["kind"] == kind:
                break
        else:
            entry = {"layer": layer, "kind": kind, "evidence": []}
            self._layers.append(entry)
        for line in [evidence] if isinstance(evidence, str) else evidence:
            if line and line not in entry["evidence"]:
                entry["evidence"].append(line)
        for k, v in extra.items():
            entry.setdefault(k, v)
        return entry

    def find(self, layer: str, kind: str | None = None) -> list[dict]:
        return [e for e in self._layers if e["layer"] == layer and (kind is None or e["kind"] == kind)]

    def all(self) -> list[dict]:
        return list(self._layers)


# ----------------------------------------------------------------------------- hypervisor

def _cpuid_signature(view: HostView, leaf: int) -> tuple[str | None, str]:
    """Vendor signature (EBX, ECX, EDX) of a hypervisor CPUID leaf via /dev/cpu/0/cpuid.

    The Linux cpuid driver returns leaf L's EAX..EDX (16 bytes) when read at offset L
    (Documentation/arch/x86/cpuid, "cpuid" driver); it needs root and the cpuid module."""
    data, reason = view.pread("/dev/cpu/0/cpuid", 16, leaf)
    if data is None:
        return None, reason
    raw = data[4:16]  # EBX, ECX, EDX
    vendor = raw.replace(b"\x00", b"").decode("ascii", "replace").strip()
    if not vendor or not all(32 <= b < 127 for b in raw.replace(b"\x00", b"")):
        return None, f"CPUID leaf {leaf:#x} has no hypervisor vendor signature"
    return vendor, ""


def _cpuid_vendor(view: HostView) -> tuple[str | None, str]:
    """Hypervisor vendor from CPUID leaf 0x40000000 (see :func:`_cpuid_signature`)."""
    return _cpuid_signature(view, 0x40000000)


# Xen and KVM can present Hyper-V's interface ("Microsoft Hv") at 0x40000000 for Windows
# guests and move their own signature up by 0x100 (Xen: "viridian" option, Xen docs
# xl.cfg; KVM: hv_* enlightenments, QEMU docs/system/i386/hyperv.rst). systemd-detect-virt
# reads the shifted leaf for the same reason (systemd issue 8844).
CPUID_SHIFTED_LEAF = 0x40000100


def _kind_from_cpuid_vendor(vendor: str) -> str:
    for sig, kind in CPUID_VENDORS.items():
        if vendor.startswith(sig) or sig.startswith(vendor):
            return kind
    return "unknown"


def _kind_from_name(name: str) -> str:
    low = name.strip().lower()
    for key, kind in NAMED_VENDORS.items():
        if low.startswith(key) or key in low:
            return kind
    return low.replace(" ", "-") or "unknown"


def smbios_vm_bit(view: HostView) -> tuple[bool | None, str]:
    """SMBIOS type 0 (BIOS information) "virtual machine" flag.

    Byte 0x13 is BIOS characteristics extension byte 2; its bit 4 says "this is a virtual
    machine" (DMTF SMBIOS reference specification DSP0134, 7.1.2.2). The kernel exposes
    the raw structure at /sys/firmware/dmi/entries/0-0/raw. Returns (set?, evidence/reason);
    None where the table is absent or too short to hold the byte."""
    path = "/sys/firmware/dmi/entries/0-0/raw"
    data, why = view.pread(path, 2, 0)
    if data is None:
        return None, why
    length = data[1]  # formatted-area length of this structure
    if length <= 0x13:
        return None, f"{path}: type-0 structure of {length} bytes has no extension byte 2"
    b, why = view.pread(path, 1, 0x13)
    if b is None:
        return None, why
    return bool(b[0] & 0x10), f"{path} byte 0x13 = {b[0]:#04x} (bit 4: virtual machine)"


# Hypervisor behind a cloud's virtual instances, where the cloud documents it: EC2's Nitro
# hypervisor is built on KVM (AWS "The Security Design of the AWS Nitro System"); GCE guests
# run on KVM (Google Cloud docs, "Compute Engine security: hypervisor"). Used only once a
# VM is proven by another signal, since the same DMI strings appear on bare-metal instances.
CLOUD_HYPERVISOR = {"Amazon EC2": ("kvm", "nitro"), "Google Compute Engine": ("kvm", None),
                    "Google Cloud": ("kvm", None)}


def wsl_generation(view: HostView) -> tuple[int | None, str]:
    """1 for WSL1, 2 for WSL2, None otherwise, with the evidence.

    WSL1 serves Linux system calls from the NT kernel: kernel release like
    ``4.4.0-19041-Microsoft``, root file system ``wslfs`` or ``lxfs``; it is no VM
    (systemd treats it as the container-like "wsl", systemd PR 11932). WSL2 runs a real
    Linux kernel in a Hyper-V utility VM: release like ``5.15.90.1-microsoft-standard-WSL2``
    (Microsoft's WSL docs, "Comparing WSL 1 and WSL 2")."""
    release, _ = view.kernel_release()
    low = (release or "").lower()
    rootfs = None
    for line in (view.text("/proc/self/mountinfo") or "").splitlines():
        parts = line.split()
        if len(parts) > 6 and parts[4] == "/" and " - " in line:
            rootfs = line.split(" - ", 1)[1].split()[0]
    if "wsl2" in low or "microsoft-standard" in low:
        return 2, f"kernel release {release}"
    if rootfs in ("wslfs", "lxfs"):
        return 1, f"root filesystem is {rootfs} (/proc/self/mountinfo)"
    if release and re.search(r"-microsoft$", low) and low.startswith("4.4."):
        return 1, f"kernel release {release}"
    return None, ""


def _hypervisor(view: HostView, layers: _Layers, notes: list[str]) -> None:
    generic: list[str] = []  # evidence that says "some hypervisor" without naming it
    named: list[tuple[str, str]] = []  # (kind, evidence), strongest source first
    platform: list[tuple[str, str]] = []  # (cloud label, evidence)
    enlightened: list[str] = []  # a Hyper-V interface offered by some hypervisor
    firm: set[str] = set()  # kinds named by DMI, /sys/hypervisor, /proc/xen, device tree

    flags = cpuinfo_flags(view)
    if flags is None:
        notes.append(view.read("/proc/cpuinfo")[1])
    elif "hypervisor" in flags:
        generic.append("cpuinfo flags: hypervisor")

    # CPUID 0x40000000, else lscpu's reading of it, else nothing.
    vendor, reason = _cpuid_vendor(view)
    if vendor:
        kind = _kind_from_cpuid_vendor(vendor)
        ev = f"CPUID leaf 0x40000000 vendor: {vendor}"
        if kind == "hyper-v":
            shifted, _ = _cpuid_signature(view, CPUID_SHIFTED_LEAF)
            skind = _kind_from_cpuid_vendor(shifted) if shifted else None
            if skind and skind not in ("hyper-v", "unknown"):
                # The real hypervisor, offering Hyper-V enlightenments at the base leaf.
                named.append((skind, f"CPUID leaf {CPUID_SHIFTED_LEAF:#x} vendor: {shifted}"))
                enlightened.append(ev + " (Hyper-V enlightenments)")
            else:
                named.append((kind, ev))
        else:
            named.append((kind, ev))
    else:
        notes.append(f"CPUID: {reason}")
        out, why = view.run(["lscpu"])
        if out is None:
            notes.append(f"lscpu: {why}")
        else:
            for line in out.splitlines():
                if line.lower().startswith("hypervisor vendor:"):
                    val = line.split(":", 1)[1].strip()
                    if val:
                        named.append((_kind_from_name(val), f"lscpu Hypervisor vendor: {val}"))

    hv_type = view.first_line("/sys/hypervisor/type")
    if hv_type:
        k = _kind_from_name(hv_type)
        named.append((k, f"/sys/hypervisor/type: {hv_type}"))
        firm.add(k)
    if view.exists("/proc/xen"):
        named.append(("xen", "/proc/xen exists"))
        firm.add("xen")

    # DMI.
    dmi_present = view.isdir("/sys/class/dmi/id") or view.isdir("/sys/class/dmi")
    if dmi_present:
        for field in DMI_FIELDS:
            val = view.first_line(f"/sys/class/dmi/id/{field}")
            if not val:
                continue
            low = val.lower()
            hit = False
            for pat, kind in DMI_VIRTUAL:
                if pat in low:
                    if kind == "xen" and "xenon" in low:
                        continue
                    named.append((kind, f"DMI {field}: {val}"))
                    firm.add(kind)
                    hit = True
                    break
            if not hit and field in ("sys_vendor", "product_name", "bios_vendor", "board_vendor"):
                for pat, cloud in DMI_CLOUDS:
                    if pat in low:
                        platform.append((cloud, f"DMI {field}: {val}"))
                        break
            if field == "product_name" and low == "virtual machine":
                named.append(("hyper-v", f"DMI {field}: {val}"))
                firm.add("hyper-v")
    vm_bit, vm_why = smbios_vm_bit(view)
    if vm_bit:
        generic.append(f"SMBIOS type 0 says virtual machine ({vm_why})")

    # Device tree (arm, ppc, riscv). "linux,dummy-virt" is the generic board that QEMU's
    # "virt" machine, crosvm, kvmtool and Firecracker all present: a VM, but no VMM's name.
    compat = view.text("/proc/device-tree/compatible")
    if compat:
        items = [c for c in compat.split("\x00") if c]
        for c in items:
            if c == "linux,dummy-virt":
                generic.append(f"/proc/device-tree/compatible: {c} (generic virtual board)")
            elif c.startswith("qemu,"):
                named.append(("qemu", f"/proc/device-tree/compatible: {c}"))
            elif "firecracker" in c:
                named.append(("firecracker", f"/proc/device-tree/compatible: {c}"))
    # PSCI through HVC: the kernel's power-state firmware calls trap to a hypervisor at EL2;
    # on bare metal they go to secure firmware through SMC (Arm DEN0022 PSCI, "conduit";
    # Linux Documentation/devicetree/bindings/arm/psci.yaml "method").
    psci = (view.first_line("/proc/device-tree/psci/method") or "").replace("\x00", "").strip()
    if psci == "hvc":
        generic.append("/proc/device-tree/psci/method: hvc (firmware calls go to a hypervisor)")
    hv_node = view.text("/proc/device-tree/hypervisor/compatible")
    if hv_node:
        items = [c for c in hv_node.split("\x00") if c]
        kind = "xen" if any("xen" in c for c in items) else ("kvm" if any("kvm" in c for c in items) else "unknown")
        named.append((kind, f"/proc/device-tree/hypervisor/compatible: {', '.join(items)}"))
        firm.add(kind)
    # The kvm_ptp driver registers a PTP clock named "KVM virtual PTP" only under KVM
    # (x86 and arm64; Linux drivers/ptp/ptp_kvm_common.c).
    for ptp in view.listdir("/sys/class/ptp") or []:
        name = view.first_line(f"/sys/class/ptp/{ptp}/clock_name") or ""
        if "kvm" in name.lower():
            named.append(("kvm", f"/sys/class/ptp/{ptp}/clock_name: {name}"))

    wsl, wsl_ev = wsl_generation(view)
    if wsl == 2:
        named.append(("hyper-v", f"{wsl_ev} (WSL2 runs in a Hyper-V VM)"))
        named.append(("wsl2", wsl_ev))
    elif wsl == 1:
        notes.append(f"WSL1 ({wsl_ev}): system calls served by the NT kernel, no VM")
    else:
        release, _ = view.kernel_release()
        if release and "microsoft" in release.lower():
            notes.append(f"kernel release {release} names Microsoft, but neither WSL1 nor WSL2 "
                         "is recognised; not taken as a hypervisor on its own")

    # A Hyper-V signature read from CPUID (or lscpu) is an enlightenment interface when a
    # firmer source (DMI, /sys/hypervisor, /proc/xen, device tree) names another hypervisor.
    # QEMU's DMI counts too: QEMU offers Hyper-V enlightenments (hv-* CPU flags) only with
    # KVM acceleration (QEMU docs/system/i386/hyperv.rst), so the hypervisor is then KVM.
    others = [k for k in firm if k not in ("hyper-v", "unknown")]
    if others and any(k == "hyper-v" and not e.startswith("DMI") for k, e in named):
        keep = []
        for k, e in named:
            if k == "hyper-v" and not e.startswith("DMI"):
                enlightened.append(e + " (Hyper-V enlightenments)")
            else:
                keep.append((k, e))
        named = keep
        if not any(k not in VMMS for k, _ in named) and "qemu" in others:
            named.insert(0, ("kvm", "Hyper-V enlightenments under QEMU (QEMU offers them only with KVM)"))

    # Decide. Kernel hypervisors first (in source-strength order), VMMs after them.
    hv_kinds = [k for k, _ in named if k not in VMMS]
    # "qemu" alone (TCG, or DMI with no CPUID reading) is both the hypervisor and the VMM.
    if not hv_kinds and any(k == "qemu" for k, _ in named):
        hv_kinds = ["qemu"]
    cloud_vmm = None
    if not hv_kinds and generic and platform and platform[0][0] in CLOUD_HYPERVISOR:
        kind, cloud_vmm = CLOUD_HYPERVISOR[platform[0][0]]
        named.append((kind, f"{platform[0][0]} virtual instances run on {kind.upper()}"
                            + (f" ({cloud_vmm})" if cloud_vmm else "")))
        hv_kinds = [kind]
    if not hv_kinds and (generic or named):
        hv_kinds = ["unknown"]
    if not hv_kinds:
        if platform:
            notes.append("no hypervisor signal although " + "; ".join(e for _, e in platform)
                         + " (bare-metal cloud instance?)")
        if vm_bit is False:
            notes.append(f"SMBIOS type 0 does not say virtual machine ({vm_why})")
        return

    primary = hv_kinds[0]
    extra = {"platform": platform[0][0]} if platform else {}
    layers.add("hypervisor", primary, generic + [e for k, e in named if k == primary] + enlightened
               + [e for _, e in platform], role="hypervisor", **extra)
    for kind in dict.fromkeys(hv_kinds[1:]):
        if kind != primary:
            layers.add("hypervisor", kind, [e for k, e in named if k == kind], role="hypervisor")

    # VMMs named directly (QEMU over KVM via DMI, device tree, WSL2).
    for kind, ev in named:
        if kind in VMMS and kind != primary:
            layers.add("hypervisor", kind, ev, role="vmm", on=primary)
    # EC2 Nitro: named from the cloud's DMI once KVM is established (x86 CPUID or arm VM bit).
    if primary == "kvm" and platform and CLOUD_HYPERVISOR.get(platform[0][0], (None, None))[1]:
        vmm = CLOUD_HYPERVISOR[platform[0][0]][1]
        layers.add("hypervisor", vmm, [e for _, e in platform], role="vmm", on=primary)

    _firecracker(view, layers, primary, dmi_present)


def _acpi_oem(view: HostView) -> list[str]:
    """ACPI table headers whose OEM ID says Firecracker ("FIRECK")."""
    out = []
    for name in ("DSDT", "FACP", "APIC", "MCFG"):
        data, _ = view.pread(f"/sys/firmware/acpi/tables/{name}", 16, 0)
        if data and data[10:16] == b"FIRECK":
            out.append(f"ACPI {name} OEM ID: FIRECK (/sys/firmware/acpi/tables/{name})")
            break
    return out


def _firecracker(view: HostView, layers: _Layers, primary: str, dmi_present: bool) -> None:
    strong: list[str] = []
    support: list[str] = []

    cmdline = view.text("/proc/cmdline") or ""
    if "firecracker" in cmdline.lower():
        m = re.search(r"\S*firecracker\S*", cmdline, re.IGNORECASE)
        strong.append(f"/proc/cmdline contains {m.group(0) if m else 'firecracker'}")
    strong += _acpi_oem(view)

    sys_mounted = view.isdir("/sys/class") or view.isdir("/sys/devices")
    no_dmi = sys_mounted and not dmi_present
    if "virtio_mmio.device=" in cmdline:
        support.append("virtio-mmio devices on /proc/cmdline (virtio_mmio.device=)")
    plat = view.listdir("/sys/bus/platform/devices") or []
    mmio = [d for d in plat if "virtio" in d.lower() and "mmio" in d.lower()]
    if mmio:
        support.append(f"virtio-mmio platform devices: {', '.join(mmio[:3])}")
    if sys_mounted and view.isdir("/sys/bus") and not view.listdir("/sys/bus/pci/devices"):
        support.append("no PCI devices (/sys/bus/pci/devices empty or absent)")

    # Device-tree boards (arm64) often lack DMI under any VMM, so there "no DMI" is weak;
    # Firecracker's arm64 guests also have no PCI bus and only virtio-mmio devices
    # (Firecracker docs, "design.md": virtio-mmio, no PCI).
    fdt = view.exists("/proc/device-tree/compatible")
    mmio_no_pci = any(e.startswith("no PCI") for e in support) and any("virtio-mmio" in e for e in support)
    # Firecracker: KVM with no DMI tables (it provides no SMBIOS), or explicit markers.
    if strong or (primary == "kvm" and no_dmi and (not fdt or mmio_no_pci)):
        evidence = ([f"{primary.upper()} hypervisor without DMI tables (/sys/class/dmi absent)"]
                    if no_dmi else []) + strong + support
        layers.add("hypervisor", "firecracker", evidence, role="vmm", on=primary)


# ----------------------------------------------------------------------------- containers

CGROUP_PATTERNS = (
    (re.compile(r"kubepods"), "kubernetes"),
    (re.compile(r"cri-containerd|containerd"), "containerd"),
    (re.compile(r"crio-|/crio"), "cri-o"),
    (re.compile(r"/docker[/-]|docker-[0-9a-f]+\.scope|/docker$"), "docker"),
    (re.compile(r"libpod"), "podman"),
    (re.compile(r"/lxc[/.]|lxc\.payload|/lxc$"), "lxc"),
    (re.compile(r"machine\.slice/.*nspawn|systemd-nspawn"), "systemd-nspawn"),
    (re.compile(r"runsc"), "gvisor"),
)
CONTAINER_ORDER = ("kubernetes", "containerd", "cri-o", "docker", "podman", "lxc",
                   "systemd-nspawn", "wsl", "unknown")
ENV_CONTAINER = {"docker": "docker", "podman": "podman", "oci": "unknown", "lxc": "lxc",
                 "lxc-libvirt": "lxc", "systemd-nspawn": "systemd-nspawn", "wsl": "wsl"}


def _short_cgroup(path: str) -> str:
    return re.sub(r"[0-9a-f]{16,}", lambda m: m.group(0)[:12] + "…", path)


def _containers(view: HostView, layers: _Layers, sandbox_hits: list[str], notes: list[str]) -> None:
    found: dict[str, list[str]] = {}

    def hit(kind: str, ev: str) -> None:
        found.setdefault(kind, []).append(ev)

    if view.exists("/.dockerenv"):
        hit("docker", "/.dockerenv exists")
    wsl, wsl_ev = wsl_generation(view)
    if wsl == 1:  # no VM: a translation layer, reported like systemd's container "wsl"
        hit("wsl", f"WSL1: {wsl_ev}")
    if view.exists("/run/.containerenv"):
        content = view.text("/run/.containerenv") or ""
        engine = re.search(r'engine="([^"]+)"', content)
        hit("podman", "/run/.containerenv exists" + (f" (engine {engine.group(1)})" if engine else ""))
    systemd_container = view.first_line("/run/systemd/container")
    if systemd_container:
        hit(ENV_CONTAINER.get(systemd_container, systemd_container), f"/run/systemd/container: {systemd_container}")

    for src in ("/proc/self/cgroup", "/proc/1/cgroup"):
        text, why = view.read(src)
        if text is None:
            notes.append(why)
            continue
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            for pat, kind in CGROUP_PATTERNS:
                if pat.search(path):
                    ev = f"{src}: {_short_cgroup(path)}"
                    if kind == "gvisor":
                        sandbox_hits.append(ev)
                    else:
                        hit(kind, ev)

    env_host = view.env.get("KUBERNETES_SERVICE_HOST")
    if env_host:
        hit("kubernetes", "KUBERNETES_SERVICE_HOST is set")
    if view.isdir("/var/run/secrets/kubernetes.io") or view.isdir("/run/secrets/kubernetes.io"):
        hit("kubernetes", "/var/run/secrets/kubernetes.io exists")
    if view.env.get("container"):
        val = view.env["container"]
        hit(ENV_CONTAINER.get(val, val), f"environment container={val}")

    environ, why = view.read("/proc/1/environ")
    if environ is None:
        notes.append(why)
    else:
        for item in environ.split("\x00"):
            if item.startswith("container="):
                val = item.split("=", 1)[1]
                hit(ENV_CONTAINER.get(val, val), f"/proc/1/environ container={val}")

    overlay = None
    mountinfo = view.text("/proc/self/mountinfo")
    if mountinfo:
        for line in mountinfo.splitlines():
            parts = line.split()
            if len(parts) > 6 and parts[4] == "/" and " - " in line:
                fstype = line.split(" - ", 1)[1].split()[0]
                if fstype in ("overlay", "aufs", "fuse-overlayfs"):
                    overlay = f"root filesystem is {fstype} (/proc/self/mountinfo)"
    if overlay:
        if found:
            # Attach to the innermost runtime found.
            inner = [k for k in CONTAINER_ORDER if k in found][-1]
            found[inner].append(overlay)
        else:
            hit("unknown", overlay)

    for kind in sorted(found, key=lambda k: CONTAINER_ORDER.index(k) if k in CONTAINER_ORDER else 99):
        layers.add("container", kind, found[kind])


# ----------------------------------------------------------------------------- sandboxes

GVISOR_VERSION_DATE = "Sun Jan 10 15:06:54 PST 2016"


def _sandbox(view: HostView, layers: _Layers, sandbox_hits: list[str], notes: list[str]) -> None:
    evidence: list[str] = list(sandbox_hits)
    release, src = view.kernel_release()
    kernel_440 = release == "4.4.0"
    if kernel_440:
        evidence.insert(0, f"kernel release 4.4.0 ({src})")
    version = view.text("/proc/version") or ""
    if GVISOR_VERSION_DATE in version:
        evidence.append(f"/proc/version has gVisor's fixed build date ({GVISOR_VERSION_DATE})")
    out, why = view.run(["dmesg"], 2.0)
    dmesg_hit = False
    if out is None:
        notes.append(f"dmesg: {why}")
    else:
        for line in out.splitlines():
            if "gvisor" in line.lower():
                evidence.append(f"dmesg: {line.strip()[:120]}")
                dmesg_hit = True
                break
    others = len(evidence) - (1 if kernel_440 else 0)
    if dmesg_hit or (kernel_440 and others >= 1) or len(sandbox_hits) + (GVISOR_VERSION_DATE in version) >= 2:
        layers.add("sandbox", "gvisor", evidence)


# ----------------------------------------------------------------------------- steal time

def steal_time(view: HostView) -> dict:
    text, why = view.read("/proc/stat")
    if text is None:
        return {"available": False, "steal_ticks": None, "source": "/proc/stat", "reason": why}
    for line in text.splitlines():
        if line.startswith("cpu "):
            fields = line.split()[1:]
            if len(fields) >= 8:
                try:
                    return {"available": True, "steal_ticks": int(fields[7]), "source": "/proc/stat"}
                except ValueError:
                    break
            return {"available": False, "steal_ticks": None, "source": "/proc/stat",
                    "reason": f"cpu line has {len(fields)} columns, steal is the 8th"}
    return {"available": False, "steal_ticks": None, "source": "/proc/stat",
            "reason": "no aggregate 'cpu ' line"}


# ----------------------------------------------------------------------------- public API

def order_layers(layers: list[dict]) -> list[dict]:
    """Stable sort by nesting group (hypervisor > sandbox > container > gpu_virtualization)."""
    rank = {name: i for i, name in enumerate(LAYER_ORDER)}
    return sorted(layers, key=lambda e: rank.get(e.get("layer"), len(rank)))


def summarize(layers: list[dict]) -> str:
    """"kvm/firecracker > docker"; GPU virtualization appended in brackets; "bare-metal" if none."""
    groups: list[str] = []
    gpu: list[str] = []
    for name in LAYER_ORDER:
        kinds = list(dict.fromkeys(e["kind"] for e in layers if e.get("layer") == name))
        if not kinds:
            continue
        if name == "gpu_virtualization":
            gpu = kinds
        else:
            groups.append("/".join(kinds))
    text = " > ".join(groups) if groups else "bare-metal"
    if gpu:
        text += f" [gpu: {'/'.join(gpu)}]"
    return text


def detect(root: str = "/", env: dict | None = None, run: Runner | None = None,
           view: HostView | None = None) -> dict:
    """All virtualization layers visible from here, outermost first, with evidence.

    Returns ``{"layers": [...], "steal_time": {...}, "summary": str, "notes": [...]}``;
    ``notes`` lists reads that failed (why a signal could not be checked). Never raises.
    """
    view = view or HostView(root, env, run)
    layers = _Layers()
    notes: list[str] = []
    sandbox_hits: list[str] = []
    for step in (
        lambda: _hypervisor(view, layers, notes),
        lambda: _containers(view, layers, sandbox_hits, notes),
        lambda: _sandbox(view, layers, sandbox_hits, notes),
    ):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - a detection bug must not break a run
            notes.append(f"detection error: {type(e).__name__}: {e}")
    try:
        steal = steal_time(view)
    except Exception as e:  # noqa: BLE001
        steal = {"available": False, "steal_ticks": None, "source": "/proc/stat", "reason": str(e)}
    ordered = order_layers(layers.all())
    return {
        "layers": ordered,
        "steal_time": steal,
        "summary": summarize(ordered),
        "notes": [n for n in dict.fromkeys(notes) if n],
    }
