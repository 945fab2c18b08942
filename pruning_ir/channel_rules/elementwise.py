"""Channel rules for element-wise ops, broadcasting, reductions and softmax-like ops."""

from __future__ import annotations

import numbers

import torch.fx as fx

from ..channels import TensorLayout
from .registry import RuleContext, channel_rule

# f(0) == 0: a dead (all-zero) channel stays dead through these.
ZERO_PRESERVING_UNARY = (
    "relu", "relu6", "leaky_relu", "gelu", "silu", "hardswish", "elu", "selu", "celu", "tanh",
    "hardtanh", "mish", "softsign", "tanhshrink", "softshrink", "hardshrink", "neg", "negative",
    "abs", "sin", "sinh", "tan", "atan", "asin", "erf", "expm1", "log1p", "sqrt", "square", "sign",
    "floor", "ceil", "round", "trunc", "frac", "nan_to_num", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone", "detach", "float",
    "half", "double", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "requires_grad",
    "normalize", "identity", "rrelu", "positive",
)
# f(0) != 0: a removed channel would have carried a constant into its consumers.
NONZERO_UNARY = (
    "sigmoid", "hardsigmoid", "exp", "exp2", "cos", "cosh", "softplus", "logsigmoid", "erfc",
    "log", "log2", "log10", "reciprocal", "rsqrt", "acos", "logit",
)
EXACT_REDUCTIONS = ("sum", "nansum")
INEXACT_REDUCTIONS = ("mean", "nanmean", "amax", "amin", "prod", "var", "std", "norm", "logsumexp",
                      "all", "any", "count_nonzero", "var_mean", "std_mean", "argmax", "argmin")


@channel_rule(*ZERO_PRESERVING_UNARY)
def zero_preserving_unary(ctx: RuleContext) -> TensorLayout | None:
    return ctx.layout(ctx.argument(0, "input"))


@channel_rule(*NONZERO_UNARY)
def nonzero_unary(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.argument(0, "input"))
    return None if layout is None else TensorLayout(layout.dims, dead_is_zero=False)


@channel_rule("clamp", "clip")
def clamp(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.argument(0, "input"))
    low, high = ctx.argument(1, "min"), ctx.argument(2, "max")
    keeps_zero = (low is None or (isinstance(low, numbers.Number) and low <= 0)) and \
                 (high is None or (isinstance(high, numbers.Number) and high >= 0))
    return None if layout is None else TensorLayout(layout.dims, layout.dead_is_zero and keeps_zero)


def broadcast(ctx: RuleContext, operands: list) -> list:
    """Align operands from the right (torch broadcasting) and tie the positions that meet.

    Per output dimension, the operands spanning it (not broadcast from size 1) are tied
    position by position. Returns the output dims.
    """
    out_shape = ctx.out_shape
    tensors = [v for v in operands if isinstance(v, fx.Node)]
    dims = []
    for d, size in enumerate(out_shape):
        spanning = []
        for value in tensors:
            shape = ctx.shape(value)
            local = d - (len(out_shape) - len(shape))
            if local >= 0 and shape[local] == size and size != 1:
                spanning.append(ctx.atoms_of(value, local))
        dims.append(ctx.tie(spanning, "combined with a tensor that has no channel identity along this dimension"))
    return dims


def count_operands(ctx: RuleContext, operands: list) -> None:
    """A channel count used as a number (``x * x.shape[1] ** -0.5``, ``x.sum(1) / x.shape[1]``) changes
    when channels are removed: the channels it counts are not removed exactly."""
    for value in operands:
        if not isinstance(value, fx.Node):
            for _, _, atoms in ctx.state.channel_reads(value):
                ctx.mark_inexact(atoms, "their count is a number in this arithmetic: removing one changes it")
            ctx.note_attributes(value, "is a number in this arithmetic and follows pruning")   # h / self.hidden_dim


def _dead_is_zero(ctx: RuleContext, value) -> bool:
    if isinstance(value, fx.Node):
        layout = ctx.layout(value)
        return ctx.parameter_name(value) is not None or layout is None or layout.dead_is_zero
    return value == 0


@channel_rule("add", "sub", "rsub", "radd", "subtract", "maximum", "minimum", "fmax", "fmin", "where",
              "lerp", "addcmul", "addcdiv")
def additive(ctx: RuleContext) -> TensorLayout | tuple | None:
    if ctx.op == "where" and len(ctx.node.args) + len(ctx.node.kwargs) == 1:   # where(mask): nonzero's indices
        ctx.pin_layout(ctx.layout(ctx.argument(0, "condition")), "where(mask) reads chosen positions")
        return None
    operands = list(ctx.node.args) + [v for k, v in ctx.node.kwargs.items() if k in ("other", "input")]
    dims = broadcast(ctx, operands)
    count_operands(ctx, operands)
    if ctx.op == "where":
        operands = operands[1:]
    return TensorLayout(tuple(dims), all(_dead_is_zero(ctx, v) for v in operands if not isinstance(v, bool)))


@channel_rule("mul", "rmul", "multiply")
def multiply(ctx: RuleContext) -> TensorLayout:
    operands = list(ctx.node.args) + [v for k, v in ctx.node.kwargs.items() if k == "other"]
    dims = broadcast(ctx, operands)
    count_operands(ctx, operands)
    return TensorLayout(tuple(dims), any(_dead_is_zero(ctx, v) for v in operands))


@channel_rule("div", "truediv", "true_divide", "divide", "floordiv", "floor_divide", "pow", "fmod", "remainder")
def divide(ctx: RuleContext) -> TensorLayout:
    numerator, denominator = ctx.argument(0, "input"), ctx.argument(1, "other")
    dims = broadcast(ctx, [numerator, denominator])
    count_operands(ctx, [numerator, denominator])
    denominator_layout = ctx.layout(denominator)
    varies = denominator_layout is not None and any(a is not None for a in denominator_layout.dims)
    return TensorLayout(tuple(dims), _dead_is_zero(ctx, numerator) and not varies)


@channel_rule("rtruediv", "rdiv", "rpow", "rfloordiv", "gt", "lt", "ge", "le", "eq", "ne", "greater", "less",
              "greater_equal", "less_equal", "not_equal", "logical_and", "logical_or", "logical_xor",
              "logical_not", "isnan", "isinf", "isfinite", "and", "or", "xor", "invert", "bitwise_not")
def position_wise(ctx: RuleContext) -> TensorLayout:
    """Position-wise ops whose value for a dead channel is not zero (``0 >= 0`` is True)."""
    dims = broadcast(ctx, [v for v in ctx.node.args if isinstance(v, fx.Node)])
    count_operands(ctx, list(ctx.node.args))
    return TensorLayout(tuple(dims), False)


@channel_rule("glu")
def glu(ctx: RuleContext) -> TensorLayout | None:
    """``glu(x, dim) = a * sigmoid(b)`` with ``a, b = x.chunk(2, dim)``: channel i of a goes with channel i of b."""
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None:
        return None
    dim = ctx.argument(1, "dim", -1) % layout.ndim
    dims = list(layout.dims)
    if dims[dim] is not None:
        first, second = dims[dim].reshape(2, -1)
        ctx.union(first, second)
        dims[dim] = first.copy()
    return layout.with_dims(dims)


def reduced_dims(value, ndim: int) -> list[int]:
    if value is None:
        return list(range(ndim))
    if isinstance(value, (list, tuple)):
        return [d % ndim for d in value]
    return [value % ndim]


def reduce(ctx: RuleContext, exact: bool) -> TensorLayout | tuple | None:
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    if layout is None:
        return None
    dim_argument = ctx.argument(1, "dim", ctx.node.kwargs.get("axis"))
    if isinstance(dim_argument, fx.Node) or isinstance(dim_argument, str):
        ctx.pin_layout(layout, "reduction over an unsupported dim argument")
        return None
    reduced = reduced_dims(dim_argument, layout.ndim)
    keepdim = bool(ctx.argument(2, "keepdim", False))
    for d in reduced:
        if layout.dims[d] is not None and not (exact and layout.dead_is_zero):
            ctx.mark_inexact(layout.dims[d], "reduced over channels: removing one changes the result")
    dims = [None if d in reduced else atoms for d, atoms in enumerate(layout.dims)
            if keepdim or d not in reduced]
    result = TensorLayout(tuple(dims), layout.dead_is_zero)
    shape = ctx.node.meta.get("shape")
    return (result, result) if shape is None else result


@channel_rule(*EXACT_REDUCTIONS)
def exact_reduction(ctx: RuleContext):
    return reduce(ctx, exact=True)


@channel_rule(*INEXACT_REDUCTIONS, "max", "min", "median", "mode", "topk_values")
def inexact_reduction(ctx: RuleContext):
    other = ctx.argument(1)
    if ctx.op in ("max", "min") and isinstance(other, fx.Node):
        return additive(ctx)
    return reduce(ctx, exact=False)


@channel_rule("softmax", "log_softmax", "softmin")
def softmax(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None:
        return None
    dim = ctx.argument(1, "dim")
    dim = layout.ndim - 1 if dim is None else dim % layout.ndim
    if layout.dims[dim] is not None:
        ctx.mark_inexact(layout.dims[dim], "softmax over channels: removing one renormalizes the rest")
        return TensorLayout(layout.dims, dead_is_zero=False)
    return layout


# Where each position-mixing op takes its dim argument: (index, keyword, default).
_MIXING_DIM = {"cumsum": (1, "dim", None), "cumprod": (1, "dim", None), "cummax": (1, "dim", None),
               "cummin": (1, "dim", None), "logcumsumexp": (1, "dim", None), "flip": (1, "dims", None),
               "roll": (2, "dims", None), "sort": (1, "dim", -1), "argsort": (1, "dim", -1), "topk": (2, "dim", -1)}


@channel_rule(*_MIXING_DIM)
def mixes_positions(ctx: RuleContext):
    """Ops that reorder or mix positions along some dims: channels there are pinned
    (``dims=None`` for roll flattens the tensor: every channel is pinned)."""
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None:
        return None
    index, keyword, default = _MIXING_DIM[ctx.op]
    dims = ctx.argument(index, keyword, default)
    dims = range(layout.ndim) if dims is None else dims if isinstance(dims, (list, tuple)) else [dims]
    mixed = {d % layout.ndim for d in dims}
    for d in mixed:
        ctx.pin(layout.dims[d], "positions along this dimension are reordered or mixed")
    result = layout.with_dims(None if d in mixed else atoms for d, atoms in enumerate(layout.dims))
    return result if ctx.node.meta.get("shape") is not None else (result, result)
