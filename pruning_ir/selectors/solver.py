"""One knapsack solve with OR-Tools CP-SAT: keep the most score under a latency budget.

Around a selection whose latency was measured, removing a label of group ``g`` is
estimated to save ``savings[g]`` (labels of a group touch the same tensors, so they cost
the same). Values are label scores, weights those savings. Each group has a count
variable over the counts it may take (its constraint's, within the trust region). With
``strict_label_order`` labels leave in ascending score order, so the removed score is the
prefix sum at the count: one boolean per allowed count, exactly one true (the precedence
constraints x[i+1] => x[i] folded into a multiple-choice knapsack, which is smaller and has
a tight LP relaxation). Without it, every label is a boolean the solver picks freely.
A small secondary objective prefers removing less latency, so that equal (or all-zero)
scores still give a selection close to the budget. Groups the constraint ties
(``same_across_layers``) get equal count variables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from .plan import SelectionPlan

__all__ = ["Linearization", "solve_knapsack"]

_LATENCY_UNITS = 10_000_000   # latency resolution: 1e-7 of the reference latency
_SCORE_UNITS = 1_000_000      # score resolution: 1e-6 of the total |score|
_TIE_UNITS = 10_000           # secondary objective: prefer removing less latency
_SCORE_WEIGHT = 100           # makes the score dominate the secondary objective
_RELATIVE_GAP = 1e-3          # stop within 0.1% of the optimal objective


@dataclass
class Linearization:
    """Latency around ``counts``: measured ``latency`` minus ``savings[g]`` per extra label removed.

    ``choices[g]``: the counts group ``g`` may take in this solve (its allowed counts within the
    trust region around ``counts[g]``; only ``counts[g]`` when its saving is unknown).
    """

    counts: np.ndarray
    latency: float
    savings: np.ndarray
    choices: list[np.ndarray]

    def estimate(self, counts: np.ndarray) -> float:
        return float(self.latency - np.dot(self.savings, counts - self.counts))

    def most(self) -> np.ndarray:
        """Every group at the largest count it may take."""
        return np.array([c.max() for c in self.choices], dtype=np.int64)

    def lowest(self) -> float:
        """The lowest latency this linearization can estimate."""
        return self.estimate(self.most())


def solve_knapsack(plan: SelectionPlan, linear: Linearization, budget: float, reference: float,
                   strict_label_order: bool, time_limit: float,
                   forbidden: list[np.ndarray] = ()) -> np.ndarray | None:
    """Counts keeping the most score with ``linear.estimate(counts) <= budget``; None if none found.

    ``forbidden``: counts vectors not to return (selections the latency function cannot measure).
    ``reference`` (the original latency) sets the integer scale. One search worker and a
    fixed seed make the result deterministic (unless ``time_limit`` cuts a search short).
    """
    model = cp_model.CpModel()
    total_score = sum(float(np.abs(g.scores).sum()) for g in plan.groups) or 1.0
    latency_scale = _LATENCY_UNITS / reference
    objective, saved, saved_now, removed, counts = [], [], 0, [], []
    for index, g in enumerate(plan.groups):
        current = int(linear.counts[index])
        allowed = [int(c) for c in linear.choices[index]]
        count = model.new_int_var_from_domain(cp_model.Domain.from_values(allowed), f"count_{index}")
        model.add_hint(count, current)
        weights = [round(score * _SCORE_UNITS / total_score) for score in g.scores]
        if strict_label_order:
            # labels leave in rank order: the removed score is a prefix sum indexed by the count
            prefix = np.concatenate([[0], np.cumsum(weights)]).astype(np.int64)
            choice = [model.new_bool_var(f"count_{index}_is_{c}") for c in allowed]
            model.add_exactly_one(choice)
            model.add(count == sum(c * var for c, var in zip(allowed, choice)))
            objective.extend(_SCORE_WEIGHT * int(prefix[c]) * var for c, var in zip(allowed, choice) if prefix[c])
            removed.append(None)
        else:
            bools = [model.new_bool_var(f"x_{index}_{rank}") for rank in range(len(g.labels))]
            model.add(sum(bools) == count)
            objective.extend(_SCORE_WEIGHT * w * var for w, var in zip(weights, bools) if w)
            removed.append(bools)
        unit = round(float(linear.savings[index]) * latency_scale)
        saved.append(unit * count)
        saved_now += unit * current
        tie = round(float(linear.savings[index]) * _TIE_UNITS / reference)
        if tie:
            objective.append(tie * count)
        counts.append(count)
    for number, members in enumerate(plan.cover_sets):   # tensors that must keep one of their labels
        if strict_label_order:
            keeps = []
            for gi in sorted({gi for gi, _ in members}):
                keep = model.new_bool_var(f"cover_{number}_{gi}")
                model.add(counts[gi] <= max(rank for g, rank in members if g == gi)).only_enforce_if(keep)
                keeps.append(keep)
            model.add_bool_or(keeps)
        else:
            model.add(sum(removed[gi][rank] for gi, rank in members) <= len(members) - 1)
    for members in plan.ties:   # same_across_layers: tied groups remove the same number of labels
        for gi in members[1:]:
            model.add(counts[gi] == counts[members[0]])
    if len(forbidden):
        model.add_forbidden_assignments(counts, [tuple(int(c) for c in f) for f in forbidden])
    needed = math.ceil((linear.latency - budget) * latency_scale - 1e-9) + saved_now
    model.add(sum(saved) >= needed)
    model.minimize(sum(objective))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_time_in_seconds = float(time_limit)
    # the linear latency model is a few percent off anyway: 0.1% from the optimum is plenty, and
    # (with presolve off, which only slows this small, dense model) makes each solve ~5x faster
    solver.parameters.relative_gap_limit = _RELATIVE_GAP
    solver.parameters.cp_model_presolve = False
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return np.array([solver.value(count) for count in counts], dtype=np.int64)
