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
from .recorded_ints import AttributeInt
from .tracing import TracedGraph

__all__ = ["PropagationState", "propagate", "pin_unseen_paths", "pin_compared_counts", "bind_layer_sizes",
           "mark_counted_attributes"]


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


def propagate(model: nn.Module, traced: TracedGraph, gqa_unit: str = "query_heads") -> PropagationState:
    """Run every node's channel rule in graph order and pin what reaches the model outputs
    (``gqa_unit``: the label of grouped-query attention, see ``channel_rules.attention``)."""
    state = PropagationState(model, gqa_unit)
    state.node_named = {node.name: node for node in traced.graph.nodes}
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
    bind_layer_sizes(state)
    mark_counted_attributes(state)
    return state


def mark_counted_attributes(state: PropagationState) -> None:
    """The channels a module attribute counts are inexact where ``forward`` also used that attribute as a
    number (``h.view(B, self.hidden_dim) / self.hidden_dim``): pruning rewrites it, and the number changes;
    and pinned where it also bounds a slice of a dim without channels (``h[:, :self.d]`` over time)."""
    for binding in state.attribute_bindings:
        key = (binding.module_path, binding.attribute)
        if key in state.fixed_attributes:
            state.atoms.pin(binding.atoms, state.fixed_attributes[key])
        elif key in state.counted_attributes:
            state.atoms.mark_inexact(binding.atoms, state.counted_attributes[key])


def _size_relations(module: nn.Module) -> list[tuple[str, str, int, int | None]]:
    """(attribute, parameter, dim, tuple index): the size attributes of a torch layer that equal one
    dimension of its own parameter (grouped convolutions' depend on ``groups``: left to their rule)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return []
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        return [("out_channels", "weight", int(transposed), None), ("in_channels", "weight", int(not transposed), None)]
    if isinstance(module, nn.Linear):
        return [("out_features", "weight", 0, None), ("in_features", "weight", 1, None)]
    if isinstance(module, nn.Embedding):
        return [("embedding_dim", "weight", 1, None)]
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return [("num_features", "weight" if module.affine else "running_mean", 0, None)]
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return [("normalized_shape", "weight", index, index) for index in range(len(module.normalized_shape))]
    return []


def bind_layer_sizes(state: PropagationState) -> None:
    """Bind the size attributes of torch layers that no rule bound, to the parameter dimension they
    describe: a subclass that reads its weight its own way (Whisper's positional embedding indexes
    ``self.weight``) keeps ``embedding_dim`` and its other sizes true to the pruned weight."""
    bound = {(b.module_path, b.attribute, b.tuple_index) for b in state.attribute_bindings}
    for path, module in state.modules.items():
        for attribute, parameter, dim, index in _size_relations(module):
            binding = state.parameter_bindings.get((f"{path}.{parameter}" if path else parameter, dim))
            if binding is not None and (path, attribute, index) not in bound:
                state.attribute_bindings.append(AttributeBinding(path, attribute, binding.atoms, 1, index))
                bound.add((path, attribute, index))


def _unseen_parameters(state: PropagationState, traced: TracedGraph) -> list[str]:
    """Parameters the recorded forward never read (directly, or inside a leaf module it called)."""
    seen = set()
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            seen.add(id(named_tensor(state.modules, node.target)))
        elif node.op == "call_module":
            seen.update(id(parameter) for parameter in state.modules[node.target].parameters())
    return [name for name, parameter in state.model.named_parameters() if id(parameter) not in seen]


def _owners(name: str, called: set[str]) -> list[str]:
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in called]


def _never_run(unseen: list[str], called: set[str]) -> list[str]:
    """The outermost never-called modules that hold the parameters ``unseen``."""
    modules = []
    for name in unseen:
        parts = name.split(".")[:-1]
        top = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in called), None)
        if top is not None and top not in modules:
            modules.append(top)
    return modules


def pin_unseen_paths(state: PropagationState, traced: TracedGraph) -> None:
    """Keep whole what the example inputs did not show, and the channel counts Python compares.

    One forward records one path: a module that branches on its input (``if x.abs().max() > 1:
    self.loud(x)``) hides the other branch's layers, and pruning the channels entering the
    module would break them. The innermost called module holding such parameters has its
    inputs and outputs pinned. Modules never called at all are named in a warning; where the
    forward branched on a tensor's value (``__bool__``, ``item``, ``tolist``) in a module that holds
    them, every channel live across that branch is pinned, so the path not taken still fits.
    Finally :func:`pin_compared_counts`.
    """
    pin_compared_counts(state, traced)
    unseen = _unseen_parameters(state, traced)
    if not unseen:
        return
    nodes = [node for node in traced.graph.nodes if node.op not in ("placeholder", "output", "get_attr")]
    called = {path for node in nodes for path in node.meta.get("module_stack", ())}
    by_module: dict[str, list[str]] = {}
    uncalled = []
    for name in unseen:
        owners = _owners(name, called)
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
        never = _never_run(uncalled, called)
        pinned = _pin_across_branches(state, nodes, never)
        kinds = {path: type(state.modules[path]).__name__ for path in never if path in state.modules}
        listing = ", ".join(f"'{path}' ({kinds.get(path, '?')})" for path in never[:6]) + (" ..." if len(never) > 6 else "")
        if pinned:
            told = ("their input channels are pinned: every channel live where the forward branched on a tensor "
                    f"value ({', '.join(pinned[:3])}) is kept, so the branch not taken still fits")
        else:
            told = ("nothing recorded shows which channels reach them (no branch on a tensor value was seen), so "
                    "they are not pruned and a path that uses them (a training-only head?) may fail after pruning")
        listing += f" (parameters {', '.join(uncalled[:4])}{' ...' if len(uncalled) > 4 else ''})"
        warnings.warn(f"modules never run on the example inputs: {listing}; {told}. Pass example inputs that take "
                      f"every path (ir.infer_labels(x, more_inputs=[...])) to prune them. Labels are inferred in eval "
                      f"mode: a path taken only in training (`if self.training:`, an auxiliary head) is never "
                      f"recorded: remove such a head before pruning, or keep the channels it reads whole "
                      f"(ChannelConstraint(keep=(...)))", stacklevel=4)


STEERS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__"}


def _pin_across_branches(state: PropagationState, nodes: list[fx.Node], never: list[str]) -> list[str]:
    """Pin the channels live across each branch on a tensor value taken in a module that holds a
    never-run module (``never``), and, after the branch, those of a width one of those modules has
    (where their output may land); returns where those branches were."""
    order = {node: i for i, node in enumerate(nodes)}
    where = []
    for steer in nodes:
        name = steer.target if isinstance(steer.target, str) else getattr(steer.target, "__name__", "")
        if name not in STEERS:
            continue
        stack = steer.meta.get("module_stack", ())
        scope = stack[-1] if stack else ""
        hidden = [path for path in never if not scope or path.startswith(scope + ".")]
        if not hidden:
            continue
        label = f"'{name}' in '{scope or '<model>'}'"
        where.append(label)
        reason = (f"the forward branches on a tensor value ({label}) and {', '.join(hidden[:3])} never ran on the "
                  "example inputs: channels live across the branch may flow into them")
        ctx = RuleContext(state, steer)
        widths = {size for path in hidden for p in state.modules[path].parameters() for size in p.shape}
        for node in nodes:
            inside = not scope or scope in node.meta.get("module_stack", ())
            before = order[node] < order[steer]
            if before and not any(order.get(user, -1) > order[steer] and (
                    not scope or scope in user.meta.get("module_stack", ())) for user in node.users):
                continue  # not live across the branch
            if not before and not inside:
                continue
            layouts = state.layouts.get(node)
            for layout in (layouts if isinstance(layouts, tuple) else (layouts,)):
                if isinstance(layout, TensorLayout):  # after the branch: what the hidden modules may have written
                    for atoms in layout.dims:
                        if atoms is not None and (before or len(atoms) in widths):
                            ctx.pin(atoms, reason)
    return where


def pin_compared_counts(state: PropagationState, traced: TracedGraph) -> None:
    """Pin every channel count the model's Python compared with a number (``if y.shape[1] >= 8:``):
    the branch would flip after pruning. A test for divisibility (``== 0``), or a comparison with a
    module attribute or another channel count, follows pruning and pins nothing."""
    for comparison in traced.comparisons:
        other = comparison.other
        if comparison.symbol == "float":   # float(C), math.sqrt(C): the count became a number
            for _, _, atoms in state.channel_reads(comparison.size):
                state.atoms.mark_inexact(atoms, f"Python in '{comparison.module_path or '<model>'}' turns their count "
                                                "into a float (math.sqrt, float()): removing one changes it")
            continue
        if isinstance(other, AttributeInt) or (comparison.symbol in ("==", "!=") and other == 0):
            continue
        reads = state.channel_reads(comparison.size)
        if not reads or state.channel_reads(other):
            continue
        for node, dim, atoms in reads:
            stack = node.meta.get("module_stack", ())
            reason = (f"Python in '{comparison.module_path or '<model>'}' compares the channel count "
                      f"{int(comparison.size)} (dim {dim} of '{op_name(node)}' in '{stack[-1] if stack and stack[-1] else '<model>'}') "
                      f"{comparison.symbol} {other}: the branch it takes would change after pruning")
            state.atoms.pin(atoms, reason)
