"""Measured-latency budgets on a GPU: ``latency_table.py``'s table stage on CUDA in half precision.

ResNet-50 and MobileNetV2 at their real widths, float16 and bfloat16, batch 1 and 64 at 224 px,
budgets 0.5 and 0.3 of the measured latency: ``KnapsackLabelSelector`` with a ``TableLatency`` on
the device (CUDA events after a synchronisation), checked on the real model and settled in the
band, then judged by the pruned/unpruned latency measured in rotation, twice (the referee against
itself). Before the settings, each model's floor: the smallest reachable model over the unpruned
one (a GPU at batch 1 is bound by kernel launches, so its floor lies far above the MACs floor).
Torch-Pruning at equal MACs where it is installed. Every row is saved as it is measured, so a run
cut short by ``--budget-s`` keeps what it has.

    python benchmarks/latency_gpu.py [--device cuda] [--quick] [--budget-s 420]

Writes ``results/latency_gpu.json`` and RESULTS.md section 4d (``--quick``: ``latency_gpu_quick.json``
only). ``--device cpu --quick`` runs the same code on the CPU in bfloat16: a check without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from harness import RESULTS
from harness.latency_report import gpu_markdown
from harness.machine import environment, short_error
from harness.tables import write_section
from latency_table import MODELS, ROUNDS, STEP, TOLERANCE, WIDTHS, image, model_ir, select
from pruning_ir import ChannelConstraint, TableLatency
from pruning_ir.latency import compare_latency, macs
from pruning_ir.selectors import KnapsackLabelSelector
from pruning_ir.selectors.plan import SelectionPlan

DTYPES = ("float16", "bfloat16")
BATCHES = (1, 64)
SHARES = (0.5, 0.3)
IMAGE = 224
WIDTH = "real"
MAX_ITERATIONS = 8


def floor_row(name: str, dtype: torch.dtype, batch: int, device: str) -> dict:
    """The smallest reachable model (every group at its narrowest multiple of ``STEP``) over the unpruned one."""
    ir = model_ir(name, WIDTH, device, dtype)
    plan = SelectionPlan(ir, ChannelConstraint(step=STEP))
    floor = ir.prune(labels=plan.labels(plan.max_counts())).model
    x = image(batch, IMAGE).to(device, dtype)
    unpruned, smallest = compare_latency([ir.model, floor], x, rounds=ROUNDS, device=device)
    return {"model": MODELS[name], "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "original_ms": unpruned * 1e3, "floor_share": smallest / unpruned,
            "macs_share": macs(floor, x[:1]) / macs(ir.model, x[:1])}


def rival_row(original: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, device: str) -> dict:
    """Torch-Pruning's uniform magnitude pruning at the pruned model's MACs, both measured in rotation."""
    try:
        from harness.rival import tp_at_most
    except ImportError as error:
        return {"tp_error": short_error(error)}
    budget = macs(pruned, x[:1])
    try:
        rival = tp_at_most(original, (x[:1],), budget)
    except Exception as error:  # noqa: BLE001 - the rival's failure is reported, the row is kept
        return {"tp_error": short_error(error)}
    ours, theirs = compare_latency([pruned, rival], x, rounds=ROUNDS, device=device)
    return {"table_macs": budget, "tp_macs": macs(rival, x[:1]), "table_latency": ours, "tp_latency": theirs,
            "tp_over_table": theirs / ours}


def setting_row(name: str, dtype: torch.dtype, batch: int, share: float, device: str) -> dict:
    """One setting: the budget, the selection checked and settled, the referee twice, the rival."""
    ir = model_ir(name, WIDTH, device, dtype)   # fresh: no timing from an earlier setting is reused
    x = image(batch, IMAGE).to(device, dtype)
    function = TableLatency(x, device=device, warmup=5, repeats=20, op_warmup=3, op_repeats=10)
    original = min(function(ir.model) for _ in range(3))
    selector = KnapsackLabelSelector(share * original, function, max_iterations=MAX_ITERATIONS,
                                     constraint=ChannelConstraint(step=STEP), tolerance=TOLERANCE,
                                     verbose=False, max_checks=0)   # checked in ``select``, timed apart
    row = {"model": MODELS[name], "dtype": str(dtype).removeprefix("torch."), "batch": batch, "image": IMAGE,
           "share": share, "original": original, "target": share * original,
           "original_macs": macs(ir.model, x[:1])}
    try:
        result, pruned = select(ir, selector, x, {"device": device}, share)
    except ValueError as error:
        row["unreachable"] = str(error)
        return row
    row.update(result)
    row.update(rival_row(WIDTHS[name][WIDTH]().to(device, dtype), pruned, x, device))   # the unpruned model
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="one model, one dtype, batch 1, budget 0.5")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no setting after this")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("latency_gpu.py: no CUDA device here (--device cpu runs the same code on the CPU)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    dtypes = ("bfloat16",) if args.quick else DTYPES
    models = {"mobilenet_v2": MODELS["mobilenet_v2"]} if args.quick else MODELS
    batches, shares = ((1,), (0.5,)) if args.quick else (BATCHES, SHARES)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"environment": environment(), "device": device_name, "floor": [], "table": [],
              "settings": {"dtypes": dtypes, "batches": batches, "shares": shares, "image": IMAGE, "step": STEP,
                           "tolerance": TOLERANCE, "rounds": ROUNDS, "width": WIDTH}}
    path = os.path.join(RESULTS, f"latency_gpu{'_quick' if args.quick else ''}.json")

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        with open(path, "w") as file:
            json.dump(result, file, indent=1, default=str)

    stages = [("floor", (name, getattr(torch, dtype), batch), floor_row)
              for dtype in dtypes for name in models for batch in batches]
    stages += [("table", (name, getattr(torch, dtype), batch, share), setting_row)
               for dtype in dtypes for name in models for batch in batches for share in shares]
    for stage, setting, run in stages:
        if time.perf_counter() - start > args.budget_s:
            result.setdefault("skipped", []).append([stage, *map(str, setting)])
            continue
        row = run(*setting, args.device)
        result[stage].append(row)
        print(stage, json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}, default=str),
              flush=True)
        save()
    save()
    if not args.quick:
        write_section(gpu_markdown(result).splitlines(), os.path.join(os.path.dirname(RESULTS), "RESULTS.md"))
    print(gpu_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
