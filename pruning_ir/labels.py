"""Labels and dependency groups: the vectorized index maps built once from a propagation.

A *class* is a set of atoms the rules unioned: removing it removes every position that
holds one of its atoms, in every activation, parameter and buffer. A class that appears
in an activation and is not pinned is a :class:`Label`. Classes that share an activation
dimension form a :class:`DependencyGroup` (e.g. all the channels of one residual stream).
Everything is stored as arrays of class ids, so pruning filters arrays and never
re-traces or re-propagates.
"""

from __future__ import annotations

import math

import uuid
from dataclasses import dataclass, field

import numpy as np

from .channels import PINNED, AttributeBinding, ParameterBinding, owner_path
from .propagation_state import PropagationState

_MAX_REASONS = 6


@dataclass
class ChannelSite:
    """Dimension ``dim`` of the output of graph node ``node`` holds these classes."""

    node: str
    module_path: str
    dim: int
    classes: np.ndarray


class Label:
    """One removable channel (or head, or channel group): a class within a dependency group."""

    __slots__ = ("group", "channel")

    def __init__(self, group: "DependencyGroup", channel: int):
        self.group = group
        self.channel = channel

    @property
    def class_id(self) -> int:
        return int(self.group.classes[self.channel])

    @property
    def score(self) -> float:
        return float(self.group.index.class_scores[self.class_id])

    @score.setter
    def score(self, value: float) -> None:
        self.group.index.class_scores[self.class_id] = value

    def _key(self) -> tuple:
        return (self.group.index.token, self.group.id, self.channel)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Label) and self._key() == other._key()

    def __repr__(self) -> str:
        return f"Label(group={self.group.id}, channel={self.channel}, score={self.score:.4g})"


@dataclass
class GroupDescription:
    """What a group ties together, for people: built on first use, for all groups at once."""

    unprunable_reasons: list[str] = field(default_factory=list)
    inexact_reasons: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    width_multiple: int = 1
    width_reasons: list[str] = field(default_factory=list)


@dataclass(eq=False)
class DependencyGroup:
    """Channels that must be pruned consistently, and where they live."""

    index: "ChannelIndex"
    id: int
    classes: np.ndarray               # prunable classes, in channel order
    pinned_count: int                 # channels of this group that can never be removed

    @property
    def unprunable_reasons(self) -> list[str]:
        return self.index.descriptions()[self.id].unprunable_reasons

    @property
    def inexact_reasons(self) -> list[str]:
        return self.index.descriptions()[self.id].inexact_reasons

    @property
    def parameters(self) -> list[str]:
        """``name[dim]`` of every parameter and buffer dimension sliced with this group."""
        return self.index.descriptions()[self.id].parameters

    @property
    def modules(self) -> list[str]:
        return self.index.descriptions()[self.id].modules

    @property
    def width_multiple(self) -> int:
        """Kept labels must be a multiple of this, or the group untouched: what a kernel the group
        feeds needs (``torch._grouped_mm``'s aligned strides); selectors combine it with their step."""
        return self.index.descriptions()[self.id].width_multiple

    @property
    def labels(self) -> list[Label]:
        return [Label(self, i) for i in range(len(self.classes))]

    @property
    def channel_count(self) -> int:
        return len(self.classes) + self.pinned_count

    @property
    def prunable(self) -> bool:
        return len(self.classes) > 0

    @property
    def exact(self) -> bool:
        """True when removing a dead (all-zero) label leaves the model's outputs unchanged."""
        return not self.inexact_reasons

    @property
    def scores(self) -> np.ndarray:
        return self.index.class_scores[self.classes]

    def __repr__(self) -> str:
        return (f"DependencyGroup(id={self.id}, labels={len(self.classes)}, pinned={self.pinned_count}, "
                f"parameters={self.parameters[:4]}{'...' if len(self.parameters) > 4 else ''})")


def _add_reason(reasons: list[str], reason: str) -> None:
    if reason not in reasons and len(reasons) < _MAX_REASONS:
        reasons.append(reason)


@dataclass(eq=False)
class ClassBinding:
    """A parameter dimension or module attribute, with the class of each of its positions."""

    target: ParameterBinding | AttributeBinding
    classes: np.ndarray


class ChannelIndex:
    """Class of every position of every bound parameter, attribute and activation site."""

    def __init__(self, class_count: int, parameter_bindings: list[ClassBinding],
                 attribute_bindings: list[ClassBinding], sites: list[ChannelSite],
                 pinned: np.ndarray, pin_reasons: list[tuple[np.ndarray, str]],
                 inexact: list[tuple[np.ndarray, str]], class_scores: np.ndarray | None = None,
                 multiples: list[tuple[np.ndarray, int, str]] | None = None):
        self.token = uuid.uuid4().hex
        self.class_count = class_count
        self.parameter_bindings = parameter_bindings
        self.attribute_bindings = attribute_bindings
        self.sites = sites
        self.pinned = pinned
        self.pin_reasons = pin_reasons
        self.inexact = inexact
        self.multiples = multiples or []   # (class of each position of a dimension, multiple, reason)
        self.class_scores = np.zeros(class_count) if class_scores is None else class_scores
        self._groups: list[DependencyGroup] | None = None
        self._descriptions: list[GroupDescription] | None = None

    @property
    def groups(self) -> list[DependencyGroup]:
        """Built on first use (a pruned IR that is not inspected never pays for it)."""
        if self._groups is None:
            self._groups = self._build_groups()
        return self._groups

    @classmethod
    def from_propagation(cls, state: PropagationState) -> "ChannelIndex":
        class_of = state.atoms.classes()
        pinned = np.zeros(len(class_of), dtype=bool)
        pinned[PINNED] = True
        pin_reasons = [(np.unique(class_of[atoms]), reason) for atoms, reason in state.atoms.pins]
        for classes, _ in pin_reasons:
            pinned[classes] = True
        inexact = [(np.unique(class_of[atoms]), reason) for atoms, reason in state.atoms.inexact]
        parameters = [ClassBinding(b, class_of[b.atoms]) for b in state.parameter_bindings.values()]
        attributes = [ClassBinding(b, class_of[b.atoms]) for b in state.attribute_bindings]
        sites = []
        for node, layout in state.layouts.items():
            if node in state.parameter_derived or not hasattr(layout, "dims"):
                continue
            stack = node.meta.get("module_stack", ())
            for dim, atoms in enumerate(layout.dims):
                if atoms is not None:
                    sites.append(ChannelSite(node.name, stack[-1] if stack else "", dim, class_of[atoms]))
        multiples = [(class_of[atoms], multiple, reason) for atoms, multiple, reason in state.atoms.multiples]
        return cls(len(class_of), parameters, attributes, sites, pinned, pin_reasons, inexact, multiples=multiples)

    # -- groups ---------------------------------------------------------------------------
    def _build_groups(self) -> list[DependencyGroup]:
        """Group the classes by the activation where each first appears (its origin).

        A conv's output channels, a residual stream, an attention block's heads each
        appear first together; a concatenation only juxtaposes channels that appeared
        earlier, so it joins no groups.
        """
        self.group_of_class = np.full(self.class_count, -1, dtype=np.int64)
        if not self.sites:
            return []
        ordered = np.concatenate([s.classes for s in self.sites])
        site_of_position = np.repeat(np.arange(len(self.sites)), [len(s.classes) for s in self.sites])
        keep = ordered != PINNED
        ordered, site_of_position = ordered[keep], site_of_position[keep]
        present, first = np.unique(ordered, return_index=True)
        by_appearance = np.argsort(first, kind="stable")
        present, origin = present[by_appearance], site_of_position[first[by_appearance]]
        new_group = np.concatenate([[True], origin[1:] != origin[:-1]])
        group_ids = np.cumsum(new_group) - 1
        self.group_of_class[present] = group_ids
        groups = []
        for gid, start in enumerate(np.flatnonzero(new_group)):
            members = present[group_ids == gid]
            free = members[~self.pinned[members]]
            groups.append(DependencyGroup(self, gid, free, int(len(members) - len(free))))
        return groups

    def set_class_scores(self, classes: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` as the scores of label classes ``classes``: all finite, or nothing is written."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != np.shape(classes):
            raise ValueError(f"{len(values)} scores for {len(classes)} classes")
        if not np.all(np.isfinite(values)):
            raise ValueError("scores must be finite (a loss or gradient that is inf or nan?)")
        self.class_scores[classes] = values

    def label_mask(self) -> np.ndarray:
        """Boolean mask over class ids: True for the classes that are labels of prunable
        groups (the pinned class never is), so callers select labels without walking groups."""
        mask = np.zeros(self.class_count, dtype=bool)
        for group in self.groups:
            mask[group.classes] = True
        mask[PINNED] = False
        return mask

    def _groups_touching(self, classes: np.ndarray) -> np.ndarray:
        groups = self.group_of_class[classes[classes != PINNED]]
        return np.unique(groups[groups >= 0])

    def descriptions(self) -> list[GroupDescription]:
        """Per group: why channels are unprunable or inexact, which parameters and modules it ties."""
        if self._descriptions is None:
            groups = [GroupDescription() for _ in self.groups]
            for classes, reason in self.pin_reasons:
                for gid in self._groups_touching(classes):
                    _add_reason(groups[gid].unprunable_reasons, reason)
            for classes, reason in self.inexact:
                for gid in self._groups_touching(classes):
                    _add_reason(groups[gid].inexact_reasons, reason)
            for positions, multiple, reason in getattr(self, "multiples", []):   # older saved IRs have none
                free = positions[~self.pinned[positions]]
                if not free.size:
                    continue
                per_label = len(free) // len(np.unique(free))   # positions a label stands for
                for gid in self._groups_touching(free):
                    needed = multiple // math.gcd(multiple, per_label)
                    groups[gid].width_multiple = math.lcm(groups[gid].width_multiple, needed)
                    _add_reason(groups[gid].width_reasons, reason)
            for binding in self.parameter_bindings:
                for gid in self._groups_touching(binding.classes):
                    groups[gid].parameters.append(f"{binding.target.name}[{binding.target.dim}]")
                    owner = owner_path(binding.target.name)
                    if owner not in groups[gid].modules:
                        groups[gid].modules.append(owner)
            for site in self.sites:
                for gid in self._groups_touching(site.classes):
                    if site.module_path and site.module_path not in groups[gid].modules:
                        groups[gid].modules.append(site.module_path)
            self._descriptions = groups
        return self._descriptions

    # -- pruning --------------------------------------------------------------------------
    def removal_mask(self, classes: np.ndarray) -> np.ndarray:
        removed = np.zeros(self.class_count, dtype=bool)
        removed[classes] = True
        return removed

    def emptied(self, removed: np.ndarray) -> str | None:
        """What a removal would empty entirely (a parameter dimension or an activation), if anything."""
        for binding in self.parameter_bindings:
            if len(binding.classes) and removed[binding.classes].all():
                return f"all {len(binding.classes)} positions of {binding.target.name}[dim {binding.target.dim}]"
        for site in self.sites:
            if len(site.classes) and removed[site.classes].all():
                return f"all {len(site.classes)} channels of the output of {site.node} in '{site.module_path}'"
        return None

    def misaligned(self, removed: np.ndarray) -> str | None:
        """A group a removal would leave at a width its kernel cannot run (``width_multiple``), if any."""
        for group in self.groups:
            dropped = int(removed[group.classes].sum())
            kept = group.channel_count - dropped
            if dropped and group.width_multiple > 1 and kept % group.width_multiple:
                reasons = self.descriptions()[group.id].width_reasons
                return (f"group {group.id} ({', '.join(group.modules[:2])}) would keep {kept} labels, but must keep a "
                        f"multiple of {group.width_multiple} ({reasons[0] if reasons else 'a kernel needs it'}); every "
                        "selector keeps it")
        return None

    def without(self, removed: np.ndarray, pins: list[tuple[np.ndarray, str]] = ()) -> "ChannelIndex":
        """The index of the pruned model: every array keeps only the surviving positions;
        ``pins``: (classes, reason) pairs pinned from now on (groups prune() found it must keep)."""

        def keep(classes: np.ndarray) -> np.ndarray:
            return classes[~removed[classes]]

        parameters = [ClassBinding(b.target, keep(b.classes)) for b in self.parameter_bindings]
        attributes = [ClassBinding(b.target, keep(b.classes)) for b in self.attribute_bindings]
        sites = [ChannelSite(s.node, s.module_path, s.dim, keep(s.classes)) for s in self.sites]
        sites = [s for s in sites if len(s.classes)]
        pinned = self.pinned.copy()
        for classes, _ in pins:
            pinned[classes] = True
        multiples = [(keep(classes), multiple, reason) for classes, multiple, reason in getattr(self, "multiples", [])]
        return ChannelIndex(self.class_count, parameters, attributes, sites, pinned,
                            self.pin_reasons + list(pins), self.inexact, self.class_scores.copy(), multiples)
