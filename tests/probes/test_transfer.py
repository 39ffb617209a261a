"""Transfer probes: work models, KV layouts and their equivalence, integrity checks that
catch corruption, the CPU cases, and the two-rank KV send/recv through the CLI.

Also a plugin (loaded by the CLI test when COHERENCE_TEST_CORRUPT_KV is set): a send/recv
probe whose receiver corrupts what it received, which must fail the case."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from harness import registry
from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case, run_case
from harness.registry import CaseContext
from probes import transfer
from probes.torch.common import free_bytes
from probes.torch.transfer import KVStore, kv_checksum
from probes.transfer import KVSpec, kv_spec
from tests.conftest import coherence
from tests.probes.helpers import altered_probe, cpu_device, host, run

FAST = {"min_reps": 2, "max_reps": 3, "budget_s": 0.1}
# A last-level cache this small needs no rotation copies for the KV sizes used here,
# which keeps the in-process cases quick (rotation itself is covered elsewhere).
SMALL_LLC = 256 * 1024


def kv_params(**over) -> dict:
    return {"model": "tiny", "ctx": 256, "layers": "auto", "layout": "paged", "path": "d2d", "dtype": "bf16", **over}


def ctx_for(probe: str, params: dict, llc: int | None = SMALL_LLC) -> CaseContext:
    h = {**host(), "last_level_cache_bytes": llc} if llc else host()
    return CaseContext(registry.case_id(probe, params, "cpu:0"), probe, params, "cpu:0", cpu_device(), "torch", h, seed=3)


def run_small_llc(probe: str, params: dict) -> dict:
    registry.discover()
    return run_case({
        "case_id": registry.case_id(probe, params, "cpu:0"), "probe": probe, "params": params,
        "device": "cpu:0", "device_info": cpu_device(), "backend": "torch",
        "host": {**host(), "last_level_cache_bytes": SMALL_LLC}, "seed": 0,
        "timing": {"warmup": 1, "warmup_s": 0.0, **FAST},
    })


# -- work models ---------------------------------------------------------------------------
def test_kv_bytes_hand_computed():
    kv = transfer.KVTransfer()
    cpu, gpu = {"type": "cpu"}, {"type": "cuda"}
    # llama-3.1-8b @ 4096 bf16: 32 layers x K,V x 8 kv heads x 128 dims x 4096 tokens x 2 B = 512 MiB
    w = kv.work({"model": "llama-3.1-8b", "ctx": 4096, "layers": "auto", "layout": "paged", "path": "d2d", "dtype": "bf16"}, gpu)
    assert w.bytes == 32 * 2 * 8 * 128 * 4096 * 2 == 536_870_912
    assert w.flops == 0 and w.bound == "memory"
    # tiny @ 4096 bf16: 4 layers x 2 x 4 x 64 x 4096 x 2 = 16 MiB
    w = kv.work({"model": "tiny", "ctx": 4096, "layers": "auto", "layout": "contiguous", "path": "d2d", "dtype": "bf16"}, cpu)
    assert w.bytes == 4 * 2 * 4 * 64 * 4096 * 2 == 16_777_216
    # layers caps; fp32 doubles
    w = kv.work({"model": "tiny", "ctx": 1000, "layers": 2, "layout": "layerwise", "path": "d2d", "dtype": "fp32"}, cpu)
    assert w.bytes == 2 * 2 * 4 * 64 * 1000 * 4
    assert kv_spec({"model": "tiny", "ctx": 16, "layers": 100, "dtype": "bf16"}).layers == 4
    # the link is the bound only where the payload crosses one
    assert kv.work(kv_params(path="d2h2d"), gpu).bound == "link"
    assert kv.work(kv_params(path="d2h2d"), cpu).bound == "memory"
    sr = transfer.KVSendRecv().work({"model": "llama-3.1-8b", "ctx": 4096, "layers": 8, "layout": "paged", "dtype": "bf16"}, gpu)
    assert sr.bytes == 8 * 2 * 8 * 128 * 4096 * 2 and sr.bound == "link"


def test_every_layout_moves_the_same_bytes():
    for probe in (transfer.KVTransfer(), transfer.KVSendRecv()):
        sizes = {probe.work(kv_params(layout=lay), {"type": "cpu"}).bytes for lay in ("contiguous", "layerwise", "paged")}
        assert len(sizes) == 1


def test_copy_work_models():
    assert transfer.HostToDevice().work({"size_bytes": 4096, "memory": "pinned"}, {}).bytes == 4096
    for cls, bound in ((transfer.HostToDevice, "link"), (transfer.DeviceToHost, "link"),
                       (transfer.DeviceToDevice, "link"), (transfer.LocalCopy, "memory")):
        w = cls().work({"size_bytes": 1 << 20, "memory": "pageable"}, {})
        assert (w.bytes, w.flops, w.bound) == (1 << 20, 0.0, bound)


def test_auto_size_is_bounded_by_free_memory():
    size = transfer.resolve_size("auto", ["cpu:0"], free_bytes)
    assert 4096 <= size <= transfer.AUTO_CAP
    assert size <= free_bytes("cpu:0") // 4
    assert transfer.resolve_size(12345, ["cpu:0"], free_bytes) == 12345


# -- layouts and integrity -------------------------------------------------------------------
def _store(layout: str, spec: KVSpec, table_seed: int = 1) -> KVStore:
    import torch

    s = KVStore(spec, layout, "cpu:0", table_seed=table_seed)
    s.fill(torch.Generator().manual_seed(42))
    return s


def test_paged_source_in_token_order_equals_the_contiguous_source():
    import torch

    spec = KVSpec(layers=3, kv_heads=2, ctx=64, head_dim=8, dtype="bf16")
    stores = {lay: _store(lay, spec) for lay in ("contiguous", "layerwise", "paged")}
    paged = stores["paged"]
    assert sorted(paged.table.tolist()) != list(range(spec.blocks))  # really scattered
    assert paged.pools[0].shape == (2, 2 * spec.blocks, 2, 16, 8)
    for i in range(spec.layers):
        want = stores["contiguous"].layer(i)
        assert torch.equal(stores["layerwise"].layer(i), want)
        assert torch.equal(paged.layer(i), want)
        # token t of head h lies in block table[t // 16], row t % 16
        t = 37
        assert torch.equal(paged.pools[i][:, paged.table[t // 16], :, t % 16], want[:, :, t])
        assert torch.equal(kv_checksum(paged.layer(i)), kv_checksum(want))


def test_checksum_sees_a_swapped_block_and_a_flipped_element():
    spec = KVSpec(layers=1, kv_heads=2, ctx=64, head_dim=8, dtype="bf16")
    layer = _store("contiguous", spec).layer(0).clone()
    base = kv_checksum(layer)
    swapped = layer.clone()
    swapped[:, :, 0:16], swapped[:, :, 16:32] = layer[:, :, 16:32], layer[:, :, 0:16]
    assert kv_checksum(swapped)[0] == base[0]  # a plain sum can't see it ...
    assert kv_checksum(swapped)[1] != base[1]  # ... the weighted one does
    flipped = layer.clone()
    flipped[1, 0, 5, 3] = -flipped[1, 0, 5, 3]
    assert not bool((kv_checksum(flipped) == base).all())


@pytest.mark.parametrize("layout", ["contiguous", "layerwise", "paged"])
@pytest.mark.parametrize("path", ["d2d", "d2h2d"])
def test_transfer_moves_the_request_intact(layout, path):
    import torch

    kernel = prepare_case(ctx_for("transfer.kv", kv_params(layout=layout, path=path, ctx=128)))
    st = kernel.sets[0]
    for i in range(kernel.spec.layers):
        assert not torch.equal(st["dst"].layer(i), st["src"].layer(i))  # starts as other data
    kernel.run()
    kernel.check()
    for i in range(kernel.spec.layers):
        assert torch.equal(st["dst"].layer(i), st["src"].layer(i))
    if layout == "paged":
        assert not torch.equal(st["dst"].table, st["src"].table)  # other places in the other pool


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_a_corrupted_destination_fails_the_check(layout):
    kernel = prepare_case(ctx_for("transfer.kv", kv_params(layout=layout, ctx=128)))
    kernel.run()
    kernel.check()
    dst = kernel.sets[0]["dst"]
    if layout == "paged":  # two of the request's blocks swapped in the destination pool
        a, b = dst.table[0].item(), dst.table[1].item()
        pool = dst.pools[2]
        pool[:, [a, b]] = pool[:, [b, a]].clone()
    else:  # one element of the last layer changed
        dst.buf[-1, 1, 0, 100, 7] += 1.0
    with pytest.raises(ProbeCheckFailed, match="layer"):
        kernel.check()


def test_the_raw_copy_check_catches_a_wrong_byte():
    kernel = prepare_case(ctx_for("transfer.local", {"size_bytes": 100_003}))
    kernel.run()
    kernel.check()
    kernel.dst[99_999] ^= 1
    with pytest.raises(ProbeCheckFailed, match="differs"):
        kernel.check()


# -- whole cases on the CPU ----------------------------------------------------------------
def test_local_copy_runs_on_the_cpu():
    r = run("transfer.local", {"size_bytes": 4 << 20}, FAST)
    assert r["status"] == "ok", r
    assert r["work"] == {"flops": 0.0, "bytes": 4 << 20, "bound": "memory", "dtype": None, "collective": None,
                         "link": None, "peak_dtype": None}
    assert len(r["durations_s"]) >= 2 and min(r["durations_s"]) > 0
    assert r["extra"]["check"] == "all bytes compared"


@pytest.mark.parametrize("layout", ["contiguous", "layerwise", "paged"])
@pytest.mark.parametrize("path", ["d2d", "d2h2d"])
def test_kv_transfer_runs_on_the_cpu(layout, path):
    r = run_small_llc("transfer.kv", kv_params(layout=layout, path=path, ctx=1024))
    assert r["status"] == "ok", r
    assert r["work"]["bytes"] == 4 * 2 * 4 * 64 * 1024 * 2
    assert r["resolved_params"]["layers"] == 4
    assert r["extra"]["path"] == path and r["extra"]["layout"] == layout
    if layout == "contiguous":
        assert "per_layer_s" not in r["extra"]
    else:
        assert len(r["extra"]["per_layer_s"]) == 4 and r["extra"]["per_layer_p50_s"] > 0


def test_paged_ctx_must_fill_blocks():
    p = kv_params(ctx=100)
    assert "divisible" in transfer.KVTransfer().skip_reason(p, {}, {})
    assert transfer.KVTransfer().skip_reason({**p, "layout": "contiguous"}, {}, {}) is None


def test_host_device_copies_plan_no_case_on_a_cpu_only_node():
    from harness.config import parse_suite
    from harness.plan import plan

    registry.discover()
    suite = parse_suite({"probes": {
        "transfer.h2d": {}, "transfer.d2h": {}, "transfer.d2d": {},
        "transfer.local": {"params": {"size_bytes": 4096}},
        "transfer.kv": {"params": {"model": "tiny", "layout": "paged", "path": "d2d"}},
        "transfer.kv_sendrecv": {"params": {"model": "tiny", "layout": "paged"}},
    }}, "test")
    cases = plan(suite, suite.probes, [cpu_device()], "torch", host())
    probes = {c.probe: c for c in cases}
    assert set(probes) == {"transfer.local", "transfer.kv", "transfer.kv_sendrecv"}
    pair = probes["transfer.kv_sendrecv"]
    assert pair.world_size == 2 and pair.device == "cpu:0-1" and pair.skip is None
    for cls in (transfer.HostToDevice, transfer.DeviceToHost, transfer.DeviceToDevice):
        assert cls.device_types == ("cuda",)


# -- two ranks through the CLI ---------------------------------------------------------------
SENDRECV_SUITE = """
plugins: [tests.probes.test_transfer]
timeout_s: 120
group_timeout_s: 30
timing: {warmup: 1, min_reps: 3, max_reps: 6, budget_s: 0.2}
probes:
  transfer.kv_sendrecv:
    params: {model: tiny, ctx: 1024, layout: [contiguous, layerwise, paged]}
  testing.kv_sendrecv_corrupt:
    params: {model: tiny, ctx: 1024, layout: paged}
"""


@pytest.mark.slow
def test_kv_sendrecv_between_two_gloo_ranks(tmp_path, write_suite):
    out = tmp_path / "results"
    proc = coherence("run", "--suite", str(write_suite(SENDRECV_SUITE)), "--out", str(out), "--quiet",
                     env={"COHERENCE_TEST_CORRUPT_KV": "1"})
    assert proc.returncode == 1, proc.stderr  # the corrupted case fails, the rest are ok
    run_dir = next(out.iterdir())
    cases = pd.read_parquet(run_dir / "cases.parquet").set_index("probe")
    ok = cases.loc[["transfer.kv_sendrecv"]]
    assert list(ok["status"]) == ["ok"] * 3, ok["reason"].tolist()
    assert (ok["device"] == "cpu:0-1").all() and (ok["world_size"] == 2).all()
    assert (ok["bytes"] == 4 * 2 * 4 * 64 * 1024 * 2).all()
    assert (ok["bytes_per_s"] > 0).all() and (ok["bound"] == "link").all()
    for _, row in ok.iterrows():
        extra = json.loads(row["extra"])
        receiver = extra["ranks"][1]
        assert extra["ranks"][0]["role"] == "sender" and receiver["role"] == "receiver"
        if extra["layout"] != "contiguous":
            assert len(receiver["per_layer_s"]) == 4
    bad = cases.loc["testing.kv_sendrecv_corrupt"]
    assert bad["status"] == "failed"
    assert "checksum mismatch" in bad["reason"] and "rank 1" in bad["reason"]


def _swap_received_blocks(kernel, ctx) -> None:
    """The receiver swaps two blocks of what it received: the check must fail."""
    if ctx.rank == 1:
        receive = kernel.run

        def run():
            receive()
            pool, table = kernel.store.pools[0], kernel.store.table
            a, b = table[0].item(), table[1].item()
            pool[:, [a, b]] = pool[:, [b, a]].clone()

        kernel.run = run


if os.environ.get("COHERENCE_TEST_CORRUPT_KV"):
    altered_probe(transfer.KVSendRecv, "testing.kv_sendrecv_corrupt", _swap_received_blocks)


def test_host_copies_are_judged_against_the_host_link_not_nvlink():
    """h2d/d2h and KV through the host cross PCIe: their roofline fraction uses
    host_link_Bps (seen on an H100 before the fix: 53 GB/s pinned h2d judged against
    NVLink's 900 GB/s read 0.12)."""
    from harness.registry import PlannedCase
    from harness.runner import case_row

    work = transfer.HostToDevice().work({"size_bytes": 1 << 20, "memory": "pinned"}, {"type": "cuda"})
    assert work.link == "host"
    kv = transfer.KVTransfer().work({"model": "tiny", "ctx": 1024, "layers": "auto", "layout": "paged",
                                     "path": "d2h2d", "dtype": "bf16"}, {"type": "cuda"})
    assert kv.bound == "link" and kv.link == "host"
    case = PlannedCase("c", "transfer.h2d", "transfer", "torch", "cuda:0", {"size_bytes": 1 << 20})
    result = {"status": "ok", "durations_s": [1e-3] * 5, "work": {"flops": 0.0, "bytes": 64e6, "bound": "link",
              "dtype": None, "collective": None, "link": "host"}}
    nominal_ = {"compute_flops": {"bf16": 1e15}, "memory_Bps": 3e12, "link_Bps": 900e9, "host_link_Bps": 64e9}
    row = case_row(case, result, nominal_)
    assert row["roofline_fraction"] == pytest.approx(64e9 / 64e9)
    row = case_row(case, {**result, "work": {**result["work"], "link": None}}, nominal_)
    assert row["roofline_fraction"] == pytest.approx(64e9 / 900e9)
