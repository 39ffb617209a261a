"""The result store: results/<run_id>/ per result schema v1 (DESIGN.md).

While a run is going, every finished case is made durable before the next one starts:
its samples go to ``parts/samples-<n>.parquet`` and its telemetry to
``parts/telemetry-<n>.parquet`` (each written to a temporary name and renamed), then its
row is appended to ``cases.jsonl`` and fsynced, and ``cases.parquet`` is rewritten
atomically from the journal. The manifest says ``status: partial`` until
:meth:`RunStore.finalize` merges the parts into ``samples.parquet`` and
``telemetry.parquet`` and marks it ``complete``. A run killed at any point keeps every
case whose journal line was written; ``--resume`` picks up from there.

Rounds (``coherence run --rounds N``, schema v2): the runner runs every case once per
round. The journal gets one line per (case, round): the case's row pooled over the
rounds finished so far, with the private keys ``_round`` (0-based) and ``_part``.
``cases.parquet`` keeps ONE row per case, the latest pooled line of each case (keys
starting with ``_`` left out). Journal lines written before rounds existed have no
``_round`` and count as round 0, so a resume of such a run finishes it as one round.
Samples carry ``round`` (int) and ``rep`` counted over the case's rounds (round 0's
repetitions first), so consumers that group by ``rep`` still see one repetition per
value; per-case telemetry rows carry ``round`` too.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness import SCHEMA_VERSION, atomic
from harness.errors import UserError

CASE_COLUMNS = [
    "case_id", "probe", "family", "backend", "device", "params", "status", "reason",
    "n", "warmup", "p50_s", "p90_s", "p99_s", "mean_s", "std_s", "mad_s", "min_s", "max_s",
    "flops", "bytes", "flops_per_s", "bytes_per_s", "best_flops_per_s", "best_bytes_per_s",
    "bound", "roofline_fraction",
]
FLOAT_COLUMNS = [
    "p50_s", "p90_s", "p99_s", "mean_s", "std_s", "mad_s", "min_s", "max_s", "flops", "bytes",
    "flops_per_s", "bytes_per_s", "best_flops_per_s", "best_bytes_per_s", "roofline_fraction",
]
# Energy columns (issue 16, harness.runner.energy_columns): additions after the schema
# columns; runs written before them lack them, so every reader treats them as optional.
ENERGY_FLOAT_COLUMNS = ["energy_j", "avg_power_w", "flops_per_j", "bytes_per_j"]
ENERGY_TEXT_COLUMNS = ["energy_method", "energy_scope", "energy_reason"]
# ``round`` (schema v2) last, so readers of v1 positions keep working.
SAMPLE_COLUMNS = ["case_id", "rank", "rep", "t_start_s", "duration_s", "round"]
# The sampler's rows (harness.telemetry); the store adds ``round`` to a case's rows.
TELEMETRY_COLUMNS = ["t_s", "case_id", "source", "metric", "value"]
ROUND_COLUMN = "round"
# Mid-run, cases.parquet is rewritten at most this often (each rewrite rebuilds the
# whole table: ~0.1 s on a busy 2-core VM, which rounds multiply). The journal stays
# the commit point and readers of a partial run read the journal (read_cases).
TABLE_REWRITE_S = 2.0


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Kept for callers of the old name: :func:`harness.atomic.write_bytes`."""
    atomic.write_bytes(path, data)


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    """Kept for callers of the old name: :func:`harness.atomic.write_parquet`."""
    atomic.write_parquet(df, path)


def write_json(path: Path, doc: dict) -> None:
    """``doc`` as indented JSON, atomically, mode 0644 (:func:`harness.atomic.write_json`)."""
    atomic.write_json(path, doc)


class RunStore:
    """One run folder, opened for writing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.parts = self.path / "parts"
        self.journal = self.path / "cases.jsonl"
        # The plan's case order (set by the runner): cases.parquet lists cases in it
        # rather than in the shuffled order of a round. None: the order they finished.
        self.case_order: list[str] | None = None
        # What :meth:`reopen` found damaged and repaired (see _repair_damage).
        self.damage: list[dict] = []
        self._next_part: int | None = None  # see _next_index
        self._table_written = 0.0  # time.monotonic() of the last cases.parquet rewrite

    # -- creation / reopening --------------------------------------------------------
    @classmethod
    def create(cls, root: Path, run_id: str, manifest: dict) -> "RunStore":
        path = Path(root) / run_id
        if path.exists():
            raise UserError(f"run folder {path} already exists")
        try:
            path.mkdir(parents=True)
            (path / "parts").mkdir()
        except OSError as exc:
            raise UserError(f"run folder {path}: cannot create ({exc.strerror or exc})") from None
        store = cls(path)
        atomic.write_bytes(store.journal, b"")
        doc = {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "status": "partial",
            "started_at": utc_now(),
            "finished_at": None,
            **manifest,
        }
        write_json(path / "manifest.json", doc)
        return store

    @classmethod
    def reopen(cls, path: Path) -> "RunStore":
        store = cls(path)
        manifest = store.manifest()
        if manifest.get("status") == "complete":
            raise UserError(f"run {path.name} is already complete; nothing to resume")
        try:
            store.parts.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"{store.parts}: cannot create ({exc.strerror or exc})") from None
        if not store.journal.exists():
            atomic.write_bytes(store.journal, b"")
        store._truncate_cut_line()
        store._repair_damage()
        store._drop_orphan_parts()
        store._write_cases_table()  # the table may lag the journal (TABLE_REWRITE_S)
        return store

    def manifest(self) -> dict:
        return read_manifest(self.path)

    def update_manifest(self, **fields) -> None:
        doc = self.manifest()
        doc.update(fields)
        write_json(self.path / "manifest.json", doc)

    # -- case by case ----------------------------------------------------------------
    def journal_rows(self) -> list[dict]:
        """The journal's rows, each checked (:func:`check_case_row`). A last line cut by a
        kill mid-write (no final newline, not JSON) is left out: that round did not finish.

        Raises UserError naming ``cases.jsonl`` and the line for any other damage: a line
        that is not JSON or not an object, a field of the wrong type, an unknown status,
        one (case, round) journaled twice."""
        good, damaged = self._scan_journal()
        if damaged:
            lineno, problem, _ = damaged[0]
            raise UserError(f"{self.journal} line {lineno}: {problem}")
        return [row for _, _, row in good]

    def _scan_journal(self) -> tuple[list[tuple[int, bytes, dict]], list[tuple[int, str, dict | None]]]:
        """(good lines as (line number, raw bytes, row), damaged lines as (line number,
        problem, row or None))."""
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise UserError(f"{self.journal}: cannot read ({exc.strerror or exc})") from None
        lines = data.split(b"\n")
        good: list[tuple[int, bytes, dict]] = []
        damaged: list[tuple[int, str, dict | None]] = []
        seen: dict[tuple[str, int], int] = {}
        for i, raw in enumerate(lines):
            lineno = i + 1
            last = i == len(lines) - 1  # after the final newline, or a line cut mid-write
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                if last:
                    continue  # cut by a kill mid-write: that round did not finish
                damaged.append((lineno, f"not valid JSON ({_short(exc)})", None))
                continue
            problem = check_case_row(row)
            if problem:
                damaged.append((lineno, problem, row if isinstance(row, dict) else None))
                continue
            key = (row["case_id"], int(row.get("_round", 0)))
            if row.get("_round_status") == "interrupted":
                # A round stopped by SIGINT/SIGTERM (harness.runner): --resume runs it
                # again and journals that round once more, so it claims no key.
                good.append((lineno, raw, row))
                continue
            if key in seen:
                damaged.append((lineno, f"case {row['case_id']} round {key[1]} already journaled on line "
                                        f"{seen[key]}", row))
                continue
            seen[key] = lineno
            good.append((lineno, raw, row))
        return good, damaged

    def finished_case_ids(self) -> set[str]:
        """Cases with at least one finished round."""
        return {row["case_id"] for row in self.journal_rows()}

    def finished_rounds(self) -> set[tuple[str, int]]:
        """(case_id, round) pairs whose journal line landed; lines written before
        rounds existed count as round 0. A round a signal interrupted (``_round_status``
        ``interrupted``) is not finished: --resume runs it again."""
        return {(row["case_id"], int(row.get("_round", 0))) for row in self.journal_rows()
                if row.get("_round_status") != "interrupted"}

    def case_rows(self) -> list[dict]:
        """One row per case: its latest journal line (pooled over its rounds so far),
        in :attr:`case_order` (cases it lacks last) or else the order the cases first
        finished, private ``_`` keys left out."""
        rows = latest_rows(self.journal_rows())
        if self.case_order:
            rank = {cid: i for i, cid in enumerate(self.case_order)}
            rows.sort(key=lambda r: rank.get(r["case_id"], len(rank)))
        return rows

    def _next_index(self) -> int:
        # Read from the journal once, then counted here: re-reading (and checking) the
        # whole journal before every append made a run quadratic in its cases.
        if self._next_part is None:
            self._next_part = max((r.get("_part", -1) for r in self.journal_rows()), default=-1) + 1
        return self._next_part

    def append_case(self, row: dict, samples: pd.DataFrame, telemetry: pd.DataFrame | None = None,
                    round_index: int = 0) -> None:
        """Make one finished round of a case durable: samples and telemetry parts
        first, then the journal line (the commit point), then the cases table.

        ``row`` is the case's row pooled over its rounds so far; ``round_index`` the
        round just finished (0-based), written to the samples and telemetry that lack
        a ``round`` column and to the journal line as ``_round``."""
        idx = self._next_index()
        try:
            if len(samples):
                if ROUND_COLUMN not in samples.columns:
                    samples = samples.assign(**{ROUND_COLUMN: round_index})
                # Schema columns first, then a probe's own per-repetition columns (floats;
                # parts without them read back as NaN once concatenated).
                extra = [c for c in samples.columns if c not in SAMPLE_COLUMNS]
                _atomic_parquet(samples[SAMPLE_COLUMNS + extra], self.parts / f"samples-{idx:05d}.parquet")
            if telemetry is not None and len(telemetry):
                if ROUND_COLUMN not in telemetry.columns:
                    telemetry = telemetry.assign(**{ROUND_COLUMN: round_index})
                _atomic_parquet(telemetry[TELEMETRY_COLUMNS + [ROUND_COLUMN]],
                                self.parts / f"telemetry-{idx:05d}.parquet")
            line = json.dumps({**row, "_part": idx, "_round": int(round_index)}, default=_json_default) + "\n"
            self._append_journal(line.encode("utf-8"))
        except UserError as exc:
            # A full or read-only disk mid-run: what is journaled is kept (parts written
            # for this round become orphans that a resume removes).
            raise UserError(f"{exc}; the finished cases are kept: coherence run --resume {self.path} "
                            "(or copy the run folder to another disk and resume it there)") from None
        self._next_part = idx + 1
        if time.monotonic() - self._table_written >= TABLE_REWRITE_S:
            self._write_cases_table()

    def _append_journal(self, data: bytes) -> None:
        """Append one line and fsync it: the commit point of a round. On an OS error (a
        full disk) the journal is cut back to its size before, so no half line is left,
        and a UserError names the file."""
        size = None
        try:
            with open(self.journal, "ab") as f:
                size = f.tell()
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if size is not None:
                try:
                    os.truncate(self.journal, size)
                except OSError:
                    pass  # a resume cuts a partial last line anyway (_truncate_cut_line)
            raise UserError(f"{self.journal}: cannot write ({exc.strerror or exc})") from None

    def append_telemetry(self, telemetry: pd.DataFrame, tag: str) -> None:
        """Telemetry not tied to one case (between cases); kept under its own tag."""
        if len(telemetry):
            _atomic_parquet(telemetry[TELEMETRY_COLUMNS], self.parts / f"telemetry-{tag}.parquet")

    def committed(self, kind: str) -> pd.DataFrame:
        """The ``samples`` or ``telemetry`` rows of every committed case part, with
        ``round`` (0 where a part predates rounds): what a resume pools new rounds with."""
        committed = {f"{r['_part']:05d}" for r in self.journal_rows() if "_part" in r}
        prefix = f"{kind}-"
        frames = [read_table(p, kind) for p in sorted(self.parts.glob(f"{prefix}*.parquet"))
                  if p.name[len(prefix):-len(".parquet")] in committed]
        frames = [f for f in frames if len(f)]
        columns = SAMPLE_COLUMNS if kind == "samples" else TELEMETRY_COLUMNS + [ROUND_COLUMN]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        if ROUND_COLUMN not in df.columns:
            df[ROUND_COLUMN] = 0
        df[ROUND_COLUMN] = df[ROUND_COLUMN].fillna(0).astype("int64")
        return df

    def _write_cases_table(self) -> None:
        _atomic_parquet(cases_frame(self.case_rows()), self.path / "cases.parquet")
        self._table_written = time.monotonic()

    def _truncate_cut_line(self) -> None:
        """A kill during the journal write can leave a last line without its newline;
        the next append would be glued to it. Cut back to the last complete line."""
        data = self.journal.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.journal, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())

    def _repair_damage(self) -> None:
        """Before a resume: find damaged journal lines and unreadable or ill-typed parts,
        and make the run resumable without them. A damaged journal line is dropped; a
        committed part that is damaged drops the journal line that committed it; either
        way that (case, round) is simply not finished and the resume runs it again. A
        damaged part of telemetry between cases is removed. What was found is kept in
        :attr:`damage` (dicts: file, line or case/round, problem, action) for the
        manifest's ``sessions`` entry of this resume."""
        self.damage = []
        good, damaged = self._scan_journal()
        for lineno, problem, row in damaged:
            entry = {"file": self.journal.name, "line": lineno, "problem": problem}
            if row and isinstance(row.get("case_id"), str):
                entry.update(case_id=row["case_id"])
            entry["action"] = "line dropped; that round is run again"
            self.damage.append(entry)
        by_part = {f"{row['_part']:05d}": row for _, _, row in good if "_part" in row}
        bad_parts: set[str] = set()
        for part in sorted(self.parts.glob("*.parquet")):
            m = re.match(r"(samples|telemetry)-(.+)\.parquet$", part.name)
            if not m:
                continue
            try:
                read_table(part, m.group(1))
            except UserError as exc:
                problem = str(exc).split(": ", 1)[-1]
                row = by_part.get(m.group(2))
                entry = {"file": f"parts/{part.name}", "problem": problem}
                if row is not None:
                    bad_parts.add(m.group(2))
                    entry.update(case_id=row["case_id"], round=int(row.get("_round", 0)),
                                 action="case round run again")
                else:
                    entry["action"] = "removed"
                self.damage.append(entry)
                try:
                    part.unlink()
                except OSError as err:
                    raise UserError(f"{part}: damaged and cannot be removed ({err.strerror or err})") from None
        if damaged or bad_parts:
            keep = [raw + b"\n" for _, raw, row in good
                    if "_part" not in row or f"{row['_part']:05d}" not in bad_parts]
            atomic.write_bytes(self.journal, b"".join(keep))

    def _drop_orphan_parts(self) -> None:
        """Parts written for a case whose journal line never landed (killed between the
        two writes) would be counted twice on resume: remove them."""
        committed = {f"{r['_part']:05d}" for r in self.journal_rows() if "_part" in r}
        for part in self.parts.glob("*.parquet"):
            m = re.match(r"(samples|telemetry)-(\d{5})\.parquet$", part.name)
            if m and m.group(2) not in committed:
                part.unlink()

    # -- end of run ------------------------------------------------------------------
    def finalize(self, status: str = "complete") -> None:
        self._write_cases_table()
        for kind, columns in (("samples", SAMPLE_COLUMNS), ("telemetry", TELEMETRY_COLUMNS)):
            parts = sorted(self.parts.glob(f"{kind}-*.parquet"))
            frames = [read_table(p, kind) for p in parts]
            frames = [f for f in frames if len(f)]
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
            if ROUND_COLUMN not in df.columns:
                # Parts of a run begun before rounds existed: all of it was round 0.
                df[ROUND_COLUMN] = 0 if kind == "samples" else pd.NA
            elif kind == "samples":
                df[ROUND_COLUMN] = df[ROUND_COLUMN].fillna(0)
            if kind == "telemetry" and len(df):
                df = df.sort_values("t_s", kind="stable", ignore_index=True)
            _atomic_parquet(df.astype(_dtypes(kind), errors="ignore"), self.path / f"{kind}.parquet")
        self.update_manifest(status=status, finished_at=utc_now())
        if status == "complete":
            for part in self.parts.glob("*.parquet"):
                part.unlink()
            self.parts.rmdir()


def _dtypes(kind: str) -> dict:
    if kind == "samples":
        return {"case_id": "string", "rank": "int64", "rep": "int64", "t_start_s": "float64", "duration_s": "float64",
                "round": "int64"}
    # Telemetry between cases (no round) keeps a missing value.
    return {"t_s": "float64", "case_id": "string", "source": "string", "metric": "string", "value": "float64",
            "round": "Int64"}


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def latest_rows(journal: list[dict]) -> list[dict]:
    """The journal folded to one row per case: each case's last line (its row pooled
    over the most rounds), placed where the case first appears; ``_`` keys dropped."""
    latest: dict[str, dict] = {}
    for line in journal:
        latest[line["case_id"]] = line  # dicts keep first-insertion order
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in latest.values()]


def cases_frame(rows: list[dict]) -> pd.DataFrame:
    """The cases table: schema columns first in their order, extra columns after."""
    df = pd.DataFrame(rows)
    for col in CASE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in CASE_COLUMNS]
    df = df[CASE_COLUMNS + extra]
    for col in ("n", "warmup") + (("rounds",) if "rounds" in df.columns else ()):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in FLOAT_COLUMNS + [c for c in ENERGY_FLOAT_COLUMNS if c in df.columns]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


# -- reading ---------------------------------------------------------------------------
def resolve_run(ref: str, root: Path) -> Path:
    """A run given as a folder path or as a run id under ``root``."""
    candidate = Path(ref)
    if (candidate / "manifest.json").exists():
        return candidate
    under_root = Path(root) / ref
    if (under_root / "manifest.json").exists():
        return under_root
    raise UserError(f"no run '{ref}' (looked for {candidate}/manifest.json and {under_root}/manifest.json)")


# -- validation (schema v1 and v2: DESIGN.md "Result schema") ---------------------------
# Every reader below checks what it hands on: a damaged file is a one-line UserError
# naming it (and the line), never a traceback later in a consumer.
RUN_STATUSES = ("partial", "complete")
# ``interrupted``: a case stopped by SIGINT/SIGTERM of coherence run (issue 17).
CASE_STATUSES = ("ok", "failed", "timeout", "skipped", "interrupted")
INT_ROW_FIELDS = ("n", "warmup", "rounds", "world_size")
TEXT_ROW_FIELDS = ("probe", "family", "backend", "device", "reason", "bound", *ENERGY_TEXT_COLUMNS)
# manifest key -> the JSON types it may have when present (None: null allowed).
MANIFEST_TYPES: dict[str, tuple] = {
    "label": (str, type(None)), "host": (str, type(None)), "started_at": (str, type(None)),
    "finished_at": (str, type(None)), "environment": (dict,), "config": (dict,), "devices": (list,),
    "versions": (dict,), "sessions": (list,), "planned_cases": (int, type(None)), "rounds": (int,),
    "round_seeds": (list,),
}


def _short(exc) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()[:200]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def check_manifest(doc, file: Path | str = "manifest.json") -> dict:
    """Check a parsed ``manifest.json`` against the schema; return it.

    Required: ``schema_version`` (an integer, not a boolean, 0 .. SCHEMA_VERSION; older
    versions are migrated by harness.results), ``run_id`` (non-empty string), ``status``
    (one of :data:`RUN_STATUSES`). Optional keys must have the types of
    :data:`MANIFEST_TYPES`; ``sessions`` holds objects, ``round_seeds`` integers,
    ``rounds`` is at least 1. Raises UserError naming ``file`` and the key."""
    if not isinstance(doc, dict):
        raise UserError(f"{file}: expected a JSON object, got {_json_type(doc)}; not a coherence run")
    version = doc.get("schema_version")
    if not _is_int(version):
        raise UserError(f"{file}: schema_version must be an integer, got {_json_type(version)}; not a coherence run")
    if version > SCHEMA_VERSION:
        raise UserError(f"{file}: schema_version {version} is newer than this coherence "
                        f"(reads up to {SCHEMA_VERSION}); upgrade coherence")
    if version < 0:
        raise UserError(f"{file}: schema_version {version} is negative")
    if not isinstance(doc.get("run_id"), str) or not doc["run_id"]:
        raise UserError(f"{file}: run_id must be a non-empty string, got {_json_type(doc.get('run_id'))}")
    if doc.get("status") not in RUN_STATUSES:
        raise UserError(f"{file}: status must be one of {', '.join(RUN_STATUSES)}, got {doc.get('status')!r}")
    for key, types in MANIFEST_TYPES.items():
        if key in doc and not isinstance(doc[key], types) or (key in doc and types[0] is int and isinstance(doc[key], bool)):
            raise UserError(f"{file}: '{key}' must be {' or '.join(_json_type(t()) for t in types if t is not type(None))}"
                            f"{' or null' if type(None) in types else ''}, got {_json_type(doc[key])}")
    if any(not isinstance(s, dict) for s in doc.get("sessions") or []):
        raise UserError(f"{file}: 'sessions' must hold objects")
    if any(not _is_int(v) for v in doc.get("round_seeds") or []):
        raise UserError(f"{file}: 'round_seeds' must hold integers")
    if "rounds" in doc and doc["rounds"] < 1:
        raise UserError(f"{file}: 'rounds' must be at least 1, got {doc['rounds']}")
    return doc


def check_case_row(row) -> str | None:
    """What is wrong with one cases row (a journal line, parsed), or None.

    A row is an object with ``case_id`` (non-empty string) and ``status`` (one of
    :data:`CASE_STATUSES`); the statistics (:data:`FLOAT_COLUMNS`) are numbers or null;
    ``n``, ``warmup``, ``rounds``, ``world_size`` integers or null; text fields strings or
    null; the journal's own ``_part`` and ``_round`` non-negative integers."""
    if not isinstance(row, dict):
        return f"expected a JSON object (a case row), got {_json_type(row)}"
    cid = row.get("case_id")
    if not isinstance(cid, str) or not cid:
        return f"case_id must be a non-empty string, got {_json_type(cid)}"
    if row.get("status") not in CASE_STATUSES:
        return f"case {cid}: status must be one of {', '.join(CASE_STATUSES)}, got {row.get('status')!r}"
    for col in FLOAT_COLUMNS + ENERGY_FLOAT_COLUMNS:
        v = row.get(col)
        if v is not None and not _is_number(v):
            return f"case {cid}: {col} must be a number, got {_json_type(v)}"
    for col in INT_ROW_FIELDS:
        v = row.get(col)
        if v is not None and not _is_int(v):
            return f"case {cid}: {col} must be an integer, got {_json_type(v)}"
    for col in TEXT_ROW_FIELDS:
        v = row.get(col)
        if v is not None and not isinstance(v, str):
            return f"case {cid}: {col} must be a string, got {_json_type(v)}"
    if row.get("params") is not None and not isinstance(row["params"], (str, dict)):
        return f"case {cid}: params must be JSON text, got {_json_type(row['params'])}"
    for col in ("_part", "_round"):
        v = row.get(col)
        if col in row and (not _is_int(v) or v < 0):
            return f"case {cid}: {col} must be a non-negative integer, got {v!r}"
    return None


def _numeric(series: pd.Series) -> bool:
    """A numeric column (not boolean); a column with no values at all passes."""
    if pd.api.types.is_bool_dtype(series):
        return False
    if pd.api.types.is_numeric_dtype(series):
        return True
    return bool(series.isna().all())


def _strings(series: pd.Series) -> bool:
    """Every value a string, none missing (pandas' C-level type inference: a
    per-value Python check cost ~0.5 s on a 200,000-sample run)."""
    if not len(series):
        return True
    return pd.api.types.infer_dtype(series, skipna=True) == "string" and not series.isna().any()


def check_cases_frame(df: pd.DataFrame, file: Path | str) -> pd.DataFrame:
    """Check a cases table (``cases.parquet``); return it. Requires ``case_id`` (strings,
    unique) and ``status`` (each in :data:`CASE_STATUSES`); the statistics numeric.
    Raises UserError naming ``file``."""
    for col in ("case_id", "status"):
        if col not in df.columns:
            raise UserError(f"{file}: no '{col}' column; not a coherence cases table")
    if not _strings(df["case_id"]):
        raise UserError(f"{file}: case_id holds values that are not strings")
    dup = df["case_id"][df["case_id"].duplicated()]
    if len(dup):
        raise UserError(f"{file}: case id {dup.iloc[0]} appears more than once")
    bad = df[~df["status"].isin(CASE_STATUSES)]
    if len(bad):
        raise UserError(f"{file}: case {bad['case_id'].iloc[0]}: status must be one of {', '.join(CASE_STATUSES)}, "
                        f"got {bad['status'].iloc[0]!r}")
    for col in [c for c in FLOAT_COLUMNS + ENERGY_FLOAT_COLUMNS + list(INT_ROW_FIELDS) if c in df.columns]:
        if not _numeric(df[col]):
            raise UserError(f"{file}: column {col} must be numeric, has {df[col].dtype}")
    return df


def check_samples_frame(df: pd.DataFrame, file: Path | str) -> pd.DataFrame:
    """Check a samples table or part: ``case_id`` (strings) and ``duration_s``
    (numeric) required once it has rows; ``rank``, ``rep``, ``round``, ``t_start_s``
    numeric where present. Raises UserError naming ``file``."""
    if len(df):
        for col in ("case_id", "duration_s"):
            if col not in df.columns:
                raise UserError(f"{file}: no '{col}' column; not a coherence samples table")
        if not _strings(df["case_id"]):
            raise UserError(f"{file}: case_id holds values that are not strings")
    for col in ("duration_s", "t_start_s", "rank", "rep", ROUND_COLUMN):
        if col in df.columns and not _numeric(df[col]):
            raise UserError(f"{file}: column {col} must be numeric, has {df[col].dtype}")
    return df


def check_telemetry_frame(df: pd.DataFrame, file: Path | str) -> pd.DataFrame:
    """Check a telemetry table or part: :data:`TELEMETRY_COLUMNS` once it has rows,
    ``t_s`` and ``value`` numeric. Raises UserError naming ``file``."""
    if len(df):
        missing = [c for c in TELEMETRY_COLUMNS if c not in df.columns]
        if missing:
            raise UserError(f"{file}: no '{missing[0]}' column; not a coherence telemetry table")
    for col in ("t_s", "value", ROUND_COLUMN):
        if col in df.columns and not _numeric(df[col]):
            raise UserError(f"{file}: column {col} must be numeric, has {df[col].dtype}")
    return df


def read_table(file: Path, kind: str) -> pd.DataFrame:
    """Read one Parquet file of a run (``kind``: cases, samples, telemetry) and check it.
    Raises UserError naming the file when it is unreadable or ill-typed."""
    try:
        df = pd.read_parquet(file)
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise UserError(f"{file}: unreadable ({type(exc).__name__}: {_short(exc)})") from None
    check = {"cases": check_cases_frame, "samples": check_samples_frame, "telemetry": check_telemetry_frame}[kind]
    return check(df, file)


def read_manifest(path: Path) -> dict:
    """The run folder's ``manifest.json``, parsed and checked (:func:`check_manifest`).
    Raises UserError naming the file when it is missing, unreadable, not JSON or ill-typed."""
    file = Path(path) / "manifest.json"
    try:
        doc = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{file}: is a directory") from None
    except OSError as exc:
        raise UserError(f"{file}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({_short(exc)})") from None
    return check_manifest(doc, file)


def check_resumable(path: Path) -> dict:
    """The manifest of a run that ``coherence run --resume`` is to continue, checked for
    what a resume replays: status ``partial``, the ``environment`` fingerprint and the
    ``config`` (resolved suite) as objects. Raises UserError naming the file otherwise."""
    manifest = read_manifest(path)
    file = Path(path) / "manifest.json"
    if manifest["status"] == "complete":
        raise UserError(f"run {Path(path).name} is already complete; nothing to resume")
    for key in ("environment", "config"):
        if not isinstance(manifest.get(key), dict):
            raise UserError(f"{file}: no '{key}' object (got {_json_type(manifest.get(key))}); cannot resume this run")
    config = manifest["config"]
    # The resolved choices a resume replays (harness.runner.start_run writes them).
    checks = {
        "devices": lambda v: isinstance(v, list) and all(isinstance(d, str) and d for d in v),
        "probe_filter": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
        "backend": lambda v: isinstance(v, str) and bool(v),
        "cpu_ranks": lambda v: v is None or _is_int(v) and v >= 1,
        "timeout_override_s": lambda v: v is None or _is_number(v) and math.isfinite(v) and v > 0,
    }
    wanted = {"devices": "a list of device ids", "probe_filter": "a list of probe names", "backend": "a backend name",
              "cpu_ranks": "a positive integer or null", "timeout_override_s": "a positive finite number or null"}
    for key, ok in checks.items():
        if key in config and not ok(config[key]):
            raise UserError(f"{file}: config.{key} must be {wanted[key]}, got {config[key]!r}"[:300])
    return manifest


def read_cases(path: Path) -> pd.DataFrame:
    """The cases of a run, checked: cases.parquet (:func:`check_cases_frame`), or the
    journal (every line checked, :meth:`RunStore.journal_rows`) if the table is missing
    (a run killed before its first table write) or the run is partial (mid-run the table
    is rewritten at most every TABLE_REWRITE_S, the journal is current). Raises UserError
    naming the damaged file."""
    path = Path(path)
    table = path / "cases.parquet"
    journal = path / "cases.jsonl"
    partial = False
    if journal.exists():
        partial = read_manifest(path).get("status") == "partial"
    if partial or (not table.exists() and journal.exists()):
        return cases_frame(RunStore(path).case_rows())
    if table.exists():
        return read_table(table, "cases")
    raise UserError(f"{table}: no such file")


def read_samples(path: Path) -> pd.DataFrame:
    """The samples of a run, checked: samples.parquet, or its parts while it is partial."""
    path = Path(path)
    table = path / "samples.parquet"
    if table.exists():
        return read_table(table, "samples")
    parts = sorted((path / "parts").glob("samples-*.parquet"))
    if parts:
        return pd.concat([read_table(p, "samples") for p in parts], ignore_index=True)
    return pd.DataFrame(columns=SAMPLE_COLUMNS)
