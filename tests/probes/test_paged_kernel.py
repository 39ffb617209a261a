"""decode.attention's paged ``kernel`` parameter (issue 16, deliverable 2): the value
each case runs, its case ids, its skip rules, the kernels against float64 on CPU
(FlexAttention compiled by inductor's C++ backend included) and the layout-penalty
pairing of each paged kernel with its contiguous twin."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from harness import registry
from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import decode
from probes.torch import decode as torch_decode  # registers the torch builders
from tests.probes.helpers import cpu_device, host, run

FAST = {"min_reps": 2, "max_reps": 3, "budget_s": 0.1}
OLD = {"model": "tiny", "batch": 2, "ctx": 256, "layout": "paged", "dtype": "fp32"}


def _kernel(kernel=None, layout="paged", batch=2, ctx=256, device_info=None):
    params = {**OLD, "batch": batch, "ctx": ctx, "layout": layout}
    if kernel is not None:
        params["kernel"] = kernel
    return prepare_case(CaseContext("id", "decode.attention", params, "cpu:0", device_info or cpu_device(), "torch",
                                    host()))


# -- which kernel a value runs ---------------------------------------------------------------
@pytest.mark.parametrize("device, want", [("cuda:0", "gather_sdpa"), ("cuda:3", "gather_sdpa"), ("cpu:0", "chunked")])
def test_default_is_what_each_device_ran_before_the_parameter(device, want):
    assert torch_decode.resolve_paged_kernel("default", device) == want


@pytest.mark.parametrize("name", ["gather_sdpa", "chunked", "flex"])
@pytest.mark.parametrize("device", ["cuda:0", "cpu:0"])
def test_a_named_kernel_is_the_same_on_every_device(name, device):
    assert torch_decode.resolve_paged_kernel(name, device) == name


def test_an_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="unknown paged kernel 'vllm'"):
        torch_decode.resolve_paged_kernel("vllm", "cuda:0")


def test_every_spec_value_resolves():
    for name in decode.PAGED_KERNELS:
        assert torch_decode.resolve_paged_kernel(name, "cpu:0") in torch_decode.PAGED_METHODS


@pytest.mark.parametrize("name, called", [("gather_sdpa", "gather"), ("chunked", "chunked"), ("flex", "flex"),
                                          ("default", "chunked"), (None, "chunked")])
def test_each_value_runs_its_function(name, called, monkeypatch):
    """The step calls the chosen function and no other (flex stubbed: no compile here)."""
    calls = []
    monkeypatch.setattr(torch_decode, "paged_attention_gather_sdpa", lambda *a, **k: calls.append("gather"))
    monkeypatch.setattr(torch_decode, "paged_attention", lambda *a, **k: calls.append("chunked"))
    monkeypatch.setattr(torch_decode, "compiled_flex_attention", lambda: lambda *a, **k: calls.append("flex"))
    k = _kernel(name)
    k.index = 0
    k.run()
    assert calls == [called]
    resolved = {"gather": "gather_sdpa", "chunked": "chunked", "flex": "flex"}[called]
    assert k.extra["paged_kernel"] == resolved
    assert k.extra["paged_method"] == torch_decode.PAGED_METHODS[resolved]
    assert k.extra["kv_bytes_moved_factor"] == (3 if resolved == "gather_sdpa" else 1)


def test_flex_reads_the_pool_in_place(monkeypatch):
    """The flex kernel is handed views of the pools (no copy) and one block mask per copy
    listing exactly that copy's block table."""
    import torch

    got = {}
    monkeypatch.setattr(torch_decode, "compiled_flex_attention",
                        lambda: lambda q, k, v, block_mask, enable_gqa: got.update(k=k, v=v, mask=block_mask))
    k = _kernel("flex")
    k.index = 0
    k.run()
    assert got["k"].data_ptr() == k.k_pool.data_ptr() and got["v"].data_ptr() == k.v_pool.data_ptr()
    n_pool = k.k_pool.shape[0]
    assert got["k"].shape == (1, k.k_pool.shape[2], n_pool * decode.BLOCK_TOKENS, k.k_pool.shape[3])
    mask = got["mask"]
    assert mask is k.masks[0] and len(k.masks) == k.copies
    n = k.tables[0].shape[1]
    assert mask.full_kv_num_blocks[:, 0, 0].tolist() == [n] * k.tables[0].shape[0]
    assert torch.equal(mask.full_kv_indices[:, 0, 0, :n].long(), k.tables[0])
    assert int(mask.kv_num_blocks.sum()) == 0  # no partial blocks: no mask_mod per score


# -- case ids and skips ----------------------------------------------------------------------
def test_default_leaves_the_old_case_ids_and_named_kernels_appear():
    registry.discover()
    cls = decode.DecodeAttention
    # Planned the way harness.plan does: the suite's grid, expanded in declared order.
    grid = cls.validate_params({**OLD, "kernel": ["default", "flex"]}, "t")
    ids = [registry.case_id(cls.name, p, "cuda:0") for p in cls.expand(grid)]
    assert ids == ["decode.attention[model=tiny,batch=2,ctx=256,layout=paged,dtype=fp32]@cuda:0",
                   "decode.attention[model=tiny,batch=2,ctx=256,layout=paged,kernel=flex,dtype=fp32]@cuda:0"]
    assert cls.validate_params({}, "t")["kernel"] == ["default"]  # the default grid plans what it did before


@pytest.mark.parametrize("name", ["gather_sdpa", "chunked", "flex"])
def test_a_named_kernel_on_the_contiguous_layout_is_skipped(name):
    why = decode.paged_kernel_skip({**OLD, "layout": "contiguous", "kernel": name}, {"backend": "torch"})
    assert why and f"kernel={name}" in why and "contiguous" in why
    assert decode.paged_kernel_skip({**OLD, "layout": "contiguous", "kernel": "default"}, {}) is None
    assert decode.paged_kernel_skip({**OLD, "layout": "contiguous"}, {}) is None  # older params


@pytest.mark.parametrize("name, skipped", [("gather_sdpa", True), ("flex", True), ("chunked", False),
                                           ("default", False)])
def test_torch_kernels_are_skipped_on_another_backend(name, skipped):
    why = decode.paged_kernel_skip({**OLD, "kernel": name}, {"backend": "jax", "type": "gpu"})
    assert bool(why) is skipped
    if skipped:
        assert "torch kernel" in why and "jax" in why
    assert decode.paged_kernel_skip({**OLD, "kernel": name}, {"backend": "torch", "type": "cuda"}) is None


def test_the_spec_skip_rule_applies_the_kernel_rule():
    why = decode.DecodeAttention().skip_reason({**OLD, "layout": "contiguous", "kernel": "flex", "tp": 1},
                                               cpu_device(), host())
    assert why and "kernel=flex" in why


# -- against float64 -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gather_sdpa", "chunked"])
def test_named_eager_kernels_run_and_check(name):
    r = run("decode.attention", {**OLD, "kernel": name}, FAST)
    assert r["status"] == "ok", r
    assert r["extra"]["paged_kernel"] == name


@pytest.mark.slow
def test_flex_compiles_on_cpu_and_matches_float64():
    """FlexAttention under torch.compile (inductor C++ on CPU) through the block mask:
    the probe's float64 check passes, it agrees with the chunked kernel on the same
    pool, and a wrong output fails the check. Compiling takes ~15 s on 2 cores."""
    import shutil

    import torch

    # Inductor's CPU backend compiles C++; without a compiler flex cannot run here (any
    # other failure is a failure).
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler: torch.compile of flex_attention cannot run on this CPU")
    flex = _kernel("flex")
    flex.index = 0
    flex.run()
    flex.check()
    assert flex.extra["rel_error"] < 1e-5
    chunked = _kernel("chunked")
    chunked.q.copy_(flex.q)
    chunked.k_pool.copy_(flex.k_pool)
    chunked.v_pool.copy_(flex.v_pool)
    chunked.tables = flex.tables
    chunked.index = 0
    chunked.run()
    assert torch.allclose(flex.out[0], chunked.out[0], rtol=1e-5, atol=1e-6)
    flex.out[0] = flex.out[0] * 1.01
    with pytest.raises(ProbeCheckFailed):
        flex.check()


# -- layout penalty per kernel ---------------------------------------------------------------
def _row(case_id, params, bps, nbytes=1e6):
    return {"case_id": case_id, "probe": "decode.attention", "device": "cuda:0", "params_d": params,
            "bytes_per_s": bps, "bytes": nbytes}


def test_layout_penalty_pairs_each_paged_kernel_with_the_contiguous_twin():
    from harness.collector.modes import _pair_ratio

    base = {"model": "llama-3.1-8b", "batch": 32, "ctx": 8192, "dtype": "bf16", "tp": 1}
    rows = [
        _row("c", {**base, "layout": "contiguous", "kernel": "default"}, 4.0e12),
        _row("p", {**base, "layout": "paged", "kernel": "default"}, 1.0e12),
        _row("pf", {**base, "layout": "paged", "kernel": "flex"}, 2.0e12),
        _row("pg", {**base, "layout": "paged", "kernel": "gather_sdpa"}, 0.8e12),
        # another batch with no contiguous twin: no pair
        _row("p8", {**base, "batch": 8, "layout": "paged", "kernel": "flex"}, 1.0e12),
    ]
    view = SimpleNamespace(ok=pd.DataFrame(rows), cfg={})
    out = _pair_ratio(view, "layout", "contiguous", "paged", "mode2.layout_penalty", "F2.layout_penalty",
                      ("decode.attention",), bad_only=("kernel",))
    pairs = {p["case_ids"][1]: p for p in out["per_pair"]}
    assert set(pairs) == {"p", "pf", "pg"}
    assert all(p["case_ids"][0] == "c" for p in pairs.values())
    assert pairs["pf"]["value"] == pytest.approx(2.0) and pairs["pf"]["params"] == {"kernel": "flex"}
    assert pairs["p"]["value"] == pytest.approx(4.0) and pairs["pg"]["value"] == pytest.approx(5.0)
    # The layout costs what its best kernel pays (flex reads the blocks in place); the
    # copy-first baseline stays visible per kernel.
    assert out["value"] == pytest.approx(2.0) and out["best_kernel"] == "flex"
    assert out["per_kernel"] == pytest.approx({"default": 4.0, "flex": 2.0, "gather_sdpa": 5.0})
    assert [p["best"] for p in (pairs["p"], pairs["pf"], pairs["pg"])] == [False, True, False]


def test_layout_penalty_is_the_largest_over_shapes_of_each_shape_s_best_kernel():
    from harness.collector.modes import _pair_ratio

    base = {"model": "llama-3.1-8b", "ctx": 8192, "dtype": "bf16", "tp": 1}
    rows = [
        _row("c1", {**base, "batch": 1, "layout": "contiguous", "kernel": "default"}, 3.0e12),
        _row("f1", {**base, "batch": 1, "layout": "paged", "kernel": "flex"}, 1.0e12),      # 3.0
        _row("g1", {**base, "batch": 1, "layout": "paged", "kernel": "gather_sdpa"}, 1.2e12),  # 2.5: best here
        _row("c32", {**base, "batch": 32, "layout": "contiguous", "kernel": "default"}, 4.0e12),
        _row("f32", {**base, "batch": 32, "layout": "paged", "kernel": "flex"}, 2.0e12),    # 2.0: best here
        _row("g32", {**base, "batch": 32, "layout": "paged", "kernel": "gather_sdpa"}, 0.5e12),  # 8.0
    ]
    view = SimpleNamespace(ok=pd.DataFrame(rows), cfg={})
    out = _pair_ratio(view, "layout", "contiguous", "paged", "mode2.layout_penalty", "F2.layout_penalty",
                      ("decode.attention",), bad_only=("kernel",))
    assert out["value"] == pytest.approx(2.5) and out["best_kernel"] == "gather_sdpa"
    assert out["per_kernel"] == pytest.approx({"flex": 3.0, "gather_sdpa": 8.0})
    assert sorted(p["case_ids"][1] for p in out["per_pair"] if p["best"]) == ["f32", "g1"]


def test_layout_penalty_of_older_runs_without_the_kernel_parameter():
    from harness.collector.modes import _pair_ratio

    base = {"model": "llama-3.1-8b", "batch": 32, "ctx": 8192, "dtype": "bf16"}
    rows = [_row("c", {**base, "layout": "contiguous"}, 5.3e12), _row("p", {**base, "layout": "paged"}, 1.0e12)]
    view = SimpleNamespace(ok=pd.DataFrame(rows), cfg={})
    out = _pair_ratio(view, "layout", "contiguous", "paged", "mode2.layout_penalty", "F2.layout_penalty",
                      ("decode.attention",), bad_only=("kernel",))
    assert [p["case_ids"] for p in out["per_pair"]] == [["c", "p"]]
    assert out["value"] == pytest.approx(5.3) and "params" not in out["per_pair"][0]


# -- on CUDA (tests/gpu/device_check.sh runs the files that mention cuda.is_available()) ------
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("name, resolved", [(None, "gather_sdpa"), ("gather_sdpa", "gather_sdpa"),
                                            ("chunked", "chunked"), ("flex", "flex")])
def test_each_paged_kernel_checks_on_cuda(name, resolved):
    """Each value through the worker on a GPU, bf16, GQA (llama-3.1-8b heads at a small
    ctx): the float64 check passes and the kernel run is the one named (default is
    gather_sdpa there). flex compiles its Triton kernels here (tens of seconds)."""
    if not _has_cuda():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    params = {"model": "llama-3.1-8b", "batch": 4, "ctx": 512, "layout": "paged", "dtype": "bf16"}
    if name is not None:
        params["kernel"] = name
    r = run("decode.attention", params, FAST, device="cuda:0")
    assert r["status"] == "ok", r
    assert r["extra"]["paged_kernel"] == resolved
    assert "rel_error" in r["extra"]  # the float64 check ran (status ok: within tolerance)
