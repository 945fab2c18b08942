"""Channel rules for attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

Grouped-query attention (``Hk`` key/value heads, each read by ``n = Hq / Hk`` query heads) has
two removable units, and one channel position belongs to one label, so a trace picks one
(``PruningIR(model, gqa_unit=...)``, read from the propagation state): ``"query_heads"``
(default) keeps the key/value heads and ties query head ``j`` of every group (a label removes
one query head from each group: the layout stays grouped, ``num_key_value_groups`` follows);
``"kv_groups"`` ties each key/value head to its query heads (a label removes a whole group).
With a single key/value head both units are the query heads one by one. The key/value repeat is
seen in SDPA's ``enable_gqa`` and in ``expand`` / ``repeat_interleave`` sized by a group-size
attribute.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import nn

from ..channels import TensorLayout, dim_atoms
from ..tracing import AttributeInt
from .registry import RuleContext, channel_rule, module_rule

__all__ = ["GQA_UNITS", "GROUP_SIZE_ATTRIBUTES"]

GQA_UNITS = ("kv_groups", "query_heads")
# Attributes holding the number of query heads per key/value head (HF: num_key_value_groups).
GROUP_SIZE_ATTRIBUTES = ("num_key_value_groups", "num_queries_per_kv", "n_rep", "num_kv_groups")
_KEPT_WHOLE = "key/value heads are kept whole: the unit is query heads within each key/value group (gqa_unit)"


def _bind_group_size(ctx: RuleContext, size: int, atoms: np.ndarray, attribute=None) -> None:
    """Keep the group-size attribute (``size`` query heads per key/value head) in step with ``atoms``."""
    if isinstance(attribute, AttributeInt):
        ctx.bind_attribute(attribute.module_path, attribute.attribute, np.tile(atoms, attribute.divisor))
        return
    for path in reversed(ctx.module_stack):
        names = [name for name, value in ctx.state.int_attributes(path, GROUP_SIZE_ATTRIBUTES).items()
                 if value == size]
        for name in names:
            ctx.bind_attribute(path, name, atoms)
        if names:
            return


def grouped_query_heads(ctx: RuleContext, query_atoms, kv_atoms, kv_heads: int, group_size: int):
    """Atoms of the query heads of grouped-query attention (query head h reads key/value head
    h // group_size), tied by the IR's ``gqa_unit``; a single key/value head leaves
    every query head its own label in both units."""
    if kv_heads == 1 or ctx.state.gqa_unit == "query_heads":
        ctx.pin(kv_atoms, _KEPT_WHOLE)
        within = ctx.fresh(group_size)
        _bind_group_size(ctx, group_size, within)
        return ctx.tie([query_atoms, np.tile(within, kv_heads)], "query heads without channel identity")
    repeated = None if kv_atoms is None else np.repeat(kv_atoms, group_size)
    return ctx.tie([query_atoms, repeated], "query and key heads do not match")


def repeated_key_value(ctx: RuleContext, dims: list, d: int, size) -> bool:
    """``expand`` of a size-1 dim ``d`` after the key/value heads to ``size`` (a group-size attribute):
    HF's ``repeat_kv``. With the ``query_heads`` unit (or a single key/value head) the heads are
    kept and dim ``d`` gets the within-group atoms, so the following reshape tiles them over the
    groups. Returns whether it applied (``dims`` are the output dims, updated)."""
    if not (isinstance(size, AttributeInt) and size.attribute in GROUP_SIZE_ATTRIBUTES and d >= 1 and size > 1):
        return False
    if dims[d - 1] is not None and ctx.state.gqa_unit != "query_heads" and ctx.out_shape[d - 1] != 1:
        return False
    ctx.pin(dims[d - 1], _KEPT_WHOLE)
    dims[d - 1] = None
    dims[d] = ctx.fresh(int(size))
    _bind_group_size(ctx, int(size), dims[d], size)
    return True


def grouped_repeat(ctx: RuleContext, dims: list, dim: int, kv_heads: int, repeats) -> bool:
    """``repeat_interleave(kv, self.num_key_value_groups, dim)``: like :func:`repeated_key_value`,
    the within-group atoms tiled over the key/value heads (``dims`` updated; whether it applied)."""
    if not (isinstance(repeats, AttributeInt) and repeats.attribute in GROUP_SIZE_ATTRIBUTES and repeats > 1):
        return False
    if dims[dim] is not None and ctx.state.gqa_unit != "query_heads" and kv_heads != 1:
        return False
    ctx.pin(dims[dim], _KEPT_WHOLE)
    within = ctx.fresh(int(repeats))
    _bind_group_size(ctx, int(repeats), within, repeats)
    dims[dim] = np.tile(within, kv_heads)
    return True


@channel_rule("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: RuleContext) -> TensorLayout:
    """q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> (..., Hq, L, Ev).

    Heads are batch dims: q, k and v heads are tied (grouped-query attention: see
    :func:`grouped_query_heads`). E is contracted between q and k, S between k and v.
    """
    query, key, value = ctx.argument(0, "query"), ctx.argument(1, "key"), ctx.argument(2, "value")
    mask = ctx.argument(3, "attn_mask")
    q_shape, k_shape = ctx.shape(query), ctx.shape(key)
    contracted = ctx.tie([ctx.atoms_of(query, -1), ctx.atoms_of(key, -1)], "attention over a head dim "
                         "without channel identity")
    if contracted is not None:
        ctx.mark_inexact(contracted, "attention over positions within a head: its scale (the default, or one "
                                     "computed from the head dim) does not follow their removal")
    ctx.tie([ctx.atoms_of(key, -2), ctx.atoms_of(value, -2)], "keys and values disagree on positions")
    batch = []
    for d in range(len(q_shape) - 2):
        query_atoms, key_atoms, value_atoms = (ctx.atoms_of(t, d) for t in (query, key, value))
        key_atoms = ctx.tie([key_atoms, value_atoms], "keys and values disagree on heads")
        if d == len(q_shape) - 3 and q_shape[d] != k_shape[d] and q_shape[d] % k_shape[d] == 0:
            batch.append(grouped_query_heads(ctx, query_atoms, key_atoms, k_shape[d], q_shape[d] // k_shape[d]))
            continue
        if k_shape[d] == 1 and q_shape[d] != 1:
            batch.append(query_atoms)
            continue
        batch.append(ctx.tie([query_atoms, key_atoms], "query and key heads do not match"))
    if isinstance(mask, fx.Node):
        mask_shape = ctx.shape(mask)
        for d in range(len(batch)):
            local = d - (len(q_shape) - len(mask_shape))
            if local >= 0 and mask_shape[local] == q_shape[d] != 1:
                batch[d] = ctx.tie([batch[d], ctx.atoms_of(mask, local)], "an attention mask per head")
    return TensorLayout(tuple(batch) + (ctx.atoms_of(query, -2), ctx.atoms_of(value, -1)))


@module_rule(nn.MultiheadAttention)
def multihead_attention(ctx: RuleContext):
    """Whole heads: head h owns embedding channels h*D..h*D+D-1 of the inputs, of every
    projection and of the output (the module requires its input and inner widths equal)."""
    module: nn.MultiheadAttention = ctx.module
    path = ctx.node.target
    inputs = [ctx.argument(i, name) for i, name in enumerate(("query", "key", "value"))]
    attn_mask = ctx.argument(5, "attn_mask")
    if not module._qkv_same_embed_dim or module.bias_k is not None:
        for value in inputs:
            ctx.pin_layout(ctx.layout(value), "nn.MultiheadAttention with kdim/vdim or bias_k is not pruned")
        return None
    heads = ctx.fresh(module.num_heads)
    channels = np.repeat(heads, module.head_dim)
    if isinstance(attn_mask, fx.Node) and len(ctx.shape(attn_mask)) == 3:
        ctx.pin(heads, "a 3-D attn_mask is laid out per head")
    for value in {v for v in inputs if isinstance(v, fx.Node)}:
        ctx.union(channels, dim_atoms(ctx.layout(value), -1, module.embed_dim))
    projections = {f"{path}.in_proj_weight": (np.tile(channels, 3), channels),
                   f"{path}.in_proj_bias": (np.tile(channels, 3),),
                   f"{path}.out_proj.weight": (channels, channels),
                   f"{path}.out_proj.bias": (channels,)}
    for name, per_dim in projections.items():
        for dim, atoms in enumerate(per_dim):
            parameter = ctx.parameter_atoms(name, dim)
            if parameter is not None:
                ctx.union(atoms, parameter)
    for attribute in ("embed_dim", "kdim", "vdim"):
        ctx.bind_attribute(path, attribute, channels)
    ctx.bind_attribute(path, "num_heads", heads)
    for attribute in ("in_features", "out_features"):
        ctx.bind_attribute(f"{path}.out_proj", attribute, channels)
    output_ndim = len(ctx.shape(inputs[0]))
    return (TensorLayout((None,) * (output_ndim - 1) + (channels,)), None)
