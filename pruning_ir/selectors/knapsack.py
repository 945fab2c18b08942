"""Latency-constrained selection: an iterated knapsack (HALP-style), solved by OR-Tools.

Latency is not additive over labels, so each iteration linearizes it around the current
selection: for every group, prune one more chunk of labels (or one fewer) on a copy and
measure, giving that group's latency per label; a CP-SAT knapsack then keeps the most score
under the budget; the result is measured for real and becomes the next linearization point.
The linear model misses interactions (two shrinking layers sharing one convolution save
less than the sum of their estimates), so each group moves within a trust region that
shrinks as the target gets close, and on the last leg the budget is corrected from the
measured error (secant) and solved again on the same estimate: one latency call instead of
one per group.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_share
from ..errors import LatencyMeasurementError
from ..latency import TableLatency
from .base import LabelSelector
from .band import CHECK_STATISTICS, settle_in_band
from .binary_search import check_reachable, shortest_feasible_prefix
from .constraint import ChannelConstraint
from .iteration import KnapsackIteration
from .latency_table import LatencyTable
from .multiple_choice import MIN_TRUST_RADIUS, select_with_table, trust_region
from .oracle import LatencyOracle, check_function, check_target
from .plan import SelectionPlan
from .solver import Linearization, solve_knapsack

__all__ = ["KnapsackLabelSelector", "KnapsackIteration"]


class KnapsackLabelSelector(LabelSelector):
    """Keeps the most total score with ``latency_calculation_function(model) <= target_latency``.

    Each iteration aims at ``max(current * (1 - max_relative_latency_step), target)``, so large
    speed-ups are reached in steps; it stops once the measured latency lies within
    ``tolerance`` (a share of the target) below the target, or after ``max_iterations``,
    returning the feasible selection with the most score. ``strict_label_order`` makes labels
    leave each group in ascending score order. A target at or above the current latency
    selects nothing; one below the smallest reachable model raises ValueError naming it.
    The loop's answer is then checked on the real model (``check_repeats`` fresh pruned/unpruned
    pairs, read by ``check_statistic``: ``"median"`` pair ratio or ``"fastest"`` of each model,
    ``selectors/band.py``) and stepped until it lies in the band, at most ``max_checks``
    checks (0: no check). After ``select``: ``history`` (one :class:`KnapsackIteration` each,
    checks included), ``latency_calls``, ``latency`` (measured latency of the returned
    selection), ``in_band``. The kept score is a sum over
    groups, so scores must be comparable across groups: ``normalize`` as in
    :class:`LabelSelector` (LossAwareCriterion scores: raw, with its default joint scores).
    With ``latency_table=`` a :class:`LatencyTable` (or a ``pruning_ir.latency.TableLatency`` as
    the function), each iteration solves a multiple-choice knapsack over per-group latency
    tables instead of measuring linearizations (``multiple_choice.py``); the function still
    measures each solution on the real model.
    """

    CORRECTIONS_PER_ESTIMATE = 2   # budget corrections on one linearization before measuring a new one
    MIN_TRUST_RADIUS = MIN_TRUST_RADIUS   # a group may always move this share of its labels per solve

    def __init__(self, target_latency: float, latency_calculation_function: Callable[[nn.Module], float],
                 strict_label_order: bool = True, channels_constraint: ChannelConstraint | None = None,
                 max_iterations: int = 15, solver_execution_time_limit: float = 60, verbose: bool = True, *,
                 max_relative_latency_step: float = 0.5, constraint: ChannelConstraint | None = None,
                 tolerance: float = 0.02, chunk_fraction: float = 0.5, normalize: str | None = None,
                 latency_table: LatencyTable | None = None, check_repeats: int = 3, max_checks: int = 6,
                 check_statistic: str = "median"):
        if channels_constraint is not None and constraint is not None and channels_constraint != constraint:
            raise ValueError("pass the channel constraint once: channels_constraint= and constraint= are one argument")
        super().__init__(channels_constraint if channels_constraint is not None else constraint, normalize)
        self.target_latency = check_target(target_latency)
        self.latency_calculation_function = check_function(latency_calculation_function)
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
        if not solver_execution_time_limit > 0:
            raise ValueError(f"solver_execution_time_limit must be positive seconds, got {solver_execution_time_limit}")
        check_share("max_relative_latency_step", max_relative_latency_step, "(0, 1]")
        check_share("tolerance", tolerance, "[0, 1)")
        check_share("chunk_fraction", chunk_fraction, "(0, 1]")
        self.strict_label_order = bool(strict_label_order)
        self.max_iterations = max_iterations
        self.solver_execution_time_limit = float(solver_execution_time_limit)
        self.verbose = bool(verbose)
        self.max_relative_latency_step = float(max_relative_latency_step)
        self.tolerance = float(tolerance)
        self.chunk_fraction = float(chunk_fraction)
        self.history: list[KnapsackIteration] = []
        self.latency_calls = 0
        self._latency_cache: dict = {}  # IR token -> counts -> latency (LatencyOracle)
        self.latency: float | None = None
        if isinstance(max_checks, bool) or not isinstance(max_checks, int) or max_checks < 0:
            raise ValueError(f"max_checks must be an int >= 0 (0: no check), got {max_checks!r}")
        self.check_repeats, self.max_checks = check_repeats, max_checks
        if check_statistic not in CHECK_STATISTICS:
            raise ValueError(f"check_statistic must be one of {CHECK_STATISTICS}, got {check_statistic!r}")
        self.check_statistic = check_statistic
        self.in_band: bool | None = None
        if latency_table is not None and not isinstance(latency_table, LatencyTable):
            raise TypeError(f"latency_table must be a LatencyTable, got {type(latency_table).__name__}")
        # a table (given, or described by a TableLatency function): multiple-choice knapsack
        self.latency_table = latency_table
        if latency_table is None and isinstance(latency_calculation_function, TableLatency):
            self.latency_table = LatencyTable.from_function(latency_calculation_function, verbose=self.verbose)

    @property
    def channels_constraint(self) -> ChannelConstraint:
        return self.constraint

    # -- the iteration ------------------------------------------------------------------------
    def _select_counts(self, plan: SelectionPlan) -> np.ndarray:
        oracle = LatencyOracle(plan, self.latency_calculation_function, self._latency_cache)
        self.history = []
        try:
            if self.latency_table is not None:
                counts, self.latency = select_with_table(self, plan, oracle, self.latency_table)
            else:
                counts, self.latency = self._iterate(plan, oracle)
            calls = 0
            if self.max_checks:   # the loop's answer checked on the real model, stepped into the band
                band = settle_in_band(plan, oracle, counts, self.target_latency, self.tolerance,
                                      table=self.latency_table, repeats=self.check_repeats,
                                      max_checks=self.max_checks, first_iteration=len(self.history) + 1,
                                      verbose=self.verbose, statistic=self.check_statistic)
                self.history += band.checks
                counts, self.latency, self.in_band, calls = band.counts, band.latency, band.in_band, band.latency_calls
        finally:
            self.latency_calls = oracle.calls
        self.latency_calls += calls
        if self.verbose:
            tqdm.write(f"selected {int(counts.sum())} labels: latency {self.latency:.6g} "
                       f"({self.latency / self.target_latency:.3f} x target), {oracle.calls} latency calls")
        return counts

    def _iterate(self, plan: SelectionPlan, oracle: LatencyOracle) -> tuple[np.ndarray, float]:
        target = self.target_latency
        current = plan.base_counts()
        reference = current_latency = oracle(current)
        if target >= current_latency:
            return current, current_latency
        lowest = plan.max_counts()
        lowest_latency = check_reachable(oracle, plan, target)
        feasible = [] if lowest_latency is None else [(plan.kept_score(lowest), lowest_latency, lowest)]
        closest: tuple[float, np.ndarray] | None = None
        linear, tried = None, []
        seen, centres = {current.tobytes()}, {current.tobytes()}   # measured / estimated-around selections
        converged, unmeasurable = False, []
        bar = tqdm(total=self.max_iterations, desc="knapsack", disable=not self.verbose, leave=False)
        floor = "unmeasurable" if lowest_latency is None else f"{lowest_latency:.6g}"
        self._say(bar, f"latency {reference:.6g} -> target {target:.6g} (smallest reachable {floor})")
        try:
            for iteration in range(1, self.max_iterations + 1):
                final = current_latency * (1 - self.max_relative_latency_step) <= target
                # the last leg aims inside the tolerance band, not at its edge
                aim = target * (1 - self.tolerance / 2) if final else \
                    current_latency * (1 - self.max_relative_latency_step)
                if linear is None:
                    linear = self._linearize(plan, oracle, current, current_latency, aim)
                    tried = []
                budget = max(self._corrected_budget(aim, tried), linear.lowest())
                counts = solve_knapsack(plan, linear, budget, reference, self.strict_label_order,
                                        self.solver_execution_time_limit, unmeasurable)
                if counts is None:
                    counts = plan.repair(linear.most())
                estimated = linear.estimate(counts)
                try:
                    measured = oracle(counts)
                except LatencyMeasurementError:
                    measured = None
                record = KnapsackIteration(iteration, aim, estimated, measured, plan.kept_score(counts),
                                           int(counts.sum()), oracle.calls)
                self.history.append(record)
                bar.update(1)
                bar.set_postfix(latency_calls=oracle.calls)
                self._say(bar, self.describe_iteration(record, plan))
                if measured is None:    # the function cannot measure it: solve again without it
                    unmeasurable.append(counts)
                    continue
                if measured <= target:
                    feasible.append((record.kept_score, measured, counts))
                elif closest is None or measured < closest[0]:
                    closest = (measured, counts)
                if target * (1 - self.tolerance) <= measured <= target:
                    break
                if not tried and np.array_equal(counts, current):
                    converged = True    # the estimate around this selection gives it back: a fixed point
                    break
                repeated = counts.tobytes() in seen
                seen.add(counts.tobytes())
                tried.append((estimated, measured))
                if repeated or not (final and len(tried) <= self.CORRECTIONS_PER_ESTIMATE):
                    if counts.tobytes() in centres:
                        converged = True   # back to a selection already estimated around: a cycle
                        break
                    linear, current, current_latency = None, counts, measured
                    centres.add(counts.tobytes())
        finally:
            bar.close()
        return self.best_selection(plan, oracle, feasible, closest, converged)

    def best_selection(self, plan: SelectionPlan, oracle: LatencyOracle, feasible: list,
              closest: tuple[float, np.ndarray] | None, converged: bool) -> tuple[np.ndarray, float]:
        """The feasible selection with the most score: measured, or completed by binary search.

        Completions follow the network-wide lowest-score order (what
        BinarySearchLatencyLabelSelector does). From no pruning: the longest prefix of that order
        that keeps more score than the best selection is measured (one call), and only if it
        meets the target is the shortest such prefix searched for, so the result never keeps
        less score than that baseline, even when noisy measurements mislead the estimates.
        From the closest infeasible selection, when the best one lies below the tolerance band.
        """
        target = self.target_latency

        def best() -> tuple[float, float, np.ndarray | None]:
            candidates = [f for f in feasible if f[1] <= target]
            return max(candidates, key=lambda f: (f[0], f[1])) if candidates else (-np.inf, 0.0, None)

        def complete(start: np.ndarray, steps: list) -> None:
            try:
                if oracle(plan.apply(start, steps)) > target:
                    return
                completed = shortest_feasible_prefix(oracle, plan, start, steps, target)
                feasible.append((plan.kept_score(completed), oracle(completed), completed))
            except LatencyMeasurementError:
                pass

        score = best()[0]
        base = plan.base_counts()
        steps = plan.steps(base)
        removed = np.cumsum([0.0] + [plan.step_score(s) for s in steps])
        better = np.flatnonzero(plan.kept_score(base) - removed > score)
        if better.size:
            complete(base, steps[:int(better.max())])
        score, latency, counts = best()
        if latency < target * (1 - self.tolerance) and closest is not None:
            complete(closest[1], plan.steps(closest[1]))
            score, latency, counts = best()
        if counts is None:
            raise ValueError(f"no measurable selection meets target_latency {target:.6g}; the closest "
                             f"measured one reached {closest[0]:.6g}" if closest else
                             f"no selection meeting target_latency {target:.6g} could be measured")
        if latency < target * (1 - self.tolerance) and not converged and len(self.history) >= self.max_iterations:
            # stopped by the iteration limit, not by a selection inside the band: the result is the feasible
            # selection that keeps the most score, further below the target than the tolerance allows
            warnings.warn(f"KnapsackLabelSelector used all {self.max_iterations} iterations without a selection in "
                          f"[{target * (1 - self.tolerance):.6g}, {target:.6g}] (target {target:.6g}, tolerance "
                          f"{self.tolerance:.0%}); it returns the feasible selection keeping the most score, at "
                          f"{latency:.6g}. Raise max_iterations for a closer fit; with a measured (noisy) latency, "
                          "widen tolerance or measure with statistic='min'", RuntimeWarning, stacklevel=4)
        return counts, latency

    @staticmethod
    def _corrected_budget(aim: float, tried: list[tuple[float, float]]) -> float:
        """The estimated latency to ask for so that the measured one lands on ``aim``.

        From the (estimated, measured) pairs already solved on this linearization: a secant
        through the last two when it is sane, else a shift by the last error.
        """
        if not tried:
            return aim
        estimated, measured = tried[-1]
        if len(tried) >= 2:
            (e0, m0), (e1, m1) = tried[-2], tried[-1]
            if abs(e1 - e0) > 1e-12 * abs(e1) and 0.2 <= (m1 - m0) / (e1 - e0) <= 5.0:
                return e1 + (aim - m1) * (e1 - e0) / (m1 - m0)
        return aim - (measured - estimated)

    # -- estimating each group's latency per label --------------------------------------------
    def _linearize(self, plan: SelectionPlan, oracle: LatencyOracle, current: np.ndarray, latency: float,
                   aim: float) -> Linearization:
        """Per group, latency saved per label: prune a chunk more (or fewer) than now and measure.

        The estimate ignores interactions (a convolution between two shrinking groups saves
        less than the sum of both estimates), so each group may only move within a trust
        region that scales with the change still needed: twice the relative gap to ``aim``,
        as a share of the group's labels (at least one allowed step each way).
        """
        radius = float(np.clip(2 * abs(aim - latency) / latency, self.MIN_TRUST_RADIUS, 1.0))
        savings = np.zeros(len(plan.groups))
        choices: list[np.ndarray] = [np.array([int(c)]) for c in current]
        for members in plan.units():   # tied groups are probed together, one call, the saving shared
            index = members[0]
            g, here = plan.groups[index], int(current[index])
            probe = self._probe_count(g.counts, here, len(g.labels), shrink=aim < latency)
            try:
                if probe is None:
                    raise LatencyMeasurementError("nothing to probe")
                counts = current.copy()
                counts[list(members)] = probe
                probed = oracle(counts)
            except LatencyMeasurementError:
                continue   # unknown saving: the groups stay where they are
            for gi in members:
                savings[gi] = max((latency - probed) / (probe - here), 0.0) / len(members)
                choices[gi] = trust_region(g.counts, here, len(g.labels), radius)
        return Linearization(current.copy(), latency, savings, choices)

    def _probe_count(self, allowed: np.ndarray, current: int, labels: int, shrink: bool) -> int | None:
        """The allowed count a chunk away from ``current``, towards more removal when shrinking."""
        chunk = max(1, round(self.chunk_fraction * labels))
        above, below = allowed[allowed > current], allowed[allowed < current]
        if above.size and (shrink or not below.size):
            return int(above[np.argmin(np.abs(above - (current + chunk)))])
        if below.size:
            return int(below[np.argmin(np.abs(below - (current - chunk)))])
        return None

    # -- reporting ------------------------------------------------------------------------------
    def describe_iteration(self, record: KnapsackIteration, plan: SelectionPlan) -> str:
        total = plan.kept_score(plan.base_counts())
        kept = f"{record.kept_score / total:.4f}" if total else f"{record.kept_score:.4g}"
        measured = "unmeasurable" if record.measured is None else (
            f"{record.measured:.6g} ({record.measured / self.target_latency:.3f} x target)")
        return (f"iteration {record.iteration}: aim {record.aim:.6g}, estimated {record.estimated:.6g}, "
                f"measured {measured}, kept score {kept}, {record.removed_labels} labels removed, "
                f"{record.latency_calls} latency calls")

    def _say(self, bar: tqdm, line: str) -> None:
        if self.verbose:
            bar.write(line)
