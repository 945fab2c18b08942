"""Settling a latency-budget selection inside its band, checked on the real model.

A selector's loop measures each candidate once and keeps the best-scoring one measured under
the target. On a noisy machine that is the candidate whose measurement was luckiest (the
winner's curse), and load that came or went since the target was set shifts every number.
So the final selection is checked again: measured ``repeats`` times afresh, alternating with
the unpruned model, its latency taken as the median pruned/unpruned ratio times the unpruned
latency the selection started from (load that comes and goes hits both models alike). Outside
``[1 - tolerance, 1] x target`` it steps: removes the labels that lose the least score per
second saved (or adds back those that keep the most score per second spent) until the
predicted change covers the gap to the middle of the band, priced by the latency table's
marginal costs where there is one (else every label costs the same), corrects its price from
the change the step really made, and checks again, at most ``max_checks`` times. A noisy check
inside the band steps towards its middle (``centred``) for at most two more checks. It returns
the best checked selection: inside the band if one was, else the feasible one keeping the most
score, and says so.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..errors import LatencyMeasurementError
from ..labels import Label
from .iteration import KnapsackIteration
from .latency_table import LatencyTable
from .multiple_choice import cover_constraints, solve_multiple_choice
from .oracle import LatencyOracle
from .plan import SelectionPlan

__all__ = ["BandResult", "settle_in_band", "counts_of", "centred", "CHECK_STATISTICS"]

_GAIN_LIMITS = (0.5, 2.0)   # one step's measured/predicted change corrects the price by at most this factor
_RADII = (3, 12, None)      # allowed counts each way a group may move in one step (None: any)
_WEIGHT_UNITS = 100_000_000  # integer seconds for CP-SAT: 1e-8 of the checked latency
_SCORE_UNITS = 1_000_000     # integer score: 1e-6 of the total |score|
_SOLVER_SECONDS = 10.0
_CENTRING_CHECKS = 2         # checks after the first in the band that may step towards its middle
CHECK_STATISTICS = ("median", "fastest")


@dataclass
class BandResult:
    """The settled selection: ``counts``, its checked ``latency``, whether it lies in the band
    (``in_band``) or at least meets the target (``feasible``), every check made (``checks``),
    the latency calls they took and a one-line ``message``."""

    counts: np.ndarray
    latency: float
    in_band: bool
    feasible: bool
    checks: list[KnapsackIteration]
    latency_calls: int
    message: str


def counts_of(plan: SelectionPlan, labels: list[Label]) -> np.ndarray:
    """The counts vector of a selection given as labels (each group's removed labels are a prefix)."""
    chosen = {label.class_id for label in labels}
    counts = np.array([sum(label.class_id in chosen for label in g.labels) for g in plan.groups], dtype=np.int64)
    for g, count in zip(plan.groups, counts):
        if not all(label.class_id in chosen for label in g.labels[:count]):
            raise ValueError(f"the labels removed from group {g.group.id} are not its {count} lowest-ranked ones: "
                             "not a selection of this plan")
    if sum(int(c) for c in counts) != len(chosen):
        raise ValueError("some labels belong to no prunable group of this plan")
    return counts


class _TableCost:
    """Latency in table units: the table's sum over ops, and one group's move from its ops."""

    def __init__(self, table: LatencyTable, plan: SelectionPlan):
        self.bound = table.bind(plan)

    def predict(self, counts: np.ndarray) -> float:
        return self.bound.predict(counts)

    def move(self, index: int, counts: np.ndarray, count: int) -> float:
        moved = counts.copy()
        moved[index] = count
        return self.bound.group_latency(index, moved) - self.bound.group_latency(index, counts)

    @staticmethod
    def gain(counts: np.ndarray, predicted: float, latency: float, reference: float) -> float:
        return latency / predicted if predicted > 0 else 0.0


class _LabelCost:
    """Without a table: every label removed saves the same time (units: labels kept, negated)."""

    @staticmethod
    def predict(counts: np.ndarray) -> float:
        return -float(counts.sum())

    @staticmethod
    def move(index: int, counts: np.ndarray, count: int) -> float:
        return float(counts[index] - count)

    @staticmethod
    def gain(counts: np.ndarray, predicted: float, latency: float, reference: float) -> float:
        return (reference - latency) / counts.sum() if counts.sum() else 0.0


def _step(plan: SelectionPlan, cost: _TableCost | _LabelCost, counts: np.ndarray, gain: float, latency: float,
          windows: list[tuple[float, float]]) -> np.ndarray:
    """The selection near ``counts`` keeping the most score with a predicted latency (``latency``
    plus ``gain`` x each group's move in cost units) in the first of ``windows`` that some
    selection reaches: a multiple-choice knapsack over a few allowed counts each way per group
    (more if that reaches no window), so one group can give labels back while others lose some.
    Tied groups (``same_across_layers``) take the same choice: moved one by one, the plan's
    repair would set each class back to its smallest count and undo or distort the step."""
    total = sum(float(np.abs(g.scores).sum()) for g in plan.groups) or 1.0
    scale = _WEIGHT_UNITS / latency
    above = latency > windows[0][1]

    def seconds(index: int, count: int) -> float:
        """A group's move, never faster for keeping more labels (a noisy table can say so)."""
        move = cost.move(index, counts, count) * gain
        return min(move, 0.0) if count > counts[index] else max(move, 0.0)

    for radius in _RADII:
        grids, values, weights = [], [], []
        for index, g in enumerate(plan.groups):
            here = int(np.searchsorted(g.counts, counts[index]))
            grid = g.counts if radius is None else g.counts[max(0, here - radius):here + radius + 1]
            grid = np.union1d(grid, [counts[index]]).astype(np.int64)
            if above:   # above the target: only remove (a swap would trust the table's noise too far)
                grid = grid[grid >= counts[index]]
            grids.append(grid)
            values.append([round(g.kept_score(int(c)) * _SCORE_UNITS / total) for c in grid])
            weights.append([round(seconds(index, int(c)) * scale) for c in grid])
        covers = cover_constraints(plan, grids)
        for low, high in windows:
            chosen = solve_multiple_choice(values, weights, int(np.floor((high - latency) * scale)),
                                           min_weight=int(np.ceil((low - latency) * scale)), at_least_one_of=covers,
                                           time_limit=_SOLVER_SECONDS, prefer_heavier=False, same_choice=plan.ties)
            if chosen is None:
                continue
            moved = plan.repair(np.array([grid[j] for grid, j in zip(grids, chosen)], dtype=np.int64))
            change = sum(seconds(index, int(c)) for index, c in enumerate(moved) if c != counts[index])
            return moved if (change < 0 if above else change > 0) else counts   # never a step the wrong way
    return counts


def settle_in_band(plan: SelectionPlan, oracle: LatencyOracle, counts: np.ndarray, target: float,
                   tolerance: float, *, table: LatencyTable | None = None, repeats: int = 3, max_checks: int = 6,
                   reference: float | None = None, first_iteration: int = 1, verbose: bool = False,
                   statistic: str = "median") -> BandResult:
    """Check ``counts`` on the real model and step until it lies in ``[1 - tolerance, 1] x target``.

    ``oracle``: the selection's latency oracle (its function measures). ``reference``: the
    unpruned latency ``target`` was set against, which the checks' pruned/unpruned ratios are
    scaled to (default: the oracle's, cached from the start of the selection: on a machine whose
    load drifts, a reference measured later is in another load's seconds). ``table``: prices each group's step
    (None: every label the same). ``repeats``: fresh pruned/unpruned pairs per check, up to
    twice as many while their ratios spread wider than the band and the reading is not outside
    the band by more than half that spread (a deterministic function is detected on the first
    pair and measured once). ``max_checks``:
    checks in all, the first included. ``statistic``: how a check reads its pairs: ``"median"``
    of the pruned/unpruned ratios (one odd reading cannot move it), or ``"fastest"`` pruned
    reading over the fastest unpruned one, as ``compare_latency`` compares models measured in
    rotation (time that noise adds to every reading of both models, which pulls a ratio towards
    1, drops out of both). Warns (RuntimeWarning) when no checked selection lies in the band.
    """
    if statistic not in CHECK_STATISTICS:
        raise ValueError(f"statistic must be one of {CHECK_STATISTICS}, got {statistic!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(max_checks, bool) or not isinstance(max_checks, int) or max_checks < 1:
        raise ValueError(f"max_checks must be a positive int, got {max_checks!r}")
    if not 0 <= tolerance < 1 or not target > 0:
        raise ValueError(f"need target > 0 and 0 <= tolerance < 1, got target {target}, tolerance {tolerance}")
    base = plan.base_counts()
    reference = oracle(base) if reference is None else float(reference)
    if not reference > 0:
        raise ValueError(f"reference must be a positive latency, got {reference}")
    if np.array_equal(counts, base):   # nothing removed: nothing to check or settle
        return BandResult(counts.copy(), reference, (1 - tolerance) * target <= reference <= target,
                          reference <= target, [], 0, "nothing removed: the unpruned model")
    low, aim = target * (1 - tolerance), target * (1 - tolerance / 2)
    calls = 0
    deterministic: bool | None = None

    def fresh(selection: np.ndarray) -> float:
        nonlocal calls
        calls += 1
        return LatencyOracle(plan, oracle.function, {})(selection)   # an empty cache: measured again

    def check(selection: np.ndarray) -> tuple[float, float]:
        nonlocal deterministic
        if deterministic:
            return fresh(selection), 1.0
        ratios, pruned, unpruneds, repeat = [], [], [], 0
        while repeat < repeats or (repeat < 2 * repeats and ratios and max(ratios) > (1 + tolerance) * min(ratios)
                                   and not outside(read(ratios, pruned, unpruneds), max(ratios) / min(ratios))):
            first, second = (selection, base) if repeat % 2 == 0 else (base, selection)
            values = [fresh(first), fresh(second)]
            latency, unpruned = values if repeat % 2 == 0 else values[::-1]
            if deterministic is None:
                deterministic = latency == oracle(selection) and unpruned == reference
                if deterministic:
                    return latency, 1.0
            pruned.append(latency)
            unpruneds.append(unpruned)
            if unpruned > 0:
                ratios.append(latency / unpruned)
            repeat += 1   # noisier than the band is wide: up to twice the pairs
        if len(ratios) < len(pruned) or min(ratios) <= 0:   # a zero reading: no ratio to take
            return statistics.median(pruned), 1.0
        return read(ratios, pruned, unpruneds), max(ratios) / min(ratios)

    def read(ratios: list[float], pruned: list[float], unpruneds: list[float]) -> float:
        ratio = min(pruned) / min(unpruneds) if statistic == "fastest" else statistics.median(ratios)
        return ratio * reference

    def outside(latency: float, spread: float) -> bool:
        """Whether a reading lies outside the band by more than half its spread: more pairs
        would not change what the check concludes (step), only cost time."""
        margin = latency * (spread - 1) / 2
        return latency - margin > target or latency + margin < low

    cost = _LabelCost() if table is None else _TableCost(table, plan)
    say = tqdm.write if verbose else (lambda line: None)
    checks: list[tuple[KnapsackIteration, np.ndarray]] = []
    current, gain, previous = counts.copy(), None, None
    for number in range(max_checks):
        predicted = cost.predict(current)
        try:
            latency, spread = check(current)
        except LatencyMeasurementError as error:
            say(f"check stopped: {error}")
            break
        estimated = oracle(current) if previous is None else previous[2] + gain * (predicted - previous[1])
        record = KnapsackIteration(first_iteration + number, aim, estimated, latency, plan.kept_score(current),
                                   int(current.sum()), oracle.calls + calls, True, spread)
        checks.append((record, current))
        say(f"check {number + 1}: {latency:.6g} ({latency / target:.3f} x target, ratios spread {spread:.3f}), "
            f"{record.removed_labels} labels removed")
        if centred(record, low, target):
            break
        first_in_band = next((i for i, (r, _) in enumerate(checks) if low <= r.measured <= target), None)
        if first_in_band is not None and number - first_in_band >= _CENTRING_CHECKS:
            break   # in the band, not centred after as many steps towards its middle: good enough, and time
        if previous is None:
            gain = cost.gain(current, predicted, latency, reference)
        elif predicted != previous[1]:   # the price the last step really paid, within limits of the one assumed
            paid = (latency - previous[2]) / ((predicted - previous[1]) * gain)
            if paid > 0:   # a change against the step is noise, not a price: the price stays
                gain *= float(np.clip(paid, *_GAIN_LIMITS))
        if not gain > 0:
            break
        quarter = (target - low) / 4   # the middle half of the band first: the price is an estimate
        following = _step(plan, cost, current, gain, latency,
                          [(low + quarter, target - quarter), (low, target), (0.0, aim)])
        if np.array_equal(following, current) or any(np.array_equal(following, c) for _, c in checks):
            break   # nothing left to move, or back to a checked selection: the grid has nothing closer
        previous = (current, predicted, latency)
        current = following
    return _best(checks, counts, oracle, target, low, calls)


def centred(record: KnapsackIteration, low: float, target: float) -> bool:
    """Whether a check lies in the band far enough from its edges for its noise: a noisy check
    that reads a selection just inside an edge says little about which side it lies on (and an
    independent measurement, other noise, other statistic, can read it outside), so it must lie
    half its spread (largest over smallest pair ratio, minus one, times its reading) inside, at
    most a quarter of the band; a deterministic check (spread 1) only needs the band."""
    spread = 1.0 if record.spread is None else record.spread
    margin = min((target - low) / 4, record.measured * (spread - 1) / 2)
    return low + margin <= record.measured <= target - margin


def _best(checks: list[tuple[KnapsackIteration, np.ndarray]], counts: np.ndarray, oracle: LatencyOracle,
          target: float, low: float, calls: int) -> BandResult:
    """The checked selection to return: in the band (most score), else meeting the target (most
    score), else the fastest; warns unless it lies in the band."""
    if not checks:   # not even the first check could measure: the loop's own measurement stands
        latency = oracle(counts)
        return BandResult(counts, latency, low <= latency <= target, latency <= target, [], calls,
                          "the selection could not be checked again; the loop's measurement stands")
    records = [record for record, _ in checks]
    middle = [i for i, r in enumerate(records) if centred(r, low, target)]
    band = [i for i, r in enumerate(records) if low <= r.measured <= target]
    feasible = [i for i, r in enumerate(records) if r.measured <= target]
    if band or feasible:
        chosen = max(middle or band or feasible, key=lambda i: (records[i].kept_score, records[i].measured))
    else:
        chosen = min(range(len(records)), key=lambda i: records[i].measured)
    record, selection = checks[chosen]
    latency = record.measured
    if band:
        message = f"checked on the real model: {latency:.6g} ({latency / target:.3f} x target) lies in the band"
    else:
        where = "below the band" if feasible else "above the target"
        message = (f"no checked selection lies in [{low:.6g}, {target:.6g}] after {len(records)} checks; returning "
                   f"the {'feasible selection keeping the most score' if feasible else 'fastest selection'}, "
                   f"{where} at {latency:.6g} ({latency / target:.3f} x target)")
        warnings.warn(message + ": the channel grid may have nothing closer (a finer ChannelConstraint step), or "
                      "the machine is too noisy for the band (more repeats, a wider tolerance)", RuntimeWarning,
                      stacklevel=3)
    return BandResult(selection, latency, bool(band), bool(band or feasible), records, calls, message)
