"""Channel rules for layers with parameters: conv, linear, matmul, norms, embedding, PReLU."""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import nn

from ..channels import TensorLayout, dim_atoms, pinned
from .registry import RuleContext, channel_rule


GROUPED_MM_MULTIPLE = 8   # channels: torch._grouped_mm's 16-byte strides in float16/bfloat16 (4 in float32)


def consume(ctx: RuleContext, layout: TensorLayout | None, dim: int, size: int,
            parameter_atoms: np.ndarray | None) -> np.ndarray | None:
    """Tie the channels an op contracts over (input ``dim``) to the parameter slice reading them."""
    atoms = None if layout is None else layout.dims[dim]
    if parameter_atoms is not None:
        ctx.union(parameter_atoms, atoms if atoms is not None else pinned(size))
    if atoms is not None and not layout.dead_is_zero:
        ctx.mark_inexact(atoms, "a removed channel would carry a nonzero value into this op")
    return atoms


def bind_sizes(ctx: RuleContext, parameter, **sizes: np.ndarray | None) -> None:
    """Bind ``module.<attribute>`` to kept-channel counts when the op runs in the module owning ``parameter``."""
    owner = ctx.owner_module(parameter)
    if owner is None:
        return
    path, module = owner
    for attribute, atoms in sizes.items():
        if atoms is not None and hasattr(module, attribute):
            ctx.bind_attribute(path, attribute, atoms)


def _conv_arguments(ctx: RuleContext) -> tuple:
    """input, weight, bias, groups, input layout and channel dim of a (transposed) convolution
    (both put ``groups`` at position 6; an unbatched input has its channels at dim 0)."""
    source, weight, bias = ctx.argument(0, "input"), ctx.argument(1, "weight"), ctx.argument(2, "bias")
    channel_dim = 1 if len(ctx.shape(source)) == len(ctx.shape(weight)) else 0
    return source, weight, bias, ctx.argument(6, "groups", 1), ctx.layout(source), channel_dim


def keep_kernel_size(ctx: RuleContext, weight) -> None:
    """A kernel's spatial dims are its size, never channels (a weight computed in forward may give them atoms)."""
    for dim in range(2, len(ctx.shape(weight))):
        ctx.pin(ctx.atoms_of(weight, dim), "a kernel's spatial size is kept")


@channel_rule("conv1d", "conv2d", "conv3d")
def convolution(ctx: RuleContext) -> TensorLayout:
    source, weight, bias, groups, layout, channel_dim = _conv_arguments(ctx)
    keep_kernel_size(ctx, weight)
    out_channels, in_per_group = ctx.shape(weight)[:2]
    in_channels = ctx.shape(source)[channel_dim]
    out_atoms = ctx.atoms_of(weight, 0)  # None: a single output channel, or a weight without identity
    out_positions = out_atoms if out_atoms is not None else pinned(out_channels)
    out_dims = [None] * len(ctx.out_shape)
    if isinstance(bias, fx.Node):
        ctx.union(out_atoms, ctx.atoms_of(bias, 0))
    kernel_in = ctx.atoms_of(weight, 1)
    if kernel_in is None:   # a weight computed without channel identity (einsum over experts): its size stays
        kernel_in = pinned(in_per_group)
    if groups == 1:
        in_atoms = consume(ctx, layout, channel_dim, in_channels, kernel_in)
        bind_sizes(ctx, weight, in_channels=kernel_in if in_atoms is not None else None, out_channels=out_atoms)
    elif in_per_group == 1:
        # Depthwise family: input channel g feeds outputs g*m..g*m+m-1; whole groups go together.
        per_group = out_channels // groups
        in_atoms = consume(ctx, layout, channel_dim, in_channels, None)
        ctx.pin(kernel_in, "a depthwise kernel has one input channel per group")
        ctx.union(np.repeat(dim_atoms(layout, channel_dim, in_channels), per_group), out_positions)
        owner = ctx.owner_module(weight)
        if owner is None:
            ctx.pin(out_atoms, "groups is a literal argument of a functional grouped convolution")
        else:
            ctx.bind_attribute(owner[0], "groups", out_atoms, divisor=per_group)
            bind_sizes(ctx, weight, in_channels=dim_atoms(layout, channel_dim, in_channels),
                       out_channels=out_atoms)
    else:
        # Grouped: keep the number of groups; remove the same channel index from every group.
        consume(ctx, layout, channel_dim, in_channels, np.tile(kernel_in, groups))
        by_group = out_positions.reshape(groups, -1)
        ctx.union(by_group[1:].ravel(), by_group[:-1].ravel())
        bind_sizes(ctx, weight, in_channels=np.tile(kernel_in, groups), out_channels=out_atoms)
    out_dims[channel_dim] = out_atoms
    return TensorLayout(tuple(out_dims))


@channel_rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def transposed_convolution(ctx: RuleContext) -> TensorLayout:
    source, weight, bias, groups, layout, channel_dim = _conv_arguments(ctx)
    keep_kernel_size(ctx, weight)
    out_dims = [None] * len(ctx.out_shape)
    if groups != 1:
        ctx.pin_layout(layout, "grouped transposed convolutions are not pruned")
        ctx.pin(ctx.atoms_of(weight, 1), "grouped transposed convolutions are not pruned")
        return TensorLayout(tuple(out_dims))
    kernel_in = ctx.atoms_of(weight, 0)
    in_atoms = consume(ctx, layout, channel_dim, ctx.shape(source)[channel_dim], kernel_in)
    out_atoms = ctx.atoms_of(weight, 1)
    if isinstance(bias, fx.Node):
        ctx.union(out_atoms, ctx.atoms_of(bias, 0))
    bind_sizes(ctx, weight, in_channels=kernel_in if in_atoms is not None else None, out_channels=out_atoms)
    out_dims[channel_dim] = out_atoms
    return TensorLayout(tuple(out_dims))


@channel_rule("linear")
def linear(ctx: RuleContext) -> TensorLayout:
    source, weight, bias = ctx.argument(0, "input"), ctx.argument(1, "weight"), ctx.argument(2, "bias")
    layout = ctx.layout(source)
    shape = ctx.shape(source)
    kernel_in = ctx.atoms_of(weight, 1)
    in_atoms = consume(ctx, layout, len(shape) - 1, shape[-1],
                       kernel_in if kernel_in is not None else pinned(shape[-1]))
    out_atoms = ctx.atoms_of(weight, 0)
    if out_atoms is not None and isinstance(bias, fx.Node):
        ctx.union(out_atoms, ctx.atoms_of(bias, 0))
    bind_sizes(ctx, weight, in_features=ctx.atoms_of(weight, 1) if in_atoms is not None else None,
               out_features=out_atoms)
    dims = list(layout.dims[:-1]) if layout is not None else [None] * (len(shape) - 1)
    return TensorLayout(tuple(dims + [out_atoms]))


def matmul_dims(ctx: RuleContext, left, right) -> list:
    """Output dims of ``left @ right`` (torch.matmul semantics), tying batch and contracted dims."""
    left_shape, right_shape = ctx.shape(left), ctx.shape(right)
    left_contracted = len(left_shape) - 1
    right_contracted = 0 if len(right_shape) == 1 else len(right_shape) - 2
    contracted = consume(ctx, ctx.layout(left), left_contracted, left_shape[-1],
                         ctx.atoms_of(right, right_contracted))
    if contracted is not None and ctx.atoms_of(right, right_contracted) is not None \
            and min(len(left_shape), len(right_shape)) >= 3:
        ctx.mark_inexact(contracted, "a batched product of two tensors over channels (attention scores over "
                                     "positions within a head): a scale computed from their count does not follow")
    out_shape = ctx.out_shape
    rows = ctx.atoms_of(left, -2) if len(left_shape) >= 2 else None
    columns = ctx.atoms_of(right, -1) if len(right_shape) >= 2 else None
    batch_ndim = len(out_shape) - (len(left_shape) >= 2) - (len(right_shape) >= 2)
    dims = []
    for d in range(batch_ndim):
        spanning = []
        for value, shape in ((left, left_shape[:-2]), (right, right_shape[:-2])):
            local = d - (batch_ndim - len(shape))
            if local >= 0 and shape[local] == out_shape[d] and out_shape[d] != 1:
                spanning.append(ctx.atoms_of(value, local))
        dims.append(ctx.tie(spanning, "batched matmul against a tensor without channel identity here"))
    if len(left_shape) >= 2:
        dims.append(rows)
    if len(right_shape) >= 2:
        dims.append(columns)
    return dims


def _transposed_weight(ctx: RuleContext, value) -> fx.Node | None:
    """The 2-D parameter behind ``value`` when it is that parameter transposed (``self.weight.T``,
    ``.t()``, ``.transpose(0, 1)``), else None."""
    if not isinstance(value, fx.Node) or not value.args:
        return None
    source = value.args[0]
    transposed = (value.target is getattr and value.args[1:] in (("T",), ("mT",))) or value.target == "t" or (
        value.target == "transpose" and set(value.args[1:]) in ({0, 1}, {-1, -2}, {0, -1}, {1, -2}))
    if transposed and ctx.parameter_name(source) is not None and len(ctx.shape(source)) == 2:
        return source
    return None


@channel_rule("matmul", "mm", "bmm")
def matmul(ctx: RuleContext) -> TensorLayout:
    """``left @ right``. A Linear subclass computing ``input @ self.weight.T`` (Falcon's FalconLinear)
    keeps its ``in_features`` / ``out_features`` in step, as ``linear`` does."""
    left, right = ctx.argument(0, "input"), ctx.argument(1, "other", ctx.argument(1, "mat2"))
    dims = matmul_dims(ctx, left, right)
    weight = _transposed_weight(ctx, right)
    if weight is not None:
        reads = ctx.atoms_of(left, -1) is not None
        bind_sizes(ctx, weight, in_features=ctx.atoms_of(weight, 1) if reads else None,
                   out_features=ctx.atoms_of(weight, 0))
    return TensorLayout(tuple(dims), dead_is_zero=True)


@channel_rule("rmatmul")
def reflected_matmul(ctx: RuleContext) -> TensorLayout:
    return TensorLayout(tuple(matmul_dims(ctx, ctx.argument(1), ctx.argument(0))))


@channel_rule("_grouped_mm")
def grouped_matmul(ctx: RuleContext) -> TensorLayout:
    """``torch._grouped_mm(a (T, K), b (G, K, N), offs=...)``: a mixture of experts' fused matmul, the
    rows of ``a`` grouped by expert (Mixtral). K is contracted and N is the output's; the G experts
    are kept, so a channel is the same position in every expert (one intermediate size for all)."""
    left, right, bias = ctx.argument(0, "mat_a"), ctx.argument(1, "mat_b"), ctx.argument(3, "bias")
    left_shape, right_shape = ctx.shape(left), ctx.shape(right)
    if len(left_shape) != 2 or len(right_shape) != 3:
        for value in (left, right, bias):
            ctx.pin_layout(ctx.layout(value), "a grouped matmul of these ranks is not pruned")
        return TensorLayout.empty(len(ctx.out_shape))
    ctx.pin(ctx.atoms_of(right, 0), "the experts of a grouped matmul are kept")
    consume(ctx, ctx.layout(left), 1, left_shape[1], ctx.atoms_of(right, 1))
    out_atoms = ctx.atoms_of(right, 2)
    for atoms in (ctx.atoms_of(right, 1), out_atoms):   # 16-byte strides, also once cast to half precision
        ctx.require_multiple(atoms, GROUPED_MM_MULTIPLE, "a grouped matmul needs 16-byte aligned rows")
    if isinstance(bias, fx.Node):
        ctx.union(out_atoms if out_atoms is not None else pinned(right_shape[2]), ctx.atoms_of(bias, -1))
    return TensorLayout((ctx.atoms_of(left, 0), out_atoms), dead_is_zero=True)


@channel_rule("addmm", "baddbmm", "addbmm")
def add_matmul(ctx: RuleContext) -> TensorLayout:
    bias = ctx.argument(0, "input")   # addmm names its factors mat1/mat2, baddbmm/addbmm batch1/batch2
    left = ctx.argument(1, "mat1", ctx.argument(1, "batch1"))
    right = ctx.argument(2, "mat2", ctx.argument(2, "batch2"))
    dims = matmul_dims(ctx, left, right)
    bias_shape = ctx.shape(bias)
    for local in range(len(bias_shape)):
        d = len(dims) - len(bias_shape) + local
        if bias_shape[local] == ctx.out_shape[d] and bias_shape[local] != 1:
            ctx.union(dims[d] if dims[d] is not None else pinned(bias_shape[local]),
                      ctx.atoms_of(bias, local))
    return TensorLayout(tuple(dims))


def normalization(ctx: RuleContext, parameters: tuple, dead_is_zero: bool) -> TensorLayout | None:
    """Per-channel normalization along dim 1: every parameter/statistic is indexed by channel."""
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    if layout is None or layout.ndim < 2:
        return layout
    atoms = dim_atoms(layout, 1, ctx.shape(source)[1])
    anchor = None
    for value in parameters:
        if isinstance(value, fx.Node):
            ctx.union(atoms, ctx.atoms_of(value, 0))
            anchor = anchor or value
    if anchor is not None:
        bind_sizes(ctx, anchor, num_features=atoms)
    else:   # no parameter or statistic (InstanceNorm2d's default): the norm module running this op
        owner = next(((path, m) for path, m in ctx.enclosing_modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase)), None)
        if owner is not None and owner[0] == ctx.module_path:
            ctx.bind_attribute(owner[0], "num_features", atoms)
    return TensorLayout(layout.dims, dead_is_zero)


@channel_rule("batch_norm")
def batch_norm(ctx: RuleContext) -> TensorLayout | None:
    mean, var, weight, bias = (ctx.argument(i, n) for i, n in
                               ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
    return normalization(ctx, (weight, bias, mean, var), dead_is_zero=isinstance(weight, fx.Node))


@channel_rule("instance_norm")
def instance_norm(ctx: RuleContext) -> TensorLayout | None:
    mean, var, weight, bias = (ctx.argument(i, n) for i, n in
                               ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
    return normalization(ctx, (weight, bias, mean, var), dead_is_zero=True)


@channel_rule("group_norm")
def group_norm(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.argument(0, "input"))
    groups, weight, bias = ctx.argument(1, "num_groups"), ctx.argument(2, "weight"), ctx.argument(3, "bias")
    if layout is None or layout.dims[1] is None:
        return layout
    atoms = layout.dims[1]
    by_group = atoms.reshape(groups, -1)
    # Statistics are per group: only whole groups can be removed exactly.
    ctx.union(by_group[:, 1:].ravel(), by_group[:, :-1].ravel())
    for value in (weight, bias):
        if isinstance(value, fx.Node):
            ctx.union(atoms, ctx.atoms_of(value, 0))
    owner = ctx.owner_module(weight) if isinstance(weight, fx.Node) else \
        next(((path, m) for path, m in ctx.enclosing_modules() if path == ctx.module_path), None)   # affine=False
    if owner is None or not isinstance(owner[1], nn.GroupNorm):   # a functional group_norm: its own count
        ctx.pin(atoms, "num_groups is an argument of a functional group_norm")
    else:
        ctx.bind_attribute(owner[0], "num_groups", atoms, divisor=by_group.shape[1])
        ctx.bind_attribute(owner[0], "num_channels", atoms)
    return layout


@channel_rule("layer_norm", "rms_norm")
def layer_norm(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.argument(0, "input"))
    normalized_shape = tuple(ctx.argument(1, "normalized_shape"))
    weight = ctx.argument(2, "weight")
    bias = ctx.argument(3, "bias") if ctx.op == "layer_norm" else None
    if layout is None:
        return None
    first = layout.ndim - len(normalized_shape)
    owner = ctx.owner_module(weight) if isinstance(weight, fx.Node) else None
    module_owner = next(((p, m) for p, m in ctx.enclosing_modules()
                         if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))), None)
    for index, size in enumerate(normalized_shape):
        atoms = layout.dims[first + index]
        if atoms is None:
            continue
        ctx.mark_inexact(atoms, "normalized over channels: removing one changes the statistics")
        for value in (weight, bias):
            if isinstance(value, fx.Node):
                ctx.union(atoms, ctx.atoms_of(value, index))
        if module_owner is not None and module_owner[0] == ctx.module_path:
            ctx.bind_attribute(module_owner[0], "normalized_shape", atoms, tuple_index=index)
        elif owner is None:
            ctx.size_follows(size, atoms, "normalized_shape")
    return TensorLayout(layout.dims, dead_is_zero=isinstance(weight, fx.Node))


@channel_rule("_weight_norm")
def weight_norm(ctx: RuleContext) -> TensorLayout | None:
    """``torch._weight_norm(v, g, dim)`` (``nn.utils.parametrizations.weight_norm``): the weight is v
    rescaled per slice of ``dim`` by g; the norm runs over the other dims, so removing one of their
    channels changes it."""
    v, g, dim = ctx.argument(0, "v"), ctx.argument(1, "g"), ctx.argument(2, "dim", 0)
    layout = ctx.layout(v)
    if layout is None:
        return None
    if dim is None or dim == -1 and layout.ndim > 1:   # one norm over the whole tensor
        for atoms in layout.dims:
            ctx.mark_inexact(atoms, "a weight norm over the whole weight")
        return TensorLayout(layout.dims, dead_is_zero=False)
    dim %= layout.ndim
    ctx.union(dim_atoms(layout, dim, ctx.shape(v)[dim]), ctx.atoms_of(g, dim))
    for other, atoms in enumerate(layout.dims):
        if other != dim:
            ctx.mark_inexact(atoms, "the weight norm of each slice runs over these channels")
    return TensorLayout(layout.dims, dead_is_zero=False)


@channel_rule("embedding")
def embedding(ctx: RuleContext) -> TensorLayout:
    indices, weight = ctx.argument(0, "input"), ctx.argument(1, "weight")
    columns = ctx.atoms_of(weight, 1)
    bind_sizes(ctx, weight, embedding_dim=columns)
    return TensorLayout((None,) * len(ctx.shape(indices)) + (columns,))


@channel_rule("embedding_bag")
def embedding_bag(ctx: RuleContext) -> TensorLayout:
    """``F.embedding_bag``: rows looked up and reduced per bag (sum, mean, max), each column on its own."""
    weight = ctx.argument(1, "weight")
    columns = ctx.atoms_of(weight, 1)
    bind_sizes(ctx, weight, embedding_dim=columns)
    return TensorLayout((None,) * (len(ctx.out_shape) - 1) + (columns,))


@channel_rule("prelu")
def prelu(ctx: RuleContext) -> TensorLayout | None:
    layout, weight = ctx.layout(ctx.argument(0, "input")), ctx.argument(1, "weight")
    if layout is None:
        return None
    if ctx.shape(weight)[0] > 1:
        channel_dim = 1 if layout.ndim > 1 else 0
        atoms = layout.dims[channel_dim]
        ctx.union(dim_atoms(layout, channel_dim, ctx.shape(weight)[0]), ctx.atoms_of(weight, 0))
        bind_sizes(ctx, weight, num_parameters=atoms)
    return layout
