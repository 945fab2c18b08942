"""Soft masks: zero labels' channels in the ``torch.nn.utils.prune`` form, without removing them.

``ir.mask(labels)`` turns every parameter that holds a channel of some label (a producer's
weight and bias, a batch norm's scale and shift, a consumer's input slice) into the form
``torch.nn.utils.prune`` gives it: the trained tensor becomes ``<name>_orig`` (the same
``nn.Parameter`` object, so an optimizer built before keeps training it; unlike torch's, in
the same place among the module's parameters, so ``model.parameters()`` keeps its order and
an optimizer built on the masked model matches one built before), a ``<name>_mask``
buffer holds 0 at the masked positions, and a forward pre-hook (a :class:`ChannelMask`, a
``BasePruningMethod``) recomputes ``<name> = <name>_orig * <name>_mask`` before each forward;
``torch.nn.utils.prune.is_pruned(model)`` is True. Why this form:

* masked positions are exactly 0 in every forward whatever the optimizer does (momentum,
  weight decay, Adam): gradients reach ``<name>_orig`` multiplied by the mask, and whatever
  moves the hidden original values never reaches the model's outputs;
* the original values are kept, so :func:`remove_masks` (``ir.unmask()``) restores them; a
  masked entry of ``<name>_orig`` changes only through weight decay or optimizer momentum;
* ``torch.save``, dill, ``state_dict`` and ``.to(device)`` handle it like any torch pruning.

Every parameter bound to some label is reparametrized on the first ``mask`` call (positions
not masked hold 1), and stays so while masks move, so the state-dict keys do not depend on
which labels are masked: a checkpoint taken at one step loads into a model masked at another.
A parameter already pruned with ``torch.nn.utils.prune`` keeps its mask (the two multiply;
unmasking restores it); tied parameters are masked in every module that holds them.

Two limits of the form, handled here: code that reads a masked tensor outside its module's
own forward (a parent's functional code) would see the value of the module's last forward,
so a root forward pre-hook (:class:`RefreshMasks`) recomputes every masked tensor at the
start of each forward of the model; and the recomputed tensor is not a leaf, which
``copy.deepcopy`` refuses, so :func:`refresh` recomputes them without gradients first (call it
before deep-copying a masked model after a training forward). The criteria and the IR read
plain parameter names (``conv.weight``): score or select on a masked model inside
:func:`plain_parameters`, which shows every masked tensor as a plain parameter holding its
masked values for the duration of the block (no training inside it), and run the forwards of
a loss-aware criterion inside :func:`plain_forward` (``GradualPruner`` does both).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Iterator
import numpy as np
import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod

from .labels import ChannelIndex
from .pruning import tensor_holders

__all__ = ["ChannelMask", "RefreshMasks", "apply_masks", "remove_masks", "plain_parameters",
           "plain_forward", "refresh", "without_masks"]


class ChannelMask(BasePruningMethod):
    """The forward pre-hook of one masked tensor: ``<name> = <name>_orig * <name>_mask``.

    ``previous`` / ``previous_mask``: a ``torch.nn.utils.prune`` method and mask that were on
    the tensor before, combined with the channel mask and put back by ``ir.unmask()``.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, name: str, previous: BasePruningMethod | None = None,
                 previous_mask: torch.Tensor | None = None):
        self._tensor_name = name
        self.previous = previous
        self.previous_mask = previous_mask

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Channel masks are set by ``PruningIR.mask``, not computed from values: keep the given one."""
        return default_mask

    def combined(self, channel_mask: torch.Tensor) -> torch.Tensor:
        if self.previous_mask is None:
            return channel_mask
        return self.previous_mask.to(channel_mask) * channel_mask


class RefreshMasks:
    """Root forward pre-hook: recompute every masked tensor at the start of each forward, so
    functional code that reads one outside its module's own forward sees current values."""

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        for owner, _, hook in _pruning_hooks(module):
            hook(owner, inputs)


# -- finding masked tensors ---------------------------------------------------------------------
def _pruning_hooks(model: nn.Module) -> list[tuple[nn.Module, int, BasePruningMethod]]:
    """Every (module, hook key, hook) of a ``torch.nn.utils.prune`` reparametrization in ``model``."""
    return [(module, key, hook) for module in model.modules()
            for key, hook in list(module._forward_pre_hooks.items()) if isinstance(hook, BasePruningMethod)]


def _hook_of(module: nn.Module, attribute: str) -> tuple[int, BasePruningMethod] | tuple[None, None]:
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, BasePruningMethod) and getattr(hook, "_tensor_name", None) == attribute:
            return key, hook
    return None, None


def _original(module: nn.Module, attribute: str) -> nn.Parameter | None:
    """The trained parameter behind ``module.<attribute>`` (plain, or ``<attribute>_orig``), if any."""
    key, _ = _hook_of(module, attribute)
    if key is not None:
        return module._parameters.get(attribute + "_orig")
    return module._parameters.get(attribute)


def _holders(held: list[tuple[nn.Module, str, bool]]) -> list[tuple[nn.Module, str]]:
    """The (module, attribute) of each holder of one parameter (``tensor_holders``), plain or as
    ``<attribute>_orig`` (tied weights are masked in every module that holds them)."""
    found = []
    for module, name, is_parameter in held:
        if not is_parameter:
            continue
        key, _ = _hook_of(module, name[:-5]) if name.endswith("_orig") else (None, None)
        found.append((module, name[:-5] if key is not None else name))
    return found


def _rename(mapping: dict, old: str, new: str) -> None:
    """Rename a key in place (same position, same dict object): a masked parameter keeps its
    place, so ``model.parameters()`` has the same order masked or not (optimizer states match)."""
    items = [(new if key == old else key, value) for key, value in mapping.items()]
    mapping.clear()
    mapping.update(items)


def _set_computed(module: nn.Module, attribute: str, hook: BasePruningMethod) -> None:
    with torch.no_grad():
        setattr(module, attribute, hook.apply_mask(module))


# -- masks of an IR -----------------------------------------------------------------------------
def _channel_masks(model: nn.Module, index: ChannelIndex, masked: np.ndarray) -> dict[int, tuple]:
    """Per bound parameter holding some label: (parameter, 0/1 mask of its masked positions)."""
    is_label = index.label_mask()
    removed = index.removal_mask(masked)
    masks: dict[int, tuple] = {}
    for binding in index.parameter_bindings:
        if not is_label[binding.classes].any():
            continue
        path, _, attribute = binding.target.name.rpartition(".")
        parameter = _original(model.get_submodule(path), attribute)
        if parameter is None:
            continue  # a buffer (running statistics): a masked channel's batch norm outputs 0 anyway
        if id(parameter) not in masks:
            masks[id(parameter)] = (parameter, torch.ones_like(parameter, requires_grad=False))
        drop = np.flatnonzero(removed[binding.classes])
        if drop.size:
            mask = masks[id(parameter)][1]
            mask.index_fill_(binding.target.dim, torch.as_tensor(drop, device=mask.device), 0.0)
    return masks


def _mask_tensor(module: nn.Module, attribute: str, mask: torch.Tensor) -> None:
    """Reparametrize ``module.<attribute>`` (plain, pruned by torch, or already ours) with ``mask``."""
    key, hook = _hook_of(module, attribute)
    if isinstance(hook, ChannelMask):
        module._buffers[attribute + "_mask"].copy_(hook.combined(mask))
    elif hook is not None:  # pruned with torch.nn.utils.prune before: combine, remember to restore it
        buffer = module._buffers[attribute + "_mask"]
        hook = ChannelMask(attribute, hook, buffer.detach().clone())
        module._forward_pre_hooks[key] = hook
        buffer.copy_(hook.combined(mask))
    else:
        parameter = module._parameters[attribute]
        hook = ChannelMask(attribute)
        _rename(module._parameters, attribute, attribute + "_orig")
        module.register_buffer(attribute + "_mask", mask.to(dtype=parameter.dtype))
        module.register_forward_pre_hook(hook)
    _set_computed(module, attribute, hook)


def apply_masks(model: nn.Module, index: ChannelIndex, masked: np.ndarray) -> None:
    """Mask exactly the classes ``masked`` (replacing the current masks); see the module docstring.
    ``PruningIR.mask`` checks the labels and keeps the masked set."""
    holders = tensor_holders(model)
    for parameter, mask in _channel_masks(model, index, masked).values():
        for module, attribute in _holders(holders[id(parameter)]):
            _mask_tensor(module, attribute, mask)
    if not any(isinstance(hook, RefreshMasks) for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(RefreshMasks(), prepend=True)


def _unmask_tensor(module: nn.Module, key: int, hook: ChannelMask, bake: bool) -> None:
    """Remove a reparametrization; ``bake``: keep the masked values (as torch's ``prune.remove``)."""
    attribute = hook._tensor_name
    mask = module._buffers[attribute + "_mask"]
    if getattr(hook, "previous", None) is not None and not bake:
        mask.copy_(hook.previous_mask.to(mask))
        module._forward_pre_hooks[key] = hook.previous
        _set_computed(module, attribute, hook.previous)
        return
    parameter = module._parameters[attribute + "_orig"]
    del module._buffers[attribute + "_mask"]
    del module._forward_pre_hooks[key]
    module.__dict__.pop(attribute, None)
    if bake:
        with torch.no_grad():
            parameter.mul_(mask.to(parameter.dtype))
    _rename(module._parameters, attribute + "_orig", attribute)


def _remove_refresh(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, RefreshMasks):
            del model._forward_pre_hooks[key]


def remove_masks(model: nn.Module) -> None:
    """Remove every channel mask of ``model``, restoring the original (unmasked) values."""
    for module, key, hook in _pruning_hooks(model):
        if isinstance(hook, ChannelMask):
            _unmask_tensor(module, key, hook, bake=False)
    _remove_refresh(model)


# -- views for code that reads plain names --------------------------------------------------------
def refresh(model: nn.Module) -> nn.Module:
    """Recompute every masked tensor without gradients (so ``copy.deepcopy(model)`` works)."""
    for module, _, hook in _pruning_hooks(model):
        _set_computed(module, hook._tensor_name, hook)
    return model


@contextlib.contextmanager
def plain_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every reparametrized tensor is a plain parameter holding its masked values.

    The parameter is the same object as ``<name>_orig`` (gradient hooks registered on it stay
    valid after the block), under its plain name in the same place. For reading
    and selecting (criteria, selectors, latency on copies), not for training: the original
    values, masks and hooks come back when the block ends.
    """
    changed = []
    try:
        for module, key, hook in _pruning_hooks(model):
            attribute = hook._tensor_name
            parameter = module._parameters.get(attribute + "_orig")
            mask = module._buffers.get(attribute + "_mask")
            if parameter is None or mask is None:
                continue
            changed.append((module, dict(module._parameters), dict(module._buffers),
                            dict(module._forward_pre_hooks), parameter, parameter.data))
            parameter.data = parameter.data * mask.to(parameter.dtype)
            del module._buffers[attribute + "_mask"], module._forward_pre_hooks[key]
            module.__dict__.pop(attribute, None)
            _rename(module._parameters, attribute + "_orig", attribute)
        yield model
    finally:
        for module, parameters, buffers, hooks, parameter, data in reversed(changed):
            parameter.data = data
            for live, saved in ((module._parameters, parameters), (module._buffers, buffers),
                                (module._forward_pre_hooks, hooks)):
                live.clear()
                live.update(saved)
        refresh(model)


@contextlib.contextmanager
def plain_forward(model: nn.Module) -> Iterator[nn.Module]:
    """For forwards run inside the block, every masked tensor is computed once (with gradients,
    reaching ``<name>_orig``) and stands under its plain name among the module's parameters.

    Code that maps the tensors a forward uses to parameter names, as the loss-aware
    criterion's recorder does, then sees the plain model; training through it is unchanged.
    """
    changed = []
    root_hooks = dict(model._forward_pre_hooks)
    try:
        for module, key, hook in _pruning_hooks(model):
            attribute = hook._tensor_name
            if attribute + "_orig" not in module._parameters:
                continue
            changed.append((module, dict(module._parameters), dict(module._forward_pre_hooks), attribute))
            effective = hook.apply_mask(module)
            del module._forward_pre_hooks[key]
            module.__dict__.pop(attribute, None)
            _rename(module._parameters, attribute + "_orig", attribute)
            module._parameters[attribute] = effective  # a computed tensor, for the block only
        _remove_refresh(model)
        yield model
    finally:
        for module, parameters, hooks, attribute in reversed(changed):
            effective = module._parameters[attribute]
            for live, saved in ((module._parameters, parameters), (module._forward_pre_hooks, hooks)):
                live.clear()
                live.update(saved)
            setattr(module, attribute, effective)
        model._forward_pre_hooks.clear()
        model._forward_pre_hooks.update(root_hooks)


def _bound_names(index: ChannelIndex) -> dict[str, set[str]]:
    names: dict[str, set[str]] = defaultdict(set)
    for binding in index.parameter_bindings:
        path, _, attribute = binding.target.name.rpartition(".")
        names[path].add(attribute)
    return names


def without_masks(model: nn.Module, index: ChannelIndex, inplace: bool) -> nn.Module:
    """``model`` (or, unless ``inplace``, a deep copy) with the masks baked in: every channel mask,
    and every torch pruning of a tensor the index binds, becomes a plain parameter holding the
    masked values. The model itself when nothing is masked (pruning then proceeds as usual)."""
    refreshing = any(isinstance(h, RefreshMasks) for h in model._forward_pre_hooks.values())
    if not refreshing and not _pruning_hooks(model):
        return model  # the common case, on every prune: nothing is masked
    bound = _bound_names(index)

    def targets(root: nn.Module) -> list[tuple[nn.Module, int, BasePruningMethod]]:
        names = {id(module): path for path, module in root.named_modules(remove_duplicate=False)}
        return [(module, key, hook) for module, key, hook in _pruning_hooks(root)
                if isinstance(hook, ChannelMask) or hook._tensor_name in bound.get(names[id(module)], ())]

    if not targets(model) and not refreshing:
        return model
    if not inplace:
        model = copy.deepcopy(refresh(model))
    for module, key, hook in targets(model):
        _unmask_tensor(module, key, hook, bake=True)
    if not any(isinstance(hook, ChannelMask) for _, _, hook in _pruning_hooks(model)):
        _remove_refresh(model)
    return model
