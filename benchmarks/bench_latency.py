"""Latency budget: does Knapsack land on its target, and is the speed-up real?

1. ``targets``: ``knapsack.target_rows`` on the ResNet-50-style and MobileNetV2-style zoo
   models (magnitude scores): MACs targets of 0.7/0.5/0.3 and measured CPU latency targets of
   0.7/0.5 of the original, achieved/target re-measured independently, beside the binary-search baseline.
2. ``speedup``: for each MACs target, the Knapsack (MACs) model, pruning_ir Uniform and
   Torch-Pruning's uniform MetaPruner (magnitude) at the largest ratio whose MACs do not
   exceed Knapsack's, and the Knapsack (CPU latency) model where one was reached: measured
   CPU speed-up (original latency / pruned latency) against the MACs reduction (original
   MACs / pruned MACs). All models of one row are measured in rotation, ``ROUNDS`` times,
   keeping each one's fastest time (noise on a shared machine only adds time): batches of 8
   96x96 images, one thread.
"""

from __future__ import annotations

import copy

import torch

from bench_common import THREADS, tp_prune
from knapsack import MODELS, TARGETS, cost_function, target_rows, uniform_at_most, zoo_ir
from pruning_ir.latency import bind, macs, measure_latency

ROUNDS = 7
CPU_REPEATS = 10   # timed runs per CPU latency measurement inside the selector
CPU_SHARES = (0.7, 0.5)   # CPU latency targets (0.3 is below the smallest reachable MobileNetV2-style model)


def tp_at_most(model: torch.nn.Module, inputs: tuple, budget: float, steps: int = 12) -> torch.nn.Module:
    """Torch-Pruning's uniform magnitude pruning at the largest ratio (bisected) whose MACs
    do not exceed ``budget``."""
    low, high, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (low + high) / 2
        pruned = tp_prune(copy.deepcopy(model), inputs, "magnitude", ratio)
        if macs(pruned, *inputs) <= budget:
            high, best = ratio, pruned
        else:
            low = ratio
    return best if best is not None else tp_prune(copy.deepcopy(model), inputs, "magnitude", high)


def fastest(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Each model's fastest latency over ``rounds`` rotations through all of them."""
    names, best = list(models), {}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds = measure_latency(models[name], x, warmup=2, repeats=5, statistic="min")
            best[name] = min(best.get(name, seconds), seconds)
    return best


def speedup_rows(pruned: dict, models: dict[str, str], shares: tuple[float, ...], rounds: int) -> list[dict]:
    rows = []
    for name, title in models.items():
        ir, example = zoo_ir(name)
        count = bind(macs, example[:1])
        x = cost_function("cpu", example, 1).inputs[0]
        for share in shares:
            knapsack = pruned.get((name, "macs", share, "knapsack"))
            if knapsack is None:
                continue
            budget = count(knapsack)
            candidates = {"original": ir.model, "knapsack_macs": knapsack,
                          "uniform": ir.prune(labels=uniform_at_most(ir, count, budget)).model,
                          "tp_uniform": tp_at_most(ir.model, (example[:1],), budget)}
            if (name, "cpu", share, "knapsack") in pruned:
                candidates["knapsack_cpu"] = pruned[(name, "cpu", share, "knapsack")]
            latency = fastest(candidates, x, rounds)
            base_macs, base_latency = count(ir.model), latency["original"]
            for method, model in candidates.items():
                if method == "original":
                    continue
                reduction, speedup = base_macs / count(model), base_latency / latency[method]
                rows.append({"model": title, "share": share, "method": method, "macs_over_original": 1 / reduction,
                             "macs_reduction": reduction, "latency_s": latency[method],
                             "original_latency_s": base_latency, "speedup": speedup,
                             "speedup_over_macs_reduction": speedup / reduction})
                print(f"  speed-up {title:<18} {share:.1f} {method:<14} MACs x{reduction:5.2f}  "
                      f"CPU x{speedup:5.2f}", flush=True)
    return rows


def run(quick: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    models = {"mobilenet_v2": MODELS["mobilenet_v2"]} if quick else MODELS
    shares = (0.5,) if quick else TARGETS
    pruned: dict = {}
    targets, noise = target_rows(("macs",), CPU_REPEATS, models, shares, pruned)
    if not quick:   # CPU targets are the slow part (hundreds of latency measurements each)
        more, noise = target_rows(("cpu",), CPU_REPEATS, models, CPU_SHARES, pruned)
        targets += more
    speedup = speedup_rows(pruned, models, shares, 2 if quick else ROUNDS)
    return {"settings": {"shares": shares, "cpu_shares": None if quick else CPU_SHARES, "cpu_repeats": CPU_REPEATS,
                         "rounds": ROUNDS,
                         "cpu_input": "8x3x96x96", "torch_threads": THREADS},
            "targets": targets, "cpu_noise": noise, "speedup": speedup}
