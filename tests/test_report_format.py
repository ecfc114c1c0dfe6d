"""Numbers as the reports show them."""

from __future__ import annotations

from bloodcell.report import pct, pct_ci


def test_formatting():
    assert pct(0.91234) == "91.2 %" and pct(None) == "–" and pct(float("nan")) == "–"
    assert pct_ci(0.5, [0.4, 0.6]) == "50.0 % [40.0–60.0]" and pct_ci(0.5, None) == "50.0 %"
