"""Channel rules for ops that make new tensors: ``zeros_like(x)`` and ``torch.zeros(size)``.

A new tensor has channels only where its shape follows someone else's: ``zeros_like(x)`` has
x's, and ``torch.zeros((1, self.n_heads, L, S))`` (T5's cross-attention position bias) has
channels of its own along the dim sized by a module attribute, which prune() keeps in step.
"""

from __future__ import annotations

from ..channels import TensorLayout
from ..tracing import AttributeInt, ShapeInt
from .registry import RuleContext, channel_rule

# Filled with one value everywhere (a removed channel of zeros is 0, so removing it is exact).
_ZERO_FILLED = ("zeros", "empty", "zeros_like", "empty_like")


@channel_rule("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
              "new_zeros", "new_ones", "new_full", "new_empty")
def like(ctx: RuleContext) -> TensorLayout | None:
    """``zeros_like(x)`` follows x's shape, so it follows x's channels too."""
    layout = ctx.layout(ctx.argument(0, "input"))
    if ctx.op.startswith("new_") or layout is None:
        return TensorLayout.empty(len(ctx.out_shape))
    return TensorLayout(layout.dims, ctx.op in _ZERO_FILLED)


def _sizes(ctx: RuleContext) -> list:
    """The size arguments: ``zeros(2, 3)``, ``zeros((2, 3))``, ``zeros(size=...)``, ``full((2, 3), v)``."""
    args = ctx.node.args[:1] if ctx.op == "full" else ctx.node.args
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    return list(args) or list(ctx.node.kwargs.get("size", ()))


@channel_rule("zeros", "ones", "empty", "full", "rand", "randn")
def filled(ctx: RuleContext) -> TensorLayout:
    """``torch.zeros(size)``: a dim sized by a module attribute (``self.n_heads``) gets channels of its
    own, bound to that attribute so that it follows pruning; a dim sized by a channel count read from a
    tensor (a recurrent state ``zeros(b, x.shape[-1])``) has that tensor's channels; every other dim has none."""
    sizes = _sizes(ctx)
    dims: list = [None] * len(ctx.out_shape)
    if len(sizes) == len(dims):
        for d, size in enumerate(sizes):
            if isinstance(size, AttributeInt) and size > 1 and ctx.size_kind(size) == "attribute":
                dims[d] = ctx.fresh(int(size))
                ctx.size_follows(size, dims[d], f"the size of dim {d}", heads=True)
            elif isinstance(size, ShapeInt) and size.origin is not None:   # zeros(b, x.shape[-1]): x's channels
                reads = ctx.state.channel_reads(size)
                dims[d] = reads[0][2] if len(reads) == 1 and len(reads[0][2]) == size else None
    return TensorLayout(tuple(dims), ctx.op in _ZERO_FILLED)
