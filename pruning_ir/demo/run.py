"""The demo run (``make demo`` / ``pruning-ir demo``): the whole job on real data, in a few minutes on a CPU.

Trains a small residual CNN on scikit-learn's digits, scores its channels with
LossAwareCriterion (calibrated with batch statistics), prices each group's removals by
measuring the loss (``measure_removal_costs``), prunes to half the MACs with
KnapsackLabelSelector, re-estimates
batch-norm statistics, fine-tunes briefly, re-estimates them again, and reports parameters,
MACs, measured CPU latency and test accuracy before and after. Writes to the output folder:
``report.md``, ``channels.png``, ``pruned-model/`` (safe format: JSON + weights), ``ir.pt``
(the IR, with dill) and ``summary.json``. ``quick=True`` (or ``PRUNING_IR_DEMO_QUICK=1``)
trains less, for the test suite.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..batchnorm import batch_statistics
from ..criteria import LossAwareCriterion, measure_removal_costs
from ..ir import PruningIR
from ..latency import bind, macs, measure_latency, one_thread, parameter_count
from ..saving import save_pruned
from ..selectors import ChannelConstraint, KnapsackLabelSelector
from ..text_tables import format_count, group_channels, markdown_table
from .digits import accuracy, batches, build_model, digits_data, reestimate_batchnorm, train
from .report import KNAPSACK_HEADERS, knapsack_rows, plot_channels

__all__ = ["run_demo"]

MACS_TARGET = 0.5          # keep half the MACs
LATENCY_BATCH = 256        # images per timed forward pass
CALIBRATION_BATCH = 32
CHANNEL_STEP = 8          # CPU kernels run odd widths far slower: keep multiples of 8


def _cpu_latency(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass on one CPU thread (steadier than all threads on a shared machine)."""
    with one_thread():
        return measure_latency(model, images, warmup=5, repeats=repeats)


def _calibrate(ir: PruningIR, x: torch.Tensor, y: torch.Tensor, verbose: bool) -> None:
    """LossAwareCriterion over one pass of the training set, the batch norms on each batch's
    statistics (removals scored as the re-estimated model will normalize); then each group's
    removals priced by the training loss measured after them (``measure_removal_costs``)."""
    ir.model.eval()
    with batch_statistics(ir.model), LossAwareCriterion(ir) as score_collector:
        for images, targets in tqdm(list(batches(x, y, CALIBRATION_BATCH, seed=123)), desc="calibrating",
                                    disable=not verbose, leave=False):
            F.cross_entropy(score_collector(images), targets).backward()
    ir.model.zero_grad(set_to_none=True)
    measure_removal_costs(ir, lambda model: F.cross_entropy(model(x), y),
                          batchnorm_loader=batches(x, x, 64, seed=None), verbose=verbose)


def run_demo(output: str = "demo-output", *, quick: bool | None = None, seed: int = 0,
             verbose: bool = True) -> dict[str, Any]:
    """Run the demo, write its files into ``output`` and return the summary (also in summary.json)."""
    if quick is None:
        quick = os.environ.get("PRUNING_IR_DEMO_QUICK", "") not in ("", "0")
    started = time.perf_counter()
    say = print if verbose else (lambda *args, **kwargs: None)
    os.makedirs(output, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_data(seed)
    say(f"digits: {len(y_train)} training and {len(y_test)} test images (8x8, scikit-learn)")

    model = train(build_model(seed), x_train, y_train, epochs=2 if quick else 8, seed=seed,
                  description="training" if verbose else None)
    reestimate_batchnorm(model, x_train)  # exact statistics for the final weights: a fair "before"
    example, timing_batch = x_test[:1], x_test[:LATENCY_BATCH]
    repeats = 10 if quick else 50
    before = {"parameters": parameter_count(model), "macs": macs(model, example),
              "latency": _cpu_latency(model, timing_batch, repeats), "accuracy": accuracy(model, x_test, y_test)}

    ir = PruningIR(model)
    _calibrate(ir, x_train, y_train, verbose)
    selector = KnapsackLabelSelector(MACS_TARGET * before["macs"], bind(macs, example), verbose=verbose,
                                     constraint=ChannelConstraint(step=CHANNEL_STEP))
    labels = selector.select(ir)
    pruned_ir = ir.prune(labels=labels)
    pruned = pruned_ir.model
    stale = accuracy(pruned, x_test, y_test)
    tuned = accuracy(reestimate_batchnorm(pruned, x_train), x_test, y_test)
    train(pruned, x_train, y_train, epochs=1 if quick else 2, lr=1e-3, seed=seed + 1,
          description="fine-tuning" if verbose else None)
    reestimate_batchnorm(pruned, x_train)
    after = {"parameters": parameter_count(pruned), "macs": macs(pruned, example),
             "latency": _cpu_latency(pruned, timing_batch, repeats), "accuracy": accuracy(pruned, x_test, y_test)}

    summary = {"quick": quick, "seed": seed, "before": before, "after": after, "removed_labels": len(labels),
               "accuracy_path": {"pruned": stale, "batchnorm_reestimated": tuned, "fine_tuned": after["accuracy"]},
               "macs_target": MACS_TARGET * before["macs"], "knapsack_iterations": len(selector.history)}
    table = _summary_table(before, after)
    say("\n" + table + "\n")
    say(f"accuracy right after pruning {stale:.3f} (stale batch-norm statistics), after re-estimating them "
        f"{tuned:.3f}, after fine-tuning {after['accuracy']:.3f}")
    _write_outputs(output, ir, pruned_ir, labels, selector, summary, table)
    summary["seconds"] = time.perf_counter() - started
    with open(os.path.join(output, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)
    say(f"wrote {output}/: report.md, channels.png, pruned-model/, ir.pt, summary.json "
        f"({summary['seconds']:.0f} s)")
    return summary


def _summary_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = [("parameters", format_count(before["parameters"]), format_count(after["parameters"]),
             f"{after['parameters'] / before['parameters']:.2f}"),
            ("MACs per image", format_count(before["macs"]), format_count(after["macs"]),
             f"{after['macs'] / before['macs']:.2f}"),
            (f"CPU latency, batch {LATENCY_BATCH}, 1 thread (median)", f"{before['latency'] * 1e3:.2f} ms",
             f"{after['latency'] * 1e3:.2f} ms", f"{after['latency'] / before['latency']:.2f}"),
            ("test accuracy", f"{before['accuracy']:.3f}", f"{after['accuracy']:.3f}",
             f"{after['accuracy'] - before['accuracy']:+.3f}")]
    return markdown_table(("", "before", "after", "after / before"), rows)


def _write_outputs(output: str, ir: PruningIR, pruned_ir: PruningIR, labels: list, selector: KnapsackLabelSelector,
                   summary: dict[str, Any], table: str) -> None:
    import dill

    path = summary["accuracy_path"]
    report = [
        "# pruning_ir demo: a residual CNN on scikit-learn's digits, pruned to half the MACs", "",
        "LossAwareCriterion scores (batch statistics) priced by measured removal costs, KnapsackLabelSelector "
        "with MACs as the latency function and widths kept "
        f"at multiples of {CHANNEL_STEP} (CPU kernels run odd widths far slower), batch-norm statistics "
        "re-estimated, a short fine-tune." + (" Quick mode: less training." if summary["quick"] else ""),
        "", table, "",
        f"Test accuracy right after pruning: {path['pruned']:.3f} ({pruned_ir.reconstruction_note}); after "
        f"re-estimating the batch norms: {path['batchnorm_reestimated']:.3f}; after fine-tuning: "
        f"{path['fine_tuned']:.3f}.",
        "", "## Channels per dependency group", "",
        markdown_table(("group", "modules", "channels before", "channels after"), group_channels(ir, labels)),
        "", "## Knapsack iterations", "",
        f"Target: {summary['macs_target']:.4g} MACs. Each iteration aims at a latency, estimates it from "
        "per-label latencies, solves the knapsack and measures the result.", "",
        markdown_table(KNAPSACK_HEADERS, knapsack_rows(selector.history)), "",
        "## Files", "",
        "- `channels.png`: output channels per conv/linear layer, before and after.",
        "- `pruned-model/`: `load_pruned(DigitsResNet(), 'pruned-model')` rebuilds the pruned model "
        "(JSON configuration + weights; no code is unpickled).",
        "- `ir.pt`: the pruned IR, saved with dill. Loading it executes code: open only files you trust.",
    ]
    with open(os.path.join(output, "report.md"), "w") as file:
        file.write("\n".join(report) + "\n")
    plot_channels(ir.model, pruned_ir.model, os.path.join(output, "channels.png"),
                  "DigitsResNet: output channels per layer")
    save_pruned(pruned_ir.model, os.path.join(output, "pruned-model"))
    torch.save(pruned_ir, os.path.join(output, "ir.pt"), pickle_module=dill)


if __name__ == "__main__":
    run_demo()
