"""Numbers and settings as a report shows them: '91.2 %', '91.2 % [89.0–93.1]', '45.1 k', '–'."""

from __future__ import annotations

import json
import math

MISSING = "–"


def num(x) -> float | None:
    """A finite float, or None for null, '', NaN and anything unparsable."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pct(x) -> str:
    """0.9123 -> '91.2 %'; None -> '–'."""
    v = num(x)
    return MISSING if v is None else f"{100 * v:.1f} %"


def pct_ci(x, ci) -> str:
    """'91.2 % [89.0–93.1]', or without the interval when there is none."""
    if num(x) is None:
        return MISSING
    if ci_text(ci) == MISSING:
        return pct(x)
    return f"{pct(x)} [{100 * float(ci[0]):.1f}–{100 * float(ci[1]):.1f}]"


def ci_text(ci) -> str:
    """'89.0–93.1 %', or '–'."""
    if not isinstance(ci, list | tuple) or len(ci) != 2 or None in (num(ci[0]), num(ci[1])):
        return MISSING
    return f"{100 * float(ci[0]):.1f}–{100 * float(ci[1]):.1f} %"


def fixed(x, digits: int = 3) -> str:
    """A plain decimal, or '–'."""
    v = num(x)
    return MISSING if v is None else f"{v:.{digits}f}"


def count(x) -> str:
    """1234567 -> '1,234,567'."""
    v = num(x)
    return MISSING if v is None else f"{round(v):,}"


def params(x) -> str:
    """Parameter count, short: 45.1 k, 1.23 M."""
    v = num(x)
    if v is None:
        return MISSING
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f}"


def setting(v) -> str:
    """A protocol value as a reader would type it."""
    if v is None:
        return MISSING
    if isinstance(v, str):
        return v
    if isinstance(v, list | tuple):
        return ", ".join(setting(x) for x in v) if v else "[]"
    return json.dumps(v)


def metric(row: dict, split: str, key: str):
    """row[split][key], or None when the split or the key is missing."""
    m = row.get(split)
    return m.get(key) if isinstance(m, dict) else None


def short(name: str, n: int = 15) -> str:
    """A name cut to n characters with an ellipsis."""
    return name if len(name) <= n else name[: n - 1] + "…"


def value(v) -> str:
    """A tuning value as the tuning report shows it: floats to 4 significant digits, None empty."""
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
