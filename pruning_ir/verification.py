"""Self-verification of a removal before it is written: prune() never returns a broken model.

A removal is tried first on a copy of the model whose parameters and buffers live on the
``meta`` device (shapes without data, so the copy costs no memory and its forward no
arithmetic): the copy is pruned with the same slice plans and run on the recorded example
inputs; its outputs must have the structure and shapes the unpruned model gave. Only then is
the real model touched, so a failed check never leaves it half-modified, in place included.

When the check fails, the groups responsible are found by bisection over the groups that lose
labels (each trial one meta run): the smallest prefix of them whose removal fails ends with a
culprit; it is set aside and the search repeats on the rest. The culprits keep their labels
and the caller gets the reason (the error the pruned copy raised, naming the op). Models whose
forward cannot run on ``meta`` tensors (data-dependent ops such as ``.item()``) are checked on
a real copy instead when the removal is not in place, and skipped with a warning otherwise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from .labels import ChannelIndex
from .modes import kept_training_flags
from .pruning import computed_attributes, prune_model, slice_plans

__all__ = ["OutputSignature", "output_signature", "Culprit", "RemovalCheck", "without_culprits"]


@dataclass(frozen=True)
class OutputSignature:
    """The structure of a model output and the shape of each of its tensors."""

    structure: str
    shapes: tuple[tuple[int, ...] | None, ...]

    def difference(self, other: "OutputSignature") -> str | None:
        """Why ``other`` is not this signature, or None when it is."""
        if other.structure != self.structure:
            return f"the output structure changed: {other.structure} instead of {self.structure}"
        for position, (mine, theirs) in enumerate(zip(self.shapes, other.shapes)):
            if mine != theirs:
                return f"output tensor {position} has shape {list(theirs or ())} instead of {list(mine or ())}"
        return None


def output_signature(output: Any) -> OutputSignature:
    leaves, spec = pytree.tree_flatten(output)
    shapes = tuple(tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None for leaf in leaves)
    return OutputSignature(str(spec), shapes)


@dataclass(frozen=True)
class Culprit:
    """A group whose removal breaks the model, and why."""

    group: int
    modules: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        where = ", ".join(self.modules[:3]) or "<model>"
        return f"group {self.group} ({where}): {self.reason}"


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer replaced by an empty ``meta`` tensor of its shape."""
    memo: dict[int, Any] = {id(tensor): torch.empty_like(tensor, device="meta") for tensor in computed_attributes(model)}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _to_meta(value: Any) -> Any:
    return pytree.tree_map(lambda leaf: leaf.to("meta") if isinstance(leaf, torch.Tensor) else leaf, value)


class RemovalCheck:
    """Tries removals on copies of ``model`` and runs them on the recorded ``inputs``."""

    def __init__(self, model: nn.Module, index: ChannelIndex, inputs: tuple[tuple, dict],
                 expected: OutputSignature, on_meta: bool | None = None):
        self.model = model
        self.index = index
        self.inputs = inputs
        self.expected = expected
        self.runs = 0
        # whether the unpruned model runs on meta tensors: found once (pass it in to skip the run)
        self.on_meta = self._runs_on_meta() if on_meta is None else on_meta

    def _forward(self, model: nn.Module, on_meta: bool) -> OutputSignature:
        args, kwargs = self.inputs
        if on_meta:
            args, kwargs = _to_meta(args), _to_meta(kwargs)
        with kept_training_flags(model), torch.no_grad():
            model.eval()
            return output_signature(model(*args, **kwargs))

    def _runs_on_meta(self) -> bool:
        """Whether the unpruned model runs on meta tensors and gives its recorded signature."""
        try:
            return self._forward(_meta_copy(self.model), True).difference(self.expected) is None
        except Exception:  # noqa: BLE001 - any failure means meta cannot stand in for this model
            return False

    def failure(self, removed: np.ndarray, real_copy_allowed: bool) -> str | None:
        """Why removing the classes ``removed`` breaks the model (None: it does not, or cannot be
        checked: no meta run and no real copy allowed)."""
        if not self.on_meta and not real_copy_allowed:
            return None
        self.runs += 1
        try:
            if self.on_meta:
                model = prune_model(_meta_copy(self.model), self.index, removed, True, slice_plans(self.index, removed))
            else:
                model = prune_model(self.model, self.index, removed, False, slice_plans(self.index, removed))
            return self.expected.difference(self._forward(model, self.on_meta))
        except Exception as error:  # noqa: BLE001 - the pruned model's own error is the diagnosis
            return f"{type(error).__name__}: {error}".split("\n")[0][:300]

    def culprits(self, removed: np.ndarray, real_copy_allowed: bool) -> list[Culprit]:
        """The groups to keep whole so that the rest of ``removed`` runs (empty when all of it runs)."""
        reason = self.failure(removed, real_copy_allowed)
        if reason is None:
            return []
        groups = [g for g in self.index.groups if g.prunable and removed[g.classes].any()]
        found: list[Culprit] = []
        while reason is not None and groups:
            culprit = self._first_culprit(removed, groups, real_copy_allowed)
            if culprit is None:
                break
            found.append(culprit)
            groups = [g for g in groups if g.id != culprit.group]
            reason = self.failure(_only(removed, groups), real_copy_allowed)
        if reason is not None:  # nothing short of removing no group runs: keep every group
            found.extend(Culprit(g.id, tuple(g.modules), reason) for g in groups)
        return found

    def _first_culprit(self, removed: np.ndarray, groups: list, real_copy_allowed: bool) -> Culprit | None:
        """The group that ends the shortest failing prefix of ``groups`` (binary search)."""
        low, high, reason = 0, len(groups), None  # the prefix of `high` groups fails
        high_reason = self.failure(_only(removed, groups), real_copy_allowed)
        if high_reason is None:
            return None
        while high - low > 1:
            middle = (low + high) // 2
            reason = self.failure(_only(removed, groups[:middle]), real_copy_allowed)
            if reason is None:
                low = middle
            else:
                high, high_reason = middle, reason
        group = groups[high - 1]
        return Culprit(group.id, tuple(group.modules), high_reason)


def _only(removed: np.ndarray, groups: list) -> np.ndarray:
    """``removed`` restricted to the classes of ``groups``."""
    kept = np.zeros_like(removed)
    for group in groups:
        kept[group.classes] = removed[group.classes]
    return kept


def without_culprits(removed: np.ndarray, culprits: list[Culprit], index: ChannelIndex) -> np.ndarray:
    """``removed`` with every class of the culprit groups kept."""
    result = removed.copy()
    by_id = {group.id: group for group in index.groups}
    for culprit in culprits:
        result[by_id[culprit.group].classes] = False
    return result

