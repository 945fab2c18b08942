"""Several example inputs, one graph: the union of the paths a model's Python takes.

The recorder follows the one path an input takes through ``if``/``else`` in ``forward``; an input
that takes the other branch records other modules. :func:`trace_paths` records every example input
and merges the graphs: a call whose op, target, inputs and constants match the node at the same
occurrence in the graph so far is that node (the common prefix, and everything both paths share, is
recorded once), any other call is added. Parameters are one node each, so propagation over the
merged graph ties every path's channels together, and a channel is removable only when every
recorded path allows it. Sizes read from tensors (:class:`ShapeInt`) are renamed with their nodes;
a different batch or sequence length still matches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .recorded_ints import AttributeInt, AttributeTerms, ShapeInt
from .tracing import Comparison, LeafPolicy, TracedGraph, trace_model

__all__ = ["example_pair", "trace_paths", "merge_paths"]


def example_pair(example: Any) -> tuple[tuple, dict]:
    """One example input as ``(args, kwargs)``: a pair ``(tuple, dict)`` as it is, a tuple or list as
    positional arguments, a dict as keyword arguments, anything else as the one positional argument."""
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], (tuple, list)) \
            and isinstance(example[1], dict):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, dict):
        return (), dict(example)
    return (example,), {}


def trace_paths(model: nn.Module, examples: list[tuple[tuple, dict]], leaf_policy: LeafPolicy,
                strict: bool = False) -> tuple[TracedGraph, Any]:
    """Record ``model`` on every example (``(args, kwargs)`` pairs) into one graph; returns it and
    the output of the first example."""
    traced, output = trace_model(model, examples[0][0], examples[0][1], leaf_policy, strict)
    for args, kwargs in examples[1:]:
        merge_paths(traced, trace_model(model, args, kwargs, leaf_policy, strict)[0])
    return traced, output


def _frozen(value: Any, name_of: Callable[[str], str]) -> Any:
    """A hashable stand-in for a node argument; sizes read from tensors count by where they were read."""
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, ShapeInt):
        return ("size", frozenset((name_of(n), d) for n, d in value.sources), value.attributes)
    if isinstance(value, AttributeInt):
        return ("attribute", value.module_path, value.attribute, value.divisor, int(value))
    if isinstance(value, AttributeTerms):
        return ("terms", frozenset(value.terms.items()), int(value))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, slice):
        return ("slice",) + tuple(_frozen(v, name_of) for v in (value.start, value.stop, value.step))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_frozen(v, name_of) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _frozen(v, name_of)) for k, v in sorted(value.items(), key=lambda i: str(i[0])))
    try:
        hash(value)
        return (type(value), value)
    except TypeError:
        return ("repr", repr(value))


def _renamed(value: Any, name_of: Callable[[str], str]) -> Any:
    """``value`` with every ShapeInt's sources renamed (nodes themselves are mapped by ``fx.map_arg``)."""
    if isinstance(value, ShapeInt):
        origin = None if value.origin is None else (name_of(value.origin[0]), value.origin[1])
        return ShapeInt(int(value), origin, frozenset((name_of(n), d) for n, d in value.sources), value.attributes)
    if isinstance(value, slice):
        return slice(*(_renamed(v, name_of) for v in (value.start, value.stop, value.step)))
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_renamed(v, name_of) for v in value)
    if isinstance(value, dict):
        return {k: _renamed(v, name_of) for k, v in value.items()}
    return value


def _key(node: fx.Node, args: Any, kwargs: Any, name_of: Callable[[str], str]) -> tuple:
    if node.op == "placeholder":
        return (node.op, node.target, len(node.meta.get("shape") or ()))
    return (node.op, node.target, _frozen(args, name_of), _frozen(kwargs, name_of))


def merge_paths(base: TracedGraph, other: TracedGraph) -> None:
    """Merge the recording ``other`` into ``base`` (in place): shared calls are matched, others added."""
    graph = base.graph
    output = next(iter(graph.find_nodes(op="output")))
    graph.erase_node(output)
    index: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        index[_key(node, node.args, node.kwargs, lambda n: n)].append(node)
    mapping: dict[fx.Node, fx.Node] = {}
    by_name = {node.name: node for node in other.graph.nodes}

    def name_of(name: str) -> str:
        node = by_name.get(name)
        return mapping[node].name if node in mapping else name

    counts: dict[tuple, int] = defaultdict(int)
    for node in other.graph.nodes:
        if node.op == "output":
            continue
        args = fx.map_arg(node.args, mapping.__getitem__)
        kwargs = fx.map_arg(node.kwargs, mapping.__getitem__)
        key = _key(node, args, kwargs, name_of)
        position = counts[key]
        counts[key] += 1
        if position < len(index[key]):
            mapping[node] = index[key][position]
            continue
        args, kwargs = _renamed(args, name_of), _renamed(kwargs, name_of)
        if node.op == "placeholder":
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                added = graph.placeholder(node.target)
        else:
            added = graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        added.meta = dict(node.meta)
        mapping[node] = added
        index[key].append(added)
    base.comparisons.extend(Comparison(c.symbol, _renamed(c.size, name_of), _renamed(c.other, name_of),
                                       c.module_path) for c in other.comparisons)
    base.leaf_specs.update(other.leaf_specs)
    outputs = list(dict.fromkeys(base.output_nodes + [mapping[n] for n in other.output_nodes]))
    base.output_nodes = outputs
    base.input_nodes = list(graph.find_nodes(op="placeholder"))
    graph.output(tuple(outputs))
    base.paths += other.paths


def examples_of(args: tuple, kwargs: dict, more_inputs: Iterable[Any] | None) -> list[tuple[tuple, dict]]:
    """The first example ``(args, kwargs)`` followed by ``more_inputs`` as pairs (see :func:`example_pair`)."""
    return [(tuple(args), dict(kwargs))] + [example_pair(item) for item in more_inputs or ()]
