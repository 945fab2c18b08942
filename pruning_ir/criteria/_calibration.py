"""Pieces of LossAwareCriterion's calibration pass: activations waiting for their gradient, the
gate term of one activation, and scoring in batch statistics on request.

Why batch statistics: a pruned model is judged after its batch norms are re-estimated
(``tune_batchnorm_statistics``), so scoring a removal with the unpruned model's frozen running
statistics (eval mode) estimates a loss the pruned model never has. With ``batch_statistics="auto"``,
when the first call of a criterion's context has at least :data:`MIN_BATCH` samples and every batch
norm of the model that keeps running statistics is in eval mode, the whole context runs inside
``pruning_ir.batch_statistics(model)`` (held until the context exits: backward passes need the
running statistics unchanged); a model in train mode, or one calibrated inside
``batch_statistics`` already, is run as it is. Smaller batches stay in eval mode: their
statistics are too noisy. It is not the criterion's default: measured with the four steps and a
knapsack to a MACs budget, it kept less accuracy after re-estimation than eval-mode scores
(``benchmarks/RESULTS.md``, one call section); in rounds with uniform selection it helps
(``prune_in_rounds(score_in_batch_statistics=True)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch
from torch import nn

from ..batchnorm import batch_statistics

__all__ = ["Pending", "drop_gradient", "freeze_ungated", "gate_term", "MIN_BATCH", "check_batch_statistics",
           "scoring_statistics"]

MIN_BATCH = 16          # "auto": calibration batches at least this large are scored in batch statistics
_CHOICES = ("auto", True, False)


@dataclass(eq=False)
class Pending:
    """An activation waiting for its gradient (one forward, one gate node)."""

    tensor: torch.Tensor
    version: int
    gates: list
    value: torch.Tensor | None = None      # a copy, taken before an in-place op overwrote the tensor
    storage: int = 0
    handle: Any = field(default=None, repr=False)


def drop_gradient(parameter: torch.Tensor) -> None:
    """A post-accumulate hook: forget the gradient just accumulated."""
    parameter.grad = None


def freeze_ungated(model: nn.Module, gated: set[int]) -> list[nn.Parameter]:
    """``keep_gradients=False``: the parameters without ``.grad`` whose gradient no gate reads stop
    requiring one while the context is open, so backward never computes it (an LLM's embedding and
    output layer are each vocabulary x hidden); returned, to be restored on exit."""
    frozen = [p for p in model.parameters() if p.requires_grad and p.grad is None and id(p) not in gated]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return frozen


def gate_term(value: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """sum(a * dL/da) over every dimension but ``dim`` (in float32 at least)."""
    if value.dtype in (torch.float16, torch.bfloat16) or grad.dtype in (torch.float16, torch.bfloat16):
        value, grad = value.float(), grad.float()
    product = value * grad
    dims = [d for d in range(product.dim()) if d != dim]
    return product.sum(dims) if dims else product


def check_batch_statistics(value: Any) -> bool | str:
    """``value`` if it is one of ``"auto"``, True, False; a ValueError naming it otherwise."""
    if not any(value is choice or (isinstance(value, str) and value == choice) for choice in _CHOICES):
        raise ValueError(f"batch_statistics must be 'auto', True or False, got {value!r}")
    return value


def scoring_statistics(model: nn.Module, mode: bool | str, args: tuple, kwargs: dict) -> ContextManager:
    """The context a criterion's calls run in, chosen on its first call (``args``, ``kwargs``):
    ``batch_statistics(model)`` when ``mode`` is True, or ``"auto"`` with frozen batch norms and a
    batch of at least :data:`MIN_BATCH`; else nothing."""
    wanted = mode is True or (mode == "auto" and _frozen_batch_norms(model) and _batch_size(args, kwargs) >= MIN_BATCH)
    if not wanted:
        return contextlib.nullcontext()
    return batch_statistics(model)


def _frozen_batch_norms(model: nn.Module) -> bool:
    """The model has batch norms with running statistics, and every one of them is in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    return bool(norms) and not any(norm.training for norm in norms)


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The leading size of the call's first tensor input (0 when there is none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() else 0
    return 0
