"""The latency oracle: the user's latency function, called on pruned copies, checked and cached.

Latency depends only on how many labels leave each group (labels of one group touch the
same tensors), not on which, so measurements are cached by counts vector and IR, in a cache
the selector owns: one selector selecting on the same IR again re-measures nothing it has
seen. Every real call is counted: it is the cost of a latency-aware selector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import numpy as np
from torch import nn

from ..errors import LatencyFunctionError, LatencyMeasurementError
from .plan import SelectionPlan

_Result = float | LatencyMeasurementError

__all__ = ["LatencyFunctionError", "LatencyOracle", "check_target", "check_function"]


def check_target(target_latency: float) -> float:
    """A latency target must be a positive finite number."""
    if isinstance(target_latency, bool) or not isinstance(target_latency, Real):
        raise TypeError(f"target_latency must be a positive number, got {target_latency!r}")
    if not math.isfinite(target_latency) or target_latency <= 0:
        raise ValueError(f"target_latency must be a positive finite number, got {target_latency}")
    return float(target_latency)


def check_function(function: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
    if not callable(function):
        raise TypeError(f"latency_calculation_function must be callable (model -> float), got {function!r}")
    return function


class LatencyOracle:
    """``oracle(counts)`` -> latency of the model with those labels removed, cached in ``cache``
    (the selector's: IR token -> counts bytes -> result)."""

    def __init__(self, plan: SelectionPlan, function: Callable[[nn.Module], float],
                 cache: dict[str, dict[bytes, _Result]] | None = None):
        self.plan = plan
        self.function = function
        self.calls = 0
        self._cache: dict[bytes, _Result] = ({} if cache is None else cache).setdefault(plan.ir.index.token, {})

    def __call__(self, counts: np.ndarray) -> float:
        """Latency of the selection; raises LatencyMeasurementError if the function cannot measure it."""
        key = np.asarray(counts, dtype=np.int64).tobytes()
        if key not in self._cache:
            self._cache[key] = self._measure(counts)
        result = self._cache[key]
        if isinstance(result, LatencyMeasurementError):
            raise result
        return result

    def _measure(self, counts: np.ndarray) -> _Result:
        labels = self.plan.labels(counts)
        model = self.plan.ir.prune(labels=labels, reconstruct=None, sync_config=False).model if labels \
            else self.plan.ir.model   # a candidate, only measured: its config is left as it was
        what = f"the model with {len(labels)} labels removed" if labels else "the unpruned model"
        self.calls += 1
        try:
            value = self.function(model)
        except LatencyMeasurementError as error:
            return error
        except Exception as error:  # noqa: BLE001 - any failure of the user's function is reported
            raise LatencyFunctionError(
                f"latency_calculation_function raised {type(error).__name__} on {what}: {error} (raise "
                "pruning_ir.latency.LatencyMeasurementError for configurations it cannot measure)") from error
        if isinstance(value, bool) or not isinstance(value, Real):
            hint = " (use .item() on a tensor)" if hasattr(value, "item") else ""
            raise LatencyFunctionError(
                f"latency_calculation_function must return a number, got {type(value).__name__} {value!r} "
                f"on {what}{hint}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise LatencyFunctionError(f"latency_calculation_function returned {value} on {what}; "
                                       "expected a finite number >= 0")
        return value
