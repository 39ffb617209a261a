from __future__ import annotations

import numpy as np
import pytest

from harness.stats import rate, summarize


def test_summary_of_known_samples():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["n"] == 5
    assert s["p50_s"] == 3.0
    assert s["min_s"] == 1.0 and s["max_s"] == 100.0
    assert s["mean_s"] == pytest.approx(22.0)
    assert s["std_s"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    assert s["mad_s"] == 1.0  # |x - 3| = 2,1,0,1,97 -> median 1
    assert s["p90_s"] == pytest.approx(61.6)  # linear interpolation between 4 and 100


def test_empty_samples_give_nones():
    s = summarize([])
    assert s["n"] == 0 and s["p50_s"] is None


def test_rate():
    assert rate(10.0, 2.0) == 5.0
    assert rate(0.0, 2.0) is None and rate(5.0, None) is None and rate(5.0, 0.0) is None
