"""Channel rules for recurrent modules: the input features are prunable, the hidden state is not."""

from __future__ import annotations

from torch import nn

from ..channels import dim_atoms
from .registry import RuleContext, module_rule


@module_rule(nn.RNNBase)
def recurrent(ctx: RuleContext) -> None:
    module: nn.RNNBase = ctx.module
    path = ctx.node.target
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    for value in list(ctx.node.args[1:]) + list(ctx.node.kwargs.values()):
        ctx.pin_layout(ctx.layout(value), "the hidden state of a recurrent module is not pruned")
    if layout is None:
        return None
    features = dim_atoms(layout, -1, module.input_size)
    for suffix in ("", "_reverse") if module.bidirectional else ("",):
        ctx.union(features, ctx.parameter_atoms(f"{path}.weight_ih_l0{suffix}", 1))
    if layout.dims[-1] is not None:
        ctx.bind_attribute(path, "input_size", features)
        if not layout.dead_is_zero:
            ctx.mark_inexact(features, "a removed feature would carry a nonzero value")
    return None
