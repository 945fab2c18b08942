"""LossAwareCriterion: first-order Taylor estimate of the loss increase when a label is removed."""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PruningIRError
from ..ir import PruningIR
from ._analysis import GraphFacts, ParameterGate, SiteGate, label_mask
from ._calibration import Pending, check_batch_statistics, drop_gradient, freeze_ungated, gate_term, scoring_statistics
from ._distributed import all_reduce_sum, world_size
from ._replay import ReplayPlan, run_recorded
from ._taylor_sums import TaylorSums, score_layout
from .base import Criterion

# joint="auto": groups up to this many labels get joint scores (an n x n float64 sum: 32 MiB at 2048)
JOINT_AUTO_MAX_LABELS = 2048


class LossAwareCriterion(Criterion):
    r"""Scores each label by the loss increase its removal causes, to first order (Taylor).

    Usage::

        with LossAwareCriterion(ir) as score_collector:
            for inputs, targets in loader:
                loss = loss_fn(score_collector(inputs), targets)
                loss.backward()

    **Formula** (Molchanov et al., CVPR 2019). A gate :math:`z_\ell = 1` sits on label
    :math:`\ell` at each of its gate sites :math:`s \in G(\ell)`: where the channel is produced
    for the last time before being consumed (a batch norm output, every residual branch feeding
    a stream, every LayerNorm reading a pre-norm stream, the q/k/v projection of a head; see
    ``criteria/_analysis.py``). Removing the label sets :math:`z_\ell = 0`; the score is the
    square of :math:`\partial L / \partial z_\ell` averaged over the batches:

    .. math::

        \mathrm{score}(\ell) = \frac{1}{B} \sum_{b=1}^{B}
            \Big( \sum_{s \in G(\ell)} \sum_{p \,:\, \mathrm{class}_s(p) = \ell}
            \sum_{n, \mathrm{positions}} a_s[n, p, \ldots]
            \frac{\partial L_b}{\partial a_s[n, p, \ldots]} \Big)^2

    Every term is a derivative of the same loss, so scores of different groups are comparable
    (global and knapsack selection need it); an exactly-zero channel scores exactly 0.

    **How.** Where the op at a gate site is linear in its own parameters (conv, linear, the
    norms), the inner sum is :math:`w_i \cdot \partial L/\partial w_i + b_i \, \partial L/\partial b_i`,
    read from gradient hooks: no activation is kept. Other sites are reached by replaying the
    forward with the recorder and hooking the activation (``implementation="activations"``
    does so everywhere; the two agree to rounding). Small batches estimate the per-sample
    (Fisher) score better.

    **Joint scores** (default). Selectors add label scores, but the estimate for a set
    :math:`S` of one group's labels is :math:`C(S) = 1_S^\top M 1_S` with
    :math:`M = \frac{1}{B}\sum_b t_b t_b^\top` (:math:`t_b` the inner sums above), not the sum
    of the diagonal. Channels that move the loss together make the two differ widely, and
    selection on single scores then empties wide layers. Each group's labels are ordered
    greedily by the marginal cost :math:`C(S \cup \{\ell\}) - C(S)`, which becomes their score,
    so the lowest :math:`k` scores add up to :math:`C(S_k)` (``criteria/_joint.py``). It costs
    one outer product per group and backward pass and :math:`8 n_g^2` bytes per group of
    :math:`n_g` labels; ``joint="auto"`` keeps single scores for groups wider than
    ``JOINT_AUTO_MAX_LABELS``. For global and knapsack selection, ``measure_removal_costs``
    then replaces the estimates by measured losses (``criteria/measured_costs.py``).

    Args:
        ir: the PruningIR to score.
        snapshot_name: only ``"main"``.
        reset: True (default): each context starts the average afresh. False: a context continues
            what this criterion accumulated before (an earlier context, or ``load_state_dict``).
        implementation: ``"auto"`` (parameter gradients where exact, activations elsewhere) or
            ``"activations"``.
        joint: ``"auto"`` (default): joint scores (above) for every group of at most
            ``JOINT_AUTO_MAX_LABELS`` labels, single-label ones for wider groups. True: joint
            scores for every group. False: each label scores its own estimate
            :math:`M_{\ell\ell}` (the formula above; cheaper, but global and knapsack selection
            on these scores empty wide layers).
        keep_gradients: True (default, ENOT-compatible; ``GradualPruner`` relies on it): the calibration
            backward passes leave their ``.grad`` as usual. False: a parameter without ``.grad`` on entry
            gets none while the context is open (each is dropped as soon as it is accumulated).
        batch_statistics: False (default): the model runs as it is. True: the context runs inside
            ``batch_statistics(model)``, scoring removals as the model normalizes once its batch norms
            are re-estimated; ``"auto"``: when the first call has >= 16 samples and every batch norm is
            in eval mode (``criteria/_calibration.py``).
        input_statistics: ``"auto"`` (default): while open, the input statistics of the layers that read
            prunable channels are collected (memory and rows capped: ``pruning_ir.held_statistics``) and
            left with the IR, so ``ir.prune(labels=...)`` refits those layers by least squares. True: no
            cap. False: none (``prune`` then slices exactly, as ENOT).

    Scores are written into the IR after every backward pass on CPU (when the context exits on
    accelerators or with joint scores, to avoid a synchronisation or an ordering per step).
    Under ``torch.distributed`` the sums (and outer products, input statistics) are all-reduced
    across ranks on exit, so every rank gets the same scores; every rank must enter and leave.
    The model is run as the user runs it (train or eval mode, autocast, any batch size);
    outputs, loss and gradients are those without the criterion (unless ``batch_statistics``).
    """

    def __init__(self, ir: PruningIR, snapshot_name: str = "main", *, reset: bool = True,
                 implementation: str = "auto", joint: bool | str = "auto", keep_gradients: bool = True,
                 batch_statistics: bool | str = False, input_statistics: bool | str = "auto"):
        super().__init__(ir, snapshot_name)
        if input_statistics not in (True, False, "auto"):
            raise ValueError(f"input_statistics must be True, False or 'auto', got {input_statistics!r}")
        self.input_statistics = input_statistics
        self.batch_statistics = check_batch_statistics(batch_statistics)
        self.keep_gradients = keep_gradients
        if implementation not in ("auto", "activations"):
            raise ValueError(f"implementation must be 'auto' or 'activations', got {implementation!r}")
        self.reset = reset
        self.implementation = implementation
        if joint not in (True, False, "auto"):
            raise ValueError(f"joint must be True, False or 'auto', got {joint!r}")
        self.joint = joint
        self._lock = threading.RLock()
        self._ready = False
        self._handles: list = []
        self._pending: dict[int, Pending] = {}
        self._storages: dict[int, list[int]] = {}
        self._keys = itertools.count()
        self._warned: set[str] = set()
        # accumulated (per-class sums of squares, batch count, per-group outer-product sums or None)
        self._accumulated: TaylorSums | None = None
        self._reset_now = reset

    # -- context ----------------------------------------------------------------------------
    def start(self, *, reset: bool | None = None) -> "LossAwareCriterion":
        """Open the criterion; ``reset`` overrides the constructor's for this context only
        (False: continue what this criterion accumulated before, or was loaded with)."""
        self._reset_now = self.reset if reset is None else bool(reset)
        return super().start()

    def _enter(self) -> None:
        self._batch: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._grams: list[torch.Tensor] | None = None   # joint: sum over batches of t t^T, per group
        self._count = 0
        self._open = False
        self._ready = False
        self._prior = None
        self._norms: contextlib.ExitStack | None = None
        self._gated: set[int] = set()                  # parameters whose gradients gates read
        self._frozen: list[nn.Parameter] = []          # keep_gradients=False: the others, frozen while open
        if not self.keep_gradients:
            self._handles += [p.register_post_accumulate_grad_hook(drop_gradient)
                              for p in self.ir.model.parameters() if p.requires_grad and p.grad is None]
        if self.ir.labels_inferred and self._graph() is not None:
            self._setup()

    def _labels_ready(self, args: tuple, kwargs: dict) -> None:
        self._setup(args, kwargs)

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if self._norms is None:  # decided on the first call, held until the context exits (backward needs it)
            self._norms = contextlib.ExitStack()
            self._norms.enter_context(scoring_statistics(self.ir.model, self.batch_statistics, args, kwargs))
        if not self._ready:
            self._setup(args, kwargs)
        with self._lock:
            if self._open:  # a backward that never finished (it raised): close its batch
                self._end_batch()
        if not self._activation_gates:
            return self.ir.model(*args, **kwargs)
        output, seen = run_recorded(self.ir.model, args, kwargs, self.ir.leaf_policy, self._plan,
                                    self._on_site, self._before_write)
        missing = len(self._activation_gates) - len(seen)
        if missing:
            self._warn_once("missing", f"LossAwareCriterion: {missing} of {len(self._activation_gates)} "
                            "activation sites were not found in this forward pass (the model ran other "
                            "operations than when its labels were inferred); their labels get no score from it")
        return output

    def _exit(self, failed: bool) -> None:
        if self._norms is not None:
            self._norms.close()             # the batch norms' modes and running statistics as on entry
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []
        self._release_pending()
        if not self._ready:
            if self.ir.labels_inferred and not failed and world_size() > 1:
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
        self._label_classes, self._group_classes = score_layout(index)
        self._joint_groups = [self.joint is True or (self.joint == "auto" and len(c) <= JOINT_AUTO_MAX_LABELS)
                              for c in self._group_classes]
        self._is_joint = any(self._joint_groups)
        self._group_positions: list[torch.Tensor] | None = None
        prior = None if self._reset_now else self._accumulated
        if prior is not None and len(prior.total) != index.class_count:
            prior = None
        if prior is not None and self._is_joint and (prior.grams is None or [
                gram is not None for gram in prior.grams] != self._joint_groups):
            self._warn_once("prior", "LossAwareCriterion(reset=False): the previous context did not keep joint "
                            "sums for the same groups (joint=False?), so there is nothing to continue; this "
                            "context starts afresh")
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
        if not self.keep_gradients:
            self._frozen += freeze_ungated(self.ir.model, self._gated)
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
                self._gated.add(id(parameter))
                self._handles.append(parameter.register_hook(partial(self._parameter_hook, gate.site, parameter)))
        return True

    # -- hooks ------------------------------------------------------------------------------
    def _parameter_hook(self, gate: SiteGate, parameter: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self._add(gate, gate_term(parameter.detach(), grad, 0))

    def _on_site(self, name: str, tensor: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():
            if not tensor.requires_grad and self._frozen and tensor.is_floating_point() and torch.is_grad_enabled():
                tensor.requires_grad_()  # upstream parameters are frozen (keep_gradients=False): a leaf here
            if not tensor.requires_grad:
                return
            gates = [g for g in self._activation_gates[name] if tensor.dim() > g.dim and tensor.shape[g.dim] == g.size]
            if len(gates) < len(self._activation_gates[name]):
                self._warn_once("shape", f"LossAwareCriterion: the output of graph node {name} does not have the "
                                "shape its labels were inferred with; it is skipped")
            if not gates:
                return
            key = next(self._keys)
            entry = Pending(tensor, tensor._version, gates)
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
                self._add(gate, gate_term(value.detach(), grad, gate.dim))

    def _forget(self, key: int) -> Pending | None:
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
            if self._is_joint:
                self._add_outer_products()
            self._count += 1
            self._batch.zero_()
            if self._sum.device.type == "cpu" and not self._is_joint:
                self._store(self._sum.numpy().copy(), self._count, None, write_state=False)
        # activations this backward did not reach (a forward whose loss was never
        # differentiated) are not kept beyond it; several forwards feeding one backward are
        # all reached
        self._release_pending()

    def _add_outer_products(self) -> None:
        """joint: add the outer product of this batch's terms with themselves to each joint group's sum."""
        if self._group_positions is None:
            device = self._batch.device
            self._group_positions = [torch.as_tensor(c, dtype=torch.long, device=device) for c in self._group_classes]
            self._grams = [torch.zeros(len(c), len(c), dtype=torch.float64, device=device) if joint else None
                           for c, joint in zip(self._group_classes, self._joint_groups)]
        for positions, gram in zip(self._group_positions, self._grams):
            if gram is not None:
                values = self._batch.index_select(0, positions)
                gram.addr_(values, values)

    def _local_grams(self) -> list[np.ndarray | None] | None:
        """Per prunable group, the sum of outer products (None for groups without joint scores)."""
        if not self._is_joint:
            return None
        if self._grams is None:
            return [np.zeros((len(c), len(c))) if joint else None
                    for c, joint in zip(self._group_classes, self._joint_groups)]
        return [None if gram is None else gram.cpu().numpy().copy() for gram in self._grams]

    def _reduce_and_store(self, failed: bool) -> None:
        local = np.zeros(self.index.class_count) if self._sum is None else self._sum.cpu().numpy().copy()
        grams = self._local_grams()
        count = self._count
        if not failed and world_size() > 1:
            present = [gram for gram in grams or [] if gram is not None]
            parts = [local] + [gram.ravel() for gram in present] + [np.array([float(count)])]
            packed = all_reduce_sum(np.concatenate(parts))
            local, count, offset = packed[:len(local)].copy(), int(round(packed[-1])), len(local)
            for i, gram in enumerate(grams or []):
                if gram is not None:
                    grams[i] = packed[offset:offset + gram.size].reshape(gram.shape).copy()
                    offset += gram.size
        if count == 0:
            self._warn_once("empty", "LossAwareCriterion: no backward pass ran inside the context; scores unchanged")
            return
        self._store(local, count, grams, write_state=True)

    def _store(self, local: np.ndarray, count: int, grams: list[np.ndarray] | None, write_state: bool) -> None:
        sums = TaylorSums(local, count, grams)
        if self._prior is not None:
            sums = sums + self._prior
        if not np.all(np.isfinite(sums.total[self._label_classes])):
            message = ("LossAwareCriterion: a loss or gradient was inf or nan inside the context; the scores "
                       "are not finite")
            if write_state:
                raise PruningIRError(message + " and were not written")
            self._warn_once("finite", message)
            return
        self.index.set_class_scores(*sums.scores(self.index))
        if write_state:
            self._accumulated = sums

    def state_dict(self) -> dict[str, Any]:
        """The sums the last context accumulated (what ``reset=False`` continues), or ``{}``:
        ``{"sum": per-class sums of squares, "batches": int, "grams": per-group outer-product sums
        or None}`` as float64 CPU tensors."""
        return {} if self._accumulated is None else self._accumulated.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take sums from :meth:`state_dict` (of this or another criterion on the same model) and write
        their scores; a following ``reset=False`` context continues them (ValueError: not this IR's labels)."""
        if not state:
            self._accumulated = None
            return
        self._accumulated = TaylorSums.from_state_dict(state, self.index)
        self.index.set_class_scores(*self._accumulated.scores(self.index))

    @property
    def batches(self) -> int:
        """Backward passes accumulated by this context so far (on this rank)."""
        return self._count

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and not self._warned.add(key):
            warnings.warn(message, stacklevel=3)
