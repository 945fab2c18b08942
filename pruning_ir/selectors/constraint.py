"""Channel constraints: how many channels each dependency group may keep.

Selectors decide, per group, how many of its lowest-ranked labels to remove; a constraint
turns a group into the list of removal counts it allows. Hardware likes widths that are
multiples of 8 or 16, and a group must never be emptied, so every selector takes one.
A constraint can also tie the groups of a repeated block to one count (``same_across_layers``:
what a Hugging Face config, with one MLP width and one head count, can describe) and leave
named modules' groups whole (``keep``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from ..labels import DependencyGroup
from .ties import repeated_groups

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

    ``same_across_layers``: groups that are the same group of a repeated block (a transformer
    layer's MLP units, its heads; see :func:`~pruning_ir.selectors.ties.repeated_groups`) lose the
    same number of labels, so every layer keeps the same widths. Every selector honours it: uniform
    selection by construction, global selection ranks a tied class as one unit (the k-th labels of
    its members leave together, valued by their mean score), the knapsacks add the equality.
    ``keep``: module paths (``"model.embed_tokens"``) whose groups keep every channel, e.g. the
    hidden size of a language model, inside any budget (filtering labels after selecting them
    would miss the budget). ``allow``: ``allow(group, kept) -> bool``, whether a pruned ``group``
    may keep ``kept`` channels (on top of the rest; an untouched group always may), for rules no
    bound or step says: head counts a config accepts (docs/huggingface.md).
    """

    low: int | float = 1
    high: int | float | None = None
    step: int = 1
    same_across_layers: bool = False
    keep: tuple[str, ...] = ()
    allow: Callable[[DependencyGroup, int], bool] | None = None

    def __post_init__(self) -> None:
        _check_bound("low", self.low)
        _check_bound("high", self.high)
        if isinstance(self.step, bool) or not isinstance(self.step, Integral) or self.step < 1:
            raise ValueError(f"ChannelConstraint step must be a positive int, got {self.step!r}")
        if not isinstance(self.same_across_layers, bool):
            raise TypeError(f"ChannelConstraint same_across_layers must be True or False, "
                            f"got {self.same_across_layers!r}")
        keep = (self.keep,) if isinstance(self.keep, str) else self.keep
        if not isinstance(keep, Iterable) or not all(isinstance(path, str) and path for path in keep):
            raise TypeError(f"ChannelConstraint keep must be module paths (non-empty strings), got {self.keep!r}")
        object.__setattr__(self, "keep", tuple(keep))
        if self.allow is not None and not callable(self.allow):
            raise TypeError(f"ChannelConstraint allow must be a function (group, kept channels) -> bool, "
                            f"got {self.allow!r}")

    def kept_whole(self, group: DependencyGroup) -> bool:
        """Whether ``group`` holds a module named in ``keep`` (it then loses no label)."""
        return bool(self.keep) and any(path in self.keep for path in group.modules)

    def check_keep(self, groups: Sequence[DependencyGroup]) -> None:
        """Raise if a ``keep`` path names no module of any of ``groups`` (a typo would keep nothing)."""
        named = {path for group in groups for path in group.modules}
        missing = [path for path in self.keep if path not in named]
        if missing:
            example = next((path for path in sorted(named) if path), "-")
            raise ValueError(f"ChannelConstraint keep names {missing}, which no prunable group holds; give module "
                             f"paths as model.named_modules() spells them (e.g. {example!r})")

    def tied_groups(self, groups: Sequence[DependencyGroup]) -> list[list[DependencyGroup]]:
        """The classes of ``groups`` that must lose the same number of labels (none unless
        ``same_across_layers``); unprunable groups and groups in ``keep`` lose none and are left out."""
        if not self.same_across_layers:
            return []
        return repeated_groups([group for group in groups if group.prunable and not self.kept_whole(group)])

    def _bounds(self, channels: int) -> tuple[int, int]:
        low = self.low if isinstance(self.low, Integral) else math.ceil(self.low * channels - 1e-9)
        high = channels if self.high is None else (
            self.high if isinstance(self.high, Integral) else math.floor(self.high * channels + 1e-9))
        return max(int(low), 1), min(int(high), channels)

    def removal_counts(self, group: DependencyGroup) -> np.ndarray:
        """The numbers of labels ``group`` may lose, ascending; raises if there is none."""
        channels, labels = group.channel_count, len(group.classes)
        if self.kept_whole(group):
            return np.array([0])
        low, high = self._bounds(channels)
        removed = np.arange(labels + 1)
        kept = channels - removed
        step = math.lcm(self.step, group.width_multiple)   # a kernel's alignment (a grouped matmul's) too
        allowed = (kept >= low) & (kept <= high) & ((kept % step == 0) | (removed == 0))
        if self.allow is not None:
            allowed = np.array([ok and (r == 0 or bool(self.allow(group, int(k))))
                                for ok, r, k in zip(allowed, removed, kept)], dtype=bool)
        counts = removed[allowed]
        if counts.size == 0:
            extra = " (and allowed by allow)" if self.allow is not None else ""
            raise ValueError(
                f"{self} allows no width for group {group.id} ({channels} channels, {labels} prunable, "
                f"modules {', '.join(group.modules[:3]) or '-'}): keeping between {low} and {high} "
                f"channels in steps of {step}{extra} is impossible")
        return counts
