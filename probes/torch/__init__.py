"""The torch backend's kernels: one module per probe family, each registering a kernel
builder per probe with :func:`harness.registry.kernel` (``build(probe, ctx) -> Kernel``).

What a probe measures (parameters, work model, skip rules) is in its spec module,
``probes/<family>.py``; how torch measures it is in ``probes/torch/<family>.py``.
Importing this package registers every builder; torch itself is imported only inside
the kernels. Shared helpers (dtypes, synchronize, free memory, CUDA graphs) are in
``probes/torch/common.py``.
"""

# TRANSITIONAL (issue 15 in progress): modules not written yet are passed over.
import importlib as _importlib  # noqa: E402

for _name in ['collective', 'composite', 'decode', 'gemm', 'memory', 'model_ends', 'moe', 'overhead', 'prefill', 'transfer']:
    try:
        _importlib.import_module(f"probes.torch.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"probes.torch.{_name}":
            raise
