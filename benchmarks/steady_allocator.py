"""CPU timings with glibc's adaptive allocator against ``steady_allocator`` (``measure_latency``'s
default), each in a fresh process: the same ops and models timed again and again, in an order
that changes what the allocator saw freed before each one, as a selector's table and checks do.

Reported per case: the fastest and slowest of the repeated timings (each the fastest of
``REPEATS`` runs) and their ratio, for ``measure_latency(steady=False)`` in a process left as it
starts and ``measure_latency()`` (steady). Cases: 1x1 and depthwise convolutions at batch 256 on
16x16 (the shapes task's expand and depthwise layers at several widths) and the ResNet-50-style
model at half widths, batch 32 on 64 px, unpruned and with 45% of every group removed.

    python benchmarks/steady_allocator.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import numpy as np
import torch
from torch import nn

from harness import RESULTS
from harness.machine import environment, run_worker, worker_main
from harness.tables import write_section
from pruning_ir import ChannelConstraint, PruningIR
from pruning_ir.criteria import MagnitudeCriterion
from pruning_ir.latency import measure_latency
from pruning_ir.selectors.plan import SelectionPlan
from zoo import ZOO, Bottleneck, ResNet  # tests/zoo.py, on sys.path through harness

PASSES, REPEATS = 8, 5
WIDTHS = (48, 56, 64)


def cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    found = {}
    for width in WIDTHS:
        found[f"1x1 conv 16->{width}"] = (nn.Conv2d(16, width, 1, bias=False), torch.randn(256, 16, 16, 16))
        found[f"depthwise conv {width}"] = (nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                                            torch.randn(256, width, 16, 16))
    ir = PruningIR(ResNet(Bottleneck, (3, 4, 6, 3), base_width=32, num_classes=1000))
    ir.infer_labels(*ZOO["resnet50"].example_inputs())
    MagnitudeCriterion(ir).apply()
    plan = SelectionPlan(ir, ChannelConstraint(step=8))
    base = plan.base_counts()
    counts = plan.repair((base + 0.45 * (plan.max_counts() - base)).astype(np.int64))
    x = torch.randn(32, 3, 64, 64)
    found["ResNet-50 (1/2), unpruned"] = (ir.model, x)
    found["ResNet-50 (1/2), 45% removed"] = (ir.prune(labels=plan.labels(counts), reconstruct=None).model, x)
    return found


def worker(mode: str) -> dict:
    """Every case timed ``PASSES`` times, round-robin; milliseconds per case."""
    torch.set_num_threads(1)
    found = cases()
    times: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(PASSES):
        for name, (module, x) in found.items():
            times[name].append(1e3 * measure_latency(module, x, warmup=2, repeats=REPEATS, statistic="min",
                                                     steady=mode == "steady"))
    return times


def markdown(result: dict) -> list[str]:
    lines = ["## 4c. CPU timings: glibc's adaptive allocator against a steady heap", "",
             f"`python benchmarks/steady_allocator.py` on {result['environment']['cpu']}, 1 thread, torch "
             f"{result['environment']['torch']}. Each case timed {PASSES} times round-robin in a fresh process (each "
             f"timing the fastest of {REPEATS} runs): `measure_latency(steady=False)` with the allocator as the "
             "process starts, and `measure_latency()` (steady, the default). Fastest / slowest timing, ms, and "
             "their ratio.", "",
             "| case | adaptive: fastest / slowest | ratio | steady: fastest / slowest | ratio |",
             "|---|---|---|---|---|"]
    adaptive, steady = result["adaptive"], result["steady"]
    for name in adaptive:
        a, s = adaptive[name], steady[name]
        lines.append(f"| {name} | {min(a):.2f} / {max(a):.2f} | {max(a) / min(a):.2f} | {min(s):.2f} / {max(s):.2f} | "
                     f"{max(s) / min(s):.2f} |")
    share = {mode: min(result[mode]["ResNet-50 (1/2), 45% removed"]) / min(result[mode]["ResNet-50 (1/2), unpruned"])
             for mode in ("adaptive", "steady")}
    spread = {mode: max(max(v) / min(v) for v in result[mode].values()) for mode in ("adaptive", "steady")}
    slower = max(statistics.median(adaptive[name]) / statistics.median(steady[name]) for name in adaptive)
    lines += ["", f"Slowest over fastest timing of one case: up to {spread['adaptive']:.2f} adaptive, "
              f"{spread['steady']:.2f} steady; a case's median adaptive timing is up to {slower:.1f}x its steady one. "
              f"The pruned ResNet-50 over the unpruned one (fastest timings): {share['adaptive']:.3f} adaptive, "
              f"{share['steady']:.3f} steady. Which buffers the adaptive allocator maps afresh depends on what the "
              "process freed before, so it changes from run to run.", ""]
    return lines


def main() -> int:
    result = {"environment": environment()}
    for mode in ("adaptive", "steady"):
        result[mode] = run_worker("steady_allocator", [mode], timeout=600)
        if "error" in result[mode]:
            print(f"{mode}: {result[mode]['error']}", file=sys.stderr)
            return 1
    with open(os.path.join(RESULTS, "steady_allocator.json"), "w") as file:
        json.dump(result, file, indent=1)
    lines = markdown(result)
    write_section(lines, os.path.join(os.path.dirname(RESULTS), "RESULTS.md"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if not worker_main(worker):
        sys.exit(main())
