"""Input statistics a criterion leaves with the IR, and the refit ``ir.prune()`` does with them by default.

A data-driven criterion (``LossAwareCriterion(input_statistics="auto")``) collects the input
statistics of the layers that read prunable channels while it runs the calibration data, and
hands them to the IR (``PruningIR.hold_statistics``). ``ir.prune(labels=...)`` then refits those
layers by least squares (``pruning_ir.reconstruction``), so the plain four steps give the
pruned model the repair the one call does, with no extra pass over the data.

The refit is only right for the weights the statistics were collected under: it is skipped,
with the reason in ``pruned_ir.reconstruction_note``, when the labels changed, the model is
masked (gradual pruning trains with zeros the refit would undo), or any parameter changed
since collection (a training step, ``zero_labels``): ``torch.Tensor._version`` counts the
in-place writes, and a written parameter whose sum and norm are unchanged was restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .input_statistics import InputStatistics
from .labels import ChannelIndex
from .reconstruction import Reconstruction

if TYPE_CHECKING:
    from .ir import PruningIR

__all__ = ["HeldStatistics", "chosen_reconstruction", "auto_statistics", "AUTO_MEMORY_SHARE", "AUTO_MEMORY_FLOOR",
           "AUTO_MAX_ROWS", "AUTO_MAX_POSITIONS"]

AUTO_MEMORY_SHARE = 0.25          # second moments kept under "auto": a quarter of the model's parameter memory,
AUTO_MEMORY_FLOOR = 64 * 2 ** 20  # or 64 MiB when that is more (small models: every consumer)
AUTO_MAX_ROWS = 2 ** 14           # rows (tokens, sampled conv patches) per layer: enough for a ridge refit
AUTO_MAX_POSITIONS = 256          # conv patches sampled per call: the rows come from more batches


def auto_statistics(ir: "PruningIR") -> InputStatistics:
    """Input statistics with the memory cap of ``input_statistics="auto"``."""
    size = sum(p.numel() * p.element_size() for p in ir.model.parameters())
    return InputStatistics(ir, max_bytes=max(AUTO_MEMORY_FLOOR, int(AUTO_MEMORY_SHARE * size)), max_rows=AUTO_MAX_ROWS,
                           max_positions=AUTO_MAX_POSITIONS, product_dtype=torch.float32)


@dataclass
class HeldStatistics:
    """Statistics collected on an IR, with every parameter's version when collection stopped."""

    statistics: InputStatistics
    versions: dict[str, int]
    fingerprints: dict[str, tuple[float, float]]

    @classmethod
    def taken_now(cls, statistics: InputStatistics, model: nn.Module) -> "HeldStatistics":
        parameters = dict(model.named_parameters(remove_duplicate=False))
        return cls(statistics, {name: p._version for name, p in parameters.items()},
                   {name: _fingerprint(p) for name, p in parameters.items()})

    def stale_reason(self, model: nn.Module, index: ChannelIndex, masked: bool) -> str | None:
        """Why these statistics no longer describe ``model``'s layers, or None when they do."""
        if self.statistics.token != index.token:
            return "the statistics were collected on other labels"
        if masked:
            return "the model is masked (the masked channels were trained as zeros)"
        parameters = dict(model.named_parameters(remove_duplicate=False))
        written = [n for n, p in parameters.items() if self.versions.get(n, -1) != p._version]
        changed = sorted(n for n in written if self.fingerprints.get(n) != _fingerprint(parameters[n]))
        if changed or set(parameters) != set(self.versions):
            return (f"{len(changed) or 'some'} parameters changed since the statistics were collected"
                    f"{' (' + changed[0] + ', ...)' if changed else ''}")
        if not self.statistics.collected():
            return "no layer that reads a prunable channel was seen while collecting"
        return None

    def reconstruction(self) -> Reconstruction:
        """The default refit: least squares, no bias created (configs and state dicts keep their keys)."""
        return Reconstruction(self.statistics, "least_squares", create_bias=False, warn=False)


def _fingerprint(parameter: torch.Tensor) -> tuple[float, float]:
    """Sum and norm in float64: a parameter written and then restored (``measure_removal_costs`` zeroes
    labels in place and copies them back) keeps them, any training step changes them."""
    with torch.no_grad():
        return (float(torch.sum(parameter, dtype=torch.float64)),
                float(torch.linalg.vector_norm(parameter, dtype=torch.float64)))


def chosen_reconstruction(reconstruct: Reconstruction | str | None, held: HeldStatistics | None, model: nn.Module,
                          index: ChannelIndex, masked: bool) -> tuple[Reconstruction | None, str]:
    """What ``prune(reconstruct=...)`` refits with, and a note saying what and why."""
    if reconstruct is None:
        return None, "no refit: reconstruct=None"
    if isinstance(reconstruct, Reconstruction):
        return reconstruct, f"refit by {reconstruct.method} (reconstruct= given)"
    if reconstruct != "auto":
        raise ValueError(f"reconstruct must be a Reconstruction, 'auto' or None, got {reconstruct!r}")
    if held is None:
        return None, "no refit: no input statistics held (LossAwareCriterion(input_statistics='auto') leaves them)"
    stale = held.stale_reason(model, index, masked)
    if stale is not None:
        return None, f"no refit: {stale}"
    return held.reconstruction(), "refit by least squares from the input statistics the criterion collected"
