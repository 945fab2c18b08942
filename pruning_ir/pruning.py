"""Pruning: physically remove labels from a model, through the IR's index maps.

Everything is checked before anything is written (new attribute values, consistency checks;
the IR verifies the shapes on a meta copy first). With ``inplace=False`` the model is
deep-copied with the already-sliced tensors planted in the copy's memo, so the full-size
tensors that get pruned are never duplicated. With ``inplace=True`` tensors are replaced one
at a time, each old tensor freed before the next is sliced (peak memory: the model plus the
removed positions), and the removed positions are kept until the end so that a failure while
writing (out of memory, an interrupt) puts every tensor back as it was.
"""

from __future__ import annotations

import copy
import weakref
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


def check_recorded_shapes(model: nn.Module, index: ChannelIndex) -> None:
    """Every bound tensor still has the size the labels were inferred from: a layer replaced or resized
    since would be sliced at recorded positions that no longer mean the same channels."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for binding in index.parameter_bindings:
        name, dim = binding.target.name, binding.target.dim
        path, _, attribute = name.rpartition(".")
        tensor = getattr(modules.get(path), attribute, None)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim or tensor.shape[dim] != len(binding.classes):
            now = "is gone" if not isinstance(tensor, torch.Tensor) else f"has shape {tuple(tensor.shape)}"
            raise PruningIRError(f"the model changed since its labels were inferred: {name} {now}, but the labels "
                                 f"were inferred with {len(binding.classes)} positions along dim {dim}; infer them "
                                 "again (PruningIR(model).infer_labels(...)) and select anew")


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
    data = data.contiguous(memory_format=_memory_format(tensor))
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    return data


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """The layout a sliced copy keeps: channels-last weights (a model converted for speed) stay so."""
    for layout, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if tensor.dim() == rank and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=layout):
            return layout
    return torch.contiguous_format


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


def computed_attributes(model: nn.Module) -> list[torch.Tensor]:
    """Tensors modules hold as plain attributes, computed with gradients (``nn.utils.weight_norm`` sets
    ``weight`` from ``weight_g`` and ``weight_v`` before each forward): ``copy.deepcopy`` refuses such
    a tensor, so a copy takes it detached (the next forward recomputes it)."""
    return [value for module in model.modules() for value in vars(module).values()
            if isinstance(value, torch.Tensor) and value.grad_fn is not None]


def _set_attribute(module: nn.Module, attribute: str, value: int, tuple_index: int | None) -> None:
    *owners, attribute = attribute.split(".")  # "config.num_attention_heads": a field of the module's config
    for owner in owners:
        module = getattr(module, owner)
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
    first_name: dict[int, str] = {}   # tied tensors (one tensor under several names) are sliced once
    for name in plans:
        path, _, attribute = name.rpartition(".")
        first_name.setdefault(id(getattr(modules[path], attribute)), name)
    if inplace:
        _replace_one_at_a_time(model, modules, {key: (name, plans[name]) for key, name in first_name.items()})
        target = model
    else:
        memo = {id(tensor): tensor.detach().clone() for tensor in computed_attributes(model)}
        for key, name in first_name.items():
            path, _, attribute = name.rpartition(".")
            memo[key] = sliced_tensor(getattr(modules[path], attribute), plans[name])
        target = copy.deepcopy(model, memo)
        modules = dict(target.named_modules(remove_duplicate=False))
    for (path, attribute), (value, tuple_index) in attributes.items():
        _set_attribute(modules[path], attribute, value, tuple_index)
    return target


def _replace_one_at_a_time(model: nn.Module, modules: dict[str, nn.Module],
                           work: dict[int, tuple[str, list[tuple[int, np.ndarray]]]]) -> None:
    """Slice and replace each tensor in turn (the old one is freed unless the caller holds it);
    on any failure, rebuild the replaced tensors from their kept and removed positions."""
    holder_map = tensor_holders(model)
    done: list[tuple[list, torch.Tensor, list, weakref.ref]] = []   # holders, new tensor, removed parts, old
    try:
        for key, (name, plan) in work.items():
            path, _, attribute = name.rpartition(".")
            old = getattr(modules[path], attribute)
            new, removed_parts = sliced_tensor(old, plan), _removed_parts(old, plan)
            _put(holder_map[key], new)
            done.append((holder_map[key], new, removed_parts, weakref.ref(old)))
            del old
    except BaseException:
        for holders, new, removed_parts, old in reversed(done):
            original = old()   # still alive when someone else holds it (an optimizer): put that object back
            _put(holders, original if original is not None else _unsliced(new, removed_parts))
        raise


def _put(holders: list[tuple[nn.Module, str, bool]], tensor: torch.Tensor) -> None:
    for module, name, is_parameter in holders:
        (module._parameters if is_parameter else module._buffers)[name] = tensor


def _removed_parts(tensor: torch.Tensor, plan: list[tuple[int, np.ndarray]]) -> list:
    """What :func:`sliced_tensor` drops, step by step: (dim, kept, dropped positions, dropped values)."""
    parts, data = [], tensor.detach()
    for dim, keep in plan:
        dropped = np.setdiff1d(np.arange(data.shape[dim]), keep)
        parts.append((dim, keep, dropped, data.index_select(dim, torch.as_tensor(dropped, device=data.device))))
        data = data.index_select(dim, torch.as_tensor(keep, device=data.device))
    return parts


def _unsliced(tensor: torch.Tensor, parts: list) -> torch.Tensor:
    """The tensor before :func:`sliced_tensor`: kept and dropped positions put back in place."""
    data = tensor.detach()
    for dim, keep, dropped, values in reversed(parts):
        shape = list(data.shape)
        shape[dim] = len(keep) + len(dropped)
        full = data.new_empty(shape)
        full.index_copy_(dim, torch.as_tensor(keep, device=data.device), data)
        full.index_copy_(dim, torch.as_tensor(dropped, device=data.device), values)
        data = full
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    return data
