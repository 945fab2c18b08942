"""PruningIR: the user-facing object that ties tracing, labels and pruning together."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import masking
from .errors import InvalidLabelsError, LabelsNotInferredError, PruningError, PruningIRError
from .huggingface import sync_config as write_config
from .labels import ChannelIndex, DependencyGroup, Label
from .channel_rules import GQA_UNITS
from .propagation import propagate
from .optimizer_state import move_optimizer, plan_optimizer_move
from .pruning import check_recorded_shapes, prune_model, slice_plans
from .recorded_paths import examples_of, trace_paths
from .summary import describe_groups, summary
from .tracing import LeafModule, LeafPolicy, trace_model
from .verification import RemovalCheck, output_signature, without_culprits

if TYPE_CHECKING:
    import networkx

    from .input_statistics import InputStatistics
    from .reconstruction import Reconstruction

# Modules whose internals are not recorded because a rule describes them whole.
BUILTIN_LEAF_TYPES: tuple[type, ...] = (nn.MultiheadAttention, nn.RNNBase)


class PruningIR:
    """Channel-level intermediate representation of a model, for structured pruning.

    ``PruningIR(model)`` is cheap; labels are inferred from concrete inputs, on the first
    call inside a criterion or explicitly with :meth:`infer_labels`. ``prune(labels=...)``
    returns a new IR whose ``.model`` is the same class as the original, physically
    smaller. Pruning replaces parameters: pass the optimizer to ``prune(..., optimizer=)`` to
    move it onto the pruned model, or build a new one from ``ir.model.parameters()`` (an
    optimizer made before and not passed keeps the old, full-size tensors).

    ``gqa_unit`` (grouped-query attention, read when labels are inferred): ``"query_heads"``
    (default) labels query head ``j`` of every key/value group, keeping the key/value heads
    (8/2 -> 6/2 heads); ``"kv_groups"`` labels a key/value head with all its query heads.
    """

    LeafModule = LeafModule

    def __init__(self, model: nn.Module, *, leaf_modules: Iterable[Any] | None = None, soft_tracing: bool = True,
                 gqa_unit: str = "query_heads"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PruningIR expects an nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(f"PruningIR cannot see inside a TorchScript model ({type(model).__name__}, from "
                            "torch.jit.script or torch.jit.trace): its forward is compiled, so no channel can be "
                            "traced or removed; pass the original nn.Module and script the pruned one afterwards")
        if gqa_unit not in GQA_UNITS:
            raise ValueError(f"gqa_unit must be one of {GQA_UNITS}, got {gqa_unit!r}")
        self._model = model
        self.gqa_unit = gqa_unit
        self._leaf_policy = LeafPolicy.from_argument(leaf_modules, BUILTIN_LEAF_TYPES)
        self.soft_tracing = soft_tracing
        self._index: ChannelIndex | None = None
        self._example_inputs: tuple[tuple, dict] | None = None
        self._graph = None
        self._consumed = False
        self._masked_classes: np.ndarray | None = None
        self.reconstruction: Reconstruction | None = None  # what the prune() that returned this IR refit with
        self.reconstruction_note = ""                       # and why (see prune's reconstruct=)

    @classmethod
    def _derived(cls, source: "PruningIR", model: nn.Module, index: ChannelIndex,
                 created: list[str]) -> "PruningIR":
        """An IR of ``model`` (pruned from ``source``'s): same leaf policy and graph, no masks."""
        derived = cls.__new__(cls)
        derived.__dict__.update(source.__dict__)
        derived._created_parameters = source.created_parameters + tuple(created)
        derived._model = model
        derived._index = index
        derived._leaf_policy = source._leaf_policy.moved_to(source._model, model)
        derived._consumed = False
        derived._masked_classes = None
        derived._held_statistics = None  # they describe the unpruned layers
        return derived

    # -- labels ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model this IR describes (the pruned one, for an IR returned by prune())."""
        return self._model

    @property
    def created_parameters(self) -> tuple[str, ...]:
        """Parameters prune(reconstruct=...) created on this model (a bias on a layer built without one);
        ``save_pruned(ir, ...)`` records them so ``load_pruned`` can rebuild them."""
        return self.__dict__.get("_created_parameters", ())

    @property
    def labels_inferred(self) -> bool:
        return self._index is not None

    def infer_labels(self, *args: Any, more_inputs: Iterable[Any] | None = None, **kwargs: Any) -> "PruningIR":
        """Trace the model on these example inputs and build its labels and dependency groups.

        The model runs in eval mode without gradients; its train/eval flags and parameters are
        left as they were. ``more_inputs``: further examples (each an ``(args, kwargs)`` pair, a tuple
        of positional arguments or one tensor) for a forward whose Python branches on its input:
        every example's path is recorded and merged (``pruning_ir.recorded_paths``), so a channel is
        removable only when every path allows it and modules on any path are pruned consistently.
        """
        self._check_usable()
        examples = examples_of(args, kwargs, more_inputs)
        traced, output = trace_paths(self._model, examples, self._leaf_policy, strict=not self.soft_tracing)
        state = propagate(self._model, traced, self.__dict__.get("gqa_unit", "kv_groups"))
        self._index = ChannelIndex.from_propagation(state)
        self._example_inputs = (args, kwargs)
        self._more_example_inputs = examples[1:]  # the prune-time check runs on the first example
        self._output_signature = output_signature(output)
        self._graph = traced.graph
        return self

    @property
    def graph(self) -> fx.Graph:
        """The torch.fx graph recorded from the original model (for inspection; not saved with the IR)."""
        graph = self.__dict__.get("_graph")
        if graph is None:
            raise LabelsNotInferredError("no recorded graph: labels were not inferred in this process "
                                         "(graphs are not saved with the IR); call infer_labels()")
        return graph

    @property
    def has_graph(self) -> bool:
        """Whether this IR holds a recorded graph (an IR loaded from disk has none until graph_for())."""
        return self.__dict__.get("_graph") is not None

    def graph_for(self, *args: Any, **kwargs: Any) -> fx.Graph:
        """The recorded graph; an IR without one (loaded from disk) records it from these inputs
        and keeps it. Node names match the labels' sites: the call sequence is the model's."""
        self.check_usable()
        if not self.has_graph:
            if not args and not kwargs:
                raise LabelsNotInferredError("this IR has no recorded graph (graphs are not saved with the IR): "
                                             "pass example inputs to graph_for(*inputs)")
            traced, _ = trace_model(self._model, tuple(args), dict(kwargs), self._leaf_policy)
            self._graph = traced.graph
        return self._graph

    @property
    def leaf_policy(self) -> LeafPolicy:
        """Which modules are recorded as leaves (atomic units); recorders of this IR's model use it."""
        return self._leaf_policy

    @property
    def index(self) -> ChannelIndex:
        """The channel index (classes, bindings, groups, scores); raises until labels are inferred."""
        return self._require_index()

    def to_networkx(self) -> "networkx.DiGraph":
        """The recorded graph as a networkx DiGraph: ops and modules with their groups and pin reasons."""
        from .graph_view import to_networkx
        return to_networkx(self.graph, self.index, self._model)

    @property
    def groups(self) -> list[DependencyGroup]:
        """Every dependency group, prunable or not."""
        return list(self._require_index().groups)

    def label_groups(self) -> list[list[Label]]:
        """The labels of each prunable group, in ascending score (channel order while unscored)."""
        result = []
        for group in self._require_index().groups:
            if group.prunable:
                order = np.argsort(group.scores, kind="stable")
                labels = group.labels
                result.append([labels[i] for i in order])
        return result

    def labels(self) -> list[Label]:
        return [label for group in self.label_groups() for label in group]

    def snapshot(self, name: str = "main") -> "PruningIR":
        """The IR's labels and scores under ``name`` (only "main" exists): selectors accept it."""
        if name != "main":
            raise KeyError(f"unknown snapshot '{name}'; this IR has only 'main'")
        return self

    def set_scores(self, scores: Mapping[Label, float] | Callable[[Label], float]) -> None:
        """Set label scores directly: a mapping ``{label: score}`` or a callable ``label -> score``."""
        index = self._require_index()
        if callable(scores):
            items = [(label, scores(label)) for label in self.labels()]
        else:
            items = list(scores.items())
            self._check_labels([label for label, _ in items], allow_empty_group=True)
        values = []
        for label, score in items:
            value = float(score)
            if not np.isfinite(value):
                raise ValueError(f"score for {label!r} is not finite: {score!r}")
            values.append((label.class_id, value))
        if values:  # written only once every value is valid
            classes, scores = zip(*values)
            index.set_class_scores(np.array(classes, dtype=np.int64), np.array(scores))

    # -- pruning --------------------------------------------------------------------------
    def prune(self, name: str | Iterable[Label] = "main", *, labels: Iterable[Label] | None = None,
              inplace: bool = False, skip_label_checking: bool = False,
              optimizer: torch.optim.Optimizer | None = None, verify: bool = True,
              strict: bool = False, reconstruct: "Reconstruction | str | None" = "auto",
              sync_config: bool = True) -> "PruningIR":
        """Remove ``labels`` physically; returns the IR of the pruned model.

        ``ir.prune(labels=labels)`` (ENOT's form, ``name`` a snapshot name) and ``ir.prune(labels)``
        are the same call.

        ``verify`` (default): the removal is first tried on a shape-only copy and run on the example
        inputs the labels were inferred from (``pruning_ir.verification``); groups whose removal
        would break the model keep their labels, with a warning naming them and the error, or,
        with ``strict=True``, a ``PruningError`` and nothing changed.

        ``inplace=False`` (default) leaves the original model untouched and works on a copy;
        ``inplace=True`` modifies it (less memory) and this IR can no longer be used. Masks
        (``mask()``) are baked first: the result holds no masks and equals the masked model
        without the removed channels. ``optimizer`` (built on this model's parameters) is moved
        onto the pruned model, its state (momentum, Adam's moments) sliced like the parameters,
        so training goes on without rebuilding it (``pruning_ir.optimizer_state``); a bias created by
        ``reconstruct`` joins the param group of its layer's weight.
        ``reconstruct`` (a ``pruning_ir.Reconstruction`` over input statistics of this IR) refits the
        layers that read removed channels, so they lose less of their output (``pruning_ir.reconstruction``).
        ``"auto"`` (default): a least-squares refit (no bias created) from the statistics the criterion
        left with this IR (:meth:`hold_statistics`) when they still describe its weights; otherwise none,
        the reason in the pruned IR's ``reconstruction_note``. None: no refit (ENOT's exact slicing).
        ``sync_config``: write a transformers model's new sizes into its config (or warn that no config
        can describe them); False for a copy that is only measured (a selector's candidates).
        """
        if not isinstance(name, str):  # ir.prune(labels): the labels given positionally
            if labels is not None:
                raise TypeError("prune() got labels twice: positionally and as labels=")
            name, labels = "main", name
        if labels is None:
            raise TypeError("prune() needs the labels to remove: ir.prune(labels=selector.select(ir))")
        self.snapshot(name)
        index = self._require_index()
        from .held_statistics import chosen_reconstruction
        reconstruct, note = chosen_reconstruction(reconstruct, self.__dict__.get("_held_statistics"), self._model,
                                                  index, self.masked)
        labels = list(labels)
        if not skip_label_checking:
            self._check_labels(labels)
        classes = np.array([label.class_id for label in labels], dtype=np.int64)
        removed = index.removal_mask(classes)
        pins: list[tuple[np.ndarray, str]] = []   # groups the check keeps: pinned in the returned IR
        if verify and removed.any():
            removed, pins = self._verified(removed, inplace, strict)
        check_recorded_shapes(self._model, index)
        plans = slice_plans(index, removed)
        move = None if optimizer is None else plan_optimizer_move(optimizer, self._model, plans)
        # once an in-place prune changes the model this IR no longer describes it, even if it then fails
        self._consumed = self._consumed or (inplace and self.masked)   # baking the masks changes it
        plain = masking.without_masks(self._model, index, inplace)  # masks baked (a copy unless inplace)
        refit = None if reconstruct is None else reconstruct.prepare(plain, index, removed)  # from unpruned weights
        self._consumed = self._consumed or inplace
        model = prune_model(plain, index, removed, inplace or plain is not self._model, plans)
        kept_index = index.without(removed, pins)
        created: list[str] = []   # parameters the refit adds (a bias on a layer built without one)
        if refit is not None:
            names = {name for name, _ in model.named_parameters()}
            refit(model, kept_index)  # writes the refit weights (a created bias is bound in kept_index)
            created = [name for name, _ in model.named_parameters() if name not in names]
        if sync_config:   # a transformers model's config gets the pruned sizes, or a warning
            write_config(model, stacklevel=3)
        if move is not None:
            move_optimizer(optimizer, move, model, created)
        pruned = PruningIR._derived(self, model, kept_index, created)
        pruned.reconstruction, pruned.reconstruction_note = reconstruct, note
        return pruned

    def hold_statistics(self, statistics: "InputStatistics | None") -> None:
        """Keep input statistics collected on this IR (``collect_statistics(ir)``, or a criterion's) for
        ``prune()``'s default refit, noting every parameter's version so stale ones are not used;
        None forgets them."""
        if statistics is None:
            self._held_statistics = None
            return
        from .held_statistics import HeldStatistics
        if statistics.ir is not self:
            raise PruningIRError("hold_statistics: these statistics were collected on another IR")
        self._held_statistics = HeldStatistics.taken_now(statistics, self._model)

    @property
    def input_statistics(self) -> "InputStatistics | None":
        """The input statistics held for prune()'s default refit (None when none are)."""
        held = self.__dict__.get("_held_statistics")
        return None if held is None else held.statistics

    def _verified(self, removed: np.ndarray, inplace: bool,
                  strict: bool) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
        """``removed`` without the groups whose removal breaks the model on its example inputs, and
        those groups' classes with the reason, to pin in the pruned IR."""
        signature = self.__dict__.get("_output_signature")
        if signature is None or self._example_inputs is None or self.masked:
            return removed, []  # loaded from an older file, or masked (GradualPruner checks its own masks)
        check = RemovalCheck(self._model, self._index, self._example_inputs, signature,
                             self.__dict__.get("_verifies_on_meta"))
        self._verifies_on_meta = check.on_meta  # the model's ops do not change between prunes of this IR
        if not check.on_meta and inplace:
            warnings.warn("prune(inplace=True): the model does not run on shape-only (meta) tensors, so the "
                          "removal was not verified before it was written; prune a copy to verify it", stacklevel=3)
            return removed, []
        culprits = check.culprits(removed, real_copy_allowed=not inplace)
        if not culprits:
            return removed, []
        listing = "\n".join(f"  {culprit}" for culprit in culprits)
        if strict:
            raise PruningError(f"removing these labels would break the model on its example inputs; the groups "
                               f"responsible:\n{listing}\n(nothing was changed)")
        warnings.warn(f"prune(): {len(culprits)} groups keep their labels because removing them breaks the model "
                      f"on its example inputs (please report it):\n{listing}", stacklevel=3)
        groups = {group.id: group for group in self._index.groups}
        pins = [(groups[c.group].classes.copy(), f"prune() found that removing it breaks the model on its example "
                 f"inputs: {c.reason}") for c in culprits]
        return without_culprits(removed, culprits, self._index), pins

    # -- soft masks (pruning_ir.masking) ---------------------------------------------------
    def mask(self, labels: Iterable[Label]) -> None:
        """Zero these labels' channels with ``torch.nn.utils.prune`` masks, keeping every shape.

        Replaces the current masks; masked positions stay exactly 0 through training, and
        ``prune(labels=ir.masked_labels())`` removes them (see ``pruning_ir.masking``).
        """
        index = self._require_index()
        labels = list(labels)
        self._check_labels(labels)
        masked = np.unique(np.array([label.class_id for label in labels], dtype=np.int64))
        masking.apply_masks(self._model, index, masked)
        self._masked_classes = masked

    def unmask(self) -> None:
        """Remove the masks and restore the original (unmasked) parameter values."""
        self.check_usable()
        masking.remove_masks(self._model)
        self._masked_classes = None

    @property
    def masked(self) -> bool:
        """Whether masks (``mask()``) are on the model now."""
        return self.__dict__.get("_masked_classes") is not None

    def masked_labels(self) -> list[Label]:
        """The labels masked now (in label_groups() order; empty when none)."""
        masked = self.__dict__.get("_masked_classes")
        if masked is None or not len(masked):
            return []
        wanted = set(masked.tolist())
        return [label for label in self.labels() if label.class_id in wanted]

    def zero_labels(self, labels: Iterable[Label]) -> None:
        """Zero every parameter slice of these labels in place, so their channels carry exactly 0.

        Pruning such labels afterwards leaves the outputs unchanged for groups whose
        ``exact`` is True; it is how exactness is checked, and a cheap way to simulate pruning.
        """
        index = self._require_index()
        labels = list(labels)
        self._check_labels(labels, allow_empty_group=True)
        removed = index.removal_mask(np.array([label.class_id for label in labels], dtype=np.int64))
        with torch.no_grad():
            for binding in index.parameter_bindings:
                name = binding.target.name
                module_path, _, attribute = name.rpartition(".")
                if attribute not in self._model.get_submodule(module_path)._parameters:
                    continue
                drop = np.flatnonzero(removed[binding.classes])
                if drop.size:
                    tensor = self._model.get_parameter(name)
                    tensor.index_fill_(binding.target.dim, torch.as_tensor(drop, device=tensor.device), 0.0)

    # -- checks ---------------------------------------------------------------------------
    def check_usable(self) -> None:
        """Raise PruningIRError if this IR was used up by ``prune(inplace=True)``."""
        self._check_usable()

    def _check_usable(self) -> None:
        if self._consumed:
            raise PruningIRError("this PruningIR was pruned with inplace=True; use the IR that prune() returned "
                                 "(if that prune failed midway, its model is partly pruned: PruningIR(model) "
                                 "describes it anew)")

    def _require_index(self) -> ChannelIndex:
        self._check_usable()
        if self._index is None:
            raise LabelsNotInferredError(
                "labels are not inferred yet: call ir.infer_labels(*example_inputs), or run the model "
                "once inside a criterion (with LossAwareCriterion(ir) as collector: collector(inputs))")
        return self._index

    def check_labels(self, labels: Iterable[Label], *, allow_empty_group: bool = False) -> None:
        """Raise InvalidLabelsError if prune() would refuse these labels (foreign, or emptying a tensor;
        ``allow_empty_group``: check only that they are this IR's labels)."""
        self._check_labels(list(labels), allow_empty_group=allow_empty_group)

    def _check_labels(self, labels: list, allow_empty_group: bool = False) -> None:
        index = self._require_index()
        for label in labels:
            if not isinstance(label, Label):
                raise InvalidLabelsError(f"expected Label objects, got {type(label).__name__}: {label!r}")
            if label.group.index.token != index.token:
                raise InvalidLabelsError(
                    f"{label!r} belongs to another PruningIR (labels must come from this IR's "
                    "label_groups(); after prune(), select again on the returned IR)")
        if allow_empty_group:
            return
        removed = index.removal_mask(np.array([label.class_id for label in labels], dtype=np.int64))
        emptied, misaligned = index.emptied(removed), index.misaligned(removed)
        if emptied is not None or misaligned is not None:
            raise InvalidLabelsError(f"these labels would remove {emptied}; keep at least one label per group"
                                     if emptied is not None else f"these labels would break a kernel: {misaligned}")

    # -- inspection -----------------------------------------------------------------------
    def describe(self) -> str:
        """Per group: modules and parameters it ties, channel counts, and why channels are unprunable."""
        if self._index is None:
            return f"PruningIR({type(self._model).__name__}): labels not inferred yet"
        return describe_groups(self._model, self._index)

    def summary(self, compact: bool | None = None) -> str:
        """A table of the groups: labels and channels per label, channels, the parameters and MACs they
        hold, modules, and why a group is pinned or inexact (``pruning_ir.summary``); ``compact`` folds
        groups of repeated blocks (default: when there are more than 40 groups)."""
        if self._index is None:
            return f"PruningIR({type(self._model).__name__}): labels not inferred yet"
        return summary(self._model, self._index, self._example_inputs, compact)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        state = "not inferred" if self._index is None else f"{len(self._index.groups)} groups"
        return f"<PruningIR of {type(self._model).__name__}: {state}>"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_graph", None)  # the recorded graph is for inspection; it is not needed to prune
        state.pop("_held_statistics", None)  # calibration-time sums, not saved: hold them again after loading
        return state
