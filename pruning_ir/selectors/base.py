"""The label selector interface: ``select(ir)`` -> the labels to prune.

A selector only decides *how many* of each group's lowest-scored labels to remove (a
counts vector over a :class:`SelectionPlan`); turning counts into labels, honouring the
channel constraint, normalizing scores per group and checking the result against the IR are
done here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import warnings

import numpy as np

from ..ir import PruningIR
from ..labels import Label
from .constraint import ChannelConstraint
from .plan import SelectionPlan

__all__ = ["LabelSelector", "NORMALIZERS"]

# normalize= option: the per-group reduction each group's scores are divided by
NORMALIZERS = {
    "mean": np.mean,
    "max": np.max,
    "l2": np.linalg.norm,
}


def _warn_if_unscored(ir: PruningIR) -> None:
    """Warn when every score of the IR, or of a prunable group, is 0 or not finite: the selection
    then follows tie order (channel order), not importance."""
    groups = [group for group in ir.index.groups if group.prunable]
    blank = [group.id for group in groups if not np.any(np.isfinite(group.scores) & (group.scores != 0))]
    if not blank:
        return
    where = "every label of the IR" if len(blank) == len(groups) else \
        f"every label of groups {', '.join(map(str, blank[:8]))}{' ...' if len(blank) > 8 else ''}"
    warnings.warn(f"{where} scores 0 (or not finite), so labels are picked in channel order, not by importance: "
                  "calibrate with a criterion first (LossAwareCriterion over a few batches); a zero-initialised "
                  "layer (a fresh classification head) gives zero loss-aware scores, so train first or use "
                  "MagnitudeCriterion", stacklevel=3)


class LabelSelector(ABC):
    r"""Chooses labels to prune from a scored IR; deterministic for the same scores.

    ``constraint`` bounds the channels each group keeps (default: at least one). Labels
    leave each group in ascending score order, ties broken by channel, so an unscored IR
    still gets a deterministic selection.

    ``normalize`` (selectors that compare scores across groups): None (default) ranks the
    scores as the criterion wrote them; ``"mean"``, ``"max"`` or ``"l2"`` divides each group's
    scores by their mean, maximum or Euclidean norm first,
    :math:`\tilde s_\ell = s_\ell / \mathrm{reduce}_{m \in g(\ell)} s_m` (a group whose
    reduction is not positive, all zeros say, is left as it is). The order inside a group never
    changes, only how groups compare. Normalizing makes scores that are not comparable across
    layers usable network-wide (weight norms, which scale with a layer's initialization and
    width; Torch-Pruning's default is ``"mean"``, Molchanov et al. 2017 use ``"l2"``), and stops
    one group from being emptied because its scores are all small; the price is that a group's
    overall importance is thrown away: under ``"mean"`` every group weighs the same however much
    the loss depends on it. LossAwareCriterion scores estimate the loss, so they are best ranked
    raw (its joint scores sum to set costs); ``"mean"`` spreads the removal more evenly, which
    can recover better in a short fine-tune (``benchmarks/RESULTS.md`` has the measurements).

    The share a selector removes counts labels, and labels differ in size (one label of a
    transformer's hidden size ties many more parameters than one MLP unit): to budget
    parameters or MACs, use a latency selector with ``macs`` or ``parameter_count``.
    """

    def __init__(self, constraint: ChannelConstraint | None = None, normalize: str | None = None):
        if constraint is not None and not isinstance(constraint, ChannelConstraint):
            raise TypeError(f"constraint must be a ChannelConstraint, got {type(constraint).__name__}")
        if normalize is not None and normalize not in NORMALIZERS:
            raise ValueError(f"normalize must be None or one of {sorted(NORMALIZERS)}, got {normalize!r}")
        self.constraint = constraint if constraint is not None else ChannelConstraint()
        self.normalize = normalize

    def select(self, ir: PruningIR, *, floors: Mapping[int, int] | None = None,
               removed_before: Mapping[int, int] | None = None) -> list[Label]:
        """The labels to prune from ``ir`` (or from ``ir.snapshot()``, which is the same thing).

        ``floors``: group id -> the fewest labels that group must lose (gradual pruning keeps
        masked labels masked). ``removed_before``: group id -> labels that group lost in earlier
        prunes, so that a share (uniform, global) counts the labels of the model before them
        (pruning in rounds); latency selectors ignore it.
        """
        if not isinstance(ir, PruningIR):
            raise TypeError(f"{type(self).__name__}.select expects a PruningIR or ir.snapshot(), "
                            f"got {type(ir).__name__}")
        _warn_if_unscored(ir)
        plan = SelectionPlan(ir, self.constraint, floors=floors, removed_before=removed_before)
        if self.normalize is not None:
            self._normalize(plan)
        counts = self._select_counts(plan)
        labels = plan.labels(counts)
        ir.check_labels(labels)
        return labels

    def _normalize(self, plan: SelectionPlan) -> None:
        """Divide each group's scores in ``plan`` by their ``normalize`` reduction (the IR is unchanged).

        Masked labels (``ir.mask``) are already gone from the model: the reduction is over the
        others, as it would be on the model with the masked labels pruned."""
        reduce = NORMALIZERS[self.normalize]
        masked = {label.class_id for label in plan.ir.masked_labels()}
        for group in plan.groups:
            scores = group.scores
            if masked:
                scores = scores[np.array([label.class_id not in masked for label in group.labels], dtype=bool)]
            scale = float(reduce(scores)) if scores.size else 0.0
            if scale > 0:
                group.scores = group.scores / scale

    @abstractmethod
    def _select_counts(self, plan: SelectionPlan) -> np.ndarray:
        """How many labels leave each group of ``plan`` (one of its allowed counts per group)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
