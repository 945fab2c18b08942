"""Reconstruction: accuracy right after pruning, without a gradient step, with the consumers refit.

Two tasks: the digits residual CNN (``harness.digits``) and a plain 4-conv CNN on a procedurally
generated shapes data set (``shapes_data``: squares, discs, triangles and crosses of random size,
position and contrast on noise, 16x16; generated, so it ships with the script and differs from
digits in both data and architecture: a chain of convs, no residual, so every pruned channel has
one producer and one consumer). Per seed and ratio (50/70/85% of the MACs removed), the labels are
scored once by ``LossAwareCriterion`` (one eval-mode pass over the training set, batches of 8) and
removed uniformly, at the smallest share that meets the MACs budget; then each arm:

* ``none``, ``bias``, ``least_squares``: ``ir.prune(labels, reconstruct=Reconstruction(stats, method))``,
  the statistics collected once on the unpruned model (``InputStatistics.run`` over the training
  images in eval mode, batches of 64);
* ``least_squares_seq``: the same, then the sequential refit (``Reconstruction(..., sequential=loader)``:
  the consumers refit again one after the other, on the inputs the pruned model gives them, to
  reproduce the unpruned outputs; ``loader``: the training images, batches of 64);
* ``none_x3``, ``least_squares_x3`` (``--rounds``): the same share in 3 rounds of ``prune_in_rounds(..., reconstruct=method)``,
  statistics re-collected during each round's calibration pass, batch norms not re-estimated
  between rounds (so the ``pruned`` column is still without any re-estimation);
  ``least_squares_seq_x3``: the rounds with the sequential refit at every round;
* ``tp_magnitude``, ``tp_taylor``: Torch-Pruning's ``GroupMagnitudeImportance`` and
  ``GroupTaylorImportance`` (same calibration gradients), its ratio bisected to the MACs nearest the budget;
  ``tp_best`` is the better of the two on the ``bn`` column.

Reported: test accuracy right after pruning (``pruned``) and after re-estimating the batch norms on
the training images (``bn``); the time and peak memory (RSS above the start) of collecting the
statistics, the size of the sums, the time of the refit in ``prune`` and of the sequential refit. JSON:
``{"seeds", "tasks": {task: {"unpruned", "table", "rows", "cost"}}}``; accuracies are fractions::

    python benchmarks/reconstruction.py --seeds 0 1 2 --rounds
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness.digits import CALIBRATION_BATCH, calibration, score_loss_aware, trained_digits
from harness.machine import PeakMemory
from harness.rival import tp_at_macs, tp_calibrated
from harness.tables import table, write_json
from pruning_ir import PruningIR, Reconstruction, UniformLabelSelector, collect_statistics, prune_in_rounds
from pruning_ir.criteria import LossAwareCriterion
from pruning_ir.demo.digits import accuracy, batches, reestimate_batchnorm, train
from pruning_ir.latency import macs

RATIOS = (0.5, 0.7, 0.85)
METHODS = ("none", "bias", "least_squares", "least_squares_seq")
ROUNDS = 3
STATISTICS_BATCH = 64


# -- the shapes task ----------------------------------------------------------------------------
def shapes_data(seed: int, train_count: int = 3000, test_count: int = 1000, size: int = 16) -> tuple:
    """(x_train, y_train, x_test, y_test): 4 classes of shapes, (N, 1, size, size) floats."""
    rng = np.random.default_rng(1000 + seed)
    count = train_count + test_count
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((count, size, size), dtype=np.float32)
    labels = rng.integers(0, 4, count)
    for i, label in enumerate(labels):
        r = rng.uniform(2.5, 5.5)
        cy, cx = rng.uniform(r, size - r, 2)
        dy, dx = yy - cy, xx - cx
        if label == 0:
            mask = (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
        elif label == 1:
            mask = dy ** 2 + dx ** 2 <= r ** 2
        elif label == 2:
            mask = (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
        else:
            mask = ((np.abs(dy) <= r * 0.3) | (np.abs(dx) <= r * 0.3)) & (np.abs(dy) <= r) & (np.abs(dx) <= r)
        contrast = rng.uniform(0.4, 1.0)
        images[i] = mask * contrast + rng.normal(0, 0.2, (size, size))
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels).long()
    return x[:train_count], y[:train_count], x[train_count:], y[train_count:]


class ShapesCNN(nn.Module):
    """conv-bn-relu x2 -> pool -> conv-bn-relu x2 -> global pool -> linear (a plain chain)."""

    def __init__(self, width: int = 32, classes: int = 4):
        super().__init__()
        chans = [1, width, width, 2 * width, 2 * width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def trained_task(task: str, seed: int) -> tuple[nn.Module, tuple]:
    if task == "digits":
        digits = trained_digits(seed)
        return digits.model, (digits.x_train, digits.y_train, digits.x_test, digits.y_test)
    data = shapes_data(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = train(ShapesCNN(), data[0], data[1], epochs=15, seed=seed)
    return reestimate_batchnorm(model, data[0]), data  # running statistics lag Adam's last steps here


# -- arms ---------------------------------------------------------------------------------------
def uniform_share(ir: PruningIR, budget: float, example, steps: int = 16) -> float:
    """The smallest share of every group's labels whose uniform removal meets ``budget`` MACs."""
    low, high = 0.0, 0.99
    for _ in range(steps):
        middle = (low + high) / 2
        pruned = ir.prune(labels=UniformLabelSelector(middle).select(ir), verify=False).model
        low, high = (low, middle) if macs(pruned, example) <= budget else (middle, high)
    return high


def accuracies(model: nn.Module, data: tuple) -> dict:
    x_train, _, x_test, y_test = data
    result = {"pruned": accuracy(model, x_test, y_test)}
    result["bn"] = accuracy(reestimate_batchnorm(copy.deepcopy(model), x_train), x_test, y_test)
    return result


def collected(ir: PruningIR, x_train: torch.Tensor) -> tuple:
    """The statistics of ``ir``'s consumers over the training images, and what collecting cost."""
    started = time.perf_counter()
    with PeakMemory() as peak:
        stats = collect_statistics(ir).run(batches(x_train, x_train, STATISTICS_BATCH, seed=None))
    seconds = time.perf_counter() - started
    size = sum(t.numel() * t.element_size() for s in stats.consumers.values() for t in (s.total, s.outer)
               if t is not None)
    return stats, {"collect_s": seconds, "collect_peak_mb": peak.mb, "statistics_mb": size / 2 ** 20}


def refit_loader(x_train: torch.Tensor) -> list[torch.Tensor]:
    """The batches of the sequential refit: the training images, as for the statistics."""
    return [x for x, _ in batches(x_train, x_train, STATISTICS_BATCH, seed=None)]


def reconstruction_for(stats, method: str, ridge: float, x_train: torch.Tensor) -> Reconstruction | None:
    if method == "none":
        return None
    sequential = refit_loader(x_train) if method.endswith("_seq") else None
    return Reconstruction(stats, method.removesuffix("_seq"), ridge=ridge, sequential=sequential, warn=False)


def rounds_arm(trained: nn.Module, share: float, method: str, data: tuple, ridge: float) -> nn.Module:
    x_train, y_train = data[0], data[1]
    ir = PruningIR(copy.deepcopy(trained).eval()).infer_labels(x_train[:1])
    factory = None if method == "none" else functools.partial(reconstruction_for, method=method, ridge=ridge,
                                                              x_train=x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned = prune_in_rounds(ir, UniformLabelSelector, share, calibration(x_train, y_train), rounds=ROUNDS,
                                 criterion=LossAwareCriterion, reconstruct=factory, inplace=True, verbose=False)
    pruned.model.zero_grad(set_to_none=True)
    return pruned.model.eval()


def run_seed(task: str, seed: int, with_rounds: bool, ridge: float,
             ratios: tuple[float, ...] = RATIOS) -> tuple[list[dict], dict, float]:
    trained, data = trained_task(task, seed)
    x_train, y_train = data[0], data[1]
    example = x_train[:1]
    base = macs(trained, example)
    unpruned = accuracy(trained, data[2], data[3])
    unpruned_bn = accuracy(reestimate_batchnorm(copy.deepcopy(trained), x_train), data[2], data[3])
    ir = PruningIR(copy.deepcopy(trained).eval()).infer_labels(example)
    score_loss_aware(ir, x_train, y_train)
    stats, cost = collected(ir, x_train)
    graded = tp_calibrated(trained, x_train, y_train, CALIBRATION_BATCH)
    rows, refit_s, sequential_s = [], [], []
    for ratio in ratios:
        budget = (1 - ratio) * base
        share = uniform_share(ir, budget, example)
        labels = UniformLabelSelector(share).select(ir)
        for method in METHODS:
            reconstruction = reconstruction_for(stats, method, ridge, x_train)
            pruned = ir.prune(labels=labels, reconstruct=reconstruction).model.eval()
            if reconstruction is not None:
                report = reconstruction.report
                if report.sequential is None:
                    refit_s.append(report.seconds)
                else:
                    sequential_s.append(report.seconds + report.sequential_seconds)
            rows.append({"seed": seed, "ratio": ratio, "arm": method, "macs": macs(pruned, example) / base,
                         **accuracies(pruned, data)})
            if with_rounds and method != "bias":
                pruned = rounds_arm(trained, share, method, data, ridge)
                rows.append({"seed": seed, "ratio": ratio, "arm": f"{method}_x{ROUNDS}",
                             "macs": macs(pruned, example) / base, **accuracies(pruned, data)})
        for importance in ("magnitude", "taylor"):
            source = graded if importance == "taylor" else trained
            pruned, reached, _ = tp_at_macs(source, importance, budget, False, example)
            rows.append({"seed": seed, "ratio": ratio, "arm": f"tp_{importance}", "macs": reached / base,
                         **accuracies(pruned.eval(), data)})
    cost["refit_s_mean"] = statistics.mean(refit_s)
    cost["sequential_s_mean"] = statistics.mean(sequential_s)
    cost["unpruned_bn"] = unpruned_bn
    return rows, cost, unpruned


def summary(rows: list[dict], unpruned: float) -> list[dict]:
    entries = []
    for ratio in sorted({r["ratio"] for r in rows}):
        arms = list(dict.fromkeys(r["arm"] for r in rows if r["ratio"] == ratio))
        for arm in arms:
            group = [r for r in rows if r["ratio"] == ratio and r["arm"] == arm]
            entries.append({"ratio": ratio, "arm": arm, "macs": statistics.mean(r["macs"] for r in group),
                            **{c: statistics.mean(r[c] for r in group) for c in ("pruned", "bn")}})
        seeds = sorted({r["seed"] for r in rows})
        best = []
        for seed in seeds:
            tp = [r for r in rows if r["seed"] == seed and r["ratio"] == ratio and r["arm"].startswith("tp_")]
            best.append(max(tp, key=lambda r: r["bn"]))
        entries.append({"ratio": ratio, "arm": "tp_best", "macs": statistics.mean(r["macs"] for r in best),
                        **{c: statistics.mean(r[c] for r in best) for c in ("pruned", "bn")}})
    for entry in entries:
        entry["pruned_drop_pts"] = 100 * (unpruned - entry["pruned"])
        entry["bn_drop_pts"] = 100 * (unpruned - entry["bn"])
    return entries


def markdown(result: dict) -> list[str]:
    lines = []
    for task, found in result["tasks"].items():
        cost = found["cost"]
        lines += [f"**{task}** (unpruned test accuracy {found['unpruned']:.3f}, mean of seeds {result['seeds']}; "
                  f"statistics: {cost['collect_s']:.2f} s to collect, {cost['statistics_mb']:.2f} MB of sums, "
                  f"peak RSS +{cost['collect_peak_mb']:.0f} MB; refit in prune {cost['refit_s_mean'] * 1000:.0f} ms, "
                  f"with the sequential refit {cost['sequential_s_mean']:.2f} s; "
                  f"the unpruned model with its batch norms re-estimated: {cost['unpruned_bn']:.3f})", ""]
        rows = [[f"{int(e['ratio'] * 100)}%", e["arm"], f"{e['macs']:.3f}", f"{e['pruned']:.3f}",
                 f"{e['pruned_drop_pts']:+.1f}", f"{e['bn']:.3f}", f"{e['bn_drop_pts']:+.1f}"]
                for e in found["table"]]
        lines += table(["MACs removed", "arm", "MACs kept", "pruned", "drop (pts)", "bn", "drop (pts)"], rows) + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["digits", "shapes"])
    parser.add_argument("--rounds", action="store_true", help=f"add the {ROUNDS}-round arms")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="shares of MACs to remove")
    parser.add_argument("--json", default=f"{harness.RESULTS}/reconstruction.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"seeds": args.seeds, "ridge": args.ridge, "rounds": ROUNDS if args.rounds else None,
              "ratios": args.ratios, "tasks": {}}
    for task in args.tasks:
        rows, costs, unpruned = [], [], []
        for seed in args.seeds:
            found, cost, accuracy_ = run_seed(task, seed, args.rounds, args.ridge, tuple(args.ratios))
            rows += found
            costs.append(cost)
            unpruned.append(accuracy_)
            print(f"{task} seed {seed}: unpruned {accuracy_:.3f}", flush=True)
        mean_unpruned = statistics.mean(unpruned)
        result["tasks"][task] = {"unpruned": mean_unpruned, "table": summary(rows, mean_unpruned), "rows": rows,
                                 "cost": {key: statistics.mean(c[key] for c in costs) for key in costs[0]}}
    print("\n".join(markdown(result)))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
