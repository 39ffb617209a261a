"""Findings made by the harness's own setup: CPU ranks outnumbering the usable cores are
marked oversubscribed and their indicators are reported but not judged; the headline
capacity is the best configuration measured, the loss from scaling out its own entry."""

from __future__ import annotations

import pytest

from harness.collector import best_capacity, collect
from harness.collector.oversubscribe import case_ranks, judge, oversubscribed_cases, usable_cores
from tests.harness.test_collector import tp_run


def env(usable=None, logical=None, quota=None) -> dict:
    cpu = {}
    if usable is not None:
        cpu["usable_cores"] = {"value": usable, "source": "os.sched_getaffinity(0)"}
    if logical is not None:
        cpu["logical_cores"] = {"value": logical, "source": "/proc/cpuinfo"}
    cpu["cgroup_cpu_limit_cores"] = {"value": quota, "source": "cpu.max"}
    return {"environment": {"cpu": cpu}}


def test_usable_cores_from_affinity_capped_by_the_cgroup_quota():
    assert usable_cores(env(usable=8))[0] == 8
    assert usable_cores(env(logical=4))[0] == 4
    cores, how = usable_cores(env(usable=8, quota=2.5))
    assert cores == 2 and "quota" in how  # 2.5 CPUs of time hold 2 ranks without sharing
    assert usable_cores(env(usable=8, quota=0.5))[0] == 1
    assert usable_cores({})[0] is None


def test_only_cpu_groups_with_more_ranks_than_cores_are_oversubscribed():
    rows = [
        {"case_id": "a", "device": "cpu:0-3", "params": '{"world_size": 4}'},
        {"case_id": "b", "device": "cpu:0-1", "params": '{"world_size": 2}'},
        {"case_id": "c", "device": "cpu:0", "params": "{}"},
        {"case_id": "d", "device": "cuda:0-3", "params": '{"world_size": 4}'},  # four GPUs: no core limit
        {"case_id": "e", "device": "cpu:0", "params": '{"world_size": 3}'},  # ranks named by the parameter
    ]
    over = oversubscribed_cases(env(usable=2), rows)
    assert set(over) == {"a", "e"}
    assert over["a"] == {"ranks": 4, "usable_cores": 2.0, "source": "usable_cores (affinity set)"}
    assert oversubscribed_cases(env(usable=4), rows) == {}
    assert oversubscribed_cases({}, rows) == {}  # core count unknown: nothing is claimed
    assert case_ranks(rows[1]) == 2 and case_ranks(rows[2]) == 1


TH = {"better": "higher", "warn": 0.8, "fail": 0.5}


def test_an_indicator_of_oversubscribed_cases_only_is_reported_not_judged():
    ind = {"id": "mode3.link_efficiency", "value": 0.1, "verdict": "fail", "threshold": TH, "cases": ["a"]}
    over = {"a": {"ranks": 4, "usable_cores": 2.0, "source": "x"}}
    out = judge(ind, over)
    assert out["value"] == 0.1  # still reported
    assert out["verdict"] == "info" and out["not_judged"] and out["verdict_if_judged"] == "fail"
    assert "4 CPU ranks on 2 usable cores" in out["note"]
    assert ind["verdict"] == "fail"  # the input is left as it was
    assert judge(ind, {}) is ind


def test_the_worst_case_is_taken_over_the_cases_that_are_not_oversubscribed():
    items = [{"case_id": "a", "value": 0.1}, {"case_id": "b", "value": 0.9}, {"case_id": "c", "value": 0.6}]
    ind = {"value": 0.1, "verdict": "fail", "threshold": TH, "cases": ["a", "b", "c"], "per_case": items}
    out = judge(ind, {"a": {"ranks": 4, "usable_cores": 2.0, "source": "x"}})
    assert out["value"] == 0.6 and out["verdict"] == "warn" and out["value_with_oversubscribed"] == 0.1
    assert not out.get("not_judged") and "without 1 oversubscribed" in out["note"]


def _cpu(run, usable):
    """tp_run's two-rank step moved to CPU ranks on a machine with ``usable`` cores."""
    run.cases["device"] = run.cases["device"].str.replace("cuda", "cpu")
    run.manifest["devices"] = [{**d, "id": d["id"].replace("cuda", "cpu"), "type": "cpu"}
                               for d in run.manifest["devices"]]
    run.manifest["environment"]["cpu"] = {"usable_cores": {"value": usable, "source": "test"}}
    return run


def test_collect_marks_the_oversubscribed_step_and_keeps_its_figures(tmp_path):
    judged = collect(_cpu(tp_run(tmp_path)[0], usable=2))
    assert judged["oversubscribed"] == {}
    run, k = tp_run(tmp_path / "one-core")
    doc = collect(_cpu(run, usable=1))
    assert set(doc["oversubscribed"]) >= {k["tp"]}
    before, after = judged["mode1"]["straggler_penalty"], doc["mode1"]["straggler_penalty"]
    assert before["verdict"] in ("warn", "fail")  # the slow rank of tp_run is a finding on 2 cores
    assert after["value"] == pytest.approx(before["value"]) and after["not_judged"]
    assert after["verdict"] == "info" and after["verdict_if_judged"] == before["verdict"]
    entry = next(e for e in doc["serving"] if e["case_id"] == k["tp"])
    assert entry["oversubscribed"] == "2 CPU ranks on 1 usable cores"
    from harness.results import indicator_leaves

    assert not any("oversubscribed" in path for path in indicator_leaves(doc))  # bookkeeping, not a figure
    assert doc["summary"].get("not judged", 0) >= 1
    assert doc["summary"].get(before["verdict"], 0) < judged["summary"][before["verdict"]]


def _entry(case_id, ws, c_eff, probe="composite.tp_decode_step"):
    return {"case_id": case_id, "probe": probe, "params": {"model": "tiny", "world_size": ws},
            "C_eff": {"value": c_eff}, "C_nom": {"value": 1000.0}, "epsilon": {"value": c_eff / 1000.0}}


def test_headline_capacity_is_the_best_configuration_and_scaling_out_is_its_own_finding():
    entries = [_entry("ws2", 2, 81.0), _entry("ws1", 1, 162.0), _entry("ws4", 4, 40.0)]
    cap = best_capacity(entries)
    assert cap["from_case"] == "ws1" and cap["C_eff"] == 162.0 and cap["world_size"] == 1
    losses = {s["to_case"]: s for s in cap["scaling"]}
    assert set(losses) == {"ws2", "ws4"}
    assert losses["ws2"]["ratio"] == pytest.approx(0.5) and "162 tok/s at world size 1" in losses["ws2"]["sentence"]
    # An oversubscribed configuration never becomes the headline while another was measured.
    over = {"ws1": {"ranks": 1, "usable_cores": 1.0, "source": "x"}}
    assert best_capacity(entries, over)["from_case"] == "ws2"
    # Scaling that gains is no loss.
    assert best_capacity([_entry("a", 1, 100.0), _entry("b", 2, 180.0)])["scaling"] == []
    assert best_capacity([])["C_eff"] is None


def test_a_median_or_mean_is_taken_again_and_other_modes_keep_their_verdict():
    over = {"a": {"ranks": 4, "usable_cores": 2.0, "source": "x"}}
    items = [{"case_id": "a", "value": 100.0}, {"case_id": "b", "value": 1.0}, {"case_id": "c", "value": 2.0},
             {"case_id": "d", "value": 3.0}]
    tail = {"id": "mode4.tail_weight", "value": 2.5, "verdict": "warn", "summary": "median over cases",
            "threshold": {"better": "lower", "warn": 1.5, "fail": 3.0}, "cases": ["a", "b", "c", "d"],
            "per_case": items}
    out = judge(tail, over)
    assert out["value"] == 2.0 and out["verdict"] == "warn" and out["value_with_oversubscribed"] == 2.5
    assert judge({**tail, "summary": "mean over cases"}, over)["value"] == pytest.approx(2.0)
    # Noise over the whole run with no breakdown: still judged, the share noted.
    steal = {"id": "mode4.steal_share", "value": 0.2, "verdict": "fail", "cases": ["a", "b"], "threshold": None}
    kept = judge(steal, over)
    assert kept["verdict"] == "fail" and "includes 1 oversubscribed" in kept["note"]
    # Waits between ranks with no breakdown: not judged.
    strag = {**steal, "id": "mode1.straggler_penalty"}
    assert judge(strag, over)["not_judged"] and judge(strag, over)["verdict_if_judged"] == "fail"
