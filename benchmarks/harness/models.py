"""Benchmark-scale models: the test zoo's architectures at realistic widths and input sizes,
and the deep models of the scale section (ResNet-50/101/152-style CNNs, BERT encoders of
6/12/24 layers from a config), each a factory ``() -> (model, example_inputs)``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# tests/zoo.py and tests/hf_models.py: on sys.path through harness/__init__.py
from zoo import ZOO, BasicBlock, Bottleneck, FusedQKVAttention, MobileNetV2, ResNet, VisionTransformer

Factory = Callable[[], tuple[nn.Module, tuple]]


def _image(size: int) -> tuple:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(length: int, vocab: int) -> tuple:
    return (torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(0)),)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _bert(layers: int = 12, hidden: int = 768, heads: int = 12) -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * hidden, attn_implementation="sdpa"))


def _resnet(layers: tuple[int, ...], width: int = 64, size: int = 224, block=Bottleneck) -> Factory:
    return lambda: (_seeded(lambda: ResNet(block, layers, base_width=width, num_classes=1000)), _image(size))


def _bert_factory(layers: int, hidden: int, heads: int, length: int) -> Factory:
    return lambda: (_seeded(lambda: _bert(layers, hidden, heads)), _tokens(length, 30000))


BENCHMARK_MODELS: dict[str, Factory] = {
    "resnet18": _resnet((2, 2, 2, 2), block=BasicBlock),
    "resnet50": _resnet((3, 4, 6, 3)),
    "mobilenet_v2": lambda: (_seeded(lambda: MobileNetV2(width_mult=1.0, num_classes=1000)), _image(224)),
    "vit_small": lambda: (_seeded(lambda: VisionTransformer(FusedQKVAttention, image_size=224, patch_size=16, dim=384,
                                                            num_heads=6, depth=12, num_classes=1000)), _image(224)),
    "bert_base": _bert_factory(12, 768, 12, 128),
    **{name: (lambda entry=entry: (entry.build(), entry.example_inputs()))
       for name, entry in ZOO.items() if name in ("densenet", "efficientnet", "unet")},   # tiny: per-call overhead
}
QUICK_MODELS = ("resnet18", "densenet")

# scale: (family, depth in blocks or layers, factory); the largest of each family is the headline model
SCALE_MODELS: dict[str, tuple[str, int, Factory]] = {
    "resnet50": ("ResNet (224 px)", 16, _resnet((3, 4, 6, 3))),
    "resnet101": ("ResNet (224 px)", 33, _resnet((3, 4, 23, 3))),
    "resnet152": ("ResNet (224 px)", 50, _resnet((3, 8, 36, 3))),
    "bert_6": ("BERT, hidden 256 (128 tokens)", 6, _bert_factory(6, 256, 4, 128)),
    "bert_12": ("BERT, hidden 256 (128 tokens)", 12, _bert_factory(12, 256, 4, 128)),
    "bert_24": ("BERT, hidden 256 (128 tokens)", 24, _bert_factory(24, 256, 4, 128)),
}
QUICK_SCALE_MODELS: dict[str, tuple[str, int, Factory]] = {
    "resnet_tiny_4": ("ResNet, width 8 (32 px)", 4, _resnet((1, 1, 1, 1), width=8, size=32)),
    "resnet_tiny_8": ("ResNet, width 8 (32 px)", 8, _resnet((2, 2, 2, 2), width=8, size=32)),
    "resnet_tiny_16": ("ResNet, width 8 (32 px)", 16, _resnet((3, 4, 6, 3), width=8, size=32)),
    "bert_tiny_1": ("BERT, hidden 32 (16 tokens)", 1, _bert_factory(1, 32, 4, 16)),
    "bert_tiny_2": ("BERT, hidden 32 (16 tokens)", 2, _bert_factory(2, 32, 4, 16)),
    "bert_tiny_4": ("BERT, hidden 32 (16 tokens)", 4, _bert_factory(4, 32, 4, 16)),
}


def zoo_models() -> dict:
    """Every model of the tests' zoo and of its Hugging Face part (name -> ZooEntry)."""
    from hf_models import HF_ZOO
    return {**ZOO, **HF_ZOO}
