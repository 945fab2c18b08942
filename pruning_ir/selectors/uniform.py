"""Uniform selection: the same share of every group, lowest scores first."""

from __future__ import annotations

import numpy as np

from ..checks import check_share
from .base import LabelSelector
from .constraint import ChannelConstraint
from .plan import SelectionPlan

__all__ = ["UniformLabelSelector"]


class UniformLabelSelector(LabelSelector):
    """Removes ``pruning_ratio`` of the labels of every prunable group (its lowest-scored ones).

    The per-group count is rounded to the nearest count the constraint allows, so every
    group keeps at least one channel by default. Cheap and latency-agnostic: a baseline.
    """

    def __init__(self, pruning_ratio: float, constraint: ChannelConstraint | None = None):
        super().__init__(constraint)
        self.pruning_ratio = check_share("pruning_ratio", pruning_ratio, "[0, 1)")

    def _select_counts(self, plan: SelectionPlan) -> np.ndarray:
        wanted = [np.floor(self.pruning_ratio * (len(g.labels) + g.removed_before) + 0.5) - g.removed_before
                  for g in plan.groups]
        counts = np.array([plan.nearest_allowed(i, max(w, 0.0)) for i, w in enumerate(wanted)], dtype=np.int64)
        return plan.repair(counts)
