"""Pruning in rounds: score, remove a share, score the smaller model again, and so on.

One-shot pruning scores every label on the full model, so it cannot see how the remaining
channels take over from the removed ones. Removing the same amount in ``rounds`` equal steps,
re-calibrating in between, can (Molchanov et al. 2019 prune iteratively too)::

    def calibrate(score_collector):
        for inputs, targets in loader:
            loss_fn(score_collector(inputs), targets).backward()

    ir = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibrate, rounds=5, batchnorm_loader=loader)

Round ``k`` removes, cumulatively, ``k / rounds`` of the target: the selector factory gets
the share of the original labels removed after that round (or, with ``latency_function``,
a latency falling linearly to ``target``), and ``select(removed_before=...)`` tells it how
many labels each group lost in earlier rounds, so the last round ends exactly where one-shot
selection with the same selector would. Each round is a plain score -> select -> ``prune``
on the model pruned so far. With ``batchnorm_loader`` the batch-norm statistics are
re-estimated after every round, as pruning leaves them stale; calibrating with stale
statistics scores a broken model. The cost is ``rounds`` calibration passes instead of one.
"""

from __future__ import annotations

from functools import partial

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batchnorm import batch_statistics, tune_batchnorm_statistics
from .checks import check_share
from .criteria import Criterion, DataFreeCriterion, LossAwareCriterion
from .errors import LabelsNotInferredError
from .ir import PruningIR
from .optimizer_state import move_optimizer, plan_optimizer_copy
from .reconstruction import METHODS, InputStatistics, Reconstruction, collect_statistics
from .schedules import LinearSchedule, check_step
from .selectors import LabelSelector

CriterionFactory = Callable[[PruningIR], Criterion]
ReconstructionFactory = Callable[[InputStatistics], Reconstruction]

__all__ = ["prune_in_rounds"]


def prune_in_rounds(ir: PruningIR, selector_factory: Callable[[float], LabelSelector], target: float,
                    calibrate: Callable[[Callable[..., Any]], None] | None = None, *, rounds: int = 5,
                    criterion: CriterionFactory = LossAwareCriterion,
                    latency_function: Callable[[nn.Module], float] | None = None,
                    batchnorm_loader: Iterable[Any] | None = None,
                    batchnorm_forward: Callable[[nn.Module, Any], Any] | None = None, inplace: bool = False,
                    optimizer: torch.optim.Optimizer | None = None, score_in_batch_statistics: bool = False,
                    reconstruct: str | ReconstructionFactory | None = None, verbose: bool = True) -> PruningIR:
    """Prune ``ir`` to ``target`` in ``rounds`` steps, re-scoring the partly pruned model before each.

    Args:
        ir: the IR to prune; its labels are inferred on the first calibration call if needed.
        selector_factory: ``target -> LabelSelector``, such as ``UniformLabelSelector`` or
            ``lambda share: GlobalScoreLabelSelector(share, normalize="mean")``; with
            ``latency_function``, ``lambda latency: KnapsackLabelSelector(latency, ...)``.
        target: the share of labels to remove in all, in (0, 1); with ``latency_function``,
            the latency to reach.
        calibrate: ``calibrate(score_collector)`` runs the calibration data through
            ``score_collector(...)`` and calls ``loss.backward()`` on each output, once per round.
            Not needed for a data-free criterion (magnitude, random).
        rounds: how many scoring-and-selection rounds (1: one-shot).
        criterion: ``ir -> Criterion`` (a class or a ``functools.partial``).
        latency_function: ``model -> cost``; ``target`` is then a cost below the model's own.
        batchnorm_loader: batches to re-estimate the batch norms on after each round
            (:func:`tune_batchnorm_statistics`); None keeps the statistics the model has.
        batchnorm_forward: ``forward(model, batch)`` runs one of those batches (for layouts other
            than a tensor, an ``(inputs, targets)`` pair or a dict of keyword inputs).
        inplace: prune ``ir``'s model itself (less memory; ``ir`` is used up).
        optimizer: the training optimizer, built on ``ir.model``'s parameters: moved onto the
            returned model, its state sliced alike (``PruningIR.prune``). Checked before the first
            round; if a round fails, it is left as it was.
        score_in_batch_statistics: calibrate each round inside :func:`batch_statistics` (batch
            norms on each calibration batch's statistics, running ones untouched), so that a round
            scores removals as the re-estimated model will see them; wants batches of 16 or more.
        reconstruct: ``"bias"`` or ``"least_squares"``: each round collects the input statistics of
            the model pruned so far during its calibration pass and refits the layers that read the
            removed channels (``pruning_ir.reconstruction``); needs a data-driven criterion. For
            options, a factory ``statistics -> Reconstruction``, such as
            ``functools.partial(Reconstruction, method="least_squares", create_bias=False)``.
        verbose: a progress bar over the rounds.

    Returns the pruned IR, like ``ir.prune``: its model is the smaller model, without the
    gradients the calibration passes left.
    """
    if not isinstance(ir, PruningIR):
        raise TypeError(f"prune_in_rounds expects a PruningIR, got {type(ir).__name__}")
    check_step("rounds", rounds)
    base_latency = None if latency_function is None else float(latency_function(ir.model))
    share = _share(target, base_latency)
    if criterion is LossAwareCriterion:  # each round's statistics are collected as reconstruct= asks, not twice
        criterion = partial(LossAwareCriterion, input_statistics=False)
    data_free = isinstance(criterion(ir), DataFreeCriterion)
    if calibrate is None and not data_free:
        raise TypeError("prune_in_rounds needs calibrate(score_collector) for a data-driven criterion "
                        "(LossAwareCriterion): it runs the calibration data once per round")
    if data_free and not ir.labels_inferred:
        raise LabelsNotInferredError("prune_in_rounds with a data-free criterion runs no data: infer the labels "
                                     "first (ir.infer_labels(*example_inputs))")
    reconstruction = _reconstruction(reconstruct)
    if reconstruct is not None and data_free:
        raise TypeError("prune_in_rounds(reconstruct=...) collects statistics during the calibration pass: "
                        "it needs a data-driven criterion and calibrate")
    move = None if optimizer is None else plan_optimizer_copy(optimizer, ir.model)
    work = ir if inplace else ir.prune(labels=[], reconstruct=None) if ir.labels_inferred else copy.deepcopy(ir)
    with _restored_on_error(optimizer if work is not ir else None):
        if move is not None and work is not ir:
            move_optimizer(optimizer, move, work.model)
        schedule = LinearSchedule(threshold=share, start=share / rounds, gamma=share / rounds, stepsize=1)
        original_sizes: dict[int, int] = {}  # class id of a label -> labels of its group before round 1
        for step in tqdm(range(1, schedule.updates + 1), desc="pruning in rounds", disable=not verbose):
            statistics = None if reconstruct is None else collect_statistics(work)
            with statistics if statistics is not None else contextlib.nullcontext():
                _score(work, criterion, calibrate, data_free, score_in_batch_statistics)
            if not original_sizes:
                original_sizes = {int(c): len(g.classes) for g in work.groups if g.prunable for c in g.classes}
            ratio = schedule.ratio_at(step)
            selector = selector_factory(ratio if base_latency is None else (1.0 - ratio) * base_latency)
            if not isinstance(selector, LabelSelector):
                raise TypeError(f"selector_factory returned {type(selector).__name__}, not a LabelSelector")
            removed_before = {g.id: original_sizes[int(g.classes[0])] - len(g.classes)
                              for g in work.groups if g.prunable and len(g.classes)}
            labels = selector.select(work, removed_before=removed_before)
            work = work.prune(labels=labels, inplace=True, optimizer=optimizer,
                              reconstruct=None if statistics is None else reconstruction(statistics))
            if batchnorm_loader is not None:
                tune_batchnorm_statistics(work.model, batchnorm_loader, forward=batchnorm_forward, verbose=False)
        work.model.zero_grad(set_to_none=True)  # calibration sums over all rounds
        return work


def _reconstruction(reconstruct: str | ReconstructionFactory | None) -> ReconstructionFactory | None:
    """``statistics -> Reconstruction`` for ``reconstruct``, checked before any round runs."""
    if reconstruct is None:
        return None
    if not callable(reconstruct) and reconstruct not in METHODS:
        raise ValueError(f"reconstruct must be one of {METHODS}, None, or a factory statistics -> Reconstruction, "
                         f"got {reconstruct!r}")

    def factory(statistics: InputStatistics) -> Reconstruction:
        made = reconstruct(statistics) if callable(reconstruct) else Reconstruction(statistics, reconstruct)
        if not isinstance(made, Reconstruction):
            raise TypeError(f"the reconstruct factory returned {type(made).__name__}, not a Reconstruction")
        return made
    return factory


def _score(ir: PruningIR, criterion: CriterionFactory, calibrate: Callable[[Callable[..., Any]], None] | None,
           data_free: bool, in_batch_statistics: bool) -> None:
    """Score ``ir``'s labels for one round: a data-free criterion applied, or ``calibrate`` run
    through a fresh data-driven one (inside ``batch_statistics`` when asked)."""
    if data_free:
        criterion(ir).apply()
        return
    with batch_statistics(ir.model) if in_batch_statistics else contextlib.nullcontext():
        with criterion(ir) as score_collector:
            calibrate(score_collector)


@contextlib.contextmanager
def _restored_on_error(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Put ``optimizer`` back on its parameters and state if the block raises."""
    if optimizer is None:
        yield
        return
    parameters, state = [list(group["params"]) for group in optimizer.param_groups], optimizer.state
    try:
        yield
    except BaseException:
        for group, held in zip(optimizer.param_groups, parameters):
            group["params"] = held
        optimizer.state = state
        raise


def _share(target: float, base_latency: float | None) -> float:
    """The share of labels the rounds remove in all: ``target`` itself, or the latency reduction it asks for."""
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TypeError(f"target must be a number, got {target!r}")
    if base_latency is None:
        return check_share("target (a share of labels; a latency target needs latency_function=)", target, "(0, 1)")
    if not 0.0 < target < base_latency:
        raise ValueError(f"target latency {target:.6g} must lie between 0 and the model's own latency "
                         f"{base_latency:.6g}")
    return 1.0 - target / base_latency
