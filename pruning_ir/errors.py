"""Errors raised by pruning_ir; each names the problem it reports."""

from __future__ import annotations


class PruningIRError(Exception):
    """Base class of every error pruning_ir raises on purpose."""


class TracingError(PruningIRError):
    """The model could not be recorded into a graph (strict tracing, or a failing forward)."""


class ModelExecutionError(TracingError):
    """The model raised while running on the example inputs it was given."""


class LabelsNotInferredError(PruningIRError):
    """Labels are needed but the IR has not seen example inputs yet."""


class InvalidLabelsError(PruningIRError, ValueError):
    """Labels passed to prune() are foreign, duplicated, or would empty a group."""


class LatencyMeasurementError(PruningIRError, RuntimeError):
    """A latency function could not measure this model (it raised, or returned no usable number)."""


class LatencyFunctionError(PruningIRError, RuntimeError):
    """The latency function raised an unexpected error, or returned something that is not a number."""


class BudgetUnreachableError(PruningIRError, ValueError):
    """A latency selector's target lies below the smallest model pruning can reach (every group as
    narrow as its constraint allows); ``target`` and ``smallest`` are in the latency function's units."""

    def __init__(self, message: str, target: float, smallest: float):
        super().__init__(message)
        self.target, self.smallest = target, smallest


class PrunedModelFormatError(PruningIRError, ValueError):
    """The saved configuration does not fit the model it is loaded into, or the folder is not a saved model."""


class PruningError(PruningIRError):
    """prune(strict=True): removing the labels would break the model (the message names the
    groups responsible and the error each caused)."""


__all__ = ["PruningIRError", "TracingError", "ModelExecutionError", "LabelsNotInferredError", "InvalidLabelsError",
           "LatencyMeasurementError", "LatencyFunctionError", "BudgetUnreachableError", "PrunedModelFormatError",
           "PruningError"]
