"""Channel rules for attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``."""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import nn

from ..channels import TensorLayout, dim_atoms
from .registry import RuleContext, channel_rule, module_rule


@channel_rule("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: RuleContext) -> TensorLayout:
    """q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> (..., Hq, L, Ev).

    Heads are batch dims: q, k and v heads are tied (with grouped-query attention, k/v
    head j to q heads j*n..j*n+n-1). E is contracted between q and k, S between k and v.
    """
    query, key, value = ctx.argument(0, "query"), ctx.argument(1, "key"), ctx.argument(2, "value")
    mask, scale = ctx.argument(3, "attn_mask"), ctx.argument(6, "scale")
    q_shape, k_shape = ctx.shape(query), ctx.shape(key)
    contracted = ctx.tie([ctx.atoms_of(query, -1), ctx.atoms_of(key, -1)], "attention over a head dim "
                         "without channel identity")
    if contracted is not None and scale is None:
        ctx.mark_inexact(contracted, "the default attention scale depends on the head dim")
    ctx.tie([ctx.atoms_of(key, -2), ctx.atoms_of(value, -2)], "keys and values disagree on positions")
    batch = []
    for d in range(len(q_shape) - 2):
        query_atoms, key_atoms, value_atoms = (ctx.atoms_of(t, d) for t in (query, key, value))
        key_atoms = ctx.tie([key_atoms, value_atoms], "keys and values disagree on heads")
        if q_shape[d] != k_shape[d] and k_shape[d] != 1 and q_shape[d] % k_shape[d] == 0:
            key_atoms = None if key_atoms is None else np.repeat(key_atoms, q_shape[d] // k_shape[d])
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
