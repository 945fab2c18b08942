"""ActivationCriterion: gradient-free scores from per-channel input statistics of the consumers.

For models too big to back-propagate (an LLM on one accelerator), the model only runs forward
under ``torch.no_grad()``: a forward pre-hook on every Linear / Conv that reads a label keeps
three running sums per input channel (sum x, sum x^2, token count), never an activation, and
the scores combine them with the consumer's weight columns when the context exits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PruningIRError
from ..ir import PruningIR
from ._distributed import all_reduce_sum, world_size
from .base import Criterion

METHODS = ("wanda", "flap")
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(eq=False)
class _Consumer:
    """A module whose weight's input dimension (dim 1) reads label classes: ``classes[j]`` is
    the class of input channel ``j``; the running sums of its inputs, per channel."""

    name: str
    module: nn.Module
    classes: np.ndarray
    input_dim: int = 1                    # the weight's input dimension: 0 for transformers' Conv1D
    count: float = 0.0
    sums: torch.Tensor | None = None      # float64 (2, channels): sum x, sum x^2
    handle: Any = field(default=None, repr=False)


def _input_dim(module: nn.Module) -> int | None:
    """The input dimension of a consumer's weight: 1 for Linear and dense convolutions, 0 for GPT-2's
    ``Conv1D`` (a Linear storing its weight (in, out)); None for any other module."""
    if isinstance(module, _CONSUMERS) and getattr(module, "groups", 1) == 1:
        return 1
    weight = getattr(module, "weight", None)
    return 0 if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.Linear) or _input_dim(module) == 0:
        return x.dim() - 1
    return 1 if x.dim() == module.weight.dim() else 0  # batched or unbatched conv input


class ActivationCriterion(Criterion):
    r"""Scores each label from the inputs of the layers that read it; no backward pass, no ``.grad``.

    Usage::

        with ActivationCriterion(ir, method="wanda") as score_collector:
            for input_ids in calibration_batches:
                score_collector(input_ids=input_ids)        # runs under torch.no_grad()

    **Formulas.** For every Linear or Conv (``groups=1``) whose weight :math:`W` reads label
    classes along its input dimension, with :math:`x_j` the values of input channel :math:`j`
    over every token (sample and spatial position) of every calibration batch:

    * ``"wanda"`` (Sun et al., 2023, summed over output rows for structured removal):
      :math:`\sum_i |W_{ij}| \cdot \sqrt{\mathrm{E}[x_j^2]}`;
    * ``"flap"`` (An et al., 2024, the fluctuation metric):
      :math:`\mathrm{Var}(x_j) \cdot \lVert W_{:,j} \rVert_2^2` (population variance): a channel
      that barely varies is well replaced by its mean (FLAP then adds that mean to the bias;
      this criterion only scores).

    (conv kernels: the sums over :math:`i` also run over kernel positions). A label's score
    sums these terms over every input position of every consumer that reads its class: an
    attention head collects all the columns of the output projection it feeds (with
    grouped-query attention, of every query head sharing its key/value head), the hidden size
    every projection reading the residual stream. An exactly-zero input channel scores 0.
    Labels no hooked module reads score 0, with a warning; a module called several times per
    forward adds every call.

    **Comparing groups.** Both scores are in units of the layer's activations and weights, so
    they rank well inside a group (uniform selection) but not across groups.
    ``standardize=True`` writes per-group z-scores, :math:`(s - \mu_g) / \sigma_g` (0 where
    :math:`\sigma_g = 0`), for global selection: every group then has the same spread and a
    group loses more labels when its distribution has a longer low tail. z-scores are negative
    below the mean, so an exactly-zero channel no longer scores 0.

    Only per-channel running sums are kept (float64, computed in float32 at least from bf16 /
    fp16 inputs, on the inputs' device); padding tokens count like any other. Under
    ``torch.distributed`` the sums are all-reduced when the context exits (every rank must
    enter and leave it), so every rank writes the scores of all the data.

    Args:
        ir: the PruningIR to score.
        method: ``"wanda"`` or ``"flap"``.
        standardize: per-group z-scores (above), for global selection.
        snapshot_name: only ``"main"``.
    """

    def __init__(self, ir: PruningIR, method: str = "wanda", *, standardize: bool = False,
                 snapshot_name: str = "main"):
        super().__init__(ir, snapshot_name)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.standardize = bool(standardize)
        self._consumers: list[_Consumer] = []
        self._ready = False
        self._warned: set[str] = set()

    # -- context ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model under ``torch.no_grad()`` (labels are inferred on the first call when
        needed) and return its output unchanged."""
        with torch.no_grad():
            return super().__call__(*args, **kwargs)

    def _enter(self) -> None:
        self._ready = False
        self._consumers = []
        if self.ir.labels_inferred:
            self._setup()

    def _labels_ready(self, args: tuple, kwargs: dict) -> None:
        self._setup()

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if not self._ready:
            self._setup()
        return self.ir.model(*args, **kwargs)

    def _exit(self, failed: bool) -> None:
        for consumer in self._consumers:
            if consumer.handle is not None:
                consumer.handle.remove()
                consumer.handle = None
        if failed or not self.ir.labels_inferred:
            return
        if not self._ready:
            self._setup(hook=False)
        self._reduce()
        if not any(c.count for c in self._consumers):
            self._warn_once("empty", "ActivationCriterion: the model never ran inside the context; scores unchanged")
            return
        self._write_scores(self._scores())
        self._ready = False

    # -- setup ------------------------------------------------------------------------------
    def _setup(self, hook: bool = True) -> None:
        """Find the consumers of label classes and hook them."""
        model: nn.Module = self.ir.model
        labels = self.index.label_mask()
        names = {id(p): name for name, p in model.named_parameters()}
        readers: dict[str, list[tuple[str, nn.Module, int]]] = {}
        for module_name, module in model.named_modules():
            input_dim = _input_dim(module)
            if input_dim is not None:
                weight = getattr(module, "weight", None)
                if isinstance(weight, torch.Tensor) and id(weight) in names:
                    readers.setdefault(names[id(weight)], []).append((module_name, module, input_dim))
        consumers: dict[str, _Consumer] = {}
        covered = np.zeros(self.index.class_count, dtype=bool)
        for binding in self.index.parameter_bindings:
            if binding.target.name not in readers:
                continue
            classes = np.asarray(binding.classes)
            if not labels[classes].any():
                continue
            for module_name, module, input_dim in readers[binding.target.name]:
                if binding.target.dim == input_dim and module_name not in consumers \
                        and len(classes) == module.weight.shape[input_dim]:
                    consumers[module_name] = _Consumer(module_name, module, classes, input_dim)
                    covered[classes] = True
        self._consumers = list(consumers.values())
        uncovered = int((labels & ~covered).sum())
        if uncovered:
            self._warn_once("uncovered", f"ActivationCriterion: {uncovered} labels are read by no Linear, Conv or "
                            "Conv1D module (an F.linear, a matmul, a model output); they score 0")
        if hook:
            for consumer in self._consumers:
                consumer.handle = consumer.module.register_forward_pre_hook(self._hook(consumer), with_kwargs=True)
        self._ready = True

    def _hook(self, consumer: _Consumer):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                self._accumulate(consumer, x.detach())
        return pre_hook

    def _accumulate(self, consumer: _Consumer, x: torch.Tensor) -> None:
        channels = consumer.module.weight.shape[consumer.input_dim]
        dim = _channel_dim(consumer.module, x)
        if x.dim() == 0 or x.shape[dim] != channels:
            self._warn_once("shape", f"ActivationCriterion: the input of {consumer.name} does not have "
                            f"{channels} channels along dimension {dim}; it is skipped")
            return
        with torch.no_grad():
            dims = [d for d in range(x.dim()) if d != dim]
            first = x.sum(dims, dtype=torch.float32) if dims else x.float()
            second = torch.linalg.vector_norm(x, 2, dim=dims if dims else None, dtype=torch.float32).square() \
                if dims else x.float().square()
            batch = torch.stack([first, second]).double()
            if consumer.sums is None:
                consumer.sums = batch
            else:
                consumer.sums += batch.to(consumer.sums.device)
            consumer.count += x.numel() / channels

    # -- scores -----------------------------------------------------------------------------
    def _reduce(self) -> None:
        """Sum every consumer's statistics over the ranks of torch.distributed."""
        if world_size() <= 1:
            return
        parts = []
        for consumer in self._consumers:
            sums = consumer.sums.cpu().numpy().ravel() if consumer.sums is not None \
                else np.zeros(2 * consumer.module.weight.shape[consumer.input_dim])
            parts += [np.array([consumer.count]), sums]
        packed = all_reduce_sum(np.concatenate(parts)) if parts else np.zeros(0)
        offset = 0
        for consumer in self._consumers:
            channels = consumer.module.weight.shape[consumer.input_dim]
            consumer.count = float(packed[offset])
            sums = torch.as_tensor(packed[offset + 1:offset + 1 + 2 * channels].reshape(2, channels).copy())
            consumer.sums = sums.to(consumer.module.weight.device)
            offset += 1 + 2 * channels

    @torch.no_grad()
    def _column_terms(self, consumer: _Consumer) -> torch.Tensor:
        """Per input channel of ``consumer``: its score term (float64)."""
        weight = consumer.module.weight.detach()
        dims = [d for d in range(weight.dim()) if d != consumer.input_dim]
        count = max(consumer.count, 1.0)
        first, second = consumer.sums.to(weight.device)
        if self.method == "wanda":
            columns = torch.linalg.vector_norm(weight, 1, dim=dims, dtype=torch.float32).double()
            return columns * (second / count).clamp_min(0).sqrt()
        columns = torch.linalg.vector_norm(weight, 2, dim=dims, dtype=torch.float32).double().square()
        mean = first / count
        variance = (second / count - mean * mean).clamp_min(0)
        return columns * variance

    def _scores(self) -> np.ndarray:
        labels = self.index.label_mask()
        scores = np.zeros(self.index.class_count)
        unused = [c.name for c in self._consumers if not c.count]
        if unused:
            self._warn_once("unused", f"ActivationCriterion: {len(unused)} hooked modules never ran "
                            f"(e.g. {unused[0]}); the labels they read get nothing from them")
        for consumer in self._consumers:
            if not consumer.count:
                continue
            terms = self._column_terms(consumer).cpu().numpy()
            mask = labels[consumer.classes]
            np.add.at(scores, consumer.classes[mask], terms[mask])
        if self.standardize:
            for group in self.index.groups:
                if not group.prunable or not len(group.classes):
                    continue
                values = scores[group.classes]
                spread = values.std()
                scores[group.classes] = (values - values.mean()) / spread if spread > 0 else 0.0
        if not np.all(np.isfinite(scores[labels])):
            raise PruningIRError("ActivationCriterion: an activation was inf or nan; scores not written")
        return scores

    @property
    def tokens(self) -> float:
        """Tokens (rows of inputs) the most-called consumer saw in this context, on this rank."""
        return max((c.count for c in self._consumers), default=0.0)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)
