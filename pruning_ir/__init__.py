"""pruning_ir: structured channel pruning for PyTorch models.

The pipeline, one module each: ``tracing`` (record a forward pass into an fx graph) ->
``propagation`` + ``channel_rules`` (which channels must go together) -> ``labels``
(labels and dependency groups) -> ``criteria`` (scores) -> ``selectors`` (which labels
to remove) -> ``pruning`` (remove them physically).
"""

from .batchnorm import batch_statistics, tune_batchnorm_statistics
from .criteria import LossAwareCriterion, MagnitudeCriterion, RandomCriterion, measure_removal_costs
from .errors import (InvalidLabelsError, LabelsNotInferredError, ModelExecutionError, PruningIRError,
                     TracingError)
from .gradual import GradualPruner
from .ir import PruningIR
from .labels import DependencyGroup, Label
from .latency import LatencyMeasurementError, bind
from .rounds import prune_in_rounds
from .selectors import (BinarySearchLatencyLabelSelector, ChannelConstraint, GlobalScoreLabelSelector,
                        KnapsackLabelSelector, LabelSelector, UniformLabelSelector)
from .saving import load_pruned, save_pruned
from .tracing import LeafModule

__all__ = [
    "GradualPruner", "prune_in_rounds",
    "PruningIR", "Label", "DependencyGroup", "LeafModule",
    "LossAwareCriterion", "MagnitudeCriterion", "RandomCriterion", "measure_removal_costs",
    "LabelSelector", "UniformLabelSelector", "GlobalScoreLabelSelector", "KnapsackLabelSelector",
    "BinarySearchLatencyLabelSelector", "ChannelConstraint", "LatencyMeasurementError", "bind",
    "tune_batchnorm_statistics", "batch_statistics", "save_pruned", "load_pruned",
    "PruningIRError", "TracingError", "ModelExecutionError", "LabelsNotInferredError", "InvalidLabelsError",
]
__version__ = "0.1.0"
