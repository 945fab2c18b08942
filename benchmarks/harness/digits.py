"""The digits task of the accuracy comparisons: data, model, training, calibration, evaluation.

scikit-learn's 8x8 digits and the small residual CNN of ``pruning_ir.demo.digits`` (one copy
of that code), plus what comparing pruned models needs around it: a trained model with its
split, the calibration pass every Taylor criterion sees, and the accuracies that compare pruned
models fairly (right after pruning, after re-estimating batch-norm statistics, after a short
fine-tune). Everything is seeded.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import PruningIR
from pruning_ir.criteria import LossAwareCriterion
from pruning_ir.demo.digits import (accuracy, batches, build_model, digits_data,  # noqa: F401 - re-exported
                                    reestimate_batchnorm, train)

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
    """Train the digits CNN on the seed's split; deterministic for a seed, global RNG untouched."""
    x_train, y_train, x_test, y_test = digits_data(seed)
    with torch.random.fork_rng(devices=[]):
        model = train(build_model(seed, width), x_train, y_train, epochs=epochs, seed=seed)
    return Digits(model, x_train, y_train, x_test, y_test)


def calibration(x: torch.Tensor, y: torch.Tensor, batch: int = CALIBRATION_BATCH) -> Callable[[Callable], None]:
    """``calibrate(score_collector)``: one pass over ``(x, y)`` in shuffled batches, a backward each
    (the calibration loop of every comparison, for a criterion context or ``prune_in_rounds``)."""
    def calibrate(collector: Callable) -> None:
        for xb, yb in batches(x, y, batch, seed=CALIBRATION_SEED):
            F.cross_entropy(collector(xb), yb).backward()
    return calibrate


def score_loss_aware(ir: PruningIR, x: torch.Tensor, y: torch.Tensor) -> None:
    """Set the IR's scores with the default LossAwareCriterion: one eval-mode pass over ``(x, y)``."""
    ir.model.eval()
    with LossAwareCriterion(ir) as collector:
        calibration(x, y)(collector)
    ir.model.zero_grad(set_to_none=True)


def widths(model: nn.Module) -> list[int]:
    """Channels kept per group of the digits CNN: stem stream, block-1 interior, second stream, block-2 interior."""
    return [model.stem.out_channels, model.block1.conv1.out_channels, model.down.out_channels,
            model.block2.conv1.out_channels]


def evaluate(pruned: nn.Module, data: tuple, seed: int, finetunes: int, lr: float) -> dict:
    """Test accuracy ``pruned`` (right after pruning), ``bn`` (batch norms re-estimated on the
    training images) and ``ft1`` (then one epoch of Adam at ``lr``: the mean of ``finetunes`` runs
    with different data orders, listed in ``ft1_runs``), and the ``widths`` kept. ``data`` is
    ``digits_data``'s tuple; ``pruned`` is not changed."""
    x_train, y_train, x_test, y_test = data
    result = {"pruned": accuracy(pruned, x_test, y_test), "widths": widths(pruned)}
    calibrated = reestimate_batchnorm(copy.deepcopy(pruned), x_train)
    result["bn"] = accuracy(calibrated, x_test, y_test)
    runs = [accuracy(train(copy.deepcopy(calibrated), x_train, y_train, epochs=1, lr=lr, seed=seed + 7 + 100 * k),
                     x_test, y_test) for k in range(finetunes)]
    result["ft1"], result["ft1_runs"] = statistics.mean(runs), runs
    return result
