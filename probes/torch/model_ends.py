"""Torch kernel of the model-ends probes (specs in probes/model_ends.py): the embedding
gather, final RMSNorm and LM head of ``decode.lm_head`` and ``prefill.lm_head``, with
the LM head's weights rotated past the last-level cache, its float64 check, and the
builder both probes share.

torch is imported inside the functions, never at module import.
"""

from __future__ import annotations

import math

from harness.registry import CaseContext, Kernel, kernel
from probes.model_ends import _vocab_shard
from probes.models import load_model
from probes.native import native_path
from probes.torch.common import DTYPE_BYTES, check_close, matmul_for, require_memory, rotation_count, torch_dtype
from probes.torch.decode import rms_norm


class EndsKernel(Kernel):
    """Embedding gather of ``rows`` token ids, final norm and LM head of ``batch`` rows."""

    def __init__(self, hidden: int, vocab: int, rows: int, batch: int, dtype: str, device: str, copies: int, seed: int,
                 native: bool = True):
        super().__init__()
        import torch

        # A dtype the CPU has no arithmetic for is multiplied through fp32 (probes.native).
        self.matmul = matmul_for(native)

        dt = torch_dtype(dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.dtype, self.device, self.copies, self.index = dtype, device, copies, 0
        self.table = torch.randn(vocab, hidden, device=device, generator=gen).to(dt)
        self.ids = torch.randint(0, vocab, (rows,), device=device, generator=gen)
        self.h = torch.randn(batch, hidden, device=device, generator=gen).to(dt)
        self.norm = (torch.randn(hidden, device=device, generator=gen) * 0.1 + 1.0).to(dt)
        self.heads = [(torch.randn(hidden, vocab, device=device, generator=gen) / math.sqrt(hidden)).to(dt)
                      for _ in range(copies)]
        self.emb = torch.empty(rows, hidden, device=device, dtype=dt)
        self.logits = torch.empty(batch, vocab, device=device, dtype=dt)
        self.token = None
        self.extra = {"rotation_copies": copies, "vocab_shard": vocab, "embedding_rows": rows, "lm_head_rows": batch,
                      "lm_head_bytes": hidden * vocab * DTYPE_BYTES[dtype]}

    def before_each(self) -> None:
        self.index = (self.index + 1) % self.copies

    def run(self) -> None:
        import torch

        torch.index_select(self.table, 0, self.ids, out=self.emb)
        self.matmul(rms_norm(self.h, self.norm), self.heads[self.index], out=self.logits)
        self.token = self.logits.argmax(dim=-1)

    def check(self) -> None:
        import torch

        from harness.errors import ProbeCheckFailed

        if not torch.equal(self.emb, self.table[self.ids]):
            raise ProbeCheckFailed("embedding rows differ from the table's rows")
        vocab = self.heads[0].shape[1]
        cols = torch.randperm(vocab, generator=torch.Generator().manual_seed(11))[:512].to(self.device)
        n64 = rms_norm(self.h.double(), self.norm.double())
        want = n64 @ self.heads[self.index][:, cols].double()
        check_close(self.logits[:, cols], want, self.dtype, "LM head logits", self.extra)


@kernel(("decode.lm_head", "prefill.lm_head"), "torch")
def build_ends(probe, ctx: CaseContext) -> Kernel:
    p = dict(ctx.params)
    shape = load_model(p["model"])
    vocab, _ = _vocab_shard(p)
    rows, batch = probe.rows(p)
    size = DTYPE_BYTES[p["dtype"]]
    head = shape.hidden_size * vocab * size
    copies = rotation_count(head, ctx.device, ctx.host)
    # The head copies, the embedding table, the gathered rows and the logits; the
    # float64 check casts 512 columns only.
    need = (copies + 1) * head + rows * shape.hidden_size * size + batch * vocab * size
    require_memory(ctx.device, int(need), f"{probe.name} ({copies} LM-head copies + embedding table)")
    path = native_path(p["dtype"], ctx.device_info, ctx.host)
    built = EndsKernel(shape.hidden_size, vocab, rows, batch, p["dtype"], ctx.device, copies, ctx.seed,
                       native=path.native)
    built.work, built.params = path.record(probe.work(p, ctx.device_info), built.extra), p
    return built
