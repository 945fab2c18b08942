"""One iteration of a latency-budget knapsack, as ``KnapsackLabelSelector.history`` records it
(its own module: both the linearized and the table-driven loops write it, and so does the
final check of the selection on the real model, ``band.settle_in_band``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KnapsackIteration"]


@dataclass(frozen=True)
class KnapsackIteration:
    """What one iteration aimed at, estimated and measured (kept in ``selector.history``).

    ``checked``: the measurement is a check of the real model (repeated in rotation with the
    unpruned model), not a loop's single measurement; ``spread``: the largest over the smallest
    pruned/unpruned ratio of that check's repeats (1.0 for a deterministic function), the noise
    the check saw.
    """

    iteration: int
    aim: float
    estimated: float
    measured: float | None       # None: the latency function could not measure the selection
    kept_score: float
    removed_labels: int
    latency_calls: int
    checked: bool = False
    spread: float | None = None
