"""What a LossAwareCriterion accumulates over batches, and the scores it gives.

Per class, the sum over batches of the squared gate term; per joint group, the sum of the
outer products of its terms; and the batch count. The criterion owns one of these; its
``state_dict()`` is this object's tensors, so sums move between processes and IRs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..labels import ChannelIndex
from ._joint import joint_scores

__all__ = ["TaylorSums", "score_layout"]


def score_layout(index: ChannelIndex) -> tuple[np.ndarray, list[np.ndarray]]:
    """The class ids that are labels, and the label classes of each prunable group (the order
    of the per-group sums)."""
    return np.flatnonzero(index.label_mask()), [group.classes for group in index.groups if group.prunable]


@dataclass
class TaylorSums:
    """Sums of squares per class (``total``), batch ``count``, per-group outer-product sums
    (``grams``: None, or one entry per prunable group, None where the group is not joint)."""

    total: np.ndarray
    count: int
    grams: list[np.ndarray | None] | None

    def __add__(self, other: "TaylorSums") -> "TaylorSums":
        grams = self.grams
        if grams is not None and other.grams is not None:
            grams = [None if mine is None else mine + theirs for mine, theirs in zip(grams, other.grams)]
        return TaylorSums(self.total + other.total, self.count + other.count, grams)

    def scores(self, index: ChannelIndex) -> tuple[np.ndarray, np.ndarray]:
        """(label classes, their scores): the mean square per label, and for joint groups the
        group's joint scores."""
        labels, groups = score_layout(index)
        scores = np.zeros(index.class_count)
        scores[labels] = self.total[labels] / self.count
        for classes, gram in zip(groups, self.grams or []):
            if gram is not None:
                scores[classes] = joint_scores(gram / self.count)
        return labels, scores[labels]

    def state_dict(self) -> dict[str, Any]:
        """float64 CPU tensors, so that ``torch.save`` / ``weights_only`` loading work."""
        def tensor(values):
            return None if values is None else torch.from_numpy(np.array(values, dtype=np.float64))
        return {"sum": tensor(self.total), "batches": int(self.count),
                "grams": None if self.grams is None else [tensor(gram) for gram in self.grams]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], index: ChannelIndex) -> "TaylorSums":
        """The sums of ``state``; ValueError when they do not fit ``index``'s labels."""
        total = state["sum"].numpy().astype(np.float64)
        grams = state.get("grams")
        grams = None if grams is None else [None if g is None else g.numpy().astype(np.float64) for g in grams]
        count = int(state["batches"])
        _, groups = score_layout(index)
        if len(total) != index.class_count or count <= 0 or grams is not None and (
                len(grams) != len(groups) or any(g is not None and g.shape != (len(c), len(c))
                                                 for g, c in zip(grams, groups))):
            raise ValueError("the saved LossAwareCriterion sums do not fit this IR (another model?)")
        return cls(total, count, grams)
