"""Overhead of LossAwareCriterion: one calibration step vs a plain forward + backward.

A step is ``loss = cross_entropy(model(x), y); loss.backward()`` in train mode; the
calibration step runs the same inside ``with LossAwareCriterion(ir) as collector`` (the
context is entered once, as in a calibration loop; its one-time setup and the work when it
exits, where joint scores are computed, are reported apart).
Plain and calibration steps alternate so that machine drift hits both alike; the ratio is
of medians (and of minima, the steadier one on a shared machine). Variants: ``auto`` (the
default), ``single`` (``joint=False``) and ``activations`` (``implementation="activations"``,
every gate hooked on its activation, the fallback path), for reference.

    python benchmarks/overhead.py [--models resnet50 vit_small] [--batch 8] [--repeats 7] [--size 224] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from models import FusedQKVAttention, Bottleneck, ResNet, VisionTransformer  # noqa: E402

from pruning_ir import PruningIR  # noqa: E402
from pruning_ir.criteria import LossAwareCriterion  # noqa: E402

MODELS = {
    "resnet50": lambda size: ResNet(Bottleneck, (3, 4, 6, 3), base_width=64, num_classes=1000),
    "vit_small": lambda size: VisionTransformer(FusedQKVAttention, image_size=size, patch_size=16, dim=384,
                                                num_heads=6, depth=12, num_classes=1000),
}
# the default (joint scores, parameter gradients where exact), single-label scores, every gate on its activation
VARIANTS = {"auto": {}, "single": {"joint": False}, "activations": {"implementation": "activations"}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(run, model, x, y, device) -> float:
    _sync(device)
    start = time.perf_counter()
    F.cross_entropy(run(x), y).backward()
    _sync(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def measure(name: str, batch: int, size: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = MODELS[name](size).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    start = time.perf_counter()
    ir = PruningIR(model).infer_labels(x[:1])
    infer_s = time.perf_counter() - start
    result = {"model": name, "batch": batch, "size": size, "labels": len(ir.labels()), "infer_labels_s": infer_s}
    for variant, options in VARIANTS.items():
        criterion = LossAwareCriterion(ir, **options)
        start = time.perf_counter()
        collector = criterion.__enter__()
        setup_s = time.perf_counter() - start
        try:
            _step(model, model, x, y, device)  # warm-up, both paths
            _step(collector, model, x, y, device)
            plain, calibration = [], []
            for _ in range(repeats):
                plain.append(_step(model, model, x, y, device))
                calibration.append(_step(collector, model, x, y, device))
        finally:
            start = time.perf_counter()
            criterion.__exit__(None, None, None)
            exit_s = time.perf_counter() - start
        result[variant] = {
            "setup_s": setup_s, "exit_s": exit_s, "plain_s": statistics.median(plain),
            "calibration_s": statistics.median(calibration),
            "ratio": statistics.median(calibration) / statistics.median(plain),
            "ratio_of_minima": min(calibration) / min(plain), "plain_all_s": plain, "calibration_all_s": calibration,
            "activation_sites": len(criterion._activation_gates) if hasattr(criterion, "_activation_gates") else None,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "overhead.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for name in args.models:
        r = measure(name, args.batch, args.size, args.repeats, device)
        results.append(r)
        for variant in VARIANTS:
            m = r[variant]
            print(f"{name:10} batch {args.batch} {args.size}px {variant:11}: "
                  f"plain {m['plain_s'] * 1e3:8.1f} ms  "
                  f"calibration {m['calibration_s'] * 1e3:8.1f} ms  ratio {m['ratio']:.3f} "
                  f"(of minima {m['ratio_of_minima']:.3f})  "
                  f"(setup {m['setup_s'] * 1e3:.0f} ms, exit {m['exit_s'] * 1e3:.0f} ms, "
                  f"{m['activation_sites']} activation sites)", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "machine": platform.processor() or platform.machine(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
