"""to_networkx: the recorded graph as a networkx DiGraph with dependency groups on its nodes."""

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import PruningIR


class ResidualNet(nn.Module):
    """stem conv -> bn -> relu, a residual conv branch added back, pooled into a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        z = y + self.branch(y)
        return self.head(z.mean((2, 3)))


def _view(model: nn.Module, *inputs, **ir_options) -> tuple[PruningIR, nx.DiGraph]:
    ir = PruningIR(model, **ir_options).infer_labels(*inputs)
    return ir, ir.to_networkx()


def _only(view: nx.DiGraph, **attributes) -> str:
    found = [n for n, data in view.nodes(data=True) if all(data[k] == v for k, v in attributes.items())]
    assert len(found) == 1, (attributes, found)
    return found[0]


def test_residual_net_view():
    torch.manual_seed(0)
    ir, view = _view(ResidualNet(), torch.randn(2, 3, 8, 8))
    assert nx.is_directed_acyclic_graph(view)

    # one node per op, input, output and parameter read; buffer reads are left out
    fx_nodes = {node.name: node for node in ir.graph.nodes}
    buffers = {name for name, node in fx_nodes.items() if node.op == "get_attr" and "running" in node.target}
    assert buffers and set(view) == set(fx_nodes) - buffers
    assert view.nodes[_only(view, op="get_attr", target="stem.weight")]["module"] == "stem"

    stem = _only(view, target="torch.conv2d", module="stem")
    branch = _only(view, target="torch.conv2d", module="branch")
    add = _only(view, op="call_method", target="add")
    assert view.nodes[stem]["shape"] == (2, 8, 8, 8)

    # the residual add carries the group of both convs feeding it, and that group is prunable
    groups = view.nodes[add]["groups"]
    assert len(groups) == 1 and view.nodes[stem]["groups"] == groups == view.nodes[branch]["groups"]
    residual = view.graph["groups"][groups[0]]
    assert residual["prunable"] and residual["labels"] == 8 and {"stem", "bn", "branch"} <= set(residual["modules"])
    assert view.nodes[add]["pinned_reasons"] == []

    # the classifier's outputs reach the model output: their group is pinned, with its reason
    classifier = _only(view, target="torch._C._nn.linear")
    (head_group,) = view.nodes[classifier]["groups"]
    summary = view.graph["groups"][head_group]
    assert not summary["prunable"] and summary["channels"] == 5 and summary["labels"] == 0
    assert any("model output" in reason for reason in summary["reasons"])
    assert view.nodes[classifier]["pinned_reasons"] == summary["reasons"]

    # edges are the fx data flow (an edge per kept input, none else)
    expected = {(i.name, n.name) for n in ir.graph.nodes if n.name in view for i in n.all_input_nodes if i.name in view}
    assert set(view.edges) == expected
    assert {stem, branch} <= set(nx.ancestors(view, add)) and set(view.predecessors(add)) == {"relu", branch}
    path = nx.shortest_path(view, "input_0", "output")
    assert path[0] == "input_0" and path[-1] == "output" and add in path and classifier in path

    # the groups dict agrees with the IR's groups
    assert sorted(view.graph["groups"]) == [g.id for g in ir.groups]
    for group in ir.groups:
        assert view.graph["groups"][group.id] == {
            "labels": len(group.classes), "channels": group.channel_count, "prunable": group.prunable,
            "exact": group.exact, "modules": group.modules, "reasons": group.unprunable_reasons}


class WithLeaf(nn.Module):
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.conv(x) * 2

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.mixer = self.Mixer()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.mixer(F.relu(self.stem(x)))))


def test_leaf_module_node_and_pinned_reason():
    torch.manual_seed(0)
    model = WithLeaf()
    _, view = _view(model, torch.randn(2, 3, 5, 5), leaf_modules=[model.mixer])
    mixer = _only(view, op="call_module")
    assert view.nodes[mixer]["module"] == "mixer" and view.nodes[mixer]["target"] == "mixer"
    # the leaf has no channel rule: the stem's channels entering it are pinned, and say why
    stem = _only(view, target="torch.conv2d", module="stem")
    (group,) = view.nodes[stem]["groups"]
    assert not view.graph["groups"][group]["prunable"]
    assert any("leaf module 'mixer'" in reason for reason in view.nodes[stem]["pinned_reasons"])
    assert mixer in nx.descendants(view, stem)
