"""A readable table of an IR's dependency groups: what ``print(ir)`` and ``ir.summary()`` show.

Per group: how many labels it has and what one label is (a channel, or a head of n channels),
its channels, the parameters and MACs its channels hold (the share of each bound parameter
dimension that the group's positions make up, times that parameter's size or its module's
MACs on the example inputs), the modules it touches (the root module is named ``<model>``) and
why it is pinned or inexact. Models with many groups get a compact view: groups of repeated
blocks (``layers.3.mlp`` and ``layers.4.mlp``) with the same widths fold into one row.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .channels import owner_path
from .labels import ChannelIndex
from .modes import kept_training_flags
from .text_tables import format_count

__all__ = ["GroupRow", "group_rows", "format_rows"]

WIDTH = 120
COMPACT_AFTER = 40  # more groups than this: repeated blocks fold into one row


@dataclass
class GroupRow:
    """One line of the summary (``count`` > 1: that many groups of repeated blocks folded)."""

    group: str
    labels: int
    label_size: int
    channels: int
    parameters: float
    macs: float | None
    modules: str
    status: str
    count: int = 1


def _module_macs(model: nn.Module, inputs: tuple[tuple, dict] | None) -> dict[str, float] | None:
    """MACs of each module's own ops (its children's subtracted) on ``inputs``; None without inputs."""
    if inputs is None:
        return None
    args, kwargs = inputs
    try:
        with kept_training_flags(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a summary never fails because MACs could not be counted
        return None
    root = type(model).__name__
    total = {name: sum(counts.values()) / 2.0 for name, counts in counter.get_flop_counts().items()}
    own: dict[str, float] = {}
    for path, module in model.named_modules():
        key = root if not path else f"{root}.{path}"
        children = sum(total.get(f"{key}.{child}", 0.0) for child, _ in module.named_children())
        own[path] = max(total.get(key, 0.0) - children, 0.0)
    return own


def _channels_per_class(index: ChannelIndex) -> np.ndarray:
    """Per class, the fewest positions a bound dimension holding it gives it: 1 for a channel, the
    head size for an attention head (a fused q/k/v projection holds it three times)."""
    fewest = np.full(index.class_count, np.iinfo(np.int64).max, dtype=np.int64)
    for binding in index.parameter_bindings:
        counts = np.bincount(binding.classes, minlength=index.class_count)
        present = counts > 0
        fewest[present] = np.minimum(fewest[present], counts[present])
    fewest[fewest == np.iinfo(np.int64).max] = 1
    return fewest


def group_rows(model: nn.Module, index: ChannelIndex, inputs: tuple[tuple, dict] | None) -> list[GroupRow]:
    """One row per dependency group, with the parameters and MACs its channels hold."""
    all_groups = index.groups  # builds index.group_of_class
    module_macs = _module_macs(model, inputs)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    held_parameters: dict[int, float] = defaultdict(float)
    held_macs: dict[int, float] = defaultdict(float)
    for binding in index.parameter_bindings:
        name = binding.target.name
        tensor = parameters.get(name)
        if tensor is None:
            continue  # a buffer
        groups = index.group_of_class[binding.classes]
        path = owner_path(name)
        for group_id in np.unique(groups[groups >= 0]):
            share = float(np.mean(groups == group_id))
            held_parameters[int(group_id)] += share * tensor.numel()
            if module_macs is not None and tensor.dim() > 1:
                held_macs[int(group_id)] += share * module_macs.get(path, 0.0)
    per_class = _channels_per_class(index)
    rows = []
    for group in all_groups:
        modules = [m or "<model>" for m in group.modules]
        reasons = group.unprunable_reasons if not group.prunable else group.inexact_reasons
        status = ("pinned: " if not group.prunable else "inexact: " if reasons else "exact") + \
            (reasons[0] if reasons else "")
        if group.prunable and group.width_multiple > 1:
            status = f"widths in multiples of {group.width_multiple}; {status}"
        size = int(per_class[group.classes].max()) if group.prunable else 1
        rows.append(GroupRow(str(group.id), len(group.classes), size, group.channel_count * size,
                             held_parameters[group.id], None if module_macs is None else held_macs[group.id],
                             ", ".join(modules[:4]) + (f" +{len(modules) - 4}" if len(modules) > 4 else ""),
                             status))
    return rows


def _pattern(row: GroupRow) -> tuple:
    return (re.sub(r"\.\d+(?=\.|,|$)", ".*", row.modules), row.labels, row.label_size, row.channels, row.status)


def _folded(rows: list[GroupRow]) -> list[GroupRow]:
    """Groups of repeated blocks with equal widths folded into one row each (first appearance order)."""
    folded: dict[tuple, GroupRow] = {}
    for row in rows:
        key = _pattern(row)
        first = folded.get(key)
        if first is None:
            folded[key] = GroupRow(**vars(row))
            continue
        first.count += 1
        first.parameters += row.parameters
        first.macs = None if first.macs is None or row.macs is None else first.macs + row.macs
        first.modules = key[0]
    return list(folded.values())


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_rows(title: str, rows: list[GroupRow], compact: bool | None = None) -> str:
    """The summary text: a title, a header and one line (at most ``WIDTH`` characters) per row."""
    compact = len(rows) > COMPACT_AFTER if compact is None else compact
    shown = _folded(rows) if compact else rows
    lines = [_fit(line, WIDTH) for line in title.splitlines()] + [
             f"{'group':>9} {'labels':>7} {'x ch':>5} {'channels':>8} {'params':>8} {'MACs':>8}  modules / status"]
    for row in shown:
        label = f"{row.group}" + (f"+ x{row.count}" if row.count > 1 else "")
        macs = "-" if row.macs is None else format_count(row.macs)
        head = (f"{label:>9} {row.labels:>7} {row.label_size:>5} {row.channels:>8} "
                f"{format_count(row.parameters):>8} {macs:>8}  ")
        lines.append(_fit(head + row.modules, WIDTH))
        if row.status != "exact":
            lines.append(_fit(" " * len(head) + row.status, WIDTH))
    if compact and len(shown) < len(rows):
        lines.append(f"({len(rows)} groups; 'id+ xN' folds N groups of repeated blocks, params and MACs summed; "
                     "compact=False lists each)")
    return "\n".join(lines)


def summary_title(model: nn.Module, index: ChannelIndex) -> str:
    prunable = [g for g in index.groups if g.prunable]
    return (f"PruningIR({type(model).__name__}): {sum(len(g.classes) for g in prunable)} labels in {len(prunable)} "
            f"prunable groups, {len(index.groups) - len(prunable)} pinned groups\n"
            "(x ch: channels one label stands for; params, MACs: what the group's channels hold)")


def summary(model: nn.Module, index: ChannelIndex, inputs: Any, compact: bool | None = None) -> str:
    return format_rows(summary_title(model, index), group_rows(model, index, inputs), compact)


def describe_groups(model: nn.Module, index: ChannelIndex) -> str:
    """Per group: modules and parameters it ties, channel counts, and why channels are unprunable."""
    groups = index.groups
    prunable = [g for g in groups if g.prunable]
    lines = [f"PruningIR({type(model).__name__}): {sum(len(g.classes) for g in prunable)} labels "
             f"in {len(prunable)} prunable groups, {len(groups) - len(prunable)} unprunable groups"]
    for group in groups:
        status = "exact" if group.exact else "inexact"
        lines.append(f"group {group.id}: {len(group.classes)}/{group.channel_count} channels prunable "
                     f"({status}); modules: {', '.join(m or '<model>' for m in group.modules[:6]) or '-'}"
                     f"{' ...' if len(group.modules) > 6 else ''}")
        lines.append(f"    parameters: {', '.join(group.parameters[:8]) or '-'}"
                     f"{' ...' if len(group.parameters) > 8 else ''}")
        for reason in group.unprunable_reasons:
            lines.append(f"    unprunable: {reason}")
        for reason in group.inexact_reasons[:2]:
            lines.append(f"    inexact: {reason}")
    return "\n".join(lines)
