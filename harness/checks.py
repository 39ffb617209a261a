"""The one numeric check every setting goes through (suites, compare.yaml, the
indicators' thresholds, CLI options): finite, real, within bounds, or a UserError
naming the setting."""

from __future__ import annotations

import math

from harness.errors import UserError


def check_number(value, where: str, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = True, hi_open: bool = False) -> float:
    """``value`` as a float when it is a finite real number within the bounds (``lo`` /
    ``hi``, open or closed; None = unbounded), else a UserError naming ``where``.

    NaN compares false with everything, so a bare ``value <= 0`` check lets it through;
    this is the one check every numeric setting goes through (suites, compare.yaml,
    CLI options)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        raise UserError(f"{where}: must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: must be a finite number, got {value!r}")
    below = lo is not None and (number <= lo if lo_open else number < lo)
    above = hi is not None and (number >= hi if hi_open else number > hi)
    if below or above:
        left = "unbounded" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
        right = "" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
        span = f"in {left}, {right}" if hi is not None and lo is not None else (
            f"{'>' if lo_open else '≥'} {lo:g}" if lo is not None else f"{'<' if hi_open else '≤'} {hi:g}")
        raise UserError(f"{where}: must be {span}, got {value!r}")
    return number
