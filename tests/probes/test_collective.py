"""Collective probes: the busbw factors, size rounding, the expected values against an
independent simulation of each collective, the check failing on a wrong result, and
real Gloo runs at world sizes 2 and 4 through the CLI (busbw recomputed from the raw
samples).

This module doubles as a plugin (``COHERENCE_TEST_COLLECTIVE_PLUGIN=1``): it then
registers ``testing.collective_corrupt``, an all_reduce whose rank 1 corrupts its
output, to show that one rank's wrong result fails the case on every rank."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from harness.errors import ProbeCheckFailed, ProbeSkip
from harness import registry
from harness.execute import prepare_case
from probes import collective as coll
from probes.collective import (
    CHUNKED,
    OPS,
    busbw_factor,
    check_indices,
    compare,
    expected_values,
    input_values,
    layout,
    resolve_size,
    value_period,
)
from probes.torch import collective as tcoll
from probes.torch.collective import CollectiveKernel, values_at
from probes.torch.common import torch_dtype
from tests.probes.helpers import altered_probe

PLUGIN_ENV = "COHERENCE_TEST_COLLECTIVE_PLUGIN"


# -- the plugin: a kernel that gets the wrong answer on one rank ------------------------
class _CorruptingKernel(CollectiveKernel):
    def run(self) -> None:
        super().run()
        if self.rank == 1:
            self.output[0] += 1


def _corrupting(kernel, ctx) -> None:
    kernel.__class__ = _CorruptingKernel


if os.environ.get(PLUGIN_ENV) == "1":
    altered_probe(coll.AllReduce, "testing.collective_corrupt", _corrupting)


# -- the pure part ---------------------------------------------------------------------
FACTORS = {
    # op: {n: factor} (nccl-tests, doc/PERFORMANCE.md)
    "all_reduce": {2: 1.0, 3: 4 / 3, 4: 1.5, 8: 1.75},
    "all_gather": {2: 0.5, 3: 2 / 3, 4: 0.75, 8: 0.875},
    "reduce_scatter": {2: 0.5, 3: 2 / 3, 4: 0.75, 8: 0.875},
    "all_to_all": {2: 0.5, 3: 2 / 3, 4: 0.75, 8: 0.875},
    "broadcast": {2: 1.0, 3: 1.0, 4: 1.0, 8: 1.0},
    "reduce": {2: 1.0, 3: 1.0, 4: 1.0, 8: 1.0},
    "sendrecv": {2: 1.0, 3: 1.0, 4: 1.0, 8: 1.0},
}


@pytest.mark.parametrize("op", OPS)
def test_busbw_factor_is_nccl_tests(op):
    for n, want in FACTORS[op].items():
        assert busbw_factor(op, n) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError):
        busbw_factor("all_reduce_twice", 2)


def test_size_rounding():
    # Chunked ops: a multiple of n elements, rounded down.
    assert resolve_size("all_gather", 1024, 3, 4) == 1020
    assert resolve_size("reduce_scatter", 1024, 3, 4) == 1020
    assert resolve_size("all_to_all", 1000, 3, 2) == 996
    assert resolve_size("all_gather", 1024, 4, 4) == 1024
    assert resolve_size("all_to_all", 1000, 4, 4) == 992
    # Unchunked ops: whole elements only.
    assert resolve_size("all_reduce", 1023, 3, 4) == 1020
    assert resolve_size("broadcast", 1001, 7, 2) == 1000
    assert resolve_size("sendrecv", 1024, 3, 4) == 1024
    # Less than one element per rank: nothing left, and the case is skipped.
    assert resolve_size("reduce_scatter", 8, 4, 4) == 0
    probe = coll.ReduceScatter()
    reason = probe.skip_reason({"size_bytes": 8, "dtype": "fp32", "world_size": 4}, {"type": "cpu"}, {})
    assert reason and "below one fp32 element per rank" in reason
    assert probe.skip_reason({"size_bytes": 16, "dtype": "fp32", "world_size": 4}, {"type": "cpu"}, {}) is None


def test_layout_follows_the_nccl_tests_size_convention():
    # all_gather / reduce_scatter: size = the gathered (full) buffer; each rank size/n.
    assert layout("all_gather", 4096, 4, 4) == {"numel": 1024, "chunk": 256, "in_numel": 256, "out_numel": 1024}
    assert layout("reduce_scatter", 4096, 4, 4) == {"numel": 1024, "chunk": 256, "in_numel": 1024, "out_numel": 256}
    # all_to_all: size = each rank's send buffer, size/n to every peer.
    assert layout("all_to_all", 4096, 4, 4)["in_numel"] == 1024
    assert layout("all_reduce", 4096, 4, 4) == {"numel": 1024, "chunk": 1024, "in_numel": 1024, "out_numel": 0}


def test_work_model_carries_the_resolved_size_and_factor():
    work = coll.AllGather().work({"size_bytes": 1024, "dtype": "fp32", "world_size": 3}, {"type": "cpu"})
    assert work.collective == {"op": "all_gather", "size_bytes": 1020, "busbw_factor": pytest.approx(2 / 3)}
    assert work.bytes == 1020 and work.flops == 0 and work.bound == "link" and work.dtype == "fp32"
    work = coll.AllReduce().work({"size_bytes": 2**24, "dtype": "bf16", "world_size": 4}, {"type": "cuda"})
    assert work.collective == {"op": "all_reduce", "size_bytes": 2**24, "busbw_factor": 1.5}


def _simulate(op, inputs, n, dt, root=0):
    """What every rank holds after ``op``, computed independently of the probe: sums
    accumulated in the dtype rank by rank, like a ring or tree would."""
    import torch

    def total():
        acc = inputs[0].clone()
        for x in inputs[1:]:
            acc = acc + x
        return acc

    if op == "all_reduce":
        return [total() for _ in range(n)]
    if op == "reduce":
        return [total() if r == root else None for r in range(n)]
    if op == "reduce_scatter":
        return list(total().chunk(n))
    if op == "broadcast":
        return [inputs[root].clone() for _ in range(n)]
    if op == "all_gather":
        return [torch.cat(inputs) for _ in range(n)]
    if op == "all_to_all":
        return [torch.cat([inputs[i].chunk(n)[j] for i in range(n)]) for j in range(n)]
    if op == "sendrecv":
        return [inputs[(r - 1) % n].clone() for r in range(n)]
    raise ValueError(op)


def _inputs(op, n, dtype, size):
    import torch

    lay = layout(op, size, n, coll.DTYPE_BYTES[dtype])
    period = value_period(op, n, dtype)
    k = torch.arange(lay["in_numel"], dtype=torch.int64)
    dt = torch_dtype(dtype)
    return [input_values(op, r, n, k, lay["chunk"], period).to(dt) for r in range(n)], lay, period


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_expected_values_match_a_simulated_collective(op, dtype, n):
    import torch

    size = resolve_size(op, 3000 * coll.DTYPE_BYTES[dtype], n, coll.DTYPE_BYTES[dtype])
    inputs, lay, period = _inputs(op, n, dtype, size)
    # Inputs depend on the rank (a rank in the wrong place shows) and are never zero.
    assert all((x != 0).all() for x in inputs)
    assert not torch.equal(inputs[0], inputs[1])
    outputs = _simulate(op, inputs, n, torch_dtype(dtype))
    for rank, out in enumerate(outputs):
        idx = check_indices(out.numel() if out is not None else lay["in_numel"], lay["chunk"])
        want = expected_values(op, rank, n, idx, lay["chunk"], period)
        if out is None:
            assert want is None  # reduce: only the root's output is specified
            continue
        assert out.numel() == (lay["out_numel"] or lay["in_numel"])
        assert compare(values_at(out, idx), want, coll.is_exact(op, n, dtype), dtype, n) is None, (op, rank)


@pytest.mark.parametrize("op", ["all_gather", "all_to_all", "sendrecv", "broadcast", "all_reduce", "reduce_scatter"])
def test_a_misrouted_or_missing_rank_is_detected(op):
    """Shuffled sources (a chunk in the wrong slot, the wrong neighbour, a missing
    rank in a sum) give values the check rejects."""
    n, dtype = 4, "fp32"
    size = resolve_size(op, 4096, n, 4)
    inputs, lay, period = _inputs(op, n, dtype, size)
    if op in ("all_reduce", "reduce_scatter"):
        wrong_inputs = [inputs[0], inputs[1], inputs[2], inputs[2]]  # rank 3's data lost
    elif op == "broadcast":
        wrong_inputs = inputs[1:] + inputs[:1]  # rank 1's data instead of the root's
    else:
        wrong_inputs = inputs[::-1]  # every rank's data in another rank's place
    outputs = _simulate(op, wrong_inputs, n, torch_dtype(dtype))
    for rank, out in enumerate(outputs):
        idx = check_indices(out.numel(), lay["chunk"])
        want = expected_values(op, rank, n, idx, lay["chunk"], period)
        assert compare(values_at(out, idx), want, True, dtype, n) is not None, (op, rank)


def test_check_indices_cover_every_chunk_boundary():
    import numpy as np

    assert np.array_equal(check_indices(1000, 250), np.arange(1000))
    numel, chunk = 10_000_000, 1_250_000
    idx = check_indices(numel, chunk)
    assert idx.dtype == np.int64 and idx.min() == 0 and idx.max() == numel - 1
    assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
    for j in range(numel // chunk):
        assert j * chunk in idx and (j + 1) * chunk - 1 in idx
    assert coll.CHECK_POINTS <= idx.size <= coll.CHECK_POINTS + 2 * (numel // chunk) + 1


def test_bf16_sums_stay_exact():
    # n × period never exceeds bf16's exact integers (256), so sums compare exactly.
    for n in (2, 3, 4, 8, 16, 64, 256):
        assert n * value_period("all_reduce", n, "bf16") <= 256
        assert coll.is_exact("all_reduce", n, "bf16")
    assert not coll.is_exact("all_reduce", 300, "bf16")  # falls back to a tolerance


def _filled_kernel(op, rank, n, dtype="fp32", size=4096):
    """A kernel on the CPU without a process group, its output set to what the
    collective would have produced."""
    import torch

    kernel = CollectiveKernel(op, resolve_size(op, size, n, coll.DTYPE_BYTES[dtype]), dtype, rank, n, "cpu")
    out = kernel.output
    want = expected_values(op, rank, n, torch.arange(out.numel()), kernel.chunk, kernel.period)
    if want is not None:
        out.copy_(want.to(out.dtype))
    return kernel


@pytest.mark.parametrize("op", OPS)
def test_wrong_result_fails_the_check(op):
    for rank in (0, 1):
        kernel = _filled_kernel(op, rank, 3)
        kernel.check()  # right values pass
        kernel.output[5] += 1
        if op == "reduce" and rank != 0:
            kernel.check()  # off the root a reduce's buffer is unspecified
            continue
        with pytest.raises(ProbeCheckFailed, match=rf"{op} on rank {rank} of 3: 1 of \d+ checked elements differ"):
            kernel.check()


def test_untouched_output_fails_the_check():
    """A collective that never ran (output still its initial fill) is caught."""
    for op in OPS:
        n = 2
        kernel = CollectiveKernel(op, resolve_size(op, 4096, n, 4), "fp32", 1, n, "cpu")
        if op == "reduce":
            continue  # rank 1 of a reduce has nothing to check
        with pytest.raises(ProbeCheckFailed):
            kernel.check()


def test_nan_fails_the_check():
    kernel = _filled_kernel("all_reduce", 0, 2, "bf16")
    kernel.output[0] = float("nan")
    with pytest.raises(ProbeCheckFailed, match="differ"):
        kernel.check()


def test_in_place_ops_refill_before_each_repetition():
    import torch

    kernel = _filled_kernel("all_reduce", 0, 2)  # output = the sum, i.e. the input is gone
    before = kernel.pristine.clone()
    assert not torch.equal(kernel.inp, before)
    kernel.before_each()  # no group: refill + synchronize only
    assert torch.equal(kernel.inp, before)
    assert kernel.extra["before_each"] == "refill input, synchronize, barrier"
    assert _filled_kernel("all_gather", 0, 2).pristine is None  # nothing to refill


def _ctx(op="all_gather", size=4096, n=2, rank=0, device="cpu:0", dtype="fp32"):
    from harness.registry import CaseContext

    return CaseContext(
        case_id=f"collective.{op}[...]", probe=f"collective.{op}",
        params={"size_bytes": size, "dtype": dtype, "world_size": n}, device=device,
        device_info={"type": device.split(":")[0]}, backend="torch", host={},
        rank=rank, world_size=n, group_devices=[device] * n,
    )


def test_prepare_resolves_the_size_and_the_work_model():
    kernel = prepare_case(_ctx("all_gather", size=1000, n=3))
    assert kernel.params == {"size_bytes": 996, "dtype": "fp32", "world_size": 3}
    assert kernel.work.collective == {"op": "all_gather", "size_bytes": 996, "busbw_factor": pytest.approx(2 / 3)}
    assert kernel.inp.numel() == 83 and kernel.out.numel() == 249


def test_prepare_skips_what_does_not_fit(monkeypatch):
    import probes.torch.common

    monkeypatch.setattr(probes.torch.common, "free_bytes", lambda device: 10_000)
    with pytest.raises(ProbeSkip, match=r"collective.all_reduce at 1048576 bytes × 4 ranks \(4 rank\(s\) on cpu:0\)"):
        prepare_case(_ctx("all_reduce", size=2**20, n=4))
    with pytest.raises(ProbeSkip, match="below one fp32 element per rank"):
        prepare_case(_ctx("all_to_all", size=12, n=4))


def test_ranks_sharing_memory(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tcoll.ranks_sharing_memory(_ctx(n=4)) == 4  # the harness's CPU ranks: one host
    assert tcoll.ranks_sharing_memory(_ctx(n=4, device="cuda:1")) == 1  # one rank per GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 of the 4 ranks on this node
    assert tcoll.ranks_sharing_memory(_ctx(n=4)) == 2


def test_bf16_skipped_below_compute_capability_8():
    probe = coll.AllReduce()
    params = {"size_bytes": 4096, "dtype": "bf16", "world_size": 2}
    v100 = {"type": "cuda", "name": "Tesla V100", "platform": "cuda", "extra": {"compute_capability": "7.0"}}
    h100 = {"type": "cuda", "name": "H100", "platform": "cuda", "extra": {"compute_capability": "9.0"}}
    assert "compute capability 8.0" in probe.skip_reason(params, v100, {})
    assert probe.skip_reason(params, h100, {}) is None
    assert probe.skip_reason({**params, "dtype": "fp32"}, v100, {}) is None


# -- real ranks through the CLI ----------------------------------------------------------
from tests.conftest import coherence  # noqa: E402

SIZES = [1000, 262144]


def _suite(ws: int, corrupt: bool = False) -> str:
    lines = [
        f"name: collective-ws{ws}",
        "timeout_s: 120",
        "cpu_ranks: 4",
        "timing: {warmup: 1, min_reps: 3, max_reps: 8, budget_s: 0.05}",
    ]
    if corrupt:
        lines.append("plugins: [tests.probes.test_collective]")
    lines.append("probes:")
    for op in OPS:
        lines.append(f"  collective.{op}: {{params: {{size_bytes: {SIZES}, dtype: [fp32, bf16], world_size: {ws}}}}}")
    if corrupt:
        lines.append(f"  testing.collective_corrupt: {{params: {{size_bytes: [4096], world_size: {ws}}}}}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """One run per world size (a rank pool serves consecutive cases of one shape). The
    world-size-2 run ends with the corrupting probe: its rank 1 is wrong."""
    runs = {}
    for ws in (2, 4):
        base = tmp_path_factory.mktemp(f"ws{ws}")
        suite = base / "suite.yaml"
        suite.write_text(_suite(ws, corrupt=ws == 2))
        out = base / "results"
        proc = coherence(
            "run", "--suite", str(suite), "--out", str(out), "--devices", "cpu", "--quiet",
            env={PLUGIN_ENV: "1"}, timeout=300,
        )
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        runs[ws] = (proc, run)
    return runs


@pytest.mark.slow
def test_gloo_every_op_at_world_sizes_2_and_4(gloo_runs):
    for ws, (proc, run) in gloo_runs.items():
        cases = pd.read_parquet(run / "cases.parquet")
        ours = cases[cases["probe"].str.startswith("collective.")]
        assert len(ours) == len(OPS) * len(SIZES) * 2, ws
        bad = ours[ours["status"] != "ok"]
        assert bad.empty, bad[["case_id", "status", "reason"]].to_string()
        assert (ours["world_size"] == ws).all()
        assert set(ours["device"]) == {f"cpu:0-{ws - 1}"}
        for row in ours.itertuples():
            op = row.probe.split(".", 1)[1]
            params = json.loads(row.params)
            resolved = json.loads(row.resolved_params)
            elem = coll.DTYPE_BYTES[params["dtype"]]
            # Resolved size = requested, rounded down to n elements for chunked ops.
            assert resolved["size_bytes"] == resolve_size(op, params["size_bytes"], ws, elem)
            assert row.bytes == resolved["size_bytes"]
            if op in CHUNKED and ws == 4 and params["size_bytes"] == 1000 and elem == 4:
                assert resolved["size_bytes"] == 992
            assert row.bound == "link"
            assert row.n >= 3
            extra = json.loads(row.extra)
            assert extra["op"] == op and extra["backend"] == "gloo" and len(extra["ranks"]) == ws
        samples = pd.read_parquet(run / "samples.parquet")
        per_case = samples[samples["case_id"].isin(ours["case_id"])].groupby("case_id")["rank"].nunique()
        assert (per_case == ws).all()  # every rank's own times are kept
    proc2, _ = gloo_runs[2]
    proc4, _ = gloo_runs[4]
    assert proc4.returncode == 0, proc4.stderr
    assert proc2.returncode == 1  # the corrupting probe failed (and only it)


@pytest.mark.slow
def test_wrong_result_on_one_rank_fails_the_case_on_all_ranks(gloo_runs):
    _, run = gloo_runs[2]
    cases = pd.read_parquet(run / "cases.parquet").set_index("probe")
    row = cases.loc["testing.collective_corrupt"]
    # failed, not timeout: rank 0's check passed locally but the ranks agreed.
    assert row["status"] == "failed", row["reason"]
    assert "correctness check failed" in row["reason"]
    assert "all_reduce on rank 1 of 2: 1 of" in row["reason"]
    assert "wrong result on rank(s) 1" in row["reason"]


@pytest.mark.slow
def test_busbw_recomputed_from_the_raw_samples(gloo_runs):
    import numpy as np

    seen = set()
    for ws, (_, run) in gloo_runs.items():
        cases = pd.read_parquet(run / "cases.parquet")
        cases = cases[cases["probe"].str.startswith("collective.") & (cases["status"] == "ok")]
        samples = pd.read_parquet(run / "samples.parquet")
        assert "busbw_Bps" in cases.columns, (
            "cases.parquet has no busbw_Bps column: the case result's work lacks the probe's "
            "Work.collective (harness.worker.run_case must pass it on)"
        )
        for row in cases.itertuples():
            op = row.probe.split(".", 1)[1]
            size = json.loads(row.resolved_params)["size_bytes"]
            mine = samples[samples["case_id"] == row.case_id]
            per_rep = mine.groupby("rep")["duration_s"].max()  # the slowest rank
            p50 = float(np.percentile(per_rep.to_numpy(), 50))
            assert row.p50_s == pytest.approx(p50, rel=1e-12)
            factor = FACTORS[op][ws]
            assert row.busbw_factor == pytest.approx(factor, rel=1e-12)
            assert row.algbw_Bps == pytest.approx(size / p50, rel=1e-9)
            assert row.busbw_Bps == pytest.approx(size / p50 * factor, rel=1e-9), row.case_id
            assert row.collective_op == op
            # Beside it nccl-tests' back-to-back figure, from the kernel's timed loop.
            assert row.busbw_method == "per_rep_p50"
            b2b = json.loads(row.extra)["b2b"]
            assert len(b2b["rank_time_s"]) == ws
            assert b2b["time_s"] == pytest.approx(sum(b2b["rank_time_s"]) / ws, rel=1e-12)
            assert 3 <= b2b["iters"] <= 8  # the suite's min_reps / max_reps bound the loop
            assert row.algbw_b2b_Bps == pytest.approx(size / b2b["time_s"], rel=1e-9)
            assert row.busbw_b2b_Bps == pytest.approx(size / b2b["time_s"] * factor, rel=1e-9)
            assert "back-to-back" in row.busbw_b2b_method
            seen.add((op, ws))
    assert seen == {(op, ws) for op in OPS for ws in (2, 4)}
    assert FACTORS["all_reduce"][4] == 1.5


def test_a_node_with_fewer_gpus_than_the_world_size_plans_skipped_cases():
    """Found on a one-GPU H100: planning a 2- and 4-rank collective used to raise."""
    from harness.config import parse_suite
    from harness.plan import plan

    registry.discover()
    gpu = {"id": "cuda:0", "type": "cuda", "index": 0, "name": "NVIDIA H100 80GB HBM3", "backend": "torch"}
    suite = parse_suite({"probes": {"collective.all_reduce": {"params": {"size_bytes": 1024, "world_size": [2, 4]}}}}, "t")
    cases = plan(suite, suite.probes, [gpu], "torch", {})
    assert [c.device for c in cases] == ["cuda:0-1", "cuda:0-3"]
    assert [c.skip for c in cases] == ["needs 2 cuda devices, 1 selected", "needs 4 cuda devices, 1 selected"]


# -- the back-to-back figure (nccl-tests' time column) -----------------------------------
class _FakeClock:
    """perf_counter that moves only when the timed work runs: 10 ms per call."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def run(self) -> None:
        self.calls += 1
        self.now += 0.010


@pytest.mark.parametrize("budget_s, min_reps, max_reps, iters", [
    (0.1, 3, 50, 10),   # as many as fit in the budget at the warm-up's pace
    (0.0, 4, 50, 4),    # never fewer than min_reps
    (10.0, 3, 20, 20),  # never more than max_reps
])
def test_back_to_back_runs_k_iterations_and_averages(monkeypatch, budget_s, min_reps, max_reps, iters):
    import time

    from harness.timing import TimingPolicy

    clock = _FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    policy = TimingPolicy(warmup=2, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s)
    got = tcoll.back_to_back(clock.run, policy, 0, 1, "cpu:0")
    assert got["warmup"] == 2 and got["iters"] == iters
    assert clock.calls == 2 + iters  # nothing else ran in the loop
    assert got["time_s"] == pytest.approx(0.010) and got["rank_time_s"] == [pytest.approx(0.010)]
    assert "nccl-tests" in got["method"]


def test_case_row_reports_both_figures_and_says_which_is_which():
    from harness.registry import PlannedCase
    from harness.runner import case_row

    case = PlannedCase(case_id="c", probe="collective.all_reduce", family="collective", backend="torch",
                       device="cpu:0-3", params={}, timing={}, world_size=4, group_devices=["cpu:0"] * 4)
    work = {"flops": 0.0, "bytes": 4e6, "bound": "link", "dtype": "fp32",
            "collective": {"op": "all_reduce", "size_bytes": 4e6, "busbw_factor": 1.5}}
    result = {"status": "ok", "durations_s": [0.004, 0.002, 0.003], "work": work,
              "extra": {"b2b": {"time_s": 0.001, "method": coll.B2B_METHOD}}}
    row = case_row(case, result, {})
    assert row["busbw_Bps"] == pytest.approx(4e6 / 0.003 * 1.5) and row["busbw_method"] == "per_rep_p50"
    assert row["busbw_b2b_Bps"] == pytest.approx(4e6 / 0.001 * 1.5)
    assert row["busbw_b2b_method"] == coll.B2B_METHOD
    # A kernel without the loop (JAX, or a run written before issue 19): no figure, no method.
    row = case_row(case, {**result, "extra": {}}, {})
    assert row["busbw_b2b_Bps"] is None and row["busbw_b2b_method"] is None
