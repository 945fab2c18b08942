"""Global selection: the network-wide lowest scores, whatever group they sit in."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from .base import LabelSelector
from .constraint import ChannelConstraint
from .plan import SelectionPlan

__all__ = ["GlobalScoreLabelSelector"]


class GlobalScoreLabelSelector(LabelSelector):
    """Removes the ``n_or_ratio`` lowest-scored labels of the whole network.

    A value in (0, 1) is a share of all prunable labels, a value >= 1 a number of labels
    (0 removes nothing; 1.0 is refused as ambiguous: pass the int 1 for one label). The
    share counts labels, and labels differ in size (see :class:`LabelSelector`). Scores must be
    comparable across groups: LossAwareCriterion scores are (keep its default joint scores when a large share goes: single-label ones,
    ``joint=False``, empty single layers);
    weight norms are not, and want ``normalize="mean"`` (see :class:`LabelSelector`, which also
    says what normalizing costs). Labels leave in chunks the constraint allows; a chunk that
    would exceed the count is skipped (with the rest of its group), so at most that many labels
    are removed. Groups tied by ``same_across_layers`` leave as one unit: their k-th labels go
    together, ranked by the mean of their scores, and count as that many labels.
    """

    def __init__(self, n_or_ratio: int | float, constraint: ChannelConstraint | None = None, *,
                 normalize: str | None = None):
        super().__init__(constraint, normalize)
        if isinstance(n_or_ratio, bool) or not isinstance(n_or_ratio, Real) or not math.isfinite(n_or_ratio):
            raise TypeError(f"n_or_ratio must be a share in (0, 1) or a count >= 1, got {n_or_ratio!r}")
        if n_or_ratio < 0:
            raise ValueError(f"n_or_ratio must be a share in (0, 1) or a count >= 1, got {n_or_ratio}")
        if n_or_ratio >= 1 and n_or_ratio != int(n_or_ratio):
            raise ValueError(f"a count of labels must be a whole number, got {n_or_ratio}")
        if isinstance(n_or_ratio, float) and n_or_ratio == 1.0:
            raise ValueError("n_or_ratio=1.0 is ambiguous: a share must lie in (0, 1) (1.0 cannot remove every "
                             "label) and a count of labels is an int; pass 1 to remove one label")
        self.n_or_ratio = n_or_ratio

    def _label_budget(self, plan: SelectionPlan) -> int:
        before = plan.removed_before
        total = plan.label_count + before
        if self.n_or_ratio < 1:
            return max(int(np.floor(self.n_or_ratio * total + 0.5)) - before, 0)
        count = int(self.n_or_ratio)
        if count > total:
            raise ValueError(f"cannot remove {count} labels: the IR has only {total} prunable labels")
        return max(count - before, 0)

    def _select_counts(self, plan: SelectionPlan) -> np.ndarray:
        budget = self._label_budget(plan)
        counts = plan.base_counts()
        most = int(plan.max_counts().sum())
        if budget > most:
            raise ValueError(f"cannot remove {budget} labels: the channel constraint ({self.constraint}) lets at "
                             f"most {most} of the {plan.label_count} prunable labels go")
        removed, blocked = int(counts.sum()), set()
        for step in plan.steps(counts):
            if step.index in blocked:
                continue
            if removed + step.size > budget:
                blocked.add(step.index)
                continue
            counts[list(step.members)] = step.stop
            removed += step.size
        return plan.repair(counts)
