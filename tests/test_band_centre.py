"""A noisy check aims at the band's centre, not at its edge (``band.centred``).

A check that reads a selection just inside an edge of the band, with pairs that disagree by a
few percent, cannot tell which side of the edge it lies on, and an independent re-measurement
(other noise, the fastest of rotated rounds rather than a median) reads it outside as often as
not. So a noisy check is accepted only half its spread inside the band (at most a quarter of
the band); a deterministic one anywhere in it. And a check can read its pairs as
``compare_latency`` does (``statistic="fastest"``), so that time noise adds to both models does
not pull the ratio towards 1. Fake latency functions built on MACs, so the tests are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning_ir import KnapsackLabelSelector
from pruning_ir.latency import macs
from pruning_ir.selectors.band import centred, settle_in_band
from pruning_ir.selectors.iteration import KnapsackIteration
from test_latency_table import MacsTable, band_case, true_latency


class EveryThirdSlow:
    """MACs; each pruned model's every third reading is ``1 + noise`` times slower, the unpruned
    model's never: a check of three pairs sees a spread of ``1 + noise`` and a median of the truth."""

    def __init__(self, x: torch.Tensor, unpruned: float, noise: float):
        self.x, self.unpruned, self.noise, self.readings = x, unpruned, noise, {}

    def __call__(self, model: torch.nn.Module) -> float:
        value = macs(model, self.x)
        if value == self.unpruned:
            return value
        key = tuple(tuple(p.shape) for p in model.parameters())
        reading = self.readings[key] = self.readings.get(key, -1) + 1
        return value * (1 + self.noise) if reading % 3 == 1 else value


def record(measured: float, spread: float | None) -> KnapsackIteration:
    return KnapsackIteration(1, 1.0, measured, measured, 0.0, 0, 0, True, spread)


def test_centred_needs_half_the_spread_inside_the_band_and_at_most_a_quarter_of_it():
    low, target = 0.95, 1.0
    assert centred(record(0.951, 1.0), low, target) and centred(record(0.999, None), low, target)
    assert not centred(record(0.955, 1.04), low, target)        # 0.0125 (a quarter) needed, 0.005 inside
    assert centred(record(0.9626, 1.04), low, target)
    assert centred(record(0.955, 1.008), low, target)           # half the spread: 0.0038 needed
    assert not centred(record(0.995, 1.02), low, target) and centred(record(0.990, 1.02), low, target)
    assert not centred(record(1.001, 1.0), low, target) and not centred(record(0.949, 1.0), low, target)


@pytest.mark.parametrize("noise", [0.0, 0.04])
def test_a_noisy_check_at_the_edge_of_the_band_steps_to_its_middle(noise):
    ir, count, full, plan, oracle, counts, _ = band_case(lambda x, full: EveryThirdSlow(x, full, noise), 0.48)
    target = true_latency(ir, count, plan, counts) / 0.955   # the selection lies just above the band's floor
    result = settle_in_band(plan, oracle, counts, target, 0.05, table=MacsTable(torch.randn(2, 3, 16, 16)),
                            max_checks=6)
    achieved = true_latency(ir, count, plan, result.counts)
    assert result.in_band and result.latency == pytest.approx(achieved, rel=1e-12)
    assert result.checks[0].measured == pytest.approx(0.955 * target, rel=1e-12)
    if noise == 0:   # deterministic: the edge is as good as the middle
        assert len(result.checks) == 1 and np.array_equal(result.counts, counts)
    else:            # spread 1.04: at least a quarter of the band inside
        assert result.checks[0].spread == pytest.approx(1 + noise)
        assert len(result.checks) >= 2 and 0.9625 * target <= achieved <= 0.9875 * target
        assert plan.kept_score(result.counts) > plan.kept_score(counts)


class AddedTime:
    """MACs plus time that noise adds to every model's readings alike: the k-th reading of a model
    ``k % 3`` times ``added``. The pairs of a check share the added time, so the median pair
    ratio is pulled towards 1; each model's fastest reading is the truth."""

    def __init__(self, x: torch.Tensor, added: float):
        self.x, self.added, self.readings = x, added, {}

    def __call__(self, model: torch.nn.Module) -> float:
        value = macs(model, self.x)
        reading = self.readings[value] = self.readings.get(value, -1) + 1
        return value + self.added * (reading % 3)


def test_the_fastest_statistic_drops_time_that_noise_adds_to_both_models():
    ir, count, full, plan, oracle, counts, _ = band_case(lambda x, full: AddedTime(x, 0.02 * full), 0.45)
    truth = true_latency(ir, count, plan, counts)
    target = truth / 0.97
    read = {}
    for statistic in ("median", "fastest"):
        result = settle_in_band(plan, oracle, counts, target, 0.05, statistic=statistic, max_checks=1,
                                reference=full)
        read[statistic] = result.checks[0].measured
    assert read["fastest"] == pytest.approx(truth, rel=1e-12)
    assert read["median"] > 1.01 * truth   # the added time makes the pruned model look relatively slower
    with pytest.raises(ValueError, match="statistic"):
        settle_in_band(plan, oracle, counts, target, 0.05, statistic="mean")
    with pytest.raises(ValueError, match="check_statistic"):
        KnapsackLabelSelector(1.0, count, check_statistic="min")


def test_a_check_reading_far_outside_the_band_takes_no_extra_pairs():
    """Pairs spread wider than the band double a check's pairs only while more could change what
    it concludes: a reading outside the band by more than half its spread steps at once."""
    ir, count, full, plan, oracle, counts, _ = band_case(lambda x, full: EveryThirdSlow(x, full, 0.10), 0.48)
    truth = true_latency(ir, count, plan, counts)
    table = MacsTable(torch.randn(2, 3, 16, 16))
    far = settle_in_band(plan, oracle, counts, truth / 1.3, 0.05, table=table, max_checks=1)
    near = settle_in_band(plan, oracle, counts, truth / 0.975, 0.05, table=table, max_checks=1)
    assert far.checks[0].spread == pytest.approx(1.10) and near.checks[0].spread == pytest.approx(1.10)
    assert far.latency_calls == 2 * 3     # three pairs: 1.3x the target, whatever the noise
    assert near.latency_calls == 2 * 6    # inside the band's reach: twice the pairs


class StuckNearTheFloor:
    """Every pruned model reads 0.955 x ``target`` (every third reading 4% slower), the unpruned
    model its MACs: in the band, never centred, whatever the step."""

    def __init__(self, x: torch.Tensor, unpruned: float):
        self.unpruned, self.target, self.reading = unpruned, None, -1

    def __call__(self, model: torch.nn.Module) -> float:
        if self.target is None or sum(p.numel() for p in model.parameters()) == self.parameters:
            return self.unpruned
        self.reading += 1
        return 0.955 * self.target * (1.04 if self.reading % 3 == 1 else 1.0)


def test_steps_towards_the_middle_stop_two_checks_after_the_first_in_the_band():
    ir, count, full, plan, oracle, counts, function = band_case(StuckNearTheFloor, 0.48)
    function.target, function.parameters = 0.5 * full, sum(p.numel() for p in ir.model.parameters())
    result = settle_in_band(plan, oracle, counts, 0.5 * full, 0.05, table=MacsTable(torch.randn(2, 3, 16, 16)),
                            max_checks=6)
    assert [round(r.measured / (0.5 * full), 3) for r in result.checks] == [0.955] * 3
    assert result.in_band and not centred(result.checks[-1], 0.95 * 0.5 * full, 0.5 * full)
