"""IR build + label inference + pruning half of every group, pruning_ir vs Torch-Pruning.

Each measurement runs in a fresh subprocess, alternating the two libraries per model so
machine drift hits both alike: its first, cold run gives the peak memory (resident set
size above the process right after the model and inputs were built), then the median of
three runs on fresh copies of the model gives the time. Peak memory is the peak
resident set size above the process's size right after the model and inputs were built.

    python benchmarks/build_and_prune.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "build_and_prune.json")
THREADS = 1  # one intra-op thread: timings on a shared 2-core machine stay stable


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _output_shapes(model, inputs) -> list:
    from torch.utils import _pytree as pytree
    with torch.no_grad():
        out = model(*inputs)
    return [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _prune_with_pruning_ir(model, inputs) -> None:
    from pruning_ir import PruningIR

    ir = PruningIR(model).infer_labels(*inputs)
    labels = [label for group in ir.label_groups() for label in group[: len(group) // 2]]
    ir.prune(labels=labels, inplace=True)


def _prune_with_torch_pruning(model, inputs) -> None:
    import torch_pruning as tp
    outputs = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, inputs[0] if len(inputs) == 1 else inputs,
                                  importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=outputs)
    pruner.step()


def worker(library: str, name: str, timed_runs: int = 3) -> dict:
    """Peak memory of the first (cold) run in this fresh process, then the median time of
    ``timed_runs`` more runs on fresh copies of the model (imports and first-call kernel
    set-up paid once, by the cold run)."""
    sys.path.insert(0, HERE)
    from models import BENCHMARK_MODELS
    torch.set_num_threads(THREADS)
    model, inputs = BENCHMARK_MODELS[name]()
    before = sum(p.numel() for p in model.parameters())
    model_mb = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
    shapes = _output_shapes(model, inputs)
    prune = _prune_with_pruning_ir if library == "pruning_ir" else _prune_with_torch_pruning
    __import__("pruning_ir" if library == "pruning_ir" else "torch_pruning")
    copies = [copy.deepcopy(model) for _ in range(timed_runs)]
    baseline = _rss_mb("VmRSS")
    _reset_peak()
    error = None
    try:
        prune(model, inputs)
    except Exception as exc:  # a library that cannot prune the model is a result, not a crash
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    peak = _rss_mb("VmHWM") - baseline
    times = []
    for replica in copies if error is None else []:
        start = time.perf_counter()
        prune(replica, inputs)
        times.append(time.perf_counter() - start)
    runs = False
    if error is None:
        try:
            runs = _output_shapes(model, inputs) == shapes
        except Exception as exc:
            error = f"pruned model fails: {type(exc).__name__}: {str(exc)[:160]}"
    after = sum(p.numel() for p in model.parameters())
    return {"library": library, "model": name, "seconds": statistics.median(times) if times else None,
            "peak_mb": peak, "model_mb": model_mb, "params_before": before, "params_after": after,
            "runs": runs, "error": error}


def fmt(value, spec: str) -> str:
    """Format a number, or a dash of the same width for a missing one."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return format(value, spec) if value is not None else "-".rjust(width)


def measure(library: str, name: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", library, name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"library": library, "model": name, "error": done.stderr.strip().splitlines()[-1:], "runs": False}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small models, one repeat (CI smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    sys.path.insert(0, HERE)
    from models import BENCHMARK_MODELS, QUICK_MODELS
    names = QUICK_MODELS if args.quick else list(BENCHMARK_MODELS)
    repeats = 1 if args.quick else args.repeats
    rows = []
    header = f"{'model':<14}{'ours s':>9}{'TP s':>9}{'ratio':>7}{'ours MB':>9}{'TP MB':>8}{'model MB':>9}" \
             f"{'mem/model':>10}  {'ours ok':<8}{'TP ok':<6}"
    print(header)
    print("-" * len(header))
    for name in names:
        runs = {"pruning_ir": [], "torch_pruning": []}
        for _ in range(repeats):
            for library in runs:
                runs[library].append(measure(library, name))
        row = {"model": name}
        for library, results in runs.items():
            good = [r for r in results if r.get("error") is None and r.get("seconds") is not None]
            row[library] = {
                "seconds": statistics.median(r["seconds"] for r in good) if good else None,
                "peak_mb": statistics.median(r["peak_mb"] for r in good) if good else None,
                "runs": all(r.get("runs") for r in results),
                "error": next((r.get("error") for r in results if r.get("error")), None),
                "params_before": results[0].get("params_before"), "params_after": results[0].get("params_after"),
                "model_mb": results[0].get("model_mb"),
            }
        ours, theirs = row["pruning_ir"], row["torch_pruning"]
        row["time_ratio"] = ours["seconds"] / theirs["seconds"] if ours["seconds"] and theirs["seconds"] else None
        rows.append(row)
        print(f"{name:<14}{fmt(ours['seconds'], '9.3f')}{fmt(theirs['seconds'], '9.3f')}"
              f"{fmt(row['time_ratio'], '7.2f')}{fmt(ours['peak_mb'], '9.1f')}{fmt(theirs['peak_mb'], '8.1f')}"
              f"{fmt(ours['model_mb'], '9.1f')}"
              f"{fmt(ours['peak_mb'] / ours['model_mb'] if ours['peak_mb'] is not None else None, '10.2f')}  "
              f"{str(ours['runs']):<8}{str(theirs['runs']):<6}", flush=True)
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"]]
    summary = {"median_time_ratio": statistics.median(ratios) if ratios else None,
               "machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": THREADS, "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    print(f"\nmedian time ratio (pruning_ir / Torch-Pruning): {fmt(summary['median_time_ratio'], '.2f')}")
    for row in rows:
        for library in ("pruning_ir", "torch_pruning"):
            if row[library]["error"]:
                print(f"{row['model']}: {library} failed: {row[library]['error']}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS if not args.quick else RESULTS.replace(".json", "_quick.json"), "w") as out:
        json.dump({"summary": summary, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
