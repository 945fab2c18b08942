"""Coverage: can pruning_ir and Torch-Pruning each prune every model of the reference zoo, and does it still run?

For every model of the tests' zoo and the Hugging Face models (BERT, GPT-2, LLaMA from small
configs), both libraries, one after the other on fresh copies: magnitude scores, about 40%
of every group's channels removed (pruning_ir: MagnitudeCriterion + UniformLabelSelector;
Torch-Pruning: MetaPruner + GroupMagnitudeImportance, final classifier ignored, attention
heads declared and the head attributes updated after pruning, as its examples do). A model
counts as pruned when parameters were removed, the pruned model runs, and every output keeps
its shape; an exception or a run past the time limit is recorded with its message.

    python benchmarks/bench_coverage.py [--quick]   (= python benchmarks/run.py --only coverage)
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from harness.machine import THREADS, output_shapes, parameter_count, short_error, time_limit
from harness.models import zoo_models
from harness.rival import tp_prune

RATIO = 0.4
LIBRARIES = ("pruning_ir", "torch_pruning")


def ours_prune(model: nn.Module, inputs: tuple, ratio: float) -> nn.Module:
    """Prune with pruning_ir: magnitude scores, the same share of every group; returns the model."""
    from pruning_ir import MagnitudeCriterion, PruningIR, UniformLabelSelector
    ir = PruningIR(model).infer_labels(*inputs)
    MagnitudeCriterion(ir).apply()
    return ir.prune(labels=UniformLabelSelector(ratio).select(ir), inplace=True).model


def attempt(library: str, entry, limit: float) -> dict:
    """Prune a fresh copy of ``entry``'s model with ``library``; what happened."""
    model, inputs = entry.build(), entry.example_inputs()
    reference, before = output_shapes(model, inputs), parameter_count(model)
    result = {"params_before": before, "params_after": None, "seconds": None, "runs": False,
              "same_shapes": False, "pruned": False, "error": None}
    start = time.perf_counter()
    try:
        with time_limit(limit):
            if library == "pruning_ir":
                model = ours_prune(model, inputs, RATIO)
            else:
                model = tp_prune(model, inputs, "magnitude", RATIO)
    except Exception as error:  # noqa: BLE001 - a library that cannot prune a model is a result
        result["error"] = short_error(error)
        return result
    result["seconds"] = time.perf_counter() - start
    result["params_after"] = parameter_count(model)
    try:
        shapes = output_shapes(model.eval(), inputs)
    except Exception as error:  # noqa: BLE001
        result["error"] = "pruned model fails: " + short_error(error)
        return result
    result["runs"], result["same_shapes"] = True, shapes == reference
    if shapes != reference:
        result["error"] = f"output shapes changed: {reference} -> {shapes}"
    elif result["params_after"] >= before:
        result["error"] = "nothing was pruned"
    result["pruned"] = result["error"] is None
    return result


def run(quick: bool = False) -> dict:
    """Both libraries on every zoo model (quick: a shorter time limit for a hanging pruner)."""
    torch.set_num_threads(THREADS)
    limit = 10.0 if quick else 60.0
    rows = []
    for index, (name, entry) in enumerate(zoo_models().items()):
        row = {"model": name}
        for library in (LIBRARIES if index % 2 == 0 else LIBRARIES[::-1]):
            row[library] = attempt(library, entry, limit)
        for library in LIBRARIES:
            r = row[library]
            r["removed_share"] = 1 - r["params_after"] / r["params_before"] if r["params_after"] else None
        rows.append(row)
        print(f"  coverage {name:<17} ours {'ok' if row['pruning_ir']['pruned'] else 'FAIL':<5}"
              f"TP {'ok' if row['torch_pruning']['pruned'] else 'FAIL'}", flush=True)
    summary = {library: sum(row[library]["pruned"] for row in rows) for library in LIBRARIES}
    summary["models"] = len(rows)
    return {"settings": {"ratio": RATIO, "time_limit_s": limit, "importance": "magnitude (L2)"},
            "summary": summary, "rows": rows}


if __name__ == "__main__":
    from run import main
    sys.exit(main(["--only", "coverage", *sys.argv[1:]]))
