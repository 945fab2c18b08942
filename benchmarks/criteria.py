"""Quality of the criteria: prune a small residual CNN trained on scikit-learn's digits.

For every criterion (pruning_ir's LossAware, Magnitude, Magnitude with batch-norm folding,
Random; and LossAware applied in 5 rounds of scoring and pruning, ``loss_aware_x5``) and
selection (uniform: the same share of every group; global: the network-wide lowest scores),
prune 30/50/70% of the labels and report test accuracy

* ``pruned``: right after pruning (stale batch-norm statistics; for ``loss_aware_x5``, whose
  rounds re-estimate them, the same as ``bn``),
* ``bn``: after re-estimating the batch-norm statistics on the training images (no weight update),
* ``ft1``: after that and one epoch of fine-tuning (Adam, lr 1e-3, batches of 64),

side by side with Torch-Pruning's GroupTaylorImportance and GroupMagnitudeImportance
(``MetaPruner``, same uniform/global mode) at the MACs of the LossAware model. Taylor
criteria see the same calibration data: one pass over the training set in eval mode, batches
of 8 (Torch-Pruning accumulates the gradients of all of them).

``loss_aware_x5`` removes what the one-shot LossAware removes (the same count per group for
uniform, the same number of labels for global) in 5 rounds on the same data (5 passes).
Takes about 15 minutes on one CPU thread (the Torch-Pruning MACs bisection is most of it).

    python benchmarks/criteria.py [--seeds 0 1 2 3 4] [--json benchmarks/results/criteria.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from digits_model import accuracy, batches, build_model, digits_data, reestimate_batchnorm, train  # noqa: E402

from pruning_ir import PruningIR  # noqa: E402
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion, RandomCriterion  # noqa: E402
from pruning_ir.selectors import GlobalScoreLabelSelector, UniformLabelSelector  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
OURS = ("loss_aware", "magnitude", "magnitude_bn", "random", "loss_aware_x5")
ROUNDS = 5  # loss_aware_x5: the same removal in 5 rounds, re-scoring (and re-estimating batch norms) between them
THEIRS = ("tp_taylor", "tp_magnitude")
CALIBRATION_SEED = 123
CALIBRATION_BATCH = 8  # small batches: Molchanov's per-batch square tends to the per-sample (Fisher) one


def macs(model, example) -> int:
    import torch_pruning as tp
    return int(tp.utils.count_ops_and_params(model, example)[0])


def score(name: str, ir: PruningIR, x, y) -> None:
    model = ir.model
    if name == "loss_aware":
        model.eval()
        with LossAwareCriterion(ir) as collector:
            for xb, yb in batches(x, y, CALIBRATION_BATCH, seed=CALIBRATION_SEED):
                F.cross_entropy(collector(xb), yb).backward()
        model.zero_grad(set_to_none=True)
    elif name == "magnitude":
        MagnitudeCriterion(ir).apply()
    elif name == "magnitude_bn":
        MagnitudeCriterion(ir, fold_batchnorm=True).apply()
    elif name == "random":
        RandomCriterion(ir, seed=0).apply()
    else:
        raise KeyError(name)


def select(ir: PruningIR, selection: str, ratio: float) -> list:
    selector = UniformLabelSelector(ratio) if selection == "uniform" else GlobalScoreLabelSelector(ratio)
    return selector.select(ir)


def prune_in_rounds(trained, selection: str, ratio: float, x, y, rounds: int = ROUNDS):
    """Remove what one-shot selection removes (the same count per group for uniform, the same
    number of labels for global) in ``rounds`` steps, each scored on the current pruned model
    after re-estimating its batch norms: re-scoring sees the redundancy that the first-order
    scores of one full model cannot (removing one of many similar channels costs little,
    removing all of them costs a lot)."""
    ir = PruningIR(copy.deepcopy(trained)).infer_labels(x[:2])
    one_shot = select(ir, selection, ratio)
    origin = {label.class_id: group_id for group_id, group in enumerate(ir.label_groups()) for label in group}
    target = [0] * len(ir.label_groups())
    for label in one_shot:
        target[origin[label.class_id]] += 1
    removed = [0] * len(target)
    for k in range(1, rounds + 1):
        score("loss_aware", ir, x, y)
        if selection == "global":
            count = int(round(len(one_shot) * k / rounds)) - sum(removed)
            labels = GlobalScoreLabelSelector(count).select(ir) if count > 0 else []
        else:  # the lowest-scored labels of each group, the group's share of this round
            labels = []
            for ordered in ir.label_groups():
                group_id = origin[ordered[0].class_id]  # class ids survive pruning, group ids need not
                count = int(round(target[group_id] * k / rounds)) - removed[group_id]
                labels.extend(ordered[:count])
        for label in labels:
            removed[origin[label.class_id]] += 1
        ir = ir.prune(labels=labels)
        reestimate_batchnorm(ir.model, x)
    return ir.model.eval()


def tp_prune(trained, importance: str, ratio: float, global_pruning: bool, x, y):
    import torch_pruning as tp
    model = copy.deepcopy(trained).eval()
    example = x[:2]
    if importance == "tp_taylor":
        imp = tp.importance.GroupTaylorImportance()
        model.zero_grad()
        for xb, yb in batches(x, y, CALIBRATION_BATCH, seed=CALIBRATION_SEED):
            F.cross_entropy(model(xb), yb).backward()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio,
                                  global_pruning=global_pruning, ignored_layers=[model.fc])
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def tp_at_macs(trained, importance: str, target: int, global_pruning: bool, x, y):
    """Torch-Pruning's ratio whose pruned model has the MACs closest to ``target`` (bisection)."""
    example = x[:2]
    low, high, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (low + high) / 2
        model = tp_prune(trained, importance, ratio, global_pruning, x, y)
        count = macs(model, example)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (model, count, ratio)
        if count > target:
            low = ratio
        else:
            high = ratio
    return best


def evaluate(pruned, data, seed: int) -> dict:
    x_train, y_train, x_test, y_test = data
    result = {"pruned": accuracy(pruned, x_test, y_test)}
    calibrated = reestimate_batchnorm(copy.deepcopy(pruned), x_train)
    result["bn"] = accuracy(calibrated, x_test, y_test)
    tuned = train(copy.deepcopy(calibrated), x_train, y_train, epochs=1, lr=1e-3, seed=seed + 7)
    result["ft1"] = accuracy(tuned, x_test, y_test)
    return result


def run(seed: int, epochs: int) -> list[dict]:
    data = digits_data(seed=seed)
    x_train, y_train, x_test, y_test = data
    trained = train(build_model(seed=seed), x_train, y_train, epochs=epochs, seed=seed)
    example = x_train[:2]
    base_macs = macs(trained, example)
    rows = [{"seed": seed, "selection": "-", "ratio": 0.0, "criterion": "unpruned", "macs": base_macs,
             "pruned": accuracy(trained, x_test, y_test), "bn": accuracy(trained, x_test, y_test),
             "ft1": accuracy(trained, x_test, y_test)}]
    for selection in ("uniform", "global"):
        for ratio in RATIOS:
            target = None
            for name in OURS:
                if name == "loss_aware_x5":
                    pruned = prune_in_rounds(trained, selection, ratio, x_train, y_train)
                else:
                    ir = PruningIR(copy.deepcopy(trained)).infer_labels(example)
                    score(name, ir, x_train, y_train)
                    pruned = ir.prune(labels=select(ir, selection, ratio)).model.eval()
                count = macs(pruned, example)
                target = count if name == "loss_aware" else target
                rows.append({"seed": seed, "selection": selection, "ratio": ratio, "criterion": name,
                             "macs": count, **evaluate(pruned, data, seed)})
            for name in THEIRS:
                pruned, count, tp_ratio = tp_at_macs(trained, name, target, selection == "global", x_train, y_train)
                rows.append({"seed": seed, "selection": selection, "ratio": ratio, "criterion": name,
                             "macs": count, "tp_ratio": round(tp_ratio, 4), **evaluate(pruned.eval(), data, seed)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["selection"], r["ratio"], r["criterion"]) for r in rows},
                  key=lambda k: (k[0] != "-", k[0], k[1], (OURS + THEIRS).index(k[2]) if k[2] in OURS + THEIRS else -1))
    table = []
    for selection, ratio, criterion in keys:
        group = [r for r in rows if (r["selection"], r["ratio"], r["criterion"]) == (selection, ratio, criterion)]
        entry = {"selection": selection, "ratio": ratio, "criterion": criterion,
                 "macs": statistics.mean(r["macs"] for r in group)}
        for column in ("pruned", "bn", "ft1"):
            entry[column] = statistics.mean(r[column] for r in group)
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "criteria.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    rows = [row for seed in args.seeds for row in run(seed, args.epochs)]
    table = summarize(rows)
    print(f"digits, DigitsResNet, seeds {args.seeds}: mean test accuracy (%)  [{time.time() - start:.0f} s]")
    print(f"{'selection':9} {'ratio':>5} {'criterion':13} {'MMACs':>6} {'pruned':>7} {'bn':>7} {'ft1':>7}")
    for e in table:
        print(f"{e['selection']:9} {e['ratio']:5.1f} {e['criterion']:13} {e['macs'] / 1e6:6.3f} "
              f"{100 * e['pruned']:7.2f} {100 * e['bn']:7.2f} {100 * e['ft1']:7.2f}")
    for ours in ("loss_aware", "loss_aware_x5"):
        wins = []
        for selection in ("uniform", "global"):
            for ratio in RATIOS:
                entries = {e["criterion"]: e for e in table if e["selection"] == selection and e["ratio"] == ratio}
                for column in ("bn", "ft1"):
                    best_other = max(v[column] for k, v in entries.items() if k not in ("loss_aware", "loss_aware_x5"))
                    wins.append(entries[ours][column] >= best_other)
        print(f"{ours} >= every other criterion: {sum(wins)}/{len(wins)} (selection x ratio x {{bn, ft1}})")
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "epochs": args.epochs, "table": table, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
