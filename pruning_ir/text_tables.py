"""Plain-text report helpers: readable counts, markdown tables, channels per dependency group.

Core (no plotting, no datasets), so the ``pruning-ir prune`` command and the demo write their
report.md tables with the same code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .labels import Label

__all__ = ["format_count", "markdown_table", "group_channels"]


def format_count(value: float) -> str:
    """1234567 -> '1.23M': readable parameter and MAC counts."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: one header row, then one line per row (cells through ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def group_channels(ir: Any, labels: Iterable[Label]) -> list[tuple[int, str, int, int]]:
    """Per prunable group of ``ir`` (a PruningIR; not imported: the IR module imports this one): (id, its first modules, channels before, channels after removing ``labels``)."""
    removed = Counter(label.group.id for label in labels)
    rows = []
    for group in ir.groups:
        if group.prunable:
            modules = ", ".join(group.modules[:3]) + (" ..." if len(group.modules) > 3 else "")
            rows.append((group.id, modules or "-", group.channel_count, group.channel_count - removed[group.id]))
    return rows
