"""Pruning schedules: at which training steps the masks move, and to which share of labels.

``ratio_at(step)`` is the share masked after ``step`` completed steps. N2D2's gradual mode
(linear: ``start``, then ``+gamma`` every ``stepsize`` steps up to ``threshold``) and Zhu &
Gupta's automated gradual pruning as in Distiller (cubic: s_t = s_f + (s_i - s_f)(1 - (t - t0)/span)^3
between ``start_step`` and ``end_step``, every ``frequency`` steps). Used by
:class:`pruning_ir.gradual.GradualPruner`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from .checks import check_share

__all__ = ["Schedule", "IdentitySchedule", "StaticSchedule", "LinearSchedule", "CubicSchedule", "SCHEDULES",
           "make_schedule", "check_share", "check_step"]


def check_shares(start: float, threshold: float) -> None:
    """A schedule's two shares: each in [0, 1), ``start`` at most ``threshold``."""
    check_share("threshold", threshold)
    check_share("start", start)
    if start > threshold:
        raise ValueError(f"start ({start}) must not exceed threshold ({threshold})")


def check_step(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class Schedule:
    """When the masks move (the update steps) and to which share of labels; this base has no update."""

    mode: ClassVar[str] = "identity"

    def next_update(self, step: int) -> int | None:
        """The first update step after ``step`` (None when there is none)."""
        return None

    def ratio_at(self, step: int) -> float:
        """The share masked after ``step`` completed steps (that of the last update <= step)."""
        return 0.0

    @property
    def last_update(self) -> int:
        """The step of the last update (0 when there is none)."""
        return 0

    def is_update(self, step: int) -> bool:
        return step >= 1 and self.next_update(step - 1) == step

    @property
    def final_ratio(self) -> float:
        return self.ratio_at(self.last_update)

    def config(self) -> dict[str, Any]:
        """Everything that defines the schedule (saved with the pruner's state and compared on load)."""
        return {"mode": self.mode, **asdict(self)}


@dataclass(frozen=True)
class IdentitySchedule(Schedule):
    """No update: nothing is ever masked."""


@dataclass(frozen=True)
class StaticSchedule(Schedule):
    """One update at step ``stepsize``, straight to ``threshold``."""

    threshold: float
    stepsize: int = 100
    mode: ClassVar[str] = "static"

    def __post_init__(self) -> None:
        check_share("threshold", self.threshold)
        check_step("stepsize", self.stepsize)

    def next_update(self, step: int) -> int | None:
        return self.stepsize if step < self.stepsize else None

    def ratio_at(self, step: int) -> float:
        return float(self.threshold) if step >= self.stepsize else 0.0

    @property
    def last_update(self) -> int:
        return self.stepsize


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """N2D2's gradual mode: updates at steps ``k * stepsize`` (k >= 1) to the share
    ``min(start + (k - 1) * gamma, threshold)``. N2D2 masks ``start`` at initialisation; here the
    first update comes after one window of ``stepsize`` steps, so that it is scored on data, and
    the last increment is clipped so that the final share is exactly ``threshold``."""

    threshold: float
    start: float = 0.1
    gamma: float = 0.05
    stepsize: int = 100
    mode: ClassVar[str] = "gradual"

    def __post_init__(self) -> None:
        check_shares(self.start, self.threshold)
        check_step("stepsize", self.stepsize)
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a positive share increment, got {self.gamma!r}")

    @property
    def updates(self) -> int:
        """How many updates reach the threshold."""
        if self.start >= self.threshold:
            return 1
        return 1 + math.ceil((self.threshold - self.start) / self.gamma - 1e-9)

    def next_update(self, step: int) -> int | None:
        k = step // self.stepsize + 1
        return k * self.stepsize if k <= self.updates else None

    def ratio_at(self, step: int) -> float:
        k = min(step // self.stepsize, self.updates)
        return 0.0 if k < 1 else min(self.start + (k - 1) * self.gamma, self.threshold)

    @property
    def last_update(self) -> int:
        return self.updates * self.stepsize


@dataclass(frozen=True)
class CubicSchedule(Schedule):
    """AGP: ``threshold + (start - threshold) * (1 - (u - start_step) / (end_step - start_step))^3``
    at the updates u = start_step, start_step + frequency, ... (< end_step) and end_step."""

    threshold: float
    end_step: int
    start: float = 0.0
    start_step: int = 1
    frequency: int = 100
    mode: ClassVar[str] = "agp"

    def __post_init__(self) -> None:
        check_shares(self.start, self.threshold)
        check_step("frequency", self.frequency)
        check_step("start_step", self.start_step)
        check_step("end_step", self.end_step)
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must come after start_step ({self.start_step})")

    def share(self, update: int) -> float:
        progress = (update - self.start_step) / (self.end_step - self.start_step)
        return self.threshold + (self.start - self.threshold) * (1.0 - progress) ** 3

    def next_update(self, step: int) -> int | None:
        if step < self.start_step:
            return self.start_step
        if step >= self.end_step:
            return None
        return min(self.start_step + ((step - self.start_step) // self.frequency + 1) * self.frequency, self.end_step)

    def ratio_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return float(self.threshold)
        return self.share(self.start_step + (step - self.start_step) // self.frequency * self.frequency)

    @property
    def last_update(self) -> int:
        return self.end_step


SCHEDULES: dict[str, type[Schedule]] = {cls.mode: cls for cls in
                                        (IdentitySchedule, StaticSchedule, LinearSchedule, CubicSchedule)}


def make_schedule(mode: str, **options: Any) -> Schedule:
    """The schedule of ``mode`` ("identity", "static", "gradual", "agp") with these options."""
    if mode not in SCHEDULES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[mode]
    accepted = set(cls.__dataclass_fields__)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"mode {mode!r} takes {sorted(accepted) or 'no options'}; got {unknown}")
    try:
        return cls(**options)
    except TypeError as error:
        raise TypeError(f"mode {mode!r}: {error}") from None
