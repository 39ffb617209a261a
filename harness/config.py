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
is a :class:`~harness.errors.UserError` naming the file and the key. Also refused: a
file that is not UTF-8 text, a key given twice in one mapping, nesting deeper than 100
levels, any number that is not finite (NaN, inf) or out of its bounds (time limits
and budgets: positive, at most MAX_TIMEOUT_S = one week; cpu_ranks 1..MAX_CPU_RANKS;
rounds 1..MAX_ROUNDS), a ``nominal:`` key that names no device type, id or class, and
``indicators:`` overrides whose types differ from configs/indicators.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import registry
from harness.checks import check_number
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
# Upper bound of every time limit (suite/per-probe timeout_s, group_timeout_s, --timeout,
# timing budgets): one week. Past it a value is a typo, and values like 1e300 overflow
# the deadline arithmetic of the runner and of torch.distributed's timedelta.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# Upper bound of cpu_ranks in a suite: a sanity limit independent of the machine; the
# planner applies the machine's own limit (harness.runner.rank_limit).
MAX_CPU_RANKS = 1024
# Device types a `nominal:` key may name (torch: cpu, cuda, mps; JAX: cpu, gpu, tpu).
DEVICE_TYPES = ("cpu", "cuda", "gpu", "mps", "tpu")


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a mapping that holds the same key twice.

    YAML 1.2 (section 3.2.1.1, "Nodes") requires mapping keys to be unique; PyYAML keeps
    the last value silently, so a suite with two ``timeout_s`` lines would run with
    whichever came last. Keys brought in by a merge key (``<<: *anchor``) may be
    overridden, as the merge-key spec (yaml.org/type/merge.html) allows."""

    # Deeper than this is no suite or config: refused before PyYAML's recursive composer
    # and constructor reach Python's recursion limit (slowly, then with a RecursionError).
    MAX_DEPTH = 100
    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > self.MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {self.MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> object:
    """The YAML document in ``path`` (a suite, compare.yaml, a --config file).

    Raises UserError naming the file (and line where known) for: an unreadable file, a
    file that is not UTF-8 text (binary, UTF-16), invalid YAML, a duplicate mapping key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is still UTF-8
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                        "suites and configs are UTF-8 YAML") from None
    if "\x00" in text:
        raise UserError(f"{path}: not a text file (it holds NUL bytes); suites and configs are UTF-8 YAML")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problem = " ".join(str(problem).split())
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
    for key in doc:
        if not isinstance(key, str):
            raise UserError(f"{source}: key {key!r}: keys are names (strings)")
    suite = Suite(name=_typed(doc, "name", str, source, Path(source).stem), source=source)
    suite.description = _typed(doc, "description", str, source, "")
    suite.timeout_s = check_timeout(_typed(doc, "timeout_s", (int, float), source, DEFAULT_TIMEOUT_S),
                                    f"{source}: timeout_s")
    suite.timing = TimingPolicy.from_dict(_typed(doc, "timing", dict, source, {}), f"{source}: timing")
    plugins = _typed(doc, "plugins", list, source, [])
    if not all(isinstance(p, str) for p in plugins):
        raise UserError(f"{source}: plugins: expected a list of module names")
    suite.plugins = plugins
    suite.nominal = check_nominal(_typed(doc, "nominal", dict, source, {}), f"{source}: nominal")
    suite.cpu_ranks = _typed(doc, "cpu_ranks", int, source, DEFAULT_CPU_RANKS)
    if not 1 <= suite.cpu_ranks <= MAX_CPU_RANKS:
        raise UserError(f"{source}: cpu_ranks: must be an integer from 1 to {MAX_CPU_RANKS}, got {suite.cpu_ranks}")
    suite.group_timeout_s = check_timeout(
        _typed(doc, "group_timeout_s", (int, float), source, DEFAULT_GROUP_TIMEOUT_S), f"{source}: group_timeout_s")
    suite.rounds = check_rounds(_typed(doc, "rounds", int, source, DEFAULT_ROUNDS), f"{source}: rounds")
    suite.indicators = check_indicators(_typed(doc, "indicators", dict, source, {}), f"{source}: indicators")
    probes = doc.get("probes")
    if not isinstance(probes, dict) or not probes:
        raise UserError(f"{source}: 'probes' must be a non-empty mapping of probe name to settings")
    suite.raw_probes = probes

    known = registry.discover(suite.plugins)
    for name, entry in probes.items():
        where = f"{source}: probes.{name}"
        cls = known.get(name) if isinstance(name, str) else None
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
        timeout = check_timeout(_typed(entry, "timeout_s", (int, float), where, suite.timeout_s), f"{where}.timeout_s")
        suite.probes.append(ProbeEntry(name=name, grid=grid, timing=timing, timeout_s=timeout))
    return suite


# The keys of a run manifest's ``config`` that ``--resume`` replays besides the suite,
# with the JSON types each may hold (harness.run_command writes them).
RUN_CONFIG_TYPES = {
    "devices": "a list of device ids", "probe_filter": "a list of probe or family names",
    "backend": "a backend name", "cpu_ranks": "an integer", "timeout_override_s": "a number of seconds or null",
    "suite_source": "a path",
}


def check_run_config(config: dict, where: str) -> dict:
    """The ``config`` object of a run manifest, checked for what a resume replays (the
    suite itself goes through :func:`parse_suite`): ``devices`` and ``probe_filter``
    lists of strings, ``backend`` and ``suite_source`` strings, ``cpu_ranks`` an integer
    from 1 to MAX_CPU_RANKS, ``timeout_override_s`` null or a time limit as for
    ``--timeout`` (finite, positive, at most MAX_TIMEOUT_S). A missing key keeps its
    default. Raises UserError naming ``where`` and the key."""
    def bad(key: str, got) -> UserError:
        return UserError(f"{where}.{key}: expected {RUN_CONFIG_TYPES[key]}, got {got!r}")

    for key in ("devices", "probe_filter"):
        value = config.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise bad(key, value)
    for key in ("backend", "suite_source"):
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(key, value)
    ranks = config.get("cpu_ranks")
    if ranks is not None and (isinstance(ranks, bool) or not isinstance(ranks, int) or not 1 <= ranks <= MAX_CPU_RANKS):
        raise bad("cpu_ranks", ranks)
    override = config.get("timeout_override_s")
    if override is not None:
        check_timeout(override, f"{where}.timeout_override_s")
    return config


def check_timeout(value, where: str) -> float:
    """A time limit in seconds: finite, positive, at most MAX_TIMEOUT_S (one week)."""
    return check_number(value, where, 0, MAX_TIMEOUT_S)


_DEVICE_ID = re.compile(r"(?:jax:)?(?P<type>[a-z]+):\d+")


def check_nominal(overrides: dict, where: str) -> dict:
    """A suite's ``nominal:`` overrides, checked before any device is looked at.

    Each key is a device type (DEVICE_TYPES), a device id (``cuda:1``, ``jax:tpu:0``) of
    such a type, or a device class name (one the accelerator table matches, or a name
    with a space, as vendors print them: ``NVIDIA H100 80GB HBM3``). Each value is a
    mapping of the fields harness.nominal accepts (memory_Bps, link_Bps, host_link_Bps,
    compute_flops, a dtype name, note), numbers finite and positive. Raises UserError
    naming the key otherwise (a single unknown word such as ``npu`` or ``h100`` would
    otherwise match no device and be ignored without a word)."""
    from harness import nominal

    table = None
    for key, fields in overrides.items():
        here = f"{where}.{key}"
        if not isinstance(key, str) or not key.strip():
            raise UserError(f"{here}: a key is a device type, id or class name, got {key!r}")
        m = _DEVICE_ID.fullmatch(key)
        if m:
            if m.group("type") not in DEVICE_TYPES:
                raise UserError(f"{here}: unknown device type '{m.group('type')}' "
                                f"(known: {', '.join(DEVICE_TYPES)})")
        elif key not in DEVICE_TYPES and not (" " in key.strip()):
            if table is None:
                table = nominal.load_table()
            if not any(row["name"] == key for row in table["accelerators"]) and \
                    nominal._match_row(table["accelerators"], key) is None:
                raise UserError(f"{here}: unknown device type '{key}' (known: {', '.join(DEVICE_TYPES)}; "
                                "or a device id like cuda:0, or a device class name)")
        if not isinstance(fields, dict):
            raise UserError(f"{here}: expected a mapping of field to value, got {fields!r}")
        try:
            nominal._apply_overrides(nominal._empty("", "unknown", "", ""), {"type": key}, {key: fields})
        except nominal.NominalError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('overrides.')}") from None
    return overrides


# Sections of configs/indicators.yaml whose keys a suite may extend with new names
# (SLOs for a model shape the defaults do not list).
def check_indicators(overrides: dict, where: str) -> dict:
    """A suite's ``indicators:`` overrides of configs/indicators.yaml, type-checked
    against the defaults: every key known (new model shapes allowed under ``slo``), a
    mapping where the default is a mapping, a finite number where it is a number, each
    threshold ``{better: lower|higher, warn: N, fail: N}`` with warn not past fail.
    Raises UserError naming the key."""
    from harness.collector.common import load_config

    try:
        # Type-checked there (harness.collector.common.check_indicator_overrides), which
        # also serves runs already on disk.
        merged = load_config(overrides)
    except UserError as exc:
        raise UserError(f"{where}: {str(exc).removeprefix('indicators.')}") from None
    for name, th in (merged.get("thresholds") or {}).items():
        if name not in (overrides.get("thresholds") or {}):
            continue
        warn, fail = th.get("warn"), th.get("fail")
        if warn is not None and fail is not None:
            worse = fail < warn if th["better"] == "lower" else fail > warn
            if worse:
                raise UserError(f"{where}.thresholds.{name}: fail ({fail:g}) is not past warn ({warn:g}) "
                                f"for better: {th['better']}")
    return overrides


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
