"""pruning_ir vs Torch-Pruning, side by side: coverage, speed, quality, latency budget, scale (``make bench``).

Runs the sections on CPU with fixed seeds (each interleaves both libraries per model, so the
machine's drift hits both alike), prints a table per section, writes
``<results-dir>/<section>.json`` (``<section>_quick.json`` with ``--quick``) and regenerates
the report: ``benchmarks/RESULTS.md`` for a full run into the default results directory,
else ``<results-dir>/RESULTS[_quick].md``. A failing section is recorded and the others run.
One script per section (``SECTIONS``), each runnable alone; the shared code is in ``harness/``.

    python benchmarks/run.py [--quick] [--only coverage,speed,quality,latency,scale] [--results-dir DIR]
    python benchmarks/run.py --render [--quick]   # only re-render the report from the JSON files
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

import torch

from harness import report
from harness.machine import THREADS, cpu_seconds, environment

# section -> (script, its function returning the section's JSON object); criteria.py and knapsack.py keep
# the names that RESULTS.md, docs/ and pruning_ir's docstrings cite
SECTIONS = {"coverage": ("bench_coverage", "run"), "speed": ("bench_speed", "run"), "quality": ("criteria", "section"),
            "latency": ("knapsack", "run"), "scale": ("bench_scale", "run")}


def run_section(name: str, quick: bool) -> dict:
    """One section's results, with its environment and wall time (or the error it raised)."""
    env, start, cpu = environment(), time.perf_counter(), cpu_seconds()
    print(f"\n== {report.TITLES[name]} ==", flush=True)
    try:
        module, function = SECTIONS[name]
        data = getattr(importlib.import_module(module), function)(quick=quick)
    except Exception as error:  # noqa: BLE001 - one broken section must not hide the others
        traceback.print_exc()
        data = {"error": f"{type(error).__name__}: {error}"}
    data.update(environment=env, wall_s=time.perf_counter() - start, cpu_s=cpu_seconds() - cpu, quick=quick)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one seed, few ratios (CI smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--results-dir", default=report.DEFAULT_RESULTS)
    parser.add_argument("--report", default=None, help="report path (default: see the module docstring)")
    parser.add_argument("--render", action="store_true", help="run nothing: re-render the report from the JSON")
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {report.write(args.results_dir, args.quick, args.report)}")
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    os.makedirs(args.results_dir, exist_ok=True)
    torch.set_num_threads(THREADS)
    env, start, walls, cpus, failed = environment(), time.perf_counter(), {}, {}, []
    print(f"{env['cpu']}, {env['cores']} cores, load average {env['load_average']}; torch {env['torch']}, "
          f"torch-pruning {env['torch_pruning']}, pruning_ir {env['pruning_ir']}", flush=True)
    for name in sections:
        data = run_section(name, args.quick)
        with open(report.result_path(args.results_dir, name, args.quick), "w") as handle:
            json.dump(data, handle, indent=1)
        walls[name], cpus[name] = data["wall_s"], data["cpu_s"]
        if "error" in data:
            failed.append(name)
        print("\n".join(["", *report.section_md(name, data)]), flush=True)
    record = {"environment": env, "sections": sections, "section_wall_s": walls, "section_cpu_s": cpus,
              "wall_s": time.perf_counter() - start, "cpu_s": sum(cpus.values()), "quick": args.quick,
              "failed": failed, "reruns": []}
    previous = report.load(args.results_dir, args.quick).get("run")
    if previous and set(sections) != set(SECTIONS):   # a partial re-run: keep the full run's record
        rerun = {k: record[k] for k in ("environment", "sections", "wall_s")}
        record = {**previous, "reruns": previous.get("reruns", []) + [rerun]}
        for key, new in (("section_wall_s", walls), ("section_cpu_s", cpus)):
            record[key] = {**previous.get(key, {}), **new}
        record["wall_s"] = sum(record["section_wall_s"].values())
        if set(record["section_cpu_s"]) >= set(record["section_wall_s"]):
            record["cpu_s"] = sum(record["section_cpu_s"].values())
        record["failed"] = sorted(set(previous.get("failed", [])) - set(sections) | set(failed))
    with open(report.result_path(args.results_dir, "run", args.quick), "w") as handle:
        json.dump(record, handle, indent=1)
    found = report.load(args.results_dir, args.quick)
    print("\n== Where we lose / caveats ==\n" + "\n".join(f"- {item}" for item in report.losses(found)))
    path = report.write(args.results_dir, args.quick, args.report)
    print(f"\nwrote {path}; {record['wall_s'] / 60:.1f} min", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
