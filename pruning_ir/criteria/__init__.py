"""Criteria: score every label of a PruningIR (``label.score``), for the selectors to rank.

All criteria share one interface: ``with Criterion(ir, ...) as score_collector:`` where
calling ``score_collector(*args, **kwargs)`` runs the model (inferring labels on the first
call when needed) and returns its output unchanged.

- :class:`LossAwareCriterion` — first-order Taylor estimate of the loss increase when a
  label is removed, accumulated over ``loss.backward()`` calls (the default criterion).
- :class:`MagnitudeCriterion` — data-free p-norm of the weights producing each label,
  optionally folded with the following batch norm.
- :class:`RandomCriterion` — seeded random baseline.
- :class:`ActivationCriterion` — gradient-free Wanda / FLAP scores from per-channel input
  statistics of the layers reading each label (forward passes only, for large models).
- :func:`measure_removal_costs` — after any of them: keeps each group's order and prices its
  labels with the loss measured when they are removed (for global and knapsack selection).

User scores go through ``ir.set_scores({label: score})`` or ``ir.set_scores(callable)``.
"""

from .activations import ActivationCriterion
from .base import Criterion, DataFreeCriterion
from .loss_aware import LossAwareCriterion
from .magnitude import MagnitudeCriterion
from .measured_costs import RemovalCurve, measure_removal_costs
from .random import RandomCriterion

__all__ = ["ActivationCriterion", "Criterion", "DataFreeCriterion", "LossAwareCriterion", "MagnitudeCriterion",
           "RandomCriterion", "measure_removal_costs", "RemovalCurve"]
