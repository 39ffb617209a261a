"""harness.units: the one formatter for seconds, bytes, B/s, FLOP/s and tokens/s, and one
scale per table column."""

from __future__ import annotations

import math

from harness.units import column, fmt, number, percent, scale


def test_fmt_uses_decimal_prefixes_and_steps_seconds_down():
    assert fmt(1.23e11, "B/s") == "123 GB/s"
    assert fmt(2.5e12, "FLOP/s") == "2.5 TFLOP/s"
    assert fmt(999, "B") == "999 B" and fmt(1000, "B") == "1 kB"
    assert fmt(162.4, "tokens/s") == "162 tok/s"  # the two spellings are one unit
    assert fmt(2.5e-4, "s") == "250 µs" and fmt(3.0, "s") == "3 s" and fmt(4e-9, "s") == "4 ns"
    assert fmt(-2e-3, "s") == "-2 ms"
    for missing in (None, math.nan, math.inf, "x", True):
        assert fmt(missing, "s") == "—"


def test_a_column_shares_one_scale():
    assert column([4e3, 2e9], "B/s") == (["4.0e-03", "2000"], "MB/s")
    # 1.4 µs and 12 ms: µs for both rather than 0.0014 ms.
    assert column([1.4e-6, 0.012], "s") == (["1.4", "12000"], "µs")
    # Beyond 1e6 of the smaller scale the median's scale stays.
    assert column([1e-9, 2000.0, 3000.0], "s")[1] == "s"
    assert column([None, 5e-8], "s") == (["—", "50"], "ns")
    assert column([], "B/s") == ([], "B/s") and column([0, None], "B") == (["0", "—"], "B")
    assert scale(0.0, "B/s") == (1.0, "B/s")


def test_percent_and_number():
    assert percent(0.123) == "12.3%" and percent(None) == "—"
    assert number(1234.5) == "1.23e+03" and number(math.nan) == "—"


def test_binary_sizes():
    from harness.units import binary

    assert binary(64 * 2 ** 20) == "64 MiB" and binary(1536) == "1.5 KiB" and binary(100) == "100 B"
    assert binary(None) == "—"
