"""Label selectors: which labels to prune, given scores (and, for some, a latency budget).

``UniformLabelSelector`` and ``GlobalScoreLabelSelector`` only rank scores;
``KnapsackLabelSelector`` and ``BinarySearchLatencyLabelSelector`` meet a latency target
measured by a ``latency_calculation_function(model) -> float`` (see ``pruning_ir.latency``);
with a :class:`LatencyTable` the knapsack is a multiple-choice one over per-group latency tables.
Every selector takes a :class:`ChannelConstraint` and returns labels that ``ir.prune`` accepts.
"""

from .base import LabelSelector
from .binary_search import BinarySearchLatencyLabelSelector
from .constraint import ChannelConstraint
from .global_score import GlobalScoreLabelSelector
from .knapsack import KnapsackIteration, KnapsackLabelSelector
from .latency_table import LatencyTable
from ..errors import LatencyFunctionError
from .uniform import UniformLabelSelector

__all__ = [
    "LabelSelector", "UniformLabelSelector", "GlobalScoreLabelSelector", "KnapsackLabelSelector",
    "BinarySearchLatencyLabelSelector", "ChannelConstraint", "KnapsackIteration", "LatencyFunctionError",
    "LatencyTable",
]
