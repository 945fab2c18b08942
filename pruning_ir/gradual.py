"""Gradual pruning while training: a schedule moves soft masks, then one physical prune.

From the user's own training loop::

    pruner = GradualPruner(ir, UniformLabelSelector, mode="agp", threshold=0.5,
                           start_step=100, end_step=2000, frequency=100)
    for inputs, targets in loader:
        loss_fn(pruner(inputs), targets).backward()   # runs the model (scoring it when needed)
        optimizer.step(); optimizer.zero_grad()
        pruner.step()                                 # after each optimizer step
    small_model = pruner.finalize()

The n-th call to ``step()`` completes step n. A :class:`Schedule` says at which steps the
masks move (its updates) and to which share of labels (``ratio_at(n)``: 0 before the first
update). At an update the pruner finishes scoring (the criterion over the batches since the
previous update, or the last ``score_batches``), selects with ``selector_factory(share)`` and
moves the masks (``ir.mask``); with ``latency_function`` the factory gets the latency
``(1 - share) * latency_function(unpruned model)`` instead (a ``KnapsackLabelSelector`` whose
target falls step by step). ``finalize()`` removes the masked labels; the result equals the
masked model. Modes: ``"identity"`` (nothing), ``"static"`` (``threshold`` at step
``stepsize``), ``"gradual"`` (N2D2's linear steps) and ``"agp"`` (Zhu & Gupta's cubic schedule,
as in Distiller); see each schedule class.

**Masks may move, or not.** N2D2 and Distiller recompute the masks at every update. With the
Taylor (LossAware) and magnitude criteria a masked channel scores exactly 0, so it stays
masked anyway; ``monotone=True`` (default) makes it a rule for every criterion and selector:
masked labels rank first and each group keeps at least its masked labels (the selector's
per-group removal count is floored there, so a latency selector still meets its target).
``monotone=False`` lets the criterion decide; a revived channel comes back with the weights it
had when masked.
"""

from __future__ import annotations

from functools import partial

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .criteria import Criterion, DataFreeCriterion, LossAwareCriterion
from .errors import PruningIRError
from .ir import PruningIR
from .labels import Label
from .masking import plain_forward, plain_parameters
from .selectors import LabelSelector, UniformLabelSelector
from .schedules import (SCHEDULES, CubicSchedule, IdentitySchedule, LinearSchedule, Schedule, StaticSchedule,
                        check_step, make_schedule)

__all__ = ["Schedule", "IdentitySchedule", "StaticSchedule", "LinearSchedule", "CubicSchedule", "SCHEDULES",
           "make_schedule", "GradualPruner", "GradualUpdate"]


# -- the pruner -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradualUpdate:
    """One mask update: the step, the scheduled share, the selector's target and labels masked."""

    step: int
    ratio: float
    target: float
    masked: int


CriterionFactory = Callable[[PruningIR], Criterion]


class GradualPruner:
    """Prunes ``ir``'s model gradually while the user trains it; see the module docstring.

    Args:
        ir: the IR of the model being trained (labels inferred, or inferred on the first call).
        selector_factory: ``target -> LabelSelector`` (a class such as ``UniformLabelSelector``
            or ``GlobalScoreLabelSelector`` works as is); the target is the scheduled share, or a
            latency when ``latency_function`` is given.
        criterion: ``ir -> Criterion`` (a class or a ``functools.partial``). A data-free one
            (magnitude, random) scores at each update; any other (LossAware) is a context open
            over the scoring window, fed by calling the pruner. None: select on the IR's scores.
        mode / schedule: a mode name and its options (``threshold``, ``start``, ``gamma``,
            ``stepsize``, ``start_step``, ``end_step``, ``frequency``), or a :class:`Schedule`.
        latency_function: ``model -> cost``; the factory then gets ``(1 - share) * cost(model)``.
        score_batches: score over only the last this many steps before each update
            (default: every step since the previous update).
        monotone: masked labels stay masked (see the module docstring).
        verbose: a tqdm progress bar over the schedule and a line per update.
    """

    def __init__(self, ir: PruningIR, selector_factory: Callable[[float], LabelSelector] = UniformLabelSelector,
                 *, criterion: CriterionFactory | None = LossAwareCriterion, mode: str | None = None,
                 schedule: str | Schedule | None = None, threshold: float | None = None, start: float | None = None,
                 gamma: float | None = None, stepsize: int | None = None, start_step: int | None = None,
                 end_step: int | None = None, frequency: int | None = None,
                 latency_function: Callable[[nn.Module], float] | None = None, score_batches: int | None = None,
                 monotone: bool = True, verbose: bool = False):
        if not isinstance(ir, PruningIR):
            raise TypeError(f"GradualPruner expects a PruningIR, got {type(ir).__name__}")
        if not callable(selector_factory):
            raise TypeError(f"selector_factory must be callable (target -> LabelSelector), got {selector_factory!r}")
        options = {name: value for name, value in dict(
            threshold=threshold, start=start, gamma=gamma, stepsize=stepsize, start_step=start_step,
            end_step=end_step, frequency=frequency).items() if value is not None}
        self.schedule = self._schedule(mode, schedule, options)
        if score_batches is not None:
            check_step("score_batches", score_batches)
        self.ir = ir
        self.selector_factory = selector_factory
        if criterion is LossAwareCriterion:  # masked labels are zeros when pruned: no statistics for a refit
            criterion = partial(LossAwareCriterion, input_statistics=False)
        self.criterion = criterion
        self.latency_function = latency_function
        self.score_batches = score_batches
        self.monotone = bool(monotone)
        self.verbose = bool(verbose)
        self.steps = 0
        self.history: list[GradualUpdate] = []
        self.finalized = False
        self.pruned_ir: PruningIR | None = None
        self._data_free = criterion is None or isinstance(criterion(ir), DataFreeCriterion)
        self._base_latency: float | None = None
        if latency_function is not None and not isinstance(self.schedule, IdentitySchedule):
            with plain_parameters(ir.model):
                self._base_latency = float(latency_function(ir.model))
        self._scorer: Criterion | None = None   # one criterion, opened (start) and closed (stop) per window
        self._saved_scores: dict | None = None   # its state, restored when it is created (after unpickling)
        self._progress = None
        self._resume_scores = False
        self._window_resumed = False
        self._graph_ready = False
        self._open_window_if_due()

    @staticmethod
    def _schedule(mode: str | None, schedule: str | Schedule | None, options: dict) -> Schedule:
        if isinstance(schedule, Schedule):
            if mode is not None or options:
                raise TypeError("pass either a Schedule object or a mode and its options, not both")
            return schedule
        if mode is not None and schedule is not None and mode != schedule:
            raise ValueError(f"mode={mode!r} and schedule={schedule!r} disagree (they are one argument)")
        name = mode or schedule or "gradual"
        if name != "identity" and "threshold" not in options:
            raise TypeError(f"mode {name!r} needs threshold= (the final share of labels pruned)")
        return make_schedule(name, **options)

    # -- the training loop's calls ----------------------------------------------------------
    @property
    def ratio(self) -> float:
        """The share of labels the current masks were selected for (0 before the first update)."""
        return self.history[-1].ratio if self.history else 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on these inputs (through the criterion while a scoring window is open)."""
        self._check_active()
        ir = self.ir
        if not self._window_open and not ir.labels_inferred:
            ir.infer_labels(*args, **kwargs)
        self._ensure_graph(args, kwargs)
        self._open_window_if_due()
        if not self._window_open:
            return ir.model(*args, **kwargs)
        with plain_forward(ir.model):  # the criterion's recorder maps tensors to plain parameter names
            return self._scorer(*args, **kwargs)

    def step(self) -> None:
        """Count one training step (call it after each optimizer step); update the masks when due."""
        self._check_active()
        self.steps += 1
        if self.schedule.is_update(self.steps):
            self._update()
        self._open_window_if_due()
        self._show_progress()

    def finalize(self, inplace: bool = False, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Prune the masked labels physically; returns the smaller model (``pruned_ir.model``).

        Its outputs equal the masked model's. ``inplace=True`` prunes the trained model itself
        (less memory; ``ir`` is used up). ``optimizer`` (the training one) is moved onto the
        returned model, its state sliced alike (``PruningIR.prune``); else build a new one.
        """
        if self.finalized:
            return self.pruned_ir.model
        self._close_window()
        if self.steps < self.schedule.last_update:
            warnings.warn(f"GradualPruner.finalize() at step {self.steps}, before the schedule's last update "
                          f"(step {self.schedule.last_update}): pruning the current masks (share {self.ratio:.3g}, "
                          f"not {self.schedule.final_ratio:.3g})", stacklevel=2)
        masked = self.ir.masked_labels()
        inexact = {label.group.id for label in masked if not label.group.exact}
        if inexact:
            warnings.warn(f"GradualPruner.finalize(): groups {sorted(inexact)} are inexact (see ir.describe()): "
                          "removing their masked channels changes the outputs", stacklevel=2)
        self.pruned_ir = self.ir.prune(labels=masked, inplace=inplace, optimizer=optimizer)
        self.finalized = True
        self._progress = self._progress.close() if self._progress is not None else None
        return self.pruned_ir.model

    def _check_active(self) -> None:
        if self.finalized:
            raise PruningIRError("this GradualPruner is finalized: train the model finalize() returned "
                                 "(pruner.pruned_ir.model)")

    # -- scoring windows --------------------------------------------------------------------
    def _window_due(self) -> bool:
        upcoming = self.schedule.next_update(self.steps)
        if upcoming is None or self._data_free:
            return False
        return self.score_batches is None or self.steps >= upcoming - self.score_batches

    @property
    def _window_open(self) -> bool:
        return self._scorer is not None and self._scorer.active

    def _criterion_object(self) -> Criterion:
        if self._scorer is None:
            self._scorer = self.criterion(self.ir)
            if self._saved_scores:
                self._scorer.load_state_dict(self._saved_scores)
            self._saved_scores = None
        return self._scorer

    def _open_window_if_due(self) -> None:
        if self._window_open or not self._window_due():
            return
        scorer = self._criterion_object()
        resume = self._resume_scores
        with plain_parameters(self.ir.model):  # criteria read plain parameter names
            if isinstance(scorer, LossAwareCriterion):
                scorer.start(reset=not resume)  # resumed: continue the saved sums
            else:
                scorer.start()
        self._resume_scores = False
        self._window_resumed = resume

    def _close_window(self) -> int:
        """Close the open criterion (its scores are written); returns its batch count."""
        if not self._window_open:
            return 0
        scorer = self._scorer
        batches = getattr(scorer, "batches", None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LossAwareCriterion: no backward pass ran")
            scorer.stop()
        return 1 if batches is None else batches

    def _ensure_graph(self, args: tuple, kwargs: dict) -> None:
        """An IR loaded from disk has no recorded graph: record one, on the plain model."""
        if self._graph_ready or not self.ir.labels_inferred or self.criterion is None:
            return
        if not self.ir.has_graph:
            with plain_parameters(self.ir.model):
                self.ir.graph_for(*args, **kwargs)
            if self._window_open:  # set the open window up again, now that there is a graph
                self._resume_scores = self._window_resumed
                self._close_window()
                self._open_window_if_due()
        self._graph_ready = True

    def _score(self) -> None:
        if self.criterion is None:
            return
        if self._data_free:
            with plain_parameters(self.ir.model):
                self.criterion(self.ir).apply()
            return
        resumed = self._window_open and self._window_resumed and bool(self._scorer.state_dict())
        if self._close_window() == 0 and not resumed:
            raise PruningIRError(
                f"GradualPruner: no batch was scored before the update at step {self.steps}: run the model through "
                "the pruner (output = pruner(inputs)) and call loss.backward() between steps")

    # -- updates ----------------------------------------------------------------------------
    def _update(self) -> None:
        ratio = self.schedule.ratio_at(self.steps)
        target = ratio if self._base_latency is None else (1.0 - ratio) * self._base_latency
        self._score()
        ir = self.ir
        with plain_parameters(ir.model):
            previous = ir.masked_labels() if self.monotone else []
            self._rank_first(previous)
            labels = self._select(target, previous) if ratio > 0 else previous
        ir.mask(labels)
        self.history.append(GradualUpdate(self.steps, ratio, target, len(labels)))
        if self.verbose:
            tqdm.write(f"GradualPruner step {self.steps}: share {ratio:.4g}"
                       f"{'' if self._base_latency is None else f', latency target {target:.6g}'}"
                       f": {len(labels)} labels masked")

    def _select(self, target: float, previous: list[Label]) -> list[Label]:
        """The selector's labels; with ``previous`` (monotone), each group keeps at least its
        masked labels (they rank first, and each group's removal count is floored at their number)."""
        selector = self.selector_factory(target)
        if not isinstance(selector, LabelSelector):
            raise TypeError(f"selector_factory({target!r}) returned {type(selector).__name__}, not a LabelSelector")
        floors = Counter(label.group.id for label in previous)
        return selector.select(self.ir, floors=floors or None)

    def _rank_first(self, masked: list[Label]) -> None:
        """Give masked labels scores just below every other label's (selectors take them first)."""
        if not masked:
            return
        taken = {label.class_id for label in masked}
        others = np.array([label.score for label in self.ir.labels() if label.class_id not in taken])
        low = float(others.min()) if len(others) else 0.0
        spread = float(others.max()) - low if len(others) else 0.0
        below = low - max(spread * 1e-3, abs(low) * 1e-6, 1e-12)
        self.ir.set_scores({label: below for label in masked})

    def _show_progress(self) -> None:
        last = self.schedule.last_update
        if self.verbose and self._progress is None and self.steps <= last:
            self._progress = tqdm(total=last, desc="gradual pruning", initial=self.steps - 1)
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(share=f"{self.ratio:.3g}", refresh=False)
            if self.steps >= last:
                self._progress = self._progress.close()

    # -- state ------------------------------------------------------------------------------
    def _flush_scores(self) -> dict | None:
        """The open window's accumulated Taylor sums, or None (the window is closed and opened
        again, continuing its average, so that the criterion's state holds them)."""
        scorer = self._scorer
        if not isinstance(scorer, LossAwareCriterion) or not self._window_open:
            return None
        if scorer.batches == 0 and not self._window_resumed:
            return None
        if scorer.batches:
            self._close_window()
            self._resume_scores = True
            self._open_window_if_due()
        return scorer.state_dict() or None

    def state_dict(self) -> dict[str, Any]:
        """Schedule, step count, masked labels, update history and the open window's scores
        (plain Python and tensors: ``torch.save`` and ``torch.load(weights_only=True)`` work)."""
        groups = {id(group): group.id for group in self.ir.groups} if self.ir.labels_inferred else {}
        masked = [[groups[id(label.group)], label.channel] for label in self.ir.masked_labels()]
        return {"format": 1, "schedule": self.schedule.config(), "steps": self.steps, "finalized": self.finalized,
                "masked": masked, "history": [asdict(update) for update in self.history],
                "base_latency": self._base_latency, "scores": self._flush_scores()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same schedule, at the saved step, with the saved masks.

        Load it before the model's state dict (the masks create the ``*_orig`` / ``*_mask`` keys);
        the IR's labels must be inferred (``ir.infer_labels(example)``).
        """
        if state.get("format") != 1:
            raise ValueError(f"not a GradualPruner state (format {state.get('format')!r})")
        if state["schedule"] != self.schedule.config():
            raise ValueError(f"the state was saved with schedule {state['schedule']}, this pruner has "
                             f"{self.schedule.config()}")
        ir = self.ir
        labels = []
        if state["masked"]:
            groups = ir.groups
            try:
                labels = [groups[group].labels[channel] for group, channel in state["masked"]]
            except IndexError:
                raise ValueError("the saved masked labels do not exist in this IR (another model?)") from None
        self._close_window()
        if state["history"]:
            ir.mask(labels)
        elif ir.masked:
            ir.unmask()
        self.steps = int(state["steps"])
        self.history = [GradualUpdate(**update) for update in state["history"]]
        self._base_latency = state["base_latency"]
        self.finalized = False
        scores = state.get("scores")
        self._resume_scores = scores is not None
        if scores is not None:
            self._criterion_object().load_state_dict(scores)
        if state["finalized"]:
            self.finalize()  # a copy pruned like the saved one (pruned_ir)
        else:
            self._open_window_if_due()

    def __getstate__(self) -> dict:
        scores = self._flush_scores()
        state = dict(self.__dict__)
        state["_scorer"] = None
        state["_saved_scores"] = scores
        state["_progress"] = None
        state["_resume_scores"] = scores is not None
        state["_graph_ready"] = False  # the IR's recorded graph is not saved with it
        return state

    def __repr__(self) -> str:
        return (f"<GradualPruner {self.schedule.mode}: step {self.steps}, share {self.ratio:.3g} of "
                f"{self.schedule.final_ratio:.3g}{', finalized' if self.finalized else ''}>")
