"""Quality: the digits CNN pruned to the same MACs by pruning_ir's criteria and by Torch-Pruning's.

Per seed: train the residual CNN on scikit-learn's digits; for each ratio (30/50/70%) fix one
MACs budget, with ``--budget labels`` the MACs uniform selection leaves when it removes that share
of every group (fixed counts per group: the same for every criterion), with ``--budget macs``
(``make bench``) ``1 - ratio`` of the unpruned MACs; prune to it under each selection:

* ``uniform``: ``UniformLabelSelector`` (at ``--budget macs`` the smallest share that meets the
  budget); where Torch-Pruning's per-layer rounding cannot reach those widths, every model, ours
  and its, is pruned to the uniform widths it reaches nearest to the budget instead;
* ``global``: ``GlobalScoreLabelSelector(n)``, the smallest ``n`` whose model meets the budget;
* ``knapsack``: ``KnapsackLabelSelector(budget, MACs)`` (LossAware arms only; compared with the best
  rival of any selection).

The arms (MACs of one 8x8 image, ``pruning_ir.latency.macs``):

* ``loss_aware_joint``: ``LossAwareCriterion(ir, joint=True)``, the default scores, one-shot;
* ``loss_aware_joint_batch``: the same, calibrated inside ``pruning_ir.batch_statistics`` (batches
  of 16: each batch norm on its batch's statistics, as after re-estimation);
* ``loss_aware_batch_measured``: those scores priced by ``measure_removal_costs`` (8 points per
  group; the training-set loss after re-estimating the batch norms): each group keeps its order;
* ``loss_aware_x5``, ``loss_aware_batch_x5``: the default scores in 5 rounds of scoring and
  pruning (``prune_in_rounds``, batch norms re-estimated after each; ``_batch``:
  ``score_in_batch_statistics=True``): uniform, a fifth of the share a round; global
  (``BinarySearchLatencyLabelSelector``) and knapsack, a fifth of the MACs to remove a round;
* ``magnitude``, ``magnitude_bn`` (batch norm folded): ``MagnitudeCriterion``, mean-normalized
  for global selection (norms of different layers do not compare); ``random``: ``RandomCriterion(seed=0)``;
* ``tp_taylor``, ``tp_magnitude``: Torch-Pruning's ``GroupTaylorImportance()`` and
  ``GroupMagnitudeImportance(p=2)`` in ``MetaPruner`` (``global_pruning`` under global selection),
  its ratio bisected to the MACs nearest the budget; ``tp_taylor_x5``: ``tp_taylor`` in the same 5
  rounds (gradients recomputed and batch norms re-estimated before each).

Taylor criteria see the same calibration data: one eval-mode pass over the training set, batches
of 8. Reported: test accuracy right after pruning (``pruned``), after re-estimating the batch
norms on the training images (``bn``), and after that and one epoch of Adam at ``--finetune-lr``
(``ft1``, the mean of ``--finetunes`` data orders; 3e-4 is the largest of 1e-3, 3e-4 and 1e-4 whose
epoch does not lower the unpruned model's accuracy, a rule that looks at no pruned model); each
LossAware arm against the best other criterion (the difference, with its paired standard error).
JSON: ``{"seeds", "epochs", "budget", "finetunes", "finetune_lr", "table": means over seeds,
"rows": per seed, with the kept ``widths``, "comparisons"}``; accuracies are fractions.

The published rows (files in ``benchmarks/results/``; seeds run apart combine with ``--merge``)::

    python benchmarks/criteria.py --seeds 0 1 --budget macs --finetunes 1    # make bench (quality.json)
    python benchmarks/criteria.py --seeds 12 13 14 15 16 17 18 19 20 21 22 23 --json a.json   # the README's
    python benchmarks/criteria.py --seeds 24 25 26 27 28 29 30 31 32 33 34 35 --json b.json   # 24 seeds
    python benchmarks/criteria.py --merge a.json b.json --json all.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F

import harness
from harness.digits import CALIBRATION_BATCH, batches, build_model, calibration, digits_data, evaluate, train
from harness.rival import tp_at_macs, tp_calibrated, tp_in_rounds
from harness.tables import compare, merge_parts, print_comparison, summarize, write_json
from pruning_ir import PruningIR, batch_statistics, prune_in_rounds
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion, RandomCriterion, measure_removal_costs
from pruning_ir.latency import bind, macs
from pruning_ir.selectors import (BinarySearchLatencyLabelSelector, GlobalScoreLabelSelector, KnapsackLabelSelector,
                                  UniformLabelSelector)

RATIOS = (0.3, 0.5, 0.7)
SELECTIONS = ("uniform", "global", "knapsack")
OURS = ("loss_aware_joint", "loss_aware_joint_batch", "loss_aware_batch_measured", "magnitude", "magnitude_bn",
        "random", "loss_aware_x5", "loss_aware_batch_x5")
THEIRS = {"tp_taylor": "taylor", "tp_magnitude": "magnitude", "tp_taylor_x5": "taylor"}  # -> Torch-Pruning importance
KNAPSACK = tuple(name for name in OURS if name.startswith("loss_aware"))
NORMALIZE = {"magnitude": "mean", "magnitude_bn": "mean"}  # else raw scores
IN_ROUNDS = ("loss_aware_x5", "loss_aware_batch_x5", "tp_taylor_x5")
ROUNDS = 5
BATCH_STATISTICS_BATCH = 16  # batch norms on their batch's statistics, less noisy in 16
BATCH_STATISTICS = ("loss_aware_joint_batch", "loss_aware_batch_x5")  # calibrated inside batch_statistics
MEASURED = {"loss_aware_batch_measured": "loss_aware_joint_batch"}  # -> the scores it prices
SCORED_FIRST = ("loss_aware_joint", "loss_aware_joint_batch", "magnitude", "magnitude_bn", "random", *MEASURED)
FINETUNES = 3
FINETUNE_LR = 3e-4
EARLIER_FINETUNE_LR = 1e-3  # the rate of result files that record none (criteria.json, criteria_heldout.json)
QUICK_CALIBRATION_BATCH = 128  # --quick: a smoke test, not a measurement
MAKE_BENCH = {"seeds": (0, 1), "quick_seeds": (0,), "quick_epochs": 3}  # the quality section of make bench


def criteria_for(selection: str, only: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The arms a selection is run with (those in ``only``, when given)."""
    names = KNAPSACK if selection == "knapsack" else OURS + tuple(THEIRS)
    return tuple(name for name in names if only is None or name in only)


def score(name: str, ir: PruningIR, x, y, batch: int = CALIBRATION_BATCH) -> None:
    """Write one-shot arm ``name``'s scores into ``ir`` (LossAware: one eval-mode pass over ``x``)."""
    model = ir.model
    if name in ("loss_aware_joint", "loss_aware_joint_batch"):
        model.eval()
        batch_mode = name in BATCH_STATISTICS
        with batch_statistics(model) if batch_mode else contextlib.nullcontext(), \
                LossAwareCriterion(ir, joint=True) as collector:
            calibration(x, y, BATCH_STATISTICS_BATCH if batch_mode else batch)(collector)
        model.zero_grad(set_to_none=True)
    elif name in ("magnitude", "magnitude_bn"):
        MagnitudeCriterion(ir, fold_batchnorm=name == "magnitude_bn").apply()
    elif name == "random":
        RandomCriterion(ir, seed=0).apply()
    else:
        raise KeyError(name)


def global_to_budget(ir: PruningIR, budget: float, example, normalize: str | None = None) -> list:
    """``GlobalScoreLabelSelector(n)`` with the smallest ``n`` whose pruned model has at most
    ``budget`` MACs (bisection on ``n``; every group keeps a channel)."""
    def meets(count: int) -> bool:
        return macs(ir.prune(labels=GlobalScoreLabelSelector(count, normalize=normalize).select(ir)).model,
                    example) <= budget

    low, high = 0, sum(len(group) - 1 for group in ir.label_groups())
    if macs(ir.model, example) <= budget:
        return []
    if not meets(high):
        raise ValueError(f"no global selection reaches {budget:.0f} MACs")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    return GlobalScoreLabelSelector(high, normalize=normalize).select(ir)


def select(ir: PruningIR, selection: str, ratio: float, budget: float, example, normalize: str | None = None) -> list:
    """The labels one selection removes at ``ratio`` (uniform) or to ``budget`` MACs (global, knapsack)."""
    if selection == "uniform":
        return UniformLabelSelector(ratio).select(ir)
    if selection == "global":
        return global_to_budget(ir, budget, example, normalize)
    selector = KnapsackLabelSelector(budget, bind(macs, example), verbose=False, normalize=normalize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "reached ... below the tolerance band": still valid
        return selector.select(ir)


def in_rounds(trained, name: str, selection: str, ratio: float, budget: float, x, y,
              batch: int = CALIBRATION_BATCH) -> torch.nn.Module:
    """What one-shot selection removes, in ROUNDS steps of ``pruning_ir.prune_in_rounds``, each scored
    on the partly pruned model after re-estimating its batch norms: uniform, a share of the same
    per-group counts each round; global and knapsack, a share of the MACs to remove each round."""
    example, batch_mode = x[:1], name in BATCH_STATISTICS
    ir = PruningIR(copy.deepcopy(trained).eval()).infer_labels(example)
    options = dict(rounds=ROUNDS, criterion=functools.partial(LossAwareCriterion, joint=True),
                   batchnorm_loader=list(batches(x, x, 64, seed=None)), inplace=True,
                   score_in_batch_statistics=batch_mode, verbose=False)
    calibrate = calibration(x, y, BATCH_STATISTICS_BATCH if batch_mode else batch)
    cost = bind(macs, example)
    if selection == "uniform":
        pruned = prune_in_rounds(ir, UniformLabelSelector, ratio, calibrate, **options)
    elif selection == "global":
        pruned = prune_in_rounds(ir, lambda target: BinarySearchLatencyLabelSelector(target, cost), budget,
                                 calibrate, latency_function=cost, **options)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "reached ... below the tolerance band": still valid
            pruned = prune_in_rounds(ir, lambda target: KnapsackLabelSelector(target, cost, verbose=False), budget,
                                     calibrate, latency_function=cost, **options)
    pruned.model.zero_grad(set_to_none=True)
    return pruned.model.eval()


def uniform_ratio_for(ir: PruningIR, budget: float, example, steps: int = 20) -> float:
    """The smallest share of every group's labels whose uniform removal meets ``budget`` MACs (bisection)."""
    low, high = 0.0, 0.99
    for _ in range(steps):
        middle = (low + high) / 2
        pruned = ir.prune(labels=UniformLabelSelector(middle).select(ir)).model
        low, high = (low, middle) if macs(pruned, example) <= budget else (middle, high)
    return high


def uniform_meeting_point(ir: PruningIR, trained, ratio: float, budget: float, example) -> tuple[float, float]:
    """The uniform share and MACs budget every arm is pruned to: ``ratio`` and ``budget``, unless
    Torch-Pruning's per-layer rounding cannot reach those widths (at 70%, 64 channels keep 19 here,
    20 or 18 there); then the widths it reaches nearest to ``budget``, for everyone."""
    _, reached, _ = tp_at_macs(trained, "magnitude", budget, False, example)
    if abs(reached - budget) <= 0.005 * budget:
        return ratio, budget
    return uniform_ratio_for(ir, reached, example), reached


def scored_irs(trained, needed: set[str], x, y, batch: int) -> dict[str, PruningIR]:
    """The scored IR of every one-shot arm in ``needed`` (a measured arm: a copy of its scores, priced)."""
    scored, example = {}, x[:1]
    for name in (name for name in SCORED_FIRST if name in needed):
        if name in MEASURED:
            scored[name] = copy.deepcopy(scored[MEASURED[name]])
            measure_removal_costs(scored[name], lambda model: F.cross_entropy(model(x), y),
                                  batchnorm_loader=batches(x, x, 64, seed=None), verbose=False)
            continue
        scored[name] = PruningIR(copy.deepcopy(trained)).infer_labels(example)
        score(name, scored[name], x, y, batch)
    return scored


def run(seed: int, epochs: int, budget_kind: str = "labels", finetunes: int = FINETUNES,
        selections: tuple[str, ...] = SELECTIONS, only: tuple[str, ...] | None = None,
        finetune_lr: float = FINETUNE_LR, ratios: tuple[float, ...] = RATIOS,
        batch: int = CALIBRATION_BATCH) -> list[dict]:
    """Every (selection, ratio, arm) row of one seed, plus the unpruned model (selection ``"-"``);
    ``selections`` and ``only`` (arm names) restrict the run to a part of the table."""
    data = digits_data(seed=seed)
    x_train, y_train = data[:2]
    trained = train(build_model(seed=seed), x_train, y_train, epochs=epochs, seed=seed)
    example = x_train[:1]
    rows = [{"seed": seed, "selection": "-", "ratio": 0.0, "criterion": "unpruned", "macs": macs(trained, example),
             "budget": macs(trained, example), **evaluate(trained, data, seed, finetunes, finetune_lr)}]
    needed = {"random"} | {name for selection in selections for name in criteria_for(selection, only)}
    scored = scored_irs(trained, needed | {MEASURED[name] for name in needed if name in MEASURED}, x_train, y_train,
                        batch)  # "random" sets the budgets
    calibrated = tp_calibrated(trained, x_train, y_train, batch)
    for ratio in ratios:
        if budget_kind == "macs":
            budget = (1 - ratio) * macs(trained, example)
            uniform_ratio = uniform_ratio_for(scored["random"], budget, example)
        else:
            uniform_ratio = ratio
            budget = macs(scored["random"].prune(labels=UniformLabelSelector(ratio).select(scored["random"])).model,
                          example)
        for selection in (name for name in SELECTIONS if name in selections):
            selection_ratio, selection_budget = uniform_ratio, budget
            if selection == "uniform":
                selection_ratio, selection_budget = uniform_meeting_point(scored["random"], trained, uniform_ratio,
                                                                          budget, example)
            for name in criteria_for(selection, only):
                extra = {}
                if name in THEIRS and name in IN_ROUNDS:
                    pruned, extra["tp_ratio"] = tp_in_rounds(trained, THEIRS[name], selection_budget,
                                                             selection == "global", x_train, y_train, ROUNDS, batch)
                elif name in THEIRS:
                    pruned, _, tp_ratio = tp_at_macs(calibrated if name == "tp_taylor" else trained, THEIRS[name],
                                                     selection_budget, selection == "global", example)
                    extra["tp_ratio"] = round(tp_ratio, 4)
                elif name in IN_ROUNDS:
                    pruned = in_rounds(trained, name, selection, selection_ratio, selection_budget, x_train, y_train,
                                       batch)
                else:
                    ir = copy.deepcopy(scored[name])
                    labels = select(ir, selection, selection_ratio, selection_budget, example, NORMALIZE.get(name))
                    pruned = ir.prune(labels=labels).model
                rows.append({"seed": seed, "selection": selection, "ratio": ratio, "criterion": name,
                             "macs": macs(pruned, example), "budget": selection_budget, **extra,
                             **evaluate(pruned.eval(), data, seed, finetunes, finetune_lr)})
    return rows


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parse.add_argument("--epochs", type=int, default=10, help="training epochs of the unpruned model")
    parse.add_argument("--threads", type=int, default=1)
    parse.add_argument("--finetunes", type=int, default=FINETUNES, help="fine-tuning runs (data orders) in ft1")
    parse.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                       help=f"ft1's learning rate (Adam; the earlier result files: {EARLIER_FINETUNE_LR:g})")
    parse.add_argument("--budget", choices=("labels", "macs"), default="labels",
                       help="a ratio is the share of labels removed (uniform) or of MACs removed")
    parse.add_argument("--json", default=os.path.join(harness.RESULTS, "criteria_latest.json"),
                       help="where the JSON goes (the default keeps the published files untouched)")
    parse.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS),
                       help="run only these selections (merge the result with the rest)")
    parse.add_argument("--criteria", nargs="+", choices=OURS + tuple(THEIRS), metavar="ARM",
                       help="run only these arms (merge the result with the rest)")
    parse.add_argument("--merge", nargs="+", metavar="JSON",
                       help="no run: combine the rows of these JSON files (other seeds or arms, same settings)")
    parse.add_argument("--quick", action="store_true",
                       help=f"the 50%% ratio only, calibration batches of {QUICK_CALIBRATION_BATCH} (a smoke test)")
    return parse


def study(args: argparse.Namespace) -> dict:
    """Run (or ``--merge``) the seeds; print the table and the comparisons; the JSON object."""
    start, rows = time.time(), []
    if args.merge:
        (args.epochs, args.budget, args.finetunes, args.finetune_lr), args.seeds, rows = merge_parts(
            [json.load(open(path)) for path in args.merge], EARLIER_FINETUNE_LR)
    for seed in [] if args.merge else args.seeds:
        rows.extend(run(seed, args.epochs, args.budget, args.finetunes, tuple(args.selections),
                        tuple(args.criteria) if args.criteria else None, args.finetune_lr,
                        (0.5,) if args.quick else RATIOS, QUICK_CALIBRATION_BATCH if args.quick else CALIBRATION_BATCH))
        print(f"seed {seed} done [{time.time() - start:.0f} s]", flush=True)
    order = ("unpruned",) + OURS + tuple(THEIRS)
    table, comparisons = summarize(rows, order, SELECTIONS), compare(rows, order, SELECTIONS)
    print(f"digits CNN, seeds {args.seeds}: mean test accuracy (%), MACs kept; ft1 at lr {args.finetune_lr:g}  "
          f"[{time.time() - start:.0f} s]")
    print_comparison(table, comparisons)
    return {"seeds": args.seeds, "epochs": args.epochs, "budget": args.budget, "finetunes": args.finetunes,
            "finetune_lr": args.finetune_lr, "table": table, "rows": rows, "comparisons": comparisons}


def section(quick: bool = False) -> dict:
    """The quality section of ``make bench``: the seeds of ``MAKE_BENCH``, MACs budgets, one fine-tune."""
    seeds = MAKE_BENCH["quick_seeds" if quick else "seeds"]
    arguments = ["--seeds", *map(str, seeds), "--budget", "macs", "--finetunes", "1"]
    if quick:
        arguments += ["--quick", "--epochs", str(MAKE_BENCH["quick_epochs"])]
    return {"settings": {"seeds": list(seeds), "command": " ".join(["python benchmarks/criteria.py", *arguments])},
            "criteria": study(parser().parse_args(arguments))}


def main(argv: list[str] | None = None) -> None:
    parse = parser()
    args = parse.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        data = study(args)
    except ValueError as error:
        if not args.merge:
            raise
        parse.error(f"--merge: {error}")  # files run with different settings
    if args.json:
        print(f"wrote {write_json(args.json, data)}")


if __name__ == "__main__":
    main()
