"""The recorded graph as a networkx DiGraph, for people to query and draw.

One networkx node per fx node that computes or holds something (inputs, ops, parameter
reads, the output), keyed by the fx node name, with the dependency groups whose channels
its output carries; edges follow the fx data flow. Buffer and constant reads are left out:
they carry state, not the data flow of the channels. The groups themselves (size,
prunability, reasons) sit in ``graph.graph["groups"]``, so queries such as "which ops carry
group 3" or "why is the classifier pinned" need no pruner API.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import torch.fx as fx
from torch import nn

from .channels import PINNED
from .labels import ChannelIndex, ChannelSite, DependencyGroup

_KEPT_OPS = ("placeholder", "call_module", "call_function", "call_method", "output")


def _target_name(target: Any) -> str:
    """A readable name for an fx target: strings as they are, functions as ``module.name``."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None)
    if name is None:
        return repr(target)
    module = getattr(target, "__module__", None)
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}" if module else name


def _module_path(node: fx.Node, parameters: set[str]) -> str | None:
    """The module a node belongs to: a leaf module's path, a parameter's owner, or the module
    whose forward ran the op (``""`` for the model itself); None for inputs and the output."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0] if node.target in parameters else None
    stack = node.meta.get("module_stack")
    return stack[-1] if stack else None


def _node_groups(sites: list[ChannelSite], group_of_class: np.ndarray) -> dict[str, list[int]]:
    """Per fx node name: the sorted ids of the groups whose channels (prunable or pinned)
    its output carries, read from the index's activation sites."""
    carried: dict[str, set[int]] = {}
    for site in sites:
        classes = site.classes[site.classes != PINNED]
        groups = group_of_class[classes]
        carried.setdefault(site.node, set()).update(int(g) for g in np.unique(groups[groups >= 0]))
    return {name: sorted(groups) for name, groups in carried.items()}


def _group_summary(group: DependencyGroup) -> dict[str, Any]:
    return {"labels": len(group.classes), "channels": group.channel_count, "prunable": group.prunable,
            "exact": group.exact, "modules": list(group.modules), "reasons": list(group.unprunable_reasons)}


def to_networkx(graph: fx.Graph, index: ChannelIndex, model: nn.Module) -> nx.DiGraph:
    """The recorded ``graph`` as a DiGraph: node attributes ``op``, ``target``, ``module``,
    ``shape``, ``groups`` (ids of the dependency groups its output carries) and
    ``pinned_reasons`` (why those of them that are not prunable are pinned); an edge per
    data-flow input; ``graph["groups"]`` summarises every group by id."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    groups = {group.id: group for group in index.groups}
    # group_of_class maps pinned channels to their group too (a group's ``classes`` holds
    # only its prunable ones); the index sets it when it builds its groups, just above
    node_groups = _node_groups(index.sites, index.group_of_class)
    view = nx.DiGraph()
    view.graph["groups"] = {gid: _group_summary(group) for gid, group in groups.items()}
    for node in graph.nodes:
        if node.op not in _KEPT_OPS and not (node.op == "get_attr" and node.target in parameters):
            continue
        carried = node_groups.get(node.name, [])
        reasons: list[str] = []
        for gid in carried:
            if not groups[gid].prunable:
                reasons.extend(r for r in groups[gid].unprunable_reasons if r not in reasons)
        view.add_node(node.name, op=node.op, target=_target_name(node.target),
                      module=_module_path(node, parameters), shape=node.meta.get("shape"),
                      groups=carried, pinned_reasons=reasons)
        for source in node.all_input_nodes:
            if source.name in view:
                view.add_edge(source.name, node.name)
    return view
