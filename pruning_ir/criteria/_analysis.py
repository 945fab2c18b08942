"""Where a label's channel is produced and where it is gated: facts read from the recorded
graph and the channel index, shared by the criteria.

A label (class ``c``) lives at many activation sites: a conv output, the batch norm after it,
the ReLU after that, a residual add, a concatenation, an attention head. Its *gate sites*
are the places where multiplying ``c`` by a scalar gate ``z`` and setting ``z = 0`` removes
the channel, as late as possible so that ``z`` stays as linear as possible:

* a site *produces* ``c`` when ``c`` appears there for the first time (no input of the op
  carries it: a conv, a linear) or when the op has a parameter bound to ``c`` (the batch or
  layer norm after a conv, a depthwise conv, a bias add, a class-token concatenation);
* a producing site is a *gate* when ``c`` leaves it, along a path with no further
  producer of ``c``, towards an op that consumes ``c`` (contracts it: a conv, a linear, a
  matmul over channels, a pooling over channels) or a model output.

So in ``conv -> bn -> relu -> conv`` the gate is the batch norm output, in a ResNet stage
the gates are the stem's and every block's last batch norm (the residual branches), in a
pre-norm transformer the residual stream is gated at every LayerNorm output (each consumer
of the stream), in a DenseNet a channel is gated at the batch norm of every later layer
that reads the concatenation, and an attention head at its q/k/v projection output. All
gates of a label are driven by the same ``z``.

:class:`GraphFacts` computes these facts with a chain of passes, one fact each, every pass
reading the results of the ones before it: ``tuple_nodes``, ``node_classes``,
``derived_nodes``, ``parameters_used``, ``producer_nodes``, then ``gate_classes`` (a
backward pass).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..labels import ChannelIndex, ChannelSite

_EMPTY = np.zeros(0, dtype=np.int64)


def label_mask(index: ChannelIndex) -> np.ndarray:
    """Boolean mask over class ids: True for the classes that are labels (prunable)."""
    return index.label_mask()


@dataclass
class SiteGate:
    """Positions ``positions`` (None: all) of dimension ``dim`` of node ``node``'s output are
    gates of the labels ``classes`` (one class per gated position)."""

    node: str
    dim: int
    size: int
    positions: np.ndarray | None
    classes: np.ndarray
    _tensors: dict = field(default_factory=dict, repr=False)

    def index_tensors(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        cached = self._tensors.get(device)
        if cached is None:
            positions = None if self.positions is None else torch.as_tensor(self.positions, device=device)
            cached = (positions, torch.as_tensor(self.classes, device=device))
            self._tensors[device] = cached
        return cached


@dataclass
class ParameterGate:
    """A gate whose op is linear in its own parameters: ``output[:, i] = weight[i] * f(x) +
    bias[i]`` (conv, linear, batch/group/instance/layer norm), so the gate term
    ``sum(a * dL/da)`` over output channel ``i`` equals ``weight[i] . dL/dweight[i] +
    bias[i] * dL/dbias[i]``, read from the parameter gradients."""

    site: SiteGate
    weight: str
    bias: str | None


# Ops whose output channel i is weight[i] * f(input) + bias[i] (weight/bias argument
# positions, and the output dim that holds the channels: None = last dim).
_AFFINE_OPS = {
    F.conv1d: (1, 2, 1), F.conv2d: (1, 2, 1), F.conv3d: (1, 2, 1),
    F.linear: (1, 2, None),
    F.batch_norm: (3, 4, 1), F.instance_norm: (3, 4, 1),
    F.group_norm: (2, 3, 1), F.layer_norm: (2, 3, None),
}
_WEIGHT_KWARG, _BIAS_KWARG = "weight", "bias"
_CONTRACTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def _argument(node: fx.Node, position: int, name: str):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name)


def _is_tuple_node(node: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method", "call_module") and node.meta.get("shape") is None
            and bool(node.users) and all(u.op == "call_function" and u.target is operator.getitem
                                         for u in node.users))


def _op_inputs(node: fx.Node, tuples: set[fx.Node]) -> list[fx.Node]:
    """A node's inputs; a getitem of a tuple-valued op stands for that op: it has the op's inputs."""
    found = node.all_input_nodes
    if node.target is operator.getitem and found and found[0] in tuples:
        return found[0].all_input_nodes
    return found


def _op_users(node: fx.Node, tuples: set[fx.Node]) -> list[fx.Node]:
    """A node's users, with a tuple-valued user replaced by its getitems."""
    result = []
    for user in node.users:
        if user in tuples:
            result.extend(user.users)
        else:
            result.append(user)
    return result


# -- passes ----------------------------------------------------------------------------------
# One pass, one fact, as torch.fx's ShapeProp: each reads the graph, the index and the results
# of the passes before it, and returns its own; GraphFacts runs them in this order.

def sites_by_node(index: ChannelIndex) -> defaultdict[str, list[ChannelSite]]:
    """The activation sites of the index, per graph node name."""
    sites: defaultdict[str, list[ChannelSite]] = defaultdict(list)
    for site in index.sites:
        sites[site.node].append(site)
    return sites


def parameter_label_classes(index: ChannelIndex, labels: np.ndarray, dim: int | None = None) -> dict[str, np.ndarray]:
    """Per parameter name: the label classes bound to any of its dimensions (``dim``: to that one only)."""
    collected: dict[str, list[np.ndarray]] = defaultdict(list)
    for binding in index.parameter_bindings:
        if dim is None or binding.target.dim == dim:
            collected[binding.target.name].append(binding.classes)
    result = {}
    for name, arrays in collected.items():
        classes = np.unique(np.concatenate(arrays))
        result[name] = classes[labels[classes]]
    return result


def read_label_classes(index: ChannelIndex, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per parameter name: the label classes bound to its dimension 1 (a conv's or linear's weight:
    its in-channels, the channels an op with it *reads*)."""
    return parameter_label_classes(index, labels, dim=1)


def tuple_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """Ops whose value is a tuple read only through ``getitem``: their getitems stand for them."""
    return {node for node in nodes if _is_tuple_node(node)}


def node_classes(nodes: list[fx.Node], sites: dict[str, list[ChannelSite]], labels: np.ndarray,
                 tuples: set[fx.Node]) -> dict[fx.Node, np.ndarray]:
    """The label classes each node's output carries; a tuple node carries its getitems'."""
    classes: dict[fx.Node, np.ndarray] = {}
    for node in nodes:
        found_sites = sites.get(node.name)
        if found_sites:
            found = np.unique(np.concatenate([s.classes for s in found_sites]))
            classes[node] = found[labels[found]]
    for node in nodes:
        if node in tuples:
            parts = [classes[u] for u in node.users if u in classes]
            classes[node] = np.unique(np.concatenate(parts)) if parts else _EMPTY
    return classes


def derived_nodes(nodes: list[fx.Node], tuples: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from parameters only (a parameter read, a view or product of parameters,
    an external value): they carry no activation, so they neither produce nor gate."""
    derived: set[fx.Node] = set()
    for node in nodes:
        if node.op == "get_attr":
            derived.add(node)
        elif node.op in ("placeholder", "output"):
            continue
        elif node.meta.get("external") or (node.op != "call_module" and node not in tuples
                                           and all(i in derived for i in node.all_input_nodes)):
            derived.add(node)
    return derived


def parameters_used(nodes: list[fx.Node], tuples: set[fx.Node], derived: set[fx.Node],
                    model: nn.Module) -> dict[fx.Node, set[str]]:
    """Per node: the parameters its op uses, directly (a module's own, a parameter read) or
    through an input derived from parameters only."""
    params: dict[fx.Node, set[str]] = {}
    for node in nodes:
        if node.op == "get_attr":
            params[node] = {node.target}
            continue
        if node.op in ("placeholder", "output"):
            params[node] = set()
            continue
        used = set()
        for i in _op_inputs(node, tuples):
            if i in derived:
                used |= params.get(i, set())
        if node.op == "call_module":
            used |= {f"{node.target}.{name}" for name, _ in model.get_submodule(node.target).named_parameters()}
        if node.target is operator.getitem and node.all_input_nodes and node.all_input_nodes[0] in tuples:
            used |= params.get(node.all_input_nodes[0], set())
        params[node] = used
    return params


def producer_nodes(classes: dict[fx.Node, np.ndarray], tuples: set[fx.Node], derived: set[fx.Node],
                   params: dict[fx.Node, set[str]],
                   parameter_classes: dict[str, np.ndarray]) -> dict[fx.Node, np.ndarray]:
    """Per activation node: the classes it produces, fresh (no input carries them) or bound
    to one of its parameters."""
    producers: dict[fx.Node, np.ndarray] = {}
    for node, carried in classes.items():
        if node in tuples or node in derived:
            continue
        inherited = [classes[i] for i in _op_inputs(node, tuples) if i in classes and i not in derived]
        fresh = np.setdiff1d(carried, np.concatenate(inherited), assume_unique=True) if inherited else carried
        bound = [parameter_classes[p] for p in params[node] if p in parameter_classes]
        own = np.intersect1d(carried, np.concatenate(bound)) if bound else _EMPTY
        producers[node] = np.union1d(fresh, own)
    return producers


def gate_classes(nodes: list[fx.Node], classes: dict[fx.Node, np.ndarray], tuples: set[fx.Node],
                 producers: dict[fx.Node, np.ndarray],
                 reads: dict[fx.Node, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per node name: the classes it gates, found by a backward pass that tracks, per
    producer, the classes that *leak* from it (reach a consumer or an output with no further
    producer on the way). A user that reads a class through its weight's input dimension and
    produces it too (a conv applied to its own output, ``x + fc(x)``) consumes it: it leaks."""
    reads = reads or {}
    # a leaf module is opaque: it may read a channel (an input projection) as well as
    # produce it, so a channel entering one is consumed there
    opaque = {n for n in nodes if n.op == "call_module"}
    opaque |= {u for n in opaque & tuples for u in n.users}
    leaks: dict[fx.Node, np.ndarray] = {}
    gates: dict[str, np.ndarray] = {}
    for node in reversed(nodes):
        if node not in producers:
            continue
        carried = classes[node]
        leak = _EMPTY
        for user in _op_users(node, tuples):
            user_classes = classes.get(user)
            if user_classes is None or user not in producers or user in opaque:
                leak = carried  # consumed (a model output, or an op that carries no label)
                break
            passed = np.intersect1d(carried, user_classes, assume_unique=True)
            leak = np.union1d(leak, np.setdiff1d(carried, user_classes, assume_unique=True))
            through = np.setdiff1d(passed, producers[user], assume_unique=True)
            leak = np.union1d(leak, np.intersect1d(through, leaks[user], assume_unique=True))
            if user in reads:
                leak = np.union1d(leak, np.intersect1d(passed, reads[user], assume_unique=True))
        leaks[node] = leak
        gated = np.intersect1d(producers[node], leak, assume_unique=True)
        if gated.size:
            gates[node.name] = gated
    return gates


class GraphFacts:
    """Per graph node: the label classes it carries, the parameters it uses, which of its
    classes it produces and which it gates (see the module docstring), from the passes above.

    ``classes``, ``producers`` and ``gates`` are keyed by node name; ``params`` by node and
    ``derived`` is a set of nodes (the criteria look them up from nodes)."""

    def __init__(self, graph: fx.Graph, index: ChannelIndex, model: nn.Module):
        nodes = list(graph.nodes)
        self.index = index
        self.labels = label_mask(index)
        self.nodes = {node.name: node for node in nodes}
        self.sites = sites_by_node(index)
        self.parameter_classes = parameter_label_classes(index, self.labels)
        self.tuples = tuple_nodes(nodes)
        classes = node_classes(nodes, self.sites, self.labels, self.tuples)
        self.derived = derived_nodes(nodes, self.tuples)
        self.params = parameters_used(nodes, self.tuples, self.derived, model)
        producers = producer_nodes(classes, self.tuples, self.derived, self.params, self.parameter_classes)
        read = read_label_classes(index, self.labels)
        reads = {}
        for node in nodes:  # the contractions: a conv or linear reads its weight's in-channels
            weight = _argument(node, 1, _WEIGHT_KWARG) if node.target in _CONTRACTIONS else None
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in read:
                reads[node] = read[weight.target]
        self.gates = gate_classes(nodes, classes, self.tuples, producers, reads)
        self.classes = {node.name: c for node, c in classes.items()}
        self.producers = {node.name: c for node, c in producers.items()}

    # -- gates ------------------------------------------------------------------------------
    def site_gates(self) -> dict[str, list[SiteGate]]:
        """Gate positions of every gate node, per site (dimension) of that node."""
        result: dict[str, list[SiteGate]] = {}
        for name, gated in self.gates.items():
            entries = []
            for site in self.sites[name]:
                mask = np.isin(site.classes, gated)
                if not mask.any():
                    continue
                positions = None if mask.all() else np.flatnonzero(mask)
                entries.append(SiteGate(name, site.dim, len(site.classes), positions, site.classes[mask]))
            if entries:
                result[name] = entries
        return result

    def parameter_gate(self, gate: SiteGate) -> ParameterGate | None:
        """The gate as parameter gradients, when its op is linear in its own parameters and
        those parameters are used by this op only; None otherwise."""
        node = self.nodes[gate.node]
        spec = _AFFINE_OPS.get(node.target) if node.op == "call_function" else None
        if spec is None or len(self.sites[gate.node]) != 1:
            return None
        weight_at, bias_at, channel_dim = spec
        shape = node.meta.get("shape")
        if shape is None:
            return None
        if channel_dim is None:
            channel_dim = len(shape) - 1
        if gate.dim != channel_dim:
            return None
        if node.target is F.layer_norm:
            normalized = _argument(node, 1, "normalized_shape")
            if not isinstance(normalized, (list, tuple)) or len(normalized) != 1:
                return None
        weight = _argument(node, weight_at, _WEIGHT_KWARG)
        bias = _argument(node, bias_at, _BIAS_KWARG)
        if not self._sole_parameter(weight) or not (bias is None or self._sole_parameter(bias)):
            return None
        if bias is not None and bias.target == weight.target:
            return None
        return ParameterGate(gate, weight.target, None if bias is None else bias.target)

    @staticmethod
    def _sole_parameter(value) -> bool:
        """A parameter read directly (not through a view or product) by one op only."""
        return isinstance(value, fx.Node) and value.op == "get_attr" and len(value.users) == 1

    def producer_classes(self) -> dict[str, np.ndarray]:
        """Per parameter name: the label classes of the outputs of the ops that use it (the
        positions of the parameter that *produce* those channels, as opposed to reading them)."""
        collected: dict[str, list[np.ndarray]] = defaultdict(list)
        for name, produced in self.classes.items():
            node = self.nodes[name]
            if node in self.derived:
                continue
            for parameter in self.params.get(node, ()):
                collected[parameter].append(produced)
        return {name: np.unique(np.concatenate(arrays)) for name, arrays in collected.items()}

    def batchnorm_folds(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per conv/linear weight followed only by a batch norm: the factor
        ``gamma / sqrt(running_var + eps)`` of each output channel."""
        folds = {}
        for node in self.nodes.values():
            if node.op != "call_function" or node.target is not F.batch_norm:
                continue
            source = node.args[0] if node.args else None
            if not isinstance(source, fx.Node) or source.op != "call_function" or len(source.users) != 1:
                continue
            if source.target not in (F.conv1d, F.conv2d, F.conv3d, F.linear):
                continue
            weight = _argument(source, 1, "weight")
            running_var = _argument(node, 2, "running_var")
            gamma = _argument(node, 3, "weight")
            eps = _argument(node, 7, "eps")
            if not isinstance(weight, fx.Node) or weight.op != "get_attr":
                continue
            if not isinstance(running_var, fx.Node) or running_var.op != "get_attr":
                continue
            variance = model.get_buffer(running_var.target).detach().double()
            factor = 1.0 / torch.sqrt(variance + (1e-5 if eps is None else float(eps)))
            if isinstance(gamma, fx.Node) and gamma.op == "get_attr":
                factor = factor * model.get_parameter(gamma.target).detach().double()
            folds[weight.target] = factor
        return folds
