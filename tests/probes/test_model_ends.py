"""The parts of a model outside its layers (decode.lm_head, prefill.lm_head): work models
by hand, a real run on the CPU with its check, a wrong LM head failing the check, the
vocabulary-parallel shard, and the skip for a shape without a vocabulary."""

from __future__ import annotations

import pytest

from harness import registry
from harness.errors import ProbeCheckFailed
from harness.execute import prepare_case
from harness.registry import CaseContext
from probes import model_ends
from probes.torch import model_ends as torch_model_ends  # the torch kernel (registers its builder)
from tests.probes.helpers import cpu_device, host, run


def test_work_models_by_hand():
    # tiny: hidden 1024, vocab 32000; fp32.
    w = model_ends.DecodeEnds().work({"model": "tiny", "batch": 2, "dtype": "fp32"}, {})
    assert w.flops == 2 * 2 * 1024 * 32000
    assert w.bytes == (1024 * 32000 + 2 * 2 * 1024 + 2 * 2 * 1024 + 2 * 32000) * 4
    assert w.bound == "memory"
    # One rank of two: half the vocabulary, half the LM head.
    half = model_ends.DecodeEnds().work({"model": "tiny", "batch": 2, "dtype": "fp32", "tp": 2}, {})
    assert half.flops == w.flops / 2
    # Prefill: every prompt position's embedding row, the LM head for the last one only.
    p = model_ends.PrefillEnds().work({"model": "tiny", "batch": 2, "seq": 100, "dtype": "fp32"}, {})
    assert p.flops == w.flops
    assert p.bytes == (1024 * 32000 + 2 * 200 * 1024 + 2 * 2 * 1024 + 2 * 32000) * 4


def test_decode_and_prefill_ends_run_and_check():
    fast = {"warmup": 1, "min_reps": 2, "max_reps": 3, "budget_s": 0.0}
    d = run("decode.lm_head", {"model": "tiny", "batch": 2, "dtype": "fp32"}, fast)
    assert d["status"] == "ok", d
    assert d["extra"]["vocab_shard"] == 32000 and d["extra"]["rel_error"] < 1e-4
    p = run("prefill.lm_head", {"model": "tiny", "batch": 1, "seq": 32, "dtype": "fp32"}, fast)
    assert p["status"] == "ok", p
    assert p["extra"]["embedding_rows"] == 32 and p["extra"]["lm_head_rows"] == 1
    tp = run("decode.lm_head", {"model": "tiny", "batch": 1, "dtype": "fp32", "tp": 2}, fast)
    assert tp["status"] == "ok" and tp["extra"]["vocab_shard"] == 16000


def test_a_wrong_lm_head_or_embedding_fails_the_check():
    registry.discover()
    params = {"model": "tiny", "batch": 2, "dtype": "fp32"}
    ctx = CaseContext("id", "decode.lm_head", params, "cpu:0", cpu_device(), "torch", host(), seed=1)
    kernel = prepare_case(ctx)
    assert isinstance(kernel, torch_model_ends.EndsKernel)
    kernel.run()
    kernel.check()
    kernel.logits[:, :].mul_(1.01)  # a wrong product
    with pytest.raises(ProbeCheckFailed, match="LM head"):
        kernel.check()
    kernel.run()
    kernel.emb[0, 0] += 1.0  # a wrong row
    with pytest.raises(ProbeCheckFailed, match="embedding"):
        kernel.check()


def test_skips_without_a_vocabulary_or_an_uneven_shard(monkeypatch):
    from dataclasses import replace

    from probes.models import load_model

    shape = replace(load_model("tiny"), vocab_size=0)
    monkeypatch.setattr(model_ends, "load_model", lambda name: shape)
    reason = model_ends.DecodeEnds().skip_reason({"model": "tiny", "batch": 1, "dtype": "fp32"}, cpu_device(), host())
    assert "no vocab_size" in reason
    monkeypatch.setattr(model_ends, "load_model", lambda name: replace(shape, vocab_size=32001))
    reason = model_ends.DecodeEnds().skip_reason({"model": "tiny", "batch": 1, "dtype": "fp32", "tp": 2},
                                                  cpu_device(), host())
    assert "not divisible by tp=2" in reason
