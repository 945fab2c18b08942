"""The one call against the four steps and Torch-Pruning, on two models and data sets.

Tasks: the digits CNN of the harness (scikit-learn's 8x8 digits), and *shapes*: 16x16 RGB
images drawn by the benchmark itself (discs, rings, squares, frames, crosses, triangles at random
positions, sizes and colours on noisy backgrounds; 6000 images, a quarter held out), learned by
a small inverted-residual CNN (depthwise convolutions, batch norms) unlike the digits ResNet. Per task, seed and share of
MACs removed (50/70/85%), every arm prunes the same trained model to the same MACs budget:

* ``one_call``: ``pruning_ir.prune(model, example, macs=kept, data=loader, loss=cross_entropy)``
  (its default recipe, least-squares reconstruction in every round included);
* ``one_call_no_reconstruction``: the same with ``reconstruct=None``;
* ``four_steps``: the README's four steps with a knapsack to the budget (``LossAwareCriterion``
  with its defaults over the same batches of 16, model in eval mode, ``KnapsackLabelSelector(macs)``,
  ``ir.prune``), which refit by least squares from the criterion's input statistics by default;
  ``four_steps_exact``: the same with ``LossAwareCriterion(input_statistics=False)``, ENOT's exact
  slicing (the four steps before that default); ``four_steps_batch``: with
  ``LossAwareCriterion(batch_statistics="auto")``, a candidate default measured and not adopted;
* ``tp_magnitude`` / ``tp_taylor``: Torch-Pruning's MetaPruner, uniform per layer, its ratio
  bisected to the budget (``harness.rival.tp_at_macs``; Taylor on the same calibration batches).

Columns: test accuracy right after pruning, after batch-norm re-estimation on the training
images, and after one epoch of fine-tuning (Adam, lr 3e-4); MACs kept. Reported: each arm, and
the one call's difference to the best Torch-Pruning arm in points.

    python benchmarks/one_call.py [--seeds 0 1] [--tasks digits shapes] [--arms ...] [--quick] [--json PATH]
    python benchmarks/one_call.py --summarize a.json b.json [--json merged.json]   # tables of earlier runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import harness  # noqa: F401  (puts the repository and tests/ on sys.path)
from harness import RESULTS
from harness.digits import accuracy, batches, calibration, reestimate_batchnorm, train, trained_digits
from harness.rival import macs, tp_at_macs, tp_calibrated
from harness.tables import table, write_json

SHARES_REMOVED = (0.5, 0.7, 0.85)
EPOCHS = {"digits": 20, "shapes": 15}   # training epochs of the unpruned models
FINETUNE_LR = 3e-4


# -- the shapes task ---------------------------------------------------------------------------
SHAPES = ("disc", "ring", "square", "frame", "cross", "triangle")


def _shape_mask(kind: str, rows: torch.Tensor, cols: torch.Tensor, cy: float, cx: float, r: float) -> torch.Tensor:
    dy, dx = rows - cy, cols - cx
    distance = (dy ** 2 + dx ** 2).sqrt()
    box = torch.maximum(dy.abs(), dx.abs())
    if kind == "disc":
        return distance <= r
    if kind == "ring":
        return (distance <= r) & (distance >= 0.55 * r)
    if kind == "square":
        return box <= r
    if kind == "frame":
        return (box <= r) & (box >= 0.55 * r)
    if kind == "cross":
        return ((dy.abs() <= 0.3 * r) | (dx.abs() <= 0.3 * r)) & (box <= r)
    return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)   # triangle, apex up


def shapes(seed: int, per_class: int = 1000, size: int = 16) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): procedurally drawn shapes (6 classes) on 16x16 RGB noise,
    random position, size, colour and background; a quarter of the samples are the test split."""
    generator = torch.Generator().manual_seed(1000 + seed)
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
    images, labels = [], []
    for label, kind in enumerate(SHAPES):
        for _ in range(per_class):
            r = 3.0 + 3.0 * float(torch.rand(1, generator=generator))
            cy, cx = (r + (size - 2 * r) * torch.rand(2, generator=generator)).tolist()
            mask = _shape_mask(kind, rows, cols, cy, cx, r).float()
            colour, background = torch.rand(3, 1, 1, generator=generator), torch.rand(3, 1, 1, generator=generator)
            image = background * (1 - mask) + colour * mask + 0.15 * torch.randn(3, size, size, generator=generator)
            images.append(image)
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    order = torch.randperm(len(y), generator=generator)
    cut = len(y) * 3 // 4
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class PatchNet(nn.Module):
    """A small inverted-residual CNN for 16x16 RGB images."""

    def __init__(self, width: int = 16, classes: int = len(SHAPES)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.stage1 = nn.Sequential(InvertedResidual(width), InvertedResidual(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU6())
        self.stage2 = nn.Sequential(InvertedResidual(2 * width), InvertedResidual(2 * width))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def trained_task(task: str, seed: int, epochs: int | None = None):
    """(model, x_train, y_train, x_test, y_test), trained and in eval mode."""
    epochs = EPOCHS[task] if epochs is None else epochs
    if task == "digits":
        data = trained_digits(seed, epochs=epochs)
        return data.model, data.x_train, data.y_train, data.x_test, data.y_test
    x_train, y_train, x_test, y_test = shapes(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = train(PatchNet(), x_train, y_train, epochs=epochs, seed=seed)
    return model, x_train, y_train, x_test, y_test


# -- the arms --------------------------------------------------------------------------------
BATCH = 16   # the batches every loss-aware arm of this benchmark calibrates on


def one_call_arm(reconstruct: str | None):
    def arm(model, x, y, kept: float, seed: int) -> nn.Module:
        import pruning_ir
        loader = list(batches(x, y, BATCH, seed=seed))
        return pruning_ir.prune(model, x[:1], macs=kept, data=loader, loss=F.cross_entropy, verbose=False,
                                reconstruct=reconstruct)
    return arm


def four_steps_arm(**criterion_options):
    def arm(model, x, y, kept: float, seed: int) -> nn.Module:
        from pruning_ir import KnapsackLabelSelector, LossAwareCriterion, PruningIR, bind
        ir = PruningIR(copy.deepcopy(model).eval())
        with LossAwareCriterion(ir, **criterion_options) as score_collector:
            calibration(x, y, BATCH)(score_collector)
        latency = bind(macs, x[:1])
        labels = KnapsackLabelSelector(kept * latency(ir.model), latency, verbose=False).select(ir)
        pruned = ir.prune(labels=labels).model
        pruned.zero_grad(set_to_none=True)
        return pruned
    return arm


def torch_pruning(importance: str):
    def arm(model, x, y, kept: float, seed: int) -> nn.Module:
        source = tp_calibrated(model, x, y, 8) if importance == "taylor" else copy.deepcopy(model)
        pruned, _, _ = tp_at_macs(source, importance, kept * macs(model, x[:1]), False, x[:1])
        return pruned
    return arm


ARMS = {"one_call": one_call_arm("least_squares"), "one_call_no_reconstruction": one_call_arm(None),
        "four_steps": four_steps_arm(), "four_steps_exact": four_steps_arm(input_statistics=False),
        "four_steps_batch": four_steps_arm(batch_statistics="auto"),
        "tp_magnitude": torch_pruning("magnitude"), "tp_taylor": torch_pruning("taylor")}
# differences reported as their own table: (arm, baseline) -> what the change does
CHANGES = {("one_call", "one_call_no_reconstruction"): "least-squares reconstruction in the one call",
           ("four_steps", "four_steps_exact"): "the four steps' default refit (input statistics left by the "
                                               "criterion, least squares in prune)",
           ("four_steps_batch", "four_steps"): "LossAwareCriterion(batch_statistics='auto'), the candidate default"}


def evaluate(pruned: nn.Module, model: nn.Module, x, y, x_test, y_test, seed: int) -> dict:
    example = x[:1]
    row = {"macs_kept": macs(pruned, example) / macs(model, example), "pruned": accuracy(pruned, x_test, y_test)}
    reestimate_batchnorm(pruned, x)
    row["bn"] = accuracy(pruned, x_test, y_test)
    train(pruned, x, y, epochs=1, lr=FINETUNE_LR, seed=seed)
    row["ft1"] = accuracy(pruned, x_test, y_test)
    return row


def run(tasks: list[str], seeds: list[int], shares: tuple[float, ...], epochs: int, arms: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        for seed in seeds:
            model, x, y, x_test, y_test = trained_task(task, seed, epochs)
            base = accuracy(model, x_test, y_test)
            for removed in shares:
                for name, arm in ((name, ARMS[name]) for name in arms):
                    start = time.perf_counter()
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        pruned = arm(model, x, y, 1.0 - removed, seed)
                    seconds = time.perf_counter() - start
                    row = {"task": task, "seed": seed, "removed": removed, "arm": name, "base": base,
                           "seconds": seconds, **evaluate(pruned, model, x, y, x_test, y_test, seed)}
                    rows.append(row)
                    print(f"{task} seed {seed} {removed:.0%} {name}: pruned {row['pruned']:.3f} bn {row['bn']:.3f} "
                          f"ft1 {row['ft1']:.3f} MACs {row['macs_kept']:.3f} [{seconds:.1f} s]", file=sys.stderr)
    return rows


def summary(rows: list[dict]) -> list[str]:
    lines = []
    keys = sorted({(r["task"], r["removed"]) for r in rows})
    header = ["task", "MACs removed", "arm", "MACs kept", "pruned", "bn", "ft1", "s"]
    body = []
    for task, removed in keys:
        for arm in ARMS:
            picked = [r for r in rows if r["task"] == task and r["removed"] == removed and r["arm"] == arm]
            if picked:
                mean = {k: statistics.mean(r[k] for r in picked) for k in ("macs_kept", "pruned", "bn", "ft1", "seconds")}
                body.append([task, f"{removed:.0%}", arm, f"{mean['macs_kept']:.3f}", f"{100 * mean['pruned']:.1f}",
                             f"{100 * mean['bn']:.1f}", f"{100 * mean['ft1']:.1f}", f"{mean['seconds']:.1f}"])
    lines += table(header, body)
    lines += ["", "One call minus the best Torch-Pruning arm (points, mean over seeds):", ""]
    diff = []
    for task, removed in keys:
        cells = [task, f"{removed:.0%}"]
        for column in ("bn", "ft1"):
            ours = _mean(rows, task, removed, "one_call", column)
            rivals = [v for v in (_mean(rows, task, removed, a, column) for a in ("tp_magnitude", "tp_taylor"))
                      if v is not None]
            cells.append("-" if ours is None or not rivals else f"{100 * (ours - max(rivals)):+.1f}")
        diff.append(cells)
    lines += table(["task", "MACs removed", "after BN re-estimation", "after one epoch"], diff)
    for (arm, baseline), what in CHANGES.items():
        lines += ["", f"{arm} minus {baseline}: {what} (points, mean over seeds):", ""]
        body = []
        for task, removed in keys:
            pairs = [(_mean(rows, task, removed, arm, c), _mean(rows, task, removed, baseline, c))
                     for c in ("pruned", "bn", "ft1")]
            if all(a is not None and b is not None for a, b in pairs):
                body.append([task, f"{removed:.0%}"] + [f"{100 * (a - b):+.1f}" for a, b in pairs])
        lines += table(["task", "MACs removed", "pruned", "bn", "ft1"], body)
    bases = {task: statistics.mean(dict((r["seed"], r["base"]) for r in rows if r["task"] == task).values())
             for task in {r["task"] for r in rows}}
    lines += ["", "Unpruned: " + ", ".join(f"{task} {100 * b:.1f}%" for task, b in sorted(bases.items()))]
    return lines


def _mean(rows: list[dict], task: str, removed: float, arm: str, column: str) -> float | None:
    values = [r[column] for r in rows if (r["task"], r["removed"], r["arm"]) == (task, removed, arm)]
    return statistics.mean(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=["digits", "shapes"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 for digits, 15 for shapes")
    parser.add_argument("--quick", action="store_true", help="one seed, 50% only, 3 training epochs")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--json", default=os.path.join(RESULTS, "one_call.json"))
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="print the tables of earlier runs' JSON "
                        "files (merged; --json writes the merge)")
    args = parser.parse_args(argv)
    if args.summarize:
        runs = [json.load(open(path)) for path in args.summarize]
        rows = [row for run_ in runs for row in run_["rows"]]
        print("\n".join(summary(rows)))
        if args.json:
            write_json(args.json, {**runs[0], "seeds": sorted({r["seed"] for r in rows}), "rows": rows})
        return 0
    seeds, shares, epochs = (args.seeds[:1], (0.5,), 3) if args.quick else (args.seeds, SHARES_REMOVED, args.epochs)
    torch.set_num_threads(1)
    rows = run(args.tasks, seeds, shares, epochs, args.arms)
    print("\n".join(summary(rows)))
    if args.json and not args.quick:
        write_json(args.json, {"seeds": seeds, "epochs": epochs, "finetune_lr": FINETUNE_LR, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
