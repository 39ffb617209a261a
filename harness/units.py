"""One unit formatter for the whole harness: seconds, bytes, B/s, FLOP, FLOP/s, tokens/s.

Decimal SI prefixes (k = 1e3, M = 1e6, G = 1e9 ...) for rates and sizes, the way
bandwidths and FLOP/s are quoted on datasheets and by nccl-tests (GB/s = 1e9 B/s);
seconds step down through ms, µs and ns. ``column`` picks ONE scale for a whole column
so a table never mixes kB/s with GB/s in a column.
"""

from __future__ import annotations

import math

MISSING = "—"

# (factor, prefix), largest first; BIPM SI prefixes (https://www.bipm.org/en/measurement-units/si-prefixes).
_SI = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
_SECONDS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))
# Spellings of the same unit in indicators.json and the cases table.
_ALIASES = {"tokens/s": "tok/s", "Bps": "B/s", "bytes/s": "B/s", "bytes": "B", "flop/s": "FLOP/s"}


def _missing(value) -> bool:
    return value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def scale(value: float, unit: str) -> tuple[float, str]:
    """(factor, unit text) for ``value`` in ``unit``: the largest prefix not above |value|
    (seconds: s, ms, µs, ns). Raises nothing; 0 takes the bare unit."""
    unit = _ALIASES.get(unit, unit)
    a = abs(value)
    if unit == "s":
        for factor, name in _SECONDS:
            if a >= factor:
                return factor, name
        return 1e-9, "ns"
    for factor, prefix in _SI:
        if a >= factor:
            return factor, prefix + unit
    return 1.0, unit


def fmt(value, unit: str, digits: int = 3) -> str:
    """``value`` (a float in base units) with its unit: ``fmt(1.23e11, 'B/s')`` ->
    ``'123 GB/s'``, ``fmt(2.5e-4, 's')`` -> ``'250 µs'``. ``digits`` significant digits.
    None / NaN / inf -> '—'."""
    if _missing(value):
        return MISSING
    factor, text = scale(float(value), unit)
    return f"{float(value) / factor:.{digits}g} {text}".strip()


def column(values, unit: str, digits: int = 3) -> tuple[list[str], str]:
    """One scale for a whole column: (numbers as text, unit text for the header).

    The scale is that of the median of the finite magnitudes, so one outlier does not
    turn the rest into 0.00; e.g. ``column([4e3, 2e9], 'B/s')`` -> (['4e-06', '2'], 'GB/s')
    would be unreadable, so numbers below 0.001 of the scale keep 3 significant digits
    in e-notation. Missing entries are '—'."""
    vals = [float(v) for v in values if not _missing(v) and v != 0]
    if not vals:
        return [MISSING if _missing(v) else "0" for v in values], _ALIASES.get(unit, unit)
    mags = sorted(abs(v) for v in vals)
    factor, text = scale(mags[len(mags) // 2], unit)
    out = []
    for v in values:
        if _missing(v):
            out.append(MISSING)
            continue
        x = float(v) / factor
        out.append(f"{x:.{digits}g}" if x == 0 or abs(x) >= 10 ** -(digits - 1) else f"{x:.1e}")
    return out, text


def percent(value, digits: int = 1) -> str:
    """A fraction as a percentage: 0.123 -> '12.3%'; missing -> '—'."""
    if _missing(value):
        return MISSING
    return f"{float(value) * 100:.{digits}f}%"


def number(value, digits: int = 3) -> str:
    """A unitless figure with ``digits`` significant digits; missing -> '—'."""
    if _missing(value):
        return MISSING
    return f"{float(value):.{digits}g}"
