"""scikit-learn's digits (real 8x8 handwritten digits shipped with the package), a small
residual CNN for them, and train / evaluate / batch-norm re-estimation helpers.

Everything is seeded: the split, the initialisation and the batch order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def digits_data(seed: int = 0, test_fraction: float = 0.3) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); images are (N, 1, 8, 8) floats scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, seed: int | None = 0):
    """Mini-batches; shuffled with ``seed`` (None: in order)."""
    if seed is None:
        order = torch.arange(len(y))
    else:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class DigitsResNet(nn.Module):
    """stem 3x3 conv -> residual block -> strided 3x3 conv (8x8 -> 4x4) -> residual block ->
    global pool -> linear. Five prunable groups (two residual streams, two block interiors,
    and none at the classifier)."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.block1 = BasicBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.block2 = BasicBlock(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.block1(F.relu(self.stem_bn(self.stem(x))))
        x = self.block2(F.relu(self.down_bn(self.down(x))))
        return self.fc(x.mean((2, 3)))


def build_model(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsResNet(width)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3, seed: int = 0,
          batch_size: int = 64) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed=seed * 1000 + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Recompute every batch norm's running statistics on ``x`` (a cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xb, _ in batches(x, torch.zeros(len(x)), batch_size, seed=None):
        model(xb)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
