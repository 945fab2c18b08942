r"""Measured removal costs: what removing a group's lowest-scored labels really does to the loss.

A criterion's scores do two jobs. Within a group they order the labels (which channels go
first); across groups they tell global and knapsack selection where to cut. LossAware's Taylor
scores order well, but their values are local estimates: for a large removal they misjudge a
group's cost (on the digits CNN of ``benchmarks/criteria.py`` global selection empties block
interiors, which recover badly). This pass keeps every group's order and replaces the values
by measurements, as layer-wise sensitivity analysis does (Li et al., ICLR 2017):

* for a few prefix sizes :math:`k` of the group's order (``points`` of them, evenly spaced up
  to all labels but one) the :math:`k` lowest-scored labels are removed, the batch-norm
  statistics re-estimated (``batchnorm_loader``) and the loss evaluated:
  :math:`L_g(k)` with every other group intact;
* the curve is interpolated linearly over every :math:`k` and replaced by its lower convex
  envelope :math:`\hat L_g`, so the marginal costs rise along the order;
* the label in position :math:`k` scores :math:`\max(\hat L_g(k) - \hat L_g(k - 1), 0)` (kept
  strictly increasing), so the :math:`k` lowest scores of a group add up to the measured loss
  increase of removing them (on the envelope); the last label, which no selection removes,
  scores at least the group's whole measured increase.

Scores are then losses of the same kind in every group, and selectors that add them up
(global, knapsack) compare measured costs. Interactions between groups are not measured: each
curve is taken with the rest of the network whole. Cost: one evaluation of the loss (and one
batch-norm pass) per point per group, plus one for the unpruned model. Under
``torch.distributed`` every rank measures its own data and the curves are averaged across
ranks (one all-reduce), so every rank selects the same labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..batchnorm import kept_statistics, tune_batchnorm_statistics
from ..errors import PruningIRError
from ..ir import PruningIR
from ..labels import DependencyGroup, Label
from ._distributed import all_reduce_sum, world_size

__all__ = ["measure_removal_costs", "RemovalCurve"]


@dataclass
class RemovalCurve:
    """The loss measured for one group: ``loss_increase[j]`` after removing its
    ``removed_counts[j]`` lowest-scored labels (``removed_counts[0] == 0``)."""

    group: DependencyGroup
    removed_counts: np.ndarray
    loss_increase: np.ndarray


def measure_removal_costs(ir: PruningIR, loss_calculation_function: Callable[[nn.Module], Any], *,
                          batchnorm_loader: Iterable[Any] | None = None, points: int = 8,
                          verbose: bool = True) -> list[RemovalCurve]:
    """Replace each group's scores by the measured loss of removing its labels in score order.

    Run it after a criterion (``LossAwareCriterion``, best calibrated inside
    ``batch_statistics``): the criterion orders each group's labels, this pass prices them.

    Args:
        ir: an IR whose labels are inferred and scored; its model is left exactly as it was
            (parameters, buffers, train/eval flags), also when a measurement fails.
        loss_calculation_function: ``model -> loss`` (a float or a one-element tensor), e.g.
            the mean loss over a few calibration batches; called under ``torch.no_grad()`` with
            the model in eval mode. Lower is better.
        batchnorm_loader: batches to re-estimate the batch-norm statistics on before every
            evaluation (``tune_batchnorm_statistics``), as one does after pruning; without it
            the removals are measured with the unpruned model's statistics. A re-iterable
            loader (a ``DataLoader``, a list) is iterated again each time; a one-pass iterator
            (a generator) is read into a list first.
        points: prefix sizes measured per group (more: a finer curve, one evaluation each); a
            group of at most ``points + 1`` labels is measured at every size.
        verbose: show progress.

    Returns:
        one :class:`RemovalCurve` per prunable group, the measurements behind the scores.
    """
    if isinstance(points, bool) or not isinstance(points, Integral) or points < 1:
        raise ValueError(f"points must be a whole number >= 1, got {points!r}")
    if not callable(loss_calculation_function):
        raise TypeError(f"loss_calculation_function must be callable (model -> loss), "
                        f"got {type(loss_calculation_function).__name__}")
    groups = ir.label_groups()  # also: labels inferred, IR usable
    if ir.masked_labels():
        raise PruningIRError("measure_removal_costs needs an IR without masks: call ir.unmask() first "
                             "(or measure before masking)")
    if groups and not any(np.any(group[0].group.scores != 0) for group in groups):
        warnings.warn("measure_removal_costs: the IR has no scores, so each group is measured in channel order; "
                      "run a criterion first", RuntimeWarning, stacklevel=2)
    plans = [(labels, _prefix_sizes(len(labels), points, labels[0].group)) for labels in groups]
    progress = tqdm(total=1 + sum(len(sizes) - 1 for _, sizes in plans), desc="measuring removal costs",
                    disable=not verbose, leave=False)
    measure = _Measurement(loss_calculation_function, batchnorm_loader, progress)
    with progress:
        base = measure(ir.model)
        curves = [_measure_group(ir, labels, sizes, base, measure) for labels, sizes in plans]
    _average_across_ranks(curves)
    scores = {}
    for labels, curve in zip(groups, curves):
        scores.update(zip(labels, _envelope_scores(curve, len(labels))))
    ir.set_scores(scores)
    return curves


class _Measurement:
    """``model -> loss``: batch norms re-estimated first when a loader is given; the model's
    statistics and train/eval flags are put back afterwards."""

    def __init__(self, loss_function: Callable[[nn.Module], Any], batchnorm_loader: Iterable[Any] | None,
                 progress: tqdm):
        self.loss_function = loss_function
        # a loader (DataLoader, list) is iterated again for each evaluation; a one-pass iterator is read once
        self.batchnorm_batches = list(batchnorm_loader) if isinstance(batchnorm_loader, Iterator) \
            else batchnorm_loader
        self.progress = progress

    def __call__(self, model: nn.Module) -> float:
        with kept_statistics(model), torch.no_grad():
            if self.batchnorm_batches is not None:
                tune_batchnorm_statistics(model, self.batchnorm_batches, verbose=False)
            model.eval()
            value = self.loss_function(model)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"loss_calculation_function must return one number, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            value = value.item()
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"loss_calculation_function returned {value} for a partly pruned model; "
                             "it must return a finite loss")
        self.progress.update()
        return value


def _prefix_sizes(count: int, points: int, group: DependencyGroup) -> np.ndarray:
    """0 and ``points`` evenly spaced prefix sizes up to ``count - 1`` (a group keeps one label); for a
    group whose kernel needs its width in multiples (``width_multiple``), the nearest sizes that keep one."""
    sizes = np.rint(np.linspace(0, count - 1, points + 1)).astype(np.int64)
    multiple = group.width_multiple
    if multiple > 1:
        offset = group.channel_count % multiple   # a size s keeps a multiple when s = offset (mod multiple)
        sizes = offset + np.rint((sizes - offset) / multiple).astype(np.int64) * multiple
        sizes = np.concatenate([[0], sizes[(sizes > 0) & (sizes <= count - 1)]])
    return np.unique(sizes)


def _measure_group(ir: PruningIR, labels: list[Label], sizes: np.ndarray, base: float,
                   measure: _Measurement) -> RemovalCurve:
    """The loss increase after removing ``labels[:k]`` for each ``k`` in ``sizes``."""
    group = labels[0].group
    increases = [0.0]
    if group.exact:  # zero the channels in place (as good as removing them), then put them back
        parameters = _bound_parameters(ir, group)
        saved = [parameter.detach().clone() for parameter in parameters]
        try:
            for previous, size in zip(sizes, sizes[1:]):  # nested prefixes: zero the next few labels
                ir.zero_labels(labels[previous:size])
                increases.append(measure(ir.model) - base)
        finally:
            _copy_back(parameters, saved)
    else:  # a normalization over the channels sees zeros: measure the pruned copy
        increases.extend(measure(ir.prune(labels=labels[:size], reconstruct=None, sync_config=False).model) - base
                         for size in sizes[1:])
    return RemovalCurve(group, sizes, np.asarray(increases))


def _average_across_ranks(curves: list[RemovalCurve]) -> None:
    """Under ``torch.distributed`` each rank measured its own data: average the curves (one
    all-reduce), so that every rank gets the same scores and selects the same labels."""
    ranks = world_size()
    if ranks == 1 or not curves:
        return
    averaged = all_reduce_sum(np.concatenate([curve.loss_increase for curve in curves])) / ranks
    for curve, part in zip(curves, np.split(averaged, np.cumsum([len(c.loss_increase) for c in curves])[:-1])):
        curve.loss_increase = part


def _bound_parameters(ir: PruningIR, group: DependencyGroup) -> list[nn.Parameter]:
    """The parameters holding some channel of ``group`` (those ``ir.zero_labels`` may write)."""
    names = {binding.target.name for binding in group.index.parameter_bindings
             if np.isin(binding.classes, group.classes).any()}
    parameters = dict(ir.model.named_parameters(remove_duplicate=False))
    return [parameters[name] for name in sorted(names) if name in parameters]


@torch.no_grad()
def _copy_back(parameters: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for parameter, value in zip(parameters, saved):
        parameter.copy_(value)


def _envelope_scores(curve: RemovalCurve, count: int) -> np.ndarray:
    """Per label (in score order): the marginal cost on the lower convex envelope of the
    interpolated curve, strictly increasing; the last label scores at least the whole increase."""
    losses = np.interp(np.arange(count), curve.removed_counts, curve.loss_increase)
    envelope = _lower_convex_envelope(losses)
    marginal = np.maximum(np.diff(envelope), 0.0)
    scores = np.append(marginal, max(envelope[-1] - envelope[0], 0.0))
    for k in range(1, count):
        if scores[k] <= scores[k - 1]:
            scores[k] = np.nextafter(scores[k - 1], np.inf)
    return scores


def _lower_convex_envelope(values: np.ndarray) -> np.ndarray:
    """The largest convex function below ``values`` at 0..n-1 (monotone-chain lower hull)."""
    hull: list[int] = []
    for x in range(len(values)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (values[b] - values[a]) * (x - a) >= (values[x] - values[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(x)
    return np.interp(np.arange(len(values)), hull, values[hull])
