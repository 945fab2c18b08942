"""Shared checks for the test suite: exactness of pruning dead labels, and structural validity."""

from __future__ import annotations

import random
import socket

import torch
from torch.utils import _pytree as pytree

from pruning_ir import InvalidLabelsError, PruningIR


def tensors(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pick_labels(ir: PruningIR, fraction: float, seed: int = 0, exact_only: bool = True) -> list:
    """A random share of the labels of every prunable group (never a whole group)."""
    rng = random.Random(seed)
    chosen = []
    for group in ir.groups:
        if len(group.classes) < 2 or (exact_only and not group.exact):
            continue
        labels = group.labels
        count = min(len(labels) - 1, max(1, int(round(len(labels) * fraction))))
        for label in rng.sample(labels, count):
            try:
                ir.check_labels(chosen + [label])
            except InvalidLabelsError:
                continue
            chosen.append(label)
    return chosen


def assert_exact_pruning(model: torch.nn.Module, *inputs, fraction: float = 0.5, seed: int = 0,
                         atol: float = 1e-5, leaf_modules=None, **kwargs) -> tuple[PruningIR, PruningIR, list]:
    """Make a random share of every exact group's labels dead, prune exactly those, and
    require the outputs to match the unpruned (dead-labelled) model within ``atol``."""
    model.eval()
    ir = PruningIR(model, leaf_modules=leaf_modules).infer_labels(*inputs, **kwargs)
    labels = pick_labels(ir, fraction, seed)
    assert labels, f"no exact prunable labels found:\n{ir.describe()}"
    ir.zero_labels(labels)
    with torch.no_grad():
        reference = tensors(model(*inputs, **kwargs))
    pruned = ir.prune(labels=labels)
    assert type(pruned.model) is type(model)
    assert parameter_count(pruned.model) < parameter_count(model)
    pruned.model.eval()
    with torch.no_grad():
        outputs = tensors(pruned.model(*inputs, **kwargs))
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    return ir, pruned, labels


def assert_prunes_and_runs(model: torch.nn.Module, *inputs, fraction: float = 0.5, seed: int = 0,
                           **kwargs) -> PruningIR:
    """Prune a random share of every prunable group (exact or not); the model must still run
    with unchanged output shapes."""
    model.eval()
    ir = PruningIR(model).infer_labels(*inputs, **kwargs)
    with torch.no_grad():
        reference = tensors(model(*inputs, **kwargs))
    labels = pick_labels(ir, fraction, seed, exact_only=False)
    pruned = ir.prune(labels=labels)
    with torch.no_grad():
        outputs = tensors(pruned.model(*inputs, **kwargs))
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    return pruned


def free_port() -> int:
    """A free TCP port on the loopback address (for a gloo process group in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
