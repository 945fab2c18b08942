"""Latency functions: the costs a latency-constrained selector minimizes.

A selector calls ``latency_calculation_function(model) -> float`` on pruned copies of the
model, so each cost here takes the model first and its example inputs after;
:func:`bind` fixes the inputs and returns that one-argument callable::

    latency_fn = bind(macs, example_input)           # MACs of one forward pass
    latency_fn = bind(measure_latency, x, repeats=30)  # median CPU wall time, seconds

Every function leaves the model as it found it (train/eval flags, device, parameters).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import LatencyMeasurementError
from .modes import kept_training_flags

__all__ = ["LatencyMeasurementError", "macs", "parameter_count", "measure_latency", "bind", "BoundLatency"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode without gradients, then restore every module's training flag."""
    with kept_training_flags(model), torch.no_grad():
        model.eval()
        yield model


def _run(model: nn.Module, inputs: tuple, kwargs: dict) -> Any:
    try:
        return model(*inputs, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of the user's model is reported the same way
        raise LatencyMeasurementError(
            f"{type(model).__name__} raised {type(error).__name__} while measuring its latency: {error}") from error


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Counting is bound by op dispatch: intra-op threads only add contention (up to 50x
    slower on a loaded machine), so count on one thread and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def macs(model: nn.Module, *inputs: Any, **kwargs: Any) -> float:
    """Multiply-accumulates of one forward pass on ``inputs`` (half of torch's FLOP count).

    Deterministic and device independent: counted by ``torch.utils.flop_counter`` from the
    shapes of the matmuls and convolutions that actually run.
    """
    with _eval_mode(model), one_thread(), FlopCounterMode(display=False) as counter:
        _run(model, inputs, kwargs)
    return counter.get_total_flops() / 2.0


def parameter_count(model: nn.Module) -> float:
    """Number of parameters (shared parameters counted once): a cost that needs no inputs."""
    return float(sum(p.numel() for p in model.parameters()))


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STATISTICS = {"median": statistics.median, "min": min}


def measure_latency(model: nn.Module, *inputs: Any, device: str | torch.device = "cpu", warmup: int = 5,
                    repeats: int = 20, statistic: str = "median", **kwargs: Any) -> float:
    """Median wall time in seconds of one forward pass on ``inputs`` (eval mode, no gradients).

    ``warmup`` untimed runs come first (allocator, caches, lazy kernels), then ``repeats``
    timed ones, synchronizing CUDA around each; the median resists outliers from other
    processes. ``statistic="min"`` takes the fastest run instead: noise from a shared or
    virtual machine only ever adds time, so the minimum is the steadier estimate there.
    A model on another device is measured on a copy, so the caller's stays put.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure_latency needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    try:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as error:
        raise LatencyMeasurementError(f"cannot measure latency on device {device!r}: {error}") from error
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device != device for t in tensors):
        model = copy.deepcopy(model).to(device)
    inputs, kwargs = to_device(inputs, device), to_device(kwargs, device)
    times = []
    with _eval_mode(model):
        for _ in range(warmup):
            _run(model, inputs, kwargs)
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            _run(model, inputs, kwargs)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return _STATISTICS[statistic](times)


class BoundLatency:
    """``function(model, *inputs, **kwargs)`` as a one-argument latency function (picklable)."""

    def __init__(self, function: Callable[..., float], *inputs: Any, **kwargs: Any):
        self.function = function
        self.inputs = inputs
        self.kwargs = kwargs

    def __call__(self, model: nn.Module) -> float:
        return self.function(model, *self.inputs, **self.kwargs)

    def __repr__(self) -> str:
        name = getattr(self.function, "__name__", repr(self.function))
        return f"bind({name}, {len(self.inputs)} inputs{', ' if self.kwargs else ''}" \
               f"{', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


def bind(function: Callable[..., float], *inputs: Any, **kwargs: Any) -> BoundLatency:
    """Fix the example inputs (and options) of a cost, giving a ``latency_calculation_function``."""
    return BoundLatency(function, *inputs, **kwargs)
