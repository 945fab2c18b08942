"""MagnitudeCriterion: a data-free norm of the weights that produce each label."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ir import PruningIR
from .base import DataFreeCriterion


class MagnitudeCriterion(DataFreeCriterion):
    r"""Scores each label by the p-norm of the weights that produce it.

    .. math::

        \mathrm{score}(\ell) = \Big( \sum_{W} \sum_{i \,:\, \mathrm{class}_W(i) = \ell}
            \lVert f_W(i) \, W_{[i]} \rVert_p^p \Big)^{1/p}

    over every weight :math:`W` with two or more dimensions (conv filters, linear rows,
    embeddings, class tokens) whose slice :math:`W_{[i]}` along a channel dimension produces
    the label (the output side: the conv whose output channel it is, every residual branch
    writing a stream), not the slices that read it. A label produced only by one-dimensional
    parameters (a norm's scale) uses those instead. :math:`f_W(i) = 1`, or with
    ``fold_batchnorm=True`` (Distiller's batch-norm folded ranking) for a conv or linear
    followed only by a batch norm, :math:`|\gamma_i| / \sqrt{\mathrm{running\_var}_i + \epsilon}`
    of that batch norm; the weights are not changed.

    Data-free: entering the with-block (or :meth:`apply`) sets the scores when the labels are
    inferred; otherwise the first call inside the block infers them and sets the scores.
    """

    def __init__(self, ir: PruningIR, p: float = 2, fold_batchnorm: bool = False, snapshot_name: str = "main"):
        super().__init__(ir, snapshot_name)
        if not p > 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = float(p)
        self.fold_batchnorm = fold_batchnorm

    def _run(self, args: tuple, kwargs: dict) -> Any:
        self._graph(args, kwargs)
        return super()._run(args, kwargs)

    @torch.no_grad()
    def _compute(self) -> np.ndarray:
        index = self.index
        model = self.ir.model
        graph = self._graph()
        facts = self._facts(graph) if graph is not None else None
        if self.fold_batchnorm and facts is None:
            raise RuntimeError("MagnitudeCriterion(fold_batchnorm=True) needs the IR's recorded graph, which an IR "
                               "loaded from disk lacks: call the criterion once with inputs inside its with-block")
        producers = facts.producer_classes() if facts is not None else None
        folds = facts.batchnorm_folds(model) if self.fold_batchnorm else {}
        matrices = np.zeros(index.class_count)
        vectors = np.zeros(index.class_count)
        labels = facts.labels if facts is not None else None
        for binding in index.parameter_bindings:
            name, dim = binding.target.name, binding.target.dim
            try:
                tensor = model.get_parameter(name)
            except AttributeError:
                continue  # a buffer
            classes = binding.classes
            if producers is not None:
                produced = np.isin(classes, producers.get(name, ())) & labels[classes]
            else:  # no graph: the output channels of a weight are its first dimension
                produced = np.full(len(classes), dim == 0)
            if not produced.any():
                continue
            values = tensor.detach().double().abs().pow(self.p)
            dims = [d for d in range(values.dim()) if d != dim]
            per_position = values.sum(dims) if dims else values
            if name in folds and dim == 0 and len(folds[name]) == len(per_position):
                per_position = per_position * folds[name].to(per_position.device).abs().pow(self.p)
            per_position = per_position.cpu().numpy()
            target = matrices if tensor.dim() >= 2 else vectors
            np.add.at(target, classes[produced], per_position[produced])
        totals = np.where(matrices > 0, matrices, vectors)
        return totals ** (1.0 / self.p)
