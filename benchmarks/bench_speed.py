"""Speed: build, calibration, selection and pruning time per model, and peak memory,
pruning_ir vs Torch-Pruning.

The same work for both, on half of every group's channels: build (pruning_ir: ``PruningIR``
+ ``infer_labels``; Torch-Pruning: ``MetaPruner``, i.e. its dependency graph and groups),
calibration (``CALIBRATION_STEPS`` forward + backward passes of a surrogate loss, the mean
square of the outputs: inside ``LossAwareCriterion`` / plain, for ``GroupTaylorImportance``),
selection (``UniformLabelSelector(0.5)`` / ``step(interactive=True)`` up to each group: the
Taylor importance and the thresholds) and pruning (``ir.prune(inplace=True)`` / every
``group.prune()``).

Each measurement runs in a fresh subprocess, the libraries alternating per model (ABBA): the
first, cold run in the process gives the peak memory (peak resident set size above the
process right after the model and inputs were built, see ``harness.machine``) and then the
median of ``timed_runs`` runs on fresh copies gives the times; the median over processes is
reported, and ratios are ours / Torch-Pruning.

    python benchmarks/bench_speed.py [--quick]   (= python benchmarks/run.py --only speed)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

from harness.machine import (PeakMemory, interleaved, model_mb, output_shapes, run_worker, short_error, surrogate_loss,
                             worker_main)
from harness.rival import tp_fix_attention, tp_pruner

RATIO = 0.5
CALIBRATION_STEPS = 2
PHASES = ("build", "calibrate", "select", "prune")
LIBRARIES = ("pruning_ir", "torch_pruning")


def _pipeline_ours(model, inputs) -> dict[str, float]:
    from pruning_ir import LossAwareCriterion, PruningIR, UniformLabelSelector
    times, start = {}, time.perf_counter()
    ir = PruningIR(model).infer_labels(*inputs)
    times["build"], start = time.perf_counter() - start, time.perf_counter()
    with LossAwareCriterion(ir) as collector:
        times["calibrate_setup"] = time.perf_counter() - start   # entering the criterion: a fixed cost
        for _ in range(CALIBRATION_STEPS):
            surrogate_loss(collector(*inputs)).backward()
    model.zero_grad(set_to_none=True)
    times["calibrate"], start = time.perf_counter() - start, time.perf_counter()
    labels = UniformLabelSelector(RATIO).select(ir)
    times["select"], start = time.perf_counter() - start, time.perf_counter()
    ir.prune(labels=labels, inplace=True)
    times["prune"] = time.perf_counter() - start
    return times


def _pipeline_tp(model, inputs) -> dict[str, float]:
    times, start = {}, time.perf_counter()
    pruner = tp_pruner(model, inputs, "taylor", RATIO)
    times["build"], start = time.perf_counter() - start, time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        surrogate_loss(model(*inputs)).backward()
    times["calibrate"], start = time.perf_counter() - start, time.perf_counter()
    select = prune = 0.0
    for group in pruner.step(interactive=True):   # importance + thresholds up to each yield
        select += time.perf_counter() - start
        start = time.perf_counter()
        group.prune()
        prune += time.perf_counter() - start
        start = time.perf_counter()
    select += time.perf_counter() - start
    start = time.perf_counter()
    tp_fix_attention(model, pruner)
    times["select"], times["prune"] = select, prune + time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return times


def worker(library: str, name: str, timed_runs: str = "3") -> dict:
    """In a fresh process: one cold run (peak memory), then ``timed_runs`` warm runs (times)."""
    from harness.models import BENCHMARK_MODELS
    model, inputs = BENCHMARK_MODELS[name]()
    shapes, size = output_shapes(model, inputs), model_mb(model)
    pipeline = _pipeline_ours if library == "pruning_ir" else _pipeline_tp
    __import__("pruning_ir" if library == "pruning_ir" else "torch_pruning")
    copies = [copy.deepcopy(model) for _ in range(int(timed_runs))]
    result = {"model_mb": size, "error": None, "runs": False}
    try:
        with PeakMemory() as peak:
            pipeline(model, inputs)
        result["peak_mb"] = peak.mb
        after = output_shapes(model, inputs)
        result["runs"] = after == shapes
        if not result["runs"]:
            result["error"] = f"output shapes changed: {shapes} -> {after}"
        runs = [pipeline(replica, inputs) for replica in copies]
    except Exception as error:  # noqa: BLE001 - a library that cannot prune the model is a result
        result["error"] = short_error(error)
        return result
    result.update({phase: statistics.median(r[phase] for r in runs) for phase in (*PHASES, "calibrate_setup")
                   if phase in runs[0]})
    result["total"] = sum(result[phase] for phase in PHASES)
    return result


def _median(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def run(quick: bool = False, processes: int = 2) -> dict:
    """Every benchmark model (quick: two small ones, one process each, one timed run)."""
    from harness.models import BENCHMARK_MODELS, QUICK_MODELS
    names = list(QUICK_MODELS) if quick else list(BENCHMARK_MODELS)
    processes, timed_runs = (1, 1) if quick else (processes, 2)
    rows = []
    for name in names:
        results = {library: [] for library in LIBRARIES}
        for library in interleaved(LIBRARIES, processes):
            results[library].append(run_worker("bench_speed", [library, name, str(timed_runs)], timeout=900,
                                                 fresh=not quick))
        row = {"model": name}
        for library, found in results.items():
            timed = [r for r in found if r.get("total") is not None]   # ran to the end, even if its model broke
            row[library] = {key: _median(timed, key) for key in (*PHASES, "calibrate_setup", "total", "peak_mb")}
            row[library].update(model_mb=_median(found, "model_mb"), runs=all(r.get("runs") for r in found),
                                error=next((r["error"] for r in found if r.get("error")), None))
        for entry in (row["pruning_ir"], row["torch_pruning"]):   # TP's importance is computed in step()
            entry["calibrate_select"] = entry["calibrate"] + entry["select"] if entry["calibrate"] else None
        ours, theirs = row["pruning_ir"], row["torch_pruning"]
        row["ratio"] = {key: ours[key] / theirs[key] if ours[key] and theirs[key] else None
                        for key in (*PHASES, "calibrate_select", "total", "peak_mb")}
        rows.append(row)
        total = row["ratio"]["total"]
        print(f"  speed {name:<14} ours {ours['total'] or float('nan'):7.3f} s  TP "
              f"{theirs['total'] or float('nan'):7.3f} s  ratio {total if total else float('nan'):.2f}", flush=True)
    medians = {key: _median([r["ratio"] for r in rows], key)
               for key in (*PHASES, "calibrate_select", "total", "peak_mb")}
    return {"settings": {"ratio": RATIO, "calibration_steps": CALIBRATION_STEPS, "processes": processes,
                         "timed_runs": timed_runs, "memory": "peak RSS above the process after model build, "
                                                             "cold run, whole pipeline"},
            "median_ratio": medians, "rows": rows}


if __name__ == "__main__":
    if not worker_main(worker):
        from run import main
        sys.exit(main(["--only", "speed", *sys.argv[1:]]))
