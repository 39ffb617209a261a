"""coherence env --capture / --sysroot: the snapshot replays the live fingerprint; bad input exits 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import capture, environment
from harness.cli import main
from harness.errors import UserError
from harness.virtualization import HostView, read_leaves, write_leaves

MACHINES = Path(__file__).resolve().parent.parent / "fixtures" / "machines"


def _essence(doc: dict) -> dict:
    n = (doc.get("nominal") or {}).get("cpu:0") or {}
    return {"layers": [(e["layer"], e["kind"]) for e in doc["virtualization"]["layers"]],
            "summary": doc["virtualization"]["summary"],
            "rule": n.get("rule"), "cores": n.get("cores"), "clock_hz": n.get("clock_hz"),
            "flop_per_cycle": n.get("flop_per_cycle"), "compute_flops": n.get("compute_flops")}


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """The per-boot clock cache in a temporary place (the live machine's /var may be read-only)."""
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("COHERENCE_STATE_DIR", str(d))
    return d


@pytest.mark.parametrize("anonymize", [False, True])
def test_capture_replays_live_layers_and_peaks(tmp_path, state_dir, anonymize):
    # Whatever this host is: the snapshot must say the same as the live fingerprint.
    live = environment.collect(import_frameworks=False, with_nominal=True)
    dest = tmp_path / "snap"
    res = capture.capture(str(dest), anonymize=anonymize)
    assert 0 < res["bytes"] < capture.MAX_BYTES
    replay = environment.collect(root=str(dest), env={}, live=False, with_nominal=True)
    assert _essence(replay) == _essence(live)
    assert replay["frameworks"]["torch"]["reason"].startswith("not probed: sysroot")


def test_anonymized_capture_leaks_no_identifiers(tmp_path, state_dir):
    dest = tmp_path / "snap"
    capture.capture(str(dest), anonymize=True)
    secrets = []
    for p in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id", "/proc/sys/kernel/hostname"):
        v, _ = HostView().read(p)
        if v and len(v.strip()) >= 6:
            secrets.append(v.strip())
    blob = b"".join(f.read_bytes() for f in dest.rglob("*") if f.is_file())
    for s in secrets:
        assert s.encode() not in blob


def test_anonymizer_is_consistent_across_files_and_paths():
    anon = capture._Anonymizer("salt")
    rec = capture.Recording(files={"/proc/sys/kernel/random/boot_id": b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n",
                                   "/proc/sys/kernel/hostname": b"gpu-node-17\n"})
    anon.learn(rec)
    boot = anon.text("/proc/sys/kernel/random/boot_id", rec.files["/proc/sys/kernel/random/boot_id"]).decode().strip()
    cache = anon.text("/var/tmp/coherence/cpu-clock.json",
                      b'{"boot_id": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "host": "gpu-node-17"}').decode()
    assert boot in cache and "0f1e2d3c" not in boot and "gpu-node-17" not in cache
    cid = "4b0c9d2e7a13aa55ff00112233445566"
    line = anon.text("/proc/self/cgroup", f"4:memory:/docker/{cid}\n".encode()).decode()
    assert cid not in line and anon.path(f"/sys/fs/cgroup/memory/docker/{cid}") in "/sys/fs/cgroup/memory" + line.split(":", 2)[2].strip()


def test_leaves_round_trip():
    leaves = {0x40000000: bytes(range(16)), 0x40000100: b"\xff" * 16}
    assert read_leaves(write_leaves(leaves)) == leaves


def test_capture_over_the_limit_writes_nothing(tmp_path, state_dir):
    dest = tmp_path / "snap"
    with pytest.raises(UserError, match="over the 100-byte limit"):
        capture.capture(str(dest), max_bytes=100)
    assert not dest.exists()


@pytest.mark.parametrize("make", ["nonempty", "file", "noparent"])
def test_bad_capture_targets(tmp_path, make):
    if make == "nonempty":
        target = tmp_path / "t"
        target.mkdir()
        (target / "x").write_text("x")
    elif make == "file":
        target = tmp_path / "t"
        target.write_text("x")
    else:
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "sub"
    r = CliRunner().invoke(main, ["env", "--capture", str(target)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert str(target) in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("make", ["missing", "empty", "file", "no-proc-sys", "garbage-cpuinfo", "sys-only",
                                  "a-snapshot-proc"])
def test_bad_sysroots_exit_2(tmp_path, make):
    root = tmp_path / "root"
    if make == "empty":
        root.mkdir()
    elif make == "file":
        root.write_text("x")
    elif make == "no-proc-sys":
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "hostname").write_text("x\n")
    elif make == "sys-only":
        (root / "sys").mkdir(parents=True)
    elif make == "a-snapshot-proc":  # a capture's proc/ given as the root: it holds sys/ but no cpuinfo
        shutil.copytree(MACHINES / "virt-kvm-qemu" / "proc", root)
    elif make == "garbage-cpuinfo":
        (root / "proc").mkdir(parents=True)
        (root / "proc" / "cpuinfo").write_bytes(os.urandom(4096))
    r = CliRunner().invoke(main, ["env", "--sysroot", str(root), "--json"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert str(root) in r.output


def test_sysroot_and_capture_together_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["env", "--sysroot", str(tmp_path), "--capture", str(tmp_path / "c")])
    assert r.exit_code == 2 and "choose one" in r.output


def test_garbage_files_become_unknown_facts(tmp_path):
    # Every file but cpuinfo replaced by junk: the fingerprint still comes out, facts unknown.
    src = MACHINES / "virt-k8s-parent-quota"
    root = tmp_path / "root"
    shutil.copytree(src, root)
    rng = __import__("random").Random(7)
    for f in root.rglob("*"):
        if f.is_file() and f.name not in ("cpuinfo", "expected.yaml"):
            f.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    r = CliRunner().invoke(main, ["env", "--sysroot", str(root), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["cpu"]["cgroup_cpu_limit_cores"]["value"] is None
    assert doc["cpu"]["cgroup_cpu_limit_cores"]["source"]  # the reason
    r = CliRunner().invoke(main, ["env", "--sysroot", str(root)])
    assert r.exit_code == 0 and "nominal peaks" in r.output


def test_sysroot_prints_rule_and_inputs():
    r = CliRunner().invoke(main, ["env", "--sysroot", str(MACHINES / "virt-k8s-parent-quota")])
    assert r.exit_code == 0, r.output
    assert "intel-avx512" in r.output and "cores 8" in r.output and "3.2 GHz" in r.output
    assert "not probed: sysroot" in r.output


def test_sysroot_runs_no_command(tmp_path, monkeypatch):
    import subprocess

    def boom(*a, **k):
        raise AssertionError(f"command run from a sysroot: {a}")
    monkeypatch.setattr(subprocess, "run", boom)
    monkeypatch.setattr(subprocess, "Popen", boom)
    r = CliRunner().invoke(main, ["env", "--sysroot", str(MACHINES / "virt-xen-hvm-viridian"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["virtualization"]["summary"] == "xen"


def test_clock_kept_in_snapshot_when_cache_is_not_writable(tmp_path, monkeypatch):
    # Live measured clock, but its cache could not be written: the snapshot still carries it.
    monkeypatch.setenv("COHERENCE_STATE_DIR", str(tmp_path / "nowhere" / "x"))
    doc = {"cpu": {"frequency": {"measured_mhz": {"value": 3100.0, "source": "measured"}}}}
    view = capture.RecordingView("/")
    capture._keep_clock(view, doc)
    from harness.cpuclock import CLOCK_CACHE
    rec = json.loads(view.recording.files["/" + CLOCK_CACHE])
    assert rec["clock_hz"] == 3.1e9 and rec["version"] == 1


def test_capture_of_a_gpu_node_carries_an_nvml_recording(tmp_path, state_dir, monkeypatch):
    # NVML cannot answer from a sysroot: a capture made where NVML starts keeps its answers,
    # and the replay shows the same GPUs. The "live" NVML here is a recorded A100 node.
    import sys

    from harness import nvml_record

    rec = nvml_record.load_record(MACHINES / "gpu-a100-cvd-reorder" / nvml_record.RECORD_PATH)
    monkeypatch.setitem(sys.modules, "pynvml", nvml_record.RecordedNvml(rec))
    dest = tmp_path / "snap"
    capture.capture(str(dest), anonymize=True)
    assert (dest / nvml_record.RECORD_PATH).is_file()
    replay = environment.collect(root=str(dest), env={}, live=False)
    names = [g["name"]["value"] if isinstance(g.get("name"), dict) else g.get("name")
             for g in replay["nvidia"]["gpus"]]
    assert len(names) == len(rec["gpus"]) and all("A100" in str(n) for n in names)
    text = (dest / nvml_record.RECORD_PATH).read_text()
    assert not any(g["uuid"] in text for g in rec["gpus"] if g.get("uuid"))  # --anonymize


def test_garbage_nvml_recording_in_a_sysroot_exits_2(tmp_path):
    from harness import nvml_record

    root = tmp_path / "root"
    shutil.copytree(MACHINES / "gpu-a100-cvd-reorder", root)
    (root / nvml_record.RECORD_PATH).write_text("{not json")
    r = CliRunner().invoke(main, ["env", "--sysroot", str(root), "--json"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "nvml.json" in r.output and len(r.output.strip().splitlines()) == 1
