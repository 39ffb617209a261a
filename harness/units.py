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
    if a == 0:
        return 1.0, unit
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

    The scale is that of the median magnitude, stepped down while the smallest value
    would read below 0.01 and the largest stays under 1 000 000 (so 1.4 µs and 12 ms share
    'µs' as 1.4 and 12000 rather than 0.0014 and 12 ms); numbers of 1000 and more are
    written whole, smaller ones with ``digits`` significant digits, tiny ones in
    e-notation. Missing entries are '—'. E.g. ``column([4e3, 2e9], 'B/s')`` ->
    (['4.0e-03', '2000'], 'MB/s')."""
    vals = [float(v) for v in values if not _missing(v) and v != 0]
    unit = _ALIASES.get(unit, unit)
    if not vals:
        return [MISSING if _missing(v) else "0" for v in values], unit
    mags = sorted(abs(v) for v in vals)
    factor, text = scale(mags[len(mags) // 2], unit)
    steps = [f for f, _ in (_SECONDS if unit == "s" else _SI)]
    while mags[0] / factor < 0.01 and factor in steps and steps.index(factor) + 1 < len(steps):
        smaller = steps[steps.index(factor) + 1]
        if mags[-1] / smaller >= 1e6:
            break
        factor, text = smaller, scale(smaller, unit)[1]
    out = []
    for v in values:
        if _missing(v):
            out.append(MISSING)
            continue
        x = float(v) / factor
        if abs(x) >= 1000:
            out.append(f"{x:.0f}")
        elif x == 0 or abs(x) >= 10 ** -(digits - 1):
            out.append(f"{x:.{digits}g}")
        else:
            out.append(f"{x:.1e}")
    return out, text


def binary(value, unit: str = "B") -> str:
    """A size with binary prefixes (IEC 80000-13: KiB = 1024 B, MiB, GiB, TiB), as buffer
    and message sizes are chosen: ``binary(64 * 2**20)`` -> ``'64 MiB'``,
    ``binary(1536)`` -> ``'1.5 KiB'``; missing -> '—'."""
    if _missing(value):
        return MISSING
    v = float(value)
    for factor, prefix in ((2 ** 40, "Ti"), (2 ** 30, "Gi"), (2 ** 20, "Mi"), (2 ** 10, "Ki")):
        if abs(v) >= factor:
            return f"{v / factor:g} {prefix}{unit}"
    return f"{v:g} {unit}"


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
