"""A trained digits model ready to prune: data, training, Taylor scores and evaluation.

Builds on ``digits_model`` (scikit-learn's 8x8 digits, the small residual CNN, training and
batch-norm re-estimation) and adds what selector benchmarks need around it: one call to get
a trained model with its data, the LossAware scoring pass, and the three accuracies that
compare pruned models fairly (right after pruning, after re-estimating batch-norm
statistics, after a short fine-tune). Everything is seeded.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from digits_model import accuracy, batches, build_model, digits_data, reestimate_batchnorm, train  # noqa: E402

from pruning_ir import PruningIR  # noqa: E402
from pruning_ir.criteria import LossAwareCriterion  # noqa: E402

__all__ = ["Digits", "trained_digits", "calibration", "score_loss_aware", "evaluate_pruned"]

CALIBRATION_BATCH = 8       # small batches: Molchanov's per-batch square tends to the per-sample one
CALIBRATION_SEED = 123


@dataclass
class Digits:
    """A trained model and its split (images are (N, 1, 8, 8) floats in [0, 1])."""

    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def test_accuracy(self) -> float:
        return accuracy(self.model, self.x_test, self.y_test)


def trained_digits(seed: int = 0, width: int = 32, epochs: int = 20) -> Digits:
    """Train ``digits_model.DigitsResNet`` on the seed's split; deterministic for a seed."""
    x_train, y_train, x_test, y_test = digits_data(seed)
    with torch.random.fork_rng(devices=[]):
        model = train(build_model(seed, width), x_train, y_train, epochs=epochs, seed=seed)
    return Digits(model, x_train, y_train, x_test, y_test)


def calibration(x: torch.Tensor, y: torch.Tensor, batch: int = CALIBRATION_BATCH) -> Callable[[Callable], None]:
    """``calibrate(score_collector)``: one pass over ``(x, y)`` in shuffled batches, a backward each
    (the calibration loop of every benchmark, for a criterion context or ``prune_in_rounds``)."""
    def calibrate(collector: Callable) -> None:
        for xb, yb in batches(x, y, batch, seed=CALIBRATION_SEED):
            F.cross_entropy(collector(xb), yb).backward()
    return calibrate


def score_loss_aware(ir: PruningIR, x: torch.Tensor, y: torch.Tensor) -> None:
    """Set the IR's scores with LossAwareCriterion: one eval-mode pass over ``(x, y)``."""
    ir.model.eval()
    with LossAwareCriterion(ir) as collector:
        calibration(x, y)(collector)
    ir.model.zero_grad(set_to_none=True)


def evaluate_pruned(model: nn.Module, data: Digits, finetune_epochs: int = 1, seed: int = 0) -> dict[str, float]:
    """Test accuracy ``pruned`` (as is), ``bn`` (batch norms re-estimated on the training
    images) and ``ft`` (then ``finetune_epochs`` of Adam at lr 1e-3); ``model`` is not changed."""
    model = copy.deepcopy(model).eval()
    result = {"pruned": accuracy(model, data.x_test, data.y_test)}
    reestimate_batchnorm(model, data.x_train)
    result["bn"] = accuracy(model, data.x_test, data.y_test)
    with torch.random.fork_rng(devices=[]):
        train(model, data.x_train, data.y_train, epochs=finetune_epochs, lr=1e-3, seed=seed + 7)
    result["ft"] = accuracy(model, data.x_test, data.y_test)
    return result
