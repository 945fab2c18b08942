"""Train/eval flags: the one place that saves and restores them.

Recording, latency measurement and batch-norm work switch modules between train and eval
mode; the user's model must come back with every flag as it was, also when the work raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["kept_training_flags"]


@contextmanager
def kept_training_flags(modules: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """On exit, the ``training`` flag of each module (every submodule of a model given as one
    module) is what it was on entry, whatever the block did."""
    targets = list(modules.modules()) if isinstance(modules, nn.Module) else list(modules)
    flags = [module.training for module in targets]
    try:
        yield
    finally:
        for module, training in zip(targets, flags):
            module.training = training
