"""Find the tensors of recorded graph nodes while the model's own forward runs.

The criterion runs the user's Python ``forward``, not the fx graph, so to reach the
activation at a graph node it records the forward again with the tracer's own
``Recorder`` (same decisions about which calls are recorded, same leaf modules) and
matches each new node to the node of the reference graph by structure: the op, its
target and the matched nodes it reads, in order of occurrence. Constants are left out
of the match, so a different batch size or ``training=True`` where labels were inferred
in eval mode still matches; calls that exist only in training mode (a batch norm's
``num_batches_tracked.add_(1)``) match nothing and shift nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..tracing import LeafPolicy, Recorder, recording

# Calls that may write into their first argument (beyond names ending in "_").
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                    "__imatmul__", "__setitem__"}
# Functionals whose last positional parameter is ``inplace``.
_INPLACE_FLAG = {"relu", "relu6", "hardtanh", "elu", "selu", "celu", "leaky_relu", "rrelu", "threshold",
                 "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                 "silu", "mish", "hardswish", "hardsigmoid"}


def _key(node: fx.Node, match: Callable[[fx.Node], Any], attributes: set[str] | None = None) -> tuple:
    """The structural key of ``node``; with ``attributes``, parameters outside them are left out (a bias
    that reconstruction created after the reference graph was recorded matches the call without it)."""
    inputs = []
    for value in node.all_input_nodes:
        if value.op == "get_attr":
            if attributes is None or value.target in attributes:
                inputs.append(("attr", value.target))
        elif value.op == "placeholder":
            inputs.append(("input", value.target))
        else:
            inputs.append(match(value))
    return (node.op, node.target, tuple(inputs))


class ReplayPlan:
    """The reference graph, indexed by structural key, and the nodes to watch."""

    def __init__(self, graph: fx.Graph, watched: set[str]):
        self.names_by_key: dict[tuple, list[str]] = defaultdict(list)
        self.attributes = {node.target for node in graph.nodes if node.op == "get_attr"}
        for node in graph.nodes:
            if node.op in ("call_function", "call_method", "call_module"):
                self.names_by_key[_key(node, lambda n: n.name)].append(node.name)
        self.watched = watched


def may_write(func, args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """The tensors a call may modify in place (its first argument, ``out=``), or []."""
    name = getattr(func, "__name__", "")
    targets = []
    writes = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
    if not writes and kwargs and kwargs.get("inplace") is True:
        writes = True
    if not writes and name in _INPLACE_FLAG and len(args) > 1 and args[-1] is True:
        writes = True
    if writes and args and isinstance(args[0], torch.Tensor):
        targets.append(args[0])
    if kwargs and "out" in kwargs:
        targets.extend(t for t in pytree.tree_leaves(kwargs["out"]) if isinstance(t, torch.Tensor))
    return targets


class SiteRecorder(Recorder):
    """The tracer's recorder, reporting the tensors of watched reference nodes."""

    def __init__(self, model: nn.Module, leaf_policy: LeafPolicy, plan: ReplayPlan,
                 on_site: Callable[[str, torch.Tensor], None],
                 before_write: Callable[[list[torch.Tensor]], None] | None = None):
        super().__init__(model, leaf_policy, strict=False)
        self.plan = plan
        self.on_site = on_site
        self.before_write = before_write
        self.matched: dict[fx.Node, str | None] = {}
        self.counts: dict[tuple, int] = defaultdict(int)
        self.seen: set[str] = set()

    def match(self, node: fx.Node) -> str | None:
        if node in self.matched:
            return self.matched[node]
        name = None
        if node.op in ("call_function", "call_method", "call_module"):
            key = _key(node, self.match, self.plan.attributes)
            names = self.plan.names_by_key.get(key)
            if names is not None:
                position = self.counts[key]
                self.counts[key] = position + 1
                if position < len(names):
                    name = names[position]
        self.matched[node] = name
        return name

    def bind_outputs(self, result, node):
        self.match(node)
        super().bind_outputs(result, node)

    def bind_tensor(self, tensor, node):
        super().bind_tensor(tensor, node)
        name = self.match(node)
        if name is not None and name in self.plan.watched and name not in self.seen:
            self.seen.add(name)
            self.on_site(name, tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.before_write is not None:
            targets = may_write(func, args, kwargs)
            if targets:
                self.before_write(targets)
        return super().__torch_function__(func, types, args, kwargs)


def run_recorded(model: nn.Module, args: tuple, kwargs: dict, leaf_policy: LeafPolicy, plan: ReplayPlan,
                 on_site: Callable[[str, torch.Tensor], None],
                 before_write: Callable[[list[torch.Tensor]], None] | None = None) -> tuple[Any, set[str]]:
    """Run ``model(*args, **kwargs)`` as the user would (train/eval mode and grad mode
    untouched) while recording it; returns the output and the watched nodes that were found."""
    recorder = SiteRecorder(model, leaf_policy, plan, on_site, before_write)
    with recording(model, recorder, args, kwargs):
        output = model(*args, **kwargs)
    return output, recorder.seen
