"""Small hand-written reference models for the pruning test suite.

Every model keeps the structural pattern of its full-size namesake (residual adds,
channel concatenation, depthwise convolutions, channel shuffles, squeeze-excitation,
multi-head attention reshapes, ...) at a width that runs in milliseconds on CPU.

``ZOO[name].build()`` returns a freshly initialised model in eval mode; the weights are
identical on every call. ``ZOO[name].example_inputs()`` returns a tuple of positional
inputs with batch size 2, also identical on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZOO", "ZooEntry", "ConvBNAct", "image_input", "token_input", "randomize_norms", "seeded_build"]


@dataclass(frozen=True)
class ZooEntry:
    """A named reference model: a deterministic constructor and matching example inputs."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]


# --------------------------------------------------------------------------------------
# Determinism helpers
# --------------------------------------------------------------------------------------


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image_input(*shape: int) -> Callable[[], tuple[torch.Tensor]]:
    """Factory of a deterministic ``randn`` input of the given shape."""
    return lambda: (torch.randn(*shape, generator=_generator()),)


def token_input(vocab_size: int, *shape: int, low: int = 1) -> Callable[[], tuple[torch.Tensor]]:
    """Factory of deterministic integer token ids in ``[low, vocab_size)`` (0 is kept for padding)."""
    return lambda: (torch.randint(low, vocab_size, shape, generator=_generator()),)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every normalisation layer non-trivial, per-channel distinct parameters and statistics.

    Freshly initialised norms are the identity (weight 1, bias 0, mean 0, var 1), which would
    hide a pruner that slices their parameters with the wrong indices. Uses the global RNG, so
    call it inside a seeded build. Also covers ``*RMSNorm`` classes (e.g. LLaMA's) by name.
    """
    for module in model.modules():
        if not (isinstance(module, _NORMS) or type(module).__name__.endswith("RMSNorm")):
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(weight, torch.Tensor):
            weight.uniform_(0.5, 1.5)
        if isinstance(bias, torch.Tensor):
            bias.normal_(0.0, 0.1)
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def seeded_build(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """Wrap ``factory`` so that it builds under ``torch.manual_seed(seed)`` and returns an eval model.

    The global RNG state is restored afterwards, so building a model does not perturb the caller.
    """

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
            randomize_norms(model)
        return model.eval()

    return build


# --------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def make_act(act: type[nn.Module] | None) -> nn.Module:
    """Instantiate an activation class (in place where supported, as torchvision does)."""
    if act is None:
        return nn.Identity()
    if act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish):
        return act(inplace=True)
    return act()


class ConvBNAct(nn.Sequential):
    """``Conv -> BatchNorm -> activation`` with "same" padding (torchvision's Conv2dNormActivation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
        dims: int = 2,
    ) -> None:
        layers: list[nn.Module] = [
            _CONV[dims](
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            _BN[dims](out_channels),
        ]
        if act is not None:
            layers.append(make_act(act))
        super().__init__(*layers)


def bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Pre-activation ``BatchNorm -> ReLU -> Conv`` (DenseNet ordering)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False),
    )


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ClassifierHead(nn.Module):
    """Global average pool -> ``torch.flatten(x, 1)`` -> optional dropout -> linear."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# --------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection shortcut, or ``None`` when the identity shortcut fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return ConvBNAct(in_channels, out_channels, 1, stride, act=None)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with an (optionally projected) residual add."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in-place add, exactly as torchvision writes it
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3, 1x1 expand (x4) with a residual add."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision-style ResNet (7x7/2 stem + max pool, four stages, avg pool, fc)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        base_width: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.in_channels = base_width
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, base_width, layers[0], 1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base_width * 8 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self.in_channels, planes, stride if i == 0 else 1))
            self.in_channels = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 projection, residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            ConvBNAct(hidden, out_channels, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's block table scaled by ``width_mult``."""

    # expand ratio t, output channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 0.25, num_classes: int = 10, last_channel: int = 1280) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(last_channel * width_mult)
        features: list[nn.Module] = [ConvBNAct(3, in_channels, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        features.append(ConvBNAct(in_channels, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = ClassifierHead(self.last_channel, num_classes, dropout=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 bottleneck then BN-ReLU-Conv3x3 producing ``growth`` new channels."""

    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.bottleneck = bn_relu_conv(in_channels, bn_size * growth, 1)
        self.conv = bn_relu_conv(bn_size * growth, growth, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.bottleneck(torch.cat(features, 1)))


class DenseBlock(nn.Module):
    """Each layer sees the channel concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_channels + i * growth, growth, bn_size) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 channel compression followed by 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(*bn_relu_conv(in_channels, out_channels, 1), nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC: 3x3 stem, dense blocks separated by transitions, final BN-ReLU, pool, fc."""

    def __init__(
        self,
        block_config: Sequence[int] = (3, 3),
        growth: int = 8,
        bn_size: int = 4,
        compression: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        channels = 2 * growth
        features: list[nn.Module] = [nn.Conv2d(3, channels, 3, 1, 1, bias=False)]
        for i, num_layers in enumerate(block_config):
            features.append(DenseBlock(num_layers, channels, growth, bn_size))
            channels += num_layers * growth
            if i != len(block_config) - 1:
                features.append(Transition(channels, int(channels * compression)))
                channels = int(channels * compression)
        features += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*features)
        self.classifier = ClassifierHead(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------
# ShuffleNetV2
# --------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels of ``groups`` groups (view -> transpose -> contiguous -> view)."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: channel split (stride 1) or two-branch downsampling (stride 2), then shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels, act=None),
                ConvBNAct(in_channels, branch, 1),
            )
        self.branch2 = nn.Sequential(
            ConvBNAct(in_channels if stride > 1 else branch, branch, 1),
            ConvBNAct(branch, branch, 3, stride, groups=branch, act=None),
            ConvBNAct(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2: 3x3/2 stem + max pool, three stages of shuffle units, 1x1 conv, mean pool, fc."""

    def __init__(
        self,
        stem_channels: int = 16,
        stage_channels: Sequence[int] = (24, 48, 96),
        stage_repeats: Sequence[int] = (2, 3, 2),
        last_channels: int = 128,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(3, stem_channels, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        in_channels = stem_channels
        for out_channels, repeats in zip(stage_channels, stage_repeats):
            units = [ShuffleUnit(in_channels, out_channels, 2)]
            units += [ShuffleUnit(out_channels, out_channels, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.conv5 = ConvBNAct(in_channels, last_channels, 1)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# --------------------------------------------------------------------------------------
# EfficientNet
# --------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """Channel attention: avg pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid -> scale input."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_act(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """EfficientNet MBConv: 1x1 expand, depthwise kxk, squeeze-excitation, 1x1 project, residual."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, in_channels // 4)),
            ConvBNAct(hidden, out_channels, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


class EfficientNet(nn.Module):
    """A narrow EfficientNet-B0-like network built from MBConv stages."""

    # expand ratio, kernel, first stride, output channels, repeats
    SETTINGS = ((1, 3, 1, 8, 1), (6, 3, 2, 12, 2), (6, 5, 2, 20, 2), (6, 3, 2, 40, 2))

    def __init__(self, stem_channels: int = 16, last_channels: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(3, stem_channels, 3, 2, act=nn.SiLU)]
        in_channels = stem_channels
        for expand, kernel, stride, out_channels, repeats in self.SETTINGS:
            for i in range(repeats):
                features.append(MBConv(in_channels, out_channels, expand, kernel, stride if i == 0 else 1))
                in_channels = out_channels
        features.append(ConvBNAct(in_channels, last_channels, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.classifier = ClassifierHead(last_channels, num_classes, dropout=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNAct(in_channels, out_channels), ConvBNAct(out_channels, out_channels))


class UNet(nn.Module):
    """Two-level UNet: one decoder stage upsamples with ConvTranspose2d, the other with F.interpolate."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = DoubleConv(in_channels, w1)
        self.enc2 = DoubleConv(w1, w2)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(w2, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, kernel_size=2, stride=2)
        self.dec2 = DoubleConv(w2 + w2, w2)
        self.dec1 = DoubleConv(w2 + w1, w1)
        self.out_conv = nn.Conv2d(w1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        up1 = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up1, e1], dim=1))
        return self.out_conv(d1)


# --------------------------------------------------------------------------------------
# Transformers
# --------------------------------------------------------------------------------------


class FusedQKVAttention(nn.Module):
    """timm-style attention: one ``qkv`` Linear, reshape/permute/unbind, explicit softmax."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class SeparateQKVAttention(nn.Module):
    """Attention with separate q/k/v Linears, ``view(B, N, -1, head_dim)`` heads and SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class TorchMHAttention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention(batch_first=True)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


AttentionFactory = Callable[[int, int], nn.Module]


class Mlp(nn.Sequential):
    """Transformer feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, attention: AttentionFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _blocks(dim: int, num_heads: int, depth: int, mlp_ratio: int, attention: AttentionFactory) -> nn.Sequential:
    return nn.Sequential(*(TransformerBlock(dim, num_heads, mlp_ratio, attention) for _ in range(depth)))


class VisionTransformer(nn.Module):
    """ViT: conv patch embedding, cls token, learned positions, pre-norm blocks, head on cls token."""

    def __init__(
        self,
        attention: AttentionFactory,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 32,
        num_heads: int = 4,
        depth: int = 2,
        mlp_ratio: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, dim))
        self.blocks = _blocks(dim, num_heads, depth, mlp_ratio, attention)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class TokenTransformer(nn.Module):
    """Token classifier: nn.Embedding + positions, nn.MultiheadAttention blocks, mean pool, linear head."""

    def __init__(
        self,
        vocab_size: int = 100,
        seq_len: int = 10,
        dim: int = 32,
        num_heads: int = 4,
        depth: int = 2,
        mlp_ratio: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, seq_len, dim))
        self.blocks = _blocks(dim, num_heads, depth, mlp_ratio, TorchMHAttention)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


# --------------------------------------------------------------------------------------
# Small classics
# --------------------------------------------------------------------------------------


class ResidualBlock1d(nn.Module):
    """Two Conv1d-BN layers with an identity residual add and a final ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels, 3, dims=1)
        self.conv2 = ConvBNAct(channels, channels, 3, act=None, dims=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class Conv1dNet(nn.Module):
    """1-D CNN: Conv1d-BN-ReLU stem, residual block, max pool, wider conv, adaptive avg pool, linear."""

    def __init__(self, in_channels: int = 4, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, width, 5, dims=1)
        self.block = ResidualBlock1d(width)
        self.pool = nn.MaxPool1d(2)
        self.conv = ConvBNAct(width, 2 * width, 3, dims=1)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(self.block(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LeNet(nn.Module):
    """Classic LeNet-5 with the hard-coded ``x.view(-1, 16 * 5 * 5)`` flatten."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_IMAGE = image_input(2, 3, 32, 32)


def _entries(**specs: tuple[Callable[[], nn.Module], Callable[[], tuple]]) -> dict[str, ZooEntry]:
    return {name: ZooEntry(name, seeded_build(factory), inputs) for name, (factory, inputs) in specs.items()}


ZOO: dict[str, ZooEntry] = _entries(
    resnet18=(lambda: ResNet(BasicBlock, (2, 2, 2, 2)), _IMAGE),
    resnet50=(lambda: ResNet(Bottleneck, (3, 4, 6, 3)), _IMAGE),
    mobilenet_v2=(lambda: MobileNetV2(width_mult=0.25), _IMAGE),
    densenet=(DenseNet, _IMAGE),
    shufflenet_v2=(ShuffleNetV2, _IMAGE),
    efficientnet=(EfficientNet, _IMAGE),
    unet=(UNet, _IMAGE),
    vit=(lambda: VisionTransformer(FusedQKVAttention), _IMAGE),
    vit_separate_qkv=(lambda: VisionTransformer(SeparateQKVAttention), _IMAGE),
    vit_mha=(TokenTransformer, token_input(100, 2, 10)),
    conv1d_net=(Conv1dNet, image_input(2, 4, 64)),
    lenet=(LeNet, _IMAGE),
)
