"""Scale: IR build time and memory on deep models, pruning_ir vs Torch-Pruning, and how they grow with depth.

Three depths of a ResNet-style CNN (50/101/152-style, 224 px) and of a BERT encoder
(6/12/24 layers, hidden 256, from a config). Build: pruning_ir ``PruningIR(model).infer_labels``
vs Torch-Pruning ``MetaPruner`` (its dependency graph, groups and per-layer set-up; the same
call as in the speed section). Each in a fresh subprocess, the libraries alternating (ABBA):
a cold run gives the peak memory (peak RSS above the process before the build) and time,
then the median of warm runs on fresh copies the time. The growth exponent is the
least-squares slope of log(time) over log(depth) across the three depths (1 = linear).

    python benchmarks/bench_scale.py [--quick]   (= python benchmarks/run.py --only scale)
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time

from harness.machine import PeakMemory, interleaved, model_mb, run_worker, short_error, worker_main
from harness.rival import tp_pruner

LIBRARIES = ("pruning_ir", "torch_pruning")


def _build(library: str, model, inputs) -> dict:
    start = time.perf_counter()
    if library == "pruning_ir":
        from pruning_ir import PruningIR
        ir = PruningIR(model).infer_labels(*inputs)
        size = {"labels": len(ir.labels()), "groups": len(ir.groups)}
    else:
        pruner = tp_pruner(model, inputs, "magnitude", 0.5)
        size = {"groups": len(list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                             root_module_types=pruner.root_module_types)))}
    return {"seconds": time.perf_counter() - start, **size}


def worker(library: str, name: str, quick: str = "0", timed_runs: str = "2") -> dict:
    """In a fresh process: a cold build (memory, time), then ``timed_runs`` warm builds."""
    from harness.models import QUICK_SCALE_MODELS, SCALE_MODELS
    family, depth, factory = (QUICK_SCALE_MODELS if quick == "1" else SCALE_MODELS)[name]
    model, inputs = factory()
    __import__("pruning_ir" if library == "pruning_ir" else "torch_pruning")
    copies = [copy.deepcopy(model) for _ in range(int(timed_runs))]
    result = {"family": family, "depth": depth, "params": sum(p.numel() for p in model.parameters()),
              "model_mb": model_mb(model), "error": None}
    try:
        with PeakMemory() as peak:
            cold = _build(library, model, inputs)
        warm = [_build(library, replica, inputs)["seconds"] for replica in copies]
    except Exception as error:  # noqa: BLE001
        result["error"] = short_error(error)
        return result
    result.update(cold, cold_seconds=cold["seconds"], seconds=statistics.median(warm), peak_mb=peak.mb)
    return result


def growth(rows: list[dict], library: str) -> float | None:
    """Least-squares slope of log(time) over log(depth) across a family's models."""
    points = [(math.log(r["depth"]), math.log(r[library]["seconds"])) for r in rows if r[library].get("seconds")]
    if len({x for x, _ in points}) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def run(quick: bool = False, processes: int = 2) -> dict:
    from harness.models import QUICK_SCALE_MODELS, SCALE_MODELS
    models = QUICK_SCALE_MODELS if quick else SCALE_MODELS
    processes = 1 if quick else processes
    rows = []
    for name in models:
        found = {library: [] for library in LIBRARIES}
        for library in interleaved(LIBRARIES, processes):
            found[library].append(run_worker("bench_scale", [library, name, str(int(quick))], timeout=900,
                                                 fresh=not quick))
        row = {"model": name, "family": models[name][0], "depth": models[name][1]}
        for library, results in found.items():
            good = [r for r in results if r.get("error") is None]
            entry = {key: statistics.median(r[key] for r in good) if good else None
                     for key in ("seconds", "cold_seconds", "peak_mb")}
            first = (good or results)[0]
            entry.update(error=next((r["error"] for r in results if r.get("error")), None),
                         **{k: first.get(k) for k in ("labels", "groups", "params", "model_mb")})
            row[library] = entry
        ours, theirs = row["pruning_ir"], row["torch_pruning"]
        row["time_ratio"] = ours["seconds"] / theirs["seconds"] if ours["seconds"] and theirs["seconds"] else None
        row["memory_ratio"] = ours["peak_mb"] / theirs["peak_mb"] if ours["peak_mb"] and theirs["peak_mb"] else None
        rows.append(row)
        print(f"  scale {name:<15} ours {ours['seconds'] or float('nan'):7.3f} s {ours['peak_mb'] or 0:7.1f} MB  "
              f"TP {theirs['seconds'] or float('nan'):7.3f} s {theirs['peak_mb'] or 0:7.1f} MB", flush=True)
    families = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        families[family] = {library: growth(mine, library) for library in LIBRARIES}
    return {"settings": {"processes": processes, "timed_runs": 2,
                         "memory": "peak RSS above the process before the build, cold run"},
            "growth_exponent": families, "rows": rows}


if __name__ == "__main__":
    if not worker_main(worker):
        from run import main
        sys.exit(main(["--only", "scale", *sys.argv[1:]]))
