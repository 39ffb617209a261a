"""The CUDA paths, run for real on a GPU (skipped, with the reason, where none exists).

These cover what the CPU suite cannot: CUDA-event timing, CUDA graphs, SDPA backends on
the GPU, pinned vs pageable host transfers, NVML facts and telemetry, and the nominal
lookup of the device class. Figures are not asserted against datasheets (the machines
are shared); what is asserted is what must hold on any working GPU.
"""

from __future__ import annotations

import time

import pytest

from tests.probes.helpers import run

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

DEV = "cuda:0"


def full(probe: str, **params) -> dict:
    """The probe's declared defaults, overridden by ``params`` (as a suite would)."""
    from harness import registry

    registry.discover()
    cls = registry.get(probe)
    return cls.expand(cls.validate_params(params, probe))[0]


def ok(result: dict) -> dict:
    assert result["status"] == "ok", result.get("reason")
    return result


def test_cuda_event_clock_agrees_with_the_host_clock_on_a_long_kernel():
    from harness.timing import CudaEventClock

    a = torch.randn(4096, 4096, device=DEV)
    clock = CudaEventClock(DEV)

    def work():
        for _ in range(20):
            a @ a

    work()
    clock.sync()
    t_host0 = time.perf_counter()
    t_event = clock.time(work)
    t_host = time.perf_counter() - t_host0
    # The event interval is inside the host interval (launch + sync on top), and a
    # long kernel dominates both.
    assert 0 < t_event <= t_host * 1.02
    assert t_event > 0.5 * t_host


def test_memory_triad_times_with_events_and_exceeds_the_l2():
    r = ok(run("memory.triad", full("memory.triad", dtype="fp32"), device=DEV))
    assert r["timer"] == "cuda_events"
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert r["resolved_params"]["size_mib"] * 2**20 >= 4 * l2
    assert all(d > 0 for d in r["durations_s"])


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gemm_runs_checked_and_records_the_fp32_mode(dtype):
    r = ok(run("gemm.square", {"n": 4096, "dtype": dtype}, device=DEV))
    assert r["timer"] == "cuda_events"
    if dtype == "fp32":
        # fp32 is measured as true fp32 unless the user enabled TF32: the row says which.
        assert "allow_tf32" in r["extra"]


def test_prefill_attention_records_its_sdpa_backend():
    r = ok(run("prefill.attention", {"model": "tiny", "batch": 1, "seq": 1024, "dtype": "bf16"}, device=DEV))
    assert r["extra"].get("sdpa_backend"), r["extra"]


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_decode_attention_on_the_gpu(layout):
    ok(run("decode.attention", {"model": "tiny", "batch": 8, "ctx": 4096, "layout": layout, "dtype": "bf16"}, device=DEV))


def test_small_decode_projection_replays_a_cuda_graph():
    r = ok(run("decode.projection", {"model": "tiny", "proj": "qkv", "batch": 1, "dtype": "bf16"}, device=DEV))
    assert r["extra"].get("cuda_graph") is True


def test_launch_overhead_is_measured():
    r = ok(run("overhead.launch", {}, timing={"warmup": 50, "min_reps": 200, "max_reps": 1000}, device=DEV))
    assert 0 < sorted(r["durations_s"])[len(r["durations_s"]) // 2] < 1e-3


@pytest.mark.parametrize("probe", ["transfer.h2d", "transfer.d2h"])
@pytest.mark.parametrize("memory", ["pinned", "pageable"])
def test_host_transfers(probe, memory):
    ok(run(probe, {"size_bytes": 64 << 20, "memory": memory}, device=DEV))


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_kv_transfer_through_the_host(layout):
    ok(run("transfer.kv", full("transfer.kv", model="tiny", ctx=4096, layout=layout, path="d2h2d"), device=DEV))


def test_nvml_facts_and_telemetry():
    from harness import environment
    from harness.telemetry import TelemetrySampler

    info = environment.nvidia_info()
    assert info["available"], info
    assert info["gpus"] and "name" in info["gpus"][0]
    sampler = TelemetrySampler(time.perf_counter_ns(), interval_s=0.05).start()
    a = torch.randn(4096, 4096, device=DEV)
    t_end = time.time() + 0.5
    while time.time() < t_end:
        a @ a
    torch.cuda.synchronize()
    sampler.stop()
    frame = sampler.take()
    assert frame["source"].astype(str).str.startswith("gpu").any(), frame["source"].unique()


def test_the_device_class_has_a_nominal_row():
    from harness import environment, nominal

    dev = next(d for d in environment.torch_devices() if d["id"] == DEV)
    n = nominal.nominal_for(dev)
    if n["kind"] == "unknown":
        pytest.skip(f"{dev['name']} is not in configs/accelerators.yaml")
    assert n["kind"] == "datasheet" and n["memory_Bps"] and n["compute_flops"].get("bf16")


def test_cuda_devices_are_matched_to_nvml_by_pci_bus_id():
    """torch's cuda:N and NVML's GPU are the same board: the PCI address CUDA reports is the
    busId of the NVML GPU the mapping names (whatever CUDA_VISIBLE_DEVICES says)."""
    from harness import environment
    from harness.gpumap import pci_address

    devs = [d for d in environment.torch_devices() if d["type"] == "cuda"]
    if not devs or "pci_address" not in devs[0]["extra"] or torch.version.hip:
        pytest.skip("this torch reports no PCI address, or the GPU is not NVIDIA")
    info = environment.nvidia_info()
    assert info["available"], info
    by_index = {g["index"]: g for g in info["gpus"]}
    for d in devs:
        m = info["cuda_map"].get(d["id"])
        if m is None or m.get("mig_uuid"):
            continue  # a MIG device or an unplaceable ordinal: nothing to compare
        assert pci_address(by_index[m["nvml_index"]]["pci_bus_id"]["value"]) == d["extra"]["pci_address"], m
    # the same when CUDA's addresses are given: the best evidence agrees with the variable
    info2 = environment.nvidia_info(cuda_bus_ids=[d["extra"]["pci_address"] for d in devs])
    assert {k: v["nvml_index"] for k, v in info2["cuda_map"].items() if k.startswith("cuda:")} == \
        {k: v["nvml_index"] for k, v in info["cuda_map"].items() if k.startswith("cuda:") and not v.get("mig_uuid")}


def test_telemetry_of_cuda0_comes_from_its_own_board():
    from harness.telemetry import TelemetrySampler, gpu_sources

    if torch.version.hip:
        pytest.skip("NVML telemetry is NVIDIA only")
    sampler = TelemetrySampler(time.perf_counter_ns(), interval_s=0.05).start()
    time.sleep(0.4)
    sampler.stop()
    frame = sampler.take()
    sources, how = gpu_sources(frame, DEV)
    assert sources and len(sources) == 1, how
    power = frame[(frame["source"] == sources[0]) & (frame["metric"] == "power_w")]
    assert len(power) and (power["value"] > 0).all()


def test_fp32_gemm_as_tf32_is_judged_against_the_tf32_peak():
    from harness import environment, nominal

    dev = next(d for d in environment.torch_devices() if d["id"] == DEV)
    n = nominal.nominal_for(dev)
    if not n["compute_flops"].get("tf32"):
        pytest.skip(f"no TF32 peak for {dev['name']}")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        r = ok(run("gemm.square", {"n": 2048, "dtype": "fp32"}, device=DEV))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert nominal.tf32_judgement(DEV, "fp32", r["extra"], n)[0] == "tf32"
