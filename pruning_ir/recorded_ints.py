"""Ints that remember where they came from while a model is recorded.

:class:`ShapeInt` is a size read from a recorded tensor (or computed from one), so a channel rule
can tell a size that follows the channels from a literal written in ``forward``;
:class:`AttributeInt` is an int module attribute, so a literal size that is in fact
``self.num_heads`` follows pruning too (an int field of a module's ``config`` object is one as well:
``self.config.num_attention_heads``), and :class:`AttributeTerms` is an int computed from attributes by
``+``, ``-`` and ``*`` (``num_heads * head_dim``: a slice bound of a fused projection). Any other arithmetic
on attributes (``self.num_heads // self.num_kv``) gives a :class:`DerivedInt`: it changes after pruning in
a way no rule computes, so a rule never takes it for a literal that stays. A comparison of a ShapeInt made by the model's own Python
(``if x.shape[1] >= 8:``) is reported to the recorder listening (:func:`comparisons_to`): Python
control flow on a channel count flips after pruning unless that count is kept.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

__all__ = ["ShapeInt", "ShapeFloat", "attributes_of", "AttributeInt", "AttributeTerms", "DerivedInt", "attribute_ints",
           "comparisons_to"]

# Listeners of ShapeInt comparisons (the active recorder's); only the innermost one hears them.
_LISTENERS: list[Callable[[str, "ShapeInt", Any], None]] = []


class ShapeInt(int):
    """An int read from a tensor's size, or computed from one.

    A size argument that is a ShapeInt follows the tensor after pruning; a plain int
    in the same place was written in ``forward`` and stays what it was. ``origin`` is
    ``(node name, dim)`` when the int was read straight from a recorded tensor's size;
    ``sources`` holds every such read it was computed from and ``attributes`` every module
    attribute (:class:`AttributeInt`), so a rule can tell whose channels a size follows.
    """

    def __new__(cls, value: int, origin: tuple[str, int] | None = None, sources: frozenset = frozenset(),
                attributes: frozenset = frozenset()):
        obj = super().__new__(cls, value)
        obj.origin, obj.attributes = origin, attributes
        obj.sources = sources | {origin} if origin is not None else sources
        return obj

    def __reduce__(self):
        return (ShapeInt, (int(self),))

    __hash__ = int.__hash__


class ShapeFloat(float):
    """A float computed from a :class:`ShapeInt` or a module attribute (``x.shape[1] ** -0.5``,
    ``total / self.hidden_dim``): a channel count used as a number. Its value changes when channels are
    removed, so an arithmetic rule meeting one as an operand marks the channels counted (``sources``,
    and those bound to ``attributes``) inexact."""

    def __new__(cls, value: float, sources: frozenset, attributes: frozenset = frozenset()):
        obj = super().__new__(cls, value)
        obj.sources, obj.attributes = sources, attributes
        return obj

    def __reduce__(self):
        return (float, (float(self),))

    __hash__ = float.__hash__


def _float_op(name: str):
    """``name`` on a ShapeInt or ShapeFloat giving a float: a ShapeFloat that remembers the counts it was
    computed from (an int op that declines a float operand is done in floats)."""
    def op(self, *others):
        result = getattr(type(self).__mro__[1], name)(self, *others)
        if result is NotImplemented and isinstance(self, int):
            result = getattr(float, name)(float(self), *others)
        if type(result) is int:
            return _combined(result, (self, *others))
        if type(result) is not float:
            return result
        operands = (self, *others)
        sources = frozenset().union(*(o.sources for o in operands if isinstance(o, (ShapeInt, ShapeFloat))))
        return ShapeFloat(result, sources, frozenset().union(*(attributes_of(o) for o in operands)))

    op.__name__ = name
    return op


class AttributeInt(int):
    """An int module attribute (every one is, while a model is traced), so that a size such as
    ``reshape(B, L, 3, self.n_heads, -1)`` is known to be that attribute whatever its name.
    A field of a module's ``config`` is one too, named ``config.<field>`` on the first module
    holding that config object (modules that share one config share its fields)."""

    def __new__(cls, value: int, module_path: str, attribute: str, divisor: int = 1):
        obj = super().__new__(cls, value)
        obj.module_path, obj.attribute, obj.divisor = module_path, attribute, divisor  # value == attribute // divisor
        return obj

    def __reduce__(self):
        return (int, (int(self),))

    def __floordiv__(self, other):
        """``self.channels // 2`` stays an attribute (a split of it follows pruning); other arithmetic does not."""
        if type(other) is int and other > 0 and int(self) % other == 0:
            return AttributeInt(int(self) // other, self.module_path, self.attribute, self.divisor * other)
        return _combined(int.__floordiv__(self, other), (self, other))


class AttributeTerms(int):
    """An int computed from :class:`AttributeInt` (and plain ints) by ``+``, ``-`` and ``*``, remembering
    how: ``terms`` maps each product of attributes (a sorted tuple of ``(module path, attribute,
    divisor)`` keys; ``()`` for the constant) to its coefficient, ``values`` each key's value. Phi-3's
    ``qkv[..., :self.config.num_attention_heads * self.head_dim]`` so slices where the heads end."""

    def __new__(cls, value: int, terms: dict, values: dict):
        obj = super().__new__(cls, value)
        obj.terms, obj.values = terms, values
        return obj

    def __reduce__(self):
        return (int, (int(self),))

    __hash__ = int.__hash__


class DerivedInt(int):
    """An int computed from module attributes by arithmetic that :class:`AttributeTerms` does not follow
    (``self.num_heads // self.num_kv``, ``%``): after pruning it may be another value, which no rule can
    compute. ``attributes`` holds the ``(module path, attribute)`` it was computed from."""

    def __new__(cls, value: int, attributes: frozenset):
        obj = super().__new__(cls, value)
        obj.attributes = attributes
        return obj

    def __reduce__(self):
        return (int, (int(self),))

    __hash__ = int.__hash__


def attributes_of(value: Any) -> frozenset:
    """The ``(module path, attribute)`` an attribute-derived int (or a ShapeFloat) was computed from."""
    if isinstance(value, AttributeInt):
        return frozenset({(value.module_path, value.attribute)})
    if isinstance(value, AttributeTerms):
        return frozenset(key[:2] for key in value.values)
    if isinstance(value, (DerivedInt, ShapeInt, ShapeFloat)):
        return value.attributes
    return frozenset()


def terms_of(value: Any) -> tuple[dict, dict] | None:
    """``(terms, values)`` of an attribute-derived int (a plain int is a constant term); None otherwise."""
    if isinstance(value, AttributeTerms):
        return value.terms, value.values
    if isinstance(value, AttributeInt):
        key = (value.module_path, value.attribute, value.divisor)
        return {(key,): 1}, {key: int(value)}
    if isinstance(value, int) and not isinstance(value, (ShapeInt, DerivedInt)):
        return ({(): int(value)} if value else {}), {}
    return None


def _terms_result(result: int, terms: dict, values: dict) -> Any:
    terms = {key: coefficient for key, coefficient in terms.items() if coefficient}
    return result if set(terms) <= {()} else AttributeTerms(result, terms, values)


def _terms_op(name: str):
    """``+``, ``-``, ``*`` of attribute-derived ints keep their terms (with a ShapeInt: a ShapeInt)."""
    int_op = getattr(int, name)

    def op(self, other):
        result = int_op(self, other)
        if type(result) is not int or isinstance(other, ShapeInt):
            return _combined(result, (self, other))
        mine, theirs = terms_of(self), terms_of(other)
        if theirs is None:
            return _combined(result, (self, other))
        left, right = (theirs, mine) if name.startswith("__r") else (mine, theirs)
        terms: dict = {}
        if name in ("__mul__", "__rmul__"):
            for a, ca in left[0].items():
                for b, cb in right[0].items():
                    key = tuple(sorted(a + b))
                    terms[key] = terms.get(key, 0) + ca * cb
        else:
            terms = dict(left[0])
            for key, coefficient in right[0].items():
                terms[key] = terms.get(key, 0) + (-coefficient if "sub" in name else coefficient)
        return _terms_result(result, terms, {**mine[1], **theirs[1]})

    op.__name__ = name
    return op


def _negated(self):
    terms, values = terms_of(self)
    return _terms_result(-int(self), {key: -coefficient for key, coefficient in terms.items()}, values)


def _combined(result: Any, operands: tuple) -> Any:
    """``result`` of int arithmetic on ``operands``: a ShapeInt (remembering what it was computed
    from) when any operand was one, a DerivedInt when any was computed from attributes, else a plain int."""
    if type(result) is not int:
        return result
    attributes = frozenset().union(*(attributes_of(o) for o in operands))
    if not any(isinstance(o, ShapeInt) for o in operands):
        return DerivedInt(result, attributes) if attributes else result
    sources = frozenset().union(*(o.sources for o in operands if isinstance(o, ShapeInt)))
    return ShapeInt(result, None, sources, attributes)


def _int_op(name: str):
    int_op = getattr(int, name)

    def op(self, *others):
        return _combined(int_op(self, *others), (self,) + others)

    op.__name__ = name
    return op


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
              "__floordiv__", "__rfloordiv__", "__mod__", "__neg__", "__pos__", "__abs__"):
    setattr(ShapeInt, _name, _int_op(_name))
    if _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__"):
        setattr(AttributeInt, _name, _terms_op(_name))
        setattr(AttributeTerms, _name, _terms_op(_name))
    elif _name == "__neg__":
        setattr(AttributeInt, _name, _negated)
        setattr(AttributeTerms, _name, _negated)
    elif _name != "__floordiv__":
        setattr(AttributeInt, _name, _int_op(_name))
    if _name not in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__neg__"):
        setattr(AttributeTerms, _name, _int_op(_name))
    setattr(DerivedInt, _name, _int_op(_name))


for _name in ("__truediv__", "__rtruediv__", "__pow__", "__rpow__"):   # a count used as a number
    for _kind in (ShapeInt, AttributeInt, AttributeTerms, DerivedInt):
        setattr(_kind, _name, _float_op(_name))
for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__"):
    setattr(ShapeFloat, _name, _float_op(_name))


def _comparison(name: str, symbol: str):
    compare = getattr(operator, name)

    def op(self, other):
        result = compare(int(self), int(other) if isinstance(other, int) else other)
        if _LISTENERS and isinstance(other, (int, float)) and not isinstance(other, bool):
            _LISTENERS[-1](symbol, self, other)
        return result

    op.__name__ = f"__{name}__"
    return op


for _name, _symbol in (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!=")):
    setattr(ShapeInt, f"__{_name}__", _comparison(_name, _symbol))


def _as_float(self: ShapeInt) -> float:
    """``float(size)``, ``math.sqrt(size)``: a channel count becomes a plain number no operator follows;
    reported to the listening recorder as the use ``"float"`` (propagation marks those channels inexact)."""
    if _LISTENERS:
        _LISTENERS[-1]("float", self, None)
    return float(int(self))


ShapeInt.__float__ = _as_float


@contextlib.contextmanager
def comparisons_to(listener: Callable[[str, ShapeInt, Any], None]) -> Iterator[None]:
    """Report every comparison of a :class:`ShapeInt` with a number to ``listener(symbol, size, other)``
    for the duration (the recorder turns it off around the torch calls it runs)."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def _config_fields(model: nn.Module) -> list[tuple[Any, str, int, AttributeInt]]:
    """(config, field, value, marked) for every int field of every module's ``config`` object (a
    Hugging Face config, any plain object), each object once, named after the first module holding it."""
    fields, seen = [], set()
    for path, module in model.named_modules():
        config = vars(module).get("config")
        if config is None or id(config) in seen or isinstance(config, (nn.Module, type)) \
                or not isinstance(getattr(config, "__dict__", None), dict):
            continue
        seen.add(id(config))
        fields += [(config, name, value, AttributeInt(value, path, f"config.{name}"))
                   for name, value in list(vars(config).items()) if type(value) is int]
    return fields


@contextlib.contextmanager
def attribute_ints(model: nn.Module) -> Iterator[None]:
    """Replace every plain int attribute of every module, and every int field of a module's ``config``,
    by an :class:`AttributeInt` for the duration; an attribute that forward reassigned keeps its new value."""
    replaced = [(module, name, value, AttributeInt(value, path, name)) for path, module in model.named_modules()
                for name, value in list(vars(module).items()) if type(value) is int]
    replaced += _config_fields(model)
    for owner, name, _, marked in replaced:
        vars(owner)[name] = marked
    try:
        yield
    finally:
        for owner, name, value, marked in replaced:
            if vars(owner).get(name) is marked:
                vars(owner)[name] = value
