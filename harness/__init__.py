"""coherence: a benchmark harness for heterogeneous AI inference.

The engine (CLI, environment discovery, timing, runner, result store) lives here;
the probe families live in the sibling package ``probes`` and register themselves
through the ``coherence.probes`` entry point group.
"""

__version__ = "0.1.0"

# Version of the result files written under results/<run_id>/ (DESIGN.md, "Result schema");
# 2 added rounds (harness.results: the 1 -> 2 migration).
SCHEMA_VERSION = 2
