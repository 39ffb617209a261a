"""cuda:N <-> NVML matching by PCI bus id / UUID (field case nvml-index-mapping and its kind)."""
from __future__ import annotations

import sys
import time
import types

import pandas as pd
import pytest

from harness.compare import case_power_w
from harness.gpumap import NvmlGpu, match_cuda_to_nvml, parse_visible_devices, pci_address
from harness.nvml_record import RecordedNvml
from harness.telemetry import TelemetrySampler, _Nvml, gpu_sources


def two_a100_node() -> dict:
    """The node of the field case (pytorch-lightning #18950 as rewritten in
    field-cases/nvml-index-mapping): board 31:00.0 busy with another job at 224 W,
    board 32:00.0 idle at 48 W."""
    return {"gpus": [
        {"name": "NVIDIA A100-PCIE-40GB", "uuid": "GPU-aaaa1111", "bus_id": "00000000:31:00.0",
         "power_mw": 224000, "utilization": [47, 23], "memory_total_bytes": 40 << 30, "memory_used_bytes": 20 << 30},
        {"name": "NVIDIA A100-PCIE-40GB", "uuid": "GPU-bbbb2222", "bus_id": "00000000:32:00.0",
         "power_mw": 48000, "utilization": [0, 0], "memory_total_bytes": 40 << 30, "memory_used_bytes": 8 << 20},
    ]}


def test_pci_address_spellings_agree():
    assert pci_address("00000000:32:00.0") == pci_address("0000:32:00.0") == "0000:32:00.0"
    assert pci_address(b"00000000:3B:00.0") == "0000:3b:00.0"
    assert pci_address(domain=0, bus=0x32, device=0) == "0000:32:00.0"
    assert pci_address("garbage") is None


def test_visible_devices_parsing_follows_cuda():
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices("1,0") == ["1", "0"]
    assert parse_visible_devices("0,-1,1") == ["0"]  # CUDA stops at the first invalid entry
    assert parse_visible_devices("GPU-abc, MIG-def") == ["GPU-abc", "MIG-def"]


@pytest.mark.parametrize("visible,expected", [(None, {0: 0, 1: 1}), ("1", {0: 1}), ("1,0", {0: 1, 1: 0}),
                                              ("GPU-bbbb", {0: 1}), ("GPU-bbbb2222,GPU-aaaa", {0: 1, 1: 0})])
def test_visible_devices_map_to_the_right_board(visible, expected):
    gpus = [NvmlGpu(0, "00000000:31:00.0", "GPU-aaaa1111", "A100"), NvmlGpu(1, "00000000:32:00.0", "GPU-bbbb2222", "A100")]
    got, _ = match_cuda_to_nvml(gpus, visible=visible)
    assert {n: m.nvml_index for n, m in got.items()} == expected


def test_cuda_pci_address_beats_index_order():
    # CUDA's own PCI address wins even when the variable would say otherwise.
    gpus = [NvmlGpu(0, "00000000:31:00.0", None, "A"), NvmlGpu(1, "00000000:32:00.0", None, "B")]
    got, notes = match_cuda_to_nvml(gpus, visible="0,1", cuda_bus_ids=["0000:32:00.0", "0000:31:00.0"])
    assert {n: m.nvml_index for n, m in got.items()} == {0: 1, 1: 0} and not notes


def test_mixed_models_without_cuda_addresses_stay_unknown():
    # FASTEST_FIRST may put the second board first: an index alone does not say which.
    gpus = [NvmlGpu(0, "00000000:31:00.0", None, "NVIDIA T400"), NvmlGpu(1, "00000000:32:00.0", None, "NVIDIA A100")]
    got, notes = match_cuda_to_nvml(gpus, visible="0")
    assert got == {} and "FASTEST_FIRST" in notes[0]
    got, _ = match_cuda_to_nvml(gpus, visible="0", device_order="PCI_BUS_ID")
    assert got[0].nvml_index == 0


def test_mig_uuid_maps_to_its_parent_gpu():
    gpus = [NvmlGpu(0, "0000:18:00.0", "GPU-p0", "H100", ["MIG-x1", "MIG-x2"]),
            NvmlGpu(1, "0000:19:00.0", "GPU-p1", "H100", ["MIG-y1"])]
    got, _ = match_cuda_to_nvml(gpus, visible="MIG-y1,MIG-x2")
    assert (got[0].nvml_index, got[0].mig_uuid, got[1].nvml_index) == (1, "MIG-y1", 0)


def _sample(monkeypatch, record: dict, visible: str | None) -> pd.DataFrame:
    monkeypatch.setitem(sys.modules, "pynvml", RecordedNvml(record))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    s = TelemetrySampler(time.monotonic_ns(), interval_s=0.02).start()
    s.case_id = "gemm.square[n=8192,dtype=bf16]@cuda:0"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        with s._lock:
            if sum(1 for r in s._rows if r[3] == "power_w") >= 4:
                break
    tel = s.take()
    s.stop()
    return tel


def test_field_case_power_comes_from_the_cases_own_gpu(monkeypatch):
    """nvml-index-mapping: started with CUDA_VISIBLE_DEVICES=1, cuda:0 is NVML GPU 1 (48 W),
    not NVML GPU 0 (another job, 224 W)."""
    tel = _sample(monkeypatch, two_a100_node(), "1")
    cid = "gemm.square[n=8192,dtype=bf16]@cuda:0"
    assert case_power_w(types.SimpleNamespace(telemetry=tel), cid, "cuda:0") == 48.0
    assert gpu_sources(tel, "cuda:0")[0] == ["gpu:1"]
    assert gpu_sources(tel, "cuda:1")[0] is None  # only one GPU visible: never another board's rows


def test_without_the_variable_cuda0_is_the_first_board(monkeypatch):
    tel = _sample(monkeypatch, two_a100_node(), None)
    run = types.SimpleNamespace(telemetry=tel)
    cid = "gemm.square[n=8192,dtype=bf16]@cuda:0"
    assert case_power_w(run, cid, "cuda:0") == 224.0
    assert case_power_w(run, cid, "cuda:0-1") == 272.0  # a group sums its own boards


def test_runs_written_before_the_mapping_still_read_by_index():
    old = pd.DataFrame([(0.1, "c", "gpu:0", "power_w", 100.0), (0.1, "c", "gpu:1", "power_w", 50.0)],
                       columns=["t_s", "case_id", "source", "metric", "value"])
    srcs, how = gpu_sources(old, "cuda:1")
    assert srcs == ["gpu:1"] and "predates" in how
    assert case_power_w(types.SimpleNamespace(telemetry=old), "c", "cuda:1") == 50.0


def test_nvml_reader_records_one_ordinal_row_per_visible_mig_device(monkeypatch):
    rec = {"gpus": [{"name": "H100", "uuid": "GPU-p0", "bus_id": "0000:18:00.0", "mig_mode": [1, 1], "power_mw": 300000,
                     "mig_devices": [{"uuid": "MIG-a"}, {"uuid": "MIG-b"}]}]}
    monkeypatch.setitem(sys.modules, "pynvml", RecordedNvml(rec))
    nv = _Nvml(environ={"CUDA_VISIBLE_DEVICES": "MIG-b,MIG-a"})
    rows = [r for r in nv.read() if r[1] == "cuda_ordinal"]
    assert sorted(r[2] for r in rows) == [0.0, 1.0]
    tel = pd.DataFrame([(0.0, "c", s, m, v) for s, m, v in nv.read()], columns=["t_s", "case_id", "source", "metric", "value"])
    # both MIG devices sit on one board: its power counts once for the group
    assert case_power_w(types.SimpleNamespace(telemetry=tel), "c", "cuda:0+cuda:1") == 300.0


def test_case_summary_takes_utilization_from_the_cases_own_gpu(monkeypatch):
    from harness.telemetry import summarize_case

    tel = _sample(monkeypatch, two_a100_node(), "1")
    assert summarize_case(tel, "cuda:0")["gpu_util_pct"] == 0.0  # its own idle board, not 47 % next door
    assert "gpu_util_pct" not in summarize_case(tel, "cpu:0")


def test_cuda_addresses_from_an_initialized_torch_win(monkeypatch):
    """With CUDA already started in this process, torch's PCI addresses place the boards
    even where the variable alone could not (two GPU models, FASTEST_FIRST order)."""
    from harness.gpumap import torch_cuda_bus_ids

    props = [types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x32, pci_device_id=0),
             types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x31, pci_device_id=0)]
    cuda = types.SimpleNamespace(is_initialized=lambda: True, device_count=lambda: 2,
                                 get_device_properties=lambda n: props[n])
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(version=types.SimpleNamespace(hip=None), cuda=cuda))
    assert torch_cuda_bus_ids() == ["0000:32:00.0", "0000:31:00.0"]
    rec = two_a100_node()
    rec["gpus"][1]["name"] = "NVIDIA H100 PCIe"  # mixed models: an index alone is ambiguous
    monkeypatch.setitem(sys.modules, "pynvml", RecordedNvml(rec))
    nv = _Nvml(environ={})
    assert nv.ordinals == {1: [0], 0: [1]}


def test_uninitialized_torch_is_not_touched(monkeypatch):
    from harness.gpumap import torch_cuda_bus_ids

    def boom():
        raise AssertionError("must not query devices")
    cuda = types.SimpleNamespace(is_initialized=lambda: False, device_count=boom)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(version=types.SimpleNamespace(hip=None), cuda=cuda))
    assert torch_cuda_bus_ids() is None


def test_anonymized_fingerprint_hides_gpu_and_mig_uuids_everywhere():
    from harness.environment import _anonymize, nvidia_info

    rec = {"process_environ": {"CUDA_VISIBLE_DEVICES": "MIG-6a1c0b7e-0001"},
           "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-8d2e0000-0001", "bus_id": "00000000:18:00.0",
                     "mig_mode": [1, 1], "mig_devices": [{"uuid": "MIG-6a1c0b7e-0001", "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb"}]}]}
    doc = _anonymize({"nvidia": nvidia_info(RecordedNvml(rec))}, salt="s")
    text = repr(doc)
    assert "GPU-8d2e0000-0001" not in text and "MIG-6a1c0b7e-0001" not in text
    m = doc["nvidia"]["cuda_map"]["cuda:0"]
    assert m["mig_uuid"] == doc["nvidia"]["gpus"][0]["mig"]["devices"][0]["uuid"]["value"]  # still consistent


@pytest.mark.parametrize("snapshot", ["gpu-h100-mig", "gpu-a100-cvd-reorder", "gpu-a100-pcie-partial-nvlink"])
def test_a_recording_replays_to_the_same_fingerprint(snapshot):
    """record() of a machine, replayed through RecordedNvml, gives the facts NVML gave."""
    from pathlib import Path

    from harness.environment import nvidia_info
    from harness.nvml_record import load_record, record

    src = load_record(Path(__file__).resolve().parents[1] / "fixtures" / "machines" / snapshot / ".coherence" / "nvml.json")
    env = src.get("process_environ") or {}
    again = record(RecordedNvml(src), environ=env)
    a, b = nvidia_info(RecordedNvml(src)), nvidia_info(RecordedNvml(again))
    assert a == b and a["available"]


def test_an_anonymized_recording_keeps_cuda_visible_devices_consistent():
    from harness.environment import nvidia_info
    from harness.nvml_record import record

    rec = {"gpus": [{"name": "A", "uuid": "GPU-aaaa1111", "bus_id": "00000000:31:00.0"},
                    {"name": "A", "uuid": "GPU-bbbb2222", "bus_id": "00000000:32:00.0"}]}
    anon = record(RecordedNvml(rec), environ={"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, pseudonym=lambda s: "GPU-x" + s[-4:])
    assert "bbbb" not in repr(anon)
    assert nvidia_info(RecordedNvml(anon))["cuda_map"]["cuda:0"]["nvml_index"] == 1
