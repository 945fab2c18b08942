"""Selection plans: every selector's common vocabulary of "how many labels leave each group".

A selection is a vector of removal counts, one per prunable group: group ``g`` loses its
``counts[g]`` lowest-ranked labels (ascending score, ties broken by channel). The plan
knows which counts the channel constraint allows, which counts would empty a tensor
(``ir.check_labels`` would refuse them), the network-wide order in which chunks of labels
leave, and how to turn counts back into labels. Counts, unlike label sets, are cheap to
compare, hash and cache. Groups the constraint ties (``same_across_layers``) share one list of
allowed counts, always hold equal counts, and leave the network-wide order together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..ir import PruningIR
from ..labels import DependencyGroup, Label
from .constraint import ChannelConstraint

__all__ = ["GroupPlan", "SelectionPlan", "Step"]


@dataclass
class GroupPlan:
    """One prunable group: its labels in removal order and the removal counts it allows."""

    group: DependencyGroup
    labels: list[Label]          # ascending score, ties by channel
    scores: np.ndarray           # scores in the same order
    counts: np.ndarray           # allowed removal counts, ascending
    removed_before: int = 0      # labels the group lost in earlier prunes (shares count them)

    def kept_score(self, count: int) -> float:
        return float(self.scores[count:].sum())


@dataclass(frozen=True)
class Step:
    """Removing labels ``start..stop-1`` (in removal order) of group ``index``, and of the groups
    tied to it (``members``, ``index`` first): one chunk."""

    index: int
    start: int
    stop: int
    mean_score: float
    members: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.members:
            object.__setattr__(self, "members", (self.index,))

    @property
    def size(self) -> int:
        """Labels the chunk removes, over all its groups."""
        return (self.stop - self.start) * len(self.members)


class SelectionPlan:
    """The prunable groups of an IR under a channel constraint.

    ``ties``: the tied classes (``same_across_layers``), as lists of indices into ``groups``;
    every counts vector the plan hands out (``repair``, ``apply``, ``steps``) keeps them equal."""

    def __init__(self, ir: PruningIR, constraint: ChannelConstraint, *, floors: Mapping[int, int] | None = None,
                 removed_before: Mapping[int, int] | None = None):
        self.ir = ir
        ordered = ir.label_groups()
        prunable = [group for group in ir.groups if group.prunable]
        floors, removed_before = dict(floors or {}), dict(removed_before or {})
        for name, given in (("floors", floors), ("removed_before", removed_before)):
            unknown = set(given) - {group.id for group in prunable}
            if unknown or any(int(v) < 0 for v in given.values()):
                raise ValueError(f"{name} maps prunable group ids to counts >= 0; got {given!r}")
        self.groups = [GroupPlan(group, labels, np.array([label.score for label in labels], dtype=np.float64),
                                 constraint.removal_counts(group), int(removed_before.get(group.id, 0)))
                       for group, labels in zip(prunable, ordered)]
        self._cover_sets = self._find_cover_sets()
        self._limit_single_group_covers()
        for g in self.groups:  # each group loses at least its floor (or as many labels as it may)
            floor = int(floors.get(g.group.id, 0))
            if floor:
                at_least = g.counts[g.counts >= floor]
                g.counts = at_least if at_least.size else g.counts[-1:]
        if constraint.keep:
            constraint.check_keep(prunable)
        position = {g.group.id: i for i, g in enumerate(self.groups)}
        self.ties = [[position[group.id] for group in tied] for tied in constraint.tied_groups(prunable)]
        self._tie_counts()

    def _tie_counts(self) -> None:
        """Give the groups of each tied class the counts all of them allow; raise if there is none."""
        for members in self.ties:
            common = self.groups[members[0]].counts
            for gi in members[1:]:
                common = np.intersect1d(common, self.groups[gi].counts)
            if common.size == 0:
                shown = "; ".join(f"group {self.groups[gi].group.id}: {self.groups[gi].counts.tolist()}"
                                  for gi in members[:4])
                raise ValueError(f"the tied groups {[self.groups[gi].group.id for gi in members]} "
                                 f"(same_across_layers) allow no common number of labels to remove ({shown}): "
                                 "floors or earlier prunes that differ across layers, or a tensor that must keep a "
                                 "channel in one layer only; prune without same_across_layers")
            for gi in members:
                self.groups[gi].counts = common.astype(np.int64)

    # -- counts -----------------------------------------------------------------------------
    @property
    def label_count(self) -> int:
        return sum(len(g.labels) for g in self.groups)

    @property
    def removed_before(self) -> int:
        """Labels the groups lost in earlier prunes (``select(removed_before=)``)."""
        return sum(g.removed_before for g in self.groups)

    def base_counts(self) -> np.ndarray:
        """The least pruning the constraint allows (zero everywhere unless ``high`` forces some)."""
        return np.array([g.counts[0] for g in self.groups], dtype=np.int64)

    def max_counts(self) -> np.ndarray:
        """The most pruning the constraint and the model's tensors allow."""
        return self.repair(np.array([g.counts[-1] for g in self.groups], dtype=np.int64))

    def nearest_allowed(self, index: int, wanted: float) -> int:
        """The allowed removal count of group ``index`` nearest to ``wanted`` (ties: fewer removed)."""
        counts = self.groups[index].counts
        return int(counts[np.argmin(np.abs(counts - wanted))])

    def kept_score(self, counts: np.ndarray) -> float:
        return sum(g.kept_score(int(c)) for g, c in zip(self.groups, counts))

    def labels(self, counts: np.ndarray) -> list[Label]:
        """The labels a counts vector removes, group by group in removal order."""
        return [label for g, c in zip(self.groups, counts) for label in g.labels[:int(c)]]

    # -- network-wide order -----------------------------------------------------------------
    def steps(self, counts: np.ndarray | None = None) -> list[Step]:
        """Every allowed chunk beyond ``counts`` (default: the base), lowest mean score first.

        Chunks are the gaps between consecutive allowed counts; their mean scores rise within
        a group, so taking any prefix of this list keeps each group's removal a prefix of its
        order. Ties are broken by group id, then position: the order is deterministic.
        """
        counts = self.base_counts() if counts is None else counts
        steps = []
        for members in self.units():
            index = members[0]
            g = self.groups[index]
            allowed = g.counts[g.counts >= counts[index]]
            # a tied class's k-th labels leave together: rank them by their mean score
            scores = g.scores if len(members) == 1 else np.mean([self.groups[gi].scores for gi in members], axis=0)
            floor = -np.inf
            for start, stop in zip(allowed[:-1], allowed[1:]):
                floor = max(floor, float(scores[start:stop].mean()))  # guard against rounding
                steps.append(Step(index, int(start), int(stop), floor, members))
        steps.sort(key=lambda s: (s.mean_score, self.groups[s.index].group.id, s.start))
        return steps

    def units(self) -> list[tuple[int, ...]]:
        """The groups that move together: each tied class, and every other group alone (in group order)."""
        tied = {members[0]: tuple(members) for members in self.ties}
        inside = {gi for members in self.ties for gi in members}
        return [tied.get(gi, (gi,)) for gi in range(len(self.groups)) if gi in tied or gi not in inside]

    def step_score(self, step: Step) -> float:
        """The total score a chunk removes, over all its groups."""
        return sum(float(self.groups[gi].scores[step.start:step.stop].sum()) for gi in step.members)

    def apply(self, counts: np.ndarray, steps: list[Step]) -> np.ndarray:
        """``counts`` after taking ``steps`` (a prefix of :meth:`steps`), repaired if needed."""
        result = counts.copy()
        for step in steps:
            for gi in step.members:
                result[gi] = max(result[gi], step.stop)
        return self.repair(result)

    # -- tensors that must keep a channel ---------------------------------------------------
    def _find_cover_sets(self) -> list[list[tuple[int, int]]]:
        """Tensors made only of labels, as (group, rank) lists: each must keep one of them.

        A tensor holding every label of a group is safe already (a group always keeps a
        label unless it has unprunable channels), so only the others are kept.
        """
        index = self.ir.index
        where: dict[int, tuple[int, int]] = {}
        for gi, g in enumerate(self.groups):
            for rank, label in enumerate(g.labels):
                where[label.class_id] = (gi, rank)
        arrays = [site.classes for site in index.sites] + [b.classes for b in index.parameter_bindings]
        seen, covers = set(), []
        for classes in arrays:
            key = tuple(sorted(set(int(c) for c in classes)))
            if not key or key in seen or any(c not in where for c in key):
                continue
            seen.add(key)
            members = [where[c] for c in key]
            safe = any(sum(1 for gi, _ in members if gi == gj) == len(self.groups[gj].labels)
                       and self.groups[gj].group.pinned_count == 0 for gj in {gi for gi, _ in members})
            if not safe:
                covers.append(members)
        return covers

    def _limit_single_group_covers(self) -> None:
        """A tensor inside one group survives prefix removal iff fewer than max-rank+2 leave."""
        for members in self._cover_sets:
            groups = {gi for gi, _ in members}
            if len(groups) == 1:
                gi = groups.pop()
                limit = max(rank for _, rank in members)
                g = self.groups[gi]
                g.counts = g.counts[g.counts <= limit]
                if g.counts.size == 0:
                    g.counts = np.array([0])

    @property
    def cover_sets(self) -> list[list[tuple[int, int]]]:
        return self._cover_sets

    def repair(self, counts: np.ndarray) -> np.ndarray:
        """Shrink removals until no tensor made of several groups' labels is emptied, and tied
        groups hold equal counts (the fewest removed among them: removing less empties nothing)."""
        counts = counts.copy()
        for members in self._cover_sets:
            if any(rank >= counts[gi] for gi, rank in members):
                continue
            gi, rank = max(members, key=lambda m: (counts[m[0]], m[1]))
            allowed = self.groups[gi].counts
            counts[gi] = int(allowed[allowed <= rank].max(initial=0))
        for members in self.ties:
            counts[members] = counts[members].min()
        return counts
