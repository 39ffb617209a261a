"""The parts of a model outside its decoder layers, as isolated probes: the embedding
lookup of the new tokens, the final RMSNorm and the LM head over the vocabulary (logits
and the greedy next token). A truncated composite (``layers`` of a model's
``num_layers``) runs none of them; the collector adds their measured times to the
per-layer time × num_layers to give the full-model step (INDICATORS.md §2, "Truncated
models").

- ``decode.lm_head``: one decode step's ends for ``batch`` sequences: ``batch`` rows
  gathered from the embedding table [vocab/tp, hidden], final RMSNorm of the last
  hidden state [batch, hidden], logits = norm(h) · W_lm [hidden, vocab/tp], argmax.
  ``tp`` > 1 is one rank's vocabulary-parallel shard (Megatron's VocabParallelEmbedding
  and column-parallel LM head; the gather of the logits across ranks is left out).
- ``prefill.lm_head``: a prefill's ends: ``batch`` × ``seq`` embedding rows gathered,
  final RMSNorm and LM head of each sequence's last position only (the only logits a
  prefill needs for its first output token, as vLLM computes them), argmax.

Work model (per repetition, dtype bytes s, hidden H, vocabulary V/tp, b rows of logits,
r embedding rows): FLOPs = 2·b·H·V (the LM head; norm and argmax are O(b·H + b·V)
and left out); bytes = (H·V + 2·r·H + 2·b·H + b·V) · s: LM-head weights once, embedding
rows read and written, the norm's input and output, the logits written. Untied weights
(Llama-3.1-8B's ``tie_word_embeddings`` is false; configs/models/ name the source).
The LM head's weights rotate past 4× the last-level cache like the decode projections';
a 32k × 1024 fp32 head (131 MB) already exceeds it. Check (once per case): the
gathered rows equal the table's rows exactly and the logits of 512 sampled vocabulary
columns match float64 within the dtype's tolerance.
"""

from __future__ import annotations

from harness.registry import Param, Probe, Work, register
from probes.common import DTYPE_BYTES
from probes.gemm import gemm_skip_reason
from probes.models import load_model, model_names

MEMORY_RIDGE = 16.0  # FLOP/B below which the case is called memory-bound (as decode.py)


def _vocab_shard(params: dict) -> tuple[int, str | None]:
    """(vocabulary columns this rank holds, why the shape cannot run or None)."""
    shape = load_model(params["model"])
    tp = int(params.get("tp", 1))
    if not shape.vocab_size:
        return 0, f"{shape.name}: no vocab_size in configs/models/{shape.name}.yaml (no LM head to measure)"
    if shape.vocab_size % tp:
        return 0, f"{shape.name}: vocab_size {shape.vocab_size} is not divisible by tp={tp}"
    return shape.vocab_size // tp, None


def ends_work(hidden: int, vocab: int, rows: int, batch: int, dtype: str) -> tuple[float, float]:
    """(FLOPs, bytes) of the ends: LM head for ``batch`` rows over ``vocab`` columns,
    ``rows`` embedding rows gathered (see the module docstring for the counting)."""
    s = DTYPE_BYTES[dtype]
    flops = 2.0 * batch * hidden * vocab
    nbytes = float((hidden * vocab + 2 * rows * hidden + 2 * batch * hidden + batch * vocab) * s)
    return flops, nbytes


class _Ends(Probe):
    device_types = ("cpu", "cuda")

    def rows(self, params: dict) -> tuple[int, int]:  # (embedding rows, LM-head rows)
        raise NotImplementedError

    def work(self, params: dict, device_info: dict) -> Work:
        shape = load_model(params["model"])
        vocab, _ = _vocab_shard(params)
        rows, batch = self.rows(params)
        flops, nbytes = ends_work(shape.hidden_size, vocab, rows, batch, params["dtype"])
        bound = "memory" if nbytes and flops / nbytes < MEMORY_RIDGE else "compute"
        return Work(flops=flops, bytes=nbytes, bound=bound, dtype=params["dtype"])

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        _, reason = _vocab_shard(params)
        return reason or gemm_skip_reason(params["dtype"], device_info or {}, host or {}, emulated_ok=True)


def _common() -> dict:
    return {
        "model": Param(default=("llama-3.1-8b",), type=str, choices=model_names(), help="shape in configs/models/"),
        "batch": Param(default=(1, 8, 32), type=int, minimum=1, help="sequences"),
        "dtype": Param(default=("bf16",), type=str, choices=("fp32", "bf16", "fp16")),
    }


@register
class DecodeEnds(_Ends):
    name = "decode.lm_head"
    family = "decode"
    description = ("a decode step outside the layers: embedding lookup of the new tokens, final RMSNorm, LM head "
                   "over the vocabulary, argmax")
    params = {**_common(),
              "tp": Param(default=(1,), type=int, minimum=1, implicit=1,
                          help="tensor-parallel ranks: one rank's vocabulary shard (vocab/tp)")}

    def rows(self, params: dict) -> tuple[int, int]:
        return params["batch"], params["batch"]


@register
class PrefillEnds(_Ends):
    name = "prefill.lm_head"
    family = "prefill"
    description = ("a prefill outside the layers: embedding lookup of the prompt, final RMSNorm and LM head of each "
                   "sequence's last position, argmax")
    params = {**_common(), "seq": Param(default=(512,), type=int, minimum=1, help="prompt tokens per sequence")}

    def rows(self, params: dict) -> tuple[int, int]:
        return params["batch"] * params["seq"], params["batch"]
