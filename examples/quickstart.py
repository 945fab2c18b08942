"""The digits walk-through: the four steps, then what to do with the pruned model.

    python examples/quickstart.py [--quick] [--output demo-output]

1. trace a small residual CNN (trained here on scikit-learn's digits: real 8x8 images),
2. calibrate LossAwareCriterion on the training set,
3. choose half of every prunable group with UniformLabelSelector,
4. prune; then re-estimate batch-norm statistics, fine-tune one epoch, and save the
   pruned model twice: in the safe format (JSON + weights) and as a dill-pickled IR.
"""

from __future__ import annotations

import argparse
import os

import dill
import torch
import torch.nn.functional as F

from pruning_ir import (LossAwareCriterion, PruningIR, UniformLabelSelector, load_pruned, save_pruned,
                        tune_batchnorm_statistics)
from pruning_ir.demo.digits import DigitsResNet, accuracy, batches, build_model, digits_data, train
from pruning_ir.latency import macs, parameter_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (used by the test suite)")
    parser.add_argument("--output", default="demo-output")
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits_data(seed=0)
    model = train(build_model(seed=0), x_train, y_train, epochs=2 if args.quick else 8, description="training")
    tune_batchnorm_statistics(model, batches(x_train, y_train, seed=None), verbose=False)
    example = x_test[:1]

    # 1. trace: labels are inferred from the first batch the criterion sees
    ir = PruningIR(model)
    # 2. calibrate: every backward() inside the context adds to each label's Taylor score
    model.eval()
    with LossAwareCriterion(ir) as score_collector:
        for images, targets in batches(x_train, y_train, batch_size=32, seed=1):
            F.cross_entropy(score_collector(images), targets).backward()
    model.zero_grad(set_to_none=True)
    # 3. choose: the lowest-scored half of every prunable group
    labels = UniformLabelSelector(pruning_ratio=0.5).select(ir)
    # 4. prune: a new, smaller model of the same class; the original is untouched
    pruned_ir = ir.prune(labels=labels)
    pruned = pruned_ir.model

    stale = accuracy(pruned, x_test, y_test)
    tune_batchnorm_statistics(pruned, batches(x_train, y_train, seed=None), verbose=False)
    tuned = accuracy(pruned, x_test, y_test)
    train(pruned, x_train, y_train, epochs=1, lr=1e-3, seed=1)  # builds its optimizer from the new parameters

    rows = [("parameters", int(parameter_count(model)), int(parameter_count(pruned))),
            ("MACs", int(macs(model, example)), int(macs(pruned, example))),
            ("test accuracy", f"{accuracy(model, x_test, y_test):.3f}",
             f"{stale:.3f} pruned, {tuned:.3f} batch norms re-estimated, "
             f"{accuracy(pruned, x_test, y_test):.3f} after 1 epoch")]
    print(f"\npruned {len(labels)} labels in {len(ir.label_groups())} groups "
          f"({type(pruned).__name__} is still a {type(model).__name__})")
    print(f"{'':<15}{'before':>12}  {'after':<40}")
    for name, before, after in rows:
        print(f"{name:<15}{before!s:>12}  {after!s:<40}")

    os.makedirs(args.output, exist_ok=True)
    safe_folder = save_pruned(pruned, os.path.join(args.output, "quickstart-model"))
    ir_path = os.path.join(args.output, "ir.pt")
    torch.save(pruned_ir, ir_path, pickle_module=dill)  # loading a dill file runs code: trusted files only
    pruned.eval()
    with torch.no_grad():
        from_safe = load_pruned(DigitsResNet(), safe_folder).eval()(example)
        from_dill = torch.load(ir_path, pickle_module=dill, weights_only=False).model.eval()(example)
        same = torch.equal(from_safe, pruned(example)) and torch.equal(from_dill, pruned(example))
    print(f"saved to {safe_folder} (safe) and {ir_path} (dill); reloaded, both give "
          f"{'identical' if same else 'DIFFERENT'} outputs")


if __name__ == "__main__":
    main()
