"""Channel constraints: how many channels each dependency group may keep.

Selectors decide, per group, how many of its lowest-ranked labels to remove; a constraint
turns a group into the list of removal counts it allows. Hardware likes widths that are
multiples of 8 or 16, and a group must never be emptied, so every selector takes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from ..labels import DependencyGroup

__all__ = ["ChannelConstraint"]


def _check_bound(name: str, value: int | float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"ChannelConstraint {name} must be an int (channels) or a float in (0, 1] "
                        f"(share of the group's channels), got {value!r}")
    if isinstance(value, Integral):
        if value < 1:
            raise ValueError(f"ChannelConstraint {name} must keep at least 1 channel, got {value}")
    elif not 0.0 < value <= 1.0:
        raise ValueError(f"ChannelConstraint {name} as a share must lie in (0, 1], got {value}")


@dataclass(frozen=True)
class ChannelConstraint:
    """Bounds on the channels every group keeps, and a step for their number.

    ``low``/``high``: the fewest/most channels a group keeps, as an int (channels) or a float
    in (0, 1] (share of the group's channels, rounded up for ``low`` and down for ``high``).
    ``step``: a pruned group keeps a multiple of ``step`` channels (an untouched group may
    keep its original width). Channel counts include the group's unprunable channels.
    The default keeps at least one channel per group and allows any width.
    """

    low: int | float = 1
    high: int | float | None = None
    step: int = 1

    def __post_init__(self) -> None:
        _check_bound("low", self.low)
        _check_bound("high", self.high)
        if isinstance(self.step, bool) or not isinstance(self.step, Integral) or self.step < 1:
            raise ValueError(f"ChannelConstraint step must be a positive int, got {self.step!r}")

    def _bounds(self, channels: int) -> tuple[int, int]:
        low = self.low if isinstance(self.low, Integral) else math.ceil(self.low * channels - 1e-9)
        high = channels if self.high is None else (
            self.high if isinstance(self.high, Integral) else math.floor(self.high * channels + 1e-9))
        return max(int(low), 1), min(int(high), channels)

    def removal_counts(self, group: DependencyGroup) -> np.ndarray:
        """The numbers of labels ``group`` may lose, ascending; raises if there is none."""
        channels, labels = group.channel_count, len(group.classes)
        low, high = self._bounds(channels)
        removed = np.arange(labels + 1)
        kept = channels - removed
        allowed = (kept >= low) & (kept <= high) & ((kept % self.step == 0) | (removed == 0))
        counts = removed[allowed]
        if counts.size == 0:
            raise ValueError(
                f"{self} allows no width for group {group.id} ({channels} channels, {labels} prunable, "
                f"modules {', '.join(group.modules[:3]) or '-'}): keeping between {low} and {high} "
                f"channels in steps of {self.step} is impossible")
        return counts
