"""The demo's report pieces that go beyond text: charts of what a prune kept and removed, and the
Knapsack selector's iterations as table rows.

The charts are horizontal: one row per layer (or dependency group), the figure's height growing
with the rows so that labels never overlap, long names shortened from the left. With more rows
than ``max_rows``, consecutive layers sharing a module-path prefix fold into one row (a block,
then a stage), so a 100-layer model stays readable; ``max_rows=None`` keeps one row per layer.

Plotting needs matplotlib (``pip install 'pruning-ir[demo]'``), imported only when a chart is
drawn. The plain-text tables shared with ``pruning-ir prune`` live in :mod:`pruning_ir.text_tables`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..prune_report import PruneReport

__all__ = ["layer_widths", "fold_names", "channels_figure", "plot_channels", "report_figure", "plot_report",
           "knapsack_rows", "KNAPSACK_HEADERS"]

KNAPSACK_HEADERS = ("iteration", "aim", "estimated", "measured", "kept score", "labels removed", "latency calls")

MAX_ROWS = 60          # more rows than this: consecutive layers of a block (then a stage) fold into one
ROW_INCHES = 0.22      # height of one row; an 8-point label is about half of it
FRAME_INCHES = 1.9     # title, legend, axis labels and tick labels above and below the rows
LABEL_CHARACTERS = 40  # longer names are shortened from the left ("...blocks.11.conv2")
FONT_POINTS = 8
MAX_PIXELS = 60000     # Agg draws at most 2**16 pixels a side: very tall charts get a lower dpi
KEPT, REMOVED = "#2f6db5", "#d0d7e1"


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer, by module path."""
    widths = {}
    for path, module in model.named_modules():
        width = getattr(module, "out_channels", getattr(module, "out_features", None))
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(width, int):
            widths[path] = width
    return widths


def _shorten(text: str, limit: int = LABEL_CHARACTERS) -> str:
    """``text`` cut from the left to ``limit`` characters: the end of a module path names it best."""
    return text if len(text) <= limit else "..." + text[len(text) - limit + 3:]


def _runs(keys: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Consecutive equal keys merged: (key, positions) in order."""
    runs: list[tuple[str, list[int]]] = []
    for position, key in enumerate(keys):
        if runs and runs[-1][0] == key:
            runs[-1][1].append(position)
        else:
            runs.append((key, [position]))
    return runs


def _span(first: str, last: str) -> str:
    """``blocks.3.conv .. 7.conv``: two names with their shared leading path written once."""
    head, tail = first.split("."), last.split(".")
    shared = 0
    while shared < min(len(head), len(tail)) - 1 and head[shared] == tail[shared]:
        shared += 1
    return ".".join(head[:shared] + [".".join(head[shared:]) + " .. " + ".".join(tail[shared:])])


def fold_names(names: Sequence[str], max_rows: int | None = MAX_ROWS) -> list[tuple[str, list[int]]]:
    """Rows for ``names`` (module paths, in model order): (label, positions folded into the row).

    At most ``max_rows`` rows. Consecutive names sharing their first ``d`` path components (a
    block, a stage) fold into one row, for the deepest ``d`` that fits; the level below it then
    folds in equal runs of consecutive blocks so that the rows fill ``max_rows``
    (``stages.0.0 .. 1 x4``: blocks 0 to 1 of ``stages.0``, 4 layers). ``max_rows=None``, or no
    more names than that, gives one row per name."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive int or None, not {max_rows!r}")
    names = [name or "<model>" for name in names]
    if max_rows is None or len(names) <= max_rows:
        return [(name, [position]) for position, name in enumerate(names)]
    depth = max(name.count(".") + 1 for name in names)
    levels = [_runs([".".join(name.split(".")[:prefix]) for name in names]) for prefix in range(depth + 1)]
    fitting = max(prefix for prefix in range(depth + 1) if len(levels[prefix]) <= max_rows)
    if fitting == depth:  # repeated names (groups starting at the same module) merged: that is enough
        return [(key if len(members) == 1 else f"{key} x{len(members)}", members) for key, members in levels[depth]]
    parents, children = levels[fitting], levels[fitting + 1]
    families: list[list[tuple[str, list[int]]]] = [[] for _ in parents]
    parent_of = {position: index for index, (_, positions) in enumerate(parents) for position in positions}
    for child in children:
        families[parent_of[child[1][0]]].append(child)
    size = next(k for k in range(1, len(names) + 1)
                if sum(math.ceil(len(family) / k) for family in families) <= max_rows)
    rows = []
    for (parent, _), family in zip(parents, families):
        for start in range(0, len(family), size):
            chunk = family[start:start + size]
            positions = [position for _, members in chunk for position in members]
            label = (chunk[0][0] if len(chunk) == 1 else parent if parent and len(chunk) == len(family)
                     else _span(chunk[0][0], chunk[-1][0]))
            rows.append((label if len(positions) == 1 else f"{label} x{len(positions)}", positions))
    return rows


@dataclass
class _Panel:
    """One column of a chart: per row a dark bar (``filled``), optionally a light one stacked after
    it (``rest``), and a short note at the bar's end."""

    title: str
    filled: list[float]
    rest: list[float] | None
    notes: list[str]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the demo's chart needs matplotlib: pip install 'pruning-ir[demo]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _figure(labels: list[str], panels: list[_Panel], title: str, legend: tuple[str, str] | None) -> Figure:
    """Horizontal bars, one row per label, top to bottom; the height grows with the rows."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = len(labels)
    height = FRAME_INCHES + ROW_INCHES * rows
    width = max(0.075 * max(len(label) for label in labels) + 0.8 + 3.4 * len(panels),
                0.085 * max(len(line) for line in title.splitlines() or [""]) + 0.6)
    figure, axes_list = plt.subplots(1, len(panels), figsize=(width, height), sharey=True, squeeze=False,
                                     layout="constrained", dpi=min(120.0, MAX_PIXELS / height))
    positions = list(range(rows))
    for axes, panel in zip(axes_list[0], panels):
        axes.barh(positions, panel.filled, height=0.7, color=KEPT)
        ends = list(panel.filled)
        if panel.rest is not None:
            axes.barh(positions, panel.rest, left=panel.filled, height=0.7, color=REMOVED)
            ends = [a + b for a, b in zip(panel.filled, panel.rest)]
        top = max(ends + [1e-12])
        for position, end, note in zip(positions, ends, panel.notes):
            axes.text(end + 0.02 * top, position, note, va="center", fontsize=FONT_POINTS - 1.5, color="#333333")
        axes.set_xlim(0, top * 1.3)
        for shaded in positions[1::2]:
            axes.axhspan(shaded - 0.5, shaded + 0.5, color="#f3f4f6", zorder=0)
        axes.set_title(panel.title, fontsize=FONT_POINTS + 1)
        axes.tick_params(axis="x", labelsize=FONT_POINTS - 1, labeltop=rows > 25, top=rows > 25)
        axes.tick_params(axis="y", length=0)
    first = axes_list[0][0]
    first.set_yticks(positions, labels, fontsize=FONT_POINTS)
    first.set_ylim(rows - 0.5, -0.5)
    figure.suptitle(title, fontsize=FONT_POINTS + 3)
    if legend is not None:
        figure.legend(handles=[Patch(color=KEPT, label=legend[0]), Patch(color=REMOVED, label=legend[1])],
                      loc="outside lower center", ncols=2, fontsize=FONT_POINTS, frameon=False)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> str:
    try:
        figure.savefig(path)
    finally:
        _pyplot().close(figure)
    return os.fspath(path)


def channels_figure(original: nn.Module, pruned: nn.Module, title: str = "",
                    max_rows: int | None = MAX_ROWS) -> Figure:
    """The chart :func:`plot_channels` writes, as a matplotlib figure (the caller closes it)."""
    before, after = layer_widths(original), layer_widths(pruned)
    names = [name for name in before if name in after]
    if not names:
        raise ValueError("the two models share no conv or linear layer by module path: nothing to plot")
    rows = fold_names(names, max_rows)
    kept = [sum(after[names[p]] for p in positions) for _, positions in rows]
    total = [sum(before[names[p]] for p in positions) for _, positions in rows]
    panel = _Panel("output channels", kept, [t - k for t, k in zip(total, kept)],
                   [f"{k} / {t}" for k, t in zip(kept, total)])
    folded = len(rows) < len(names)
    heading = (title or "channels kept per layer") + (
        f"\n{len(names)} layers in {len(rows)} rows: 'xN' folds N consecutive layers, channels summed"
        if folded else "")
    return _figure([_shorten(label) for label, _ in rows], [panel], heading, ("kept", "removed"))


def plot_channels(original: nn.Module, pruned: nn.Module, path: str | os.PathLike, title: str = "",
                  max_rows: int | None = MAX_ROWS) -> str:
    """A horizontal bar chart of the output channels each conv/linear layer keeps and loses, written
    to ``path`` (PNG); more than ``max_rows`` layers fold by block or stage (see :func:`fold_names`)."""
    return _save(channels_figure(original, pruned, title, max_rows), path)


def _group_label(modules: Sequence[str], group: int | str) -> str:
    """``layer1.0.conv1 +3 [12]``: the group's first module, how many more, its id (kept when shortened)."""
    suffix = (f" +{len(modules) - 1}" if len(modules) > 1 else "") + f" [{group}]"
    return _shorten(modules[0] if modules else "<model>", LABEL_CHARACTERS - len(suffix)) + suffix


def _share(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def report_figure(report: PruneReport, title: str = "", max_rows: int | None = MAX_ROWS) -> Figure:
    """The chart :func:`plot_report` writes, as a matplotlib figure (the caller closes it)."""
    groups = list(report.groups)
    if not groups:
        raise ValueError("the report has no prunable group: nothing to plot")
    names = [g.modules[0] if g.modules else "<model>" for g in groups]
    rows = fold_names(names, max_rows)
    chosen = [[groups[p] for p in positions] for _, positions in rows]
    labels = [_group_label(groups[positions[0]].modules, groups[positions[0]].group) if len(positions) == 1
              else _shorten(label) for label, positions in rows]
    removed = [sum(g.removed for g in row) for row in chosen]
    total = [sum(g.labels for g in row) for row in chosen]
    panels = [_Panel("labels removed (% of the row's)", [_share(r, t) for r, t in zip(removed, total)], None,
                     [f"{r} / {t}" for r, t in zip(removed, total)])]
    if all(g.parameters_removed is not None and g.macs_removed is not None for g in groups):
        params = [sum(g.parameters_removed for g in row) for row in chosen]
        flops = [sum(g.macs_removed for g in row) for row in chosen]
        params_share = [_share(p, report.params_before) for p in params]
        macs_share = [_share(m, report.macs_before) for m in flops]
        panels += [_Panel("parameters removed (% of the model's)", params_share, None,
                          [f"{s:.1f}%" for s in params_share]),
                   _Panel("MACs removed (% of the model's)", macs_share, None, [f"{s:.1f}%" for s in macs_share])]
    folded = len(rows) < len(groups)
    heading = (title or f"what pruning removed: {report.labels_removed} labels, parameters "
               f"{report.params_ratio:.2f} and MACs {report.macs_ratio:.2f} of the original kept") + (
        f"\n{len(groups)} groups in {len(rows)} rows ('xN': N consecutive groups summed); "
        "each group's savings measured alone" if folded else "\neach group's savings measured alone")
    return _figure(labels, panels, heading, None)


def plot_report(report: PruneReport, path: str | os.PathLike, title: str = "",
                max_rows: int | None = MAX_ROWS) -> str:
    """A PNG of what :func:`pruning_ir.prune` removed per group: the share of its labels, and the
    parameters and MACs that removal saves (shares of the model's); groups fold as in :func:`fold_names`."""
    return _save(report_figure(report, title, max_rows), path)


def knapsack_rows(history: Sequence[Any]) -> list[tuple]:
    """The Knapsack selector's iterations (``selector.history``) as table rows, under ``KNAPSACK_HEADERS``."""
    return [(record.iteration, f"{record.aim:.4g}", f"{record.estimated:.4g}",
             "-" if record.measured is None else f"{record.measured:.4g}", f"{record.kept_score:.4g}",
             record.removed_labels, record.latency_calls) for record in history]
