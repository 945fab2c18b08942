"""Latency-targeted baseline: remove the globally lowest scores, binary-searching how many."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..errors import BudgetUnreachableError, LatencyMeasurementError
from .base import LabelSelector
from .constraint import ChannelConstraint
from .oracle import LatencyOracle, check_function, check_target
from .plan import SelectionPlan, Step

__all__ = ["BinarySearchLatencyLabelSelector", "shortest_feasible_prefix", "check_reachable", "check_met"]


def check_reachable(oracle: LatencyOracle, plan: SelectionPlan, target: float) -> float | None:
    """Latency of the smallest reachable model (None if unmeasurable); an error if ``target`` is below it."""
    try:
        lowest = oracle(plan.max_counts())
    except LatencyMeasurementError:
        return None
    if target < lowest:
        raise BudgetUnreachableError(
            f"target_latency {target:.6g} is below the smallest reachable latency {lowest:.6g} (every group "
            f"pruned as far as the channel constraint allows); choose a target >= {lowest:.6g}", target, lowest)
    return lowest


def check_met(oracle: LatencyOracle, counts: np.ndarray, target: float) -> np.ndarray:
    """``counts`` if its latency meets ``target``; else an error (only when no selection could be measured)."""
    try:
        latency = oracle(counts)
    except LatencyMeasurementError as error:
        raise ValueError(f"no measurable selection meets target_latency {target:.6g}: {error}") from error
    if latency > target:
        raise ValueError(f"no measurable selection meets target_latency {target:.6g}; the best one reached "
                         f"{latency:.6g}")
    return counts


def shortest_feasible_prefix(oracle: LatencyOracle, plan: SelectionPlan, start: np.ndarray, steps: list[Step],
                             target: float, progress: tqdm | None = None) -> np.ndarray:
    """The shortest prefix of ``steps`` taken from ``start`` whose latency is <= ``target``.

    Assumes latency does not grow as labels leave; a configuration the latency function
    cannot measure counts as too slow. Returns the full prefix if nothing shorter is feasible.
    """
    low, high = 0, len(steps)           # numbers of steps taken: low is too slow, high is fast enough
    while high - low > 1:
        middle = (low + high) // 2
        try:
            feasible = oracle(plan.apply(start, steps[:middle])) <= target
        except LatencyMeasurementError:
            feasible = False
        if progress is not None:
            progress.update(1)
        low, high = (low, middle) if feasible else (middle, high)
    return plan.apply(start, steps[:high])


class BinarySearchLatencyLabelSelector(LabelSelector):
    """Removes the network-wide lowest-scored labels, as many as ``target_latency`` requires.

    The cheap baseline for :class:`KnapsackLabelSelector`: about log2(#labels) latency calls,
    no solver, but blind to how much latency each label actually costs. ``normalize``: as for
    :class:`GlobalScoreLabelSelector` (see :class:`LabelSelector`). After ``select``:
    ``latency_calls``, ``latency`` (measured latency of the returned selection).
    """

    def __init__(self, target_latency: float, latency_calculation_function: Callable[[nn.Module], float],
                 constraint: ChannelConstraint | None = None, *, normalize: str | None = None,
                 verbose: bool = False):
        super().__init__(constraint, normalize)
        self.target_latency = check_target(target_latency)
        self.latency_calculation_function = check_function(latency_calculation_function)
        self.verbose = verbose
        self.latency_calls = 0
        self._latency_cache: dict = {}  # IR token -> counts -> latency (LatencyOracle)
        self.latency: float | None = None

    def _select_counts(self, plan: SelectionPlan) -> np.ndarray:
        oracle = LatencyOracle(plan, self.latency_calculation_function, self._latency_cache)
        base = plan.base_counts()
        try:
            self.latency = oracle(base)
            if self.latency <= self.target_latency:
                return base
            check_reachable(oracle, plan, self.target_latency)
            steps = plan.steps(base)
            with tqdm(total=int(np.ceil(np.log2(len(steps) + 1))), desc="binary search", disable=not self.verbose,
                      leave=False) as progress:
                counts = shortest_feasible_prefix(oracle, plan, base, steps, self.target_latency, progress)
            counts = check_met(oracle, counts, self.target_latency)
            self.latency = oracle(counts)
            return counts
        finally:
            self.latency_calls = oracle.calls
