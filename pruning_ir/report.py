"""Reports of a pruning run: before/after tables, channels per group and per layer, a bar chart.

Shared by the demo and the ``pruning-ir prune`` command, so both write the same report.md.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .ir import PruningIR
from .labels import Label

__all__ = ["markdown_table", "group_channels", "layer_widths", "plot_channels", "knapsack_rows", "format_count"]


def format_count(value: float) -> str:
    """1234567 -> '1.23M': readable parameter and MAC counts."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def group_channels(ir: PruningIR, labels: Iterable[Label]) -> list[tuple[int, str, int, int]]:
    """Per prunable group: (id, its first modules, channels before, channels after removing ``labels``)."""
    removed = Counter(label.group.id for label in labels)
    rows = []
    for group in ir.groups:
        if group.prunable:
            modules = ", ".join(group.modules[:3]) + (" ..." if len(group.modules) > 3 else "")
            rows.append((group.id, modules or "-", group.channel_count, group.channel_count - removed[group.id]))
    return rows


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
    import matplotlib
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
    """The Knapsack selector's iterations (``selector.history``) as table rows."""
    return [(record.iteration, f"{record.aim:.4g}", f"{record.estimated:.4g}",
             "-" if record.measured is None else f"{record.measured:.4g}", f"{record.kept_score:.4g}",
             record.removed_labels, record.latency_calls) for record in history]


KNAPSACK_HEADERS = ("iteration", "aim", "estimated", "measured", "kept score", "labels removed", "latency calls")
