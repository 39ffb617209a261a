"""Loading finished (or partial) run folders for analysis: compare, fleet, reports.

Loading is versioned. A run folder carries ``schema_version`` in its manifest:

- newer than this code (:data:`harness.SCHEMA_VERSION`): refused with a one-line
  :class:`~harness.errors.UserError` (the check of :func:`harness.store.read_manifest`);
- older: upgraded step by step through :data:`MIGRATIONS`, a registry
  ``schema_version -> function`` where the function for version *v* takes a
  :class:`RawRun` at version *v* and returns it at version *v + 1*. The entry for the
  current version is the identity (nothing to do); a version with no entry is refused;
- a truncated, corrupt or ill-typed file (``manifest.json``, ``cases.parquet`` or the
  ``cases.jsonl`` journal of a partial run, ``samples.parquet``, ``telemetry.parquet``,
  their ``parts/``, ``indicators.json``) is named (with the line, for the journal) in a
  one-line UserError. The checks, per file: :func:`harness.store.check_manifest`,
  :func:`~harness.store.check_case_row`, :func:`~harness.store.check_cases_frame`,
  :func:`~harness.store.check_samples_frame`, :func:`~harness.store.check_telemetry_frame`
  and :func:`check_indicators`: required fields present, types as the schema says
  (``schema_version`` an integer and not a boolean, statistics numeric, statuses known,
  case ids unique).

Versions: 1, the first; 2 adds rounds (``coherence run --rounds``): ``samples.round``
(int, 0-based), ``telemetry.round`` (the round of the case a row was taken in) and the
cases columns ``rounds`` (int: rounds with samples), ``round_p50_s`` and
``round_p99_s`` (JSON text lists of floats, one per round with samples, in round
order). The 1 -> 2 migration reads a v1 run as one round: ``round`` 0, ``rounds`` 1
(0 for a case without samples) and one-element lists (empty without samples).

``indicators.json`` (written by the collector) is optional: ``Run.indicators`` is None
when it is absent. Its numeric leaves are read tolerantly by :func:`indicator_leaves`:
a leaf is a number, or a mapping with a numeric ``value`` (plus e.g. ``unit``,
``cases``, ``reason``); a ``{"value": null, "reason": ...}`` leaf is "not measurable"
and skipped. Lists are walked with the element's ``case_id``/``id``/``name`` (else its
index) as the path segment.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from harness import SCHEMA_VERSION
from harness.errors import UserError
from harness.store import (
    TELEMETRY_COLUMNS,
    read_cases,
    read_manifest,
    read_samples,
    read_table,
    resolve_run,
)


@dataclass
class RawRun:
    """What a run folder holds, before or after migration."""

    schema_version: int
    manifest: dict
    cases: pd.DataFrame
    samples: pd.DataFrame
    telemetry: pd.DataFrame
    indicators: dict | None


@dataclass
class Run:
    path: Path
    manifest: dict
    cases: pd.DataFrame
    samples: pd.DataFrame
    telemetry: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TELEMETRY_COLUMNS))
    indicators: dict | None = None
    loaded_from_version: int = SCHEMA_VERSION

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.path.name)

    @property
    def label(self) -> str:
        return str(self.manifest.get("label") or "")

    @property
    def host(self) -> str:
        return str(self.manifest.get("host") or "")

    def device_classes(self) -> dict[str, str]:
        """Device id -> device class (the manifest's devices[].name)."""
        out = {}
        for dev in self.manifest.get("devices") or []:
            if isinstance(dev, dict) and dev.get("id"):
                nom = dev.get("nominal") or {}
                out[str(dev["id"])] = str(dev.get("name") or nom.get("device_class") or dev["id"])
        return out

    def class_of(self, device: str) -> str:
        """Class of a case's device or device group (``cuda:0-3``, ``cuda:0+cuda:2``,
        ``cpu:0-1``): the class of its first device."""
        classes = self.device_classes()
        first = device_members(device)[0] if device else ""
        if first in classes:
            return classes[first]
        kind = first.split(":")[0]
        same = [c for d, c in classes.items() if d.split(":")[0] == kind]
        return same[0] if same else (first or "unknown")


# -- migrations ------------------------------------------------------------------------
Migration = Callable[[RawRun], RawRun]
MIGRATIONS: dict[int, Migration] = {}


def register_migration(version: int, fn: Migration) -> None:
    """Register the upgrade of a run at ``version`` to ``version + 1`` (for the current
    version: the identity)."""
    MIGRATIONS[int(version)] = fn


def _identity(raw: RawRun) -> RawRun:
    return raw


def _v1_to_v2(raw: RawRun) -> RawRun:
    """A run from before rounds as a run of one round (see the module docstring)."""
    return replace(raw, schema_version=2, cases=add_round_columns(raw.cases),
                   samples=_with_round(raw.samples), telemetry=_with_round(raw.telemetry))


def _with_round(df: pd.DataFrame) -> pd.DataFrame:
    if df is None or "round" in df.columns:
        return df
    return df.assign(round=pd.Series([0] * len(df), index=df.index, dtype="int64"))


def add_round_columns(cases: pd.DataFrame) -> pd.DataFrame:
    """Cases without the round columns (schema v1) as one round each: ``rounds`` 1 and
    ``round_p50_s``/``round_p99_s`` the one-element lists of ``p50_s``/``p99_s``; a case
    without samples (n 0 or missing) gets 0 and empty lists. Columns present are kept."""
    if cases is None:
        return cases
    cases = cases.copy()
    n = pd.to_numeric(cases["n"], errors="coerce").fillna(0) if "n" in cases.columns else pd.Series(0, index=cases.index)
    has = n > 0
    if "rounds" not in cases.columns:
        cases["rounds"] = has.astype("int64").astype("Int64")
    for col, stat in (("round_p50_s", "p50_s"), ("round_p99_s", "p99_s")):
        if col in cases.columns:
            continue
        values = cases[stat] if stat in cases.columns else pd.Series(None, index=cases.index, dtype="float64")
        cases[col] = [json.dumps([float(v)]) if h and pd.notna(v) else "[]" for h, v in zip(has, values)]
    return cases


register_migration(1, _v1_to_v2)
register_migration(2, _identity)


def migrate(raw: RawRun, where: str = "run") -> RawRun:
    """Bring a run up to :data:`SCHEMA_VERSION` through the registered migrations."""
    if raw.schema_version > SCHEMA_VERSION:
        raise UserError(f"{where}: schema_version {raw.schema_version} is newer than this coherence "
                        f"(reads up to {SCHEMA_VERSION}); upgrade coherence")
    while raw.schema_version < SCHEMA_VERSION:
        fn = MIGRATIONS.get(raw.schema_version)
        if fn is None:
            raise UserError(f"{where}: schema_version {raw.schema_version} has no migration to "
                            f"{raw.schema_version + 1}; this coherence reads versions "
                            f"{min(MIGRATIONS)}..{SCHEMA_VERSION}")
        before = raw.schema_version
        raw = fn(raw)
        if raw.schema_version == before:  # a migration that forgot to bump the version
            raw = replace(raw, schema_version=before + 1)
        raw.manifest["schema_version"] = raw.schema_version
    return MIGRATIONS[SCHEMA_VERSION](raw)


# -- loading ---------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def read_telemetry(path: Path) -> pd.DataFrame:
    """The telemetry of a run, checked (harness.store.check_telemetry_frame):
    telemetry.parquet, or its parts while it is partial; empty when there is none."""
    path = Path(path)
    table = path / "telemetry.parquet"
    if table.exists():
        return read_table(table, "telemetry")
    parts = sorted((path / "parts").glob("telemetry-*.parquet"))
    frames = [read_table(p, "telemetry") for p in parts]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TELEMETRY_COLUMNS)


def read_indicators(path: Path) -> dict | None:
    """The run's ``indicators.json`` checked (:func:`check_indicators`), or None when
    the run has none. Raises UserError naming the file when it is unreadable, not JSON
    or ill-typed."""
    file = Path(path) / "indicators.json"
    if not file.exists():
        return None
    try:
        doc = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({_one_line(exc)[:200]})") from None
    except OSError as exc:
        raise UserError(f"{file}: cannot read ({exc.strerror})") from None
    return check_indicators(doc, file)


INDICATOR_MODES = ("mode1", "mode2", "mode3", "mode4")


def check_indicators(doc, file: Path | str = "indicators.json") -> dict:
    """Check a parsed ``indicators.json`` (layout: harness.collector's docstring); return
    it. An object whose ``schema_version`` (if any) is an integer; ``mode1``..``mode4``
    objects whose entries are indicators (objects) or bare numbers; an indicator's
    ``verdict`` a string or null and its ``value`` a number, text or null; ``serving``
    and ``ladder`` lists of objects, a serving entry with a string ``case_id``;
    ``capacity`` and ``config`` objects; ``summary`` verdict -> integer count.
    Raises UserError naming ``file`` and the key."""
    def bad(where: str, what: str, v) -> UserError:
        return UserError(f"{file}: {where} must be {what}, got {type(v).__name__}")

    if not isinstance(doc, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(doc).__name__}")
    sv = doc.get("schema_version")
    if "schema_version" in doc and (not isinstance(sv, int) or isinstance(sv, bool)):
        raise bad("schema_version", "an integer", sv)
    for key in ("capacity", "config", "summary", *INDICATOR_MODES):
        if key in doc and not isinstance(doc[key], dict):
            raise bad(key, "an object", doc[key])
    for mode in INDICATOR_MODES:
        for name, ind in (doc.get(mode) or {}).items():
            if _is_number(ind):
                continue
            if not isinstance(ind, dict):
                raise bad(f"{mode}.{name}", "an indicator object or a number", ind)
            verdict = ind.get("verdict")
            if verdict is not None and not isinstance(verdict, str):
                raise bad(f"{mode}.{name}.verdict", "a string", verdict)
            value = ind.get("value")
            if value is not None and not isinstance(value, (int, float, str)) or isinstance(value, bool):
                raise bad(f"{mode}.{name}.value", "a number, text or null", value)
    for key in ("serving", "ladder"):
        if key in doc and (not isinstance(doc[key], list) or not all(isinstance(e, dict) for e in doc[key])):
            raise bad(key, "a list of objects", doc[key])
    for i, entry in enumerate(doc.get("serving") or []):
        if not isinstance(entry.get("case_id"), str):
            raise bad(f"serving[{i}].case_id", "a string", entry.get("case_id"))
    for verdict, count in (doc.get("summary") or {}).items():
        if not isinstance(count, int) or isinstance(count, bool):
            raise bad(f"summary.{verdict}", "an integer count", count)
    return doc


def _guard(fn, *args):
    """Run a store reader, keeping its UserError to one line."""
    try:
        return fn(*args)
    except UserError as exc:
        raise UserError(_one_line(exc)) from None


def load_path(path: Path, indicators: bool = True) -> Run:
    """Load one run folder (migrating an older schema), every file checked; raises
    UserError naming a damaged file. ``indicators=False`` leaves indicators.json unread
    (``Run.indicators`` None): for the collector, which writes it anew, so that a
    damaged one is replaced rather than in the way."""
    path = Path(path)
    manifest = _guard(read_manifest, path)
    cases = _guard(read_cases, path)  # checked by harness.store.check_cases_frame
    samples = _guard(read_samples, path)  # checked by harness.store.check_samples_frame
    telemetry = _guard(read_telemetry, path)
    indicators = _guard(read_indicators, path) if indicators else None
    version = manifest["schema_version"]
    raw = migrate(RawRun(version, manifest, cases, samples, telemetry, indicators), str(path / "manifest.json"))
    samples = raw.samples
    if "rank" not in samples.columns:
        samples = samples.assign(rank=0)
    if "rep" not in samples.columns:
        samples = samples.assign(rep=samples.groupby("case_id").cumcount())
    # A run at the current version may still lack them where a part predates rounds
    # (a v1 run resumed by this code) or the run was killed before any case finished.
    samples = _with_round(samples)
    if samples["round"].isna().any():
        samples = samples.assign(round=samples["round"].fillna(0))
    samples = samples.astype({"round": "int64"})
    cases = add_round_columns(raw.cases)
    return Run(path=path, manifest=raw.manifest, cases=cases.reset_index(drop=True), samples=samples,
               telemetry=raw.telemetry, indicators=raw.indicators, loaded_from_version=version)


def load_run(ref: str | Path, root: Path | str = Path("results")) -> Run:
    """A run given as a folder or as a run id under ``root``."""
    return load_path(resolve_run(str(ref), Path(root)))


def run_folders(ref: str | Path, root: Path | str = Path("results")) -> list[Path]:
    """A run (folder or id), or a directory whose sub-folders are runs (every folder
    inside it holding a manifest.json, sorted by name)."""
    candidate = Path(ref)
    if (candidate / "manifest.json").exists():
        return [candidate]
    if candidate.is_dir():
        runs = sorted(p for p in candidate.iterdir() if (p / "manifest.json").exists())
        if not runs:
            raise UserError(f"{candidate}: neither a run folder nor a directory holding run folders")
        return runs
    return [resolve_run(str(ref), Path(root))]


# -- small helpers shared by compare and fleet ----------------------------------------
def device_members(device: str) -> list[str]:
    """``cuda:0-3`` -> [cuda:0, cuda:1, cuda:2, cuda:3]; ``cuda:0+cuda:2`` -> both;
    ``cpu:0-1`` -> [cpu:0, cpu:1] (CPU ranks on one CPU)."""
    out: list[str] = []
    for part in str(device).split("+"):
        m = re.fullmatch(r"([A-Za-z_]+):(\d+)-(\d+)", part)
        if m:
            out.extend(f"{m.group(1)}:{i}" for i in range(int(m.group(2)), int(m.group(3)) + 1))
        elif part:
            out.append(part)
    return out or [str(device)]


def rep_durations(samples: pd.DataFrame, case_id: str) -> pd.Series:
    """Per-repetition durations of one case; for multi-rank cases the slowest rank's
    duration per repetition (max over the ``rank`` column), as the runner summarizes."""
    s = samples[samples["case_id"] == case_id]
    if not len(s):
        return pd.Series([], dtype="float64")
    if "rank" in s.columns and s["rank"].nunique() > 1:
        return s.groupby("rep", sort=True)["duration_s"].max().astype("float64").reset_index(drop=True)
    return s["duration_s"].astype("float64").reset_index(drop=True)


def rep_series(samples: pd.DataFrame, case_id: str) -> pd.DataFrame:
    """Per-repetition ``t_start_s`` and ``duration_s`` of one case in time order (by
    ``t_start_s``, then ``rep``); multi-rank cases as :func:`rep_durations` (slowest rank's
    duration, earliest rank's start). Without ``t_start_s`` the repetition order stands."""
    s = samples[samples["case_id"] == case_id]
    if not len(s):
        return pd.DataFrame({"t_start_s": pd.Series([], dtype="float64"), "duration_s": pd.Series([], dtype="float64")})
    has_t = "t_start_s" in s.columns
    has_round = "round" in s.columns
    if "rank" in s.columns and s["rank"].nunique() > 1 and "rep" in s.columns:
        agg = {"duration_s": "max", **({"t_start_s": "min"} if has_t else {}), **({"round": "first"} if has_round else {})}
        s = s.groupby("rep", sort=True).agg(agg).reset_index()
    s = s.assign(t_start_s=s["t_start_s"].astype("float64") if has_t else range(len(s)))
    keys = ["t_start_s", "rep"] if "rep" in s.columns else ["t_start_s"]
    s = s.sort_values(keys, kind="stable")
    # ``round``: the run's round of each repetition (0 for runs made before rounds).
    return pd.DataFrame({"t_start_s": s["t_start_s"].to_numpy(dtype="float64"),
                         "duration_s": s["duration_s"].to_numpy(dtype="float64"),
                         "round": s["round"].fillna(0).to_numpy(dtype="int64") if has_round else np.zeros(len(s), dtype="int64")})


def json_object(text) -> dict:
    """A JSON-object column of a run file (``params``, ``resolved_params``, ``extra``:
    JSON text, or already a dict) as a dict; {} for None, NaN, "", unparseable text or
    JSON that is not an object (older or damaged rows never raise)."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# Top-level parts of indicators.json that are bookkeeping, not measurements: the
# thresholds used, verdict counts, versions, the oversubscribed cases (collector).
NOT_INDICATORS = {"config", "summary", "schema_version", "generated_at", "run_id", "oversubscribed"}


def indicator_leaves(doc: dict | None) -> dict[str, dict]:
    """Numeric leaves of indicators.json: dotted path -> {"value", "unit"}."""
    out: dict[str, dict] = {}
    if not doc:
        return out

    def walk(prefix: str, node) -> None:
        if _is_number(node):
            out[prefix] = {"value": float(node), "unit": None}
            return
        if isinstance(node, dict):
            if "value" in node and not isinstance(node["value"], (dict, list)):
                if _is_number(node["value"]):
                    out[prefix] = {"value": float(node["value"]), "unit": node.get("unit")}
                return  # null value: not measurable
            for key, child in node.items():
                if not prefix and key in NOT_INDICATORS:
                    continue
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                name = i
                if isinstance(child, dict):
                    name = child.get("case_id") or child.get("id") or child.get("name") or i
                walk(f"{prefix}[{name}]", child)

    walk("", doc)
    return out


def mode_of(path: str) -> str:
    """The mode an indicator path belongs to: 'mode N' when its first segment names one
    (``mode1``, ``mode_2``, ``mode-3-interconnect``) or it sits under ``modes.N``;
    else its first segment (e.g. ``capacity``)."""
    segs = [s for s in re.split(r"[.\[\]]+", path) if s]
    if not segs:
        return ""
    m = re.match(r"mode[_\- ]?(\d)", segs[0].lower())
    if m:
        return f"mode {m.group(1)}"
    if segs[0].lower() == "modes" and len(segs) > 1:
        m = re.match(r"(?:mode[_\- ]?)?(\d)", segs[1].lower())
        if m:
            return f"mode {m.group(1)}"
    return segs[0]


CAPACITY_KEYS = {
    "epsilon": {"epsilon", "eps", "ε", "effectivecapacityratio"},
    "C_eff": {"ceff", "effectivecapacity"},
    "C_nom": {"cnom", "nominalcapacity", "nominalservingcapacity"},
}


def capacity_figures(doc: dict | None) -> dict[str, float | None]:
    """ε, C_eff, C_nom of a run from indicators.json: the numeric leaf whose last key
    (lower-cased, non-alphanumerics dropped) names it; where several match (e.g. per
    device and for the node) the one nearest the top of the document."""
    leaves = indicator_leaves(doc)
    out: dict[str, float | None] = {k: None for k in CAPACITY_KEYS}
    depth: dict[str, int] = {}
    for path, leaf in leaves.items():
        last = re.split(r"[.\[]", path)[-1].rstrip("]")
        key = re.sub(r"[^0-9a-zε]", "", last.lower())
        for name, aliases in CAPACITY_KEYS.items():
            if key in aliases:
                d = path.count(".") + path.count("[")
                if name not in depth or d < depth[name]:
                    out[name], depth[name] = leaf["value"], d
    return out
