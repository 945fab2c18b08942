"""Pruning: physically remove labels from a model, through the IR's index maps.

Everything is computed before anything is written (new tensors, new attribute values,
consistency checks), so a failure leaves the model untouched. With ``inplace=False`` the
model is deep-copied with the already-sliced tensors planted in the copy's memo, so the
full-size tensors that get pruned are never duplicated.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from .errors import PruningIRError
from .labels import ChannelIndex


def slice_plans(index: ChannelIndex, removed: np.ndarray) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per parameter or buffer name, the (dim, kept positions) slices that removing ``removed`` takes."""
    plans: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for binding in index.parameter_bindings:
        drop = removed[binding.classes]
        if drop.any():
            plans[binding.target.name].append((binding.target.dim, np.flatnonzero(~drop)))
    return plans


def _new_attribute_values(index: ChannelIndex, removed: np.ndarray) -> dict[tuple[str, str], tuple]:
    values: dict[tuple[str, str], tuple] = {}
    for binding in index.attribute_bindings:
        target = binding.target
        kept = int((~removed[binding.classes]).sum())
        if kept == len(binding.classes):
            continue
        if kept % target.divisor:
            raise PruningIRError(f"pruning leaves {kept} channels, not a multiple of {target.divisor}, "
                                 f"for {target.module_path}.{target.attribute}")
        value = (kept // target.divisor, target.tuple_index)
        key = (target.module_path, target.attribute)
        if values.setdefault(key, value) != value:
            raise PruningIRError(
                f"labels disagree on the new value of {target.module_path or '<model>'}.{target.attribute} "
                f"({values[key][0]} vs {value[0]}); this is a bug in a channel rule, please report it")
    return values


def sliced_tensor(tensor: torch.Tensor, plan: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """A copy of ``tensor`` keeping the positions of ``plan`` (a parameter stays a parameter)."""
    data = tensor.detach()
    for dim, keep in plan:  # index_select copies: the result never shares the original's storage
        data = data.index_select(dim, torch.as_tensor(keep, device=data.device))
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    return data


def tensor_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """Every (module, attribute) that holds each parameter or buffer (tied weights share one)."""
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for module in model.modules():
        for name, tensor in module._parameters.items():
            if tensor is not None:
                holders[id(tensor)].append((module, name, True))
        for name, tensor in module._buffers.items():
            if tensor is not None:
                holders[id(tensor)].append((module, name, False))
    return holders


def _set_attribute(module: nn.Module, attribute: str, value: int, tuple_index: int | None) -> None:
    if tuple_index is not None:
        old = list(getattr(module, attribute))
        old[tuple_index] = value
        value = tuple(old)
    setattr(module, attribute, value)


def prune_model(model: nn.Module, index: ChannelIndex, removed: np.ndarray, inplace: bool,
                plans: dict[str, list[tuple[int, np.ndarray]]]) -> nn.Module:
    """Return ``model`` (or a copy) with the positions of every removed class sliced away;
    ``plans`` is ``slice_plans(index, removed)``."""
    attributes = _new_attribute_values(index, removed)
    modules = dict(model.named_modules(remove_duplicate=False))
    originals = {}
    for name in plans:
        path, _, attribute = name.rpartition(".")
        originals[name] = getattr(modules[path], attribute)
    replacements = {id(originals[name]): sliced_tensor(originals[name], plan) for name, plan in plans.items()}
    if inplace:
        target = model
        holder_map = tensor_holders(model)
        for key, new in replacements.items():
            for module, name, is_parameter in holder_map[key]:
                (module._parameters if is_parameter else module._buffers)[name] = new
    else:
        memo = {key: new for key, new in replacements.items()}
        target = copy.deepcopy(model, memo)
        modules = dict(target.named_modules(remove_duplicate=False))
    for (path, attribute), (value, tuple_index) in attributes.items():
        _set_attribute(modules[path], attribute, value, tuple_index)
    return target
