"""The torch backend's kernels: one module per probe family, each registering a kernel
builder per probe with :func:`harness.registry.kernel` (``build(probe, ctx) -> Kernel``).

What a probe measures (parameters, work model, skip rules) is in its spec module,
``probes/<family>.py``; how torch measures it is in ``probes/torch/<family>.py``.
Importing this package registers every builder; torch itself is imported only inside
the kernels. Shared helpers (dtypes, synchronize, free memory, CUDA graphs) are in
``probes/torch/common.py``.
"""

from probes.torch import (  # noqa: F401,E402 - importing them registers the builders
    collective,
    composite,
    decode,
    gemm,
    memory,
    model_ends,
    moe,
    overhead,
    prefill,
    transfer,
)
