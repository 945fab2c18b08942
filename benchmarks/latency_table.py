"""Measured-latency budgets from a latency table: KnapsackLabelSelector with ``TableLatency``
(a multiple-choice knapsack over per-group op timings) against the linearized knapsack that
measures pruned copies, and Torch-Pruning at equal MACs.

1. ``table``: the ResNet-50-style and MobileNetV2-style zoo models (magnitude scores, widths in
   multiples of 8), batch 1 at 224 px and batch 32 at 64 px, 1 and 2 threads, budgets 0.5 and 0.3
   of the measured latency: achieved/target (re-measured independently: median of 3 minima of
   10 runs), selection time (table included), real-model latency calls, ops timed.
2. ``linear``: the linearized knapsack (``bind(measure_latency, ...)``) on the same budget at
   batch 1, 1 thread, 0.5, under a time limit.
3. ``tp``: Torch-Pruning's uniform magnitude pruning at the MACs of each 1-thread table model,
   both measured in rotation (fastest of ``ROUNDS``).
4. ``digits``: on the digits CNN (LossAwareCriterion scores), a latency-budget model (0.5 of the
   measured latency at batch 256) against a MACs-budget model whose MACs share is bisected to the
   same measured latency: accuracy after batch-norm re-estimation and one fine-tuning epoch.

A plot of latency against MACs goes to ``results/latency_table.png``.

    python benchmarks/latency_table.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from harness import RESULTS
from harness.digits import digits_data, evaluate, score_loss_aware, trained_digits
from harness.machine import environment, short_error, time_limit
from harness.rival import tp_at_most
from pruning_ir import ChannelConstraint, PruningIR, TableLatency
from pruning_ir.criteria import MagnitudeCriterion
from pruning_ir.latency import bind, macs, measure_latency
from pruning_ir.selectors import KnapsackLabelSelector
from zoo import ZOO  # tests/zoo.py, on sys.path through harness

MODELS = {"resnet50": "ResNet-50-style", "mobilenet_v2": "MobileNetV2-style"}
INPUTS = {1: 224, 32: 64}          # batch -> image size
THREADS = (1, 2)
SHARES = (0.5, 0.3)
TOLERANCE = 0.05                   # the selector stops in [0.95, 1.0] x target
ROUNDS = 5
LINEAR_LIMIT_S = 180


def zoo_ir(name: str) -> PruningIR:
    entry = ZOO[name]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    MagnitudeCriterion(ir).apply()
    return ir


def image(batch: int) -> torch.Tensor:
    size = INPUTS[batch]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def remeasure(model: torch.nn.Module, x: torch.Tensor, threads: int) -> float:
    return statistics.median(measure_latency(model, x, warmup=3, repeats=10, statistic="min", threads=threads)
                             for _ in range(3))


def rotated_share(original: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, threads: int) -> float:
    """pruned / original latency, both measured in rotation (fastest of ``ROUNDS`` each): load
    that comes and goes hits both alike."""
    best: dict = {}
    for round_ in range(ROUNDS):
        for key, model in (("original", original), ("pruned", pruned))[::1 if round_ % 2 == 0 else -1]:
            seconds = measure_latency(model, x, warmup=2, repeats=5, statistic="min", threads=threads)
            best[key] = min(best.get(key, seconds), seconds)
    return best["pruned"] / best["original"]


def select(ir: PruningIR, selector: KnapsackLabelSelector, x: torch.Tensor, threads: int,
           share: float) -> tuple[dict, torch.nn.Module]:
    start = time.perf_counter()
    labels = selector.select(ir)
    seconds = time.perf_counter() - start
    pruned = ir.prune(labels=labels).model
    achieved = remeasure(pruned, x, threads)
    rotated = rotated_share(ir.model, pruned, x, threads) / share
    table = selector.latency_table
    return {"achieved": achieved, "achieved_over_target": achieved / selector.target_latency,
            "rotated_over_target": rotated,
            "seen_by_selector_over_target": selector.latency / selector.target_latency, "selection_s": seconds,
            "latency_calls": selector.latency_calls, "iterations": len(selector.history),
            "ops_timed": table.measurements if table is not None else None,
            "macs": macs(pruned, x[:1]), "labels_removed": len(labels)}, pruned


def table_rows(models: dict, batches: tuple, threads_list: tuple, shares: tuple, pruned: dict) -> list[dict]:
    rows = []
    for name, title in models.items():
        for batch in batches:
            x = image(batch)
            for threads in threads_list:
                ir = zoo_ir(name)
                original = remeasure(ir.model, x, threads)
                for share in shares:
                    ir = zoo_ir(name)    # fresh: nothing measured before is reused (the table neither)
                    function = TableLatency(x, threads=threads, warmup=3, repeats=10, op_warmup=2, op_repeats=5)
                    selector = KnapsackLabelSelector(share * original, function, constraint=ChannelConstraint(step=8),
                                                     tolerance=TOLERANCE, verbose=False)
                    row = {"model": title, "batch": batch, "image": INPUTS[batch], "threads": threads, "share": share,
                           "original": original, "target": share * original, "original_macs": macs(ir.model, x[:1])}
                    try:
                        result, model = select(ir, selector, x, threads, share)
                        row.update(result)
                        pruned[(name, batch, threads, share)] = model
                        print(f"{title:<18} b{batch:<3} t{threads} {share:.1f} achieved/target "
                              f"{row['achieved_over_target']:.3f} (rotated {row['rotated_over_target']:.3f}, selector "
                              f"{row['seen_by_selector_over_target']:.3f}) "
                              f"time {row['selection_s']:5.1f} s calls {row['latency_calls']:3d} ops "
                              f"{row['ops_timed']}", flush=True)
                    except ValueError as error:
                        row["unreachable"] = str(error)
                        print(f"{title:<18} b{batch:<3} t{threads} {share:.1f} {error}", flush=True)
                    rows.append(row)
    return rows


def linear_rows(models: dict) -> list[dict]:
    """The linearized knapsack measuring pruned copies, batch 1, 1 thread, budget 0.5."""
    rows = []
    x = image(1)
    for name, title in models.items():
        ir = zoo_ir(name)
        original = remeasure(ir.model, x, 1)
        function = bind(measure_latency, x, warmup=3, repeats=10, statistic="min", threads=1)
        selector = KnapsackLabelSelector(0.5 * original, function, constraint=ChannelConstraint(step=8),
                                         tolerance=TOLERANCE, verbose=False)
        row = {"model": title, "batch": 1, "image": INPUTS[1], "threads": 1, "share": 0.5, "original": original,
               "target": 0.5 * original, "method": "linearized knapsack"}
        try:
            with time_limit(LINEAR_LIMIT_S):
                result, _ = select(ir, selector, x, 1, 0.5)
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
        original = ZOO[name].build().eval()
        budget = macs(model, x[:1])
        rival = tp_at_most(original, (x[:1],), budget)
        best = {}
        for round_ in range(ROUNDS):
            for key, candidate in (("table", model), ("tp", rival))[::1 if round_ % 2 == 0 else -1]:
                seconds = measure_latency(candidate, x, warmup=2, repeats=5, statistic="min", threads=1)
                best[key] = min(best.get(key, seconds), seconds)
        rows.append({"model": MODELS[name], "batch": batch, "threads": 1, "share": share,
                     "table_macs": budget, "tp_macs": macs(rival, x[:1]), "table_latency": best["table"],
                     "tp_latency": best["tp"], "tp_over_table": best["tp"] / best["table"]})
        print(f"tp {MODELS[name]:<18} b{batch} {share:.1f} table {best['table'] * 1e3:.2f} ms, Torch-Pruning at equal "
              f"MACs {best['tp'] * 1e3:.2f} ms", flush=True)
    return rows


def digits_rows(seed: int = 0, share: float = 0.5) -> dict:
    """Latency budget vs a MACs budget bisected to the same measured latency, on digits."""
    trained = trained_digits(seed)
    data = digits_data(seed)
    x = trained.x_train[:256]
    ir = PruningIR(trained.model).infer_labels(x[:8])
    score_loss_aware(ir, trained.x_train, trained.y_train)
    function = TableLatency(x, threads=1, warmup=3, repeats=20)
    original = remeasure(ir.model, x, 1)
    selector = KnapsackLabelSelector(share * original, function, tolerance=TOLERANCE, verbose=False)
    latency_model = ir.prune(labels=selector.select(ir)).model
    latency_achieved = remeasure(latency_model, x, 1)
    count = bind(macs, x[:1])
    low, high, macs_model = 0.05, 1.0, None
    for _ in range(6):   # the MACs share whose model measures the latency model's latency
        middle = (low + high) / 2
        model = ir.prune(labels=KnapsackLabelSelector(middle * count(ir.model), count, verbose=False,
                                                      tolerance=0.01).select(ir)).model
        if remeasure(model, x, 1) <= latency_achieved:
            low, macs_model = middle, model
        else:
            high = middle
    macs_model = macs_model or model
    result = {"seed": seed, "share": share, "original_latency": original, "original_macs": count(ir.model),
              "original_accuracy": trained.test_accuracy}
    for key, model in (("latency_budget", latency_model), ("macs_budget", macs_model)):
        result[key] = {"latency": remeasure(model, x, 1), "macs": count(model),
                       **evaluate(model, data, seed, finetunes=3, lr=1e-3)}
        print(f"digits {key:<15} latency {result[key]['latency'] * 1e3:.3f} ms MACs {result[key]['macs']:.0f} "
              f"acc bn {result[key]['bn']:.4f} ft1 {result[key]['ft1']:.4f}", flush=True)
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


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["## 4b. Latency budget from a latency table (issue 25)", "",
             f"`python benchmarks/latency_table.py` on {env['cpu']} ({env['cores']} cores), load average "
             f"{', '.join(f'{v:.2f}' for v in result['load_before'])} before and "
             f"{', '.join(f'{v:.2f}' for v in result['load_after'])} after (other jobs shared the cores), "
             f"torch {env['torch']}, {result['seconds'] / 60:.0f} min. Zoo models, magnitude scores, widths in "
             "multiples of 8; `KnapsackLabelSelector(target, TableLatency(x, threads=t), tolerance=0.05)`. "
             "Achieved = median of 3 independent re-measurements (fastest of 10 runs each) over the target; rotated = "
             "pruned/unpruned latency measured in rotation (fastest of 5 each), over the budget share, which "
             "cancels load that changed since the target was set.", "",
             "| model | batch (px) | threads | budget | achieved/target | rotated | seen by selector | selection s | "
             "real-model calls | ops timed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        head = f"| {r['model']} | {r['batch']} ({r['image']}) | {r['threads']} | {r['share']} |"
        if "unreachable" in r:
            lines.append(f"{head} unreachable: {r['unreachable'].split(';')[0].split('(')[0].strip()} | | | | | |")
        else:
            lines.append(f"{head} {r['achieved_over_target']:.3f} | {r['rotated_over_target']:.3f} | "
                         f"{r['seen_by_selector_over_target']:.3f} | "
                         f"{r['selection_s']:.1f} | {r['latency_calls']} | {r['ops_timed']} |")
    lines += ["", "Linearized knapsack (measures pruned copies), batch 1, 1 thread, budget 0.5:", "",
              "| model | achieved/target | rotated | selection s | real-model calls |", "|---|---|---|---|---|"]
    for r in result["linear"]:
        lines.append(f"| {r['model']} | " + (f"{r['error']} | | | |" if "error" in r else
                     f"{r['achieved_over_target']:.3f} | {r['rotated_over_target']:.3f} | {r['selection_s']:.1f} | "
                     f"{r['latency_calls']} |"))
    lines += ["", "Torch-Pruning (uniform magnitude) at the table model's MACs, 1 thread (fastest of "
              f"{ROUNDS} rotations):", "", "| model | batch | budget | MACs table / TP (M) | latency table / TP (ms) |",
              "|---|---|---|---|---|"]
    for r in result["tp"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['share']} | {r['table_macs'] / 1e6:.1f} / "
                     f"{r['tp_macs'] / 1e6:.1f} | {r['table_latency'] * 1e3:.2f} / {r['tp_latency'] * 1e3:.2f} |")
    d = result.get("digits")
    if d:
        lines += ["", f"Digits CNN (seed {d['seed']}, batch 256, 1 thread): latency budget {d['share']} vs a MACs "
                  "budget bisected to the same measured latency; accuracy after batch-norm re-estimation (bn) and "
                  f"one fine-tuning epoch (ft1, mean of 3); unpruned {d['original_accuracy']:.4f}.", "",
                  "| budget | latency (ms) | MACs | bn | ft1 |", "|---|---|---|---|---|"]
        for key in ("latency_budget", "macs_budget"):
            r = d[key]
            lines.append(f"| {key.replace('_', ' ')} | {r['latency'] * 1e3:.3f} | {r['macs']:.0f} | {r['bn']:.4f} | "
                         f"{r['ft1']:.4f} |")
    lines += ["", "Plot: `results/latency_table.png` (latency against MACs, table models and Torch-Pruning). "
              "Ops the table cannot isolate (activations, additions, pooling) are not in it: the measured/predicted "
              "correction absorbs them.", ""]
    return "\n".join(lines)


def append_section(text: str, path: str) -> None:
    """Replace (or add) this section of RESULTS.md: a hand-written section that run.py carries over."""
    heading = text.splitlines()[0]
    old = open(path).read().rstrip("\n").splitlines() if os.path.exists(path) else []
    kept, skip = [], False
    for line in old:
        if line.startswith("## "):
            skip = line == heading
        if not skip:
            kept.append(line)
    with open(path, "w") as file:
        file.write("\n".join(kept).rstrip("\n") + "\n\n" + text)


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    torch.set_num_threads(1)   # pruning and verification single-threaded: a loaded machine slows threads most
    start, load_before = time.perf_counter(), list(os.getloadavg())
    models = {"resnet50": MODELS["resnet50"]} if quick else MODELS
    pruned: dict = {}
    result = {"environment": environment(), "load_before": load_before,
              "settings": {"inputs": INPUTS, "threads": THREADS, "shares": SHARES, "tolerance": TOLERANCE}}
    result["table"] = table_rows(models, (1,) if quick else tuple(INPUTS), (1,) if quick else THREADS,
                                 (0.5,) if quick else SHARES, pruned)
    result["linear"] = [] if quick else linear_rows(models)
    result["tp"] = tp_rows(pruned)
    result["digits"] = None if quick else digits_rows()
    result["load_after"], result["seconds"] = list(os.getloadavg()), time.perf_counter() - start
    suffix = "_quick" if quick else ""
    with open(os.path.join(RESULTS, f"latency_table{suffix}.json"), "w") as file:
        json.dump(result, file, indent=1, default=str)
    plot(result["table"], result["tp"], os.path.join(RESULTS, f"latency_table{suffix}.png"))
    if not quick:
        append_section(markdown(result), os.path.join(os.path.dirname(RESULTS), "RESULTS.md"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
