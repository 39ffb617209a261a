"""The result store: durability case by case, kill-safety, versioned reading."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import SCHEMA_VERSION
from harness.errors import UserError
from harness.store import CASE_COLUMNS, RunStore, read_cases, read_manifest, resolve_run


def samples(case_id: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"case_id": case_id, "rank": 0, "rep": range(n), "t_start_s": [0.1 * i for i in range(n)],
                         "duration_s": [0.5] * n})


def row(case_id: str, status: str = "ok") -> dict:
    return {"case_id": case_id, "probe": "p", "family": "memory", "backend": "torch", "device": "cpu:0",
            "params": "{}", "status": status, "reason": "", "n": 3, "p50_s": 0.5}


def test_cases_are_durable_one_by_one_and_finalize_merges(tmp_path):
    store = RunStore.create(tmp_path, "r1", {"label": "x"})
    store.append_case(row("a"), samples("a", 3))
    # Readable mid-run: the cases table and the journal agree, manifest is partial.
    assert list(read_cases(store.path)["case_id"]) == ["a"]
    assert read_manifest(store.path)["status"] == "partial"
    store.append_case(row("b", "failed"), samples("b", 0))
    store.finalize()
    cases = pd.read_parquet(store.path / "cases.parquet")
    assert list(cases.columns[: len(CASE_COLUMNS)]) == CASE_COLUMNS
    assert list(cases["status"]) == ["ok", "failed"]
    merged = pd.read_parquet(store.path / "samples.parquet")
    assert len(merged) == 3 and set(merged["case_id"]) == {"a"}
    manifest = read_manifest(store.path)
    assert manifest["status"] == "complete" and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["finished_at"] and manifest["label"] == "x"


def test_reopen_cuts_a_half_written_line_and_drops_orphan_parts(tmp_path):
    store = RunStore.create(tmp_path, "r2", {})
    store.append_case(row("a"), samples("a", 2))
    # Killed after writing the samples of the next case, in the middle of its journal line.
    samples("b", 2).to_parquet(store.parts / "samples-00001.parquet")
    with open(store.journal, "a") as f:
        f.write('{"case_id": "b", "sta')
    again = RunStore.reopen(store.path)
    assert again.finished_case_ids() == {"a"}
    assert not (store.parts / "samples-00001.parquet").exists()
    again.append_case(row("b"), samples("b", 4))
    again.finalize()
    merged = pd.read_parquet(store.path / "samples.parquet")
    assert merged.groupby("case_id").size().to_dict() == {"a": 2, "b": 4}


def test_complete_run_cannot_be_resumed(tmp_path):
    store = RunStore.create(tmp_path, "r3", {})
    store.finalize()
    with pytest.raises(UserError, match="already complete"):
        RunStore.reopen(store.path)


def test_newer_schema_is_refused(tmp_path):
    run = tmp_path / "future"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="newer than this coherence"):
        read_manifest(run)


def test_corrupt_files_are_named(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json: not valid JSON"):
        read_manifest(run)
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    (run / "cases.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(UserError, match="cases.parquet: unreadable"):
        read_cases(run)


def test_resolve_run_by_id_or_path(tmp_path):
    store = RunStore.create(tmp_path, "r4", {})
    assert resolve_run("r4", tmp_path) == store.path
    assert resolve_run(str(store.path), tmp_path / "elsewhere") == store.path
    with pytest.raises(UserError, match="no run 'r5'"):
        resolve_run("r5", tmp_path)


def test_journal_is_keyed_by_case_and_round_and_the_table_keeps_one_pooled_row(tmp_path):
    store = RunStore.create(tmp_path, "r6", {})
    store.case_order = ["b", "a"]
    store.append_case({**row("a"), "n": 3, "rounds": 1}, samples("a", 3), round_index=0)
    store.append_case({**row("b"), "n": 3, "rounds": 1}, samples("b", 3), round_index=0)
    # Round 1 of a: its row pooled over both rounds replaces the round-0 row.
    store.append_case({**row("a"), "n": 5, "rounds": 2}, samples("a", 2).assign(rep=[3, 4]), round_index=1)
    assert store.finished_rounds() == {("a", 0), ("b", 0), ("a", 1)}
    table = read_cases(store.path)  # mid-run: from the journal, one row per case
    assert sorted(table["case_id"]) == ["a", "b"]
    assert table.set_index("case_id").loc["a", "n"] == 5 and table.set_index("case_id").loc["a", "rounds"] == 2
    assert not [c for c in table.columns if c.startswith("_")]
    store.finalize()
    assert list(read_cases(store.path)["case_id"]) == ["b", "a"]  # the plan's order
    merged = pd.read_parquet(store.path / "samples.parquet")
    assert merged["round"].dtype == "int64"
    assert merged[merged["case_id"] == "a"].groupby("round").size().to_dict() == {0: 3, 1: 2}


def test_journal_lines_from_before_rounds_count_as_round_0(tmp_path):
    store = RunStore.create(tmp_path, "r7", {})
    # What a v1 store wrote: no _round in the journal, no round column in the parts.
    samples("a", 2).to_parquet(store.parts / "samples-00000.parquet")
    with open(store.journal, "a") as f:
        f.write(json.dumps({**row("a"), "_part": 0}) + "\n")
    again = RunStore.reopen(store.path)
    assert again.finished_rounds() == {("a", 0)}
    assert again.committed("samples")["round"].tolist() == [0, 0]
    again.append_case(row("b"), samples("b", 2), round_index=0)
    again.finalize()
    merged = pd.read_parquet(store.path / "samples.parquet")
    assert merged["round"].tolist() == [0, 0, 0, 0]
