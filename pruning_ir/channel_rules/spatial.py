"""Channel rules for per-channel spatial ops: pooling, resizing, padding, pixel and channel shuffles."""

from __future__ import annotations

import re

import numpy as np

from ..channels import TensorLayout
from .registry import RuleContext, channel_rule

PER_CHANNEL_SPATIAL = (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "fractional_max_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "grid_sample", "pad",
)


def _mixed_dims(op: str, ndim: int) -> int:
    """How many trailing dims an op pools or resamples over (positions mix there): ``k`` for a ``*_pool{k}d``,
    every dim after batch and channels for interpolate and grid_sample, none for pad."""
    if op == "pad":
        return 0
    match = re.search(r"([123])d", op)
    return int(match.group(1)) if match else max(ndim - 2, 0)


@channel_rule(*PER_CHANNEL_SPATIAL)
def per_channel_spatial(ctx: RuleContext):
    """Each channel is processed on its own; dims that keep their size keep their channels,
    and a channel dimension that changes size (padding it, say) is pinned."""
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    if layout is None:
        return None
    in_shape = ctx.shape(source)
    out_shape = ctx.out_shape if ctx.node.meta.get("shape") is not None else \
        next(iter(ctx.node.users)).meta["shape"]
    mixed = _mixed_dims(ctx.op, layout.ndim)
    dims = []
    for d, atoms in enumerate(layout.dims):
        if atoms is not None and d >= layout.ndim - mixed:
            ctx.pin(atoms, "pooled or resampled along this dimension: neighbouring positions mix")
            atoms = None
        elif atoms is not None and in_shape[d] != out_shape[d]:
            ctx.pin(atoms, "this dimension changes size")
            atoms = None
        dims.append(atoms)
    value = ctx.argument(3, "value", 0) if ctx.op == "pad" else 0
    result = TensorLayout(tuple(dims), layout.dead_is_zero and not value)
    return result if ctx.node.meta.get("shape") is not None else (result, TensorLayout.empty(len(dims)))


@channel_rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(ctx: RuleContext) -> TensorLayout | None:
    """(C*r*r, H, W) <-> (C, H*r, W*r): the r*r channels that become one channel's pixels go together."""
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None:
        return None
    d = layout.ndim - 3
    dims = list(layout.dims)
    factor = ctx.argument(1, "upscale_factor", ctx.argument(1, "downscale_factor")) ** 2
    if dims[d] is not None and ctx.op == "pixel_shuffle":
        blocks = dims[d].reshape(-1, factor)
        ctx.union(blocks[:, 1:].ravel(), blocks[:, :-1].ravel())
        dims[d] = blocks[:, 0].copy()
    elif dims[d] is not None:
        dims[d] = np.repeat(dims[d], factor)
    return layout.with_dims(dims)


@channel_rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(ctx: RuleContext) -> TensorLayout | None:
    """Output channel j*g+i is input channel i*(C/g)+j: the same j leaves every group together."""
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None or layout.dims[1] is None:
        return layout
    by_group = layout.dims[1].reshape(ctx.argument(1, "groups"), -1)
    ctx.union(by_group[1:].ravel(), by_group[:-1].ravel())
    dims = list(layout.dims)
    dims[1] = by_group.T.ravel().copy()
    return layout.with_dims(dims)
