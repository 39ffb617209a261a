"""collective.pairwise: the round-robin schedule, and 4 real Gloo ranks on 127.0.0.1
with rank 2's traffic slowed by the probe's test hook (COHERENCE_TEST_LINK_DELAY_RANK,
COHERENCE_TEST_LINK_DELAY_S_PER_MIB): its six links (both directions with each of
the three others) are flagged, it is the slow node, and no other link is flagged.

This module doubles as a plugin (``COHERENCE_TEST_PAIRWISE_PLUGIN=1``): it then
registers ``testing.pairwise_corrupt``, whose rank 1 sends one wrong element, to show
that the receivers' check fails the case on every rank."""

from __future__ import annotations

import itertools
import json
import os

import pandas as pd
import pytest

from probes import collective as coll
from probes.collective import DELAY_RANK_ENV, DELAY_S_ENV, round_robin
from probes.torch import collective as tcoll
from tests.conftest import coherence
from tests.probes.helpers import altered_probe

PLUGIN_ENV = "COHERENCE_TEST_PAIRWISE_PLUGIN"

def _corrupt_rank_1(kernel, ctx) -> None:
    if kernel.rank == 1:
        kernel.send[5] += 1  # every peer of rank 1 receives one wrong element


if os.environ.get(PLUGIN_ENV) == "1":
    altered_probe(coll.Pairwise, "testing.pairwise_corrupt", _corrupt_rank_1)


@pytest.mark.parametrize("n", range(2, 12))
def test_round_robin_covers_every_pair_once_in_disjoint_rounds(n):
    rounds = round_robin(n)
    # N − 1 rounds for even N; odd N needs N (one rank idles per round).
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        ranks = [x for p in r for x in p]
        assert len(ranks) == len(set(ranks)), r  # disjoint: each rank in one pair at most
        assert len(r) == n // 2


def test_round_robin_rejects_a_single_rank():
    with pytest.raises(ValueError, match="at least 2 ranks"):
        round_robin(1)


def test_delay_hook_applies_to_the_named_rank_only(monkeypatch):
    monkeypatch.delenv(DELAY_RANK_ENV, raising=False)
    assert tcoll._link_delay(2) == 0.0
    monkeypatch.setenv(DELAY_RANK_ENV, "2")
    monkeypatch.setenv(DELAY_S_ENV, "0.5")
    assert tcoll._link_delay(2) == pytest.approx(0.5 / 2**20)
    assert tcoll._link_delay(1) == 0.0


def test_work_model_counts_every_ordered_pair():
    work = coll.Pairwise().work({"size_bytes": 1001, "world_size": 4}, {"type": "cpu"})
    assert work.bytes == 4 * 3 * 1000 and work.bound == "link" and work.collective is None


SUITE = """\
name: pairwise
timeout_s: 120
cpu_ranks: 4
rounds: 1
# Seven sweeps: each link's median survives three preempted transfers on a loaded
# machine. theta 0.25: the delayed links run 10-50x slower than the others, and a
# loopback transfer that a busy scheduler stretches 2x must not count as a slow link.
timing: {warmup: 1, min_reps: 7, max_reps: 7, budget_s: 0.1}
indicators: {accessible_theta: 0.25}
plugins: [tests.probes.test_pairwise]
probes:
  collective.pairwise: {params: {size_bytes: [262144], world_size: 4}}
  testing.pairwise_corrupt: {params: {size_bytes: [4096], world_size: 4}}
"""


@pytest.mark.slow
def test_a_slowed_rank_is_the_slow_node_and_only_its_links_are_flagged(tmp_path):
    from harness.collector import collect
    from harness.results import load_path

    (tmp_path / "suite.yaml").write_text(SUITE)
    # 0.2 s per MiB: 50 ms on each 256 KiB transfer of rank 2, some 10-100 × what a
    # loopback transfer of that size takes even on a loaded 2-core machine.
    proc = coherence("run", "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "out"),
                     "--devices", "cpu", "--quiet", env={DELAY_RANK_ENV: "2", DELAY_S_ENV: "0.2", PLUGIN_ENV: "1"},
                     timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the corrupting probe failed, and only it
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    cases = pd.read_parquet(run_dir / "cases.parquet").set_index("probe", drop=False)
    bad = cases.loc["testing.pairwise_corrupt"]
    assert bad["status"] == "failed", bad["reason"]
    # Ranks 0, 2 and 3 each got the wrong element from rank 1; rank 1 learns it from them.
    assert "wrong data received on rank(s) 0, 2, 3" in bad["reason"]
    assert "from rank 1: 1 of 1024 checked elements differ" in bad["reason"]
    row = cases.loc["collective.pairwise"].to_dict()
    assert row["status"] == "ok", row["reason"]
    assert row["probe"] == "collective.pairwise" and row["world_size"] == 4
    extra = json.loads(row["extra"])
    matrix = extra["matrix_Bps"]
    assert len(matrix) == 4 and all(len(r) == 4 for r in matrix)
    assert all(matrix[i][i] is None for i in range(4))
    assert all(matrix[i][j] > 0 for i in range(4) for j in range(4) if i != j)
    assert extra["rounds"] == 3 and extra["timed_sweeps"] == 7
    assert len(extra["hosts"]) == 4
    # Every rank's sweep durations are kept (one row per rank per timed sweep).
    samples = pd.read_parquet(run_dir / "samples.parquet")
    assert sorted(samples["rank"].unique()) == [0, 1, 2, 3]

    doc = collect(load_path(run_dir))
    node, link = doc["mode3"]["slowest_node"], doc["mode3"]["slowest_link"]
    touching_2 = {(i, j) for i in range(4) for j in range(4) if i != j and 2 in (i, j)}
    assert {tuple(p) for p in link["flagged_links"]} == touching_2
    assert node["theta"] == 0.25  # the suite's
    assert node["rank"] == 2 and node["value"] < 0.25 and node["slow_nodes"] == [2]
    assert link["slow_links"] == []  # explained by the slow node, not one bad pair
    assert 2 in (link["src"], link["dst"]) and link["value"] < 0.25
    acf = doc["mode3"]["accessible_capacity_fraction"]
    assert acf["value"] == pytest.approx(0.75) and acf["source"] == "pairwise link matrix"
    # Not a collective with a busbw: mode 3's link efficiency does not read it.
    assert row["case_id"] not in doc["mode3"]["link_efficiency"].get("cases", [])
    # The run report draws the matrix (when matplotlib is there; else says why).
    from harness.report.plots import available

    report = (run_dir / "report.html").read_text()
    state = "ok" if available()[0] else "unavailable"
    assert f'data-plot="link-matrix" data-state="{state}"' in report
    assert "slow nodes (rank 2" in report and "θ = 0.25" in report
