"""Latency tables and the multiple-choice knapsack (issue 25).

Cache keys (one timing per signature; threads, device and dtype change the key; a disk cache
is only read on the machine that wrote it), the table's pruned widths against a really pruned
model, CP-SAT against brute force, budgets met with a deterministic cost, and one real CPU
measurement within a loose bound.
"""

from __future__ import annotations

import itertools
import json
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from pruning_ir import ChannelConstraint, KnapsackLabelSelector, PruningIR, TableLatency
from pruning_ir.criteria import MagnitudeCriterion
from pruning_ir.latency import bind, macs, measure_latency
from pruning_ir.selectors import LatencyTable
from pruning_ir.selectors.latency_table import OpSignature, build_op, machine_key, module_arguments
from pruning_ir.selectors.multiple_choice import solve_multiple_choice
from pruning_ir.selectors.plan import SelectionPlan


class ConvNet(nn.Module):
    """Stem, a residual pair, a depthwise conv and a classifier: every kind of width a table tracks."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                               nn.Conv2d(2 * width, width, 1))
        self.dw = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
                                nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 4 * width), nn.ReLU(),
                                  nn.LayerNorm(4 * width), nn.Linear(4 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.a(x)
        return self.head(self.dw(x))


def scored_ir(width: int = 32) -> PruningIR:
    torch.manual_seed(0)
    ir = PruningIR(ConvNet(width)).infer_labels(torch.randn(2, 3, 16, 16))
    MagnitudeCriterion(ir).apply()
    return ir


class MacsTable(LatencyTable):
    """A table that prices each op by its MACs: deterministic, so a budget test can be exact."""

    def measure(self, signature: OpSignature) -> float:
        module, x = build_op(signature)
        return macs(module, x)


# -- cache keys ------------------------------------------------------------------------------------
def test_one_measurement_per_signature():
    table = LatencyTable(threads=1, repeats=2, warmup=0)
    first, second = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
    a = table.latency(table.module_signature(first, (1, 8, 8, 8)))
    b = table.latency(table.module_signature(second, (1, 8, 8, 8)))
    assert a == b > 0 and table.measurements == 1
    table.latency(table.module_signature(nn.Conv2d(8, 24, 3, padding=1), (1, 8, 8, 8)))
    assert table.measurements == 2 and len(table) == 2


def test_threads_device_dtype_and_shape_change_the_key():
    conv = nn.Conv2d(8, 16, 3)
    key = LatencyTable(threads=1).module_signature(conv, (1, 8, 8, 8)).key
    assert LatencyTable(threads=1).module_signature(nn.Conv2d(8, 16, 3), (1, 8, 8, 8)).key == key
    others = [LatencyTable(threads=2).module_signature(conv, (1, 8, 8, 8)),
              LatencyTable(threads=1, device="cuda").module_signature(conv, (1, 8, 8, 8)),
              LatencyTable(threads=1).module_signature(conv.double(), (1, 8, 8, 8)),
              LatencyTable(threads=1, dtype=torch.float16).module_signature(nn.Conv2d(8, 16, 3), (1, 8, 8, 8)),
              LatencyTable(threads=1).module_signature(nn.Conv2d(8, 16, 3), (2, 8, 8, 8)),
              LatencyTable(threads=1).module_signature(nn.Conv2d(8, 16, 3, stride=2), (1, 8, 8, 8))]
    assert len({key, *(s.key for s in others)}) == 1 + len(others)
    assert machine_key("cpu", 1) != machine_key("cpu", 2)
    assert machine_key("cpu", 1) != machine_key("cuda", 1)
    assert torch.__version__ in machine_key()


def test_disk_cache_is_only_read_on_the_machine_that_wrote_it(tmp_path):
    path = tmp_path / "table.json"
    signature = LatencyTable(threads=1).module_signature(nn.Conv2d(4, 8, 3), (1, 4, 8, 8))
    writer = LatencyTable(threads=1, cache_path=path, machine="machine A", repeats=2, warmup=0)
    seconds = writer.latency(signature)
    writer.save()
    reader = LatencyTable(threads=1, cache_path=path, machine="machine A")
    assert reader.latency(signature) == seconds and reader.measurements == 0
    other = LatencyTable(threads=1, cache_path=path, machine="machine B", repeats=2, warmup=0)
    other.latency(signature)
    assert other.measurements == 1
    other.save()
    stored = json.loads(path.read_text())["machines"]
    assert set(stored) == {"machine A", "machine B"} and stored["machine A"][signature.key] == seconds
    path.write_text("not json")   # a broken file is ignored, not fatal
    assert len(LatencyTable(cache_path=path)) == 0


# -- the table's view of a model ------------------------------------------------------------------
def test_table_widths_match_the_pruned_model():
    ir = scored_ir()
    plan = SelectionPlan(ir, ChannelConstraint(step=8))
    bound = LatencyTable(torch.randn(2, 3, 16, 16), threads=1).bind(plan)
    kinds = {op.kind for op in bound.ops}
    assert {"Conv2d", "BatchNorm2d", "Linear", "LayerNorm"} <= kinds
    assert all(bound.touching[gi] for gi in range(len(plan.groups)))
    rng = np.random.default_rng(0)
    for _ in range(3):
        counts = plan.repair(np.array([rng.choice(g.counts) for g in plan.groups]))
        pruned = dict(ir.prune(labels=plan.labels(counts)).model.named_modules())
        for op in bound.ops:
            assert bound.op_args(op, counts) == module_arguments(pruned[op.path])[1], op.path


def test_rows_grow_with_the_kept_count():
    ir = scored_ir()
    plan = SelectionPlan(ir, ChannelConstraint(step=8))
    bound = MacsTable(torch.randn(2, 3, 16, 16), threads=1, grid_points=3).bind(plan)
    base = plan.base_counts()
    grids = [bound.grid(gi, int(base[gi])) for gi in range(len(plan.groups))]
    assert all(int(base[gi]) in grid for gi, grid in enumerate(grids))
    for grid, row in zip(grids, bound.rows(base, grids)):
        assert np.all(np.diff(row) <= 0)   # more removed, fewer MACs
    assert bound.predict(base) == macs(ir.model, torch.randn(2, 3, 16, 16))   # every MAC is in a timed op


# -- the multiple-choice knapsack -------------------------------------------------------------------
def brute_force(values, weights, capacity, at_least_one_of=()):
    best = None
    for choice in itertools.product(*(range(len(v)) for v in values)):
        if sum(w[j] for w, j in zip(weights, choice)) > capacity:
            continue
        if any(not any(choice[g] == j for g, j in pairs) for pairs in at_least_one_of):
            continue
        value = sum(v[j] for v, j in zip(values, choice))
        best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_cp_sat_matches_brute_force(seed):
    rng = random.Random(seed)
    values = [[rng.randint(-20, 100) for _ in range(4)] for _ in range(3)]
    weights = [[rng.randint(0, 50) for _ in range(4)] for _ in range(3)]
    capacity = rng.randint(0, 150)
    covers = [[(0, rng.randrange(4)), (2, rng.randrange(4))]] if seed % 3 == 0 else []
    expected = brute_force(values, weights, capacity, covers)
    for prefer_heavier in (True, False):
        chosen = solve_multiple_choice(values, weights, capacity, at_least_one_of=covers,
                                       prefer_heavier=prefer_heavier)
        if expected is None:
            assert chosen is None
            continue
        assert sum(w[j] for w, j in zip(weights, chosen)) <= capacity
        assert all(any(chosen[g] == j for g, j in pairs) for pairs in covers)
        assert sum(v[j] for v, j in zip(values, chosen)) == expected


def test_ties_in_value_prefer_the_heavier_choice():
    values = [[0, 0, 0], [0, 0, 0]]
    weights = [[1, 5, 9], [2, 4, 6]]
    chosen = solve_multiple_choice(values, weights, 11)
    assert sum(w[j] for w, j in zip(weights, chosen)) == 11


# -- budgets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.6, 0.4])
def test_a_deterministic_budget_is_met_within_tolerance(share):
    ir = scored_ir()
    x = torch.randn(2, 3, 16, 16)
    cost = bind(macs, x)
    target = share * cost(ir.model)
    table = MacsTable(x, threads=1, grid_points=24)   # four groups: fine grids, so the band is reachable
    selector = KnapsackLabelSelector(target, cost, verbose=False,
                                     tolerance=0.05, latency_table=table)
    labels = selector.select(ir)
    achieved = cost(ir.prune(labels=labels).model)
    assert achieved == selector.latency
    assert target * 0.95 <= achieved <= target
    assert selector.history and selector.latency_calls <= 20


def test_the_table_selection_keeps_as_much_score_as_the_linearized_knapsack():
    ir = scored_ir()
    x = torch.randn(2, 3, 16, 16)
    cost = bind(macs, x)
    target = 0.5 * cost(ir.model)
    constraint = ChannelConstraint(step=2)
    table = KnapsackLabelSelector(target, cost, constraint=constraint, verbose=False, tolerance=0.05,
                                  latency_table=MacsTable(x, threads=1, grid_points=24))
    linear = KnapsackLabelSelector(target, cost, constraint=constraint, verbose=False, tolerance=0.05)
    kept = [sum(label.score for label in ir.labels()) - sum(label.score for label in s.select(ir))
            for s in (table, linear)]
    assert table.latency <= target and kept[0] >= 0.97 * kept[1]


def test_table_latency_drives_the_multiple_choice_knapsack_on_a_real_cpu():
    ir = scored_ir(width=64)
    x = torch.randn(8, 3, 32, 32)
    function = TableLatency(x, threads=1, repeats=7, op_repeats=3)
    assert pickle.loads(pickle.dumps(function)).table_options == function.table_options
    original = min(function(ir.model) for _ in range(3))
    target = 0.5 * original
    selector = KnapsackLabelSelector(target, function, constraint=ChannelConstraint(step=8), verbose=False,
                                     tolerance=0.05)
    assert isinstance(selector.latency_table, LatencyTable)
    labels = selector.select(ir)
    assert selector.latency <= target
    assert selector.latency_table.measurements > 0
    pruned = ir.prune(labels=labels).model
    remeasured = min(measure_latency(pruned, x, warmup=3, repeats=10, statistic="min", threads=1) for _ in range(3))
    assert remeasured <= 1.15 * target   # loose: CI machines are noisy


# -- measure_latency ----------------------------------------------------------------------------------
def test_measure_latency_pins_threads_and_restores_them():
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    assert measure_latency(Probe(), torch.randn(2), warmup=1, repeats=3, threads=1, statistic="trimmed") >= 0
    assert set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        measure_latency(Probe(), torch.randn(2), threads=0)
