"""Gradual (AGP) pruning during training vs one-shot or in-rounds pruning + the same fine-tuning, at 70% MACs removed.

On the residual CNN trained on scikit-learn's digits (``harness.digits``), for each seed:

* **one-shot**: the default LossAware scores (one eval-mode pass, batches of 8),
  ``KnapsackLabelSelector`` with MACs to 0.3 of the original MACs, prune, re-estimate the
  batch-norm statistics, then ``--epochs`` of fine-tuning;
* **rounds**: the one-shot removal in 5 rounds of scoring and Knapsack selection
  (``prune_in_rounds``, batch norms re-estimated after each), then the same fine-tuning;
* **gradual**: the same ``--epochs`` of training with a ``GradualPruner`` in AGP mode: the share
  of MACs removed follows the cubic schedule from 0 to 0.7 between ``start_step`` and
  ``end_step`` (by default the first half of the steps), updated 10 times an epoch; each update
  re-scores with LossAware over the batches since the previous one (training batches, train
  mode) and selects with ``KnapsackLabelSelector(target MACs)``; ``finalize()`` then removes
  the masked channels (the result equals the masked model) and the batch norms are re-estimated.

All arms train with Adam (lr 1e-3), the same batch order and the same number of steps after
the same trained model, and land on <= 0.3 of the MACs (the Knapsack target, measured with
``pruning_ir.latency.macs``). Accuracies are on the held-out split. The AGP settings (updates
an epoch, ``end_step``) were tuned on the published seeds. Prints a table per seed and the
means; writes JSON. Torch-Pruning has no counterpart to gradual pruning, so no rival runs here.

The published rows (``benchmarks/results/gradual.json``, the README's gradual pruning section)::

    python benchmarks/gradual.py --seeds 0 1 2 --epochs 1 2 5

``--quick``: one seed, a shorter base training and 2 epochs, nothing written (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness.digits import (Digits, accuracy, batches, calibration, reestimate_batchnorm, score_loss_aware,
                            trained_digits)
from harness.tables import write_json
from pruning_ir import GradualPruner, KnapsackLabelSelector, PruningIR, prune_in_rounds
from pruning_ir.latency import bind, macs

KEPT_MACS = 0.3        # 70% of the MACs removed
ROUNDS = 5             # the rounds arm: scoring and selection rounds before the fine-tuning
LEARNING_RATE = 1e-3
BATCH = 64


def knapsack_factory(latency):
    """The selector for a MACs target (a named function: the pruner stays picklable)."""
    def selector(target: float) -> KnapsackLabelSelector:
        return KnapsackLabelSelector(target, latency, verbose=False)
    return selector


def train_epochs(model: nn.Module, data: Digits, epochs: int, seed: int, pruner: GradualPruner | None = None) -> None:
    """Adam at LEARNING_RATE; batches in the seed's order; through the pruner when given."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    run = pruner if pruner is not None else model
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(data.x_train, data.y_train, BATCH, seed=seed * 1000 + 500 + epoch):
            optimizer.zero_grad()
            F.cross_entropy(run(xb), yb).backward()
            optimizer.step()
            if pruner is not None:
                pruner.step()


def fine_tuned(model: nn.Module, data: Digits, latency, epochs: int, seed: int, started: float) -> dict:
    """Accuracy of a pruned ``model`` as it is, after batch-norm re-estimation, and after ``epochs``."""
    result = {"pruned": accuracy(model, data.x_test, data.y_test)}
    reestimate_batchnorm(model, data.x_train)
    result["bn"] = accuracy(model, data.x_test, data.y_test)
    with torch.random.fork_rng(devices=[]):
        train_epochs(model, data, epochs, seed)
    result["final"] = accuracy(model, data.x_test, data.y_test)
    result["macs"] = latency(model) / latency(data.model)
    result["seconds"] = time.perf_counter() - started
    return result


def one_shot(data: Digits, latency, epochs: int, seed: int) -> dict:
    started = time.perf_counter()
    ir = PruningIR(copy.deepcopy(data.model))
    score_loss_aware(ir, data.x_train, data.y_train)
    labels = KnapsackLabelSelector(KEPT_MACS * latency(data.model), latency, verbose=False).select(ir)
    return fine_tuned(ir.prune(labels=labels).model, data, latency, epochs, seed, started)


def in_rounds(data: Digits, latency, epochs: int, seed: int) -> dict:
    """The one-shot arm's removal in ROUNDS rounds of scoring and Knapsack selection (``prune_in_rounds``)."""
    started = time.perf_counter()
    ir = PruningIR(copy.deepcopy(data.model).eval()).infer_labels(data.x_train[:1])
    pruned = prune_in_rounds(ir, knapsack_factory(latency), KEPT_MACS * latency(data.model),
                             calibration(data.x_train, data.y_train), rounds=ROUNDS, latency_function=latency,
                             batchnorm_loader=list(batches(data.x_train, data.x_train, BATCH, seed=None)),
                             inplace=True, verbose=False)
    pruned.model.zero_grad(set_to_none=True)
    return fine_tuned(pruned.model.eval(), data, latency, epochs, seed, started)


def gradual(data: Digits, latency, epochs: int, seed: int, end_fraction: float, updates_per_epoch: int) -> dict:
    started = time.perf_counter()
    model = copy.deepcopy(data.model)
    ir = PruningIR(model).infer_labels(data.x_train[:8])
    steps_per_epoch = -(-len(data.y_train) // BATCH)
    total = epochs * steps_per_epoch
    frequency = max(1, steps_per_epoch // updates_per_epoch)
    end_step = max(2 * frequency, int(round(end_fraction * total)))
    pruner = GradualPruner(ir, knapsack_factory(latency), mode="agp", start=0.0, threshold=1 - KEPT_MACS,
                           start_step=frequency, end_step=end_step, frequency=frequency, latency_function=latency)
    with torch.random.fork_rng(devices=[]):
        train_epochs(model, data, epochs, seed, pruner)
    result = {"masked": accuracy(model, data.x_test, data.y_test)}
    small = pruner.finalize()
    result["final_before_bn"] = accuracy(small, data.x_test, data.y_test)
    reestimate_batchnorm(small, data.x_train)
    result["final"] = accuracy(small, data.x_test, data.y_test)
    result["macs"] = latency(small) / latency(data.model)
    result["updates"] = len(pruner.history)
    result["schedule"] = pruner.schedule.config()
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5],
                        help="training epochs of each arm after the base model (one comparison per value)")
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--end-fraction", type=float, default=0.5, help="AGP end_step as a share of all steps")
    parser.add_argument("--updates-per-epoch", type=int, default=10, help="AGP frequency: this many updates an epoch")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/gradual.json (none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.base_epochs = args.seeds[:1], [2], 5
    elif args.json is None:
        args.json = os.path.join(harness.RESULTS, "gradual.json")
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        data = trained_digits(seed, epochs=args.base_epochs)
        latency = bind(macs, data.x_train[:1])
        for epochs in args.epochs:
            shot = one_shot(data, latency, epochs, seed)
            rounds = in_rounds(data, latency, epochs, seed)
            grad = gradual(data, latency, epochs, seed, args.end_fraction, args.updates_per_epoch)
            rows.append({"seed": seed, "epochs": epochs, "base": data.test_accuracy, "one_shot": shot,
                         "rounds": rounds, "gradual": grad})
            print(f"seed {seed}, {epochs} epochs: base {data.test_accuracy:.4f}"
                  + "".join(f" | {arm} bn {row['bn']:.4f} final {row['final']:.4f} (MACs {row['macs']:.3f}, "
                            f"{row['seconds']:.0f} s)" for arm, row in (("one-shot", shot), ("rounds", rounds)))
                  + f" | gradual masked {grad['masked']:.4f} final {grad['final']:.4f} (MACs {grad['macs']:.3f}, "
                  f"{grad['updates']} updates, {grad['seconds']:.0f} s)", flush=True)
    arms = ("one_shot", "rounds", "gradual")
    print(f"\n{'epochs':>6} {'seed':>5} {'base':>7} " + " ".join(f"{arm:>9}" for arm in arms) + "  MACs kept")
    summary = {}
    for epochs in args.epochs:
        group = [row for row in rows if row["epochs"] == epochs]
        for row in group:
            print(f"{epochs:>6} {row['seed']:>5} {row['base']:>7.4f} "
                  + " ".join(f"{row[arm]['final']:>9.4f}" for arm in arms) + "  "
                  + " ".join(f"{row[arm]['macs']:.3f}" for arm in arms))
        summary[epochs] = {arm: statistics.mean(row[arm]["final"] for row in group) for arm in arms}
        print(f"{epochs:>6} {'mean':>5} {statistics.mean(row['base'] for row in group):>7.4f} "
              + " ".join(f"{summary[epochs][arm]:>9.4f}" for arm in arms))
    report = {"kept_macs": KEPT_MACS, "epochs": args.epochs, "base_epochs": args.base_epochs,
              "end_fraction": args.end_fraction, "updates_per_epoch": args.updates_per_epoch,
              "learning_rate": LEARNING_RATE, "batch": BATCH, "seeds": args.seeds, "rows": rows,
              "mean_final_accuracy": summary}
    if args.json:
        print(f"wrote {write_json(args.json, report)}")


if __name__ == "__main__":
    main()
