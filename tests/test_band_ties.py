"""The band's steps move tied groups together (``ChannelConstraint(same_across_layers=True)``).

``settle_in_band`` steps a checked selection by a multiple-choice knapsack over a few counts per
group. Without the tie in that knapsack it could move one member of a tied class, and the plan's
repair then set the whole class to its members' smallest count: a step undone (from above the
target the check stopped at its first selection, above the target) or turned into a different
one (from below the band it never got back into it, returning the selection it started from).
On the zoo's ResNet-50 (its repeated bottlenecks tie), priced by MACs (exact, so
the test is deterministic), from a selection 5% above the target and one 12% below it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pruning_ir import ChannelConstraint, GlobalScoreLabelSelector, PruningIR
from pruning_ir.criteria import MagnitudeCriterion
from pruning_ir.latency import bind, macs
from pruning_ir.selectors.band import counts_of, settle_in_band
from pruning_ir.selectors.oracle import LatencyOracle
from pruning_ir.selectors.plan import SelectionPlan
from test_latency_table import MacsTable
from zoo import ZOO


@pytest.fixture(scope="module")
def tied_resnet():
    ir = PruningIR(ZOO["resnet50"].build()).infer_labels(*ZOO["resnet50"].example_inputs())
    MagnitudeCriterion(ir).apply()
    x = ZOO["resnet50"].example_inputs()[0]
    constraint = ChannelConstraint(step=4, same_across_layers=True)
    plan = SelectionPlan(ir, constraint)
    counts = counts_of(plan, GlobalScoreLabelSelector(0.3, constraint).select(ir))
    return ir, x, plan, counts


@pytest.mark.parametrize("priced_by_table", [True, False])
@pytest.mark.parametrize("start", [1.05, 0.88])   # the selection's latency over the target
def test_band_steps_keep_tied_groups_together_and_reach_the_band(tied_resnet, priced_by_table, start):
    ir, x, plan, counts = tied_resnet
    assert len(plan.ties) >= 4 and all(len(set(counts[members])) == 1 for members in plan.ties)
    count = bind(macs, x)
    target = count(ir.prune(labels=plan.labels(counts)).model) / start
    oracle = LatencyOracle(plan, count)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # it ends in the band: no warning
        result = settle_in_band(plan, oracle, counts, target, 0.05, max_checks=8,
                                table=MacsTable(x, threads=1) if priced_by_table else None)
    achieved = count(ir.prune(labels=plan.labels(result.counts)).model)
    assert result.in_band and 0.95 * target <= achieved <= target and result.latency == achieved
    assert len(result.checks) >= 2 and not np.array_equal(result.counts, counts)
    assert all(len(set(result.counts[members])) == 1 for members in plan.ties)
    # a step from above the target only removes; one from below gives labels back
    assert (result.counts.sum() > counts.sum()) if start > 1 else (result.counts.sum() < counts.sum())
