"""The JAX implementations: every family runs, is checked, and fails when wrong."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

from tests.probes import jax_helpers as H  # noqa: E402 - sets XLA_FLAGS before JAX starts

from harness.errors import ProbeCheckFailed  # noqa: E402
from probes.native import cpu_native  # noqa: E402

TINY = {"model": "tiny"}


def _ok(result: dict) -> dict:
    assert result["status"] == "ok", result.get("reason")
    assert result["timer"] == "block_until_ready+perf_counter_ns"
    assert len(result["durations_s"]) >= 3 and all(d > 0 for d in result["durations_s"])
    return result


def test_four_host_devices():
    import jax

    assert len(jax.devices("cpu")) == 4


def test_triad_ok_and_checked():
    r = _ok(H.run("memory.triad", {"size_mib": 4, "dtype": "fp64"}))
    assert r["work"]["bytes"] == 3 * 4 * 2**20
    assert r["extra"]["max_rel_error"] <= 1e-12
    assert r["extra"]["compile_s"] > 0


def test_triad_wrong_result_fails():
    k = H.prepare("memory.triad", {"size_mib": 1, "dtype": "fp32"})
    k.run()
    k.arr["a"] = k.arr["a"] * 1.01
    with pytest.raises(ProbeCheckFailed):
        k.check()


def test_copy_detects_aliasing():
    k = H.prepare("memory.copy", {"size_mib": 1, "dtype": "fp32"})
    k.run()
    k.check()
    k.arr["c"] = k.arr["a"]  # a "copy" that copied nothing
    with pytest.raises(ProbeCheckFailed, match="aliases"):
        k.check()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_ok(dtype):
    r = _ok(H.run("gemm.square", {"n": 128, "dtype": dtype}))
    assert r["work"]["flops"] == 2 * 128**3
    assert r["extra"]["rel_error"] < 1e-2
    # bf16 runs on any CPU; without bf16 arithmetic it is marked and judged by fp32.
    native = cpu_native(dtype, H.host()).native
    assert r["extra"].get("native", True) is native
    assert r["work"]["peak_dtype"] == (None if native else "fp32")


@pytest.mark.parametrize("isa", [{"avx2": True, "fma": True}, {"avx2": True, "avx512_bf16": True}],
                         ids=["zen3", "zen4"])
def test_bf16_decode_layer_on_either_machine(isa):
    """The JAX path on a CPU with and without bf16 arithmetic (stand-in flag sets): never
    skipped; XLA:CPU computes the dots in fp32 either way, so only the marker differs."""
    from harness.worker import run_case

    params = {**TINY, "batch": 1, "ctx": 64, "dtype": "bf16"}
    s = H.spec("decode.layer", params)
    r = _ok(run_case({**s, "host": {**s["host"], "cpu_isa": isa}}))
    assert r["extra"]["native"] is ("avx512_bf16" in isa)
    assert r["work"]["peak_dtype"] == (None if "avx512_bf16" in isa else "fp32")


def test_gemm_wrong_result_fails():
    k = H.prepare("gemm.square", {"n": 64, "dtype": "fp32"})
    k.run()
    k.outs[k.index] = k.outs[k.index] + 0.01
    with pytest.raises(ProbeCheckFailed):
        k.check()


@pytest.mark.parametrize("probe", ["prefill.projection", "prefill.attention", "prefill.mlp", "prefill.layer"])
def test_prefill_ok(probe):
    params = {**TINY, "batch": 1, "seq": 64, "dtype": "fp32"}
    if probe == "prefill.projection":
        params["proj"] = "qkv"
    _ok(H.run(probe, params))


def test_prefill_attention_needs_the_causal_mask():
    k = H.prepare("prefill.attention", {**TINY, "batch": 1, "seq": 64, "dtype": "fp32"})
    import jax

    k.out = jax.nn.dot_product_attention(k.q, k.k, k.v, is_causal=False)
    with pytest.raises(ProbeCheckFailed):
        k.check()


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_decode_attention_ok(layout):
    r = _ok(H.run("decode.attention", {**TINY, "batch": 2, "ctx": 256, "layout": layout, "dtype": "fp32"}))
    assert r["extra"]["rel_error"] < 1e-4


def test_paged_attention_reads_through_the_block_table():
    k = H.prepare("decode.attention", {**TINY, "batch": 2, "ctx": 256, "layout": "paged", "dtype": "fp32"})
    i = k.index
    good = k.tables[i]
    k.tables[i] = good[::-1]  # each sequence reads the other one's blocks
    k.run()
    k.tables[i] = good
    with pytest.raises(ProbeCheckFailed):
        k.check()


def test_decode_projection_and_layer_ok():
    _ok(H.run("decode.projection", {**TINY, "proj": "gate_up", "batch": 4, "dtype": "fp32"}))
    _ok(H.run("decode.layer", {**TINY, "batch": 2, "ctx": 128, "dtype": "fp32"}))


@pytest.mark.parametrize("layout", ["contiguous", "layerwise", "paged"])
@pytest.mark.parametrize("path", ["d2d", "d2h2d"])
def test_kv_transfer_ok(layout, path):
    r = _ok(H.run("transfer.kv", {**TINY, "ctx": 64, "layers": 2, "layout": layout, "path": path, "dtype": "bf16"}))
    assert r["work"]["bytes"] == r["extra"]["kv_bytes"]


def test_kv_transfer_between_devices_and_corruption_fails():
    _ok(H.run("transfer.kv_sendrecv", {**TINY, "ctx": 64, "layers": 2, "layout": "paged", "dtype": "bf16"}, world_size=2))
    k = H.prepare("transfer.kv_sendrecv", {**TINY, "ctx": 64, "layers": 2, "layout": "contiguous", "dtype": "bf16"},
                  world_size=2)
    k.run()
    assert k.dst.buf.devices() != k.src.buf.devices()
    k.dst.buf = k.dst.buf.at[1, 0, 0, 5, 0].add(1.0)
    with pytest.raises(ProbeCheckFailed, match="layer 1"):
        k.check()


def test_local_and_d2d_copies():
    _ok(H.run("transfer.local", {"size_bytes": 1 << 20}))
    r = _ok(H.run("transfer.d2d", {"size_bytes": 1 << 20}))
    assert "jax:cpu:0" not in r["extra"]["path"] and "device_put" in r["extra"]["path"]


OPS = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "sendrecv"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [2, 4])
def test_collectives_ok_and_exact(op, n):
    from probes.collective import busbw_factor

    r = _ok(H.run(f"collective.{op}", {"size_bytes": 4096, "dtype": "fp32", "world_size": n}, world_size=n))
    assert r["work"]["collective"]["busbw_factor"] == busbw_factor(op, n)
    assert r["extra"]["check"] == "exact"


@pytest.mark.parametrize("op", OPS)
def test_collective_wrong_result_fails(op):
    """One element off on one device, or the input left in place (nothing moved): the
    exact check rejects both."""
    k = H.prepare(f"collective.{op}", {"size_bytes": 4096, "dtype": "fp32", "world_size": 4}, world_size=4)
    k.run()
    k.check()
    good = k.out
    k.out = good.at[2, 7].add(1.0)
    with pytest.raises(ProbeCheckFailed, match="rank 2"):
        k.check()
    if k.inp.shape == good.shape:
        k.out = k.inp
        with pytest.raises(ProbeCheckFailed):
            k.check()


def test_collective_bf16_sum_is_exact():
    _ok(H.run("collective.all_reduce", {"size_bytes": 2048, "dtype": "bf16", "world_size": 4}, world_size=4))


def test_jax_clock_waits_for_the_work():
    """Without block_until_ready a 512² matmul chain would time as its dispatch only."""
    import jax
    import jax.numpy as jnp

    from harness.timing import HostClock, JaxClock

    # Enough work that it dwarfs a dispatch on a GPU too (an H100 ran the CPU size in 0.5 ms).
    n, steps = (512, 20) if jax.default_backend() == "cpu" else (4096, 200)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) / np.sqrt(n))
    f = jax.jit(lambda a: jax.lax.fori_loop(0, steps, lambda i, b: jnp.tanh(b @ a), a))
    f(x).block_until_ready()
    blocked = min(JaxClock().time(lambda: f(x)) for _ in range(3))
    dispatch = min(HostClock().time(lambda: f(x)) for _ in range(3))
    jax.block_until_ready(f(x))
    assert blocked > 3 * dispatch
