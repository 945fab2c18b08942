"""What the one call (:func:`pruning_ir.prune`) reports: the recipe, the budget asked and reached,
every group's removal, the time of each phase, and the notes its warnings became."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["PruneReport", "GroupReport", "BUDGETS"]

BUDGETS = {"macs": "MACs kept", "params": "parameters kept", "latency": "latency kept", "ratio": "labels removed"}


@dataclass(frozen=True)
class GroupReport:
    """One dependency group: its modules, labels before and removed (``channels``: the removed
    labels' positions in ``group.labels`` of the original IR), and the parameters and MACs their
    removal alone saves on the original model (None with ``inplace=True``: no original is left)."""

    group: int
    modules: tuple[str, ...]
    labels: int
    removed: int
    channels: tuple[int, ...]
    parameters_removed: int | None
    macs_removed: float | None


@dataclass
class PruneReport:
    """What :func:`prune` did: the recipe, the budget asked and reached, every group, the time
    of each phase. ``*_before`` / ``*_after`` are measured on ``example_inputs``."""

    recipe: str
    data_free: bool
    budget: str                      # "macs", "params", "latency" or "ratio"
    asked: float                     # the fraction (share of labels, for "ratio") asked for
    reached: float                   # the same quantity, measured on the pruned model
    macs_before: float
    macs_after: float
    params_before: float
    params_after: float
    latency_before: float | None = None
    latency_after: float | None = None
    groups: list[GroupReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_before is None or self.latency_after is None or not self.latency_before:
            return None
        return self.latency_after / self.latency_before

    @property
    def labels_removed(self) -> int:
        return sum(g.removed for g in self.groups)

    def plot(self, path: str | os.PathLike, title: str = "", *, max_rows: int | None = 60) -> str:
        """A PNG of what was removed per group (labels, parameters, MACs), readable at hundreds of
        groups: past ``max_rows`` consecutive groups fold by block or stage. Needs matplotlib."""
        from .demo.report import plot_report

        return plot_report(self, path, title, max_rows=max_rows)

    def __str__(self) -> str:
        lines = [f"pruning_ir.prune: {self.recipe}",
                 f"budget: {self.budget}={self.asked:g} ({BUDGETS[self.budget]}), reached {self.reached:.4f}",
                 f"MACs:       {self.macs_before:14,.0f} -> {self.macs_after:14,.0f} ({self.macs_ratio:.4f})",
                 f"parameters: {self.params_before:14,.0f} -> {self.params_after:14,.0f} ({self.params_ratio:.4f})"]
        if self.latency_ratio is not None:
            lines.append(f"latency:    {self.latency_before * 1e3:12.4f} ms -> {self.latency_after * 1e3:12.4f} ms "
                         f"({self.latency_ratio:.4f})")
        total = sum(g.labels for g in self.groups)
        lines.append(f"labels removed: {self.labels_removed} of {total} in {len(self.groups)} prunable groups "
                     "(parameters and MACs: what removing that group's labels alone saves)")
        lines.append(f"{'group':>5} {'labels':>7} {'removed':>8} {'parameters removed':>19} {'MACs removed':>16}  "
                     "modules")
        for g in self.groups:
            params = "-" if g.parameters_removed is None else f"{g.parameters_removed:,}"
            flops = "-" if g.macs_removed is None else f"{g.macs_removed:,.0f}"
            modules = ", ".join(g.modules[:2]) + (", ..." if len(g.modules) > 2 else "")
            row = f"{g.group:>5} {g.labels:>7} {g.removed:>8} {params:>19} {flops:>16}  {modules}"
            lines.append(row if len(row) <= 120 else row[:116] + " ...")
        lines.append("time: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.timings.items()))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(_wrap(line, 120) for line in lines)


def _wrap(line: str, width: int) -> str:
    """``line`` broken at spaces into lines of at most ``width`` characters (continuations indented)."""
    if len(line) <= width:
        return line
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = "    " + word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\n".join(out)
