"""Measured-latency budgets from a latency table: KnapsackLabelSelector with ``TableLatency``
(a multiple-choice knapsack over per-group op timings) against the linearized knapsack that
measures pruned copies, and Torch-Pruning at equal MACs.

0. ``floor``: why a budget can be unreachable: the smallest reachable model (every group at its
   narrowest multiple of 8) over the unpruned one, measured in rotation, for the zoo's small
   widths, at half and at the real architectures' widths.
1. ``table``: MobileNetV2 at its real widths and ResNet-50 at half of them (the zoo's block
   structure; magnitude scores, widths in multiples of 8), batch 1 at 224 px and batch 32 at 64 px,
   1 and 2 threads, budgets 0.5 and 0.3 of the measured latency. The selection is then checked on
   the real model and settled in the band (``settle_in_band``). Reported: the pruned/unpruned
   latency measured in rotation over the budget share (``compare_latency``: load that drifts
   cancels), achieved/target (re-measured alone: median of 3 minima of 10 runs), selection time
   (table and checks included), real-model latency calls, ops timed.
2. ``linear``: the linearized knapsack (``bind(measure_latency, ...)``) on the same budget at
   batch 1, 1 thread, 0.5, under a time limit.
3. ``tp``: Torch-Pruning's uniform magnitude pruning at the MACs of each 1-thread table model,
   both measured in rotation (fastest of ``ROUNDS``).
4. ``accuracy``: on digits and shapes (the one-call benchmark's tasks), seeds 0-2, a latency-budget
   model (0.5 of the measured latency at batch 256) against a MACs-budget model whose MACs share is
   bisected to the same measured latency: accuracy right after pruning, after batch-norm
   re-estimation and after one fine-tuning epoch.

A plot of latency against MACs goes to ``results/latency_table.png``.

    python benchmarks/latency_table.py [--quick] [--check-fastest] [--accuracy-only]

``--accuracy-only`` reruns stage 4 alone into the existing JSON and renders the section again.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time

import torch

from harness import RESULTS
from harness.digits import accuracy, calibration
from harness.latency_report import markdown
from harness.machine import environment, short_error, time_limit
from harness.rival import tp_at_most
from harness.tables import write_section
from pruning_ir import ChannelConstraint, PruningIR, TableLatency
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion
from pruning_ir.latency import bind, compare_latency, macs, measure_latency
from pruning_ir.selectors import KnapsackLabelSelector
from pruning_ir.selectors.band import counts_of, settle_in_band
from pruning_ir.selectors.oracle import LatencyOracle
from pruning_ir.selectors.plan import SelectionPlan
from one_call import evaluate, trained_task
from zoo import ZOO, Bottleneck, MobileNetV2, ResNet, seeded_build  # tests/zoo.py, on sys.path through harness

MODELS = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2"}
INPUTS = {1: 224, 32: 64}          # batch -> image size
THREADS = (1, 2)
SHARES = (0.5, 0.3)
TASKS, SEEDS = ("digits", "shapes"), (0, 1, 2)   # the accuracy stage
# Widths: the zoo builds both at a quarter of the real widths, too narrow for a 0.3 budget (the ``floor`` rows
# show why). The table rows use MobileNetV2 at its real widths (1.0, 1000 classes) and ResNet-50 at half of its
# real widths (32 stem channels; the real block structure and proportions, a quarter of the MACs) so that the
# 16 settings fit a shared 2-core machine; the floor rows measure the real ResNet-50 too.
WIDTHS = {"resnet50": {"zoo (1/4)": ZOO["resnet50"].build,
                       "1/2": seeded_build(lambda: ResNet(Bottleneck, (3, 4, 6, 3), base_width=32, num_classes=1000)),
                       "real": seeded_build(lambda: ResNet(Bottleneck, (3, 4, 6, 3), base_width=64, num_classes=1000))},
          "mobilenet_v2": {"zoo (1/4)": ZOO["mobilenet_v2"].build,
                           "real": seeded_build(lambda: MobileNetV2(width_mult=1.0, num_classes=1000))}}
BENCHMARKED = {"resnet50": "1/2", "mobilenet_v2": "real"}
TOLERANCE = 0.05                   # the selector stops in [0.95, 1.0] x target
ROUNDS = 5
LINEAR_LIMIT_S = 120
STEP = 8
MAX_ITERATIONS = 8                 # loop iterations before the check settles the selection
VERBOSE = "--verbose" in sys.argv   # print every check
CHECK_STATISTIC = "fastest" if "--check-fastest" in sys.argv else "median"   # settle_in_band(statistic=)


def model_ir(name: str, width: str | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> PruningIR:
    """``name`` at ``width`` (a key of ``WIDTHS[name]``; default: the benchmarked one) on ``device`` in
    ``dtype``, traced there and magnitude-scored."""
    build = WIDTHS[name][BENCHMARKED[name] if width is None else width]
    inputs = [x.to(device, dtype) for x in ZOO[name].example_inputs()]
    ir = PruningIR(build().to(device, dtype)).infer_labels(*inputs)
    MagnitudeCriterion(ir).apply()
    return ir


def image(batch: int, size: int | None = None) -> torch.Tensor:
    size = INPUTS[batch] if size is None else size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def remeasure(model: torch.nn.Module, x: torch.Tensor, timing: dict) -> float:
    """The model re-measured alone: median of 3 minima of 10 runs (``timing``: ``threads`` or ``device``)."""
    return statistics.median(measure_latency(model, x, warmup=3, repeats=10, statistic="min", **timing)
                             for _ in range(3))


def rotated_share(original: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, timing: dict) -> float:
    """pruned / original latency measured in rotation: load that comes and goes hits both alike."""
    fast, slow = compare_latency([pruned, original], x, rounds=ROUNDS, **timing)
    return fast / slow


def settle(ir: PruningIR, selector: KnapsackLabelSelector, labels: list, reference: float) -> tuple[list, dict]:
    """The selection checked on the real model and settled in the band: what ``KnapsackLabelSelector``
    does after its loop by default, here with the reference the target was set from, and timed apart."""
    plan = SelectionPlan(ir, selector.constraint)
    oracle = LatencyOracle(plan, selector.latency_calculation_function)
    band = settle_in_band(plan, oracle, counts_of(plan, labels), selector.target_latency, selector.tolerance,
                          table=selector.latency_table, reference=reference, verbose=VERBOSE,
                          statistic=CHECK_STATISTIC)
    return plan.labels(band.counts), {"checked_over_target": band.latency / selector.target_latency,
                                      "in_band": band.in_band, "checks": len(band.checks),
                                      "check_calls": band.latency_calls + oracle.calls,
                                      "spread": max((r.spread for r in band.checks), default=1.0)}


def select(ir: PruningIR, selector: KnapsackLabelSelector, x: torch.Tensor, timing: dict,
           share: float, check: bool = True) -> tuple[dict, torch.nn.Module]:
    """Select (and check, settle) to ``selector.target_latency`` = ``share`` x the unpruned latency;
    ``timing``: the referee's ``threads`` (CPU) or ``device``."""
    start = time.perf_counter()
    labels = selector.select(ir)
    loop_s = time.perf_counter() - start
    checked = {}
    if check:
        labels, checked = settle(ir, selector, labels, selector.target_latency / share)
    seconds = time.perf_counter() - start
    pruned = ir.prune(labels=labels).model
    achieved = remeasure(pruned, x, timing)
    rotated = rotated_share(ir.model, pruned, x, timing) / share
    rotated_again = rotated_share(ir.model, pruned, x, timing) / share   # the referee's own repeatability
    table = selector.latency_table
    return {"achieved": achieved, "achieved_over_target": achieved / selector.target_latency,
            "rotated_over_target": rotated, "rotated_again_over_target": rotated_again,
            "seen_by_selector_over_target": selector.latency / selector.target_latency, "selection_s": seconds,
            "loop_s": loop_s, "latency_calls": selector.latency_calls + checked.get("check_calls", 0),
            "iterations": len(selector.history), "ops_timed": table.measurements if table is not None else None,
            "macs": macs(pruned, x[:1]), "labels_removed": len(labels), **checked}, pruned


def floor_rows(batches: tuple) -> list[dict]:
    """The smallest reachable model over the unpruned one (in rotation, 1 thread), at every width."""
    rows = []
    for name, title in MODELS.items():
        for width in WIDTHS[name]:
            ir = model_ir(name, width)
            plan = SelectionPlan(ir, ChannelConstraint(step=STEP))
            floor = ir.prune(labels=plan.labels(plan.max_counts())).model
            for batch in batches:
                x = image(batch)
                share = rotated_share(ir.model, floor, x, {"threads": 1})
                rows.append({"model": title, "width": width, "batch": batch,
                             "floor_share": share, "macs_share": macs(floor, x[:1]) / macs(ir.model, x[:1]),
                             "original_ms": measure_latency(ir.model, x, warmup=2, repeats=5, statistic="min",
                                                            threads=1) * 1e3})
                print(f"floor {title:<12} {rows[-1]['width']:<10} b{batch:<3} smallest reachable "
                      f"{share:.3f} of the latency, {rows[-1]['macs_share']:.3f} of the MACs", flush=True)
    return rows


def table_rows(models: dict, batches: tuple, threads_list: tuple, shares: tuple, pruned: dict,
               rows: list[dict] | None = None, save=lambda: None) -> list[dict]:
    """One row per setting, 1-thread settings of every model first; ``save()`` after each row."""
    rows = [] if rows is None else rows
    for threads in threads_list:
        for name, title in models.items():
            for batch in batches:
                x = image(batch)
                for share in shares:
                    ir = model_ir(name)    # fresh: nothing measured before is reused (the table neither)
                    function = TableLatency(x, threads=threads, warmup=3, repeats=10, op_warmup=2, op_repeats=5)
                    # as a user sets a budget: the same function, just before; the fastest of 3 calls, since on a
                    # shared machine one call can read twice the time and would set a target twice too loose
                    original = min(function(ir.model) for _ in range(3))
                    selector = KnapsackLabelSelector(share * original, function, max_iterations=MAX_ITERATIONS,
                                                     constraint=ChannelConstraint(step=STEP), tolerance=TOLERANCE,
                                                     verbose=False, max_checks=0)  # checked below, timed apart
                    row = {"model": title, "batch": batch, "image": INPUTS[batch], "threads": threads, "share": share,
                           "original": original, "target": share * original, "original_macs": macs(ir.model, x[:1])}
                    try:
                        result, model = select(ir, selector, x, {"threads": threads}, share)
                        row.update(result)
                        pruned[(name, batch, threads, share)] = model
                        print(f"{title:<12} b{batch:<3} t{threads} {share:.1f} rotated {row['rotated_over_target']:.3f} "
                              f"achieved/target {row['achieved_over_target']:.3f} (loop "
                              f"{row['seen_by_selector_over_target']:.3f}, checked {row['checked_over_target']:.3f} "
                              f"after {row['checks']} checks) time {row['selection_s']:5.1f} s (loop "
                              f"{row['loop_s']:.1f}) calls {row['latency_calls']:3d} ops {row['ops_timed']}",
                              flush=True)
                    except ValueError as error:
                        row["unreachable"] = str(error)
                        print(f"{title:<18} b{batch:<3} t{threads} {share:.1f} {error}", flush=True)
                    rows.append(row)
                    save()
    return rows


def linear_rows(models: dict) -> list[dict]:
    """The linearized knapsack measuring pruned copies, batch 1, 1 thread, budget 0.5."""
    rows = []
    x = image(1)
    for name, title in models.items():
        ir = model_ir(name)
        function = bind(measure_latency, x, warmup=3, repeats=10, statistic="min", threads=1)
        original = min(function(ir.model) for _ in range(3))
        selector = KnapsackLabelSelector(0.5 * original, function, constraint=ChannelConstraint(step=STEP),
                                         tolerance=TOLERANCE, verbose=False, max_checks=0)
        row = {"model": title, "batch": 1, "image": INPUTS[1], "threads": 1, "share": 0.5, "original": original,
               "target": 0.5 * original, "method": "linearized knapsack"}
        try:
            with time_limit(LINEAR_LIMIT_S):
                result, _ = select(ir, selector, x, {"threads": 1}, 0.5, check=False)
            row.update(result)
            print(f"linear {title:<18} achieved/target {row['achieved_over_target']:.3f} time "
                  f"{row['selection_s']:.1f} s calls {row['latency_calls']}", flush=True)
        except (TimeoutError, ValueError) as error:
            row["error"] = short_error(error)
            print(f"linear {title:<18} {row['error']}", flush=True)
        rows.append(row)
    return rows


def tp_rows(pruned: dict) -> list[dict]:
    """Torch-Pruning uniform magnitude at each 1-thread table model's MACs, measured in rotation."""
    rows = []
    for (name, batch, threads, share), model in pruned.items():
        if threads != 1:
            continue
        x = image(batch)
        original = WIDTHS[name][BENCHMARKED[name]]()
        budget = macs(model, x[:1])
        rival = tp_at_most(original, (x[:1],), budget)
        best = dict(zip(("table", "tp"), compare_latency([model, rival], x, rounds=ROUNDS, threads=1)))
        rows.append({"model": MODELS[name], "batch": batch, "threads": 1, "share": share,
                     "table_macs": budget, "tp_macs": macs(rival, x[:1]), "table_latency": best["table"],
                     "tp_latency": best["tp"], "tp_over_table": best["tp"] / best["table"]})
        print(f"tp {MODELS[name]:<18} b{batch} {share:.1f} table {best['table'] * 1e3:.2f} ms, Torch-Pruning at equal "
              f"MACs {best['tp'] * 1e3:.2f} ms", flush=True)
    return rows


def accuracy_rows(task: str, seed: int, share: float = 0.5) -> dict:
    """On ``task`` (the one-call benchmark's digits or shapes, LossAwareCriterion scores and the four
    steps' default refit): a latency-budget model (``share`` of the measured latency at batch 256)
    against a MACs-budget model whose MACs share is bisected to the same latency, measured in rotation."""
    model, x_train, y_train, x_test, y_test = trained_task(task, seed)
    x = x_train[:256]
    ir = PruningIR(copy.deepcopy(model).eval()).infer_labels(x[:8])
    with LossAwareCriterion(ir) as collector:
        calibration(x_train, y_train)(collector)
    ir.model.zero_grad(set_to_none=True)
    function = TableLatency(x, threads=1, warmup=3, repeats=20)
    original = min(function(ir.model) for _ in range(3))
    selector = KnapsackLabelSelector(share * original, function, tolerance=TOLERANCE, verbose=False, max_checks=0,
                                     constraint=ChannelConstraint(step=STEP))
    latency_model = ir.prune(labels=settle(ir, selector, selector.select(ir), original)[0]).model
    count = bind(macs, x[:1])
    low, high, macs_model = 0.02, 1.0, None
    for _ in range(7):   # the largest MACs share whose model measures no slower than the latency model
        middle = (low + high) / 2
        labels = KnapsackLabelSelector(middle * count(ir.model), count, verbose=False, tolerance=0.01,
                                       constraint=ChannelConstraint(step=STEP)).select(ir)
        candidate = ir.prune(labels=labels).model
        candidate_s, latency_s = compare_latency([candidate, latency_model], x, rounds=3, threads=1)
        if candidate_s <= latency_s:
            low, macs_model = middle, candidate
        else:
            high = middle
    macs_model = macs_model or candidate
    seconds = dict(zip(("latency_budget", "macs_budget", "unpruned"),
                       compare_latency([latency_model, macs_model, ir.model], x, rounds=ROUNDS, threads=1)))
    result = {"task": task, "seed": seed, "share": share, "unpruned_accuracy": accuracy(model, x_test, y_test)}
    for key, pruned in (("latency_budget", latency_model), ("macs_budget", macs_model)):
        result[key] = {"latency_share": seconds[key] / seconds["unpruned"],
                       **evaluate(pruned, model, x_train, y_train, x_test, y_test, seed)}
        print(f"{task} seed {seed} {key:<15} latency {result[key]['latency_share']:.3f} MACs "
              f"{result[key]['macs_kept']:.3f} accuracy pruned {result[key]['pruned']:.4f} bn {result[key]['bn']:.4f} "
              f"ft1 {result[key]['ft1']:.4f}", flush=True)
    return result


def plot(rows: list[dict], tp: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, batch in zip(axes, sorted(INPUTS)):
        for title, marker in zip(MODELS.values(), "os"):
            for kind, color in (("table", "tab:blue"), ("tp", "tab:orange")):
                points = [(r[f"{kind}_macs"] / 1e6, r[f"{kind}_latency"] * 1e3) for r in tp
                          if r["model"] == title and r["batch"] == batch]
                originals = [(r["original_macs"] / 1e6, r["original"] * 1e3) for r in rows
                             if r["model"] == title and r["batch"] == batch and r["threads"] == 1][:1]
                if points:
                    axis.scatter(*zip(*points), marker=marker, color=color,
                                 label=f"{title}, {'latency table' if kind == 'table' else 'TP, equal MACs'}")
                if originals and kind == "table":
                    axis.scatter(*zip(*originals), marker=marker, color="black")
        axis.set_xlabel("MACs per image (M)")
        axis.set_ylabel(f"CPU latency, batch {batch}, 1 thread (ms)")
        axis.set_title(f"batch {batch} ({INPUTS[batch]} px); black: unpruned")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    if "--check-fastest" in argv:
        return check_statistic_run()
    if "--accuracy-only" in argv:
        return accuracy_run()
    torch.set_num_threads(1)   # pruning and verification single-threaded: a loaded machine slows threads most
    start, load_before = time.perf_counter(), list(os.getloadavg())
    models = {"resnet50": MODELS["resnet50"]} if quick else MODELS
    pruned: dict = {}
    result = {"environment": environment(), "load_before": load_before,
              "settings": {"inputs": INPUTS, "threads": THREADS, "shares": SHARES, "tolerance": TOLERANCE,
                           "step": STEP, "rounds": ROUNDS}}
    suffix = "_quick" if quick else ""

    def save() -> None:   # after every stage and table row: a run cut short keeps what it measured
        result["load_after"], result["seconds"] = list(os.getloadavg()), time.perf_counter() - start
        with open(os.path.join(RESULTS, f"latency_table{suffix}.json"), "w") as file:
            json.dump(result, file, indent=1, default=str)

    result["floor"] = floor_rows((1,) if quick else tuple(INPUTS))
    result["table"], result["tp"], result["linear"], result["accuracy"] = [], [], [], []
    save()
    table_rows(models, (1,) if quick else tuple(INPUTS), (1,) if quick else THREADS, (0.5,) if quick else SHARES,
               pruned, result["table"], save)
    result["tp"] = tp_rows(pruned)
    save()
    result["linear"] = [] if quick else linear_rows(models)
    save()
    for task in () if quick else TASKS:
        result["accuracy"] += [accuracy_rows(task, seed) for seed in SEEDS]
        save()
    plot(result["table"], result["tp"], os.path.join(RESULTS, f"latency_table{suffix}.png"))
    if not quick:
        write_section(markdown(result).splitlines(), os.path.join(os.path.dirname(RESULTS), "RESULTS.md"))
    print(markdown(result))
    return 0


def accuracy_run() -> int:
    """Stage 4 alone, into the existing JSON (the other stages' numbers kept), and the section rendered again."""
    torch.set_num_threads(1)
    path = os.path.join(RESULTS, "latency_table.json")
    result = json.load(open(path))
    result.pop("digits", None)
    result["settings"].update(step=STEP, rounds=ROUNDS)
    result["accuracy"] = [accuracy_rows(task, seed) for task in TASKS for seed in SEEDS]
    result["accuracy_load"] = list(os.getloadavg())
    json.dump(result, open(path, "w"), indent=1, default=str)
    write_section(markdown(result).splitlines(), os.path.join(os.path.dirname(RESULTS), "RESULTS.md"))
    return 0


def check_statistic_run() -> int:
    """The table stage with checks read by their fastest pairs, counted against the default run's JSON."""
    torch.set_num_threads(1)
    result = {"environment": environment(), "load_before": list(os.getloadavg()), "check_statistic": CHECK_STATISTIC,
              "table": table_rows(MODELS, tuple(INPUTS), THREADS, SHARES, {}), "load_after": list(os.getloadavg())}
    json.dump(result, open(os.path.join(RESULTS, "latency_table_fastest.json"), "w"), indent=1, default=str)
    for name, path in (("median", "latency_table.json"), ("fastest", "latency_table_fastest.json")):
        rows = [r for r in json.load(open(os.path.join(RESULTS, path)))["table"] if "rotated_over_target" in r]
        print(f"check statistic {name}: rotated within [0.95, 1.02] in "
              f"{sum(0.95 <= r['rotated_over_target'] <= 1.02 for r in rows)} of {len(rows)}; selection s "
              f"{min(r['selection_s'] for r in rows):.1f}-{max(r['selection_s'] for r in rows):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
