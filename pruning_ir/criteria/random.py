"""RandomCriterion: a seeded random baseline."""

from __future__ import annotations

import numpy as np

from ..ir import PruningIR
from ._analysis import label_mask
from .base import DataFreeCriterion


class RandomCriterion(DataFreeCriterion):
    """Scores every label with an independent uniform draw in [0, 1).

    The draws are a function of ``seed`` and the label's class id only, so the same IR
    gets the same scores in every process and on every call.
    """

    def __init__(self, ir: PruningIR, seed: int = 0, snapshot_name: str = "main"):
        super().__init__(ir, snapshot_name)
        self.seed = seed

    def _compute(self) -> np.ndarray:
        index = self.index
        scores = np.random.default_rng(self.seed).random(index.class_count)
        return np.where(label_mask(index), scores, 0.0)
