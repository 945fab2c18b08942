"""Propagation: one pass over the traced graph that runs each node's channel rule.

Like ``torch.fx.passes.shape_prop.ShapeProp``, but what flows along the edges is a
:class:`TensorLayout` (which channel atom sits at each position) instead of a shape.
"""

from __future__ import annotations

from typing import Any

import warnings

import torch.fx as fx
from torch import nn

from .channel_rules import RuleContext, find_rule
from .channel_rules.registry import op_name
from .channels import AttributeBinding, TensorLayout
from .errors import PruningIRError
from .propagation_state import PropagationState, named_tensor
from .tracing import TracedGraph

__all__ = ["PropagationState", "propagate", "pin_unseen_paths"]


def _barrier(ctx: RuleContext, reason: str) -> None:
    for value in ctx.node.all_input_nodes:
        ctx.pin_layout(ctx.state.layout_of(value), reason)


def _check_layout(node: fx.Node, layout: Any, rule_name: str) -> None:
    shape = node.meta.get("shape")
    if shape is None or layout is None:
        return
    if not isinstance(layout, TensorLayout) or layout.ndim != len(shape) or any(
            atoms is not None and len(atoms) != size for atoms, size in zip(layout.dims, shape)):
        raise PruningIRError(
            f"internal error: the channel rule for '{rule_name}' gave a layout that does not match "
            f"the output shape {tuple(shape)} of node {node.name}; please report it")


def propagate(model: nn.Module, traced: TracedGraph) -> PropagationState:
    """Run every node's channel rule in graph order and pin what reaches the model outputs."""
    state = PropagationState(model)
    state.node_named = {node.name: node for node in traced.graph.nodes}  # sizes name the node they were read from
    for node in traced.graph.nodes:
        if node.op == "placeholder" or node.meta.get("external"):
            state.layouts[node] = TensorLayout.empty(len(node.meta["shape"]))
            continue
        if node.op == "get_attr":
            state.layout_of(node)
            state.parameter_derived.add(node)
            continue
        if node.op == "output":
            ctx = RuleContext(state, node)
            for value in traced.output_nodes:
                ctx.pin_layout(state.layout_of(value), "reaches the model output")
            continue
        module = state.modules[node.target] if node.op == "call_module" else None
        ctx = RuleContext(state, node)
        rule = find_rule(node, module)
        if rule is None:
            what = f"leaf module '{node.target}' ({type(module).__name__})" if module is not None \
                else f"op '{op_name(node)}'"
            _barrier(ctx, f"{what} has no channel rule")
            result = None
        else:
            result = rule(ctx)
        if result is None and node.meta.get("shape") is not None:
            result = TensorLayout.empty(len(node.meta["shape"]))
        _check_layout(node, result, ctx.op)
        state.layouts[node] = result
        inputs = node.all_input_nodes
        if inputs and all(n in state.parameter_derived for n in inputs):
            state.parameter_derived.add(node)
        if module is not None:
            spec = traced.leaf_specs.get(node.target)
            if spec is not None and not spec.prunable_input:
                _barrier(ctx, "leaf module declared with prunable_input=False")
            if spec is not None and not spec.prunable_output:
                for layout in (result if isinstance(result, tuple) else (result,)):
                    if isinstance(layout, TensorLayout):
                        ctx.pin_layout(layout, "leaf module declared with prunable_output=False")
    pin_unseen_paths(state, traced)
    return state


def _unseen_parameters(state: PropagationState, traced: TracedGraph) -> list[str]:
    """Parameters the recorded forward never read (directly, or inside a leaf module it called)."""
    seen = set()
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            seen.add(id(named_tensor(state.modules, node.target)))
        elif node.op == "call_module":
            seen.update(id(parameter) for parameter in state.modules[node.target].parameters())
    return [name for name, parameter in state.model.named_parameters() if id(parameter) not in seen]


def pin_unseen_paths(state: PropagationState, traced: TracedGraph) -> None:
    """Keep whole every called module whose parameters the example input left unused.

    One forward records one path: a module that branches on its input (``if x.abs().max() > 1:
    self.loud(x)``) hides the other branch's layers, and pruning the channels entering the
    module would break them. The innermost called module holding such parameters has its
    inputs and outputs pinned; parameters of modules the model never called are reported in
    a warning (an auxiliary head that runs only in training mode, say), as nothing tells
    which tensors would reach them.
    """
    unseen = _unseen_parameters(state, traced)
    if not unseen:
        return
    nodes = [node for node in traced.graph.nodes if node.op not in ("placeholder", "output", "get_attr")]
    called = {path for node in nodes for path in node.meta.get("module_stack", ())}
    by_module: dict[str, list[str]] = {}
    uncalled = []
    for name in unseen:
        parts = name.split(".")[:-1]
        owners = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in called]
        (by_module.setdefault(owners[0], []).append(name) if owners else uncalled.append(name))
    for path, names in by_module.items():
        reason = (f"module '{path}' holds parameters this input did not use ({', '.join(names[:3])}"
                  f"{' ...' if len(names) > 3 else ''}): another input may take a path the trace did not "
                  f"see; pass it in leaf_modules to keep it whole, or trace with an input that uses them")
        inside = {node for node in nodes if path in node.meta.get("module_stack", ())}
        boundary = {value for node in inside for value in node.all_input_nodes
                    if value not in inside and value.op != "get_attr"}
        boundary |= {node for node in inside if any(user not in inside for user in node.users)}
        for node in boundary:
            layouts = state.layouts.get(node)
            ctx = RuleContext(state, node)
            for layout in (layouts if isinstance(layouts, tuple) else (layouts,)):
                if isinstance(layout, TensorLayout):
                    ctx.pin_layout(layout, reason)
    if uncalled:
        warnings.warn(f"the example input left {len(uncalled)} parameters of never-called modules unused "
                      f"({', '.join(uncalled[:4])}{' ...' if len(uncalled) > 4 else ''}); they are not pruned, and "
                      "a path that uses them (e.g. a training-only head) may fail after pruning", stacklevel=4)
