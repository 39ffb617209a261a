from __future__ import annotations

import pytest

from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import gemm
from tests.probes.helpers import cpu_device, host, run


def test_work_model_hand_computed():
    w = gemm.GemmShaped().work({"mnk": "512x6144x4096", "dtype": "bf16"}, {})
    assert w.flops == 2 * 512 * 6144 * 4096 == 25_769_803_776
    assert w.bytes == 2 * (512 * 4096 + 4096 * 6144 + 512 * 6144)
    sq = gemm.GemmSquare().work({"n": 1000, "dtype": "fp32"}, {})
    assert sq.flops == 2e9 and sq.bytes == 4 * 3 * 1e6 and sq.dtype == "fp32"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_runs_and_is_checked(dtype):
    # Every CPU runs bf16 (natively or through fp32, probes.native): no skip.
    result = run("gemm.square", {"n": 128, "dtype": dtype})
    assert result["status"] == "ok", result
    assert result["extra"]["rel_error"] < {"fp32": 1e-5, "bf16": 1e-2}[dtype]
    assert result["work"]["flops"] == 2 * 128**3


def test_scaled_output_fails_the_case():
    ctx = CaseContext("id", "gemm.shaped", {"mnk": "64x96x80", "dtype": "fp32"}, "cpu:0", cpu_device(), "torch", host())
    kernel = prepare_case(ctx)
    kernel.run()
    kernel.check()
    kernel.c.mul_(1.01)  # a kernel that is off by 1 %
    with pytest.raises(ProbeCheckFailed, match="relative error"):
        kernel.check()


def test_fp16_skip_rule_follows_the_isa():
    cpu = {"type": "cpu"}
    assert gemm.gemm_skip_reason("fp16", cpu, {"cpu_isa": {"avx512f": True}}) is not None
    assert gemm.gemm_skip_reason("fp16", cpu, {"cpu_isa": {"avx512_fp16": True}}) is None
    assert gemm.gemm_skip_reason("bf16", cpu, {"cpu_isa": {"avx2": True}}) is not None
    assert gemm.gemm_skip_reason("bf16", cpu, {"cpu_isa": {"amx_bf16": True}}) is None
    assert gemm.gemm_skip_reason("fp32", cpu, {"cpu_isa": {}}) is None
    # Probes that emulate a non-native dtype never skip it on a CPU.
    assert gemm.gemm_skip_reason("fp16", cpu, {"cpu_isa": {"avx512f": True}}, emulated_ok=True) is None
    assert gemm.gemm_skip_reason("bf16", cpu, {"cpu_isa": {"avx2": True}}, emulated_ok=True) is None
    assert gemm.GemmSquare().skip_reason({"n": 8, "dtype": "bf16"}, cpu, {"cpu_isa": {"avx2": True}}) is None
    old_gpu = {"type": "cuda", "extra": {"compute_capability": "7.0"}, "platform": "cuda"}
    assert "8.0" in gemm.gemm_skip_reason("bf16", old_gpu, {})


def test_fp16_case_on_a_cpu_without_it_is_measured_through_fp32():
    # A Zen 4's flags: bf16 arithmetic, no avx512_fp16/amx_fp16.
    result = run("gemm.square", {"n": 64, "dtype": "fp16"}, isa={"avx2": True, "avx512f": True, "avx512_bf16": True})
    assert result["status"] == "ok", result.get("reason")
    assert result["extra"]["native"] is False and "fp16 emulated via fp32 upcast" in result["extra"]["native_via"]
    assert result["work"]["peak_dtype"] == "fp32"
    native = run("gemm.square", {"n": 64, "dtype": "fp16"}, isa={"avx512_fp16": True})
    assert native["status"] == "ok" and native["extra"]["native"] is True and native["work"]["peak_dtype"] is None
