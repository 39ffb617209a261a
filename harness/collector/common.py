"""What every part of the collector shares: the run's tables in a convenient shape,
the thresholds, and the one way an indicator is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from harness.collector.formulas import FORMULAS, finite
from harness.checks import check_number
from harness.errors import UserError
from harness.results import json_object

DEFAULTS_PATH = Path(__file__).resolve().parents[2] / "configs" / "indicators.yaml"


_OPEN_SECTIONS = {"slo"}
_THRESHOLD_KEYS = ("better", "warn", "fail")


def check_indicator_overrides(overrides: dict, defaults: dict, where: str = "indicators") -> None:
    """Type-check ``indicators:`` overrides against the defaults they override (the
    parsed configs/indicators.yaml); the rules of :func:`harness.config.check_indicators`, without the
    warn/fail order. Raises UserError naming ``where`` and the key."""
    _check_against(overrides, defaults, where, section=None)


def _check_against(value, default, where: str, section: str | None) -> None:
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        for key, sub in value.items():
            here = f"{where}.{key}"
            if not isinstance(key, str):
                raise UserError(f"{here}: keys are names, got {key!r}")
            if section == "thresholds":
                _check_threshold(sub, here)
                if key not in default:
                    raise UserError(f"{here}: unknown indicator (known: {', '.join(default)})")
                continue
            if key not in default:
                if section in _OPEN_SECTIONS and isinstance(default.get("default"), dict):
                    _check_against(sub, default["default"], here, key)
                    continue
                raise UserError(f"{here}: unknown key (known: {', '.join(map(str, default))})")
            _check_against(sub, default[key], here, key if section is None else section)
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        check_number(value, where, 0, None, lo_open=False)
    elif isinstance(default, str):
        # A word or a number where the default is a word ("auto" or a count, "10mbit").
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_number(value, where, 0, None, lo_open=False)
        elif not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")


def _check_threshold(value, where: str) -> None:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping {{better: lower|higher, warn: N, fail: N}}, got {value!r}")
    for key, v in value.items():
        if key not in _THRESHOLD_KEYS:
            raise UserError(f"{where}.{key}: unknown key (known: {', '.join(_THRESHOLD_KEYS)})")
        if key == "better":
            if v not in ("lower", "higher"):
                raise UserError(f"{where}.better: must be 'lower' or 'higher', got {v!r}")
        else:
            check_number(v, f"{where}.{key}", None, None)



def load_config(overrides: dict | None = None, path: Path | None = None) -> dict:
    """configs/indicators.yaml, merged key by key with a suite's ``indicators:``."""
    with open(path or DEFAULTS_PATH, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if overrides:
        # A suite's overrides (also as replayed from a run's manifest) have the types of
        # the defaults, or the merge below and every verdict would trip over them.
        check_indicator_overrides(overrides, cfg)
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise UserError(f"indicators.{key}: unknown key (known: {', '.join(cfg)})")
        if isinstance(cfg[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"indicators.{key}: expected a mapping")
            for sub, v in value.items():
                if key == "thresholds" and sub not in cfg[key]:
                    raise UserError(f"indicators.thresholds.{sub}: unknown indicator")
                base = cfg[key].get(sub)
                cfg[key][sub] = {**base, **v} if isinstance(base, dict) and isinstance(v, dict) else v
        else:
            cfg[key] = value
    for name, th in cfg.get("thresholds", {}).items():
        if th.get("better") not in ("lower", "higher"):
            raise UserError(f"indicators.thresholds.{name}.better: must be 'lower' or 'higher'")
    return cfg


def verdict(value: float | None, threshold: dict | None) -> str:
    if value is None:
        return "not measurable"
    if not threshold:
        return "info"
    worse = (lambda v, t: v > t) if threshold["better"] == "lower" else (lambda v, t: v < t)
    if "fail" in threshold and worse(value, threshold["fail"]):
        return "fail"
    if "warn" in threshold and worse(value, threshold["warn"]):
        return "warn"
    return "ok"


def indicator(ind_id: str, value, unit: str, formula: str, cases: list[str], cfg: dict,
              reason: str | None = None, **detail) -> dict:
    """One indicator as indicators.json holds it. ``value`` None means not measurable,
    and then ``reason`` says why."""
    v = finite(value) if not isinstance(value, str) else value
    threshold = cfg.get("thresholds", {}).get(ind_id)
    out = {
        "id": ind_id,
        "value": v,
        "unit": unit,
        "formula": formula,
        "formula_text": FORMULAS.get(formula, formula),
        "cases": list(dict.fromkeys(cases)),
        "verdict": "info" if isinstance(v, str) else verdict(v, threshold),
        "threshold": threshold,
    }
    if v is None:
        out["reason"] = reason or "not measurable"
    elif reason:
        out["note"] = reason
    out.update({k: clean(x) for k, x in detail.items()})
    return out


def not_measurable(ind_id: str, unit: str, formula: str, reason: str, cfg: dict, cases: list[str] | None = None) -> dict:
    return indicator(ind_id, None, unit, formula, cases or [], cfg, reason=reason)


def clean(x):
    """JSON-safe: numpy scalars to floats, NaN to None, recursively."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return finite(x)
    return x


@dataclass
class RunView:
    """A loaded run (harness.results.Run) seen the way the collector needs it."""

    run: object
    cfg: dict
    cases: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        cases = self.run.cases.copy()
        cases["params_d"] = [json_object(p) for p in cases.get("params", pd.Series([None] * len(cases)))]
        rp = cases["resolved_params"] if "resolved_params" in cases else cases["params"]
        cases["rparams"] = [{**a, **json_object(b)} for a, b in zip(cases["params_d"], rp)]
        cases["extra_d"] = [json_object(e) for e in cases.get("extra", pd.Series([None] * len(cases)))]
        self.cases = cases

    @cached_property
    def ok(self) -> pd.DataFrame:
        return self.cases[self.cases["status"] == "ok"]

    @cached_property
    def devices(self) -> dict[str, dict]:
        return {d["id"]: d for d in self.run.manifest.get("devices") or [] if isinstance(d, dict) and d.get("id")}

    def nominal(self, device: str) -> dict:
        """The nominal table of a device or of a group's first device; {} if unknown."""
        from harness.results import device_members

        first = device_members(device)[0] if device else ""
        dev = self.devices.get(first)
        if dev is None:
            kind = first.split(":")[0]
            dev = next((d for i, d in self.devices.items() if i.split(":")[0] == kind), None)
        return dict((dev or {}).get("nominal") or {})

    def device_class(self, device: str) -> str:
        return self.run.class_of(device)

    def samples_of(self, case_id: str) -> pd.DataFrame:
        s = self.run.samples
        return s[s["case_id"] == case_id]

    def per_rep(self, case_id: str) -> pd.DataFrame:
        from harness.results import rep_series

        return rep_series(self.run.samples, case_id)

    def by_probe(self, probe: str) -> pd.DataFrame:
        return self.ok[self.ok["probe"] == probe]

    def row(self, case_id: str):
        hit = self.cases[self.cases["case_id"] == case_id]
        return None if not len(hit) else hit.iloc[0]


def wide_by_rank(samples: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` as steps × ranks (only reps every rank has)."""
    if column not in samples.columns:
        return np.empty((0, 0))
    wide = samples.pivot_table(index="rep", columns="rank", values=column, aggfunc="first")
    return wide.dropna().to_numpy(dtype=float)
