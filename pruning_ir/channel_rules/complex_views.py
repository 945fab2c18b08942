"""Channel rules for complex views: rotary embeddings written with complex numbers (Meta's LLaMA:
``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis``, then ``view_as_real(...).flatten(3)``)."""

from __future__ import annotations

from ..channels import TensorLayout
from .registry import RuleContext, channel_rule


@channel_rule("view_as_complex")
def view_as_complex(ctx: RuleContext) -> TensorLayout | None:
    """The trailing pair of reals becomes one complex number: the other dims keep their channels."""
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None:
        return None
    ctx.pin(layout.dims[-1], "the real and imaginary parts of one complex number")
    return TensorLayout(layout.dims[:-1], layout.dead_is_zero)


@channel_rule("view_as_real")
def view_as_real(ctx: RuleContext) -> TensorLayout | None:
    """Each complex number becomes a trailing pair of reals (a dead channel stays zero)."""
    layout = ctx.layout(ctx.argument(0, "input"))
    return None if layout is None else TensorLayout(tuple(layout.dims) + (None,), layout.dead_is_zero)
