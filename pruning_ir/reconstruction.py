"""Reconstruction at prune time: give back to each consumer what its removed input channels carried.

Right after pruning, every layer that read a removed channel misses that channel's contribution,
which is why a pruned model needs fine-tuning. Two refits close most of the gap without a
gradient step, from the input statistics of :mod:`pruning_ir.input_statistics` (mean ``mu`` and
covariance ``C`` of each consumer's input features, ``K`` kept and ``R`` removed):

* ``"bias"`` (FLAP, An et al. 2024): the removed inputs' mean contribution moves into the bias,
  ``b' = b + W_R mu_R`` (a bias is created when the layer has none);
* ``"least_squares"`` (ThiNet, Luo et al. 2017; He et al. 2017): the kept weights are refit so the
  output matches the unpruned one on the calibration inputs, with the bias corrected alike:
  ``W'_K = W_K + W_R C_RK (C_KK + lambda I)^-1``, ``b' = b + W_R mu_R - (W'_K - W_K) mu_K``. This is
  ``W C[:, K] (C_KK + lambda I)^-1`` with the ridge pulling towards the original weights rather than
  towards 0, so removing inputs that are exactly 0 changes nothing (``C_RK = 0``), and ``lambda``
  is relative to the mean variance of the kept inputs (``ridge``).

``ir.prune(labels=..., reconstruct=Reconstruction(stats))`` computes the new weights from the
unpruned model before slicing and writes them into the pruned model after; ``reconstruction.report``
says, per consumer that lost inputs, what was done or why it was skipped. Each consumer is refit
independently, as if the layers before it were unpruned; ``sequential=loader`` (or :meth:`Reconstruction.refine`
after the prune) then refits them one after the other on the inputs the pruned model really gives
them (:mod:`pruning_ir.sequential_refit`).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .input_statistics import ConsumerStatistics, InputStatistics, collect_statistics
from .channels import ParameterBinding
from .labels import ChannelIndex, ClassBinding
from .sequential_refit import METHODS, RefitTarget, check_batches, refit_sequentially

__all__ = ["Reconstruction", "ReconstructionReport", "ConsumerOutcome", "InputStatistics", "collect_statistics",
           "METHODS"]



@dataclass(frozen=True)
class ConsumerOutcome:
    """What reconstruction did to one consumer weight that lost input features."""

    name: str
    method: str | None          # "bias", "least_squares", or None when skipped
    removed: int                # input features removed
    kept: int
    reason: str = ""            # why it was skipped, or why it fell back to bias compensation


class ReconstructionReport:
    """The outcome of every consumer that lost input features (``outcomes``), and the time taken;
    after a sequential refit, ``sequential`` (the consumers refit again, in that order) and
    ``sequential_skipped`` (those it could not reach, with the reason), ``sequential_seconds``."""

    def __init__(self, outcomes: list[ConsumerOutcome], seconds: float):
        self.outcomes = outcomes
        self.seconds = seconds
        self.sequential: list[str] | None = None
        self.sequential_skipped: dict[str, str] = {}
        self.sequential_seconds = 0.0

    @property
    def refit(self) -> list[str]:
        return [o.name for o in self.outcomes if o.method is not None]

    @property
    def skipped(self) -> dict[str, str]:
        return {o.name: o.reason for o in self.outcomes if o.method is None}

    def __str__(self) -> str:
        lines = [f"reconstruction: {len(self.refit)} consumers refit, {len(self.skipped)} skipped "
                 f"({self.seconds:.3g} s)"]
        for o in self.outcomes:
            what = o.method or "skipped"
            lines.append(f"  {o.name}: {what} ({o.removed} of {o.removed + o.kept} input features removed)"
                         + (f": {o.reason}" if o.reason else ""))
        if self.sequential is not None:
            lines.append(f"sequential refit: {len(self.sequential)} consumers, in this order "
                         f"({self.sequential_seconds:.3g} s): {', '.join(self.sequential)}")
            lines += [f"  {name}: not refit sequentially: {why}" for name, why in self.sequential_skipped.items()]
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class _Refit:
    """New values for one pruned consumer: weight (all output rows, kept inputs) and bias."""

    name: str
    method: str
    weight: torch.Tensor
    shift: torch.Tensor | None          # added to the output: into the bias, or out of a batch norm's mean
    into: str | None                    # "bias", "create" (a new bias) or "running_mean"
    target: str | None                  # the bias or running-mean name
    out_classes: np.ndarray | None = None
    kept_out: np.ndarray | None = None


class Reconstruction:
    """What ``ir.prune(labels=..., reconstruct=...)`` should refit, from ``statistics``.

    Args:
        statistics: :class:`InputStatistics` collected on the IR being pruned (the same labels).
        method: ``"least_squares"`` (default) or ``"bias"`` (see the module docstring).
        ridge: ``lambda`` relative to the mean variance of the kept inputs; it keeps the solve
            well-posed when kept inputs are (nearly) collinear, and pulls towards the old weights.
        create_bias: where a consumer has no bias and no batch norm right after it (whose running
            mean takes the shift instead), create one; it joins an optimizer passed to prune() and is
            listed in the IR's ``created_parameters``, which ``save_pruned(ir)`` records for
            ``load_pruned``; a Hugging Face config cannot describe it. False: the refit is uncentred
            instead (``C`` is the second moment), and bias compensation skips the layer.
        sequential: calibration batches (a list or a DataLoader: run once per refit consumer, through
            the unpruned and the pruned model): after the independent refit, refit the consumers one
            after the other on the inputs the pruned model gives them (:meth:`refine`). The prune then
            holds a copy of the unpruned model until it returns. None (default): independent only.
        forward: ``forward(model, batch)`` for ``sequential`` (default: a tensor, the first item of a
            tuple, a dict of keyword inputs); max_batches: the batches of it to use (None: all).
        warn: warn when a consumer that lost inputs could not be reconstructed.
        verbose: a progress bar over the consumers.

    After the prune, ``report`` (a :class:`ReconstructionReport`) lists what was done.
    """

    def __init__(self, statistics: InputStatistics, method: str = "least_squares", *, ridge: float = 1e-3,
                 create_bias: bool = True, sequential: Iterable[Any] | None = None,
                 forward: Callable[[nn.Module, Any], Any] | None = None, max_batches: int | None = None,
                 warn: bool = True, verbose: bool = False):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(statistics, InputStatistics):
            raise TypeError(f"Reconstruction expects InputStatistics, got {type(statistics).__name__}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if sequential is not None and iter(sequential) is sequential:
            raise TypeError("Reconstruction(sequential=...) runs the batches once per refit consumer: pass a "
                            "re-iterable loader (a list of batches or a DataLoader), not an iterator")
        self.statistics = statistics
        self.method = method
        self.ridge = float(ridge)
        self.create_bias = create_bias
        self.sequential = sequential
        self.forward = forward
        self.max_batches = max_batches
        self.warn = warn
        self.verbose = verbose
        self.report: ReconstructionReport | None = None
        self._targets: list[RefitTarget] | None = None

    def __getstate__(self) -> dict:
        """Pickled (with the pruned IR that holds it) without the sequential refit's batches and forward."""
        state = dict(self.__dict__)
        state["sequential"] = state["forward"] = None
        return state

    # -- called by PruningIR.prune -------------------------------------------------------------
    def prepare(self, model: nn.Module, index: ChannelIndex,
                removed: np.ndarray) -> Callable[[nn.Module, ChannelIndex], None]:
        """Compute the refit weights from ``model`` (unpruned, masks baked) before it is sliced;
        returns ``apply(pruned_model, pruned_index)``, which writes them into the pruned model
        (and binds a created bias to its output channels in the pruned index), then, with
        ``sequential``, refits them one after the other."""
        started = time.perf_counter()
        stats = self.statistics
        if stats.active:
            raise RuntimeError("prune(reconstruct=...) inside the statistics' with-block: leave it first")
        if stats.token is None:
            raise ValueError("the statistics saw no forward pass of this IR's model (collect them first)")
        if stats.token != index.token:
            raise ValueError("these statistics were collected on another IR's labels: collect them on the IR "
                             "you prune (after prune(), the returned IR has new labels)")
        out_classes = {b.target.name: b.classes for b in index.parameter_bindings if b.target.dim == 0}
        norms = _batchnorm_after(stats.ir.graph) if stats.ir.has_graph else {}
        outcomes, refits = [], []
        consumers = [s for s in stats.consumers.values() if removed[s.classes].any()]
        for consumer in tqdm(consumers, desc="reconstruction", disable=not self.verbose, leave=False):
            drop = removed[consumer.classes]
            counts = (int(drop.sum()), int((~drop).sum()))
            reason = consumer.skipped or ("" if consumer.count > 0 else stats.skipped.get(consumer.name, ""))
            if reason:
                outcomes.append(ConsumerOutcome(consumer.name, None, *counts, reason))
                continue
            method, note = self.method, ""
            if method == "least_squares" and consumer.outer is None:
                method, note = "bias", consumer.outer_skipped or "no second moments"
            into, target = ("bias", consumer.bias) if consumer.bias is not None else \
                ("running_mean", norms[consumer.name]) if consumer.name in norms else \
                ("create", f"{consumer.name.rpartition('.')[0]}.bias") \
                if consumer.creatable_bias and self.create_bias else (None, None)
            if into is None and method == "bias":
                outcomes.append(ConsumerOutcome(consumer.name, None, *counts, "no bias to compensate into"))
                continue
            refit = self._refit(model, consumer, drop, method, into, target)
            refit.out_classes = out_classes.get(consumer.name)
            refit.kept_out = None if refit.out_classes is None else np.flatnonzero(~removed[refit.out_classes])
            refits.append(refit)
            outcomes.append(ConsumerOutcome(consumer.name, method, *counts, note))
        self._outcomes, self._started = outcomes, started
        skipped = [o for o in outcomes if o.method is None]
        if skipped and self.warn:
            listing = "\n".join(f"  {o.name}: {o.reason}" for o in skipped[:8])
            warnings.warn(f"reconstruction: {len(skipped)} consumers that lose input channels are not refit:\n"
                          f"{listing}", stacklevel=3)

        targets = [RefitTarget(r.name, r.method, r.kept_out, r.into, r.target) for r in refits]
        dense = copy.deepcopy(model) if self.sequential is not None and targets else None  # model is sliced next
        if dense is not None:  # batches the forward cannot run fail now, before the prune writes anything
            check_batches(dense, self.sequential, self.forward)

        def apply(pruned: nn.Module, pruned_index: ChannelIndex) -> None:
            with torch.no_grad():
                for refit in refits:
                    _write(pruned, pruned_index, refit)
            self._targets = targets
            self.report = ReconstructionReport(self._outcomes, time.perf_counter() - self._started)
            if dense is not None:
                self.refine(dense, pruned, self.sequential, forward=self.forward, max_batches=self.max_batches)

        return apply

    def refine(self, unpruned: nn.Module, pruned: Any, loader: Iterable[Any], *,
               forward: Callable[[nn.Module, Any], Any] | None = None,
               max_batches: int | None = None) -> ReconstructionReport:
        """Refit the consumers this reconstruction refit, one after the other in the order the pruned
        model calls them, each on the inputs the pruned model now gives it (the layers before it pruned
        and refit), to reproduce ``unpruned``'s output (:mod:`pruning_ir.sequential_refit`).

        ``unpruned``: the model that was pruned (``ir.model`` after ``ir.prune(...)`` on a copy, the
        default); ``pruned``: the pruned model or its IR; ``loader``: calibration batches, run once per
        consumer through both models (a list or a DataLoader). Conv patches are sampled as the
        statistics sample them (``max_positions``, on the same positions in both models), in their
        ``dtype``. Returns the report, with ``sequential`` filled in; on an error the pruned model
        is left as it was.
        """
        if self._targets is None or self.report is None:
            raise RuntimeError("refine() refits what a prune with this Reconstruction refit: call "
                               "ir.prune(labels=..., reconstruct=reconstruction) first")
        model = pruned if isinstance(pruned, nn.Module) else getattr(pruned, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"refine() needs the pruned model or its PruningIR, got {type(pruned).__name__}")
        if model is unpruned:
            raise ValueError("refine() got the same model twice: pass the unpruned model and its pruned copy")
        started = time.perf_counter()
        stats = self.statistics
        order, skipped = refit_sequentially(unpruned, model, self._targets, loader, forward=forward,
                                            max_batches=max_batches, ridge=self.ridge,
                                            max_positions=stats.max_positions, dtype=stats.dtype,
                                            seed=0, verbose=self.verbose)
        self.report.sequential, self.report.sequential_skipped = order, skipped
        self.report.sequential_seconds = time.perf_counter() - started
        if skipped and self.warn:
            warnings.warn(f"sequential refit: {len(skipped)} consumers were not called on the loader's batches "
                          f"and keep their independent refit: {sorted(skipped)[:8]}", stacklevel=2)
        return self.report

    @torch.no_grad()
    def _refit(self, model: nn.Module, consumer: ConsumerStatistics, drop: np.ndarray, method: str,
               into: str | None, target: str | None) -> _Refit:
        original = model.get_parameter(consumer.name)
        dtype = consumer.total.dtype
        weight = original.detach().to(device=consumer.total.device, dtype=dtype).reshape(original.shape[0], -1)
        kept = torch.as_tensor(np.flatnonzero(~drop), device=weight.device)
        gone = torch.as_tensor(np.flatnonzero(drop), device=weight.device)
        mean = consumer.mean()
        w_kept, w_gone = weight[:, kept], weight[:, gone]
        shift = w_gone @ mean[gone]
        if method == "least_squares":
            moment = consumer.second_moment()
            centred = into is not None
            cov = moment - torch.outer(mean, mean) if centred else moment
            c_kk = cov[kept][:, kept]
            c_kr = cov[kept][:, gone]
            scale = torch.diagonal(c_kk).mean().clamp_min(torch.finfo(dtype).tiny)
            lam = self.ridge * scale
            system = c_kk + lam * torch.eye(len(kept), dtype=dtype, device=weight.device)
            delta = torch.linalg.solve(system, c_kr @ w_gone.T).T  # W_R C_RK (C_KK + lambda I)^-1
            w_kept = w_kept + delta
            shift = shift - delta @ mean[kept] if centred else None
        channels = int(len(kept) // max(int(np.prod(consumer.kernel)) if consumer.kernel else 1, 1))
        shaped = w_kept.reshape(original.shape[0], channels, *consumer.kernel) if consumer.kernel else w_kept
        shift = None if into is None else shift.to(original.dtype)
        return _Refit(consumer.name, method, shaped.to(original.dtype), shift, into, target)


def _batchnorm_after(graph) -> dict[str, str]:
    """Per consumer weight without a bias whose only user is a batch norm: that norm's running
    mean (a constant shift of the consumer's output leaves it through the mean, not a new bias)."""
    import torch.fx as fx
    import torch.nn.functional as F
    calls: dict[str, int] = {}
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (F.linear, F.conv1d, F.conv2d):
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        calls[weight.target] = calls.get(weight.target, 0) + 1
        users = list(node.users)
        if bias is not None or len(users) != 1 or users[0].target is not F.batch_norm:
            continue
        norm = users[0]
        mean = norm.args[1] if len(norm.args) > 1 else norm.kwargs.get("running_mean")
        if norm.args[0] is node and isinstance(mean, fx.Node) and mean.op == "get_attr":
            found[weight.target] = mean.target
    return {name: mean for name, mean in found.items() if calls[name] == 1}


def _write(pruned: nn.Module, index: ChannelIndex, refit: _Refit) -> None:
    """Write ``refit`` into the pruned model: its kept output rows, and the output shift into the
    bias, a created bias (bound in ``index`` like the weight's outputs) or a batch norm's mean."""
    rows = None if refit.kept_out is None else torch.as_tensor(refit.kept_out, device=refit.weight.device)
    weight = refit.weight if rows is None else refit.weight.index_select(0, rows)
    target = pruned.get_parameter(refit.name)
    if target.shape != weight.shape:
        raise RuntimeError(f"reconstruction: {refit.name} is {tuple(target.shape)} after pruning, the refit "
                           f"{tuple(weight.shape)} (please report it)")
    target.copy_(weight.to(target.device))
    if refit.shift is None:
        return
    shift = refit.shift if rows is None else refit.shift.index_select(0, rows.to(refit.shift.device))
    if refit.into == "bias":
        bias = pruned.get_parameter(refit.target)
        bias.add_(shift.to(device=bias.device, dtype=bias.dtype))
    elif refit.into == "running_mean":
        mean = pruned.get_buffer(refit.target)
        mean.sub_(shift.to(device=mean.device, dtype=mean.dtype))
    else:
        owner = pruned.get_submodule(refit.name.rpartition(".")[0])
        owner.bias = nn.Parameter(shift.to(device=target.device, dtype=target.dtype),
                                  requires_grad=target.requires_grad)
        if refit.out_classes is not None:
            kept = refit.out_classes if rows is None else refit.out_classes[refit.kept_out]
            index.parameter_bindings.append(ClassBinding(ParameterBinding(refit.target, 0, kept), kept))
