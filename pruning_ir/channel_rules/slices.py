"""Slices whose bounds follow pruning: ``qkv[..., :self.config.num_attention_heads * self.head_dim]``.

A fused projection's output cut at positions computed from attributes (Phi-3's query, key and value
parts, :class:`AttributeTerms`) keeps its channels. Every such slice of one tensor along one dim is
read together: their bounds cut the dim into segments, each the difference of two neighbouring
bounds. A segment that is one product of attributes (``num_key_value_heads * head_dim``) follows
pruning when one factor counts (a head count, or the only factor) and the others stay: its positions
are removed in units of the other factors' product (a head), and the counting factor is bound to
them, so prune() moves every bound with its part. The segment up to the end of the dim follows by
itself; any other segment (a sum of products, a constant) is pinned.
"""

from __future__ import annotations

import operator

import numpy as np
import torch.fx as fx

from ..recorded_ints import AttributeInt, AttributeTerms, terms_of
from .registry import RuleContext, counting_factor, op_name

__all__ = ["bounds_follow", "source_items", "sliced_atoms"]

_END = "end"  # the bound of a slice without a stop


def bounds_follow(item: slice) -> bool:
    """Whether a slice's bounds are computed from attributes (or absent), so they may follow pruning
    (a negative bound counts from the end: it does not)."""
    bounds = [b for b in (item.start, item.stop) if b is not None]
    tracked = [b for b in bounds if isinstance(b, (AttributeInt, AttributeTerms))]
    return item.step in (None, 1) and bool(tracked) and all(b >= 0 for b in bounds) and all(
        isinstance(b, (AttributeInt, AttributeTerms)) or (b is item.start and b == 0) for b in bounds)


def source_items(index: tuple, ndim: int) -> list:
    """The index item applied to each dim of the indexed tensor (``None`` insertions dropped)."""
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    items: list = []
    for item in index:
        if item is Ellipsis:
            items.extend([slice(None)] * (ndim - consumed))
        elif item is not None:
            items.append(item)
    return items + [slice(None)] * (ndim - len(items))


def _slices_of(source: fx.Node, dim: int, ndim: int) -> list[tuple[fx.Node, slice]]:
    """Every user of ``source`` that slices ``dim`` with bounds computed from attributes, in graph order."""
    found = []
    for user in source.users:
        if user.target is operator.getitem or op_name(user) != "getitem" or user.args[0] is not source:
            continue
        index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
        item = source_items(index, ndim)[dim] if len(source_items(index, ndim)) == ndim else None
        if isinstance(item, slice) and bounds_follow(item):
            found.append((user, item))
    return found


def _bound(value, size: int, is_stop: bool) -> tuple[int, dict | str]:
    """(position, terms) of a slice bound; a missing stop is the end of the dim."""
    if value is None:
        return (size, _END) if is_stop else (0, {})
    return int(value), terms_of(value)[0]


def _bind_segments(ctx: RuleContext, atoms: np.ndarray, bounds: list[tuple[int, dict | str]], values: dict) -> None:
    """Bind (or pin) every segment between consecutive ``bounds`` but the one up to the end."""
    for (start, low), (stop, high) in zip(bounds[:-1], bounds[1:]):
        segment = atoms[start:stop]
        if high == _END or not len(segment):
            continue
        difference = dict(high)
        for key, coefficient in low.items():
            difference[key] = difference.get(key, 0) - coefficient
        difference = {key: c for key, c in difference.items() if c}
        counting = counting_factor(difference, values)
        if counting is None or len(segment) % counting[1]:
            ctx.pin(segment, f"the slice bound {stop} is not one attribute times a fixed size "
                             f"(a sum of products, or a constant): the positions up to it cannot move")
            continue
        ctx.bind_product(counting, segment)
        field = _config_field(ctx, *counting[0][:2])
        if field is not None:
            ctx.bind_product(((*field, counting[0][2]), counting[1]), segment)


def _config_field(ctx: RuleContext, path: str, attribute: str) -> tuple[str, str] | None:
    """The field of the module's config that a module attribute was built from (same name, same value:
    Phi-3's ``num_key_value_heads``), named as the recorder names config fields; None when there is none.
    Bound with the attribute, a config that must change (a field forward reads) stays one that builds the
    model, whatever else it cannot describe."""
    module = ctx.state.modules.get(path)
    config = None if module is None or "." in attribute else vars(module).get("config")
    fields = getattr(config, "__dict__", None)
    if not isinstance(fields, dict) or type(fields.get(attribute)) is not int \
            or fields[attribute] != vars(module).get(attribute):
        return None
    holder = next(p for p, m in ctx.state.modules.items() if vars(m).get("config") is config)
    return holder, f"config.{attribute}"


def sliced_atoms(ctx: RuleContext, source: fx.Node, dim: int, atoms: np.ndarray, item: slice) -> np.ndarray:
    """The atoms ``item`` keeps of ``dim`` of ``source``; the first of the slices of that dim binds the
    segments their bounds make (:mod:`slices`), so each slice takes its part after pruning too."""
    size = len(atoms)
    slices = _slices_of(source, dim, len(ctx.shape(source)))
    if slices and slices[0][0] is ctx.node:
        bounds: dict[int, dict | str] = {0: {}}
        values: dict = {}
        consistent = True
        for _, other in slices:
            for value, is_stop in ((other.start, False), (other.stop, True)):
                position, terms = _bound(value, size, is_stop)
                if isinstance(value, (AttributeInt, AttributeTerms)):
                    values.update(terms_of(value)[1])
                consistent &= position <= size and bounds.setdefault(position, terms) == terms
        if consistent:
            bounds.setdefault(size, _END)
            _bind_segments(ctx, atoms, sorted(bounds.items()), values)
        else:
            ctx.pin(atoms, "sliced at positions beyond the dim, or at one position two attribute sums give")
    return atoms[_bound(item.start, size, False)[0]:_bound(item.stop, size, True)[0]]
