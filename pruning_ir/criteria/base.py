"""What every criterion shares: the context-manager interface and the running of the model.

``with Criterion(ir) as score_collector:`` — calling ``score_collector(*args, **kwargs)``
runs ``ir.model`` and returns its output unchanged; the first call infers the IR's labels
from those inputs when that was not done yet. Scores are written into the IR (``label.score``,
``ir.label_groups()`` sorted by them), so every selector works the same whatever
criterion produced them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch.fx as fx

from ..errors import LabelsNotInferredError, PruningIRError
from ..ir import PruningIR
from ..labels import ChannelIndex
from ._analysis import GraphFacts

if TYPE_CHECKING:
    from ..input_statistics import InputStatistics


class Criterion:
    """Base class: a context manager; calling it runs the model.

    Subclasses implement ``_enter`` / ``_labels_ready`` / ``_exit`` and may override ``_run``.
    ``start()`` / ``stop()`` are the with-block's two halves, for workflows that keep a
    criterion open across calls (``GradualPruner``); ``state_dict()`` / ``load_state_dict()``
    save and restore what a criterion accumulates (nothing, for data-free ones).
    """

    def __init__(self, ir: PruningIR, snapshot_name: str = "main"):
        if not isinstance(ir, PruningIR):
            raise TypeError(f"{type(self).__name__} expects a PruningIR, got {type(ir).__name__}")
        self.ir = ir.snapshot(snapshot_name)
        self.snapshot_name = snapshot_name
        self._active = False
        self.input_statistics: bool | str = False  # data-driven subclasses take it as a parameter
        self._statistics: InputStatistics | None = None

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> "Criterion":
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.stop(failed=exc_type is not None)
        return False

    def start(self) -> "Criterion":
        """Open the criterion (what entering its with-block does); returns it."""
        if self._active:
            raise PruningIRError(f"this {type(self).__name__} is already active (nested with-blocks)")
        self.ir.check_usable()
        self._active = True
        try:
            self._enter()
            if self.ir.labels_inferred:
                self._start_statistics()
        except BaseException:
            self._active = False
            raise
        return self

    def stop(self, failed: bool = False) -> None:
        """Close the criterion and write its scores (what leaving the with-block does);
        ``failed``: the block raised, so nothing is written."""
        if not self._active:
            return
        self._active = False
        statistics, self._statistics = self._statistics, None
        try:
            if statistics is not None:
                statistics.stop(failed=failed)
        finally:
            self._exit(failed=failed)
        if statistics is not None and not failed:
            self.ir.hold_statistics(statistics)  # prune()'s default refit uses them while the weights stay

    @property
    def active(self) -> bool:
        """Whether the criterion is open (inside its with-block, or between start() and stop())."""
        return self._active

    def state_dict(self) -> dict[str, Any]:
        """What this criterion accumulated, as plain values and tensors (empty when stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got keys {sorted(state)}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on these inputs and return its output unchanged."""
        if not self._active:
            name = type(self).__name__
            raise PruningIRError(f"{name} runs the model only inside its with-block: "
                                 f"`with {name}(ir) as score_collector: output = score_collector(inputs)`")
        if not self.ir.labels_inferred:
            self.ir.infer_labels(*args, **kwargs)
            self._labels_ready(args, kwargs)
            self._start_statistics()  # after the tracer's pass, which is not a calibration batch
        output = self._run(args, kwargs)
        if self._statistics is not None:
            self._statistics.pause_when_full()
        return output

    def _start_statistics(self) -> None:
        """Collect the input statistics of the layers that read prunable channels, for prune()'s
        default refit (``input_statistics``: "auto" caps their memory, True does not)."""
        if self.input_statistics is False or self._statistics is not None:
            return
        from ..held_statistics import auto_statistics
        from ..input_statistics import InputStatistics
        auto = self.input_statistics == "auto"
        self._statistics = auto_statistics(self.ir) if auto else InputStatistics(self.ir)
        self._statistics.start()

    # -- for subclasses -------------------------------------------------------------------
    def _enter(self) -> None:
        pass

    def _labels_ready(self, args: tuple, kwargs: dict) -> None:
        pass

    def _exit(self, failed: bool) -> None:
        pass

    def _run(self, args: tuple, kwargs: dict) -> Any:
        return self.ir.model(*args, **kwargs)

    # -- helpers --------------------------------------------------------------------------
    @property
    def index(self) -> ChannelIndex:
        return self.ir.index

    def _graph(self, args: tuple | None = None, kwargs: dict | None = None) -> fx.Graph | None:
        """The IR's recorded graph; for an IR without one (loaded from disk), recorded by the IR
        from ``args``; None when it has none and no inputs are given."""
        if self.ir.has_graph or args is not None:
            return self.ir.graph_for(*args or (), **(kwargs or {}))
        return None

    def _facts(self, graph: fx.Graph) -> GraphFacts:
        return GraphFacts(graph, self.index, self.ir.model)

    def _write_scores(self, scores: np.ndarray) -> None:
        """Write per-class ``scores`` (an array over class ids) for every label of the IR."""
        index = self.index
        labels = np.flatnonzero(index.label_mask())
        values = np.asarray(scores, dtype=np.float64)[labels]
        if not np.all(np.isfinite(values)):
            raise PruningIRError(f"{type(self).__name__} produced non-finite scores "
                                 "(a loss or gradient that is inf or nan?)")
        index.set_class_scores(labels, values)


class DataFreeCriterion(Criterion):
    """A criterion computed from the weights alone: entering (and leaving) the with-block,
    or calling :meth:`apply`, sets the scores. Data is needed only to infer labels."""

    def apply(self) -> PruningIR:
        """Compute the scores now and write them into the IR; returns the IR."""
        if not self.ir.labels_inferred:
            raise LabelsNotInferredError(
                f"{type(self).__name__} needs the IR's labels: call ir.infer_labels(*example_inputs) first, "
                f"or call the criterion once with example inputs inside its with-block")
        self._write_scores(self._compute())
        return self.ir

    def _compute(self) -> np.ndarray:
        raise NotImplementedError

    def _enter(self) -> None:
        if self.ir.labels_inferred:
            self.apply()

    def _labels_ready(self, args: tuple, kwargs: dict) -> None:
        self._graph(args, kwargs)
        self.apply()

    def _exit(self, failed: bool) -> None:
        if not failed:
            self.apply()
