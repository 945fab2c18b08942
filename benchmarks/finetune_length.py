"""How long the one-epoch gap of ``criteria.py`` lasts: fine-tune the same pruned models longer.

``criteria.py`` finds the default LossAware scores (joint) behind Torch-Pruning's magnitude
criterion after one epoch of fine-tuning under global and knapsack selection, while ahead right
after pruning. Here, per seed and ratio (30/50% of the labels, the same MACs budget as
``criteria.py``), four pruned models of the same trained digits CNN

* ``joint_uniform``, ``joint_global``, ``joint_knapsack``: ``LossAwareCriterion(ir)`` scores
  with uniform, global and knapsack selection (``criteria.select``),
* ``tp_magnitude_global``: Torch-Pruning's ``GroupMagnitudeImportance`` in global mode at the
  same MACs (``criteria.tp_at_macs``),

get their batch norms re-estimated and are fine-tuned for each of ``--epochs`` (Adam, lr 1e-3,
the mean of ``--finetunes`` data orders). Prints a table of mean test accuracy and writes JSON::

    {"seeds", "epochs", "finetunes", "rows": [{"seed", "ratio", "model", "bn", "accuracy": {epochs: value}}],
     "table": [{"ratio", "model", "bn", "accuracy": {epochs: mean}}]}

    python benchmarks/finetune_length.py [--seeds 0 1 2 3 4 5] [--epochs 1 3 5] [--finetunes 2]
                                         [--json benchmarks/results/finetune_length.json]
    python benchmarks/finetune_length.py --merge a.json b.json   # seeds run in separate processes
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import criteria  # noqa: E402
from digits_model import accuracy, build_model, digits_data, reestimate_batchnorm, train  # noqa: E402

from pruning_ir import PruningIR  # noqa: E402
from pruning_ir.selectors import UniformLabelSelector  # noqa: E402

RATIOS = (0.3, 0.5)
MODELS = ("joint_uniform", "joint_global", "joint_knapsack", "tp_magnitude_global")


def pruned_models(trained, ratio: float, x, y) -> dict:
    """The four pruned copies of ``trained`` at the MACs uniform selection leaves at ``ratio``."""
    example = x[:1]
    scored = PruningIR(copy.deepcopy(trained)).infer_labels(example)
    criteria.score("loss_aware_joint", scored, x, y)
    budget = criteria.macs(scored.prune(labels=UniformLabelSelector(ratio).select(scored)).model, example)
    models = {}
    for selection in ("uniform", "global", "knapsack"):
        ir = copy.deepcopy(scored)
        models[f"joint_{selection}"] = ir.prune(labels=criteria.select(ir, selection, ratio, budget, example)).model
    models["tp_magnitude_global"] = criteria.tp_at_macs(trained, "tp_magnitude", budget, True, example)[0]
    return models


def run(seed: int, epochs: list[int], finetunes: int) -> list[dict]:
    x, y, x_test, y_test = digits_data(seed=seed)
    trained = train(build_model(seed=seed), x, y, epochs=10, seed=seed)
    rows = []
    for ratio in RATIOS:
        for name, model in pruned_models(trained, ratio, x, y).items():
            calibrated = reestimate_batchnorm(copy.deepcopy(model).eval(), x)
            tuned = {count: statistics.mean(
                accuracy(train(copy.deepcopy(calibrated), x, y, epochs=count, lr=1e-3, seed=seed + 7 + 100 * k),
                         x_test, y_test) for k in range(finetunes)) for count in epochs}
            rows.append({"seed": seed, "ratio": ratio, "model": name, "bn": accuracy(calibrated, x_test, y_test),
                         "accuracy": tuned})
    return rows


def summarize(rows: list[dict], epochs: list[int]) -> list[dict]:
    table = []
    for ratio in RATIOS:
        for name in MODELS:
            group = [r for r in rows if r["ratio"] == ratio and r["model"] == name]
            table.append({"ratio": ratio, "model": name, "bn": statistics.mean(r["bn"] for r in group),
                          "accuracy": {count: statistics.mean(r["accuracy"][count] for r in group)
                                       for count in epochs}})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--finetunes", type=int, default=2)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "finetune_length.json"))
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="no run: combine these JSON files (other seeds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, rows = time.time(), []
    if args.merge:
        parts = [json.load(open(path)) for path in args.merge]
        args.seeds, args.epochs, args.finetunes = [s for p in parts for s in p["seeds"]], parts[0]["epochs"], \
            parts[0]["finetunes"]
        rows = [{**row, "accuracy": {int(k): v for k, v in row["accuracy"].items()}} for p in parts for row in p["rows"]]
    for seed in [] if args.merge else args.seeds:
        rows.extend(run(seed, args.epochs, args.finetunes))
        print(f"seed {seed} done [{time.time() - start:.0f} s]", flush=True)
    table = summarize(rows, args.epochs)
    print(f"digits CNN, seeds {args.seeds}: mean test accuracy (%) after batch-norm re-estimation and after "
          f"fine-tuning (mean of {args.finetunes} data orders)")
    print(f"{'ratio':>5} {'model':20} {'bn':>6} " + " ".join(f"{f'{count} ep':>7}" for count in args.epochs))
    for entry in table:
        print(f"{entry['ratio']:5.1f} {entry['model']:20} {100 * entry['bn']:6.2f} "
              + " ".join(f"{100 * entry['accuracy'][count]:7.2f}" for count in args.epochs))
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "epochs": args.epochs, "finetunes": args.finetunes, "rows": rows,
                       "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
