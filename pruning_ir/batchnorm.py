"""Batch-norm statistics after pruning.

Removing channels changes what every later batch norm sees, so the running means and
variances recorded during training go stale: a pruned model can sit near chance until they
are re-estimated. ``tune_batchnorm_statistics`` recomputes them on data, without touching
any weight; ``batch_statistics`` lets a criterion score removals as the re-estimated model
will see them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .latency import to_device
from .modes import kept_training_flags

__all__ = ["tune_batchnorm_statistics", "batch_statistics", "kept_statistics", "default_forward"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call the model on a batch: a tensor, the first item of a (inputs, targets) pair, or a dict of kwargs."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(f"cannot tell the model's inputs in a batch of type {type(batch).__name__}; "
                    "pass forward=lambda model, batch: model(...)")


@torch.no_grad()
def tune_batchnorm_statistics(model: nn.Module, loader: Iterable[Any], *, max_batches: int | None = None,
                              forward: Callable[[nn.Module, Any], Any] | None = None,
                              verbose: bool = True) -> nn.Module:
    """Re-estimate every batch norm's running mean and variance on ``loader``; returns ``model``.

    The statistics are reset and recomputed as an exact cumulative average over the batches
    (``momentum=None`` while tuning), with the model in train mode and gradients off, so no
    weight changes. Batches are moved to the model's device. ``forward(model, batch)`` tells
    how to run a batch (default: a tensor, the first item of a tuple, or a dict of kwargs).
    The model's train/eval flags and the norms' momenta are restored afterwards.
    """
    norms = [module for module in model.modules() if isinstance(module, _NORM_TYPES)]
    if not norms:
        return model
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    forward = forward or default_forward
    device = next(model.parameters(), torch.empty(0)).device
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        if not norm.track_running_stats:
            raise ValueError(f"{type(norm).__name__} has track_running_stats=False: it keeps no statistics to tune")
    saved = _buffer_copies(norms)
    try:
        with kept_training_flags(model):
            _reestimate(model, norms, loader, forward, device, max_batches, verbose)
    except BaseException:
        _put_back(norms, saved)  # a failed run leaves the old statistics, not half-new ones
        raise
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return model


def _reestimate(model: nn.Module, norms: list[nn.Module], loader: Iterable[Any], forward: Callable,
                device: torch.device, max_batches: int | None, verbose: bool) -> None:
    """Reset the norms' statistics and accumulate them again over ``loader`` in train mode."""
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    seen = 0
    batches = iter(loader) if max_batches is None else islice(loader, max_batches)  # tqdm.auto would iter() twice
    for batch in tqdm(batches, desc="batch-norm statistics", disable=not verbose, leave=False):
        forward(model, to_device(batch, device))
        seen += 1
    if seen == 0:
        raise ValueError("the loader gave no batch: batch-norm statistics cannot be re-estimated")


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every batch norm normalizes with the statistics of the batch it sees
    (as in training); the rest of the model keeps its mode, and on exit the norms' modes and
    running statistics are exactly what they were.

    Why: a pruned model is judged after ``tune_batchnorm_statistics``, with statistics of its
    own; a LossAwareCriterion pass run in here estimates the loss of removals under such
    statistics, where eval mode freezes the unpruned model's. Batches need more than one value
    per channel (a BatchNorm1d on (N, C) inputs needs N > 1), and the larger they are, the less
    their statistics vary (``benchmarks/criteria.py`` calibrates in batches of 16)::

        with batch_statistics(model), LossAwareCriterion(ir) as score_collector:
            ...
    """
    norms = [module for module in model.modules() if isinstance(module, _NORM_TYPES)]
    saved = _buffer_copies(norms)
    try:
        with kept_training_flags(norms):
            for norm in norms:
                norm.train()
            yield model
    finally:
        _put_back(norms, saved)


@contextmanager
def kept_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """On exit, every batch norm's running statistics and every module's train/eval flag are
    what they were on entry, whatever the block did (re-estimated them, switched modes, raised)."""
    norms = [module for module in model.modules() if isinstance(module, _NORM_TYPES)]
    saved = _buffer_copies(norms)
    try:
        with kept_training_flags(model):
            yield model
    finally:
        _put_back(norms, saved)


def _buffer_copies(norms: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{name: buffer.clone() for name, buffer in norm.named_buffers(recurse=False)} for norm in norms]


@torch.no_grad()
def _put_back(norms: list[nn.Module], copies: list[dict[str, torch.Tensor]]) -> None:
    """Copy ``_buffer_copies``' tensors back into the norms' running statistics, in place."""
    for norm, buffers in zip(norms, copies):
        for name, buffer in buffers.items():
            getattr(norm, name).copy_(buffer)
