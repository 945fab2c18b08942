"""Carry an optimizer through pruning: point it at the pruned parameters, its state sliced alike.

Pruning replaces every parameter it shrinks, so an optimizer built before keeps training the
old, full-size tensors. ``PruningIR.prune(labels=..., optimizer=opt)`` moves ``opt`` onto the
pruned model instead: each parameter of its groups becomes the pruned model's parameter of the
same name, and every state tensor of that parameter's shape (SGD's momentum, Adam's moments)
keeps the same positions, so training resumes as if the removed channels had never existed.
Hyper-parameters, scalar state (Adam's step) and learning-rate schedulers are untouched.
A parameter pruning creates (the bias ``prune(reconstruct=...)`` gives a layer built without one)
joins the param group of its module's weight with fresh state, so training updates it too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .errors import PruningIRError
from .pruning import sliced_tensor

MASKED_SUFFIX = "_orig"  # torch.nn.utils.prune keeps a masked tensor's trained values as <name>_orig


def _candidate_names(names: list[str]) -> list[str]:
    """Every name a parameter can have in the pruned model: its own, and unmasked (``<name>_orig``)."""
    return names + [name[:-len(MASKED_SUFFIX)] for name in names if name.endswith(MASKED_SUFFIX)]


def _sliced_state(state: dict, parameter: torch.Tensor, plan: list[tuple[int, np.ndarray]], name: str,
                  optimizer: torch.optim.Optimizer) -> dict:
    sliced = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            sliced[key] = sliced_tensor(value, plan)
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and plan:
            raise PruningIRError(
                f"cannot carry {type(optimizer).__name__}'s state '{key}' of {name} through pruning: it has shape "
                f"{tuple(value.shape)}, not the parameter's {tuple(parameter.shape)}; build a new optimizer for "
                f"the pruned model instead")
        else:
            sliced[key] = value
    return sliced


OptimizerMove = list[list[tuple[list[str], dict | None]]]  # per group, per parameter: its names, its new state


def plan_optimizer_move(optimizer: torch.optim.Optimizer, model: nn.Module,
                        plans: dict[str, list[tuple[int, np.ndarray]]]) -> OptimizerMove:
    """Check ``optimizer`` against ``model`` and slice its state by ``plans`` (``pruning.slice_plans``),
    before the model is pruned: an optimizer that cannot move raises here, with nothing changed."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names[id(parameter)].append(name)
    move = []
    for group in optimizer.param_groups:
        moved = []
        for parameter in group["params"]:
            if id(parameter) not in names:
                raise PruningIRError(
                    f"the optimizer holds a parameter of shape {tuple(parameter.shape)} that is not the model's; "
                    f"pass the optimizer built on this IR's model.parameters()")
            candidates = _candidate_names(names[id(parameter)])
            plan = next((plans[name] for name in candidates if name in plans), [])
            state = optimizer.state.get(parameter)
            moved.append((candidates, None if state is None else
                          _sliced_state(state, parameter, plan, candidates[0], optimizer)))
        move.append(moved)
    return move


def plan_optimizer_copy(optimizer: torch.optim.Optimizer, model: nn.Module) -> OptimizerMove:
    """Check that ``optimizer`` can follow ``model`` through any pruning, before the labels are
    known (pruning in rounds): its parameters are the model's and every state tensor can be sliced
    like its parameter. Returns the move onto a same-named copy of ``model``, nothing sliced."""
    whole = {name: [(0, np.arange(parameter.shape[0]))]
             for name, parameter in model.named_parameters(remove_duplicate=False) if parameter.dim() > 0}
    return plan_optimizer_move(optimizer, model, whole)


def move_optimizer(optimizer: torch.optim.Optimizer, move: OptimizerMove, pruned_model: nn.Module,
                   created: Iterable[str] = ()) -> None:
    """Point ``optimizer`` at ``pruned_model``'s parameters, with the state ``plan_optimizer_move`` sliced.

    ``created``: names of parameters the pruning created (``PruningIR.created_parameters``); each joins
    the group holding its module's weight, with no state yet (as if it were new), so ``step()`` trains
    it; one whose module's weight the optimizer does not hold (a frozen layer) stays out of it.
    """
    pruned = dict(pruned_model.named_parameters(remove_duplicate=False))
    state, groups = {}, []
    for group, moved in zip(optimizer.param_groups, move):
        parameters = []
        for candidates, sliced in moved:
            parameter = next(pruned[name] for name in candidates if name in pruned)
            if sliced is not None:
                state[parameter] = sliced
            parameters.append(parameter)
        groups.append(parameters)
    for name in created:
        path, _, _ = name.rpartition(".")
        weight = pruned.get(f"{path}.weight" if path else "weight")
        joins = next((parameters for parameters in groups if any(p is weight for p in parameters)), None)
        if joins is not None and all(p is not pruned[name] for p in joins):
            joins.append(pruned[name])
    for group, parameters in zip(optimizer.param_groups, groups):
        group["params"] = parameters
    optimizer.state = defaultdict(dict, state)
