"""Benchmark-scale models: the test zoo's architectures at realistic widths and input sizes."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from zoo import ZOO, Bottleneck, BasicBlock, FusedQKVAttention, MobileNetV2, ResNet, VisionTransformer  # noqa: E402

Factory = Callable[[], tuple[nn.Module, tuple]]


def _image(size: int) -> tuple:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(length: int, vocab: int) -> tuple:
    return (torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(0)),)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, attn_implementation="sdpa"))


BENCHMARK_MODELS: dict[str, Factory] = {
    "resnet18": lambda: (_seeded(lambda: ResNet(BasicBlock, (2, 2, 2, 2), base_width=64, num_classes=1000)), _image(224)),
    "resnet50": lambda: (_seeded(lambda: ResNet(Bottleneck, (3, 4, 6, 3), base_width=64, num_classes=1000)), _image(224)),
    "mobilenet_v2": lambda: (_seeded(lambda: MobileNetV2(width_mult=1.0, num_classes=1000)), _image(224)),
    "vit_small": lambda: (_seeded(lambda: VisionTransformer(FusedQKVAttention, image_size=224, patch_size=16, dim=384,
                                                            num_heads=6, depth=12, num_classes=1000)), _image(224)),
    "bert_base": lambda: (_seeded(_bert), _tokens(128, 30000)),
    **{name: (lambda entry=entry: (entry.build(), entry.example_inputs()))
       for name, entry in ZOO.items() if name in ("densenet", "shufflenet_v2", "efficientnet", "unet", "conv1d_net")},
}
QUICK_MODELS = ("resnet18", "densenet")
