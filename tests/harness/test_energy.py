"""Energy of the timed repetitions (harness.energy, issue 16): a fake pynvml, a fake
powercap tree, the worker's reading, the ranks' combination and the cases columns.
No GPU and no RAPL needed; no timed assertion (integrals are checked against the
sampler's own recorded timestamps)."""

from __future__ import annotations

import math
import sys
import types

import pytest

from harness import energy, gpumap
from harness.ranks import combine, combine_energy
from harness.registry import PlannedCase
from harness.runner import case_row, energy_columns
from harness.store import cases_frame, check_case_row
from harness.timing import HostClock, TimingPolicy, measure

ENERGY_COLUMNS = ["energy_j", "avg_power_w", "energy_method", "energy_scope", "energy_reason",
                  "flops_per_j", "bytes_per_j"]


# -- a fake pynvml ------------------------------------------------------------------------
class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_pynvml(gpus: list[dict]) -> types.ModuleType:
    """A pynvml with ``gpus`` (dicts: bus, energy_mj (or None: NOT_SUPPORTED), power_mw:
    a callable giving the k-th power reading)."""
    nv = types.ModuleType("pynvml")
    nv.NVML_ERROR_NOT_SUPPORTED = 3
    nv.NVMLError = NVMLError
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: len(gpus)
    nv.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nv.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=h["bus"].encode())
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-{h['bus']}"
    nv.nvmlDeviceGetName = lambda h: "Fake GPU"

    def mig_mode(h):
        raise NVMLError(3)

    def total_energy(h):
        if h["energy_mj"] is None:
            raise NVMLError(3)
        return h["energy_mj"]

    def power(h):
        h["power_calls"] = h.get("power_calls", 0) + 1
        return h["power_mw"](h["power_calls"])

    nv.nvmlDeviceGetMigMode = mig_mode
    nv.nvmlDeviceGetTotalEnergyConsumption = total_energy
    nv.nvmlDeviceGetPowerUsage = power
    return nv


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake pynvml built from a list of GPU dicts; no CUDA bus ids (the mapping
    goes by CUDA_VISIBLE_DEVICES)."""
    monkeypatch.setattr(gpumap, "torch_cuda_bus_ids", lambda: None)
    energy.reset_nvml()

    def install(gpus):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus))
        return gpus

    yield install
    energy.reset_nvml()


def _gpu(bus, energy_mj=0, power_mw=lambda k: 0):
    return {"bus": bus, "energy_mj": energy_mj, "power_mw": power_mw}


def test_nvml_counter_meters_only_the_timed_reps_of_the_mapped_gpu(nvml):
    gpus = nvml([_gpu("00000000:17:00.0", 10_000), _gpu("00000000:65:00.0", 50_000)])
    # CUDA_VISIBLE_DEVICES=1: cuda:0 is NVML GPU 1; a mapping by index would meter GPU 0.
    meter = energy.CaseEnergy(["cuda:0"], environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert meter.method == "nvml_energy_counter", meter.reason

    def run():  # each repetition costs GPU 1 exactly 1234 mJ
        gpus[1]["energy_mj"] += 1234

    m = measure(run, meter.wrap(HostClock()), TimingPolicy(warmup=3, min_reps=5, max_reps=5, budget_s=0.0))
    meter.stop()
    reading = meter.reading(len(m.durations_s))
    assert m.warmup == 3 and len(m.durations_s) == 5
    # Three warm-up repetitions ran before the window: 5 x 1.234 J, not 8 x.
    assert reading["joules"] == pytest.approx(5 * 1.234)
    assert reading["method"] == "nvml_energy_counter"
    assert reading["scope"] == "cuda:0"
    assert reading["reps"] == 5
    assert reading["window_s"] >= 0
    cols = energy_columns({"status": "ok", "energy": reading}, 1e9, 4e6)
    assert cols["energy_j"] == pytest.approx(1.234)
    assert cols["flops_per_j"] == pytest.approx(1e9 / 1.234)
    assert cols["bytes_per_j"] == pytest.approx(4e6 / 1.234)


def test_nvml_unplaceable_device_is_a_reason(nvml):
    nvml([_gpu("00000000:17:00.0")])
    r = energy.CaseEnergy(["cuda:3"], environ={}).reading(5)
    assert r["joules"] is None and r["method"] is None
    assert "cuda:3" in r["reason"]


def test_nvml_absent_is_a_reason(monkeypatch):
    energy.reset_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    try:
        meter = energy.CaseEnergy(["cuda:0"], environ={})
        meter.start()
        meter.stop()
        r = meter.reading(3)
    finally:
        energy.reset_nvml()
    assert r["joules"] is None and "NVML unavailable" in r["reason"]


def test_counter_that_did_not_advance_is_null(nvml):
    nvml([_gpu("00000000:17:00.0", 777)])
    meter = energy.CaseEnergy(["cuda:0"], environ={})
    meter.start()
    meter.stop()
    r = meter.reading(4)
    assert r["joules"] is None and r["method"] == "nvml_energy_counter"
    assert "did not advance" in r["reason"]


def test_short_window_keeps_joules_with_a_note(nvml):
    gpus = nvml([_gpu("00000000:17:00.0", 0)])
    meter = energy.CaseEnergy(["cuda:0"], environ={})
    meter.start()
    gpus[0]["energy_mj"] += 500
    meter.stop()
    meter.t1 = meter.t0 + 0.003  # a 3 ms window, set rather than slept for
    r = meter.reading(2)
    assert r["joules"] == pytest.approx(0.5)
    assert "3.0 ms < 50 ms: counter resolution" in r["reason"]


def test_not_supported_integrates_power_samples(nvml):
    # Power rises 1 W per reading: the integral must be the trapezoid of the recorded samples.
    nvml([_gpu("00000000:17:00.0", None, lambda k: 200_000 + 1000 * k)])
    meter = energy.CaseEnergy(["cuda:0"], environ={})
    assert meter.method == "nvml_power_integral"
    meter.start()
    meter.stop()
    samples = meter._sampler.samples
    assert len(samples) >= 2
    assert [w for _, w in samples] == [200.0 + k for k in range(1, len(samples) + 1)]
    expected = sum((w0 + w1) / 2 * (t1 - t0) for (t0, w0), (t1, w1) in zip(samples, samples[1:]))
    r = meter.reading(3)
    assert r["method"] == "nvml_power_integral"
    assert r["joules"] == pytest.approx(expected, rel=1e-12)
    assert r["window_s"] == pytest.approx(samples[-1][0] - samples[0][0])
    assert "NOT_SUPPORTED" in r["reason"]


def test_trim_cuts_a_custom_measures_warm_up(nvml):
    nvml([_gpu("00000000:17:00.0", 0)])
    meter = energy.CaseEnergy(["cuda:0"], environ={})
    meter.start(track=True)
    meter.stop()
    # A cumulative counter sampled at 0..3 s: 10 J warm-up in the first second, then 20, 30.
    meter._sampler.samples = [(100.0, 0.0), (101.0, 10.0), (102.0, 30.0), (103.0, 60.0)]
    meter.t0, meter.t1 = 100.0, 103.0
    meter.trim(101.5)  # the first timed repetition, from Kernel.sample_t_start_ns
    r = meter.reading(3)
    assert r["joules"] == pytest.approx(60.0 - 20.0) and r["window_s"] == pytest.approx(1.5)
    assert "first timed repetition" in r["reason"]
    meter.trim(99.0)  # outside the window: kept as it is, with a note
    assert meter.reading(3)["joules"] == pytest.approx(40.0)


def test_tracked_rapl_unwraps_between_samples(tmp_path):
    root = powercap(tmp_path / "pc", {"intel-rapl:0": ("package-0", MAX - 10, MAX)})
    meter = energy.CaseEnergy(["cpu:0"], powercap_root=root)
    meter.start(track=True)
    (tmp_path / "pc/intel-rapl:0/energy_uj").write_text("2000000\n")
    meter.stop()
    assert meter.reading(2)["joules"] == pytest.approx(2_000_010 * 1e-6)


def test_interpolate_and_clip():
    s = [(0.0, 0.0), (2.0, 4.0)]
    assert energy.interpolate(s, 0.5) == 1.0 and energy.interpolate(s, -1) == 0.0 and energy.interpolate(s, 9) == 4.0
    assert energy.clip_from(s, 1.0) == [(1.0, 2.0), (2.0, 4.0)]


def test_power_integral_of_constant_power_is_power_times_window():
    samples = [(10.0, 250.0), (10.015, 250.0), (10.031, 250.0), (10.04, 250.0)]
    assert energy.trapezoid_j(samples) == pytest.approx(250.0 * 0.04)
    assert energy.trapezoid_j(samples[:1]) is None


# -- a fake powercap tree -----------------------------------------------------------------
def powercap(root, zones: dict) -> str:
    """zones: dir name -> (name, energy_uj, max_energy_range_uj)."""
    for d, (name, e, mx) in zones.items():
        z = root / d
        z.mkdir(parents=True)
        (z / "name").write_text(name + "\n")
        (z / "energy_uj").write_text(f"{e}\n")
        (z / "max_energy_range_uj").write_text(f"{mx}\n")
    return str(root)


MAX = 262143328850  # a real package's max_energy_range_uj


def test_rapl_sums_package_zones_and_unwraps(tmp_path):
    root = powercap(tmp_path / "powercap", {
        "intel-rapl:0": ("package-0", MAX - 100, MAX),
        "intel-rapl:0:0": ("core", 5, MAX),          # part of package 0: not added again
        "intel-rapl:1": ("package-1", 1_000_000, MAX),
        "intel-rapl:2": ("psys", 9, MAX),            # the platform: contains the packages
        "intel-rapl-mmio:0": ("package-0", 7, MAX),  # package 0 again, through MMIO
    })
    meter = energy.CaseEnergy(["cpu:0"], powercap_root=root)
    assert meter.method == "rapl" and meter.scope == "cpu package 0+1"
    meter.start()
    (tmp_path / "powercap/intel-rapl:0/energy_uj").write_text("50\n")   # wrapped: +150 uJ
    (tmp_path / "powercap/intel-rapl:1/energy_uj").write_text("3000000\n")
    (tmp_path / "powercap/intel-rapl:0:0/energy_uj").write_text("999999999\n")
    meter.stop()
    r = meter.reading(10)
    assert r["joules"] == pytest.approx((150 + 2_000_000) * 1e-6)
    assert r["method"] == "rapl" and r["reps"] == 10


def test_rapl_delta():
    assert energy.rapl_delta_uj(10, 30, MAX) == 20
    assert energy.rapl_delta_uj(MAX - 5, 5, MAX) == 10
    assert energy.rapl_delta_uj(MAX - 5, 5, None) is None


def test_rapl_absent_tree_names_the_path(tmp_path):
    r = energy.CaseEnergy(["cpu"], powercap_root=str(tmp_path / "none")).reading(5)
    assert r["joules"] is None and r["method"] is None
    assert str(tmp_path / "none") in r["reason"] and "absent" in r["reason"]


def test_rapl_root_only_counter_names_the_path(tmp_path, monkeypatch):
    root = powercap(tmp_path / "pc", {"intel-rapl:0": ("package-0", 1, MAX)})
    real = energy._read_text

    def denied(path):  # chmod would not stop a test run as root
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(energy, "_read_text", denied)
    r = energy.CaseEnergy(["cpu:0"], powercap_root=root).reading(5)
    assert r["joules"] is None
    assert f"{root}/intel-rapl:0/energy_uj is readable by root only" in r["reason"]


def test_rapl_tree_without_packages(tmp_path):
    root = powercap(tmp_path / "pc", {"intel-rapl:0": ("psys", 1, MAX)})
    zones, why = energy.rapl_zones(root)
    assert zones == [] and "no intel-rapl:N package zone" in why


def test_unknown_device_kind_is_a_reason():
    r = energy.CaseEnergy(["mps"]).reading(1)
    assert r["joules"] is None and "mps" in r["reason"]
    assert energy.device_kind("jax:gpu:2") == ("gpu", 2)
    assert energy.device_kind("jax:cpu:0") == ("cpu", None)
    assert energy.device_kind("cuda:1") == ("gpu", 1)


# -- the worker ---------------------------------------------------------------------------
def _check_reading(r: dict) -> None:
    assert set(r) >= {"joules", "window_s", "method", "scope", "reason", "reps"}
    if r["joules"] is None:
        assert r["reason"]
    else:
        assert r["method"] in energy.METHODS and r["joules"] > 0


def test_run_case_on_cpu_has_an_energy_reading():
    from tests.probes.helpers import run

    r = run("memory.triad", {"size_mib": 1, "dtype": "fp64"})
    assert r["status"] == "ok", r["reason"]
    _check_reading(r["energy"])
    assert r["energy"]["reps"] == len(r["durations_s"])
    assert r["energy"]["window_s"] > 0


def test_run_case_reads_the_powercap_root_it_is_given(tmp_path, monkeypatch):
    from tests.probes.helpers import run

    monkeypatch.setattr(energy, "POWERCAP_ROOT", powercap(tmp_path / "pc", {"intel-rapl:0": ("package-0", 5, MAX)}))
    r = run("memory.triad", {"size_mib": 1, "dtype": "fp64"})
    assert r["status"] == "ok", r["reason"]
    # The fake counter never moves: metered (rapl, package 0) but null, with why.
    e = r["energy"]
    assert (e["method"], e["scope"], e["joules"]) == ("rapl", "cpu package 0", None)
    assert "did not advance" in e["reason"]


def test_run_case_meters_a_kernel_with_its_own_measure(tmp_path, monkeypatch):
    from tests.probes.helpers import run

    monkeypatch.setattr(energy, "POWERCAP_ROOT", powercap(tmp_path / "pc", {"intel-rapl:0": ("package-0", 5, MAX)}))
    r = run("overhead.timer", {"reads": 2000})  # times itself, no per-repetition start times
    assert r["status"] == "ok", r["reason"]
    e = r["energy"]
    assert e["method"] == "rapl" and e["reps"] == len(r["durations_s"])
    assert "its warm-up included" in e["reason"]


def test_failed_case_still_has_an_energy_reason():
    from tests.probes.helpers import run

    r = run("memory.triad", {"dtype": "fp64"})  # no size: the case fails
    assert r["status"] != "ok"
    assert r["energy"]["joules"] is None and r["energy"]["reason"].startswith(f"case {r['status']}")


# -- ranks --------------------------------------------------------------------------------
def _rank(reading, reps=4):
    return {"status": "ok", "reason": "", "durations_s": [0.01] * reps, "t_start_ns": [1] * reps,
            "extra": {}, "energy": reading}


def _reading(j, scope, method="nvml_energy_counter", window=1.0, reason=None, reps=4, host="node-a"):
    return {"joules": j, "window_s": window, "method": method, "scope": scope, "reason": reason, "reps": reps,
            "host": host}


def test_combine_sums_gpu_ranks():
    out = combine([_rank(_reading(10.0, "cuda:0", window=1.0)), _rank(_reading(12.5, "cuda:1", window=1.2))], 2)
    e = out["energy"]
    assert e["joules"] == pytest.approx(22.5)
    assert e["scope"] == "cuda:0+cuda:1" and e["window_s"] == pytest.approx(1.2)
    assert e["method"] == "nvml_energy_counter" and e["reason"] is None


def test_combine_gpu_rank_without_joules_nulls_the_sum():
    e = combine_energy([_reading(10.0, "cuda:0"), _reading(None, "cuda:1", method=None, reason="NVML unavailable")])
    assert e["joules"] is None and "rank 1: NVML unavailable" in e["reason"]
    assert combine_energy([_reading(1.0, "cuda:0"), None])["joules"] is None


def test_combine_cpu_ranks_take_rank_0_only():
    out = combine([_rank(_reading(7.0, "cpu package 0", "rapl")), _rank(_reading(7.3, "cpu package 0", "rapl"))], 2)
    e = out["energy"]
    assert e["joules"] == 7.0
    assert e["scope"] == "cpu package 0 (rank 0 of ranks 0, 1: they share the package)"


def test_combine_counts_each_node_and_each_board_once():
    # torchrun over two nodes: one package reading per node, summed.
    e = combine_energy([_reading(7.0, "cpu package 0", "rapl", host="a"), _reading(7.3, "cpu package 0", "rapl", host="a"),
                        _reading(5.0, "cpu package 0", "rapl", host="b")])
    assert e["joules"] == pytest.approx(12.0)
    # Two ranks on one GPU read one board: counted once.
    e = combine_energy([_reading(3.0, "cuda:0"), _reading(3.1, "cuda:0"), _reading(4.0, "cuda:1")])
    assert e["joules"] == pytest.approx(7.0) and e["scope"].endswith("+cuda:1")


# -- cases columns ------------------------------------------------------------------------
def _case():
    return PlannedCase("c1", "gemm.square", "gemm", "torch", "cuda:0", {})


def test_case_row_energy_columns():
    result = {"status": "ok", "durations_s": [0.01] * 4, "extra": {},
              "work": {"flops": 2e12, "bytes": 3e9, "bound": "compute", "dtype": "fp16"},
              "energy": _reading(8.0, "cuda:0", window=0.5)}
    row = case_row(_case(), result, {})
    assert row["energy_j"] == pytest.approx(2.0)
    assert row["avg_power_w"] == pytest.approx(16.0)
    assert row["flops_per_j"] == pytest.approx(1e12)
    assert row["bytes_per_j"] == pytest.approx(1.5e9)
    assert (row["energy_method"], row["energy_scope"], row["energy_reason"]) == ("nvml_energy_counter", "cuda:0", None)
    assert check_case_row(row) is None


def test_case_row_without_energy_is_null_with_reason():
    for result in ({"status": "failed", "reason": "boom", "durations_s": []},
                   {"status": "ok", "durations_s": [0.1], "energy": _reading(None, "cpu package", None,
                                                                               reason="/sys/class/powercap is absent")}):
        row = case_row(_case(), result, {})
        assert all(row[c] is None for c in ENERGY_COLUMNS if c != "energy_reason" and c != "energy_scope"
                   and c != "energy_method")
        assert row["energy_reason"]
        assert check_case_row(row) is None


def test_cases_frame_types_and_old_rows():
    new = case_row(_case(), {"status": "ok", "durations_s": [0.1], "energy": _reading(None, "cuda:0", None,
                                                                                        reason="x")}, {})
    old = {k: v for k, v in new.items() if k not in ENERGY_COLUMNS}
    old["case_id"] = "c0"
    assert check_case_row(old) is None  # runs written before the columns stay valid
    df = cases_frame([old, new])
    assert str(df["energy_j"].dtype) == "float64" and math.isnan(df["energy_j"].iloc[0])
    assert check_case_row({**new, "energy_j": "3 J"}) is not None
