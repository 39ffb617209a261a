"""Environment fingerprint: fake trees for the parsing, this machine for the shape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types

import pytest

from harness import environment as env
from tests.harness.test_virtualization import LSCPU_KVM, base_files, make_tree, runner


def leaves(obj, path=""):
    """Yield (path, fact) for every fact under obj; fail on any non-fact leaf."""
    if env.is_fact(obj):
        yield path, obj
        return
    assert isinstance(obj, dict), f"{path}: non-fact leaf {obj!r}"
    for k, v in obj.items():
        yield from leaves(v, f"{path}.{k}")


def fake_machine(tmp_path):
    files = base_files(hypervisor_flag=True)
    files.update({
        "/etc/machine-id": "0123456789abcdef0123456789abcdef\n",
        "/sys/class/dmi/id/sys_vendor": "Amazon EC2\n",
        "/sys/class/dmi/id/product_name": "m7i.4xlarge\n",
        "/sys/class/dmi/id/product_uuid": "ec2a1b2c-3d4e-5f60-7182-93a4b5c6d7e8\n",
        "/etc/os-release": 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nID=ubuntu\nVERSION_ID="22.04"\n',
        "/proc/meminfo": ("MemTotal:       16318596 kB\nMemAvailable:   12000000 kB\n"
                          "HugePages_Total:       4\nHugePages_Free:        3\nHugepagesize:       2048 kB\n"),
        "/sys/kernel/mm/transparent_hugepage/enabled": "[always] madvise never\n",
        "/sys/devices/system/node/node0/cpulist": "0-1\n",
        "/sys/devices/system/node/node1/cpulist": "2-3\n",
        "/proc/self/cgroup": "0::/kubepods/pod1/0123456789abcdef0123\n",
        "/sys/fs/cgroup/kubepods/pod1/0123456789abcdef0123/cpu.max": "200000 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/0123456789abcdef0123/memory.max": "8589934592\n",
    })
    # 4 logical cpus: 2 sockets x 2 cores; L1d/L2 per core, L3 per socket.
    for cpu in range(4):
        base = f"/sys/devices/system/cpu/cpu{cpu}"
        files[f"{base}/topology/physical_package_id"] = f"{cpu // 2}\n"
        files[f"{base}/topology/core_id"] = f"{cpu % 2}\n"
        files[f"{base}/cpufreq/scaling_cur_freq"] = "2400000\n"
        files[f"{base}/cpufreq/cpuinfo_max_freq"] = "3500000\n"
        for idx, (level, typ, size, shared) in enumerate([
                (1, "Data", "48K", str(cpu)), (1, "Instruction", "32K", str(cpu)),
                (2, "Unified", "1280K", str(cpu)), (3, "Unified", "48M", "0-1" if cpu < 2 else "2-3")]):
            c = f"{base}/cache/index{idx}"
            files[f"{c}/level"], files[f"{c}/type"] = f"{level}\n", f"{typ}\n"
            files[f"{c}/size"], files[f"{c}/shared_cpu_list"] = f"{size}\n", f"{shared}\n"
    return make_tree(tmp_path, files)


def fake_collect(root, **kw):
    return env.collect(root=root, env={}, run=runner({"lscpu": LSCPU_KVM}), live=False, **kw)


def test_fake_machine_facts(tmp_path):
    doc = fake_collect(fake_machine(tmp_path))
    cpu, mem = doc["cpu"], doc["memory"]
    assert cpu["model_name"] == env.fact("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "/proc/cpuinfo model name")
    assert cpu["family"]["value"] == 6 and cpu["model"]["value"] == 106
    assert cpu["logical_cores"]["value"] == 2  # the fake cpuinfo lists two processors
    assert cpu["physical_cores"]["value"] == 4 and cpu["sockets"]["value"] == 2
    assert cpu["numa_nodes"]["value"] == 2
    assert cpu["isa"]["value"]["avx512f"] is True and cpu["isa"]["value"]["amx_tile"] is False
    assert cpu["caches"]["L1d"]["size_bytes"]["value"] == 48 * 1024
    assert cpu["caches"]["L1d"]["instances"]["value"] == 4
    assert cpu["caches"]["L3"]["instances"]["value"] == 2
    assert cpu["last_level_cache_bytes"]["value"] == 2 * 48 * 1024 * 1024
    assert cpu["frequency"]["current_mhz"] == env.fact(2400.0, "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    assert cpu["frequency"]["max_mhz"]["value"] == 3500.0
    assert cpu["frequency"]["nominal_mhz"]["value"] == 2000.0
    assert cpu["cgroup_cpu_limit_cores"]["value"] == 2.0
    assert mem["total_bytes"] == env.fact(16318596 * 1024, "/proc/meminfo MemTotal")
    assert mem["cgroup_limit_bytes"]["value"] == 8 << 30
    assert mem["hugepages"]["total"]["value"] == 4
    assert mem["hugepages"]["page_size_bytes"]["value"] == 2 << 20
    assert mem["hugepages"]["transparent"]["value"] == "always"
    assert doc["os"]["distro"]["value"] == "Ubuntu 22.04.4 LTS"
    assert doc["os"]["kernel_release"] == env.fact("5.15.0-91-generic", "/proc/sys/kernel/osrelease")
    assert doc["host"]["hostname"]["value"] == "node17.example.org"
    assert doc["virtualization"]["summary"] == "kvm/nitro > kubernetes"  # EC2 DMI on KVM: Nitro
    assert doc["nvidia"]["available"] is False and doc["nvidia"]["reason"].startswith("not probed: sysroot")
    assert doc["frameworks"]["torch"]["reason"].startswith("not probed: sysroot")
    for _, f in leaves({"cpu": cpu, "memory": mem}):
        assert isinstance(f["source"], str) and f["source"]
    json.dumps(doc)


def test_arm_cpu(tmp_path):
    root = make_tree(tmp_path, {"/proc/cpuinfo": (
        "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd evtstrm aes sve asimdhp bf16 i8mm\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\n"
        "CPU revision\t: 1\n\n")})
    cpu = fake_collect(root)["cpu"]
    assert cpu["vendor"]["value"] == "ARM"
    assert cpu["model_name"]["value"] == "ARM Neoverse-V1"
    isa = cpu["isa"]["value"]
    assert isa["neon"] and isa["sve"] and isa["bf16"] and not isa["sve2"]
    assert "avx" not in isa


# (e) anonymization ------------------------------------------------------------------------

def test_anonymize_replaces_hostname_stably(tmp_path):
    root = fake_machine(tmp_path)
    a = fake_collect(root, anonymize=True, salt="pepper")
    b = fake_collect(root, anonymize=True, salt="pepper")
    c = fake_collect(root, anonymize=True, salt="other")
    plain = fake_collect(root)
    ha = a["host"]["hostname"]["value"]
    assert re.fullmatch(r"host-[0-9a-f]{8}", ha)
    assert ha == b["host"]["hostname"]["value"]
    assert ha != c["host"]["hostname"]["value"]
    assert plain["host"]["hostname"]["value"] == "node17.example.org"
    assert a["anonymized"] is True and plain["anonymized"] is False
    text = json.dumps(a)
    assert "node17.example.org" not in text
    assert "0123456789abcdef0123456789abcdef" not in text  # machine-id
    assert "0123456789abcdef0123" not in text  # container id in cgroup evidence
    assert "ec2a1b2c" not in text  # DMI product uuid
    assert re.fullmatch(r"id-[0-9a-f]{8}", a["host"]["machine_id"]["value"])
    assert a["memory"]["cgroup_limit_bytes"]["value"] == 8 << 30  # numbers are not ids


def test_anonymize_live_machine():
    doc = env.collect(anonymize=True)
    import socket
    real = socket.gethostname()
    assert doc["host"]["hostname"]["value"].startswith("host-")
    assert doc["host"]["hostname"]["value"] == env.collect(anonymize=True)["host"]["hostname"]["value"]
    if len(real) >= 4:
        assert real not in json.dumps(doc["host"])


# (f) this machine -------------------------------------------------------------------------

def test_collect_live_shape_and_facts():
    doc = env.collect()
    json.loads(json.dumps(doc))
    assert {"host", "cpu", "memory", "os", "python", "frameworks", "devices", "nvidia",
            "virtualization"} <= set(doc)
    found = list(leaves({"cpu": doc["cpu"], "memory": doc["memory"]}))
    assert len(found) > 20
    for path, f in found:
        assert isinstance(f["source"], str) and f["source"], path
    assert doc["cpu"]["logical_cores"]["value"] >= 1
    assert doc["memory"]["total_bytes"]["value"] > 0
    assert doc["frameworks"]["jax"]["available"] in (True, False)
    assert "available" in doc["nvidia"]
    virt = doc["virtualization"]
    assert {"layers", "steal_time", "summary"} <= set(virt)
    for layer in virt["layers"]:
        assert layer["evidence"], layer


def test_collect_without_frameworks_is_fast():
    import time
    t0 = time.perf_counter()
    doc = env.collect(import_frameworks=False)
    assert time.perf_counter() - t0 < 1.0
    assert doc["devices"] == {"torch": [], "jax": []}
    json.dumps(doc)


def test_module_import_does_not_import_frameworks():
    code = ("import sys, harness.environment, harness.virtualization; "
            "bad = [m for m in ('torch', 'jax', 'pynvml') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))


# (g) devices ------------------------------------------------------------------------------

def test_torch_devices_has_cpu0():
    pytest.importorskip("torch")
    devs = env.torch_devices()
    cpu = [d for d in devs if d["id"] == "cpu:0"]
    assert len(cpu) == 1
    d = cpu[0]
    assert d["backend"] == "torch" and d["type"] == "cpu" and d["platform"] == "cpu" and d["index"] == 0
    assert d["name"] == env.cpu_model_name()
    assert d["extra"]["threads"] >= 1
    for dev in devs:
        assert set(dev) == {"id", "backend", "type", "index", "name", "memory_bytes", "platform", "extra"}


def test_devices_empty_without_frameworks(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)
    assert env.jax_devices() == []
    monkeypatch.setitem(sys.modules, "torch", None)
    assert env.torch_devices() == []
    info = env.collect(import_frameworks=True)
    assert info["frameworks"]["jax"] == {"available": False, "reason": "not installed"}
    assert info["frameworks"]["torch"]["available"] is False


class _Dev:
    def __init__(self, platform, id, kind, mem=None, pv=""):
        self.platform, self.id, self.device_kind, self.process_index = platform, id, kind, 0
        self._mem = mem
        self.client = types.SimpleNamespace(platform_version=pv)

    def memory_stats(self):
        if self._mem is None:
            raise RuntimeError("no stats")
        return {"bytes_limit": self._mem}


def test_jax_devices_with_fake_jax(monkeypatch):
    gpus = [_Dev("gpu", 0, "NVIDIA H100 80GB HBM3", 80 << 30, "cuda 12030"),
            _Dev("gpu", 1, "NVIDIA H100 80GB HBM3", 80 << 30, "cuda 12030")]
    cpus = [_Dev("cpu", 0, "cpu")]
    fake = types.SimpleNamespace(local_devices=lambda backend=None: cpus if backend == "cpu" else gpus)
    monkeypatch.setitem(sys.modules, "jax", fake)
    devs = env.jax_devices()
    assert [d["id"] for d in devs] == ["jax:gpu:0", "jax:gpu:1", "jax:cpu:0"]
    assert devs[0]["name"] == "NVIDIA H100 80GB HBM3" and devs[0]["platform"] == "cuda"
    assert devs[0]["memory_bytes"] == 80 << 30 and devs[2]["memory_bytes"] == env._cpu_memory_bytes()
    assert devs[2]["name"] == env.cpu_model_name() and devs[2]["extra"]["device_kind"] == "cpu"
    assert all(d["backend"] == "jax" for d in devs)


# NVML --------------------------------------------------------------------------------------

class NVMLError(Exception):
    pass


def fake_nvml(virt_mode=1, mig=(1, 1), init_error=None):
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 1, 2

    def init():
        if init_error:
            raise NVMLError(init_error)

    def not_supported(*a):
        raise NVMLError("Not Supported")

    m.nvmlInit, m.nvmlShutdown = init, lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040
    m.nvmlSystemGetNVMLVersion = lambda: b"12.550.54.15"
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("h", i)
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetUUID = lambda h: "GPU-8f5c1f2e-aaaa-bbbb-cccc-0123456789ab"
    m.nvmlDeviceGetSerial = not_supported
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=85520809984)
    m.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 5
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
    m.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetMigMode = lambda h: list(mig)
    m.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    m.nvmlDeviceGetVirtualizationMode = lambda h: virt_mode
    m.nvmlDeviceGetPersistenceMode = lambda h: 1
    m.nvmlDeviceGetPowerManagementLimit = lambda h: 700000
    m.nvmlDeviceGetMaxClockInfo = lambda h, clk: {1: 1980, 2: 2619}[clk]
    return m


def test_nvidia_info_from_fake_nvml():
    info = env.nvidia_info(fake_nvml())
    assert info["available"] is True
    assert info["cuda_driver_version"] == env.fact("12.4", "pynvml.nvmlSystemGetCudaDriverVersion")
    g = info["gpus"][0]
    assert g["name"]["value"] == "NVIDIA H100 80GB HBM3"
    assert g["pcie"]["current_generation"] == env.fact(5, "pynvml.nvmlDeviceGetCurrPcieLinkGeneration")
    assert g["virtualization_mode"] == env.fact("PASSTHROUGH", "pynvml.nvmlDeviceGetVirtualizationMode")
    assert g["mig"]["current"]["value"] is True and g["mig"]["max_instances"]["value"] == 7
    assert g["power_limit_w"]["value"] == 700.0
    assert g["clocks_max_sm_mhz"]["value"] == 1980 and g["clocks_max_mem_mhz"]["value"] == 2619
    assert g["serial"]["value"] is None and "Not Supported" in g["serial"]["source"]
    assert g["ecc_enabled"]["value"] is None  # function absent from the fake module
    layers = env.gpu_virtualization_layers(info)
    assert [(x["layer"], x["kind"]) for x in layers] == [("gpu_virtualization", "passthrough"),
                                                         ("gpu_virtualization", "mig")]
    json.dumps(info)


def test_nvidia_unavailable_and_vgpu_none():
    assert env.nvidia_info(fake_nvml(init_error="Driver Not Loaded")) == {
        "available": False, "reason": "NVML init failed: Driver Not Loaded"}
    info = env.nvidia_info(fake_nvml(virt_mode=0, mig=(0, 0)))
    assert env.gpu_virtualization_layers(info) == []


def test_collect_merges_gpu_layers_and_anonymizes_uuid(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(virt_mode=2, mig=(0, 0)))
    doc = env.collect(anonymize=True, import_frameworks=False)
    layers = doc["virtualization"]["layers"]
    assert layers[-1]["layer"] == "gpu_virtualization" and layers[-1]["kind"] == "vgpu"
    assert "[gpu: vgpu]" in doc["virtualization"]["summary"]
    assert "8f5c1f2e" not in json.dumps(doc)
    assert doc["nvidia"]["gpus"][0]["uuid"]["value"].startswith("gpu-")


def test_gpu_pair_links_from_fake_nvml():
    m = fake_nvml()
    m.nvmlDeviceGetCount = lambda: 3

    def nvlink_state(h, link):
        if link >= 4:
            raise NVMLError("Invalid Argument")
        return 1 if h[1] != 2 else 0  # GPU 2 has its links down

    m.nvmlDeviceGetNvLinkState = nvlink_state
    m.nvmlDeviceGetP2PStatus = lambda a, b, cap: 0 if {a[1], b[1]} == {0, 1} else 5
    m.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: 0 if {a[1], b[1]} == {0, 1} else 50
    info = env.nvidia_info(m)
    links = info["links"]
    assert [g["nvlink_active_links"]["value"] for g in links["per_gpu"]] == [4, 4, 0]
    pairs = {tuple(p["gpus"]): p for p in links["pairs"]}
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    assert pairs[(0, 1)]["p2p_nvlink"]["value"] == "ok"
    assert pairs[(0, 2)]["p2p_read"]["value"] == "not supported"
    assert pairs[(1, 2)]["topology"]["value"].startswith("across NUMA nodes")
    json.dumps(info)


# cgroup hierarchy walk (field case cgroup-parent-quota: ninja 2805, JDK-8322420) ------------

POD = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice"
LEAF = POD + "/cri-containerd-0123456789ab.scope"


def _cg_tree(tmp_path, extra: dict):
    files = {"/proc/self/cgroup": f"0::{LEAF}\n", "/sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
             f"/sys/fs/cgroup{LEAF}/cpu.max": "max 100000\n",
             f"/sys/fs/cgroup{POD}/cpu.max": "800000 100000\n",
             "/sys/fs/cgroup/kubepods.slice/cpu.max": "max 100000\n",
             "/proc/meminfo": "MemTotal: 67108864 kB\nMemAvailable: 50331648 kB\n"}
    files.update(extra)
    return make_tree(tmp_path, files)


def test_cpu_quota_on_parent_cgroup_counts(tmp_path):
    view = env.HostView(_cg_tree(tmp_path, {}))
    limit = env._cgroup_cpu_limit(view)
    assert limit["value"] == 8.0 and POD in limit["source"]


def test_smallest_cpu_quota_wins(tmp_path):
    view = env.HostView(_cg_tree(tmp_path, {f"/sys/fs/cgroup{LEAF}/cpu.max": "150000 100000\n"}))
    assert env._cgroup_cpu_limit(view)["value"] == 1.5


def test_cgroup_v1_quota_on_parent(tmp_path):
    files = {"/proc/self/cgroup": "4:cpu,cpuacct:/kubepods/podX/abc\n",
             "/sys/fs/cgroup/cpu,cpuacct/kubepods/podX/abc/cpu.cfs_quota_us": "-1\n",
             "/sys/fs/cgroup/cpu,cpuacct/kubepods/podX/cpu.cfs_quota_us": "300000\n",
             "/sys/fs/cgroup/cpu,cpuacct/kubepods/podX/cpu.cfs_period_us": "100000\n"}
    assert env._cgroup_cpu_limit(env.HostView(make_tree(tmp_path, files)))["value"] == 3.0


def test_memory_limit_on_parent_and_available_memory(tmp_path):
    root = _cg_tree(tmp_path, {f"/sys/fs/cgroup{LEAF}/memory.max": "max\n",
                               f"/sys/fs/cgroup{POD}/memory.max": str(8 << 30) + "\n",
                               f"/sys/fs/cgroup{POD}/memory.current": str(3 << 30) + "\n"})
    view = env.HostView(root)
    limit, usage = env._cgroup_memory(view)
    assert limit["value"] == 8 << 30 and usage["value"] == 3 << 30
    avail, how = env.available_memory_bytes(env.HostView(root))
    assert avail == 5 << 30 and "cgroup" in how  # far below MemAvailable (48 GiB)


def test_available_memory_without_limit_is_memavailable(tmp_path):
    root = make_tree(tmp_path, {"/proc/meminfo": "MemTotal: 1000 kB\nMemAvailable: 600 kB\n",
                                "/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": "max\n"})
    assert env.available_memory_bytes(env.HostView(root)) == (600 * 1024, "/proc/meminfo MemAvailable")


def test_fits_check_counts_cgroup_limit(tmp_path, monkeypatch):
    from harness.errors import ProbeSkip
    from probes.torch import common
    monkeypatch.setattr(env, "available_memory_bytes", lambda view=None: (1 << 30, "cgroup"))
    with pytest.raises(ProbeSkip, match="1024 MiB free"):
        common.require_memory("cpu", 2 << 30, "test buffer")


def test_cgroup_v1_memory_limit_counts_in_allocatable(tmp_path):
    root = make_tree(tmp_path, {
        "/proc/meminfo": "MemTotal: 33554432 kB\nMemAvailable: 25165824 kB\n",
        "/proc/self/cgroup": "5:memory:/docker/abc\n",
        "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n",  # v1 "no limit"
        "/sys/fs/cgroup/memory/docker/memory.limit_in_bytes": str(4 << 30) + "\n",
        "/sys/fs/cgroup/memory/docker/memory.usage_in_bytes": str(1 << 30) + "\n"})
    doc = env.collect(root=root, env={}, run=runner({}), live=False)
    assert doc["memory"]["cgroup_limit_bytes"]["value"] == 4 << 30
    assert doc["memory"]["allocatable_bytes"]["value"] == 3 << 30
