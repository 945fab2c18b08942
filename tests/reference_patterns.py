"""Small reference models of architectural patterns the channel rules must prune correctly.

Each model keeps one pattern of a published architecture (hand-written multi-head attention
in every head layout, a module applied to its own output, Swin v1/v2 window attention with a
relative-position bias, MaxViT block/grid attention, CoAtNet's channels-first attention, PVT v2
spatial-reduction attention, EdgeNeXt split + cross-covariance attention, a CSPNet stage,
YOLOv8's C2f and detection head) at a few thousand parameters. No torchvision or timm.

``PATTERNS[name]`` is a :class:`zoo.ZooEntry`; :func:`attention_entry` builds the hand-written
attention family for any (num_heads, head_dim, layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # tests/ is on sys.path
    from zoo import ConvBNAct, ZooEntry, image_input, seeded_build
except ImportError:  # imported as ``tests.reference_patterns``
    from .zoo import ConvBNAct, ZooEntry, image_input, seeded_build

__all__ = ["PATTERNS", "ATTENTION_LAYOUTS", "HandAttention", "attention_entry", "qkv_parameters"]

# --------------------------------------------------------------------------------------
# Hand-written multi-head attention, every head layout
# --------------------------------------------------------------------------------------

ATTENTION_LAYOUTS = ("separate", "fused", "separate_unknown", "interleaved")


class HandAttention(nn.Module):
    """Multi-head self-attention written out by hand, in one of four head layouts.

    ``separate``: q/k/v Linears, ``view(B, L, self.num_heads, -1)``.
    ``fused``: one qkv Linear, ``reshape(B, L, 3, self.n_att, self.head_dim)`` (head count in an
    attribute of a name the pruner does not know).
    ``separate_unknown``: q/k/v Linears, ``view(B, L, self.n_att, self.d_att)`` (both unknown names).
    ``interleaved``: one qkv Linear laid out per head (MaxViT), ``view(B, L, nh, 3 * hd).chunk(3, -1)``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, layout: str):
        super().__init__()
        self.layout = layout
        inner = num_heads * head_dim
        if layout in ("separate", "interleaved"):
            self.num_heads = num_heads
        else:
            self.n_att = num_heads
        if layout == "separate_unknown":
            self.d_att = head_dim
        else:
            self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        if layout in ("fused", "interleaved"):
            self.qkv = nn.Linear(dim, 3 * inner)
        else:
            self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        if self.layout == "separate":
            return tuple(f(x).view(B, L, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.layout == "separate_unknown":
            return tuple(f(x).view(B, L, self.n_att, self.d_att).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.layout == "fused":
            qkv = self.qkv(x).reshape(B, L, 3, self.n_att, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        return self.qkv(x).view(B, L, self.num_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, L, -1))


class AttentionNet(nn.Module):
    """Token embedding -> residual attention block -> MLP -> classifier, on (B, L, 6) inputs."""

    def __init__(self, num_heads: int, head_dim: int, layout: str, dim: int = 12):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = HandAttention(dim, num_heads, head_dim, layout)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def attention_entry(num_heads: int, head_dim: int, layout: str) -> ZooEntry:
    """The hand-written attention model with this head count, head size and layout."""
    return ZooEntry(f"attention-{layout}-h{num_heads}-d{head_dim}",
                    seeded_build(lambda: AttentionNet(num_heads, head_dim, layout)), image_input(2, 5, 6))


def qkv_parameters(model: AttentionNet) -> list[tuple[str, slice]]:
    """(parameter name, rows) of the q, k and v output channels of the attention block."""
    attention = model.attn
    inner = (getattr(attention, "num_heads", None) or attention.n_att) * \
        (getattr(attention, "head_dim", None) or attention.d_att)
    if attention.layout == "fused":
        return [("attn.qkv.weight", slice(i * inner, (i + 1) * inner)) for i in range(3)]
    if attention.layout == "interleaved":
        head_dim = attention.head_dim
        rows = torch.arange(3 * inner).view(attention.num_heads, 3, head_dim)
        return [("attn.qkv.weight", rows[:, i].reshape(-1)) for i in range(3)]
    return [(f"attn.{name}.weight", slice(0, inner)) for name in "qkv"]


# --------------------------------------------------------------------------------------
# A module applied to its own output
# --------------------------------------------------------------------------------------


class SelfApplied(nn.Module):
    """``y = conv(conv(x))``: the same conv twice, so its input and output channels are one set."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.conv(F.relu(self.stem(x))))
        y = y.mean((2, 3))
        return self.head(self.lin(F.relu(self.lin(y))))


# --------------------------------------------------------------------------------------
# Swin v1 / v2 window attention with a relative-position bias
# --------------------------------------------------------------------------------------


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """timm's Swin WindowAttention: fused qkv, a ``[(2W-1)^2, num_heads]`` bias table gathered with
    an index buffer; ``v2``: cosine attention, a per-head ``logit_scale`` and an MLP bias (cpb)."""

    def __init__(self, dim: int, window: int, num_heads: int, v2: bool = False):
        super().__init__()
        self.window, self.num_heads, self.v2 = window, num_heads, v2
        self.window_area = window * window
        self.scale = (dim // num_heads) ** -0.5
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        if v2:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(num_heads, 1, 1) + 1))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, num_heads, bias=False))
            span = torch.arange(-(window - 1), window, dtype=torch.float32) / (window - 1)
            table = torch.stack(torch.meshgrid(span, span, indexing="ij")).permute(1, 2, 0).unsqueeze(0)
            self.register_buffer("relative_coords_table", table, persistent=False)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        else:
            self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, num_heads) * 0.5)
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def bias(self) -> torch.Tensor:
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        return (16 * torch.sigmoid(bias) if self.v2 else bias).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        if self.v2:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, qkv_bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.v2:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.bias()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window partition, attention, reverse, residual, MLP."""

    def __init__(self, dim: int, window: int, num_heads: int, shift: int, v2: bool):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, v2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attention_mask(self, H: int, W: int) -> torch.Tensor | None:
        if not self.shift:
            return None
        region = torch.zeros(1, H, W, 1)
        bounds = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        count = 0
        for h in bounds:
            for w in bounds:
                region[:, h, w, :] = count
                count += 1
        ids = window_partition(region, self.window).squeeze(-1)
        mask = ids.unsqueeze(1) - ids.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), self.attention_mask(H, W))
        x = window_reverse(windows, self.window, H, W)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Swin(nn.Module):
    """Patch embedding, a regular and a shifted window block, pooled classifier."""

    def __init__(self, v2: bool = False, dim: int = 12, num_heads: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(SwinBlock(dim, 2, num_heads, 0, v2), SwinBlock(dim, 2, num_heads, 1, v2))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        x = self.blocks(x)
        return self.head(x.mean((1, 2)))


# --------------------------------------------------------------------------------------
# MaxViT block/grid attention and CoAtNet's channels-first attention
# --------------------------------------------------------------------------------------


class RelPosBias(nn.Module):
    """timm maxxvit's bias: a ``[(2W-1)^2, heads]`` table gathered, viewed and permuted per head."""

    def __init__(self, window: int, num_heads: int):
        super().__init__()
        self.window_area = window * window
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, num_heads) * 0.5)
        self.register_buffer("relative_position_index", relative_position_index(window).view(-1), persistent=False)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1)
        return attn + bias.unsqueeze(0).contiguous()


class AttentionCl(nn.Module):
    """Channels-last attention, qkv interleaved per head: ``view(B, -1, nh, 3 * dh).chunk(3, 3)``."""

    def __init__(self, dim: int, window: int, dim_head: int = 4):
        super().__init__()
        self.num_heads, self.dim_head = dim // dim_head, dim_head
        self.scale = dim_head ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.rel_pos = RelPosBias(window, self.num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        attn = self.rel_pos((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(restore_shape + (-1,))
        return self.proj(x)


def block_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // size, size, W // size, size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, size, size, C)


def block_reverse(windows: torch.Tensor, size: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // size, W // size, size, size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def grid_partition(x: torch.Tensor, grid: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, grid, H // grid, grid, W // grid, C)
    return x.permute(0, 2, 4, 1, 3, 5).contiguous().view(-1, grid, grid, C)


def grid_reverse(windows: torch.Tensor, grid: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // grid, W // grid, grid, grid, C)
    return x.permute(0, 3, 1, 4, 2, 5).contiguous().view(-1, H, W, C)


class PartitionAttention(nn.Module):
    """MaxViT block (``grid=False``) or grid attention with a residual and an MLP, channels last."""

    def __init__(self, dim: int, size: int, grid: bool):
        super().__init__()
        self.size, self.grid = size, grid
        self.norm1 = nn.LayerNorm(dim)
        self.attn = AttentionCl(dim, size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        part, reverse = (grid_partition, grid_reverse) if self.grid else (block_partition, block_reverse)
        x = x + reverse(self.attn(part(self.norm1(x), self.size)), self.size, H, W)
        return x + self.mlp(self.norm2(x))


class MaxViT(nn.Module):
    """Conv stem (channels first), then block attention and grid attention (channels last)."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.stem = ConvBNAct(3, dim, 3, 1, 1, nn.GELU)
        self.block = PartitionAttention(dim, 2, grid=False)
        self.grid = PartitionAttention(dim, 2, grid=True)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.grid(self.block(x))
        return self.head(x.mean((1, 2)))


class Attention2d(nn.Module):
    """CoAtNet's channels-first attention: a 1x1 conv qkv, ``view(B, nh, 3 * dh, -1).chunk(3, 2)``."""

    def __init__(self, dim: int, window: int, dim_head: int = 4):
        super().__init__()
        self.num_heads, self.dim_head = dim // dim_head, dim_head
        self.scale = dim_head ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.rel_pos = RelPosBias(window, self.num_heads)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        attn = self.rel_pos((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)
        return self.proj(x)


class CoAtNet(nn.Module):
    def __init__(self, dim: int = 12):
        super().__init__()
        self.stem = ConvBNAct(3, dim, 3, 2, 1, nn.GELU)
        self.attn = Attention2d(dim, 4)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------------------
# PVT v2 spatial-reduction attention
# --------------------------------------------------------------------------------------


class SpatialReductionAttention(nn.Module):
    """Keys and values from a strided conv of the tokens reshaped back to an image (timm pvt_v2)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
        x_ = self.norm(self.sr(x_).reshape(B, C, -1).permute(0, 2, 1))
        k, v = self.kv(x_).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class PVTv2(nn.Module):
    def __init__(self, dim: int = 12):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, 3, 2)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        _, _, H, W = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        x = x + self.attn(x, H, W)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


# --------------------------------------------------------------------------------------
# EdgeNeXt: split depthwise convs + cross-covariance (transposed) attention
# --------------------------------------------------------------------------------------


class XCA(nn.Module):
    """Attention across channels within each head: (hd x hd) maps, a per-head temperature."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.rand(num_heads, 1, 1) + 0.5)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        x = (attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj(x)


class SplitTransposeBlock(nn.Module):
    """EdgeNeXt's SDTA block: ``torch.split(x, self.width, 1)``, running depthwise convs, cat, XCA."""

    def __init__(self, dim: int = 12, scales: int = 3, num_heads: int = 2):
        super().__init__()
        self.width = math.ceil(dim / scales)
        self.convs = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1, groups=self.width)
                                   for _ in range(scales - 1))
        self.norm_xca = nn.LayerNorm(dim)
        self.xca = XCA(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        pieces = torch.split(x, self.width, 1)
        outputs = []
        piece = pieces[0]
        for i, conv in enumerate(self.convs):
            piece = conv(piece if i == 0 else piece + pieces[i])
            outputs.append(piece)
        outputs.append(pieces[-1])
        x = torch.cat(outputs, 1)
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W).permute(0, 2, 1)
        x = x + self.xca(self.norm_xca(x))
        x = x.reshape(B, H, W, C)
        x = self.mlp(self.norm(x)).permute(0, 3, 1, 2)
        return shortcut + x


class EdgeNeXt(nn.Module):
    def __init__(self, dim: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.block = SplitTransposeBlock(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


# --------------------------------------------------------------------------------------
# CSPNet and YOLOv8
# --------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(channels, channels, 3, 1, 1, nn.SiLU)
        self.cv2 = ConvBNAct(channels, channels, 3, 1, 1, nn.SiLU)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class CrossStage(nn.Module):
    """timm's CrossStage: expand, ``xs, xb = x.split(self.expand_chs // 2, dim=1)``, blocks on xb,
    transition, cat, transition."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.expand_chs = 2 * out_chs
        self.conv_exp = ConvBNAct(in_chs, self.expand_chs, 1, 1, 1, nn.SiLU)
        self.blocks = nn.Sequential(Bottleneck(out_chs), Bottleneck(out_chs))
        self.conv_transition_b = ConvBNAct(out_chs, out_chs, 1, 1, 1, nn.SiLU)
        self.conv_transition = ConvBNAct(self.expand_chs, out_chs, 1, 1, 1, nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(x)
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CSPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 1, 1, nn.SiLU)
        self.stage = CrossStage(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


class C2f(nn.Module):
    """YOLOv8: ``y = list(cv1(x).chunk(2, 1))`` (``split``: ``.split((self.c, self.c), 1)``), each
    bottleneck appends its output, one concat."""

    def __init__(self, in_chs: int, out_chs: int, n: int = 2, shortcut: bool = True, split: bool = False):
        super().__init__()
        self.split = split
        self.c = out_chs // 2
        self.cv1 = ConvBNAct(in_chs, 2 * self.c, 1, 1, 1, nn.SiLU)
        self.cv2 = ConvBNAct((2 + n) * self.c, out_chs, 1, 1, 1, nn.SiLU)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1) if self.split else self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """YOLOv8's head: per level, box (cv2) and class (cv3) branches concatenated; then every level
    flattened with ``view(B, self.no, -1)`` and concatenated (the output: pinned)."""

    def __init__(self, channels: tuple[int, ...], num_classes: int = 3, reg_max: int = 4):
        super().__init__()
        self.nc, self.reg_max = num_classes, reg_max
        self.no = num_classes + 4 * reg_max
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBNAct(c, 8, 3, 1, 1, nn.SiLU), nn.Conv2d(8, 4 * reg_max, 1))
                                 for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBNAct(c, 6, 3, 1, 1, nn.SiLU), nn.Conv2d(6, num_classes, 1))
                                 for c in channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        B = features[0].shape[0]
        levels = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(features)]
        return torch.cat([x.view(B, self.no, -1) for x in levels], 2)


class YOLOv8(nn.Module):
    def __init__(self, split: bool = False):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2, 1, nn.SiLU)
        self.c2f1 = C2f(8, 8, split=split)
        self.down = ConvBNAct(8, 12, 3, 2, 1, nn.SiLU)
        self.c2f2 = C2f(12, 12, n=1, shortcut=False, split=split)
        self.detect = Detect((8, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.c2f1(self.stem(x))
        p4 = self.c2f2(self.down(p3))
        return self.detect([p3, p4])


def _entry(name: str, factory, *shape: int) -> tuple[str, ZooEntry]:
    return name, ZooEntry(name, seeded_build(factory), image_input(*shape))


PATTERNS: dict[str, ZooEntry] = dict([
    _entry("self-applied-conv", SelfApplied, 2, 3, 6, 6),
    _entry("swin-v1", lambda: Swin(v2=False), 2, 3, 8, 8),
    _entry("swin-v2", lambda: Swin(v2=True), 2, 3, 8, 8),
    _entry("maxvit", MaxViT, 2, 3, 4, 4),
    _entry("coatnet", CoAtNet, 2, 3, 8, 8),
    _entry("pvt-v2", PVTv2, 2, 3, 8, 8),
    _entry("edgenext", EdgeNeXt, 2, 3, 8, 8),
    _entry("cspnet", CSPNet, 2, 3, 6, 6),
    _entry("yolov8", YOLOv8, 2, 3, 8, 8),
    _entry("yolov8-split", lambda: YOLOv8(split=True), 2, 3, 8, 8),
    *((f"attention-{layout}", attention_entry(3, 4, layout)) for layout in ATTENTION_LAYOUTS),
])
