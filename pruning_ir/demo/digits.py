"""scikit-learn's digits and a small residual CNN for them: the demo's and the benchmarks' task.

The digits are real 8x8 handwritten images (1797 of them) that ship inside scikit-learn,
so the demo runs on real data without a download. Everything is seeded: the split, the
initialisation and the batch order. Needs scikit-learn (``pip install pruning-ir[demo]``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..batchnorm import tune_batchnorm_statistics

__all__ = ["digits_data", "batches", "BasicBlock", "DigitsResNet", "build_model", "train", "accuracy",
           "reestimate_batchnorm"]


def digits_data(seed: int = 0, test_fraction: float = 0.3) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); images are (N, 1, 8, 8) floats scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits data ships with scikit-learn: pip install 'pruning-ir[demo]'") from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - test_fraction)))
    train_index, test_index = order[:cut], order[cut:]
    return x[train_index], y[train_index], x[test_index], y[test_index]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64,
            seed: int | None = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches; shuffled with ``seed`` (None: in order)."""
    if seed is None:
        order = torch.arange(len(y))
    else:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with an identity shortcut (ResNet's basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class DigitsResNet(nn.Module):
    """stem 3x3 conv -> residual block -> strided 3x3 conv (8x8 -> 4x4) -> residual block ->
    global pool -> linear. Four prunable groups: two residual streams and two block interiors."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.block1 = BasicBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.block2 = BasicBlock(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(F.relu(self.stem_bn(self.stem(x))))
        x = self.block2(F.relu(self.down_bn(self.down(x))))
        return self.fc(x.mean((2, 3)))


def build_model(seed: int = 0, width: int = 32) -> DigitsResNet:
    torch.manual_seed(seed)
    return DigitsResNet(width)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3, seed: int = 0,
          batch_size: int = 64, description: str | None = None) -> nn.Module:
    """Adam on cross-entropy; returns the model in eval mode. A progress bar when ``description`` is given.

    The optimizer is built here from the model's current parameters, so it is right for a
    model that was just pruned (pruning replaces parameters).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in tqdm(range(epochs), desc=description, disable=description is None, leave=False):
        for xb, yb in batches(x, y, batch_size, seed=seed * 1000 + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Recompute every batch norm's running statistics on ``x`` in order; returns the model in eval mode."""
    tune_batchnorm_statistics(model, batches(x, x, batch_size, seed=None), verbose=False)
    return model.eval()
