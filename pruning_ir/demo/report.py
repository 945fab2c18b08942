"""The demo's report pieces that go beyond text: a bar chart of channels per layer, and the
Knapsack selector's iterations as table rows.

Plotting needs matplotlib (``pip install 'pruning-ir[demo]'``), imported only when a chart is
drawn. The plain-text tables shared with ``pruning-ir prune`` live in :mod:`pruning_ir.text_tables`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["layer_widths", "plot_channels", "knapsack_rows", "KNAPSACK_HEADERS"]

KNAPSACK_HEADERS = ("iteration", "aim", "estimated", "measured", "kept score", "labels removed", "latency calls")


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer, by module path."""
    widths = {}
    for path, module in model.named_modules():
        width = getattr(module, "out_channels", getattr(module, "out_features", None))
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(width, int):
            widths[path] = width
    return widths


def plot_channels(original: nn.Module, pruned: nn.Module, path: str | os.PathLike, title: str = "") -> str:
    """A bar chart of the channels each conv/linear layer keeps (matplotlib, written to ``path``)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the demo's chart needs matplotlib: pip install 'pruning-ir[demo]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = layer_widths(original), layer_widths(pruned)
    names = [name for name in before if name in after]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
    positions = range(len(names))
    axes.bar(positions, [before[n] for n in names], color="#d0d7e1", label="before")
    axes.bar(positions, [after[n] for n in names], color="#2f6db5", label="after")
    axes.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("output channels")
    axes.set_title(title or "channels kept per layer")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return os.fspath(path)


def knapsack_rows(history: Sequence[Any]) -> list[tuple]:
    """The Knapsack selector's iterations (``selector.history``) as table rows, under ``KNAPSACK_HEADERS``."""
    return [(record.iteration, f"{record.aim:.4g}", f"{record.estimated:.4g}",
             "-" if record.measured is None else f"{record.measured:.4g}", f"{record.kept_score:.4g}",
             record.removed_labels, record.latency_calls) for record in history]
