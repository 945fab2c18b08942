"""pruning_ir: structured channel pruning for PyTorch models.

The pipeline, one module each: ``tracing`` (record a forward pass into an fx graph) ->
``propagation`` + ``channel_rules`` (which channels must go together) -> ``labels``
(labels and dependency groups) -> ``criteria`` (scores) -> ``selectors`` (which labels
to remove) -> ``pruning`` (remove them physically).
"""

from .batchnorm import batch_statistics, tune_batchnorm_statistics
from .criteria import (ActivationCriterion, Criterion, LossAwareCriterion, MagnitudeCriterion, RandomCriterion,
                       measure_removal_costs)
from .errors import (BudgetUnreachableError, InvalidLabelsError, LabelsNotInferredError, LatencyFunctionError,
                     LatencyMeasurementError, ModelExecutionError, PrunedModelFormatError, PruningError, PruningIRError,
                     TracingError)
from .gradual import GradualPruner
from .ir import PruningIR
from .labels import DependencyGroup, Label
from .latency import TableLatency, bind, macs, measure_latency, parameter_count
from .one_call import PruneReport, prune
from .reconstruction import InputStatistics, Reconstruction, ReconstructionReport, collect_statistics
from .rounds import prune_in_rounds
from .sequential_refit import RefitTarget, refit_sequentially
from .selectors import (BinarySearchLatencyLabelSelector, ChannelConstraint, GlobalScoreLabelSelector,
                        KnapsackLabelSelector, LabelSelector, LatencyTable, UniformLabelSelector)
from .huggingface import expressible, load_pretrained_pruned, save_pretrained_pruned, sync_config
from .saving import load_pruned, save_pruned
from .tracing import LeafModule

__all__ = [
    "prune", "PruneReport", "GradualPruner", "prune_in_rounds",
    "PruningIR", "Label", "DependencyGroup", "LeafModule",
    "Criterion", "LossAwareCriterion", "ActivationCriterion", "MagnitudeCriterion", "RandomCriterion",
    "measure_removal_costs",
    "LabelSelector", "UniformLabelSelector", "GlobalScoreLabelSelector", "KnapsackLabelSelector",
    "BinarySearchLatencyLabelSelector", "ChannelConstraint", "bind", "macs", "parameter_count", "measure_latency",
    "TableLatency", "LatencyTable",
    "tune_batchnorm_statistics", "batch_statistics", "save_pruned", "load_pruned",
    "collect_statistics", "InputStatistics", "Reconstruction", "ReconstructionReport", "refit_sequentially",
    "RefitTarget",
    "sync_config", "expressible", "save_pretrained_pruned", "load_pretrained_pruned",
    "PruningIRError", "TracingError", "ModelExecutionError", "LabelsNotInferredError", "InvalidLabelsError",
    "LatencyMeasurementError", "LatencyFunctionError", "BudgetUnreachableError", "PrunedModelFormatError",
    "PruningError",
]
__version__ = "0.1.0"
