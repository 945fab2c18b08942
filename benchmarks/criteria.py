"""Quality of the criteria: prune a small residual CNN trained on scikit-learn's digits.

Per seed: train the CNN, then for each ratio (30/50/70%) fix one MACs budget, the MACs that
uniform selection leaves when it removes that share of every group's labels (the same for
every criterion: uniform removes a fixed count per group), and prune to it with

* ``uniform``: ``UniformLabelSelector(ratio)``; where Torch-Pruning's per-layer rounding cannot
  reach those widths (at 70%: 19 of 64 channels; it keeps 18 or 20), every criterion, ours and
  its, is pruned to the uniform widths it reaches nearest to the budget instead,
* ``global``: ``GlobalScoreLabelSelector(n)``, the smallest ``n`` whose model meets the budget,
* ``knapsack``: ``KnapsackLabelSelector(budget, bind(macs, image))`` (LossAware criteria only),
* ``tp_widths``: each group cut to the widths Torch-Pruning's magnitude criterion picked under
  global selection, its lowest-scored labels first: the same architecture for every criterion,
  so this row compares which channels a criterion keeps, apart from how it spreads the removal,

so that every model of one ratio has the same MACs, whatever the criterion and selection.
With ``--budget macs`` a ratio is instead the share of MACs removed: the budget is
``(1 - ratio)`` of the unpruned MACs and uniform selection removes the smallest share of every
group's labels that meets it (``make bench`` reports this form).
MACs are ``pruning_ir.latency.macs`` of one 8x8 image. Criteria:

* ``loss_aware``: ``LossAwareCriterion(ir, joint=False)``, one score per label (the formula
  of the issue; the default before joint scores);
* ``loss_aware_joint``: ``LossAwareCriterion(ir)``, its default joint scores (the estimate for sets of
  labels in a group, see its docstring);
* ``loss_aware_joint_batch``: ``loss_aware_joint`` scored inside ``pruning_ir.batch_statistics``
  (batch norms on the statistics of each calibration batch, as after re-estimation; batches of
  16, not 8: their statistics vary less); ``loss_aware_batch_x5``: ``loss_aware_x5`` with each
  round calibrated so;
* ``loss_aware_mean``, ``loss_aware_joint_mean``, ``loss_aware_joint_batch_mean``: the
  ``loss_aware`` / ``loss_aware_joint`` / ``loss_aware_joint_batch`` scores, selected with
  ``normalize="mean"`` (global and knapsack selection only: uniform selection never compares groups);
* ``loss_aware_measured``, ``loss_aware_batch_measured``: the ``loss_aware_joint`` /
  ``loss_aware_joint_batch`` scores, then ``pruning_ir.measure_removal_costs`` (8 points per
  group, the training-set cross-entropy after re-estimating the batch norms on the training
  images): each group keeps its order and its labels are priced by the measured loss, so
  uniform selection picks what the unmeasured scores pick, and global and knapsack selection
  compare measured losses;
* ``magnitude``, ``magnitude_bn`` (batch-norm folded): ``MagnitudeCriterion``; norms are not
  comparable across layers, so global selection normalizes them (``normalize="mean"``, as
  Torch-Pruning does for its own criteria); ``random``: ``RandomCriterion(seed=0)``;
* ``loss_aware_x5``, ``loss_aware_mean_x5``: the ``loss_aware_joint`` / ``loss_aware_mean``
  removal in 5 rounds of scoring and pruning, ``pruning_ir.prune_in_rounds`` (batch norms
  re-estimated after each round); uniform: a fifth of the share each round; global and
  knapsack: a fifth of the MACs to remove each round (``BinarySearchLatencyLabelSelector`` /
  ``KnapsackLabelSelector``, mean-normalized for ``loss_aware_mean_x5``);
* ``tp_taylor``, ``tp_magnitude``: Torch-Pruning's ``GroupTaylorImportance()`` and
  ``GroupMagnitudeImportance(p=2)`` with their defaults (``normalizer="mean"``) in
  ``MetaPruner`` (``global_pruning`` for the global selection), its ratio bisected to the
  MACs closest to the budget (uniform widths are rounded per layer, so it can land a little
  above it: see ``macs``),
* ``tp_taylor_x5``: ``tp_taylor`` in the same 5 rounds as ``loss_aware_x5``: each round
  recomputes the calibration gradients on the partly pruned model, prunes it to the next of 5
  MACs targets falling linearly to the budget, and re-estimates its batch norms (Torch-Pruning's
  magnitude needs no rounds: without a weight update its scores do not change).

Taylor criteria see the same calibration data: one pass over the training set in eval mode,
batches of 8 (Torch-Pruning accumulates the gradients of all of them). Reported: test accuracy

* ``pruned``: right after pruning (stale batch-norm statistics; for the ``*_x5`` criteria,
  whose rounds re-estimate them, the same as ``bn``),
* ``bn``: after re-estimating the batch-norm statistics on the training images (no weight update),
* ``ft1``: after that and one epoch of fine-tuning (Adam, lr ``--finetune-lr``, batches of 64),
  the mean of ``--finetunes`` runs (3; different data orders) of the same pruned model.

The fine-tuning learning rate, 3e-4, is the largest of 1e-3, 3e-4 and 1e-4 whose epoch does not
lower the *unpruned* model's accuracy, a rule that looks at no pruned model. Measured on seeds
12-23 (3 data orders each): the trained models score 99.37% after batch-norm re-estimation;
one epoch at 1e-3 takes them down to 98.92% (-0.44, SE 0.1), at 3e-4 and 1e-4 up to 99.51%.
At 1e-3, the rate of the earlier results (``criteria.json``, ``criteria_heldout.json``, which
record no ``finetune_lr``), the epoch costs the unpruned model half a point, and after it most
criteria, random included, end 30% of the labels at 98.5-98.9%, around the fine-tuned unpruned
model's 98.92%: that column ranks the fine-tune's noise more than the pruned models.
The unpruned row is fine-tuned the same way (its ``ft1``), the ceiling of that column.

Rows also record ``widths``, the channels kept per group (stem stream, block-1 interior, second
stream, block-2 interior).

The target: every LossAware entry >= every other criterion (not ``loss_aware*``) of the same
selection and ratio, in ``bn`` and ``ft1``; knapsack, which only LossAware runs, against the
best other criterion of any selection but ``tp_widths`` at that ratio (same MACs).

JSON (``--json``)::

    {"seeds": [...], "epochs": int, "budget": "labels" | "macs", "finetunes": int, "finetune_lr": float,
     "table": [{"selection", "ratio", "criterion", "macs", "pruned", "bn", "ft1"}, ...],  # means over seeds
     "rows": [{"seed", "selection", "ratio", "criterion", "macs", "budget", "pruned", "bn", "ft1", "ft1_runs",
               "widths", "tp_ratio" (Torch-Pruning only)}, ...],
     "comparisons": [{"criterion", "selection", "ratio", "column", "ours", "best_other", "other",
                      "difference", "difference_se", "other_macs_ratio", "win"}, ...]}

with selection ``"-"`` and ratio 0 for the unpruned model (``bn`` and ``ft1``: its batch norms
re-estimated, then fine-tuned, the same way; a trained model's running statistics can lag its
weights: one seed's model gains 10 points from re-estimating them; in files without
``finetune_lr`` its ``ft1`` is its ``bn``), accuracies as fractions, and
``difference_se`` the standard error of the per-seed difference. Takes about 4.2 minutes per
seed on one CPU thread (the 12 seeds of ``results/criteria.json``: four processes of 3 seeds,
two at a time on 2 cores, 26 minutes).

    python benchmarks/criteria.py [--seeds 0 1 2 3 4] [--epochs 10] [--finetunes 3]
                                  [--json benchmarks/results/criteria.json]

Seeds can run in parallel processes (one thread each) and be combined without re-running::

    python benchmarks/criteria.py --seeds 0 1 2 --json a.json &
    python benchmarks/criteria.py --seeds 3 4 5 --json b.json
    (then seeds 6 7 8 -> c.json and 9 10 11 -> d.json the same way)
    python benchmarks/criteria.py --merge a.json b.json c.json d.json --json benchmarks/results/criteria.json

Part of the table (``--selections``, ``--criteria``) runs alone and merges with the rest; the
held-out check ``results/criteria_heldout.json`` (seeds 12-23) was run in such parts, fine-tuned
at lr 1e-3 like ``criteria.json``. At the rate of now, 3e-4, ``results/criteria_lr3e-4_seeds12-23.json``
(the same seeds re-run) and ``results/criteria_lr3e-4_seeds24-35.json`` (fresh ones) hold the same
criteria and selections, plus the one-shot ``loss_aware``, ``loss_aware_mean`` and
``loss_aware_joint_mean`` (one more part per file: ``--selections uniform global knapsack
--criteria loss_aware loss_aware_mean loss_aware_joint_mean``); about 25 minutes on 2 cores
per file. The 24 seeds together: ``--merge`` the two files. ``loss_aware_joint_batch`` and
``loss_aware_batch_x5`` came later: ``results/criteria_batch_statistics_seeds12-35.json`` holds
them for the same 24 seeds (``--selections uniform global knapsack --criteria`` one of them; about
35 s and 85 s per seed); ``--merge`` it with the two files to compare them with the rest. That file
was re-run on 2026-12-04: its earlier rows did not reproduce (seed 12, uniform 50%,
``loss_aware_joint_batch``: 74.6% stored, 81.4% now and at 982812d, which stored them). The measured arms are in
``results/criteria_measured_seeds12-35.json`` (``--selections uniform global knapsack --criteria
loss_aware_joint_batch_mean loss_aware_measured loss_aware_batch_measured``, seeds 12-23 and 24-35
in two processes, about 25 s per seed). All 24 seeds together::

    R=benchmarks/results
    python benchmarks/criteria.py --merge $R/criteria_lr3e-4_seeds12-23.json $R/criteria_lr3e-4_seeds24-35.json \
        $R/criteria_batch_statistics_seeds12-35.json $R/criteria_measured_seeds12-35.json --json /tmp/all.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from criteria_table import compare, merge_parts, report, summarize  # noqa: E402
from digits import calibration  # noqa: E402
from digits_model import accuracy, batches, build_model, digits_data, reestimate_batchnorm, train  # noqa: E402

from pruning_ir import PruningIR, batch_statistics, prune_in_rounds as rounds_of  # noqa: E402
from pruning_ir.criteria import (LossAwareCriterion, MagnitudeCriterion, RandomCriterion,  # noqa: E402
                                 measure_removal_costs)
from pruning_ir.latency import bind, macs as count_macs  # noqa: E402
from pruning_ir.selectors import (BinarySearchLatencyLabelSelector, GlobalScoreLabelSelector,  # noqa: E402
                                  KnapsackLabelSelector, UniformLabelSelector)

RATIOS = (0.3, 0.5, 0.7)
SELECTIONS = ("uniform", "global", "knapsack", "tp_widths")
OURS = ("loss_aware", "loss_aware_joint", "loss_aware_joint_batch", "loss_aware_mean", "loss_aware_joint_mean",
        "loss_aware_joint_batch_mean", "loss_aware_measured", "loss_aware_batch_measured", "magnitude", "magnitude_bn",
        "random", "loss_aware_x5", "loss_aware_batch_x5", "loss_aware_mean_x5")
THEIRS = ("tp_taylor", "tp_magnitude", "tp_taylor_x5")
SCORED = {"loss_aware_mean": "loss_aware", "loss_aware_joint_mean": "loss_aware_joint",
          "loss_aware_joint_batch_mean": "loss_aware_joint_batch"}  # reuse another one's scores
NORMALIZE = {"loss_aware_mean": "mean", "loss_aware_joint_mean": "mean", "loss_aware_joint_batch_mean": "mean",
             "loss_aware_mean_x5": "mean",
             "magnitude": "mean", "magnitude_bn": "mean"}  # else raw scores
KNAPSACK = ("loss_aware", "loss_aware_joint", "loss_aware_joint_batch", "loss_aware_mean", "loss_aware_joint_mean",
            "loss_aware_joint_batch_mean", "loss_aware_measured", "loss_aware_batch_measured",
            "loss_aware_x5", "loss_aware_batch_x5", "loss_aware_mean_x5")
AT_WIDTHS = ("loss_aware", "loss_aware_joint", "magnitude", "magnitude_bn", "random", "tp_magnitude")
WIDTHS_FROM = "tp_magnitude"  # tp_widths: every criterion pruned to the widths this one picked under global selection
FINETUNES = 3  # ft1: mean over this many fine-tuning runs (data orders) of the same pruned model
FINETUNE_LR = 3e-4  # the largest rate whose epoch does not hurt the unpruned model (module docstring)
EARLIER_FINETUNE_LR = 1e-3  # the rate of result files that record none
ROUNDS = 5  # *_x5: the same removal in 5 rounds, re-scoring (and re-estimating batch norms) between them
IN_ROUNDS = {"loss_aware_x5": "loss_aware_joint", "loss_aware_batch_x5": "loss_aware_joint",
             "loss_aware_mean_x5": "loss_aware",  # -> the scores of each round
             "tp_taylor_x5": "tp_taylor"}
CALIBRATION_BATCH = 8  # small batches: Molchanov's per-batch square tends to the per-sample (Fisher) one
BATCH_STATISTICS_BATCH = 16  # loss_aware_joint_batch: batch norms see their batch's statistics, less noisy in 16
BATCH_STATISTICS = ("loss_aware_joint_batch", "loss_aware_batch_x5")  # calibrated inside batch_statistics
MEASURED = {"loss_aware_measured": "loss_aware_joint", "loss_aware_batch_measured": "loss_aware_joint_batch"}
SCORED_FIRST = ("loss_aware", "loss_aware_joint", "loss_aware_joint_batch", "magnitude", "magnitude_bn", "random",
                *MEASURED)


def macs(model, example) -> float:
    """MACs of one forward pass on ``example`` (``pruning_ir.latency.macs``)."""
    return count_macs(model, example)


def criteria_for(selection: str, only: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The criteria a selection is run with (those in ``only``, when given)."""
    if selection == "knapsack":
        names = KNAPSACK
    elif selection == "tp_widths":
        names = AT_WIDTHS
    else:
        names = tuple(name for name in OURS + THEIRS if selection == "global" or name not in SCORED)
    return tuple(name for name in names if only is None or name in only)


def score(name: str, ir: PruningIR, x, y) -> None:
    """Write criterion ``name``'s scores into ``ir`` (LossAware: one eval-mode pass over ``x``;
    ``loss_aware_joint_batch``: its batch norms on batch statistics, ``batch_statistics``)."""
    model = ir.model
    if name in ("loss_aware", "loss_aware_joint", "loss_aware_joint_batch"):
        model.eval()
        batch_mode = name in BATCH_STATISTICS
        with batch_statistics(model) if batch_mode else contextlib.nullcontext(), \
                LossAwareCriterion(ir, joint=name != "loss_aware") as collector:
            calibration(x, y, BATCH_STATISTICS_BATCH if batch_mode else CALIBRATION_BATCH)(collector)
        model.zero_grad(set_to_none=True)
    elif name == "magnitude":
        MagnitudeCriterion(ir).apply()
    elif name == "magnitude_bn":
        MagnitudeCriterion(ir, fold_batchnorm=True).apply()
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
    selector = KnapsackLabelSelector(budget, bind(count_macs, example), verbose=False, normalize=normalize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "reached ... below the tolerance band": still valid
        return selector.select(ir)


def prune_in_rounds(trained, name: str, selection: str, ratio: float, budget: float, x, y, rounds: int = ROUNDS):
    """Remove what one-shot selection removes in ``rounds`` steps with ``pruning_ir.prune_in_rounds``,
    each step scored (``IN_ROUNDS[name]``'s scores) on the partly pruned model after re-estimating
    its batch norms: uniform, a ``1/rounds`` share of the same per-group counts each round; global
    and knapsack, the network-wide lowest labels (``BinarySearchLatencyLabelSelector``) or the
    Knapsack's choice, normalized as ``name`` says, down to a ``1/rounds`` share of the MACs to
    remove each round. Re-scoring sees how the remaining channels take over from the removed
    ones, which no score of the full model can."""
    example = x[:1]
    ir = PruningIR(copy.deepcopy(trained).eval()).infer_labels(example)
    criterion = functools.partial(LossAwareCriterion, joint=IN_ROUNDS[name] == "loss_aware_joint")
    options = dict(rounds=rounds, criterion=criterion, batchnorm_loader=list(batches(x, x, 64, seed=None)),
                   inplace=True, score_in_batch_statistics=name in BATCH_STATISTICS, verbose=False)
    calibrate = calibration(x, y, BATCH_STATISTICS_BATCH if name in BATCH_STATISTICS else CALIBRATION_BATCH)
    cost, normalize = bind(count_macs, example), NORMALIZE.get(name)
    if selection == "uniform":
        pruned = rounds_of(ir, UniformLabelSelector, ratio, calibrate, **options)
    elif selection == "global":
        pruned = rounds_of(ir, lambda target: BinarySearchLatencyLabelSelector(target, cost, normalize=normalize),
                           budget, calibrate, latency_function=cost, **options)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "reached ... below the tolerance band": still valid
            pruned = rounds_of(ir, lambda target: KnapsackLabelSelector(target, cost, verbose=False,
                                                                        normalize=normalize),
                               budget, calibrate, latency_function=cost, **options)
    pruned.model.zero_grad(set_to_none=True)
    return pruned.model.eval()


def tp_prune(model, importance: str, ratio: float, global_pruning: bool, example):
    """Torch-Pruning's ``MetaPruner`` at ``ratio`` on a copy of ``model`` (its gradients, for
    Taylor, already accumulated over the calibration data)."""
    import torch_pruning as tp
    source, model = model, copy.deepcopy(model).eval()
    for mine, theirs in zip(model.parameters(), source.parameters()):  # deepcopy leaves gradients behind
        mine.grad = None if theirs.grad is None else theirs.grad.clone()
    imp = tp.importance.GroupTaylorImportance() if importance == "tp_taylor" else \
        tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio,
                                  global_pruning=global_pruning, ignored_layers=[model.fc])
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def tp_calibrated(trained, x, y):
    """A copy of ``trained`` holding the loss gradients of the calibration data (for GroupTaylorImportance)."""
    model = copy.deepcopy(trained).eval()
    model.zero_grad()
    calibration(x, y, CALIBRATION_BATCH)(model)
    return model


def tp_in_rounds(trained, importance: str, budget: float, global_pruning: bool, x, y, rounds: int = ROUNDS):
    """Torch-Pruning's ``importance`` in ``rounds`` steps, as ``prune_in_rounds`` does ours: each
    round recomputes the calibration gradients on the partly pruned model, prunes it to the next
    of ``rounds`` MACs targets falling linearly to ``budget`` (``tp_at_macs``) and re-estimates
    its batch norms. Returns the model and each round's ratio."""
    example, model, ratios = x[:1], trained, []
    base = macs(model, example)
    for k in range(1, rounds + 1):
        model, _, ratio = tp_at_macs(tp_calibrated(model, x, y), importance, base - (base - budget) * k / rounds,
                                     global_pruning, example)
        model = reestimate_batchnorm(model, x).eval()
        ratios.append(round(ratio, 4))
    model.zero_grad(set_to_none=True)
    return model, ratios


def tp_at_macs(model, importance: str, target: float, global_pruning: bool, example):
    """Torch-Pruning's ratio whose pruned model has the MACs closest to ``target`` (bisection)."""
    low, high, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (low + high) / 2
        pruned = tp_prune(model, importance, ratio, global_pruning, example)
        count = macs(pruned, example)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (pruned, count, ratio)
        if count > target:
            low = ratio
        else:
            high = ratio
    return best


def widths(model) -> list[int]:
    """Channels kept per group of the digits CNN: stem stream, block-1 interior, second stream, block-2 interior."""
    return [model.stem.out_channels, model.block1.conv1.out_channels, model.down.out_channels,
            model.block2.conv1.out_channels]


def evaluate(pruned, data, seed: int, finetunes: int = FINETUNES, lr: float = FINETUNE_LR) -> dict:
    """Test accuracy right after pruning, after batch-norm re-estimation, and after one epoch of
    fine-tuning at ``lr`` (the mean of ``finetunes`` runs with different data orders: one run's
    spread is 0.3-0.7 points on this data)."""
    x_train, y_train, x_test, y_test = data
    result = {"pruned": accuracy(pruned, x_test, y_test), "widths": widths(pruned)}
    calibrated = reestimate_batchnorm(copy.deepcopy(pruned), x_train)
    result["bn"] = accuracy(calibrated, x_test, y_test)
    runs = [accuracy(train(copy.deepcopy(calibrated), x_train, y_train, epochs=1, lr=lr, seed=seed + 7 + 100 * k),
                     x_test, y_test) for k in range(finetunes)]
    result["ft1"], result["ft1_runs"] = statistics.mean(runs), runs
    return result


def prune_to_widths(ir: PruningIR, target: list[int]) -> torch.nn.Module:
    """``ir``'s model with each group cut to ``target`` (``widths`` order), its lowest-scored labels first."""
    full, labels = widths(ir.model), []
    for group in ir.label_groups():
        changed = [i for i, (a, b) in enumerate(zip(widths(ir.prune(labels=[group[0]]).model), full)) if a != b]
        labels.extend(group[:full[changed[0]] - target[changed[0]]])
    return ir.prune(labels=labels).model


def uniform_ratio_for(ir: PruningIR, budget: float, example, steps: int = 20) -> float:
    """The smallest share of every group's labels whose uniform removal meets ``budget`` MACs (bisection)."""
    low, high = 0.0, 0.99
    for _ in range(steps):
        middle = (low + high) / 2
        pruned = ir.prune(labels=UniformLabelSelector(middle).select(ir)).model
        low, high = (low, middle) if macs(pruned, example) <= budget else (middle, high)
    return high


def uniform_meeting_point(ir: PruningIR, trained, ratio: float, budget: float, example) -> tuple[float, float]:
    """The uniform share and MACs budget every criterion is pruned to: ``ratio`` and ``budget``,
    unless Torch-Pruning's per-layer rounding cannot reach those widths (at 70%, 64 channels keep
    19 here, 20 or 18 there); then the widths it reaches nearest to ``budget``, for everyone."""
    _, reached, _ = tp_at_macs(trained, "tp_magnitude", budget, False, example)
    if abs(reached - budget) <= 0.005 * budget:
        return ratio, budget
    return uniform_ratio_for(ir, reached, example), reached


def run(seed: int, epochs: int, budget_kind: str = "labels", finetunes: int = FINETUNES,
        selections: tuple[str, ...] = SELECTIONS, only: tuple[str, ...] | None = None,
        finetune_lr: float = FINETUNE_LR) -> list[dict]:
    """Every (selection, ratio, criterion) row of one seed, plus the unpruned model; ``selections``
    and ``only`` (criterion names) restrict the run to a part of the table."""
    data = digits_data(seed=seed)
    x_train, y_train, x_test, y_test = data
    trained = train(build_model(seed=seed), x_train, y_train, epochs=epochs, seed=seed)
    example = x_train[:1]
    rows = [{"seed": seed, "selection": "-", "ratio": 0.0, "criterion": "unpruned", "macs": macs(trained, example),
             "budget": macs(trained, example), **evaluate(trained, data, seed, finetunes, finetune_lr)}]
    scored = {}
    needed = {"random"} | {SCORED.get(name, name) for selection in selections for name in criteria_for(selection, only)}
    needed |= {MEASURED[name] for name in needed if name in MEASURED}
    for name in (name for name in SCORED_FIRST if name in needed):  # "random" sets the budgets
        if name in MEASURED:  # the scores of its criterion (scored before it), priced by measurement
            scored[name] = copy.deepcopy(scored[MEASURED[name]])
            measure_removal_costs(scored[name], lambda model: F.cross_entropy(model(x_train), y_train),
                                  batchnorm_loader=batches(x_train, x_train, 64, seed=None), verbose=False)
            continue
        scored[name] = PruningIR(copy.deepcopy(trained)).infer_labels(example)
        score(name, scored[name], x_train, y_train)
    calibrated = tp_calibrated(trained, x_train, y_train)
    for ratio in RATIOS:
        if budget_kind == "macs":
            budget = (1 - ratio) * macs(trained, example)
            uniform_ratio = uniform_ratio_for(scored["random"], budget, example)
        else:
            uniform_ratio = ratio
            budget = macs(scored["random"].prune(labels=UniformLabelSelector(ratio).select(scored["random"])).model,
                          example)
        reference = None  # (model, row) of WIDTHS_FROM under global selection
        for selection in (name for name in SELECTIONS if name in selections):
            selection_ratio, selection_budget = uniform_ratio, budget
            if selection == "uniform":
                selection_ratio, selection_budget = uniform_meeting_point(scored["random"], trained, uniform_ratio,
                                                                          budget, example)
            for name in criteria_for(selection, only):
                extra = {}
                if selection == "tp_widths" and name == WIDTHS_FROM:  # the reference itself: its global row
                    rows.append({**reference[1], "selection": selection})
                    continue
                if selection == "tp_widths":
                    pruned = prune_to_widths(copy.deepcopy(scored[name]), widths(reference[0]))
                elif name in THEIRS and name in IN_ROUNDS:
                    pruned, extra["tp_ratio"] = tp_in_rounds(trained, IN_ROUNDS[name], selection_budget,
                                                             selection == "global", x_train, y_train)
                elif name in THEIRS:
                    pruned, _, tp_ratio = tp_at_macs(calibrated if name == "tp_taylor" else trained, name,
                                                     selection_budget, selection == "global", example)
                    extra["tp_ratio"] = round(tp_ratio, 4)
                elif name in IN_ROUNDS:
                    pruned = prune_in_rounds(trained, name, selection, selection_ratio, selection_budget, x_train,
                                             y_train)
                else:
                    ir = copy.deepcopy(scored[SCORED.get(name, name)])
                    labels = select(ir, selection, selection_ratio, selection_budget, example, NORMALIZE.get(name))
                    pruned = ir.prune(labels=labels).model
                rows.append({"seed": seed, "selection": selection, "ratio": ratio, "criterion": name,
                             "macs": macs(pruned, example), "budget": selection_budget, **extra,
                             **evaluate(pruned.eval(), data, seed, finetunes, finetune_lr)})
                if selection == "global" and name == WIDTHS_FROM:
                    reference = (pruned, rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--finetunes", type=int, default=FINETUNES,
                        help="fine-tuning runs (data orders) averaged into ft1")
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                        help=f"ft1's learning rate (Adam; default {FINETUNE_LR:g}; the earlier results: "
                             f"{EARLIER_FINETUNE_LR:g})")
    parser.add_argument("--budget", choices=("labels", "macs"), default="labels",
                        help="a ratio is the share of labels removed (uniform) or of MACs removed")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "criteria.json"))
    parser.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS),
                        help="run only these selections (merge the result with the rest)")
    parser.add_argument("--criteria", nargs="+", choices=OURS + THEIRS, metavar="CRITERION",
                        help="run only these criteria (merge the result with the rest)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no run: combine the rows of these JSON files (runs of other seeds or other "
                             "criteria, same settings)")
    args = parser.parse_args()
    if "tp_widths" in args.selections and ("global" not in args.selections
                                           or args.criteria and WIDTHS_FROM not in args.criteria):
        parser.error(f"tp_widths takes its widths from {WIDTHS_FROM} under global selection: run both")
    torch.set_num_threads(args.threads)
    start = time.time()
    rows = []
    if args.merge:
        try:
            (args.epochs, args.budget, args.finetunes, args.finetune_lr), args.seeds, rows = merge_parts(
                [json.load(open(path)) for path in args.merge], EARLIER_FINETUNE_LR)
        except ValueError as error:
            parser.error(f"--merge: {error}")
    for seed in [] if args.merge else args.seeds:
        rows.extend(run(seed, args.epochs, args.budget, args.finetunes, tuple(args.selections),
                        tuple(args.criteria) if args.criteria else None, args.finetune_lr))
        print(f"seed {seed} done [{time.time() - start:.0f} s]", flush=True)
    order = ("unpruned",) + OURS + THEIRS
    table, comparisons = summarize(rows, order, SELECTIONS), compare(rows, order, SELECTIONS)
    print(f"digits, DigitsResNet, seeds {args.seeds}: mean test accuracy (%), MACs kept; ft1 at lr "
          f"{args.finetune_lr:g}  [{time.time() - start:.0f} s]")
    report(table, comparisons)
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "epochs": args.epochs, "budget": args.budget, "finetunes": args.finetunes,
                       "finetune_lr": args.finetune_lr, "table": table, "rows": rows,
                       "comparisons": comparisons}, f, indent=1)


if __name__ == "__main__":
    main()
