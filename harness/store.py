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
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness import SCHEMA_VERSION
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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, doc: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(doc, indent=2, default=str) + "\n").encode())


class RunStore:
    """One run folder, opened for writing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.parts = self.path / "parts"
        self.journal = self.path / "cases.jsonl"
        # The plan's case order (set by the runner): cases.parquet lists cases in it
        # rather than in the shuffled order of a round. None: the order they finished.
        self.case_order: list[str] | None = None
        self._table_written = 0.0  # time.monotonic() of the last cases.parquet rewrite

    # -- creation / reopening --------------------------------------------------------
    @classmethod
    def create(cls, root: Path, run_id: str, manifest: dict) -> "RunStore":
        path = Path(root) / run_id
        if path.exists():
            raise UserError(f"run folder {path} already exists")
        path.mkdir(parents=True)
        store = cls(path)
        store.parts.mkdir()
        store.journal.touch()
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
        store.parts.mkdir(exist_ok=True)
        store.journal.touch()
        store._truncate_cut_line()
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
        rows = []
        with open(self.journal, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut by a kill mid-write: that case did not finish.
                    continue
        return rows

    def finished_case_ids(self) -> set[str]:
        """Cases with at least one finished round."""
        return {row["case_id"] for row in self.journal_rows()}

    def finished_rounds(self) -> set[tuple[str, int]]:
        """(case_id, round) pairs whose journal line landed; lines written before
        rounds existed count as round 0."""
        return {(row["case_id"], int(row.get("_round", 0))) for row in self.journal_rows()}

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
        return max((r.get("_part", -1) for r in self.journal_rows()), default=-1) + 1

    def append_case(self, row: dict, samples: pd.DataFrame, telemetry: pd.DataFrame | None = None,
                    round_index: int = 0) -> None:
        """Make one finished round of a case durable: samples and telemetry parts
        first, then the journal line (the commit point), then the cases table.

        ``row`` is the case's row pooled over its rounds so far; ``round_index`` the
        round just finished (0-based), written to the samples and telemetry that lack
        a ``round`` column and to the journal line as ``_round``."""
        idx = self._next_index()
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
            _atomic_parquet(telemetry[TELEMETRY_COLUMNS + [ROUND_COLUMN]], self.parts / f"telemetry-{idx:05d}.parquet")
        line = json.dumps({**row, "_part": idx, "_round": int(round_index)}, default=_json_default) + "\n"
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if time.monotonic() - self._table_written >= TABLE_REWRITE_S:
            self._write_cases_table()

    def append_telemetry(self, telemetry: pd.DataFrame, tag: str) -> None:
        """Telemetry not tied to one case (between cases); kept under its own tag."""
        if len(telemetry):
            _atomic_parquet(telemetry[TELEMETRY_COLUMNS], self.parts / f"telemetry-{tag}.parquet")

    def committed(self, kind: str) -> pd.DataFrame:
        """The ``samples`` or ``telemetry`` rows of every committed case part, with
        ``round`` (0 where a part predates rounds): what a resume pools new rounds with."""
        committed = {f"{r['_part']:05d}" for r in self.journal_rows() if "_part" in r}
        prefix = f"{kind}-"
        frames = [pd.read_parquet(p) for p in sorted(self.parts.glob(f"{prefix}*.parquet"))
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
            frames = [pd.read_parquet(p) for p in parts]
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
    for col in FLOAT_COLUMNS:
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


def read_manifest(path: Path) -> dict:
    file = Path(path) / "manifest.json"
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schema_version"), int):
        raise UserError(f"{file}: no integer schema_version; not a coherence run")
    if doc["schema_version"] > SCHEMA_VERSION:
        raise UserError(
            f"{file}: schema_version {doc['schema_version']} is newer than this coherence "
            f"(reads up to {SCHEMA_VERSION}); upgrade coherence"
        )
    return doc


def read_cases(path: Path) -> pd.DataFrame:
    """The cases of a run: cases.parquet, or the journal if the table is missing (a
    run killed before its first table write) or the run is partial (mid-run the table
    is rewritten at most every TABLE_REWRITE_S, the journal is current)."""
    path = Path(path)
    table = path / "cases.parquet"
    journal = path / "cases.jsonl"
    partial = False
    if journal.exists():
        try:
            partial = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("status") == "partial"
        except (OSError, ValueError, AttributeError):
            partial = False
    if partial:
        return cases_frame(RunStore(path).case_rows())
    if table.exists():
        try:
            return pd.read_parquet(table)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise UserError(f"{table}: unreadable ({type(exc).__name__}: {exc})") from None
    journal = path / "cases.jsonl"
    if journal.exists():
        return cases_frame(RunStore(path).case_rows())
    raise UserError(f"{table}: no such file")


def read_samples(path: Path) -> pd.DataFrame:
    path = Path(path)
    table = path / "samples.parquet"
    if table.exists():
        try:
            return pd.read_parquet(table)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{table}: unreadable ({type(exc).__name__}: {exc})") from None
    parts = sorted((path / "parts").glob("samples-*.parquet"))
    if parts:
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return pd.DataFrame(columns=SAMPLE_COLUMNS)
