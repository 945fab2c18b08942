"""Tied groups: the same group of a block that repeats, layer after layer.

A Hugging Face config holds one MLP width and one head count for every layer, so a pruned model
it can describe keeps the same number of labels in the MLP group of every layer, and in the head
group of every layer. Such groups are recognised by their parameters: the same names once the
layer indices (path components made only of digits) are blotted out, the same channel count,
pinned count and number of labels, and as many parameter positions (a label of the same size).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..labels import DependencyGroup

__all__ = ["layer_pattern", "repeated_groups"]

_INDEX = re.compile(r"(^|\.)\d+(?=\.|\[|$)")


def layer_pattern(name: str) -> str:
    """``name`` with every layer index replaced by ``#``: ``model.layers.3.mlp.up_proj.weight[0]`` ->
    ``model.layers.#.mlp.up_proj.weight[0]`` (a digit inside a name, ``layer1``, stays)."""
    return _INDEX.sub(r"\1#", name)


def _positions(groups: Sequence[DependencyGroup]) -> dict[int, int]:
    """Group id -> how many parameter positions its prunable labels hold (all its labels together)."""
    if not groups:
        return {}
    index = groups[0].index
    group_of = np.full(index.class_count, -1, dtype=np.int64)
    for group in groups:
        group_of[group.classes] = group.id
    counts: dict[int, int] = {}
    for binding in index.parameter_bindings:
        owners = group_of[binding.classes]
        ids, sizes = np.unique(owners[owners >= 0], return_counts=True)
        for group_id, size in zip(ids.tolist(), sizes.tolist()):
            counts[group_id] = counts.get(group_id, 0) + size
    return counts


def repeated_groups(groups: Sequence[DependencyGroup]) -> list[list[DependencyGroup]]:
    """The classes of tied groups among ``groups`` (two or more each, in group order).

    Groups are tied when their parameter names agree up to layer indices and they have the same
    channel count, pinned count, label count and parameter positions. The residual stream (one
    group through every layer) has no twin, so it is never tied.
    """
    positions = _positions(groups)
    classes: dict[tuple, list[DependencyGroup]] = {}
    for group in groups:
        names = group.parameters
        if not names:
            continue
        pattern = tuple(sorted({layer_pattern(name) for name in names}))
        key = (pattern, group.channel_count, group.pinned_count, len(group.classes), positions.get(group.id, 0))
        classes.setdefault(key, []).append(group)
    return [members for members in classes.values() if len(members) > 1]
