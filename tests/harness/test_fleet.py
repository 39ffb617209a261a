"""Fleet view: robust z-scores within device class (harness.fleet)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from harness.compare import load_config
from harness.fleet import MAD_SCALE, fleet_view
from harness.results import load_path, run_folders
from tests.conftest import coherence
from tests.harness.test_results import make_run

CASES = {"gemm@cpu:0": 2e-3, "mem@cpu:0": 5e-3, "decode@cpu:0": 1e-3}


def node(root, name, rng, slow=1.0, devices=None, indicators=None, cases=CASES):
    """One node's run: every case at its base time × a small node-to-node spread × slow."""
    spread = rng.normal(1.0, 0.01)
    return make_run(root, name, {cid: t * spread * slow * np.exp(rng.normal(0, 0.02, 30)) for cid, t in cases.items()},
                    devices=devices, indicators=indicators)


def view(root, **fleet):
    cfg = load_config()
    cfg["fleet"].update(fleet)
    return fleet_view([load_path(p) for p in run_folders(root)], cfg)


def robust_z(values, min_scale_rel=0.0):
    """(median, MAD, scale, z) of one group through the fleet view's vectorized
    statistics (harness.fleet._group_stats), with no pooling."""
    from harness.fleet import _group_stats

    n = len(values)
    long = pd.DataFrame({"device_class": ["c"] * n, "family": ["f"] * n, "case_id": ["x"] * n, "metric": ["p50_s"] * n,
                         "value": np.asarray(values, dtype=float), "round_se_rel": np.full(n, np.nan)})
    out = _group_stats(long, {"min_scale_rel": min_scale_rel, "pool_scale": "none"})
    return float(out["median"].iloc[0]), float(out["mad"].iloc[0]), float(out["scale"].iloc[0]), out["z"].to_numpy()


def test_robust_z_and_zero_mad():
    med, mad, scale, z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert med == 3.0 and mad == 1.0 and scale == MAD_SCALE
    assert z == pytest.approx([-2 / MAD_SCALE, -1 / MAD_SCALE, 0, 1 / MAD_SCALE, 97 / MAD_SCALE])
    med, mad, scale, z = robust_z(np.array([5.0, 5.0, 5.0, 5.0, 7.0, 3.0]))
    assert mad == 0 and scale == 0 and z[0] == 0 and z[4] == math.inf and z[5] == -math.inf
    assert robust_z(np.array([2.0, 2.0]))[3].tolist() == [0.0, 0.0]
    # The floor: nothing within min_scale_rel·3.5 of the median can be flagged ...
    med, mad, scale, z = robust_z(np.array([100.0, 100.1, 99.9, 100.0, 100.05, 104.0]), 0.02)
    assert scale == pytest.approx(2.0, rel=1e-3) and z[-1] == pytest.approx(2.0, rel=0.01)
    # ... but a tight class with a real outlier still is.
    assert robust_z(np.array([100.0, 100.1, 99.9, 100.0, 100.05, 120.0]), 0.02)[3][-1] == pytest.approx(10.0, rel=0.01)


def test_six_nodes_one_perturbed_flags_exactly_that_one(tmp_path):
    rng = np.random.default_rng(20)
    for i in range(6):
        node(tmp_path, f"n{i}", rng, slow=1.6 if i == 3 else 1.0)
    doc = view(tmp_path)
    assert doc["flagged_nodes"] == ["n3"]
    n3 = next(n for n in doc["nodes"] if n["run_id"] == "n3")
    assert n3["flagged_metrics"] == 6  # p50_s and best_rate of each of the 3 cases
    assert {f["run_id"] for f in doc["flags"]} == {"n3"}
    assert all(f["metric"] in ("p50_s", "best_rate") for f in doc["flags"])
    p50 = [f for f in doc["flags"] if f["metric"] == "p50_s"]
    assert all(f["z"] > 3.5 for f in p50)  # slower: positive z on time, negative on rate
    assert all(f["z"] < -3.5 for f in doc["flags"] if f["metric"] == "best_rate")


def test_one_odd_metric_is_listed_but_flags_the_node_only_under_rule_any(tmp_path):
    rng = np.random.default_rng(26)
    cases = {"gemm.a@cpu:0": 2e-3, "gemm.b@cpu:0": 3e-3, "gemm.c@cpu:0": 4e-3, "memory.copy@cpu:0": 5e-3}
    for i in range(6):
        node(tmp_path, f"n{i}", rng, cases=cases if i != 2 else {**cases, "gemm.c@cpu:0": 8e-3})
    doc = view(tmp_path)
    assert {(f["run_id"], f["case_id"]) for f in doc["flags"]} == {("n2", "gemm.c@cpu:0")}
    assert doc["flagged_nodes"] == []  # gemm median |z| of n2 stays small: one case of three
    n2 = next(n for n in doc["nodes"] if n["run_id"] == "n2")
    assert n2["flagged_metrics"] == 2 and n2["family_median_abs_z"]["gemm"] < 3.5
    assert view(tmp_path, node_rule="any")["flagged_nodes"] == ["n2"]


def test_a_degraded_family_flags_the_node(tmp_path):
    """Memory halved, compute intact: most metrics of the node are fine, but its memory
    family is off as a whole."""
    rng = np.random.default_rng(27)
    cases = {"gemm.a@cpu:0": 2e-3, "gemm.b@cpu:0": 3e-3, "gemm.c@cpu:0": 4e-3, "gemm.d@cpu:0": 1e-3,
             "memory.copy@cpu:0": 5e-3, "memory.triad@cpu:0": 6e-3}
    slow_memory = {k: (2 * v if k.startswith("memory") else v) for k, v in cases.items()}
    for i in range(6):
        node(tmp_path, f"n{i}", rng, cases=slow_memory if i == 4 else cases)
    doc = view(tmp_path)
    assert doc["flagged_nodes"] == ["n4"]
    n4 = next(n for n in doc["nodes"] if n["run_id"] == "n4")
    assert n4["flag_reasons"] and n4["flag_reasons"][0].startswith("memory: median |z|")
    assert n4["family_median_abs_z"]["gemm"] < 3.5


def test_a_run_level_indicator_alone_flags_the_node(tmp_path):
    rng = np.random.default_rng(28)
    for i in range(6):
        eps = 0.2 if i == 1 else 0.6 + 0.01 * i
        node(tmp_path, f"n{i}", rng, indicators={"epsilon": eps, "C_eff": 600 + 10 * i if i != 1 else 200.0,
                                                 "C_nom": 1000.0})
    doc = view(tmp_path)
    assert doc["flagged_nodes"] == ["n1"]
    n1 = next(n for n in doc["nodes"] if n["run_id"] == "n1")
    assert any(r.startswith("epsilon |z|") for r in n1["flag_reasons"])


def noisy_fleet(root, memory_factors, slow_node=None):
    """Six nodes whose gemm and decode cases scatter ±15 % node to node (a noisy machine:
    every run lands in its own state), and whose two memory cases take the factors given
    per node (the same for both cases); ``slow_node`` runs everything 2× slower (a hog)."""
    rng = np.random.default_rng(40)
    noisy = {"gemm.a@cpu:0": 2e-3, "gemm.b@cpu:0": 3e-3, "gemm.c@cpu:0": 4e-3,
             "decode.a@cpu:0": 1e-3, "decode.b@cpu:0": 1.5e-3, "decode.c@cpu:0": 2.5e-3}
    for i, mem in enumerate(memory_factors):
        slow = 2.0 if i == slow_node else 1.0
        cases = {cid: t * slow * math.exp(rng.normal(0, 0.15)) * np.exp(rng.normal(0, 0.01, 30))
                 for cid, t in noisy.items()}
        for cid, t in {"memory.copy@cpu:0": 5e-3, "memory.triad@cpu:0": 6e-3}.items():
            cases[cid] = t * slow * mem * np.exp(rng.normal(0, 0.01, 30))
        make_run(root, f"n{i}", cases)


def test_small_class_pools_the_known_node_noise(tmp_path):
    """Four of six nodes agree on memory to 0.3 % by chance and n4 is 25 % off — within
    what every other case shows nodes of this class scatter (±15 %). The bare MAD (and
    the 2 % floor) call n4's memory family an outlier; the pooled class noise does not.
    A node 2× slower everywhere is still flagged, and alone."""
    noisy_fleet(tmp_path / "a", [1.0, 1.003, 0.998, 1.001, 1.25, 0.97])
    bare = view(tmp_path / "a", pool_scale="none")
    assert bare["flagged_nodes"] == ["n4"]
    doc = view(tmp_path / "a")
    assert doc["flagged_nodes"] == []
    table = doc["long"]
    mem = table[(table["family"] == "memory") & (table["metric"] == "p50_s")]
    assert (mem["scale_source"] == "class median of 1.4826·MAD/median").all()
    assert (mem["scale_floor_rel"] > 0.08).all()  # about the class's ±15 %
    n4 = next(n for n in doc["nodes"] if n["run_id"] == "n4")
    assert n4["family_median_abs_z"]["memory"] < 3.5
    noisy_fleet(tmp_path / "b", [1.0, 1.003, 0.998, 1.001, 1.02, 0.97], slow_node=2)
    assert view(tmp_path / "b")["flagged_nodes"] == ["n2"]


def test_unperturbed_fleet_flags_nothing(tmp_path):
    rng = np.random.default_rng(21)
    for i in range(6):
        node(tmp_path, f"n{i}", rng)
    doc = view(tmp_path)
    assert doc["flagged_nodes"] == [] and doc["flags"] == []


def test_z_scores_are_computed_within_device_class(tmp_path):
    """Five fast nodes and two of a class ten times slower: pooled, the slow ones would be
    outliers; within their own class they are not."""
    rng = np.random.default_rng(22)
    for i in range(5):
        node(tmp_path, f"fast{i}", rng, devices=[{"id": "cpu:0", "type": "cpu", "name": "Fast CPU"}])
    for i in range(2):
        node(tmp_path, f"slow{i}", rng, slow=10.0, devices=[{"id": "cpu:0", "type": "cpu", "name": "Slow CPU"}])
    doc = view(tmp_path)
    assert doc["classes"] == {"Fast CPU": 5, "Slow CPU": 2}
    assert doc["flagged_nodes"] == []
    table = doc["long"]
    assert set(table.loc[table["run_id"].str.startswith("slow"), "device_class"]) == {"Slow CPU"}
    assert set(table.loc[table["run_id"].str.startswith("slow"), "n_nodes"]) == {2}


def test_identical_values_do_not_divide_by_zero(tmp_path):
    for i in range(5):
        make_run(tmp_path, f"n{i}", {"timer@cpu:0": [60e-9] * 20})
    make_run(tmp_path, "odd", {"timer@cpu:0": [70e-9] * 20})
    doc = view(tmp_path, metrics=["p50_s"], min_scale_rel=0.0)  # the bare formula
    table = doc["long"].set_index("run_id")
    assert table.loc["n0", "z"] == 0 and table.loc["n0", "mad"] == 0
    assert table.loc["odd", "z"] == math.inf
    assert doc["flagged_nodes"] == ["odd"]
    doc = view(tmp_path, metrics=["p50_s"])  # default floor: 2 % of 60 ns
    table = doc["long"].set_index("run_id")
    assert table.loc["n0", "z"] == 0 and table.loc["odd", "z"] == pytest.approx((10 / 60) / 0.02)
    assert doc["flagged_nodes"] == ["odd"]


def test_capacity_sum_and_cost_per_effective_token(tmp_path):
    rng = np.random.default_rng(23)
    gpus = [{"id": f"cuda:{i}", "type": "cuda", "name": "NVIDIA H100"} for i in range(2)]
    for i, (eff, nom) in enumerate([(1000.0, 4000.0), (3000.0, 4000.0)]):
        node(tmp_path, f"n{i}", rng, devices=gpus, cases={"gemm@cuda:0": 1e-3},
             indicators={"capacity": {"C_eff": {"value": eff, "unit": "tokens/s"}, "C_nom": nom, "epsilon": eff / nom}})
    doc = view(tmp_path, price_per_device_hour={"NVIDIA H1*": 3.6})
    cap = doc["capacity"]
    assert cap["measurable"] and cap["sum_C_eff"] == 4000.0 and cap["sum_C_nom"] == 8000.0
    assert cap["epsilon"] == pytest.approx(0.5)
    # 2 nodes × 2 devices × 3.6 per hour = 14.4/h = 0.004/s over 4000 effective tokens/s
    assert cap["cost"]["per_effective_token"] == pytest.approx(0.004 / 4000)
    assert cap["cost"]["per_nominal_token"] == pytest.approx(0.004 / 8000)
    eps = doc["long"][doc["long"]["metric"] == "epsilon"]
    assert sorted(eps["value"]) == [0.25, 0.75] and set(eps["device_class"]) == {"NVIDIA H100"}
    assert not view(tmp_path)["capacity"]["cost"]["measurable"]  # no price configured


def test_capacity_without_indicators_is_not_measurable(tmp_path):
    rng = np.random.default_rng(24)
    for i in range(3):
        node(tmp_path, f"n{i}", rng)
    cap = view(tmp_path, price_per_device_hour=2.0)["capacity"]
    assert cap == {"measurable": False, "reason": "not measurable: no indicators.json in 3 of 3 runs", "nodes": 0}


def test_cli_fleet_outputs_and_exit_codes(tmp_path):
    rng = np.random.default_rng(25)
    runs = tmp_path / "runs"
    for i in range(6):
        node(runs, f"n{i}", rng, slow=2.0 if i == 5 else 1.0)
    csv, pq = tmp_path / "fleet.csv", tmp_path / "fleet.parquet"
    proc = coherence("fleet", str(runs), "--csv", str(csv), "--parquet", str(pq))
    assert proc.returncode == 0, proc.stderr
    assert "1 of 6 nodes flagged: n5" in proc.stdout
    assert "not measurable" in proc.stdout
    table = pd.read_csv(csv)
    assert {"run_id", "device_class", "case_id", "metric", "value", "median", "mad", "z", "flagged"} <= set(table.columns)
    assert len(table) == 6 * 3 * 2 and set(table.loc[table["flagged"], "run_id"]) == {"n5"}
    assert pd.read_parquet(pq).shape == table.shape
    # Runs given one by one (and one twice) work the same; --json is machine-readable.
    proc = coherence("fleet", *[str(runs / f"n{i}") for i in range(6)], str(runs / "n0"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["flagged_nodes"] == ["n5"] and len(doc["nodes"]) == 6
    for args in (["nope"], [str(runs), "--csv", str(tmp_path / "missing" / "x.csv")]):
        proc = coherence("fleet", *args, "--results", str(tmp_path))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def _set_round_p50(path, per_case: dict):
    c = pd.read_parquet(path / "cases.parquet")
    c["round_p50_s"] = [json.dumps(per_case.get(cid, [])) for cid in c["case_id"]]
    c["rounds"] = [len(per_case.get(cid, [])) for cid in c["case_id"]]
    c.to_parquet(path / "cases.parquet", index=False)


def test_node_round_variance_widens_its_own_z(tmp_path):
    """Six nodes; node n5 is 25 % slower on every case. Without rounds it is flagged.
    When its own rounds disagree by ±30 % (se of the log p50 ≈ 0.3/sqrt(3)), the 25 %
    offset is within its noise: z divides by the fleet scale and that se in quadrature,
    and n5 is not flagged by its p50 (its best sample, a different metric, still is)."""
    rng = np.random.default_rng(50)
    paths = [node(tmp_path, f"n{i}", rng, slow=1.25 if i == 5 else 1.0) for i in range(6)]
    doc = view(tmp_path, metrics=["p50_s"])
    assert doc["flagged_nodes"] == ["n5"]
    assert doc["long"]["round_se_rel"].isna().all()
    run = load_path(paths[5])
    _set_round_p50(paths[5], {cid: [p * 0.7, p * 1.0, p * 1.3] for cid, p in zip(run.cases["case_id"], run.cases["p50_s"])})
    doc = view(tmp_path, metrics=["p50_s"])
    assert doc["flagged_nodes"] == []
    mine = doc["long"][(doc["long"]["run_id"] == "n5") & (doc["long"]["metric"] == "p50_s")]
    se = np.std(np.log([0.7, 1.0, 1.3]), ddof=1) / math.sqrt(3)
    assert mine["round_se_rel"].to_numpy() == pytest.approx([se] * len(mine))
    assert all(s.endswith("+ node round se") for s in mine["scale_source"])
    row = mine.iloc[0]
    assert row["z"] == pytest.approx((row["value"] - row["median"]) / math.hypot(row["scale"], se * row["median"]))
    # best_rate has no per-round figure: its z is the plain one (and still flags n5)
    doc = view(tmp_path)
    best = doc["long"][(doc["long"]["run_id"] == "n5") & (doc["long"]["metric"] == "best_rate")]
    assert best["round_se_rel"].isna().all() and best["flagged"].all()


def test_fleet_reads_summaries_only_and_lists_unloadable_nodes(tmp_path):
    """The fleet view reads manifest, cases and indicators only: samples.parquet made
    garbage does not matter. A node of a newer schema or with a damaged manifest is
    listed with its reason and the view goes on (exit 0)."""
    from harness.results import SCHEMA_VERSION

    runs = tmp_path / "runs"
    rng = np.random.default_rng(9)
    for i in range(5):
        node(runs, f"n{i}", rng, slow=2.0 if i == 4 else 1.0)
    for i in range(5):
        (runs / f"n{i}" / "samples.parquet").write_bytes(b"not parquet at all")
    newer = json.loads((runs / "n1" / "manifest.json").read_text())
    newer["schema_version"] = SCHEMA_VERSION + 1
    (runs / "n1" / "manifest.json").write_text(json.dumps(newer))
    (runs / "n2" / "manifest.json").write_text("{ damaged")
    proc = coherence("fleet", str(runs), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [n["run_id"] for n in doc["nodes"]] == ["n0", "n3", "n4"]
    assert doc["flagged_nodes"] == ["n4"]
    reasons = {s["run_id"]: s["reason"] for s in doc["skipped"]}
    assert set(reasons) == {"n1", "n2"}
    assert "newer" in reasons["n1"] and "manifest.json" in reasons["n2"]
    # A damaged cases.parquet (the dataset scan fails): read node by node, that node
    # named; a table with a duplicated case id: named too.
    (runs / "n3" / "cases.parquet").write_bytes(b"PAR1 garbage")
    cases = pd.read_parquet(runs / "n0" / "cases.parquet")
    pd.concat([cases, cases.iloc[:1]]).to_parquet(runs / "n0" / "cases.parquet")
    doc = json.loads(coherence("fleet", str(runs), "--json").stdout)
    reasons = {s["run_id"]: s["reason"] for s in doc["skipped"]}
    assert [n["run_id"] for n in doc["nodes"]] == ["n4"] and set(reasons) == {"n0", "n1", "n2", "n3"}
    assert "n3/cases.parquet: unreadable" in reasons["n3"] and "appears more than once" in reasons["n0"]
    proc = coherence("fleet", str(runs))
    assert proc.returncode == 0 and "node n1 left out" in proc.stdout and "node n2 left out" in proc.stdout


def test_round_se_of_a_column_matches_one_by_one():
    from harness.fleet import round_se_rel, round_se_rels

    texts = ["[0.1,0.2,0.3]", "[1,2]", "[]", None, "[0.1,null,0.3]", "[0,1,2]", "[0.5,0.6,0.7]", "bad", '["x",1]',
             "[0.2,0.2,0.2]"]
    one = np.array([round_se_rel({"round_p50_s": t}) for t in texts])
    assert np.allclose(round_se_rels(texts), one, equal_nan=True)
    assert np.isnan(one[2]) and one[-1] == 0.0 and one[0] == pytest.approx(np.std(np.log([0.1, 0.2, 0.3]), ddof=1) / 3 ** 0.5)


def test_a_copy_of_one_run_counts_once(tmp_path):
    """Two folders holding the same run (same run id) would count one node twice; the
    second is listed as left out with the reason."""
    import shutil

    from harness.compare import load_config
    from harness.fleet import fleet_view_paths

    runs = tmp_path / "runs"
    rng = np.random.default_rng(11)
    for i in range(4):
        node(runs, f"n{i}", rng)
    shutil.copytree(runs / "n3", runs / "n3-copy")
    doc = fleet_view_paths(run_folders(runs), load_config())
    assert [n["run_id"] for n in doc["nodes"]] == ["n0", "n1", "n2", "n3"]
    (skip,) = doc["skipped"]
    assert skip["run_id"] == "n3-copy" and "same run id n3" in skip["reason"]
