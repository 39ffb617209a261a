"""harness.collector.links: slow links, slow nodes and the accessible fraction of a
pairwise link matrix (INDICATORS.md mode 3), on matrices built by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.collector.links import link_findings, matrix_array, rank_labels, report_inputs

FAST, SLOW = 10e9, 1e9


def uniform(n: int, bw: float = FAST) -> list[list[float | None]]:
    return [[None if i == j else bw for j in range(n)] for i in range(n)]


def test_a_uniform_matrix_flags_nothing():
    found = link_findings(uniform(4))
    assert found["group_median_Bps"] == FAST
    assert found["flagged_links"] == [] and found["slow_nodes"] == [] and found["slow_links"] == []
    assert found["accessible_fraction"] == 1.0
    assert found["slowest_link"]["ratio"] == 1.0 and found["slowest_node"]["ratio"] == 1.0
    assert len(found["links"]) == 12


@pytest.mark.parametrize("n", [3, 4, 8])
def test_a_slow_node_flags_its_links_both_ways_and_nothing_else(n):
    m = uniform(n)
    for k in range(n):
        if k != 1:
            m[1][k] = m[k][1] = SLOW
    found = link_findings(m)
    want = {(i, j) for i in range(n) for j in range(n) if i != j and 1 in (i, j)}
    assert set(found["flagged_links"]) == want
    assert found["slow_nodes"] == [1] and found["slow_links"] == []
    assert found["slowest_node"]["rank"] == 1
    assert found["slowest_node"]["ratio"] == pytest.approx(SLOW / found["group_median_Bps"])
    # From 4 ranks up the others' median link is a fast one, so the group median is
    # the fast figure; at 3 half of each other node's links touch the slow node.
    assert found["group_median_Bps"] == (FAST if n >= 4 else (FAST + SLOW) / 2)
    assert found["accessible_fraction"] == pytest.approx((n - 1) / n)


def test_one_slow_direction_is_a_slow_link_not_a_slow_node():
    m = uniform(4)
    m[0][3] = SLOW  # 0 -> 3 only
    found = link_findings(m)
    assert found["flagged_links"] == [(0, 3)] and found["slow_links"] == [(0, 3)]
    assert found["slow_nodes"] == []
    assert found["slowest_link"]["src"] == 0 and found["slowest_link"]["dst"] == 3
    assert found["slowest_link"]["ratio"] == pytest.approx(0.1)
    assert found["accessible_fraction"] == 1.0


def test_theta_sets_the_line():
    m = uniform(4)
    m[0][3] = 0.6 * FAST
    assert link_findings(m, theta=0.5)["flagged_links"] == []
    assert link_findings(m, theta=0.7)["flagged_links"] == [(0, 3)]


def test_unmeasured_cells_are_left_out():
    m = uniform(3)
    m[0][1] = None
    m[1][0] = float("nan")
    m[2][0] = 0
    arr = matrix_array(m)
    assert sum(1 for i in range(3) for j in range(3) if arr[i, j] == arr[i, j]) == 3
    assert len(link_findings(m)["links"]) == 3


@pytest.mark.parametrize("bad", [None, [], [[None]], [[None, 1.0], [1.0]], [[None, None], [None, None]], "x"])
def test_a_damaged_matrix_raises_value_error(bad):
    with pytest.raises(ValueError):
        link_findings(bad)


def test_labels_name_host_and_device():
    assert rank_labels({"hosts": ["a", "b"], "devices": ["cuda:0", "cuda:1"]}) == [
        "rank 0 (a, cuda:0)", "rank 1 (b, cuda:1)"]
    assert rank_labels({}) is None
    assert link_findings(uniform(2), labels=["x", "y"])["slowest_link"]["link"] in ("x → y", "y → x")


def test_report_inputs_pick_the_case_mode_3_used():
    m = uniform(4)
    m[2][0] = SLOW
    cases = pd.DataFrame([
        {"case_id": "small", "probe": "collective.pairwise", "status": "ok", "world_size": 2, "bytes": 8.0,
         "extra": json.dumps({"matrix_Bps": uniform(2), "size_bytes": 4})},
        {"case_id": "big", "probe": "collective.pairwise", "status": "ok", "world_size": 4, "bytes": 48.0,
         "extra": json.dumps({"matrix_Bps": m, "size_bytes": 4, "hosts": ["h"] * 4})},
        {"case_id": "other", "probe": "collective.all_reduce", "status": "ok", "world_size": 4, "bytes": 4.0,
         "extra": "{}"},
    ])
    lm = report_inputs(cases)  # no indicators: the widest matrix
    assert lm["case_id"] == "big" and lm["flagged"] == [[2, 0]] and lm["slow_nodes"] == []
    assert lm["labels"][0] == "rank 0 (h)"
    doc = {"mode3": {"slowest_link": {"matrix_case": "small"}}, "config": {"accessible_theta": 0.5}}
    assert report_inputs(cases, doc)["case_id"] == "small"
    assert report_inputs(cases[cases["probe"] != "collective.pairwise"]) is None
    assert report_inputs(pd.DataFrame()) is None


# -- mode 3 over a whole (synthetic) run ---------------------------------------------------
def _run(tmp_path, extra: dict | None):
    from tests.harness.test_collector import case, make_run, samples

    rows = [case("mem", "memory.copy", "memory", "cuda:0", {"size_bytes": 1}, 0.01, nbytes=1e6)]
    if extra is not None:
        rows.append(case("pw", "collective.pairwise", "collective", "cuda:0-3", {"size_bytes": 4, "world_size": 4},
                         0.5, nbytes=48.0, extra=extra, world_size=4, bound="link"))
    rows_s = samples("mem", [0.01] * 5)
    if extra is not None:
        rows_s += samples("pw", [0.5] * 3, ranks=4)
    return make_run(rows, rows_s, tmp_path)


def test_mode3_reads_the_matrix_of_a_gpu_group(tmp_path):
    from harness.collector import collect

    m = uniform(4)
    for k in range(3):
        m[3][k] = m[k][3] = SLOW
    doc = collect(_run(tmp_path, {"matrix_Bps": m, "hosts": ["n1"] * 4, "devices": [f"cuda:{i}" for i in range(4)]}))
    node, link, acf = (doc["mode3"][k] for k in ("slowest_node", "slowest_link", "accessible_capacity_fraction"))
    assert node["rank"] == 3 and node["value"] == pytest.approx(0.1) and node["verdict"] == "fail"
    assert node["node"] == "rank 3 (n1, cuda:3)" and node["cases"] == ["pw"]
    assert link["value"] == pytest.approx(0.1) and link["slow_links"] == [] and len(link["flagged_links"]) == 6
    assert acf["value"] == pytest.approx(0.75) and acf["source"] == "pairwise link matrix"
    assert "note" not in node  # devices, not CPU ranks sharing one host


def test_mode3_without_a_matrix_says_so(tmp_path):
    from harness.collector import collect

    doc = collect(_run(tmp_path, None))  # a run written before the pairwise probe existed
    for name in ("slowest_link", "slowest_node"):
        ind = doc["mode3"][name]
        assert ind["value"] is None and ind["verdict"] == "not measurable"
        assert "no collective.pairwise case" in ind["reason"]
    assert doc["mode3"]["accessible_capacity_fraction"].get("source") is None  # the transfer-based path
    damaged = collect(_run(tmp_path, {"matrix_Bps": [[None, 1.0]]}))["mode3"]["slowest_link"]
    assert damaged["value"] is None and "pw" in damaged["reason"] and "square" in damaged["reason"]
