"""One iteration of a latency-budget knapsack, as ``KnapsackLabelSelector.history`` records it
(its own module: both the linearized and the table-driven loops write it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KnapsackIteration"]


@dataclass(frozen=True)
class KnapsackIteration:
    """What one iteration aimed at, estimated and measured (kept in ``selector.history``)."""

    iteration: int
    aim: float
    estimated: float
    measured: float | None       # None: the latency function could not measure the selection
    kept_score: float
    removed_labels: int
    latency_calls: int
