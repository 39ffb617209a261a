"""probes.native: a dtype the CPU has no arithmetic for is measured through fp32, marked
``extra.native: false`` and judged by the fp32 peak. Every machine here is a stand-in
built from its cpuinfo flags, so the tests assert both paths on any host."""

from __future__ import annotations

import json

import pytest

from harness import nominal, registry
from harness.registry import CaseContext, PlannedCase, Work
from harness.plan import host_facts
from harness.runner import case_row
from harness.execute import prepare_case, run_case
from probes import decode, gemm, prefill
from probes.native import NATIVE_FLAGS, cpu_native, native_path
from tests.probes.helpers import cpu_device, host

# cpuinfo flags as harness.environment reports them (cpu_isa), per machine.
ZEN3 = {"avx": True, "avx2": True, "fma": True, "f16c": True, "avx512f": False, "avx512_bf16": False,
        "avx512_fp16": False, "amx_bf16": False}
ZEN4 = {**ZEN3, "avx512f": True, "avx512bw": True, "avx512vl": True, "avx512_bf16": True}
SAPPHIRE_RAPIDS = {**ZEN4, "avx512_fp16": True, "amx_tile": True, "amx_bf16": True}
GRANITE_RAPIDS = {**SAPPHIRE_RAPIDS, "amx_fp16": True}
GRAVITON2 = {"neon": True, "asimd_fp16": True, "sve": False, "bf16": False}  # Neoverse N1
GRAVITON3 = {"neon": True, "asimd_fp16": True, "sve": True, "bf16": True}  # Neoverse V1

MACHINES = {"zen3": ZEN3, "zen4": ZEN4}
FAST = {"warmup": 1, "warmup_s": 0.0, "min_reps": 2, "max_reps": 3, "budget_s": 0.1}


def machine(isa: dict) -> dict:
    """This host's facts with the ISA of the stand-in machine."""
    return {**host(), "cpu_isa": dict(isa)}


@pytest.mark.parametrize(("isa", "bf16", "fp16"), [
    (ZEN3, False, False),
    (ZEN4, True, False),
    (SAPPHIRE_RAPIDS, True, True),
    (GRANITE_RAPIDS, True, True),
    (GRAVITON2, False, False),  # asimdhp is fp16 arithmetic, but not counted (see probes.native)
    (GRAVITON3, True, False),
    ({}, False, False),  # flags unknown: the safe (fp32) path
])
def test_native_decision_comes_from_the_flags(isa, bf16, fp16):
    h = {"cpu_isa": isa}
    assert cpu_native("bf16", h).native is bf16
    assert cpu_native("fp16", h).native is fp16
    for d in ("fp32", "fp64"):
        assert cpu_native(d, h).native and not cpu_native(d, h).checked
    emulated = [p for p in (cpu_native("bf16", h), cpu_native("fp16", h)) if not p.native]
    assert all(p.compute_dtype == "fp32" and "emulated via fp32 upcast" in p.via for p in emulated)


def test_emulated_path_names_what_is_missing_and_sets_the_peak_dtype():
    path = cpu_native("bf16", {"cpu_isa": ZEN3})
    assert path.via == "bf16 emulated via fp32 upcast: no " + "/".join(NATIVE_FLAGS["bf16"]) + " on this CPU"
    extra: dict = {}
    work = path.record(Work(flops=1.0, bytes=2.0, dtype="bf16"), extra)
    assert work.peak_dtype == "fp32" and work.dtype == "bf16"
    assert extra["native"] is False and extra["native_via"] == path.via and extra["judged_against"].startswith("fp32")
    extra = {}
    same = cpu_native("bf16", {"cpu_isa": ZEN4}).record(Work(dtype="bf16"), extra)
    assert same.peak_dtype is None and extra == {"native": True, "native_via": "bf16 native (avx512_bf16)"}
    # GPUs: no CPU flag check, no marker (their unsupported dtypes are skip rules).
    assert native_path("bf16", {"type": "cuda"}, {"cpu_isa": {}}).extra() == {}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_no_cpu_skips_a_dtype_for_lack_of_a_native_path(name):
    cpu, h = {"type": "cpu"}, {"cpu_isa": MACHINES[name]}
    for dtype in ("bf16", "fp16"):
        assert gemm.gemm_skip_reason(dtype, cpu, h, emulated_ok=True) is None
        for probe, params in [
            (decode.DecodeAttention(), {"model": "tiny", "batch": 1, "ctx": 256, "layout": "paged", "dtype": dtype}),
            (decode.DecodeProjection(), {"model": "tiny", "proj": "qkv", "batch": 1, "dtype": dtype}),
            (decode.DecodeLayer(), {"model": "tiny", "batch": 1, "ctx": 64, "dtype": dtype}),
            (prefill.PrefillMlp(), {"model": "tiny", "batch": 1, "seq": 16, "dtype": dtype}),
            (gemm.GemmSquare(), {"n": 64, "dtype": dtype}),
        ]:
            assert probe.skip_reason(params, cpu, h) is None, (probe.name, dtype)


CASES = [
    ("gemm.square", {"n": 128}),
    ("decode.projection", {"model": "tiny", "proj": "qkv", "batch": 2}),
    ("decode.attention", {"model": "tiny", "batch": 2, "ctx": 128, "layout": "contiguous"}),
    ("decode.layer", {"model": "tiny", "batch": 1, "ctx": 64}),
    ("prefill.projection", {"model": "tiny", "proj": "o", "batch": 1, "seq": 32}),
    ("prefill.attention", {"model": "tiny", "batch": 1, "seq": 32}),
    ("prefill.mlp", {"model": "tiny", "batch": 1, "seq": 32}),
    ("prefill.layer", {"model": "tiny", "batch": 1, "seq": 32}),
    ("decode.lm_head", {"model": "tiny", "batch": 2, "tp": 1}),
    ("prefill.lm_head", {"model": "tiny", "batch": 1, "seq": 16}),
    ("composite.tp_decode_step", {"model": "tiny", "layers": 1, "batch": 1, "ctx": 64, "world_size": 1}),
    ("composite.colocated_request", {"model": "tiny", "layers": 1, "prompt": 16, "tokens": 3, "batch": 1,
                                     "arrival": "back_to_back", "rate": 1.0}),
]


@pytest.mark.parametrize("name", sorted(MACHINES))
@pytest.mark.parametrize(("probe", "params"), CASES, ids=[c[0] for c in CASES])
def test_bf16_runs_checked_on_either_machine(probe, params, name):
    """Zen 3 (no bf16 arithmetic): measured through fp32, marked, judged by fp32; Zen 4:
    native, no peak override. Both pass the float64 check."""
    registry.discover()
    params = {**params, "dtype": "bf16"}
    r = run_case({"case_id": registry.case_id(probe, params, "cpu:0"), "probe": probe, "params": params,
                  "device": "cpu:0", "device_info": cpu_device(), "backend": "torch",
                  "host": machine(MACHINES[name]), "seed": 0, "timing": FAST})
    assert r["status"] == "ok", r.get("reason")
    assert r["extra"]["rel_error"] < 2e-2
    assert r["work"]["dtype"] == "bf16"
    if name == "zen3":
        assert r["extra"]["native"] is False and "fp32 upcast" in r["extra"]["native_via"]
        assert r["work"]["peak_dtype"] == "fp32"
    else:
        assert r["extra"]["native"] is True and r["work"]["peak_dtype"] is None


def test_emulated_kernel_keeps_its_data_in_the_dtype_and_multiplies_in_fp32():
    import torch

    ctx = CaseContext("id", "gemm.square", {"n": 64, "dtype": "bf16"}, "cpu:0", cpu_device(), "torch",
                      machine(ZEN3))
    k = prepare_case(ctx)
    assert k.a.dtype == k.b.dtype == k.c.dtype == torch.bfloat16
    k.run()
    want = (k.a.float() @ k.b.float()).to(torch.bfloat16)
    assert torch.equal(k.c, want)  # exactly the fp32 product, rounded once
    native = prepare_case(CaseContext("id", "gemm.square", {"n": 64, "dtype": "bf16"}, "cpu:0",
                                                   cpu_device(), "torch", machine(ZEN4)))
    assert native.matmul is torch.matmul and k.matmul is not torch.matmul


def _cpu_nominal(flags: dict, family: int) -> dict:
    desc = {"vendor": "AuthenticAMD", "family": family, "model": 1, "model_name": "AMD EPYC stand-in",
            "flags": [f for f, v in flags.items() if v], "cores": 2, "threads_per_core": 1,
            "max_mhz": 3000.0, "mhz_source": "test"}
    return nominal.nominal_for({"id": "cpu:0", "type": "cpu", "name": "cpu"}, cpu=desc)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_an_emulated_case_is_judged_by_the_fp32_peak(name):
    """The runner's row: Zen 3 has no bf16 peak, so without peak_dtype the bf16 GEMM would
    have no roofline fraction; with it, the fraction is flops/s over the fp32 peak. On
    Zen 4 the bf16 peak (VDPBF16PS) judges it."""
    nom = _cpu_nominal(MACHINES[name], 0x19)
    path = native_path("bf16", {"type": "cpu"}, {"cpu_isa": MACHINES[name]})
    work = path.record(gemm.gemm_work(1024, 1024, 1024, "bf16"), {})
    case = PlannedCase("gemm.square[n=1024,dtype=bf16]@cpu:0", "gemm.square", "gemm", "torch", "cpu:0",
                       {"n": 1024, "dtype": "bf16"})
    result = {"status": "ok", "durations_s": [0.01] * 5, "extra": path.extra(),
              "work": {"flops": work.flops, "bytes": work.bytes, "bound": None, "dtype": "bf16",
                       "collective": None, "link": None, "peak_dtype": work.peak_dtype}}
    row = case_row(case, result, nom)
    rate = work.flops / 0.01
    if name == "zen3":
        assert "bf16" not in nom["compute_flops"]
        assert row["roofline_fraction"] == pytest.approx(rate / nom["compute_flops"]["fp32"])
        assert json.loads(row["extra"])["native"] is False
    else:
        assert row["roofline_fraction"] == pytest.approx(rate / nom["compute_flops"]["bf16"])
    assert row["dtype"] == "bf16" and row["bound"] == "compute"


def test_a_row_written_before_peak_dtype_existed_is_judged_by_its_dtype():
    nom = _cpu_nominal(ZEN4, 0x19)
    case = PlannedCase("g", "gemm.square", "gemm", "torch", "cpu:0", {"n": 8, "dtype": "bf16"})
    old_work = {"flops": 1e9, "bytes": 1e3, "bound": None, "dtype": "bf16", "collective": None, "link": None}
    row = case_row(case, {"status": "ok", "durations_s": [1.0], "work": old_work}, nom)
    assert row["roofline_fraction"] == pytest.approx(1e9 / nom["compute_flops"]["bf16"])


def test_flags_off_makes_the_probes_see_a_cpu_without_them(monkeypatch):
    env = {"cpu": {"isa": {"value": {"avx2": True, "avx512_bf16": True, "amx_bf16": True}, "source": "x"}}}
    monkeypatch.delenv("COHERENCE_CPU_FLAGS_OFF", raising=False)
    assert cpu_native("bf16", host_facts(env)).native
    monkeypatch.setenv("COHERENCE_CPU_FLAGS_OFF", "avx512_bf16, amx_bf16")
    facts = host_facts(env)
    assert facts["cpu_isa"] == {"avx2": True, "avx512_bf16": False, "amx_bf16": False}
    assert not cpu_native("bf16", facts).native
