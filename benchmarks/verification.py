"""Verification cost: ``ir.prune`` with its pre-write check (``verify=True``, the default) against
``verify=False``, per model of the test zoo and per benchmark-scale model.

For each model: labels inferred once, half of every group's labels selected
(``UniformLabelSelector(0.5)``), then ``ir.prune(labels=...)`` timed with and without the
check (median of ``--repeats`` runs on the same IR, which ``prune`` leaves untouched), and the
ratio reported; plus whether the check ran on shape-only (meta) tensors and how many trial runs
it made. A check that finds nothing wrong costs one meta copy and two shape-only forwards.

    python benchmarks/verification.py [--quick] [--repeats 3] [--json benchmarks/results/verification.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import harness  # noqa: F401  (puts tests/ on sys.path)
from harness.models import BENCHMARK_MODELS, zoo_models
from harness.tables import table, write_json

QUICK = ("resnet18", "mobilenet_v2", "vit", "gpt2", "bert")


def _time(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, model, inputs: tuple, repeats: int) -> dict:
    from pruning_ir import PruningIR, UniformLabelSelector
    from pruning_ir.verification import RemovalCheck
    ir = PruningIR(model.eval()).infer_labels(*inputs)
    labels = UniformLabelSelector(0.5).select(ir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unchecked = _time(lambda: ir.prune(labels=labels, verify=False), repeats)
        checked = _time(lambda: ir.prune(labels=labels), repeats)
    check = RemovalCheck(ir.model, ir.index, (inputs, {}), _signature(ir, inputs))
    return {"model": name, "labels": len(labels), "prune_s": unchecked, "prune_verified_s": checked,
            "ratio": checked / unchecked if unchecked else float("nan"), "on_meta": check.on_meta}


def _signature(ir, inputs: tuple):
    import torch
    from pruning_ir.verification import output_signature
    with torch.no_grad():
        return output_signature(ir.model(*inputs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="five small models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/verification.json")
    args = parser.parse_args(argv)
    factories = {name: (lambda entry=entry: (entry.build(), entry.example_inputs()))
                 for name, entry in zoo_models().items()}
    if not args.quick:
        factories.update({f"{name} (benchmark size)": factory for name, factory in BENCHMARK_MODELS.items()})
    rows = []
    for name, factory in factories.items():
        if args.quick and name not in QUICK:
            continue
        model, inputs = factory()
        rows.append(measure(name, model, inputs, args.repeats))
        print(f"{name}: {rows[-1]['ratio']:.2f}x", file=sys.stderr)
    lines = table(["model", "labels removed", "prune (s)", "prune + check (s)", "ratio", "shape-only check"],
                  [[r["model"], r["labels"], f"{r['prune_s']:.3f}", f"{r['prune_verified_s']:.3f}",
                    f"{r['ratio']:.2f}", "yes" if r["on_meta"] else "no (real copy)"] for r in rows])
    print("\n".join(lines))
    ratios = [r["ratio"] for r in rows]
    print(f"\nmedian ratio {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    if args.json:
        write_json(args.json, {"repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
