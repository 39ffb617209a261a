"""Findings made by the harness's own setup: CPU ranks that outnumber the usable cores.

A multi-rank CPU case (Gloo ranks, one process each) with more ranks than the cores it
may run on time-slices its ranks: every collective then waits for a rank the scheduler
has parked, which reads as a slow interconnect or a straggler although no link is
involved. Such a case is marked oversubscribed; the indicators built only from such
cases keep their value but are not judged (verdict ``info``, ``not_judged`` true, the
verdict they would have had in ``verdict_if_judged``). Where an indicator is the worst
over several cases, the worst is taken over the cases that are not oversubscribed.
"""

from __future__ import annotations

import math

from harness.collector.common import verdict
from harness.results import device_members, json_object


def usable_cores(manifest: dict) -> tuple[float | None, str]:
    """(cores the run's processes may use, how that was found) from the manifest's
    environment: logical CPUs of the affinity set (``cpu.usable_cores``, else
    ``cpu.logical_cores``), capped by the cgroup CPU quota (``cpu.cgroup_cpu_limit_cores``,
    rounded down, at least 1). (None, reason) when the environment does not say."""
    cpu = ((manifest or {}).get("environment") or {}).get("cpu") or {}

    def value(key):
        node = cpu.get(key)
        v = node.get("value") if isinstance(node, dict) else node
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None

    cores, how = value("usable_cores"), "usable_cores (affinity set)"
    if cores is None:
        cores, how = value("logical_cores"), "logical_cores"
    limit = value("cgroup_cpu_limit_cores")
    if limit is not None and (cores is None or limit < cores):
        cores, how = max(1, math.floor(limit)), f"cgroup CPU quota {limit:g}"
    if cores is None:
        return None, "the manifest records no core count"
    return float(cores), how


def case_ranks(row: dict) -> int:
    """The number of ranks (processes) a case ran: its device group's members or its
    ``world_size`` parameter, whichever is larger; 1 for a single-device case."""
    members = len(device_members(str(row.get("device") or "")))
    params = json_object(row.get("params"))
    ws = params.get("world_size")
    ws = int(ws) if isinstance(ws, (int, float)) and not isinstance(ws, bool) else 1
    return max(members, ws, 1)


def oversubscribed_cases(manifest: dict, cases: list[dict]) -> dict[str, dict]:
    """case_id -> {"ranks", "usable_cores", "source"} for every multi-rank case on CPU
    devices only whose ranks outnumber the usable cores (:func:`usable_cores`). Cases on
    accelerators, single-rank cases, and runs whose core count is unknown give {}."""
    cores, how = usable_cores(manifest)
    if cores is None:
        return {}
    out = {}
    for row in cases:
        members = device_members(str(row.get("device") or ""))
        if not all(m.split(":")[0] == "cpu" for m in members):
            continue
        ranks = case_ranks(row)
        if ranks > 1 and ranks > cores:
            out[str(row["case_id"])] = {"ranks": ranks, "usable_cores": cores, "source": how}
    return out


def _item_cases(item: dict) -> list[str]:
    return [str(c) for c in item.get("case_ids") or ([item["case_id"]] if item.get("case_id") else [])]


def _per_case(ind: dict) -> tuple[str, list[dict]] | tuple[None, None]:
    """The detail list an indicator was picked from (items with value and case ids)."""
    for key, items in ind.items():
        if (isinstance(items, list) and items and all(isinstance(i, dict) for i in items)
                and all("value" in i and _item_cases(i) for i in items)):
            return key, items
    return None, None


def _aggregate(summary: str, threshold: dict | None):
    """How an indicator summarised its per-case values (its ``summary`` text): median,
    mean, or the worst by its threshold's direction; None when that cannot be told."""
    import statistics

    text = (summary or "").lower()
    if text.startswith("median"):
        return statistics.median
    if text.startswith("mean"):
        return statistics.fmean
    if threshold and threshold.get("better") in ("lower", "higher") and (
            not text or text.startswith(("largest", "lowest", "worst", "highest", "smallest"))):
        pick = max if threshold["better"] == "lower" else min
        return lambda values: pick(values)
    return None


# Modes whose indicators read waits between ranks as a fault (mode 1 stragglers, mode 3
# links): built in part from oversubscribed cases without a per-case breakdown, they are
# not judged. Other modes' aggregates (mode 4 noise over every case) keep their verdict.
RANK_MODES = ("mode1.", "mode3.")


def judge(ind: dict, over: dict[str, dict]) -> dict:
    """``ind`` (an indicator as common.indicator writes it) with oversubscribed cases
    taken out of its verdict. Returns a new dict; ``ind`` is not changed.

    With a per-case breakdown, the value is summarised again (median, mean or worst, as
    its ``summary`` says) over the cases that are not oversubscribed and judged; the value
    with them stays in ``value_with_oversubscribed``. Built from oversubscribed cases only
    (or, for modes 1 and 3, in part without a breakdown), the value is kept and not judged:
    verdict ``info``, ``not_judged`` true, ``verdict_if_judged`` the verdict it had."""
    cases = [str(c) for c in ind.get("cases") or []]
    hit = [c for c in cases if c in over]
    if not hit or ind.get("value") is None or isinstance(ind.get("value"), str):
        return ind
    out = dict(ind)
    th = ind.get("threshold") if isinstance(ind.get("threshold"), dict) else None
    _, items = _per_case(ind)
    clean = [i for i in items or [] if not any(c in over for c in _item_cases(i))
             and isinstance(i.get("value"), (int, float))]
    first = over[hit[0]]
    out["oversubscribed"] = {"cases": hit, "ranks": max(over[c]["ranks"] for c in hit),
                             "usable_cores": first["usable_cores"]}
    prefix = (ind.get("note") + "; ") if ind.get("note") else ""
    agg = _aggregate(str(ind.get("summary") or ""), th)
    if clean and agg is not None:
        value = float(agg([i["value"] for i in clean]))
        out["value_with_oversubscribed"] = ind["value"]
        out["value"] = value
        out["verdict"] = verdict(value, th)
        out["note"] = prefix + f"judged without {len(hit)} oversubscribed case(s) (more CPU ranks than usable cores)"
        return out
    mixed = len(hit) < len(cases)
    if mixed and not str(ind.get("id") or "").startswith(RANK_MODES):
        out["note"] = prefix + f"includes {len(hit)} oversubscribed case(s) (more CPU ranks than usable cores)"
        return out
    out["verdict_if_judged"] = ind.get("verdict")
    out["verdict"] = "info"
    out["not_judged"] = True
    out["note"] = prefix + (f"not judged: {first['ranks']} CPU ranks on {first['usable_cores']:g} usable cores "
                            "(oversubscribed; the harness's setup, not the interconnect)")
    return out
