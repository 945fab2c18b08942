"""The state one propagation pass builds: each node's layout and the facts rules stated.

Channel rules read and write it through ``RuleContext``; ``ChannelIndex.from_propagation``
turns it into labels and groups. It lives apart from the pass so that both can import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from .channels import AtomTable, AttributeBinding, ParameterBinding, TensorLayout

__all__ = ["PropagationState", "named_tensor"]


class PropagationState:
    """Layouts of the nodes visited so far, and the facts rules stated about them."""

    def __init__(self, model: nn.Module, gqa_unit: str = "query_heads"):
        self.model = model
        self.gqa_unit = gqa_unit   # grouped-query attention's label unit (channel_rules.attention)
        self.modules: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
        self._int_attributes: dict[tuple[str, tuple[str, ...]], dict[str, int]] = {}
        self.atoms = AtomTable()
        self.layouts: dict[fx.Node, Any] = {}
        self.parameter_bindings: dict[tuple[str, int], ParameterBinding] = {}
        self.attribute_bindings: list[AttributeBinding] = []
        self.parameter_derived: set[fx.Node] = set()
        self.node_named: dict[str, fx.Node] = {}   # sizes name the node they were read from
        self.counted_attributes: dict[tuple[str, str], str] = {}   # (module path, attribute) used as a number
        self.fixed_attributes: dict[tuple[str, str], str] = {}     # ... also sizing a dim without channels

    def parameter_atoms(self, name: str, dim: int) -> np.ndarray | None:
        """Atoms of one dimension of a parameter or buffer, made once (size-1 dims have none)."""
        key = (name, dim)
        if key not in self.parameter_bindings:
            tensor = named_tensor(self.modules, name)
            if tensor is None or tensor.shape[dim] == 1:
                return None
            self.parameter_bindings[key] = ParameterBinding(name, dim, self.atoms.fresh(tensor.shape[dim]))
        return self.parameter_bindings[key].atoms

    def int_attributes(self, path: str, names: tuple[str, ...]) -> dict[str, int]:
        """The int-valued attributes among ``names`` of one module (read once per module)."""
        key = (path, names)
        if key not in self._int_attributes:
            values = {name: getattr(self.modules[path], name, None) for name in names}
            self._int_attributes[key] = {k: v for k, v in values.items() if type(v) is int}
        return self._int_attributes[key]

    def layout_of(self, node: fx.Node, allow_tuple: bool = False) -> Any:
        layout = self.layouts.get(node)
        if layout is None and node.op == "get_attr":
            ndim = len(node.meta["shape"])
            layout = TensorLayout(tuple(self.parameter_atoms(node.target, d) for d in range(ndim)))
            self.layouts[node] = layout
        if isinstance(layout, tuple) and not allow_tuple:
            return None
        return layout

    def channel_reads(self, size: Any) -> list[tuple[fx.Node, int, np.ndarray]]:
        """The ``(node, dim, atoms)`` reads of channel-carrying dimensions a recorded size (a
        ``ShapeInt`` or ``ShapeFloat``) was computed from; none for anything else."""
        reads = []
        for name, dim in getattr(size, "sources", ()):
            node = self.node_named.get(name)
            layout = self.layouts.get(node) if node is not None else None
            if isinstance(layout, TensorLayout) and dim < layout.ndim and layout.dims[dim] is not None:
                reads.append((node, dim, layout.dims[dim]))
        return reads


def named_tensor(modules: dict[str, nn.Module], name: str) -> Any:
    """The parameter or buffer ``name`` (a qualified name) of ``modules``, or None."""
    module_path, _, attribute = name.rpartition(".")
    tensor = getattr(modules[module_path], attribute, None)
    return tensor if hasattr(tensor, "shape") else None
