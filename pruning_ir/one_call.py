"""One call: prune a model to a budget with the strongest recipe measured so far.

``prune(model, example_inputs, macs=0.5, data=loader, loss=loss_fn)`` puts the public pieces
together the way the benchmarks found best, so a first user needs no recipe of their own:
loss-aware scores in rounds (scored in batch statistics when the model has batch norms), the
layers that read removed channels refit by least squares in every round (``reconstruct=``), the
batch norms re-estimated after every refit, a knapsack selector to a MACs, parameter or
latency budget (uniform selection for a ``ratio=``). Without data it falls back to a data-free
one-shot recipe (weight magnitudes) and says so in the report. The caller's model is left
untouched unless ``inplace=True``; ``return_report=True`` adds a :class:`PruneReport`.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import chain
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_share
from .criteria import LossAwareCriterion, MagnitudeCriterion
from .errors import BudgetUnreachableError
from .ir import PruningIR
from .labels import DependencyGroup, Label
from .latency import bind, measure_latency, parameter_count, to_device
from .latency import macs as count_macs
from .modes import kept_training_flags
from .prune_report import BUDGETS, GroupReport, PruneReport
from .reconstruction import METHODS, Reconstruction
from .rounds import prune_in_rounds
from .selectors import ChannelConstraint, KnapsackLabelSelector, UniformLabelSelector

__all__ = ["prune", "PruneReport", "GroupReport"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


def prune(model: nn.Module, example_inputs: torch.Tensor | tuple, *, macs: float | None = None,
          params: float | None = None, latency: float | None = None, ratio: float | None = None,
          data: Iterable[Any] | None = None, loss: Callable[[Any, Any], torch.Tensor] | None = None,
          forward: Callable[[Any, Any], torch.Tensor] | None = None, rounds: int = 5,
          constraint: ChannelConstraint | None = None, leaf_modules: Iterable[Any] | None = None,
          gqa_unit: str = "query_heads", inplace: bool = False, return_report: bool = False,
          verbose: bool = True, reconstruct: str | None = "least_squares"
          ) -> nn.Module | tuple[nn.Module, PruneReport]:
    """Prune ``model`` to one budget and return the smaller model (the same class).

    Args:
        model: the model; left untouched unless ``inplace=True``.
        example_inputs: a tensor or a tuple of positional inputs: labels are inferred and MACs
            and latency are measured on them.
        macs, params, latency: the fraction of the original model's MACs, parameters or
            latency (:func:`measure_latency` on the model's device) to keep, in (0, 1).
        ratio: instead, the share of labels to remove from every group (uniform selection).
        data: re-iterable ``(inputs, targets)`` batches (inputs a tensor, a tuple of positional
            inputs or a dict of keyword inputs), iterated once per round and for the batch norms.
        loss: ``loss(model_output, targets) -> scalar``.
        forward: ``forward(model, batch) -> loss`` for other batch layouts (then ``loss`` may be
            None); ``model`` is a callable that runs the model: call it, nothing else.
        rounds: scoring rounds with data (one shot without).
        constraint: the widths each group may keep (``ChannelConstraint(step=8)`` for fast kernels).
        leaf_modules, gqa_unit: as for :class:`PruningIR` (modules kept whole; the grouped-query unit).
        inplace: prune ``model`` itself (less memory; the per-group report has no costs then).
        return_report: also return a :class:`PruneReport`.
        verbose: progress bars; False silences everything (warnings go to the report's notes).
        reconstruct: with data, each round refits the layers that read the removed channels from
            their input statistics (``"least_squares"``, or ``"bias"``; ``pruning_ir.reconstruction``),
            so the pruned model loses less before any gradient step; no bias is created, so the model
            stays loadable with ``load_pruned``. None: no refit. Data-free pruning has no statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune expects an nn.Module, got {type(model).__name__}")
    kind, value = _budget(macs=macs, params=params, latency=latency, ratio=ratio)
    if data is None and (loss is not None or forward is not None):
        raise TypeError("loss= and forward= score the model on data: pass data= too "
                        "(or neither, for data-free pruning)")
    if data is not None and loss is None and forward is None:
        raise TypeError("data= needs loss=, loss(model_output, targets) -> scalar, or forward=, "
                        "forward(model, batch) -> loss")
    for name, function in (("loss", loss), ("forward", forward)):
        if function is not None and not callable(function):
            signature = "loss(model_output, targets)" if name == "loss" else "forward(model, batch)"
            raise TypeError(f"{name}= must be a function ({signature} -> scalar), got {type(function).__name__} "
                            f"{function!r}")
    if data is not None and iter(data) is data:
        raise TypeError("data must be re-iterable (a list or a DataLoader, not an iterator or generator): "
                        "it is read once per round and for the batch norms")
    if reconstruct is not None and reconstruct not in METHODS:
        raise ValueError(f"reconstruct must be one of {METHODS} or None, got {reconstruct!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple):
        raise TypeError(f"example_inputs must be a tensor or a tuple of positional inputs, got "
                        f"{type(example_inputs).__name__}")
    device = next(chain(model.parameters(), model.buffers()), torch.empty(0)).device
    inputs = to_device(inputs, device)
    timings: dict[str, float] = {}
    notes: list[str] = []
    with _recorded_warnings(notes, verbose):
        with _timed(timings, "labels"):  # traced as calibration calls the model, so its graph matches theirs
            args, kwargs = (inputs, {}) if data is None else _first_call(model, data, loss, forward, device)
            ir = PruningIR(model, leaf_modules=leaf_modules, gqa_unit=gqa_unit).infer_labels(*args, **kwargs)
            original = [(g, g.labels) for g in ir.groups if g.prunable]
        with _timed(timings, "measure before"):
            macs_before, params_before = count_macs(model, *inputs), parameter_count(model)
            cost = {"macs": bind(count_macs, *inputs), "params": bind(parameter_count),
                    "latency": bind(measure_latency, *inputs, device=device, statistic="min")}.get(kind)
            latency_before = cost(model) if kind == "latency" else None
        before = {"macs": macs_before, "params": params_before, "latency": latency_before}
        data_free = data is None
        norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
        tunable = bool(norms) and all(norm.track_running_stats for norm in norms)
        bn_each_round = not data_free and tunable
        refit = None if data_free else reconstruct
        recipe = _recipe(kind, data_free, rounds, bool(norms), tunable, bn_each_round, refit)
        if kind == "ratio":
            def factory(share: float) -> UniformLabelSelector:
                return UniformLabelSelector(share, constraint=constraint)
            target = value
        else:
            def factory(budget: float) -> KnapsackLabelSelector:
                return KnapsackLabelSelector(budget, cost, constraint=constraint, verbose=False,
                                             normalize="mean" if data_free else None)
            target = value * before[kind]
        with _timed(timings, "prune"), _budget_in_its_terms(kind, value, before), _inplace_failure(model, inplace):
            pruned = prune_in_rounds(
                ir, factory, target, None if data_free else _calibration(data, loss, forward, device),
                rounds=1 if data_free else rounds, criterion=MagnitudeCriterion if data_free else LossAwareCriterion,
                latency_function=None if kind == "ratio" else cost,
                batchnorm_loader=data if bn_each_round else None, inplace=inplace,
                batchnorm_forward=lambda m, batch: _loss(m, batch, loss, forward, device),
                score_in_batch_statistics=bool(norms) and not data_free, verbose=verbose,
                reconstruct=None if refit is None else partial(Reconstruction, method=refit, create_bias=False))
        with _timed(timings, "measure after"):
            result = pruned.model
            macs_after, params_after = count_macs(result, *inputs), parameter_count(result)
            latency_after = cost(result) if kind == "latency" else None
        kept = {int(c) for g in pruned.groups for c in g.classes}
        reached = {"macs": macs_after / macs_before if macs_before else 1.0,
                   "params": params_after / params_before if params_before else 1.0,
                   "latency": latency_after / latency_before if kind == "latency" and latency_before else 1.0,
                   "ratio": _share_removed(original, kept)}[kind]
        if kind in ("macs", "params") and reached > value * (1 + 1e-9):
            warnings.warn(f"prune: {kind} reached {reached:.4f} of the original, above the budget {value}",
                          RuntimeWarning, stacklevel=2)
        if kind == "latency" and reached > value:
            notes.append(f"the measured latency is {reached / value:.3f}x the budget (measurements are noisy)")
        if data_free:
            notes.append("data-free: pass data= and loss= (or forward=) for loss-aware scores in rounds and "
                         "batch-norm re-estimation, which keep much more accuracy; fine-tune after pruning")
        if not return_report:
            return result
        with _timed(timings, "report"):
            groups = _group_reports(ir, original, kept, inputs, macs_before, params_before, inplace, verbose)
        if inplace:
            notes.append("inplace=True: the original model is gone, so per-group parameters and MACs are not measured")
    report = PruneReport(recipe, data_free, kind, value, reached, macs_before, macs_after, params_before,
                         params_after, latency_before, latency_after, groups, timings, notes)
    return result, report


@contextmanager
def _budget_in_its_terms(kind: str, value: float, before: dict[str, float | None]) -> Iterator[None]:
    """An unreachable budget reported as the share the caller asked for, not in the selector's units."""
    try:
        yield
    except BudgetUnreachableError as error:
        floor = error.smallest / before[kind] if before.get(kind) else float("nan")
        if floor >= 1 - 1e-9:
            raise BudgetUnreachableError(
                f"{kind}={value} cannot be reached: nothing in this model can be pruned, every group is kept whole "
                "(print(PruningIR(model).infer_labels(...)) says which channels and why)",
                error.target, error.smallest) from error
        raise BudgetUnreachableError(
            f"{kind}={value} cannot be reached: the smallest model pruning can reach keeps {floor:.3f} of the "
            f"{kind} (every prunable group at its narrowest; the rest is kept whole: print(PruningIR(model)"
            f".infer_labels(...)) says which channels and why); ask for {kind} >= {floor:.3f}",
            error.target, error.smallest) from error


@contextmanager
def _inplace_failure(model: nn.Module, inplace: bool) -> Iterator[None]:
    """With ``inplace=True`` a failure leaves the model as far as pruning got: say so, and clear the gradients
    the calibration left (with ``inplace=False`` the model was never touched)."""
    try:
        yield
    except BaseException as error:
        if inplace:
            model.zero_grad(set_to_none=True)
            if hasattr(error, "add_note"):
                error.add_note("pruning_ir.prune(inplace=True) failed midway: the model is left as far as pruning got "
                               "(possibly partly pruned; gradients cleared). Pass inplace=False to keep it untouched.")
        raise


def _budget(**budgets: float | None) -> tuple[str, float]:
    """The one budget given, checked: its name and its value in (0, 1)."""
    given = {name: value for name, value in budgets.items() if value is not None}
    if not given:
        raise TypeError("prune needs exactly one budget: macs=, params= or latency= (the fraction of the model's "
                        "MACs, parameters or latency to keep) or ratio= (the share of labels to remove)")
    if len(given) > 1:
        raise TypeError(f"prune takes exactly one budget, got {len(given)}: {', '.join(f'{k}=' for k in given)}")
    kind, value = given.popitem()
    return kind, check_share(f"{kind}= ({BUDGETS[kind]}, as a fraction)", value, "(0, 1)")


def _recipe(kind: str, data_free: bool, rounds: int, has_norms: bool, tunable: bool, bn_each_round: bool,
            refit: str | None) -> str:
    """A sentence saying which recipe runs."""
    selector = "UniformLabelSelector" if kind == "ratio" else f"KnapsackLabelSelector to the {kind} budget"
    if data_free:
        normalize = "" if kind == "ratio" else " (normalize='mean')"
        return f"data-free one shot: MagnitudeCriterion scores, {selector}{normalize}, no batch-norm re-estimation"
    scoring = "LossAwareCriterion scored in batch statistics" if has_norms else "LossAwareCriterion"
    text = f"prune_in_rounds x{rounds}: {scoring}, {selector} in each round"
    if refit is not None:
        how = "by least squares" if refit == "least_squares" else "by bias compensation"
        text += f", the layers that read removed channels refit {how} (reconstruct={refit!r})"
    if bn_each_round:
        return text + ", batch norms re-estimated on data after every round (the last at the end)"
    return text + (", batch norms without running statistics left as they are" if has_norms else "")


def _calibration(data: Iterable[Any], loss: Callable | None, forward: Callable | None,
                 device: torch.device) -> Callable[[Callable[..., Any]], None]:
    """``calibrate(score_collector)`` for prune_in_rounds: every batch's loss, backpropagated."""
    def calibrate(score_collector: Callable[..., Any]) -> None:
        seen = 0
        for batch in data:
            with torch.enable_grad():  # also when prune() is called under no_grad
                value = _loss(score_collector, batch, loss, forward, device)
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ""
                raise TypeError(f"the loss must be a one-element tensor that requires grad, got "
                                f"{type(value).__name__}{shape}")
            value.backward()
            seen += 1
        if not seen:
            raise ValueError("data gave no batch: nothing to score the model on")
    return calibrate


def _loss(run: Callable[..., Any], batch: Any, loss: Callable | None, forward: Callable | None,
          device: torch.device) -> Any:
    """The loss of one batch: ``forward(run, batch)``, or ``loss(run(inputs), targets)``."""
    batch = to_device(batch, device)
    if forward is not None:
        return forward(run, batch)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"data must give (inputs, targets) batches, got {type(batch).__name__}; "
                        "pass forward=lambda model, batch: ... for other layouts")
    inputs, targets = batch
    return loss(_call(run, inputs), targets)


def _call(run: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return run(**inputs)
    if isinstance(inputs, (tuple, list)):
        return run(*inputs)
    return run(inputs)


def _first_call(model: nn.Module, data: Iterable[Any], loss: Callable | None, forward: Callable | None,
                device: torch.device) -> tuple[tuple, dict]:
    """The inputs the calibration passes to the model, seen on the first batch (eval mode, no grad)."""
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data gave no batch: nothing to score the model on")
    calls: list[tuple[tuple, dict]] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return model(*args, **kwargs)

    with kept_training_flags(model), torch.no_grad():
        model.eval()
        _loss(run, first, loss, forward, device)
    if not calls:
        raise TypeError("forward(model, batch) never called the model it was given")
    return calls[0]


def _share_removed(original: list[tuple[DependencyGroup, list[Label]]], kept: set[int]) -> float:
    total = sum(len(labels) for _, labels in original)
    removed = sum(label.class_id not in kept for _, labels in original for label in labels)
    return removed / total if total else 0.0


def _group_reports(ir: PruningIR, original: list[tuple[DependencyGroup, list[Label]]], kept: set[int], inputs: tuple,
                   macs_before: float, params_before: float, inplace: bool, verbose: bool) -> list[GroupReport]:
    """Per group: labels removed, and (from the original, unless it was pruned in place) the
    parameters and MACs that removing those labels alone saves: each measured on a pruned copy."""
    reports = []
    for group, labels in tqdm(original, desc="report", disable=not verbose, leave=False):
        removed = [label for label in labels if label.class_id not in kept]
        channels = tuple(label.channel for label in removed)
        params = flops = None
        if not inplace:
            params, flops = 0, 0.0
            if removed:
                with warnings.catch_warnings():  # a measuring copy: what its prune says is not news
                    warnings.simplefilter("ignore")
                    alone = ir.prune(labels=removed, verify=False, reconstruct=None,  # from the verified result
                                     sync_config=False).model
                params = int(params_before - parameter_count(alone))
                flops = macs_before - count_macs(alone, *inputs)
        modules = tuple(name or "<model>" for name in group.modules)
        reports.append(GroupReport(group.id, modules, len(labels), len(removed), channels, params, flops))
    return reports


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


@contextmanager
def _recorded_warnings(notes: list[str], verbose: bool) -> Iterator[None]:
    """Warnings raised inside go to ``notes``; shown too when ``verbose``, also on error. Warnings
    that differ only in their numbers (one per round: widths, counts) are one note, the last
    one, with how often it came: the rounds before it are stages of the same model."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        last: dict[str, tuple[warnings.WarningMessage, str]] = {}
        counts: dict[str, int] = {}
        for warning in caught:
            text = f"{warning.category.__name__}: {warning.message}"
            key = re.sub(r"\d+", "#", text)
            counts[key] = counts.get(key, 0) + 1
            last.pop(key, None)
            last[key] = (warning, text)
        for key, (warning, text) in last.items():
            notes.append(text if counts[key] == 1 else f"{text} ({counts[key]} similar warnings; the last shown)")
            if verbose:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
