"""LossAwareCriterion: first-order Taylor estimate of the loss increase when a label is removed."""

from __future__ import annotations

import itertools
import threading
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import PruningIRError
from ..ir import PruningIR
from ._analysis import GraphFacts, ParameterGate, SiteGate, label_mask
from ._replay import ReplayPlan, run_recorded
from .base import Criterion

_STATE_ATTRIBUTE = "_loss_aware_state"  # accumulated (sum of squares, batch count), kept on the IR's index


@dataclass(eq=False)
class _Pending:
    """An activation waiting for its gradient (one forward, one gate node)."""

    tensor: torch.Tensor
    version: int
    gates: list[SiteGate]
    value: torch.Tensor | None = None      # a copy, taken before an in-place op overwrote the tensor
    storage: int = 0
    handle: Any = field(default=None, repr=False)


def _gate_term(value: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """sum(a * dL/da) over every dimension but ``dim`` (in float32 at least)."""
    if value.dtype in (torch.float16, torch.bfloat16) or grad.dtype in (torch.float16, torch.bfloat16):
        value, grad = value.float(), grad.float()
    product = value * grad
    dims = [d for d in range(product.dim()) if d != dim]
    return product.sum(dims) if dims else product


class LossAwareCriterion(Criterion):
    r"""Scores each label by the loss increase its removal causes, to first order (Taylor).

    Usage::

        with LossAwareCriterion(ir) as score_collector:
            for inputs, targets in loader:
                loss = loss_fn(score_collector(inputs), targets)
                loss.backward()

    **Formula.** Put one gate :math:`z_\ell = 1` on label :math:`\ell` at each of its gate
    sites :math:`s \in G(\ell)` (where it is produced for the last time before being
    consumed: a batch norm output, every residual branch feeding a stream, every LayerNorm
    reading a pre-norm stream, every batch norm reading a DenseNet concatenation, the q/k/v
    projection of an attention head; see ``pruning_ir/criteria/_analysis.py``). Setting
    :math:`z_\ell = 0` removes the label; the first-order estimate of the loss change is
    :math:`\partial L / \partial z_\ell`, and following Molchanov et al. (CVPR 2019) its
    square is averaged over the batches :math:`b = 1..B`:

    .. math::

        \mathrm{score}(\ell) = \frac{1}{B} \sum_{b=1}^{B}
            \Big( \sum_{s \in G(\ell)} \; \sum_{p \,:\, \mathrm{class}_s(p) = \ell}
            \; \sum_{n, \mathrm{positions}} a_s[n, p, \ldots] \;
            \frac{\partial L_b}{\partial a_s[n, p, \ldots]} \Big)^2

    where :math:`a_s` is the activation at site :math:`s`, :math:`p` runs over its
    channels (several per label for attention heads and channel groups). Every term is a
    derivative of the same loss with respect to a removal, so scores of different groups are
    comparable, as global and knapsack selection need. A channel that is exactly zero scores
    exactly 0.

    **How it is computed.** When the op at a gate site is linear in its own parameters
    (conv, linear, batch/group/instance/layer norm: :math:`a[:, i] = w_i f(x) + b_i`), the
    inner sum equals :math:`w_i \cdot \partial L / \partial w_i + b_i \, \partial L / \partial b_i`,
    read from gradient hooks on those parameters: exact, no activation is kept and the forward
    runs untouched (no overhead beyond one multiply-add per weight). Other gate sites (a
    leaf module's output, a transposed conv, a shared parameter) are reached by recording the
    forward with the tracer's recorder and hooking the activation tensor itself
    (``implementation="activations"`` does this for every site; the two agree to rounding).

    **Calibration.** On a converged model the mean gradient is close to zero and the per-batch
    square mostly measures the spread of the per-sample terms; the smaller the batches, the
    closer the estimate comes to the per-sample (Fisher) one, which predicted the loss increase
    of removing a single channel best in ``benchmarks/criteria.py`` (Spearman 0.97 with batches
    of 8 vs 0.86 with batches of 64 on the digits CNN). Run it in the mode in which the pruned
    model will be judged (eval mode scores removal with frozen batch-norm statistics). Scores are
    first-order and additive: for a large one-shot removal under global selection, prune in a few
    rounds (score, prune a share, score again) so that redundant channels are not all removed.

    Args:
        ir: the PruningIR to score.
        snapshot_name: only ``"main"``.
        reset: True (default): this context starts the average afresh. False: it continues the
            average of the previous LossAwareCriterion context on this IR (same labels).
        implementation: ``"auto"`` (parameter gradients where exact, activations elsewhere) or
            ``"activations"``.

    Scores are written into the IR after every backward pass on CPU (when the context exits on
    accelerators, to avoid a synchronisation per step). Under ``torch.distributed`` the sums are
    all-reduced across ranks when the context exits, so every rank gets the scores of all the
    data (each rank's batches counted as batches) and selects the same labels; every rank must
    enter and leave the context. The model is run as the user runs it (train or eval mode,
    autocast, any batch size); outputs, loss and gradients are those without the criterion.
    """

    def __init__(self, ir: PruningIR, snapshot_name: str = "main", *, reset: bool = True,
                 implementation: str = "auto"):
        super().__init__(ir, snapshot_name)
        if implementation not in ("auto", "activations"):
            raise ValueError(f"implementation must be 'auto' or 'activations', got {implementation!r}")
        self.reset = reset
        self.implementation = implementation
        self._lock = threading.RLock()
        self._ready = False
        self._handles: list = []
        self._pending: dict[int, _Pending] = {}
        self._storages: dict[int, list[int]] = {}
        self._keys = itertools.count()
        self._warned: set[str] = set()

    # -- context ----------------------------------------------------------------------------
    def _enter(self) -> None:
        self._batch: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._open = False
        self._ready = False
        self._prior = None
        if self.ir.labels_inferred and self._graph() is not None:
            self._setup()

    def _labels_ready(self, args: tuple, kwargs: dict) -> None:
        self._setup(args, kwargs)

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if not self._ready:
            self._setup(args, kwargs)
        with self._lock:
            if self._open:  # a backward that never finished (it raised): close its batch
                self._end_batch()
        if not self._activation_gates:
            return self.ir.model(*args, **kwargs)
        output, seen = run_recorded(self.ir.model, args, kwargs, self.ir._leaf_policy, self._plan,
                                    self._on_site, self._before_write)
        missing = len(self._activation_gates) - len(seen)
        if missing:
            self._warn_once("missing", f"LossAwareCriterion: {missing} of {len(self._activation_gates)} "
                            "activation sites were not found in this forward pass (the model ran other "
                            "operations than when its labels were inferred); their labels get no score from it")
        return output

    def _exit(self, failed: bool) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._release_pending()
        if not self._ready:
            if self.ir.labels_inferred and not failed and dist.is_available() and dist.is_initialized() \
                    and dist.get_world_size() > 1:
                self._setup_state()
                self._reduce_and_store(failed)
            return
        with self._lock:
            if self._open:
                self._end_batch()
        self._reduce_and_store(failed)
        self._ready = False

    # -- setup ------------------------------------------------------------------------------
    def _setup_state(self) -> None:
        index = self.index
        self._labels = label_mask(index)
        self._label_classes = np.flatnonzero(self._labels)
        prior = None if self.reset else getattr(index, _STATE_ATTRIBUTE, None)
        if prior is not None and len(prior[0]) != index.class_count:
            prior = None
        self._prior = prior

    def _setup(self, args: tuple | None = None, kwargs: dict | None = None) -> None:
        graph = self._graph(args, kwargs)
        if graph is None:
            raise PruningIRError("LossAwareCriterion needs the IR's recorded graph; this IR has none "
                                 "(loaded from disk?): call the criterion with inputs inside its with-block")
        self._setup_state()
        facts = GraphFacts(graph, self.index, self.ir.model)
        gates = facts.site_gates()
        covered = np.zeros(self.index.class_count, dtype=bool)
        activation_gates: dict[str, list[SiteGate]] = {}
        for name, site_gates in gates.items():
            for gate in site_gates:
                covered[gate.classes] = True
                parameter_gate = facts.parameter_gate(gate) if self.implementation == "auto" else None
                if parameter_gate is None or not self._hook_parameters(parameter_gate):
                    activation_gates.setdefault(name, []).append(gate)
        uncovered = int((self._labels & ~covered).sum())
        if uncovered:
            self._warn_once("uncovered", f"LossAwareCriterion: {uncovered} labels have no gate site "
                            "(they are never consumed); they score 0")
        self._activation_gates = activation_gates
        self._plan = ReplayPlan(graph, set(activation_gates)) if activation_gates else None
        self._ready = True

    def _hook_parameters(self, gate: ParameterGate) -> bool:
        model: nn.Module = self.ir.model
        try:
            weight = model.get_parameter(gate.weight)
            bias = None if gate.bias is None else model.get_parameter(gate.bias)
        except AttributeError:
            return False
        size = gate.site.size
        if not weight.requires_grad or weight.dim() == 0 or weight.shape[0] != size:
            return False
        if bias is not None and (not bias.requires_grad or tuple(bias.shape) != (size,)):
            return False
        for parameter in (weight, bias):
            if parameter is not None:
                self._handles.append(parameter.register_hook(partial(self._parameter_hook, gate.site, parameter)))
        return True

    # -- hooks ------------------------------------------------------------------------------
    def _parameter_hook(self, gate: SiteGate, parameter: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self._add(gate, _gate_term(parameter.detach(), grad, 0))

    def _on_site(self, name: str, tensor: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():
            if not tensor.requires_grad:
                return
            gates = [g for g in self._activation_gates[name] if tensor.dim() > g.dim and tensor.shape[g.dim] == g.size]
            if len(gates) < len(self._activation_gates[name]):
                self._warn_once("shape", f"LossAwareCriterion: the output of graph node {name} does not have the "
                                "shape its labels were inferred with; it is skipped")
            if not gates:
                return
            key = next(self._keys)
            entry = _Pending(tensor, tensor._version, gates)
            try:
                entry.storage = tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                entry.storage = 0
            self._storages.setdefault(entry.storage, []).append(key)
            self._pending[key] = entry
            entry.handle = tensor.register_hook(partial(self._activation_hook, key))

    def _before_write(self, targets: list[torch.Tensor]) -> None:
        """An op is about to write into ``targets``: copy the pending activations it would overwrite."""
        if not self._pending:
            return
        with torch._C.DisableTorchFunction():
            for target in targets:
                try:
                    storage = target.untyped_storage().data_ptr()
                except (RuntimeError, NotImplementedError):
                    continue
                for key in self._storages.get(storage, ()):
                    entry = self._pending.get(key)
                    if entry is not None and entry.value is None:
                        entry.value = entry.tensor.detach().clone()

    def _activation_hook(self, key: int, grad: torch.Tensor) -> None:
        entry = self._forget(key)
        if entry is None:
            return
        value = entry.value
        if value is None:
            value = entry.tensor
            if value._version != entry.version:
                self._warn_once("stale", "LossAwareCriterion: an activation was modified in place through an "
                                "operation that could not be intercepted; its score uses the modified values")
        with torch.no_grad():
            for gate in entry.gates:
                self._add(gate, _gate_term(value.detach(), grad, gate.dim))

    def _forget(self, key: int) -> _Pending | None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            keys = self._storages.get(entry.storage)
            if keys is not None:
                keys.remove(key)
                if not keys:
                    del self._storages[entry.storage]
        return entry

    def _release_pending(self) -> None:
        """Drop the activations of forwards whose backward never came (and their hooks)."""
        with self._lock:
            for entry in self._pending.values():
                if entry.handle is not None:
                    entry.handle.remove()
            self._pending.clear()
            self._storages.clear()

    # -- accumulation -----------------------------------------------------------------------
    def _add(self, gate: SiteGate, term: torch.Tensor) -> None:
        with self._lock:
            if self._batch is None:
                self._batch = torch.zeros(self.index.class_count, dtype=torch.float64, device=term.device)
            if not self._open:
                self._open = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_batch)
            positions, classes = gate.index_tensors(self._batch.device)
            term = term.to(device=self._batch.device, dtype=torch.float64)
            if positions is not None:
                term = term.index_select(0, positions)
            self._batch.index_add_(0, classes, term)

    def _end_batch(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            if self._sum is None:
                self._sum = torch.zeros_like(self._batch)
            self._sum.addcmul_(self._batch, self._batch)
            self._count += 1
            self._batch.zero_()
            if self._sum.device.type == "cpu":
                self._store(self._sum.numpy().copy(), self._count, write_state=False)
        # activations this backward did not reach (a forward whose loss was never
        # differentiated) are not kept beyond it; several forwards feeding one backward are
        # all reached
        self._release_pending()

    def _reduce_and_store(self, failed: bool) -> None:
        local = np.zeros(self.index.class_count) if self._sum is None else self._sum.cpu().numpy().copy()
        count = self._count
        if not failed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            packed = torch.zeros(len(local) + 1, dtype=torch.float64, device=device)
            packed[:-1] = torch.from_numpy(local)
            packed[-1] = count
            dist.all_reduce(packed)
            packed = packed.cpu().numpy()
            local, count = packed[:-1].copy(), int(round(packed[-1]))
        if count == 0:
            self._warn_once("empty", "LossAwareCriterion: no backward pass ran inside the context; scores unchanged")
            return
        self._store(local, count, write_state=True)

    def _store(self, local: np.ndarray, count: int, write_state: bool) -> None:
        total, total_count = local, count
        if self._prior is not None:
            total, total_count = self._prior[0] + local, self._prior[1] + count
        scores = total[self._label_classes] / total_count
        if not np.all(np.isfinite(scores)):
            message = ("LossAwareCriterion: a loss or gradient was inf or nan inside the context; the scores "
                       "are not finite")
            if write_state:
                raise PruningIRError(message + " and were not written")
            self._warn_once("finite", message)
            return
        self.index.class_scores[self._label_classes] = scores
        if write_state:
            setattr(self.index, _STATE_ATTRIBUTE, (total, total_count))

    @property
    def batches(self) -> int:
        """Backward passes accumulated by this context so far (on this rank)."""
        return self._count

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)
