"""im2col rows of a convolution call, sampled: the input features a conv weight multiplies.

A conv's output at one position is ``weight.reshape(out, -1) @ patch``, the patch being the
input channels times the kernel offsets around that position. Reconstruction works on these
patches as a Linear works on its input rows; sampling at most ``max_positions`` output
positions per call bounds the memory and time by the sample, not by the image size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["call_argument", "conv_patches"]


def call_argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """An argument of a torch function call, given positionally or by keyword."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _pairs(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def conv_patches(kind: str, x: torch.Tensor, weight: torch.Tensor, args: tuple, kwargs: dict,
                 max_positions: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """im2col rows of ``F.conv1d``/``F.conv2d(*args, **kwargs)`` (``kind``) on input ``x``: channel-major,
    then kernel offsets, as ``weight.reshape(out, -1)``, at up to ``max_positions`` output positions
    drawn at random with ``generator`` (every position when None)."""
    n = 1 if kind == "conv1d" else 2
    if x.ndim == n + 1:
        x = x.unsqueeze(0)
    kernel = tuple(weight.shape[2:])
    stride = _pairs(call_argument(args, kwargs, 3, "stride", 1), n)
    padding = call_argument(args, kwargs, 4, "padding", 0)
    dilation = _pairs(call_argument(args, kwargs, 5, "dilation", 1), n)
    if padding == "valid":
        pads = [(0, 0)] * n
    elif padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in _pairs(padding, n)]
    if any(p for pair in pads for p in pair):
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    if n == 1:
        x, kernel, stride, dilation = x.unsqueeze(2), (1,) + kernel, (1,) + stride, (1,) + dilation
    batch, channels, height, width = x.shape
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = batch * out_h * out_w
    if max_positions is None or total <= max_positions:
        flat = torch.arange(total)
    else:
        flat = torch.randperm(total, generator=generator)[:max_positions]
    flat = flat.to(x.device)
    b, rest = flat // (out_h * out_w), flat % (out_h * out_w)
    rows, cols = (rest // out_w) * stride[0], (rest % out_w) * stride[1]
    parts = [x[b, :, rows + i * dilation[0], cols + j * dilation[1]]
             for i in range(kernel[0]) for j in range(kernel[1])]
    return torch.stack(parts, dim=2).reshape(len(flat), channels * kernel[0] * kernel[1])
