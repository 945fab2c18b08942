"""The label selector interface: ``select(ir)`` -> the labels to prune.

A selector only decides *how many* of each group's lowest-scored labels to remove (a
counts vector over a :class:`SelectionPlan`); turning counts into labels, honouring the
channel constraint and checking the result against the IR are done here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..ir import PruningIR
from ..labels import Label
from .constraint import ChannelConstraint
from .plan import SelectionPlan

__all__ = ["LabelSelector"]


class LabelSelector(ABC):
    """Chooses labels to prune from a scored IR; deterministic for the same scores.

    ``constraint`` bounds the channels each group keeps (default: at least one). Labels
    leave each group in ascending score order, ties broken by channel, so an unscored IR
    still gets a deterministic selection.
    """

    def __init__(self, constraint: ChannelConstraint | None = None):
        if constraint is not None and not isinstance(constraint, ChannelConstraint):
            raise TypeError(f"constraint must be a ChannelConstraint, got {type(constraint).__name__}")
        self.constraint = constraint if constraint is not None else ChannelConstraint()

    def select(self, ir: PruningIR) -> list[Label]:
        """The labels to prune from ``ir`` (or from ``ir.snapshot()``, which is the same thing)."""
        if not isinstance(ir, PruningIR):
            raise TypeError(f"{type(self).__name__}.select expects a PruningIR or ir.snapshot(), "
                            f"got {type(ir).__name__}")
        plan = SelectionPlan(ir, self.constraint)
        counts = self._select_counts(plan)
        labels = plan.labels(counts)
        ir.check_labels(labels)
        return labels

    @abstractmethod
    def _select_counts(self, plan: SelectionPlan) -> np.ndarray:
        """How many labels leave each group of ``plan`` (one of its allowed counts per group)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
