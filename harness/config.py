"""Suite files: loading, validation, and the resolved plan they describe.

A suite is YAML::

    name: quick
    description: every probe family once, small sizes
    timeout_s: 120            # per case, hard limit (worker killed past it)
    cpu_ranks: 2              # CPU ranks for multi-rank probes (Gloo); GPUs: one rank each
    group_timeout_s: 60       # torch.distributed group timeout (a rank that never arrives)
    rounds: 1                 # run the suite as N shuffled rounds (harness.runner; --rounds)
    timing: {warmup: 2, min_reps: 5, max_reps: 50, budget_s: 0.5}
    plugins: [my_probes]      # extra probe modules to import (optional)
    nominal:                  # overrides of configs/accelerators.yaml (optional)
      cpu: {memory_Bps: 4.0e10}
    probes:
      memory.triad: {}                      # the probe's default grid
      gemm.square:
        params: {n: [512, 1024], dtype: [fp32, bf16]}
        timing: {max_reps: 20}
        timeout_s: 60

Every key is checked; an unknown key, a wrong type or an unknown probe or parameter
is a :class:`~harness.errors.UserError` naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import registry
from harness.errors import UserError
from harness.timing import TimingPolicy

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SUITE_KEYS = {
    "name", "description", "timeout_s", "timing", "plugins", "nominal", "probes", "cpu_ranks", "group_timeout_s",
    "indicators", "rounds",
}
PROBE_KEYS = {"params", "timing", "timeout_s"}
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CPU_RANKS = 2
DEFAULT_GROUP_TIMEOUT_S = 60.0
DEFAULT_ROUNDS = 1
# More rounds than this split min_reps/budget into slivers too thin to time.
MAX_ROUNDS = 100


@dataclass
class ProbeEntry:
    name: str
    grid: dict[str, list]
    timing: TimingPolicy
    timeout_s: float


@dataclass
class Suite:
    name: str
    source: str
    description: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    plugins: list[str] = field(default_factory=list)
    nominal: dict = field(default_factory=dict)
    cpu_ranks: int = DEFAULT_CPU_RANKS
    group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S
    # Rounds of the whole suite in one run (harness.runner.round_order/round_timing).
    rounds: int = DEFAULT_ROUNDS
    # Overrides of configs/indicators.yaml (thresholds, SLOs) for the collector.
    indicators: dict = field(default_factory=dict)
    raw_probes: dict = field(default_factory=dict)
    probes: list[ProbeEntry] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The resolved suite, as stored in the manifest (and replayed by --resume)."""
        return {
            "name": self.name,
            "source": self.source,
            "description": self.description,
            "timeout_s": self.timeout_s,
            "timing": self.timing.as_dict(),
            "plugins": self.plugins,
            "nominal": self.nominal,
            "cpu_ranks": self.cpu_ranks,
            "group_timeout_s": self.group_timeout_s,
            "rounds": self.rounds,
            "indicators": self.indicators,
            "probes": {
                p.name: {"params": p.grid, "timing": p.timing.as_dict(), "timeout_s": p.timeout_s}
                for p in self.probes
            },
        }


def suite_path(ref: str) -> Path:
    """A suite given by name (configs/<name>.yaml) or by path."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"suite file {ref}: no such file")
        return path
    named = CONFIG_DIR / f"{ref}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in ("accelerators", "compare"))
        raise UserError(f"unknown suite '{ref}' (known: {', '.join(known)}; or give a path to a YAML file)")
    return named


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: invalid YAML ({problem})") from None


def load_suite(ref: str) -> Suite:
    """Read and validate a suite (probes must already be discovered for the probe and
    parameter names to check; plugins named in the suite are discovered here)."""
    path = suite_path(ref)
    return parse_suite(read_yaml(path), str(path))


def parse_suite(doc: object, source: str) -> Suite:
    if not isinstance(doc, dict):
        raise UserError(f"{source}: a suite is a mapping with a 'probes' key")
    for key in doc:
        if key not in SUITE_KEYS:
            raise UserError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(SUITE_KEYS))})")
    suite = Suite(name=_typed(doc, "name", str, source, Path(source).stem), source=source)
    suite.description = _typed(doc, "description", str, source, "")
    suite.timeout_s = _positive(_typed(doc, "timeout_s", (int, float), source, DEFAULT_TIMEOUT_S), f"{source}: timeout_s")
    suite.timing = TimingPolicy.from_dict(_typed(doc, "timing", dict, source, {}), f"{source}: timing")
    plugins = _typed(doc, "plugins", list, source, [])
    if not all(isinstance(p, str) for p in plugins):
        raise UserError(f"{source}: plugins: expected a list of module names")
    suite.plugins = plugins
    suite.nominal = _typed(doc, "nominal", dict, source, {})
    suite.cpu_ranks = _typed(doc, "cpu_ranks", int, source, DEFAULT_CPU_RANKS)
    if suite.cpu_ranks < 1:
        raise UserError(f"{source}: cpu_ranks: must be at least 1, got {suite.cpu_ranks}")
    suite.group_timeout_s = float(_positive(
        _typed(doc, "group_timeout_s", (int, float), source, DEFAULT_GROUP_TIMEOUT_S), f"{source}: group_timeout_s"))
    suite.rounds = check_rounds(_typed(doc, "rounds", int, source, DEFAULT_ROUNDS), f"{source}: rounds")
    suite.indicators = _typed(doc, "indicators", dict, source, {})
    from harness.collector.common import load_config

    try:
        load_config(suite.indicators)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    probes = doc.get("probes")
    if not isinstance(probes, dict) or not probes:
        raise UserError(f"{source}: 'probes' must be a non-empty mapping of probe name to settings")
    suite.raw_probes = probes

    known = registry.discover(suite.plugins)
    for name, entry in probes.items():
        where = f"{source}: probes.{name}"
        cls = known.get(name)
        if cls is None:
            raise UserError(f"{source}: unknown probe '{name}' (known: {', '.join(sorted(known))})")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with params/timing/timeout_s, got {entry!r}")
        for key in entry:
            if key not in PROBE_KEYS:
                raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(PROBE_KEYS))})")
        grid = cls.validate_params(_typed(entry, "params", dict, where, {}), f"{where}.params")
        timing_over = _typed(entry, "timing", dict, where, {})
        timing = TimingPolicy.from_dict({**suite.timing.as_dict(), **timing_over}, f"{where}.timing")
        timeout = _positive(_typed(entry, "timeout_s", (int, float), where, suite.timeout_s), f"{where}.timeout_s")
        suite.probes.append(ProbeEntry(name=name, grid=grid, timing=timing, timeout_s=float(timeout)))
    return suite


def check_rounds(value: int, where: str) -> int:
    """A rounds count (suite key or --rounds): an int from 1 to MAX_ROUNDS, else a
    UserError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROUNDS:
        raise UserError(f"{where}: must be an integer from 1 to {MAX_ROUNDS}, got {value!r}")
    return value


def _typed(doc: dict, key: str, want, where: str, default):
    if key not in doc or doc[key] is None:
        return default
    value = doc[key]
    wants = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool) or not isinstance(value, wants):
        names = " or ".join(w.__name__ for w in wants)
        raise UserError(f"{where}: {key}: expected {names}, got {value!r}")
    return value


def _positive(value, where: str):
    if value <= 0:
        raise UserError(f"{where}: must be positive, got {value!r}")
    return value
