"""Sequential (cascaded) refit: each consumer refit on the inputs the pruned model really gives it.

The refits of :mod:`pruning_ir.reconstruction` use the unpruned model's input statistics, so each
consumer is fit as if its kept inputs were still the unpruned ones; but the layers before it were
pruned and refit too, and their errors add up down the network. The sequential refit (ThiNet's and
CURL's layer-by-layer reconstruction, the "sequential" mode of OBC and SparseGPT) takes the
consumers in the order the pruned model calls them and fits each one on what it receives now,
``x_p`` (its kept features, computed by the already refit layers before it), to reproduce the
unpruned model's output on the unpruned inputs, ``y = W x_d + b``:

    W' = (C_yp + lambda W_now) (C_pp + lambda I)^-1,    b' = E[y] - W' E[x_p]

with ``C_yp = Cov(y, x_p) = W C_dp`` and ``C_pp = Cov(x_p)`` over the calibration batches (uncentred
second moments when the layer has no bias to take ``b'``). The ridge pulls towards the weights the
layer has now (the independent refit's), so removing channels that are exactly 0 changes nothing.
A consumer that was only bias-compensated (no second moments) gets ``b' = E[y] - W_now E[x_p]``.

Cost: one pass over the loader per consumer, through both models (a consumer's inputs are final
only once every consumer before it is refit). Memory: per pass, ``D_p^2 + out * D_p`` sums of the
one consumer being fit (``D_p`` its kept input features, at most the statistics' ``max_features``)
and, for a conv, im2col rows at ``max_positions`` sampled output positions per call, the same
positions in both models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .batchnorm import default_forward
from .conv_patches import call_argument, conv_patches
from .latency import to_device
from .modes import kept_training_flags

__all__ = ["RefitTarget", "refit_sequentially", "check_batches"]

_OPS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d"}
METHODS = ("bias", "least_squares")   # how a consumer is refit (pruning_ir.reconstruction)
_INTO = ("bias", "create", "running_mean", None)


@dataclass(frozen=True)
class RefitTarget:
    """One consumer to refit: its weight ``name`` (the same in both models), ``method``
    (``"least_squares"`` or ``"bias"``), the unpruned output rows it kept (``kept_out``, None: all),
    and where its output shift goes: ``into`` ``"bias"`` / ``"create"`` (the parameter ``target``
    of the pruned model), ``"running_mean"`` (the batch norm buffer ``target`` after it), or None
    (no shift: an uncentred fit)."""

    name: str
    method: str
    kept_out: np.ndarray | None
    into: str | None
    target: str | None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RefitTarget {self.name}: method must be one of {METHODS}, got {self.method!r}")
        if self.into not in _INTO:
            raise ValueError(f"RefitTarget {self.name}: into must be one of {_INTO}, got {self.into!r}")
        if self.into is not None and not isinstance(self.target, str):
            raise ValueError(f"RefitTarget {self.name}: into={self.into!r} needs the name of its target, "
                             f"got {self.target!r}")


def _rows(kind: str, args: tuple, kwargs: dict, max_positions: int | None,
          generator: torch.Generator) -> torch.Tensor:
    """The rows a call multiplies by ``weight.reshape(out, -1)``: every row of a linear's input, a conv's
    im2col patches at up to ``max_positions`` positions drawn with ``generator``."""
    x, weight = call_argument(args, kwargs, 0, "input").detach(), call_argument(args, kwargs, 1, "weight")
    if kind == "linear":
        return x.reshape(-1, weight.shape[1])
    return conv_patches(kind, x, weight, args, kwargs, max_positions, generator)


class _Watch(TorchFunctionMode):
    """Hands the calls whose weight is one of ``weights`` (by identity) to ``seen(name, kind, args, kwargs)``."""

    def __init__(self, weights: dict[int, str], seen: Callable[[str, str, tuple, dict], None]):
        super().__init__()
        self.weights, self.seen = weights, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _OPS.get(func)
        if kind is not None:
            name = self.weights.get(id(call_argument(args, kwargs, 1, "weight")))
            if name is not None:
                self.seen(name, kind, args, kwargs)
        return func(*args, **kwargs)


class _Sums:
    """Sums over the rows of one consumer: ``y`` (the unpruned output, kept rows) and ``x_p``."""

    def __init__(self, outer: bool):
        self.outer = outer
        self.count = 0.0
        self.y = self.p = self.pp = self.yp = None

    def add(self, y: torch.Tensor, p: torch.Tensor) -> None:
        if self.y is None:
            self.y, self.p = torch.zeros_like(y[0]), torch.zeros_like(p[0])
            if self.outer:
                self.pp = torch.zeros(p.shape[1], p.shape[1], dtype=p.dtype, device=p.device)
                self.yp = torch.zeros(y.shape[1], p.shape[1], dtype=p.dtype, device=p.device)
        self.count += float(p.shape[0])
        self.y += y.sum(0)
        self.p += p.sum(0)
        if self.outer:
            self.pp.addmm_(p.T, p)
            self.yp.addmm_(y.T, p)


class _Pass:
    """One pass over the loader: the first pending consumer the pruned model calls is fit this pass;
    its rows are taken from the pruned model first (positions drawn), then from the unpruned one at
    the same positions (the k-th call of each model paired)."""

    def __init__(self, pending: dict[str, RefitTarget], max_positions: int | None, generator: torch.Generator,
                 dtype: torch.dtype):
        self.pending = pending
        self.max_positions, self.generator, self.dtype = max_positions, generator, dtype
        self.target: RefitTarget | None = None
        self.sums: _Sums | None = None
        self.draws: list[torch.Tensor] = []       # the generator's state before each call's draw
        self.rows: list[torch.Tensor] = []
        self.calls = 0

    def on_pruned(self, name: str, kind: str, args: tuple, kwargs: dict) -> None:
        if self.target is None:
            self.target = self.pending[name]
            self.sums = _Sums(self.target.method == "least_squares")
        if name != self.target.name:
            return
        self.draws.append(self.generator.get_state())
        with torch.no_grad():
            rows = _rows(kind, args, kwargs, self.max_positions, self.generator)
        self.rows.append(rows.to(self.dtype))

    def on_dense(self, name: str, kind: str, args: tuple, kwargs: dict) -> None:
        if self.target is None or name != self.target.name:
            return
        if self.calls >= len(self.rows):
            raise RuntimeError(f"sequential refit: the unpruned model calls {name} more often than the pruned one")
        replay = torch.Generator().set_state(self.draws[self.calls])  # the same positions as the pruned call
        weight = call_argument(args, kwargs, 1, "weight")
        bias = call_argument(args, kwargs, 2, "bias")
        with torch.no_grad():
            rows = _rows(kind, args, kwargs, self.max_positions, replay)
            matrix = weight.detach().reshape(weight.shape[0], -1)
            if bias is not None:
                bias = bias.detach()
            if self.target.kept_out is not None:
                keep = torch.as_tensor(self.target.kept_out, device=matrix.device)
                matrix = matrix.index_select(0, keep)
                bias = None if bias is None else bias.index_select(0, keep)
            y = rows.to(self.dtype) @ matrix.to(self.dtype).T
            if bias is not None:
                y = y + bias.to(self.dtype)
            p = self.rows[self.calls]
            self.sums.add(y.to(p.device), p)
        self.calls += 1

    def batch_done(self) -> None:
        if self.target is not None and self.calls != len(self.rows):
            raise RuntimeError(f"sequential refit: the pruned model called {self.target.name} {len(self.rows)} "
                               f"times on a batch, the unpruned one {self.calls}")
        self.draws, self.rows, self.calls = [], [], 0


def _fit(target: RefitTarget, sums: _Sums, now: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New weight (``now``'s shape, flattened to rows) and output shift from ``sums``."""
    dtype = sums.p.dtype
    current = now.detach().reshape(now.shape[0], -1).to(device=sums.p.device, dtype=dtype)
    n = max(sums.count, 1.0)
    mu_y, mu_p = sums.y / n, sums.p / n
    centred = target.into is not None
    weight = current
    if target.method == "least_squares":
        c_pp, c_yp = sums.pp / n, sums.yp / n
        if centred:
            c_pp = c_pp - torch.outer(mu_p, mu_p)
            c_yp = c_yp - torch.outer(mu_y, mu_p)
        lam = ridge * torch.diagonal(c_pp).mean().clamp_min(torch.finfo(dtype).tiny)
        system = c_pp + lam * torch.eye(len(mu_p), dtype=dtype, device=c_pp.device)
        weight = torch.linalg.solve(system, (c_yp + lam * current).T).T
    shift = mu_y - weight @ mu_p if centred else None
    return weight, shift


@torch.no_grad()
def _write(dense: nn.Module, pruned: nn.Module, target: RefitTarget, weight: torch.Tensor,
           shift: torch.Tensor | None) -> None:
    parameter = pruned.get_parameter(target.name)
    parameter.copy_(weight.reshape(parameter.shape).to(device=parameter.device, dtype=parameter.dtype))
    if shift is None:
        return
    if target.into == "running_mean":  # the norm computes (conv - mean): the unpruned mean minus the shift
        before = dense.get_buffer(target.target)
        if target.kept_out is not None:
            before = before.index_select(0, torch.as_tensor(target.kept_out, device=before.device))
        mean = pruned.get_buffer(target.target)
        mean.copy_(before.to(device=mean.device, dtype=mean.dtype) - shift.to(device=mean.device, dtype=mean.dtype))
    else:  # the unpruned bias is inside y: the shift is the whole new bias
        bias = pruned.get_parameter(target.target)
        bias.copy_(shift.to(device=bias.device, dtype=bias.dtype))


def _check(dense: nn.Module, pruned: nn.Module, targets: list[RefitTarget]) -> None:
    """Every name exists in both models with matching output rows, before anything is run or written."""
    for target in targets:
        try:
            before, after = dense.get_parameter(target.name), pruned.get_parameter(target.name)
        except AttributeError as error:
            raise ValueError(f"sequential refit: no parameter {target.name!r} in the unpruned and the pruned "
                             f"model (pass the model that was pruned, with its masks baked, and its pruned copy): "
                             f"{error}") from None
        rows = before.shape[0] if target.kept_out is None else len(target.kept_out)
        if after.shape[0] != rows or after.ndim != before.ndim:
            raise ValueError(f"sequential refit: {target.name} is {tuple(after.shape)} in the pruned model, "
                             f"{tuple(before.shape)} unpruned, with {rows} output rows kept: not the pruned "
                             f"copy of this model")
        if target.into == "running_mean":
            dense.get_buffer(target.target)
            pruned.get_buffer(target.target)
        elif target.into is not None:
            pruned.get_parameter(target.target)


def _checked_loader(loader: Iterable[Any]) -> None:
    if iter(loader) is loader:
        raise TypeError("the sequential refit runs the loader once per consumer: pass a re-iterable loader "
                        "(a list of batches or a DataLoader), not an iterator")


@torch.no_grad()
def check_batches(model: nn.Module, loader: Iterable[Any],
                  forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """Run the first batch of ``loader`` through ``model`` in eval mode: an iterator, an empty loader, or
    batches ``forward`` cannot run fail here, before a prune writes anything."""
    _checked_loader(loader)
    device = next(model.parameters(), torch.empty(0)).device
    with kept_training_flags(model):
        model.eval()
        for batch in loader:
            (forward or default_forward)(model, to_device(batch, device))
            return
    raise ValueError("the sequential refit's loader gave no batch")


def refit_sequentially(dense: nn.Module, pruned: nn.Module, targets: Iterable[RefitTarget],
                       loader: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None,
                       max_batches: int | None = None, ridge: float = 1e-3, max_positions: int | None = 1024,
                       dtype: torch.dtype = torch.float64, seed: int = 0,
                       verbose: bool = False) -> tuple[list[str], dict[str, str]]:
    """Refit ``targets`` of ``pruned`` one after the other, in the order ``pruned`` calls them, each on
    its inputs in ``pruned`` to reproduce its output in ``dense`` (see the module docstring).

    ``loader`` is run once per consumer through both models, in eval mode without gradients
    (``forward(model, batch)``; default: a tensor, the first item of a tuple, a dict of keyword
    inputs); it must be re-iterable (a list, a DataLoader). Returns the names refit, in order, and
    the consumers not refit with the reason. On an error, ``pruned`` is restored as it was.
    """
    targets = list(targets)
    _checked_loader(loader)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _check(dense, pruned, targets)
    forward = forward or default_forward
    device = next(pruned.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(seed)
    pending = {t.name: t for t in targets}
    backup = {name: tensor.detach().clone() for name, tensor in
              list(pruned.named_parameters()) + list(pruned.named_buffers())
              if name in pending or any(name == t.target for t in targets)}
    order: list[str] = []
    try:
        with kept_training_flags(list(dense.modules()) + list(pruned.modules())), torch.no_grad():
            dense.eval()
            pruned.eval()
            bar = tqdm(total=len(pending), desc="sequential refit", disable=not verbose, leave=False)
            while pending:
                current = _Pass(pending, max_positions, generator, dtype)
                watch_pruned = _Watch({id(pruned.get_parameter(n)): n for n in pending}, current.on_pruned)
                watch_dense = _Watch({id(dense.get_parameter(n)): n for n in pending}, current.on_dense)
                batches = loader if max_batches is None else islice(loader, max_batches)
                seen = 0
                for seen, batch in enumerate(batches, 1):
                    batch = to_device(batch, device)
                    with watch_pruned:
                        forward(pruned, batch)
                    with watch_dense:
                        forward(dense, batch)
                    current.batch_done()
                if not seen:
                    raise ValueError("the sequential refit's loader gave no batch")
                if current.target is None or current.sums is None or current.sums.count == 0:
                    break  # no pending consumer ran on the loader
                target = current.target
                weight, shift = _fit(target, current.sums, pruned.get_parameter(target.name), ridge)
                _write(dense, pruned, target, weight, shift)
                order.append(target.name)
                del pending[target.name]
                bar.update(1)
            bar.close()
    except BaseException:
        with torch.no_grad():
            for name, tensor in list(pruned.named_parameters()) + list(pruned.named_buffers()):
                if name in backup:
                    tensor.copy_(backup[name])
        raise
    return order, {name: "not called by the pruned model on the loader's batches" for name in pending}
