"""Latency budgets from a latency table: a multiple-choice knapsack (HALP/SMCP-style).

Each group picks one kept count from a grid (``AddExactlyOne`` over its choice booleans). The
value of a choice is the score the group keeps (labels leave in ascending score order, so it
is a suffix sum of the sorted scores); its weight is the table's time of the ops the group
touches at that count. CP-SAT keeps the most value with the total weight within the budget.
Ops between two groups change with both, so the rows are taken with the other groups at the
midpoint between the current widths and the last solution, which prices each such op once
(``_solve_around``), and solved again until the table's full prediction agrees. The table
predicts isolated op times, not the model's, so each solution is measured on the real model;
the budget is then corrected from the measured/predicted pairs seen so far (interpolating
between the two that bracket the aim, else their ratio), the rows are re-estimated around the
new widths, and the loop repeats until the measured latency lies within the tolerance below
the target or ``max_iterations`` is spent. Groups the constraint ties (``same_across_layers``)
share one grid and take the same choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ortools.sat.python import cp_model
from tqdm.auto import tqdm

from ..errors import LatencyMeasurementError
from .binary_search import check_reachable
from .iteration import KnapsackIteration
from .latency_table import GroupTable, LatencyTable
from .oracle import LatencyOracle
from .plan import SelectionPlan

__all__ = ["solve_multiple_choice", "select_with_table", "trust_region", "cover_constraints"]

_WEIGHT_UNITS = 100_000_000     # weight resolution: 1e-8 of the unpruned model's predicted latency
_SCORE_UNITS = 1_000_000         # value resolution: 1e-6 of the total |score|
_MAX_REPEATS = 3                 # budget nudges after a selection comes back, before giving up
_INNER_ROUNDS = 6                # solves on rows re-taken at the midpoint, before measuring the real model
MIN_TRUST_RADIUS = 0.05          # a group may always move 5% of its labels per solve
_RELATIVE_GAP = 1e-3             # the solver stops this close to the optimum: the table's own error is larger


def solve_multiple_choice(values: Sequence[Sequence[int]], weights: Sequence[Sequence[int]], capacity: int, *,
                          at_least_one_of: Sequence[Sequence[tuple[int, int]]] = (), time_limit: float = 60.0,
                          relative_gap: float = 0.0, prefer_heavier: bool = True,
                          same_choice: Sequence[Sequence[int]] = (), min_weight: int | None = None) -> list[int] | None:
    """One choice per group maximizing the total value with the total weight <= ``capacity``
    (and >= ``min_weight`` when given: a window, as the band's steps need).

    ``values[g][j]``/``weights[g][j]``: integers of choice ``j`` of group ``g``.
    ``at_least_one_of``: lists of (group, choice) pairs, at least one of each list chosen (a
    tensor that must keep a channel). ``same_choice``: lists of groups with as many choices
    each, which must all take the same choice index (tied groups). ``prefer_heavier`` breaks
    ties in value towards more weight (closer to the budget: equal or zero scores still give a
    usable selection). One worker and a fixed seed keep it deterministic. Returns the chosen index per group, or
    None if no choice fits (or none was found in ``time_limit`` seconds).
    """
    if len(values) != len(weights) or any(len(v) != len(w) or not len(v) for v, w in zip(values, weights)):
        raise ValueError("values and weights need the same, non-empty, number of choices per group")
    model = cp_model.CpModel()
    choices = []
    for g, row in enumerate(values):
        row_vars = [model.new_bool_var(f"g{g}_c{j}") for j in range(len(row))]
        model.add_exactly_one(row_vars)
        choices.append(row_vars)
    total_weight = sum(int(w) * x for row, ws in zip(choices, weights) for x, w in zip(row, ws))
    model.add(total_weight <= int(capacity))
    if min_weight is not None:
        model.add(total_weight >= int(min_weight))
    for pairs in at_least_one_of:
        model.add_bool_or([choices[g][j] for g, j in pairs])
    for tied in same_choice:
        if len({len(choices[g]) for g in tied}) > 1:
            raise ValueError(f"same_choice groups {list(tied)} have different numbers of choices")
        for g in tied[1:]:
            for mine, first in zip(choices[g], choices[tied[0]]):
                model.add(mine == first)
    value = sum(int(v) * x for row, vs in zip(choices, values) for x, v in zip(row, vs))
    if prefer_heavier:
        spread = sum(int(max(ws)) - int(min(ws)) for ws in weights) + 1
        model.maximize(value * spread + total_weight)
    else:
        model.maximize(value)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.relative_gap_limit = float(relative_gap)
    status = solver.solve(model)
    if status == cp_model.MODEL_INVALID:
        raise ValueError(f"invalid multiple-choice knapsack: {model.validate()}")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return [next(j for j, x in enumerate(row) if solver.boolean_value(x)) for row in choices]


def trust_region(grid: np.ndarray, current: int, labels: int, radius: float) -> np.ndarray:
    """The counts of ``grid`` within ``radius`` (a share of the group's ``labels``) of ``current``,
    one more each way however coarse the grid, and ``current``: how far one solve may move a
    group while a linear estimate around ``current`` still holds."""
    reach = max(1, int(np.ceil(radius * labels)))
    inside = grid[np.abs(grid - current) <= reach]
    above, below = grid[grid > current], grid[grid < current]
    return np.unique(np.concatenate([inside, above[:1], below[-1:], [current]])).astype(np.int64)


def _moved(counts: np.ndarray, index: int, count: int) -> np.ndarray:
    moved = counts.copy()
    moved[index] = count
    return moved


def cover_constraints(plan: SelectionPlan, grids: Sequence[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Tensors made of several groups' labels keep one: some member group keeps its label
    (the (group, choice) pairs of each cover set whose count keeps it, per ``grids``)."""
    constraints = []
    for members in plan.cover_sets:
        pairs = []
        for gi in sorted({gi for gi, _ in members}):
            limit = max(rank for g, rank in members if g == gi)
            pairs += [(gi, j) for j, count in enumerate(grids[gi]) if count <= limit]
        constraints.append(pairs)
    return constraints


def _predicted_budget(aim: float, points: list[tuple[float, float]]) -> float:
    """The table prediction to ask for so that the measured latency lands on ``aim``.

    From (predicted, measured) pairs: linear interpolation between the nearest pair measured
    above and below the aim, else the measured/predicted ratio of the nearest one.
    """
    below = [p for p in points if p[1] <= aim]
    above = [p for p in points if p[1] > aim]
    if below and above:
        (p0, m0), (p1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        if m1 > m0:
            return p0 + (aim - m0) * (p1 - p0) / (m1 - m0)
    predicted, measured = min(points, key=lambda p: abs(p[1] - aim))
    return predicted * aim / measured


def _solve_around(plan: SelectionPlan, bound: GroupTable, center: np.ndarray, budget: float, scale: float,
                  time_limit: float, tolerance: float) -> np.ndarray | None:
    """Counts keeping the most score with the table's prediction within ``budget``, near ``center``.

    A group's row is the time of the ops it touches at each count of its grid, the other groups
    held at ``neighbours``; a selection's estimate is the table's prediction at ``center`` plus
    each group's change along its row. An op between two groups (a convolution reading one and
    writing the other) changes with both. Held at ``center``, the neighbours make the rows count
    the part of its change that comes from both moving together twice or not at all (for a time
    proportional to the product of the widths, ``(a - a0)(b - b0)``), and the solver picks
    exactly the selections that error flatters: two groups shrinking together look cheaper than
    they are, growing together from a narrow selection cheaper still, and successive solutions
    oscillate. Held at the midpoint between ``center`` and the last solution, the rows price
    each such op once: for a bilinear time the two rows' changes add up to the op's exact change
    at that solution (a secant). Each group moves within a trust region around ``center``
    (twice the relative gap between ``budget`` and the prediction at ``center``, as a share of
    its labels), halved when a solution lands further from the budget than the one before.
    Where times are not bilinear (measured ops), the rows still miss part of the change: each
    solve after the first lowers the budget by what its rows miss at the last solution (its
    full prediction less the rows' estimate of it). It solves, takes the rows again at the
    midpoint, and repeats until the table's full prediction of the solution lies within
    ``tolerance / 4`` below ``budget`` or a solution comes back; it returns the solution
    keeping the most score among those the full prediction puts within the budget (else the one
    it predicts fastest).
    """
    anchor = bound.predict(center)
    total = sum(float(np.abs(g.scores).sum()) for g in plan.groups) or 1.0
    radius = float(np.clip(2 * abs(budget - anchor) / anchor, MIN_TRUST_RADIUS, 1.0)) if anchor > 0 else 1.0
    neighbours, solutions, miss = center, [], None
    for _ in range(_INNER_ROUNDS):
        grids = [trust_region(bound.grid(gi, int(center[gi])), int(center[gi]), len(g.labels), radius)
                 for gi, g in enumerate(plan.groups)]
        for members in plan.ties:   # tied groups span one grid, so that they can take the same choice
            shared = np.unique(np.concatenate([grids[gi] for gi in members]))
            for gi in members:
                grids[gi] = shared
        here = [int(np.flatnonzero(grid == center[gi])[0]) for gi, grid in enumerate(grids)]
        values = [[round(g.kept_score(int(c)) * _SCORE_UNITS / total) for c in grid]
                  for g, grid in zip(plan.groups, grids)]
        rows = bound.rows(neighbours, grids)
        fixed = anchor - sum(row[j] for row, j in zip(rows, here))
        residual = 0.0   # what these rows still miss at the last solution, where the full prediction is known
        if solutions:
            last, predicted = solutions[-1]
            residual = predicted - fixed - sum(bound.group_latency(gi, _moved(neighbours, gi, int(last[gi])))
                                               for gi in range(len(plan.groups)))
        weights = [[round(t * scale) for t in row] for row in rows]
        chosen = solve_multiple_choice(values, weights, int(np.floor((budget - fixed - residual) * scale)),
                                       at_least_one_of=cover_constraints(plan, grids), time_limit=time_limit,
                                       relative_gap=_RELATIVE_GAP, same_choice=plan.ties)
        if chosen is None:   # nothing within the budget this close to ``center``: a wider region, or none
            if radius >= 1.0:
                break
            radius = min(2 * radius, 1.0)
            continue
        counts = np.array([grid[j] for grid, j in zip(grids, chosen)], dtype=np.int64)
        repeated = any(np.array_equal(counts, c) for c, _ in solutions)
        predicted = bound.predict(counts)
        solutions.append((counts, predicted))
        if repeated or budget * (1 - tolerance / 4) <= predicted <= budget:
            break
        if miss is not None and abs(predicted - budget) > miss:
            radius = max(radius / 2, MIN_TRUST_RADIUS)   # further off than the last solve: smaller steps
        miss = abs(predicted - budget)
        neighbours = (center + counts) // 2
    if not solutions:
        return None
    within = [s for s in solutions if s[1] <= budget]
    if within:
        return max(within, key=lambda s: (plan.kept_score(s[0]), s[1]))[0]
    return min(solutions, key=lambda s: s[1])[0]


def select_with_table(selector: Any, plan: SelectionPlan, oracle: LatencyOracle,
                      table: LatencyTable) -> tuple[np.ndarray, float]:
    """The iteration of :class:`KnapsackLabelSelector` on a latency table: (counts, measured latency)."""

    target, tolerance = selector.target_latency, selector.tolerance
    aim = target * (1 - tolerance / 2)
    base = plan.base_counts()
    reference = oracle(base)
    if target >= reference:
        return base, reference
    lowest_latency = check_reachable(oracle, plan, target)
    bound = table.bind(plan)
    points = [(bound.predict(base), reference)]
    scale = _WEIGHT_UNITS / max(points[0][0], 1e-30)   # integer weights, whatever the table's unit
    feasible, closest = [], None
    if lowest_latency is not None:
        lowest = plan.max_counts()
        feasible.append((plan.kept_score(lowest), lowest_latency, lowest))
        points.append((bound.predict(lowest), lowest_latency))
    say = tqdm.write if selector.verbose else (lambda line: None)
    say(f"latency {reference:.6g} -> target {target:.6g}; latency table over {len(bound.ops)} ops")
    current, seen, nudge, repeats, converged = base, set(), 1.0, 0, False
    for iteration in range(1, selector.max_iterations + 1):
        budget = _predicted_budget(aim, points) * nudge
        counts = _solve_around(plan, bound, current, budget, scale, selector.solver_execution_time_limit,
                               tolerance)
        if counts is None:
            counts = plan.max_counts()
        predicted = bound.predict(counts)
        try:
            measured = oracle(counts)
        except LatencyMeasurementError:
            measured = None
        record = KnapsackIteration(iteration, aim, predicted * aim / budget * nudge, measured,
                                   plan.kept_score(counts), int(counts.sum()), oracle.calls)
        selector.history.append(record)
        say(selector.describe_iteration(record, plan))
        key = counts.tobytes()
        if measured is None:
            nudge *= 1.02   # cannot measure it: ask for a little less pruning
            continue
        if measured <= target:
            feasible.append((record.kept_score, measured, counts))
        elif closest is None or measured < closest[0]:
            closest = (measured, counts)
        if target * (1 - tolerance) <= measured <= target:
            break
        if key in seen:   # the corrected budget gave a measured selection back: push it past, a few times
            repeats += 1
            nudge *= 0.98 ** repeats if measured > target else 1.02 ** repeats
            if repeats > _MAX_REPEATS:
                converged = True   # the grid offers nothing between the selections measured around the aim
                break
        else:
            points.append((predicted, measured))
        seen.add(key)
        current = counts
    table.save()
    return selector.best_selection(plan, oracle, feasible, closest, converged)
