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
import ctypes
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import LatencyMeasurementError
from .modes import kept_training_flags

__all__ = ["LatencyMeasurementError", "macs", "parameter_count", "measure_latency", "compare_latency", "bind",
           "BoundLatency", "TableLatency", "steady_allocator", "allocator_mode", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
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
def unfused_attention() -> Iterator[None]:
    """Without torch's fused fast path for ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    (taken in eval mode without gradients): its fused kernels are invisible to the FLOP counter."""
    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(before)


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
    with eval_mode(model), one_thread(), unfused_attention():
        try:
            with FlopCounterMode(display=False) as counter:
                _run(model, inputs, kwargs)
        except LatencyMeasurementError as error:
            # the counter's module tracker hooks module inputs for backward, which fails without
            # gradients on a parameter passed to a submodule (DeBERTa's relative embeddings)
            with torch.enable_grad(), FlopCounterMode(display=False) as counter:
                try:
                    _run(model, inputs, kwargs)
                except LatencyMeasurementError:
                    raise error from None
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
_HEAP_BUFFERS_UP_TO = 32 << 20                   # the largest mmap threshold glibc accepts on 64-bit
_steady: bool | None = None


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt`` where the process allocates with glibc (None elsewhere)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def steady_allocator() -> bool:
    """Keep CPU buffers of up to 32 MiB in the process heap, and the heap's free memory in the
    process, so a forward pass reuses memory instead of mapping fresh pages on every call.

    With glibc's adaptive defaults a large activation is ``mmap``-ed and page-faulted on each
    call, or the heap is trimmed and refilled, depending on what the process freed before: the
    same op can read several times slower from one call to the next, and a latency table or a
    selection reads that history instead of the model. Caching allocators (jemalloc, tcmalloc,
    which tuned CPU deployments preload) behave like the steady heap. Process-wide and one-way
    (glibc cannot return to its adaptive thresholds): the process keeps freed memory for reuse.
    Returns whether glibc's settings were applied (False off glibc; under a preloaded caching
    allocator they are set but moot, the heap already steady).
    """
    global _steady
    if _steady is None:
        mallopt = _glibc_mallopt()
        _steady = mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BUFFERS_UP_TO)) and \
            bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _steady


def allocator_mode(device: str | torch.device, steady: bool) -> str:
    """What CPU memory a timing runs with (part of a latency table's machine key), without changing
    it: ``"steady"`` where :func:`steady_allocator` applies, ``"process"`` for the process's own
    allocator, ``"device"`` off the CPU."""
    if torch.device(device).type != "cpu":
        return "device"
    return "steady" if steady and (_steady or (_steady is None and _glibc_mallopt() is not None)) else "process"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trimmed_mean(times: list[float]) -> float:
    """Mean of the central half of the runs: drops the slow outliers other processes cause
    and the rare fast one, and averages the rest (steadier than one order statistic)."""
    ordered = sorted(times)
    quarter = len(ordered) // 4
    middle = ordered[quarter:len(ordered) - quarter] or ordered
    return sum(middle) / len(middle)


_STATISTICS = {"median": statistics.median, "min": min, "trimmed": _trimmed_mean}


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave the setting), restoring it after: a
    timing depends on the thread count, so a table or a comparison must fix it."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or a positive int, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No garbage collection inside the timed runs (a collection pause is not the model's time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _timed_runs(model: nn.Module, inputs: tuple, kwargs: dict, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` runs: CUDA events on a GPU (the device's own clock, after
    a synchronization so queued work is not counted), ``perf_counter`` on a CPU."""
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _synchronize(device)
            start.record()
            _run(model, inputs, kwargs)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000.0)
        return times
    for _ in range(repeats):
        start = time.perf_counter()
        _run(model, inputs, kwargs)
        times.append(time.perf_counter() - start)
    return times


def measure_latency(model: nn.Module, *inputs: Any, device: str | torch.device = "cpu", warmup: int = 5,
                    repeats: int = 20, statistic: str = "median", threads: int | None = None,
                    steady: bool = True, **kwargs: Any) -> float:
    """Median wall time in seconds of one forward pass on ``inputs`` (eval mode, no gradients).

    ``warmup`` untimed runs come first (allocator, caches, lazy kernels), then ``repeats``
    timed ones (CUDA events after a synchronization on a GPU; garbage collection off); the
    median resists outliers from other processes. ``statistic="min"`` takes the fastest run:
    noise from a shared or virtual machine only ever adds time, so the minimum is the steadier
    estimate there; ``"trimmed"`` averages the central half. ``threads`` pins torch's intra-op
    thread count for the measurement (restored after). ``steady``: on a CPU, measure with
    :func:`steady_allocator` (process-wide; False: with whatever the process's allocator does).
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
    if steady and device.type == "cpu":
        steady_allocator()
    with eval_mode(model), pinned_threads(threads):
        for _ in range(warmup):
            _run(model, inputs, kwargs)
        _synchronize(device)
        with _no_gc():
            times = _timed_runs(model, inputs, kwargs, device, repeats)
    return _STATISTICS[statistic](times)


def compare_latency(models: Sequence[nn.Module], *inputs: Any, rounds: int = 5, device: str | torch.device = "cpu",
                    warmup: int = 2, repeats: int = 5, statistic: str = "min", threads: int | None = None,
                    steady: bool = True, **kwargs: Any) -> list[float]:
    """Latency of each of ``models`` on the same inputs, measured in rotation: the fastest of
    ``rounds`` rounds, each measuring every model once (``measure_latency`` with the other
    options), the order reversed every other round.

    On a shared machine load comes and goes within seconds; measured one after the other, two
    models see different loads, measured in rotation they see the same, so the ratios between
    the results (a speed-up, a share of the unpruned latency) hold even when the seconds drift.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"compare_latency needs rounds >= 1, got {rounds!r}")
    models = list(models)
    if not models:
        raise ValueError("compare_latency needs at least one model")
    best = [float("inf")] * len(models)
    for round_ in range(rounds):
        order = range(len(models)) if round_ % 2 == 0 else reversed(range(len(models)))
        for index in order:
            seconds = measure_latency(models[index], *inputs, device=device, warmup=warmup, repeats=repeats,
                                      statistic=statistic, threads=threads, steady=steady, **kwargs)
            best[index] = min(best[index], seconds)
    return best


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


class TableLatency(BoundLatency):
    """``measure_latency`` on fixed inputs that also tells a selector how to build a latency table.

    Called on a model it measures it like ``bind(measure_latency, *inputs, ...)``;
    ``KnapsackLabelSelector`` recognises it and solves a multiple-choice knapsack over a
    per-group latency table (``pruning_ir.selectors.latency_table.LatencyTable``) built from
    the same inputs, device, dtype and threads, checking each choice on the real model.
    ``op_warmup``/``op_repeats``: the timing of each isolated op in the table; ``cache_path``:
    a JSON file the table's op timings persist in (keyed by machine); ``steady``: as in
    ``measure_latency``, for the model and the table alike.
    """

    def __init__(self, *inputs: Any, device: str | torch.device = "cpu", warmup: int = 3, repeats: int = 10,
                 statistic: str = "min", threads: int | None = None, op_warmup: int = 2, op_repeats: int = 5,
                 cache_path: str | None = None, grid_points: int = 12, steady: bool = True, **kwargs: Any):
        super().__init__(measure_latency, *inputs, device=device, warmup=warmup, repeats=repeats,
                         statistic=statistic, threads=threads, steady=steady, **kwargs)
        self.table_options = {"device": device, "threads": threads, "warmup": op_warmup, "repeats": op_repeats,
                              "statistic": statistic, "cache_path": cache_path, "grid_points": grid_points,
                              "steady": steady}

    def __repr__(self) -> str:
        return "TableLatency" + super().__repr__()[len("bind(measure_latency"):].replace(", ", "(", 1)
