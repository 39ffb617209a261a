"""Per-repetition sample columns (Kernel.sample_columns): carried by the worker, kept per
rank by combine, written by samples_frame, stored and merged (missing columns NaN), and
read back mid-run and after a resume."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from harness.ranks import combine
from harness.registry import Kernel
from harness.runner import samples_frame
from harness.store import RunStore, read_samples
from harness.execute import sample_columns


class _K(Kernel):
    def run(self) -> None:
        pass


def test_worker_validates_and_converts_columns():
    k = _K()
    assert k.sample_columns == {} and sample_columns(k, 3) == {}
    k.sample_columns = {"compute_s": [1, 2, 3]}
    assert sample_columns(k, 3) == {"compute_s": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="has 2 values for 3"):
        k.sample_columns = {"comm_s": [1.0, 2.0]}
        sample_columns(k, 3)
    with pytest.raises(ValueError, match="overwrite a schema column"):
        k.sample_columns = {"duration_s": [1.0]}
        sample_columns(k, 1)


def test_combine_keeps_every_ranks_columns():
    results = [
        {"status": "ok", "durations_s": [1.0, 2.0, 3.0], "sample_columns": {"comm_s": [0.1, 0.2, 0.3]}},
        {"status": "ok", "durations_s": [1.5, 1.0], "sample_columns": {"comm_s": [0.5, 0.6]}},
    ]
    out = combine(results, 2)
    assert out["durations_s"] == [1.5, 2.0]
    assert out["rank_sample_columns"] == [{"comm_s": [0.1, 0.2]}, {"comm_s": [0.5, 0.6]}]
    frame = samples_frame("c", out, 0)
    assert list(frame["rank"]) == [0, 0, 1, 1]
    assert list(frame["comm_s"]) == [0.1, 0.2, 0.5, 0.6]
    assert frame["comm_s"].dtype == "float64"


def test_single_rank_and_missing_columns():
    frame = samples_frame("c", {"durations_s": [1.0, 2.0], "t_start_ns": [10, 20], "sample_columns": {"ttft_s": [0.5, 0.6]}}, 0)
    assert list(frame.columns) == ["case_id", "rank", "rep", "t_start_s", "duration_s", "ttft_s"]
    assert list(frame["ttft_s"]) == [0.5, 0.6]
    # A rank without a column gets NaN there, not an error.
    out = {"rank_durations_s": [[1.0], [2.0]], "rank_sample_columns": [{"x": [3.0]}, {}]}
    frame = samples_frame("c", out, 0)
    assert frame["x"].iloc[0] == 3.0 and math.isnan(frame["x"].iloc[1])
    # No columns at all: the schema columns only.
    assert list(samples_frame("c", {"durations_s": [1.0]}, 0).columns) == ["case_id", "rank", "rep", "t_start_s", "duration_s"]


def _row(case_id: str) -> dict:
    return {"case_id": case_id, "probe": "p", "family": "composite", "backend": "torch", "device": "cpu:0",
            "params": "{}", "status": "ok", "reason": "", "n": 2, "p50_s": 0.5}


def test_store_keeps_columns_and_resume_merges_with_nan(tmp_path):
    store = RunStore.create(tmp_path, "r1", {})
    with_cols = samples_frame("a", {"durations_s": [1.0, 2.0], "sample_columns": {"ttft_s": [0.1, 0.2]}}, 0)
    store.append_case(_row("a"), with_cols)
    # Readable mid-run from the parts.
    assert list(read_samples(store.path)["ttft_s"]) == [0.1, 0.2]
    # Interrupted here; resumed: the next case has no columns, another has a different one.
    store = RunStore.reopen(store.path)
    store.append_case(_row("b"), samples_frame("b", {"durations_s": [3.0]}, 0))
    store.append_case(_row("c"), samples_frame("c", {"durations_s": [4.0], "sample_columns": {"comm_s": [0.4]}}, 0))
    mid = read_samples(store.path)
    assert len(mid) == 4
    store.finalize()
    merged = pd.read_parquet(store.path / "samples.parquet")
    assert list(merged["case_id"]) == ["a", "a", "b", "c"]
    assert merged["ttft_s"].dtype == "float64" and merged["comm_s"].dtype == "float64"
    assert list(merged["ttft_s"][:2]) == [0.1, 0.2] and merged["ttft_s"][2:].isna().all()
    assert merged["comm_s"][:3].isna().all() and merged["comm_s"].iloc[3] == 0.4
    assert str(merged["rank"].dtype) == "int64" and list(merged["duration_s"]) == [1.0, 2.0, 3.0, 4.0]
