from __future__ import annotations

import pytest

from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import memory
from tests.probes.helpers import cpu_device, host, run


@pytest.mark.parametrize("op,arrays,flops", [("copy", 2, 0), ("scale", 2, 1), ("add", 3, 1), ("triad", 3, 2)])
def test_stream_counting(op, arrays, flops):
    probe = {"copy": memory.Copy, "scale": memory.Scale, "add": memory.Add, "triad": memory.Triad}[op]()
    work = probe.work({"size_mib": 8, "dtype": "fp64"}, {"type": "cpu"})
    elements = 8 * 2**20 // 8
    assert work.bytes == arrays * 8 * elements
    assert work.flops == flops * elements
    assert work.bound == "memory"


def test_auto_size_is_four_times_the_last_level_cache():
    llc = host()["last_level_cache_bytes"]
    assert memory.array_bytes("auto", True, llc) == max(4 * llc, 64 * 2**20)
    assert memory.array_bytes("auto", False, None) == 256 * 2**20
    assert memory.array_bytes(16, True, llc) == 16 * 2**20


@pytest.mark.parametrize("op", ["copy", "scale", "add", "triad"])
def test_ops_run_and_check(op):
    result = run(f"memory.{op}", {"size_mib": 4, "dtype": "fp32"})
    assert result["status"] == "ok", result
    assert len(result["durations_s"]) >= 3
    assert result["extra"]["max_rel_error"] <= 1e-6
    assert result["resolved_params"]["size_mib"] == 4


def test_auto_resolves_in_the_result():
    result = run("memory.triad", {"size_mib": "auto", "dtype": "fp64"}, {"min_reps": 1, "max_reps": 1})
    assert result["status"] == "ok"
    assert result["resolved_params"]["size_mib"] * 2**20 >= 4 * host()["last_level_cache_bytes"]


def test_a_wrong_kernel_fails_the_check():
    ctx = CaseContext("id", "memory.triad", {"size_mib": 1, "dtype": "fp64"}, "cpu:0", cpu_device(), "torch", host())
    kernel = prepare_case(ctx)
    kernel.run()
    kernel.check()
    kernel.a[123] += 1.0  # one wrong element among a million
    with pytest.raises(Exception, match="max relative error"):
        kernel.check()


def test_oversized_request_is_skipped_with_figures():
    result = run("memory.copy", {"size_mib": 10**7, "dtype": "fp64"})
    assert result["status"] == "skipped"
    assert "MiB free" in result["reason"]


def test_the_reference_computes_only_the_named_op():
    # copy touches a and c only: a backend may pass None for b.
    assert memory.reference("copy", 1.0, None, 2.0) == (2.0, 1.0)
    assert memory.reference("triad", 1.0, 2.0, 3.0) == (1.0, 2.0 + memory.SCALAR * 3.0)
