"""JAX kernels of the probes (``coherence run --backend jax``).

Each probe keeps one name, one parameter grid and one work model for every backend
(its spec module, ``probes/<family>.py``); ``probes/jax/<family>.py`` registers the JAX
builders (:func:`harness.registry.kernel`). Importing this package registers them all. The kernels follow the torch ones: the same shapes, random inputs, rotation past
4× the last-level cache, and the same float64 checks and tolerances. Differences that
come from JAX itself are recorded in ``extra``:

- Every computation is ``jax.jit``-compiled ahead of time in ``prepare``
  (``extra["compile_s"]``), so no timed repetition compiles.
- JAX arrays are immutable; where torch writes into an output buffer, the JAX kernel
  donates the old output (``donate_argnums``) so XLA may reuse it in place. XLA:CPU
  ignores donation (``extra["donation_honored"]`` says whether it was): each
  repetition then writes a fresh buffer.
- fp32 products use ``Precision.HIGHEST`` (no bf16/tf32 passes), as torch's fp32.
- Attention is ``jax.nn.dot_product_attention`` (layout [batch, tokens, heads, dim],
  GQA native); the paged layout is a ``lax.scan`` over chunks of blocks gathered by
  the block table with an online softmax, as the torch probe does it.
- Collectives are ``shard_map`` over a one-axis mesh of the case's devices in one
  process: psum, all_gather, psum_scatter, all_to_all, ppermute (a ring), with the
  input values, expected values and busbw factors of probes.collective.

jax is imported inside the functions, never at module import.
"""

from probes.jax import collective, decode, gemm, memory, prefill, transfer  # noqa: F401,E402 - registers the builders
