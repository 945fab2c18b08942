"""The channel-rule registry and the context a rule works through.

A channel rule is a small function ``rule(ctx) -> layout`` registered for op names
(``@channel_rule("conv2d")``) or module types (``@module_rule(nn.LSTM)``). It reads its
inputs' layouts from ``ctx``, states facts through ``ctx`` (unions, pins, parameter and
attribute bindings) and returns the layout of its output (a tuple for ops returning
several tensors). Rules share no state: everything goes through the context.

An op without a rule is a barrier: the channels of its inputs are pinned, and its
outputs carry no channel identity. Nothing is ever assumed element-wise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch.fx as fx
from torch import nn

from ..channels import AttributeBinding, TensorLayout, owner_path
from ..propagation_state import named_tensor
from ..recorded_ints import AttributeTerms, DerivedInt, attributes_of
from ..tracing import AttributeInt, ShapeInt

if TYPE_CHECKING:
    from ..propagation_state import PropagationState

Rule = Callable[["RuleContext"], Any]
_OP_RULES: dict[str, Rule] = {}
_MODULE_RULES: dict[type, Rule] = {}

# Module attributes that forward code commonly uses as sizes; a literal in a size
# argument equal to one of these on an enclosing module is taken to be that attribute,
# which is then updated by prune(). Anything else literal on a channel dimension pins it.
SIZE_ATTRIBUTES = (
    "num_heads", "num_attention_heads", "num_key_value_heads", "n_head", "n_heads", "heads",
    "head_dim", "attention_head_size", "all_head_size", "embed_dim", "hidden_size", "split_size",
    "nf", "inner_dim", "dim", "channels", "num_channels", "in_channels", "out_channels",
    "in_features", "out_features", "num_features", "hidden_dim", "intermediate_size",
)

# Attributes that count heads: when a split by -1 makes heads, the innermost module's
# attribute equal to the head count is kept in step with it.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_head", "n_heads", "heads")


def counting_factor(terms: dict, values: dict) -> tuple[tuple, int] | None:
    """The factor of one product of attributes (``AttributeTerms.terms``) that follows pruning, and the product
    of the rest with the coefficient: ``num_heads * head_dim`` -> (num_heads, head_dim). The counting factor is a
    head count (``config.num_attention_heads`` too), or the only factor; None when there is no single one."""
    if len(terms) != 1:
        return None
    (factors, coefficient), = terms.items()
    if not factors or coefficient <= 0:
        return None
    counting = [f for f in set(factors) if len(factors) == 1 or f[1].rpartition(".")[2] in HEAD_COUNT_ATTRIBUTES]
    if len(counting) != 1 or factors.count(counting[0]) != 1:
        return None
    return counting[0], coefficient * int(np.prod([values[f] for f in factors if f != counting[0]], dtype=np.int64))


def counting_terms(terms: dict, values: dict) -> tuple[tuple, int, int] | None:
    """:func:`counting_factor` of a product of attributes plus a non-negative constant, and that constant:
    Falcon's ``num_heads + 2`` (query heads, then one key and one value head) -> (num_heads, 1, 2). The
    constant's positions keep their count however many the counting factor loses."""
    constant = terms.get((), 0)
    counting = counting_factor({key: c for key, c in terms.items() if key != ()}, values)
    if counting is None or constant < 0:
        return None
    return counting[0], counting[1], constant


def _names(attributes: frozenset) -> str:
    return ", ".join(sorted(f"{path}.{name}" if path else name for path, name in attributes))


def channel_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` for torch ops by name (``conv2d`` covers ``torch.conv2d`` and ``F.conv2d``)."""

    def register(rule: Rule) -> Rule:
        for name in names:
            if name in _OP_RULES:
                raise ValueError(f"a channel rule for '{name}' is already registered")
            _OP_RULES[name] = rule
        return rule

    return register


def module_rule(*types: type) -> Callable[[Rule], Rule]:
    """Register ``rule`` for leaf modules of these types (and their subclasses)."""

    def register(rule: Rule) -> Rule:
        for module_type in types:
            _MODULE_RULES[module_type] = rule
        return rule

    return register


def op_name(node: fx.Node) -> str:
    """The name a node's op is registered under: ``torch.add``, ``Tensor.add``, ``x + y`` and
    ``x.add_`` are all ``add``; reflected operators keep an ``r`` (``rsub``, ``rmatmul``)."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if name in _OP_RULES:
        return name
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in _OP_RULES:
            name = name[1:]
    elif name.endswith("_") and name[:-1] in _OP_RULES:
        name = name[:-1]
    return name


def find_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        for klass in type(module).__mro__:
            if klass in _MODULE_RULES:
                return _MODULE_RULES[klass]
        return None
    return _OP_RULES.get(op_name(node))


def registered_ops() -> list[str]:
    return sorted(_OP_RULES)


class RuleContext:
    """What a rule sees of one node, and the only way it states facts."""

    def __init__(self, state: "PropagationState", node: fx.Node):
        self.state = state
        self.node = node
        self.atoms = state.atoms
        stack = node.meta.get("module_stack", ())
        self.module_stack: tuple[str, ...] = tuple(stack)
        self.module_path = self.module_stack[-1] if self.module_stack else ""
        self.op = op_name(node) if node.op != "call_module" else type(self.module).__name__

    # -- reading ----------------------------------------------------------------------
    def argument(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def layout(self, value: Any) -> TensorLayout | None:
        """The layout of a tensor argument; None for anything that is not a tensor."""
        return self.state.layout_of(value) if isinstance(value, fx.Node) else None

    def shape(self, value: Any) -> tuple[int, ...]:
        return tuple(value.meta["shape"])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.node.meta["shape"])

    @property
    def module(self) -> nn.Module | None:
        if self.node.op != "call_module":
            return None
        return self.state.modules[self.node.target]

    def enclosing_modules(self):
        for path in reversed(self.module_stack):
            yield path, self.state.modules[path]

    def parameter_name(self, value: Any) -> str | None:
        if isinstance(value, fx.Node) and value.op == "get_attr":
            return value.target
        return None

    def owner_module(self, parameter: Any) -> tuple[str, nn.Module] | None:
        """The enclosing module that owns this parameter directly (``conv.weight`` -> ``conv``), also
        when the op reads a tensor computed from it alone, of its shape (a weight standardised or
        scaled in ``forward``, as BiT's ``StdConv2d``): the module's size attributes follow it."""
        if not self.module_stack or not isinstance(parameter, fx.Node):
            return None
        name = self.parameter_name(parameter) or self._computed_from(parameter)
        if name is None or owner_path(name) != self.module_path:
            return None
        return self.module_path, self.state.modules[self.module_path]

    def _computed_from(self, value: fx.Node, depth: int = 8) -> str | None:
        """The one parameter of ``value``'s shape that ``value`` is computed from within ``depth`` ops
        in the current module (None if none, or several)."""
        found, frontier, seen = set(), [value], {value}
        for _ in range(depth):
            frontier = [n for node in frontier for n in node.all_input_nodes if n not in seen]
            seen.update(frontier)
            for node in frontier:
                if node.op == "get_attr" and tuple(node.meta.get("shape", ())) == self.shape(value):
                    found.add(node.target)
            frontier = [n for n in frontier if n.op in ("call_function", "call_method")]
        if len(found) > 1:   # a parametrization's buffers of the same shape (orthogonal's ``base``) are not it
            found = {name for name in found if isinstance(named_tensor(self.state.modules, name), nn.Parameter)}
        return found.pop() if len(found) == 1 else None

    def where(self) -> str:
        return f"{self.op} in '{self.module_path or '<model>'}'"

    # -- facts --------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        return self.atoms.fresh(n)

    def union(self, left: np.ndarray | None, right: np.ndarray | None) -> None:
        """Positions i of ``left`` and ``right`` go together; None (no channel identity) pins the other."""
        reason = f"{self.where()}: meets a position without channel identity"
        if left is None or right is None:
            if left is not None or right is not None:
                self.atoms.pin(left if left is not None else right, reason)
            return
        self.atoms.union(left, right, reason)

    def union_all(self, atoms: np.ndarray) -> None:
        atoms = np.asarray(atoms).ravel()
        self.union(atoms[:-1], atoms[1:]) if atoms.size > 1 else None

    def tie(self, atoms_list: list, reason: str) -> np.ndarray | None:
        """Positions that meet (element-wise, concatenated side by side, batched): union them
        all; if one side has no channel identity, pin the others. Returns the joint atoms."""
        carriers = [a for a in atoms_list if a is not None]
        if len(carriers) < len(atoms_list):
            for atoms in carriers:
                self.pin(atoms, reason)
            return None
        for atoms in carriers[1:]:
            if atoms is not carriers[0]:
                self.union(carriers[0], atoms)
        return carriers[0] if carriers else None

    def pin(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is not None:
            self.atoms.pin(atoms, f"{self.where()}: {reason}")

    def pin_layout(self, layout: TensorLayout | None, reason: str) -> None:
        if layout is not None:
            for atoms in layout.dims:
                self.pin(atoms, reason)

    def require_multiple(self, atoms: np.ndarray | None, multiple: int, reason: str) -> None:
        """A kernel needs this dimension's width to stay a multiple of ``multiple`` (selectors keep it so)."""
        if atoms is not None:
            self.atoms.require_multiple(atoms, multiple, f"{self.where()}: {reason}")

    def note_attributes(self, value: Any, reason: str, fixed: bool = False) -> None:
        """The module attributes ``value`` was computed from are used here as a number (their channels
        become inexact) or, ``fixed``, as the size of a dim without channels (pinned): applied once
        propagation knows every binding of them (``propagation.mark_counted_attributes``)."""
        uses = self.state.fixed_attributes if fixed else self.state.counted_attributes
        for path, name in attributes_of(value):
            uses.setdefault((path, name), f"{self.where()}: {path + '.' if path else ''}{name} {reason}")

    def mark_inexact(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is not None:
            self.atoms.mark_inexact(atoms, f"{self.where()}: {reason}")

    def atoms_of(self, value: Any, dim: int) -> np.ndarray | None:
        """The atoms of dimension ``dim`` of a tensor argument (None: no channel identity)."""
        layout = self.layout(value)
        return None if layout is None else layout.dims[dim % layout.ndim]

    def parameter_atoms(self, name: str, dim: int) -> np.ndarray | None:
        """The atoms of a parameter a leaf module uses internally (no node refers to it)."""
        return self.state.parameter_atoms(name, dim)

    def bind_attribute(self, module_path: str, attribute: str, atoms: np.ndarray,
                       divisor: int = 1, tuple_index: int | None = None) -> None:
        """After pruning, ``module.attribute`` is the kept count of ``atoms`` over ``divisor``. An attribute
        holds one value for every place that reads it: a dotted one (``config.num_attention_heads``) is a
        field of an object several modules share, and a plain one may size two tensors (a non-local
        block's ``inter_channels``). A binding of it as wide as the first is tied to it position by
        position (Phi-3's layers then lose the same heads); a dotted one of another width pins both (a
        plain one of another width counts the same units otherwise: heads, and their channels)."""
        atoms = np.asarray(atoms, dtype=np.int64)
        first = next((b for b in self.state.attribute_bindings if (b.module_path, b.attribute, b.tuple_index)
                      == (module_path, attribute, tuple_index)), None)
        if first is not None and (len(first.atoms), first.divisor) == (len(atoms), divisor):
            self.atoms.union(first.atoms, atoms, f"{self.where()}: {attribute} sizes several tensors and one of "
                                                 "them keeps these channels")
        elif first is not None and "." in attribute:
            reason = f"{attribute} sizes tensors of different widths"
            self.pin(first.atoms, reason)
            self.pin(atoms, reason)
        self.state.attribute_bindings.append(AttributeBinding(module_path, attribute, atoms, divisor, tuple_index))

    def size_kind(self, value: Any) -> str:
        """``free``: -1 or read from a tensor; ``attribute``: a module attribute (traced as one,
        or a literal equal to a known size attribute of an enclosing module); ``derived``: computed from
        attributes in a way pruning does not follow (:class:`DerivedInt`); ``literal``: hard-coded in forward()."""
        if isinstance(value, DerivedInt):
            return "derived"
        if value is None or isinstance(value, (ShapeInt, fx.Node)) or value == -1:
            return "free"
        if isinstance(value, AttributeInt) and value.module_path in self.state.modules:
            return "attribute"
        if self.counted(value) is not None:
            return "attribute"
        return "attribute" if self._size_attributes(value) else "literal"

    def size_rank(self, value: Any) -> int:
        """How surely a size follows pruning: 0 free or a traced module attribute, 1 a literal
        equal to a known attribute, 2 a literal."""
        kind = self.size_kind(value)
        traced = isinstance(value, AttributeInt) or self.counted(value) is not None
        return 0 if kind == "free" or traced else {"attribute": 1, "literal": 2, "derived": 2}[kind]

    def counted(self, value: Any) -> tuple[tuple, int, int] | None:
        """For a product of module attributes plus a constant (``self.num_heads * self.head_dim``,
        ``self.num_heads + 2``): its counting factor, the product of the rest, and the constant
        (:func:`counting_terms`); None for any other size."""
        if not isinstance(value, AttributeTerms):
            return None
        counting = counting_terms(value.terms, value.values)
        return counting if counting is not None and counting[0][0] in self.state.modules else None

    def bind_product(self, counting: tuple, atoms: np.ndarray) -> None:
        """Keep the counting attribute of a product (``counted``) in step with ``atoms``, removed in units of
        the rest (a head of ``head_dim`` positions: its counting factor is the outer one)."""
        (path, attribute, divisor), unit = counting[:2]
        units = np.asarray(atoms).reshape(-1, unit)
        self.union(units[:, :-1].ravel(), units[:, 1:].ravel())
        self.bind_attribute(path, attribute, np.tile(atoms, divisor), divisor=unit)

    def _bind_counted(self, value: AttributeTerms, atoms: np.ndarray, what: str) -> None:
        """Bind the counting factor of ``value`` (:meth:`counted`) to the leading positions of ``atoms``; the
        last ``constant`` positions (``num_heads + 2``: the key and value heads) keep their count and are
        pinned. Which positions the constant counts does not matter to the size: any it names stay."""
        counting = self.counted(value)
        constant = counting[2]
        counted = atoms[:len(atoms) - constant]
        if constant >= len(atoms) or len(counted) % counting[1]:
            self.pin(atoms, f"{what} ({int(value)}) is not one attribute times a fixed size plus a constant")
            return
        if constant:
            self.pin(atoms[len(atoms) - constant:], f"{what} is a module attribute plus the constant {constant}: "
                                                    f"the last {constant} positions keep their count")
        self.bind_product(counting, counted)

    def _size_attributes(self, value: int) -> tuple[str, list[str]] | None:
        """The innermost enclosing module with size attributes equal to ``value``, and those
        attributes (all of them: forward may use any, e.g. GPT-2's equal split_size and embed_dim)."""
        for path in reversed(self.module_stack):
            names = [a for a, v in self.state.int_attributes(path, SIZE_ATTRIBUTES).items() if v == value]
            if names:
                return path, names
        return None

    def bind_head_count(self, size: int, atoms: np.ndarray) -> None:
        """Keep a head-count attribute of the innermost module equal to ``size`` in step with ``atoms``."""
        for path in reversed(self.module_stack):
            for attribute, value in self.state.int_attributes(path, HEAD_COUNT_ATTRIBUTES).items():
                if value == size:
                    self.bind_attribute(path, attribute, atoms)
                    return

    def source_atoms(self, value: Any) -> list[tuple[str, int, np.ndarray | None]]:
        """For a size computed from tensor sizes: (node, dim, atoms) of every dimension it was read from."""
        if not isinstance(value, ShapeInt):
            return []
        nodes = getattr(self.state, "node_named", {})
        found = []
        for name, dim in value.sources:
            node = nodes.get(name)
            layout = self.state.layout_of(node) if node is not None else None
            found.append((name, dim, None if layout is None else layout.dims[dim]))
        return found

    def size_is_fixed(self, value: Any) -> bool:
        """Whether a size stays what it is after pruning: a literal, an unbound attribute,
        or computed only from tensor dimensions that carry no channels (not :class:`DerivedInt`: its
        attributes may be bound anywhere in the model)."""
        if isinstance(value, DerivedInt):
            return False
        if not isinstance(value, ShapeInt):
            return True
        return not value.attributes and all(atoms is None for _, _, atoms in self.source_atoms(value))

    def pin_size_sources(self, value: Any, reason: str) -> None:
        """Pin the channels of every tensor dimension a size was read from."""
        for name, dim, atoms in self.source_atoms(value):
            self.pin(atoms, f"{reason} (its size is read from {name} dim {dim})")

    def size_follows(self, value: Any, atoms: np.ndarray | None, what: str, heads: bool = False) -> bool:
        """Whether a size argument on a channel dimension follows pruning.

        A free size follows; read straight from another tensor's dimension, it ties that
        dimension's channels to these position by position (both keep the same count), or
        pins these when that dimension carries none. A module attribute is bound (prune()
        updates it), and so is the head count of a product of attributes (``self.num_heads *
        self.head_dim``, plus a constant: ``self.num_heads + 2``); any other literal is hard-coded, and
        so is a size computed from attributes by other arithmetic: the dimension's channels are pinned.
        ``heads``: the dimension counts heads, so a head-count attribute is preferred when
        several attributes hold the same value (``num_heads == head_dim == 4``).
        """
        if atoms is None:
            return True
        kind = self.size_kind(value)
        if isinstance(value, ShapeInt) and value.origin is not None:
            (name, dim, source), = self.source_atoms(ShapeInt(value, value.origin))
            if source is None:
                self.pin(atoms, f"{what} is read from {name} dim {dim}, which does not follow these channels")
                return False
            if len(source) == len(atoms):
                self.union(atoms, source)
        elif isinstance(value, AttributeInt) and kind == "attribute":  # attribute // divisor: tile the atoms
            self.bind_attribute(value.module_path, value.attribute, np.tile(atoms, value.divisor))
        elif self.counted(value) is not None:  # num_heads * head_dim, num_heads + 2: the head count follows
            self._bind_counted(value, atoms, what)
        elif kind == "attribute":
            path, names = self._size_attributes(value)
            preferred = [n for n in names if (n in HEAD_COUNT_ATTRIBUTES) == heads]
            for name in preferred or names:
                self.bind_attribute(path, name, atoms)
        elif kind == "literal":
            self.pin(atoms, f"{what} is the literal {value} in forward()")
        elif kind == "derived":
            self.pin(atoms, f"{what} ({int(value)}) is computed from {_names(value.attributes)} by arithmetic "
                            "that pruning does not follow (such as //)")
        return kind not in ("literal", "derived")
