"""Argument checks shared by the public API: one wording for every share and ratio."""

from __future__ import annotations

import math
from numbers import Real

__all__ = ["check_share"]


def check_share(name: str, value: float, interval: str = "[0, 1)") -> float:
    """``value`` as a float when it is a finite number in ``interval`` (written "[0, 1)",
    "(0, 1)", "(0, 1]" or "[0, 1]"); else a TypeError or ValueError naming ``name``."""
    low_closed, high_closed = interval[0] == "[", interval[-1] == "]"
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a share in {interval}, got {value!r}")
    if (value < low or (value == low and not low_closed)) or (value > high or (value == high and not high_closed)):
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return float(value)
