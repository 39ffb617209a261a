"""The capacity ladder (INDICATORS.md §1): nominal N, isolated I, coordinated C per
device and resource, the roofline efficiency I / N, and per device the energy
efficiency of its isolated cases (FLOP/J, B/J)."""

from __future__ import annotations

import math

from harness.collector.common import RunView, clean
from harness.results import device_members

ISOLATED_COMPUTE = ("gemm",)
ISOLATED_MEMORY = ("memory",)


def _best(frame, column: str):
    """(value, case_id) of the largest finite value of ``column``; (None, None)."""
    if column not in frame or not len(frame):
        return None, None
    vals = frame[column].astype(float)
    vals = vals[vals.apply(math.isfinite)]
    if not len(vals):
        return None, None
    idx = vals.idxmax()
    return float(vals[idx]), str(frame.loc[idx, "case_id"])


def _rung(nominal, isolated, isolated_case, coordinated=None, coordinated_case=None, unit="", source=None) -> dict:
    return clean({
        "unit": unit,
        "N": nominal,
        "N_source": source,
        "I": isolated,
        "I_case": isolated_case,
        "C": coordinated,
        "C_case": coordinated_case,
        "efficiency": (isolated / nominal) if nominal and isolated is not None else None,
        "efficiency_reason": None if nominal else "no nominal figure for this device and resource",
    })


def isolated_memory(view: RunView, device: str) -> tuple[float | None, str | None]:
    """I_mem: the best isolated memory-probe bandwidth (p50) on the device."""
    ok = view.ok
    mem = ok[(ok["family"].isin(ISOLATED_MEMORY)) & (ok["device"] == device)]
    return _best(mem, "bytes_per_s")


def isolated_link(view: RunView, device: str) -> tuple[float | None, str | None]:
    """I_link: the best busbw of any collective (or peer copy) whose group starts at
    the device."""
    ok = view.ok
    mine = ok[[device_members(d)[0] == device for d in ok["device"]]] if len(ok) else ok
    coll = mine[mine["family"] == "collective"]
    best, case = _best(coll, "busbw_Bps")
    d2d = mine[mine["probe"] == "transfer.d2d"]
    b2, c2 = _best(d2d, "bytes_per_s")
    if b2 is not None and (best is None or b2 > best):
        return b2, c2
    return best, case


def _per_joule(frame, column: str, work: str):
    """The ``column`` (FLOP/J or B/J) of each row: the column where the run has it, else
    ``work`` / ``energy_j`` (both per repetition), NaN where energy is missing."""
    import pandas as pd

    if column in frame:
        vals = pd.to_numeric(frame[column], errors="coerce")
    else:
        vals = pd.Series(float("nan"), index=frame.index)
    if "energy_j" in frame and work in frame:
        energy = pd.to_numeric(frame["energy_j"], errors="coerce")
        derived = pd.to_numeric(frame[work], errors="coerce") / energy.where(energy > 0)
        vals = vals.fillna(derived)
    return vals


def _no_energy_reason(frame, what: str) -> str:
    """Why no case of ``frame`` gives a per-joule figure: none ran, the run predates the
    energy columns, or the cases' recorded ``energy_reason`` (distinct ones, joined)."""
    if not len(frame):
        return f"no {what} case ran ok on the device in this run"
    if "energy_j" not in frame:
        return "the run predates energy accounting (no energy_j column in cases.parquet)"
    reasons = [str(r) for r in frame.get("energy_reason", []) if isinstance(r, str) and r]
    return "; ".join(dict.fromkeys(reasons))[:300] or "energy_j is null for every case and no reason was recorded"


def energy_rungs(view: RunView, dev_id: str) -> dict:
    """Energy efficiency of one device (INDICATORS.md §1, energy): ``flops_per_j``, the
    largest FLOP/J of its isolated compute-bound (gemm) cases, with the FLOP/J of each
    dtype's best case in ``by_dtype``; ``bytes_per_j``, the largest B/J of its isolated
    memory-probe cases. Each an indicator (formulas E.flops_per_j, E.bytes_per_j) citing
    the case it comes from, or not measurable with the reason (no such case, a run made
    before energy accounting, the cases' ``energy_reason``)."""
    from harness.collector.common import indicator, not_measurable

    ok, cfg = view.ok, view.cfg
    mine = ok[ok["device"] == dev_id]
    out = {}
    for key, families, column, work, unit, formula, what in (
            ("flops_per_j", ISOLATED_COMPUTE, "flops_per_j", "flops", "FLOP/J", "E.flops_per_j", "compute-bound (gemm)"),
            ("bytes_per_j", ISOLATED_MEMORY, "bytes_per_j", "bytes", "B/J", "E.bytes_per_j", "memory-probe")):
        cases = mine[mine["family"].isin(families)]
        frame = cases.assign(_per_j=_per_joule(cases, column, work)) if len(cases) else cases
        value, case = _best(frame, "_per_j") if len(frame) else (None, None)
        if value is None or value <= 0:
            out[key] = not_measurable(f"capacity.{key}", unit, formula, _no_energy_reason(cases, what), cfg,
                                      list(cases["case_id"].astype(str))[:20] if len(cases) else [])
            continue
        row = frame[frame["case_id"].astype(str) == case].iloc[0]
        detail = {"energy_method": row.get("energy_method"), "energy_scope": row.get("energy_scope"),
                  "avg_power_w": row.get("avg_power_w")}
        if key == "flops_per_j" and "dtype" in frame:
            by_dtype = {}
            for dt, group in frame.groupby(frame["dtype"].astype(str)):
                v, c = _best(group, "_per_j")
                if v is not None:
                    by_dtype[dt] = {"value": v, "case": c}
            detail["by_dtype"] = by_dtype
            detail["dtype"] = str(row.get("dtype"))
        out[key] = indicator(f"capacity.{key}", value, unit, formula, [case], cfg,
                             **{k: v for k, v in detail.items() if v is not None and v == v})
    return out


def ladder(view: RunView) -> list[dict]:
    out = []
    ok = view.ok
    for dev_id, dev in view.devices.items():
        nom = dev.get("nominal") or {}
        source = f"{nom.get('kind', 'unknown')}: {nom.get('source') or nom.get('row') or ''}".strip()
        mine = ok[ok["device"] == dev_id]
        in_groups = ok[[dev_id in device_members(d) for d in ok["device"]]] if len(ok) else ok
        composites = in_groups[in_groups["family"] == "composite"]
        compute = {}
        dtypes = set((nom.get("compute_flops") or {}).keys())
        gemm = mine[mine["family"].isin(ISOLATED_COMPUTE)]
        if "dtype" in gemm:
            dtypes |= set(gemm["dtype"].dropna().astype(str))
        for dt in sorted(dtypes):
            g = gemm[gemm["dtype"].astype(str) == dt] if "dtype" in gemm else gemm.iloc[0:0]
            i_val, i_case = _best(g, "flops_per_s")
            c = composites[composites["dtype"].astype(str) == dt] if "dtype" in composites else composites.iloc[0:0]
            c_val, c_case = _best(c, "flops_per_s")
            if i_val is None and c_val is None and not (nom.get("compute_flops") or {}).get(dt):
                continue
            compute[dt] = _rung((nom.get("compute_flops") or {}).get(dt), i_val, i_case, c_val, c_case, "FLOP/s", source)
        mem_val, mem_case = isolated_memory(view, dev_id)
        c_mem, c_mem_case = _best(composites, "bytes_per_s")
        link_val, link_case = isolated_link(view, dev_id)
        host = mine[mine["probe"].isin(["transfer.h2d", "transfer.d2h"])]
        host_val, host_case = _best(host, "bytes_per_s")
        out.append({
            "device": dev_id,
            "device_class": dev.get("name") or nom.get("device_class"),
            "nominal_kind": nom.get("kind"),
            "compute": compute,
            "memory": _rung(nom.get("memory_Bps"), mem_val, mem_case, c_mem, c_mem_case, "B/s", source),
            "link": _rung(nom.get("link_Bps"), link_val, link_case, unit="B/s", source=source),
            "host_link": _rung(nom.get("host_link_Bps"), host_val, host_case, unit="B/s", source=source),
            "energy": energy_rungs(view, dev_id),
        })
    return out
