"""How the dashboard writes numbers for a reader: durations, counts, sizes, percentages."""
from __future__ import annotations

import math


def duration(seconds: float | None) -> str:
    """7.588803912 -> "7.6 s"; 4021 -> "1 h 7 min"."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def count(value: float | None, unit: str = "") -> str:
    """3385089 -> "3.39 M"; 1257 -> "1,257"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}".rstrip()
    return f"{value:,.0f}{' ' + unit if unit else ''}"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.2f} %"


def number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def is_fraction(metric: str) -> bool:
    """Accuracies and recalls, which read as percentages."""
    return metric.startswith("acc") or "recall" in metric
