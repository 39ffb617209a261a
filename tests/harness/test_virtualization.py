"""Virtualization detection against fake filesystem trees (and once against this machine)."""

from __future__ import annotations

import os

import pytest

from harness import virtualization as virt


def make_tree(root, files: dict, dirs=()):
    for rel, content in files.items():
        path = os.path.join(root, rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as f:
            f.write(content)
    for rel in dirs:
        os.makedirs(os.path.join(root, rel.lstrip("/")), exist_ok=True)
    return str(root)


def runner(outputs: dict):
    """Fake command runner: argv[0] -> stdout; anything else is 'not installed'."""
    calls = []

    def run(argv, timeout):
        calls.append(argv)
        if argv[0] in outputs:
            out = outputs[argv[0]]
            if isinstance(out, Exception):
                raise out
            return out
        raise FileNotFoundError(argv[0])

    run.calls = calls
    return run


X86_FLAGS = "fpu vme de pse tsc msr sse sse2 ht syscall nx lm avx avx2 fma avx512f"
STAT = "cpu  5181 0 2028 286701 146 0 21 16 0 0\ncpu0 321 0 466 146217 22 0 3 5 0 0\n"
LSCPU_BARE = "Architecture: x86_64\nModel name: Intel(R) Xeon(R) Gold 6338\n"
LSCPU_KVM = LSCPU_BARE + "Hypervisor vendor:                       KVM\nVirtualization type: full\n"


def cpuinfo(flags: str, n: int = 2) -> str:
    block = ("processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 106\n"
             "model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\nstepping\t: 6\n"
             "cpu MHz\t\t: 2000.000\nphysical id\t: 0\ncore id\t\t: {i}\nflags\t\t: {flags}\n\n")
    return "".join(block.format(i=i, flags=flags) for i in range(n))


def base_files(hypervisor_flag: bool, release: str = "5.15.0-91-generic") -> dict:
    return {
        "/proc/cpuinfo": cpuinfo(X86_FLAGS + (" hypervisor" if hypervisor_flag else "")),
        "/proc/stat": STAT,
        "/proc/sys/kernel/osrelease": release + "\n",
        "/proc/sys/kernel/hostname": "node17.example.org\n",
        "/proc/cmdline": "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n",
        "/proc/self/cgroup": "0::/user.slice/user-1000.slice/session-3.scope\n",
        "/proc/1/cgroup": "0::/init.scope\n",
        "/proc/self/mountinfo": "27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n",
        "/proc/version": f"Linux version {release} (buildd@lcy02) #101-Ubuntu SMP\n",
        "/sys/bus/pci/devices/0000:00:00.0/vendor": "0x8086\n",
        "/sys/class/net/eth0/address": "00:11:22:33:44:55\n",
    }


def kinds(result, layer=None):
    return [(e["layer"], e["kind"]) for e in result["layers"] if layer is None or e["layer"] == layer]


def layer(result, kind):
    found = [e for e in result["layers"] if e["kind"] == kind]
    assert found, f"no {kind} layer in {result['layers']}"
    return found[0]


# (a) bare metal ---------------------------------------------------------------------------

def test_bare_metal_dell_has_no_layers(tmp_path):
    files = base_files(hypervisor_flag=False)
    files.update({"/sys/class/dmi/id/sys_vendor": "Dell Inc.\n",
                  "/sys/class/dmi/id/product_name": "PowerEdge R750\n",
                  "/sys/class/dmi/id/bios_vendor": "Dell Inc.\n"})
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({"lscpu": LSCPU_BARE, "dmesg": "[0.0] Linux version\n"}))
    assert r["layers"] == []
    assert r["summary"] == "bare-metal"
    assert r["steal_time"] == {"available": True, "steal_ticks": 16, "source": "/proc/stat"}


def test_bare_metal_cloud_instance_is_not_a_vm(tmp_path):
    files = base_files(hypervisor_flag=False)
    files.update({"/sys/class/dmi/id/sys_vendor": "Amazon EC2\n",
                  "/sys/class/dmi/id/product_name": "m7i.metal-48xl\n"})
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({"lscpu": LSCPU_BARE}))
    assert kinds(r, "hypervisor") == []
    assert any("Amazon EC2" in n for n in r["notes"])


# (b) KVM + QEMU with DMI ---------------------------------------------------------------------

def test_kvm_qemu_with_dmi_is_kvm_not_firecracker(tmp_path):
    files = base_files(hypervisor_flag=True)
    files.update({"/sys/class/dmi/id/sys_vendor": "QEMU\n",
                  "/sys/class/dmi/id/product_name": "Standard PC (Q35 + ICH9, 2009)\n",
                  "/sys/class/dmi/id/bios_vendor": "SeaBIOS\n"})
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({"lscpu": LSCPU_KVM}))
    assert kinds(r) == [("hypervisor", "kvm"), ("hypervisor", "qemu")]
    kvm = layer(r, "kvm")
    assert "cpuinfo flags: hypervisor" in kvm["evidence"]
    assert "lscpu Hypervisor vendor: KVM" in kvm["evidence"]
    assert layer(r, "qemu")["role"] == "vmm"
    assert any("DMI sys_vendor: QEMU" == e for e in layer(r, "qemu")["evidence"])
    assert "firecracker" not in r["summary"]
    assert r["summary"] == "kvm/qemu"


def test_cpuid_device_is_read_at_leaf_0x40000000(tmp_path):
    files = base_files(hypervisor_flag=True)
    files["/sys/class/dmi/id/sys_vendor"] = "Microsoft Corporation\n"
    files["/sys/class/dmi/id/product_name"] = "Virtual Machine\n"
    root = make_tree(tmp_path, files)
    cpuid = tmp_path / "dev/cpu/0/cpuid"
    cpuid.parent.mkdir(parents=True)
    with open(cpuid, "wb") as f:  # sparse file: EAX, then EBX ECX EDX = vendor signature
        f.seek(0x40000000)
        f.write(b"\x05\x00\x00\x40" + b"Microsoft Hv")
    run = runner({})
    r = virt.detect(root=root, env={}, run=run)
    hv = layer(r, "hyper-v")
    assert "CPUID leaf 0x40000000 vendor: Microsoft Hv" in hv["evidence"]
    assert "DMI product_name: Virtual Machine" in hv["evidence"]
    assert ["lscpu"] not in run.calls  # CPUID was readable, lscpu not needed
    assert kinds(r, "hypervisor") == [("hypervisor", "hyper-v")]


def test_xen_from_sys_hypervisor(tmp_path):
    files = base_files(hypervisor_flag=True)
    files["/sys/hypervisor/type"] = "xen\n"
    files["/sys/class/dmi/id/sys_vendor"] = "Xen\n"
    root = make_tree(tmp_path, files, dirs=["/proc/xen"])
    r = virt.detect(root=root, env={}, run=runner({}))
    xen = layer(r, "xen")
    assert {"/sys/hypervisor/type: xen", "/proc/xen exists", "DMI sys_vendor: Xen"} <= set(xen["evidence"])
    assert "firecracker" not in r["summary"]


# (c) Firecracker + docker + kubernetes -------------------------------------------------------

def test_kvm_without_dmi_in_kubernetes_docker(tmp_path):
    files = base_files(hypervisor_flag=True)
    del files["/sys/bus/pci/devices/0000:00:00.0/vendor"]
    files.update({
        "/.dockerenv": "",
        "/proc/self/cgroup": "0::/kubepods/burstable/pod1234/0123456789abcdef0123456789abcdef\n",
        "/proc/self/mountinfo": "600 500 0:52 / / rw,relatime - overlay overlay rw,lowerdir=/a\n",
        "/proc/cmdline": "console=ttyS0 reboot=k panic=1 pci=off virtio_mmio.device=4K@0xd0000000:5\n",
    })
    root = make_tree(tmp_path, files, dirs=["/sys/bus/pci/devices"])
    r = virt.detect(root=root, env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
                    run=runner({"lscpu": LSCPU_KVM, "dmesg": PermissionError("Operation not permitted")}))
    assert kinds(r) == [("hypervisor", "kvm"), ("hypervisor", "firecracker"),
                        ("container", "kubernetes"), ("container", "docker")]
    fc = layer(r, "firecracker")
    assert fc["role"] == "vmm" and fc["on"] == "kvm"
    assert any("without DMI" in e for e in fc["evidence"])
    assert any("virtio_mmio" in e for e in fc["evidence"])
    assert any("no PCI devices" in e for e in fc["evidence"])
    assert "/.dockerenv exists" in layer(r, "docker")["evidence"]
    assert any("overlay" in e for e in layer(r, "docker")["evidence"])
    k8s = layer(r, "kubernetes")["evidence"]
    assert "KUBERNETES_SERVICE_HOST is set" in k8s
    assert any(e.startswith("/proc/self/cgroup: /kubepods") for e in k8s)
    assert r["summary"] == "kvm/firecracker > kubernetes/docker"
    assert any("dmesg" in n for n in r["notes"])


def test_firecracker_cmdline_marker_alone(tmp_path):
    files = base_files(hypervisor_flag=True)
    files["/proc/cmdline"] = "console=ttyS0 -- --firecracker-init --addr 0.0.0.0:2024\n"
    files["/sys/class/dmi/id/sys_vendor"] = "Amazon EC2\n"  # DMI present, but explicit marker
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({"lscpu": LSCPU_KVM}))
    assert "/proc/cmdline contains --firecracker-init" in layer(r, "firecracker")["evidence"]
    assert layer(r, "kvm")["platform"] == "Amazon EC2"


def test_kvm_without_sysfs_is_not_called_firecracker(tmp_path):
    # A tree without /sys at all says nothing about DMI; don't infer Firecracker from absence.
    files = {k: v for k, v in base_files(hypervisor_flag=True).items() if not k.startswith("/sys")}
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({"lscpu": LSCPU_KVM}))
    assert kinds(r) == [("hypervisor", "kvm")]


def test_podman_and_lxc_signals(tmp_path):
    files = base_files(hypervisor_flag=False)
    files["/run/.containerenv"] = 'engine="podman-4.9.3"\nname="web"\n'
    files["/proc/1/environ"] = "PATH=/usr/bin\x00container=podman\x00"
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({}))
    ev = layer(r, "podman")["evidence"]
    assert '/run/.containerenv exists (engine podman-4.9.3)' in ev
    assert "/proc/1/environ container=podman" in ev
    assert r["summary"] == "podman"

    files = base_files(hypervisor_flag=False)
    files["/proc/1/cgroup"] = "0::/lxc.payload.web/init.scope\n"
    root2 = make_tree(tmp_path / "lxc", files)
    r2 = virt.detect(root=root2, env={}, run=runner({}))
    assert kinds(r2) == [("container", "lxc")]


# (d) gVisor -------------------------------------------------------------------------------

GVISOR_DMESG = ("[    0.000000] Starting gVisor...\n"
                "[    0.123456] Reticulating splines...\n[    0.345678] Ready!\n")


def test_gvisor_sandbox(tmp_path):
    files = base_files(hypervisor_flag=False, release="4.4.0")
    files["/proc/version"] = "Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016\n"
    files["/.dockerenv"] = ""
    root = make_tree(tmp_path, files)
    r = virt.detect(root=root, env={}, run=runner({"dmesg": GVISOR_DMESG}))
    g = layer(r, "gvisor")
    assert g["layer"] == "sandbox"
    assert "kernel release 4.4.0 (/proc/sys/kernel/osrelease)" in g["evidence"]
    assert "dmesg: [    0.000000] Starting gVisor..." in g["evidence"]
    assert any("Jan 10" in e for e in g["evidence"])
    assert r["summary"] == "gvisor > docker"


def test_kernel_440_alone_is_not_gvisor(tmp_path):
    root = make_tree(tmp_path, base_files(hypervisor_flag=False, release="4.4.0"))
    r = virt.detect(root=root, env={}, run=runner({"dmesg": RuntimeError("exit 1")}))
    assert kinds(r, "sandbox") == []
    root2 = make_tree(tmp_path / "u", base_files(hypervisor_flag=False, release="4.4.0-210-generic"))
    r2 = virt.detect(root=root2, env={}, run=runner({"dmesg": "[0.0] Linux version 4.4.0-210\n"}))
    assert kinds(r2, "sandbox") == []


# steal time, robustness ------------------------------------------------------------------

def test_steal_time_missing_column(tmp_path):
    root = make_tree(tmp_path, {"/proc/stat": "cpu  1 2 3 4\n"})
    st = virt.detect(root=root, env={}, run=runner({}))["steal_time"]
    assert st["available"] is False and st["steal_ticks"] is None and "8th" in st["reason"]


def test_empty_root_never_raises(tmp_path):
    r = virt.detect(root=str(tmp_path / "nothing-here"), env={})
    assert r["layers"] == [] and r["summary"] == "bare-metal"
    assert r["steal_time"]["available"] is False
    assert any("/proc/cpuinfo" in n for n in r["notes"])


def test_fake_root_does_not_run_real_commands(tmp_path):
    view = virt.HostView(str(tmp_path), env={})
    out, why = view.run(["lscpu"])
    assert out is None and "disabled" in why


# this machine ------------------------------------------------------------------------------

def test_live_detection_is_consistent_with_cpuinfo():
    r = virt.detect()
    assert isinstance(r["summary"], str)
    flags = virt.cpuinfo_flags(virt.HostView())
    if flags is not None and "hypervisor" in flags:
        assert kinds(r, "hypervisor"), r
    if os.path.exists("/.dockerenv"):
        assert ("container", "docker") in kinds(r)
    try:
        cmdline = open("/proc/cmdline").read()
    except OSError:
        cmdline = ""
    if "firecracker" in cmdline:
        assert ("hypervisor", "firecracker") in kinds(r)


@pytest.mark.parametrize("layers,expected", [
    ([], "bare-metal"),
    ([{"layer": "container", "kind": "docker"}, {"layer": "hypervisor", "kind": "kvm"}], "kvm > docker"),
    ([{"layer": "gpu_virtualization", "kind": "mig"}], "bare-metal [gpu: mig]"),
])
def test_summary(layers, expected):
    assert virt.summarize(virt.order_layers(layers)) == expected


# (field cases, ../shared/field-cases) ------------------------------------------------------

def _cpuid_file(root, leaves: dict) -> None:
    """/dev/cpu/0/cpuid as a sparse file: leaf L's EAX..EDX at offset L (Linux cpuid driver)."""
    import struct
    path = os.path.join(root, "dev/cpu/0/cpuid")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        for leaf, sig in leaves.items():
            f.seek(leaf)
            f.write(struct.pack("<I", leaf + 6) + sig.ljust(12, b"\0"))


XEN_DMI = {"/sys/class/dmi/id/sys_vendor": "Xen\n", "/sys/class/dmi/id/product_name": "HVM domU\n",
           "/sys/class/dmi/id/bios_vendor": "Xen\n", "/sys/hypervisor/type": "xen\n"}


def test_xen_with_viridian_is_xen_from_cpuid(tmp_path):
    # systemd issue 8844: a Xen HVM guest offers Hyper-V's interface at 0x40000000.
    root = make_tree(tmp_path, {**base_files(True), **XEN_DMI})
    _cpuid_file(root, {0x40000000: b"Microsoft Hv"})
    r = virt.detect(root=root, env={}, run=runner({}))
    assert r["summary"] == "xen"
    assert any("enlightenment" in e for e in layer(r, "xen")["evidence"])


def test_xen_with_viridian_is_xen_from_lscpu(tmp_path):
    root = make_tree(tmp_path, {**base_files(True), **XEN_DMI})
    r = virt.detect(root=root, env={}, run=runner({"lscpu": "Hypervisor vendor: Microsoft\n"}))
    assert r["summary"] == "xen"


def test_shifted_leaf_names_kvm_behind_hyperv_enlightenments(tmp_path):
    # KVM with hv_* enlightenments: "Microsoft Hv" at 0x40000000, KVM's own at 0x40000100.
    root = make_tree(tmp_path, {**base_files(True), "/sys/class/dmi/id/sys_vendor": "QEMU\n"})
    _cpuid_file(root, {0x40000000: b"Microsoft Hv", 0x40000100: b"KVMKVMKVM"})
    r = virt.detect(root=root, env={}, run=runner({}))
    assert kinds(r, "hypervisor") == [("hypervisor", "kvm"), ("hypervisor", "qemu")]


def test_real_hyperv_stays_hyperv(tmp_path):
    root = make_tree(tmp_path, {**base_files(True), "/sys/class/dmi/id/sys_vendor": "Microsoft Corporation\n",
                                "/sys/class/dmi/id/product_name": "Virtual Machine\n"})
    _cpuid_file(root, {0x40000000: b"Microsoft Hv"})
    r = virt.detect(root=root, env={}, run=runner({}))
    assert r["summary"] == "hyper-v"


def test_wsl1_is_no_vm(tmp_path):
    files = base_files(False, release="4.4.0-19041-Microsoft")
    files["/proc/self/mountinfo"] = "2 0 0:1 / / rw,noatime - wslfs rootfs rw\n"
    files["/proc/self/cgroup"] = files["/proc/1/cgroup"] = ""
    r = virt.detect(root=make_tree(tmp_path, files), env={}, run=runner({}))
    assert kinds(r, "hypervisor") == []
    assert kinds(r, "container") == [("container", "wsl")]


def test_wsl2_is_a_hyperv_vm(tmp_path):
    files = base_files(True, release="5.15.153.1-microsoft-standard-WSL2")
    r = virt.detect(root=make_tree(tmp_path, files), env={}, run=runner({}))
    assert [k for _, k in kinds(r, "hypervisor")] == ["hyper-v", "wsl2"]


def test_microsoft_in_release_alone_is_not_hyperv(tmp_path):
    files = base_files(False, release="6.1.0-azure-Microsoft-custom")
    r = virt.detect(root=make_tree(tmp_path, files), env={}, run=runner({}))
    assert r["layers"] == [] and any("Microsoft" in n for n in r["notes"])


ARM_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm cpuid\n"
               "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0c\n\n")


def _smbios0(vm: bool) -> bytes:
    raw = bytearray(0x18)
    raw[0], raw[1] = 0, 0x18
    raw[0x13] = 0x08 | (0x10 if vm else 0)
    return bytes(raw)


@pytest.mark.parametrize("vm", [True, False])
def test_arm64_ec2_vm_bit(tmp_path, vm):
    # systemd issue 18929: arm64 EC2 has no CPUID and no hypervisor flag; SMBIOS says VM.
    files = {**base_files(False), "/proc/cpuinfo": ARM_CPUINFO,
             "/sys/class/dmi/id/sys_vendor": "Amazon EC2\n",
             "/sys/class/dmi/id/product_name": "m6g.large\n" if vm else "m6g.metal\n",
             "/sys/firmware/dmi/entries/0-0/raw": _smbios0(vm)}
    r = virt.detect(root=make_tree(tmp_path, files), env={}, run=runner({}))
    if vm:
        assert [k for _, k in kinds(r, "hypervisor")] == ["kvm", "nitro"]
    else:
        assert r["layers"] == []


def test_dummy_virt_is_a_vm_but_not_qemu(tmp_path):
    files = {**base_files(False), "/proc/cpuinfo": ARM_CPUINFO,
             "/proc/device-tree/compatible": "linux,dummy-virt\0"}
    r = virt.detect(root=make_tree(tmp_path, files), env={}, run=runner({}))
    assert [k for _, k in kinds(r, "hypervisor")] == ["unknown"]


def test_kvm_ptp_clock_names_kvm_on_arm(tmp_path):
    files = {**base_files(False), "/proc/cpuinfo": ARM_CPUINFO,
             "/proc/device-tree/compatible": "linux,dummy-virt\0",
             "/sys/class/ptp/ptp0/clock_name": "KVM virtual PTP\n"}
    r = virt.detect(root=make_tree(tmp_path, files), env={}, run=runner({}))
    assert [k for _, k in kinds(r, "hypervisor")][0] == "kvm"


def test_qemu_dmi_with_hyperv_signature_from_lscpu_is_kvm(tmp_path):
    # CPUID unreadable (not root): lscpu reports Microsoft, DMI says QEMU -> KVM with enlightenments.
    root = make_tree(tmp_path, {**base_files(True), "/sys/class/dmi/id/sys_vendor": "QEMU\n"})
    r = virt.detect(root=root, env={}, run=runner({"lscpu": "Hypervisor vendor: Microsoft\n"}))
    assert [k for _, k in kinds(r, "hypervisor")] == ["kvm", "qemu"]
