"""Python control flow in forward: the recorder follows one path, so what steers it is noticed.

A branch on a tensor's value hides the modules of the path not taken: the channels live across
the branch are pinned (with a warning naming those modules) unless example inputs that take every
path are given (``infer_labels(x, more_inputs=[...])``), whose recorded paths are merged. A branch
on a channel count (``if y.shape[1] >= 8:``) pins that count, so the pruned model takes the same
branch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pruning_ir import PruningIR, UniformLabelSelector


class ValueBranch(nn.Module):
    """``if x.sum() > 0: branch_a else: branch_b``, both reading the stem's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch_a = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 1))
        self.branch_b = nn.Sequential(nn.Conv2d(16, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 16, 1))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        if x.sum() > 0:
            y = self.branch_a(y)
        else:
            y = self.branch_b(y)
        return self.head(y.mean((2, 3)))


class CountBranch(nn.Module):
    """``if y.shape[1] >= 8:`` on the stem's channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.small = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).mean((2, 3))
        if y.shape[1] >= 8:
            return self.mlp(y)
        return self.small(y[:, :4])


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    positive = torch.rand(2, 3, 8, 8) + 0.1
    return positive, -positive


def _stem_group(ir: PruningIR):
    return next(g for g in ir.groups if "stem.weight[0]" in g.parameters)


def test_one_input_pins_the_channels_the_unseen_branch_reads_and_names_it():
    positive, negative = _inputs()
    model = ValueBranch().eval()
    with pytest.warns(UserWarning, match=r"never run on the example inputs: 'branch_b' \(Sequential\).*pinned"):
        ir = PruningIR(model).infer_labels(positive)
    stem = _stem_group(ir)
    assert not stem.prunable
    assert any("__bool__" in reason and "branch_b" in reason for reason in stem.unprunable_reasons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir))
    assert pruned.model.stem.out_channels == 16 and pruned.model.branch_a[0].out_channels == 6
    for x in (positive, negative):  # the branch never seen still runs
        assert pruned.model(x).shape == (2, 4)


def test_a_compared_channel_count_is_pinned_and_the_branch_is_kept():
    torch.manual_seed(0)
    model = CountBranch().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `small` is never called
        ir = PruningIR(model).infer_labels(x)
        pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir))
    reasons = _stem_group(ir).unprunable_reasons
    assert any("compares the channel count 8" in r and ">= 8" in r and "'mean'" in r for r in reasons), reasons
    assert pruned.model.stem.out_channels == 8 and pruned.model.mlp[0].out_features == 8
    assert pruned.model(x).shape == model(x).shape == (2, 4)


def test_divisibility_and_attribute_comparisons_pin_nothing():
    class Checks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = 2
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            assert y.shape[-1] % 2 == 0 and y.shape[-1] != self.heads
            return self.b(y)

    ir = PruningIR(Checks()).infer_labels(torch.randn(3, 4))
    assert any(g.prunable and "a.weight[0]" in g.parameters for g in ir.groups)


def test_several_inputs_merge_both_paths_and_prune_them_exactly():
    positive, negative = _inputs()
    model = ValueBranch().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module is seen: no warning
        ir = PruningIR(model).infer_labels(positive, more_inputs=[negative])
    stem = _stem_group(ir)
    assert stem.prunable and {"stem", "branch_a.0", "branch_b.0"} <= set(stem.modules)
    assert any("branch_b.0.weight[0]" in g.parameters and g.prunable for g in ir.groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unscored
        labels = UniformLabelSelector(0.5).select(ir)
    assert all(ir.groups[label.group.id].exact for label in labels)
    expected = {id(x): model(x) for x in (positive, negative)}
    ir.zero_labels(labels)
    zeroed = {id(x): ir.model(x) for x in (positive, negative)}
    pruned = ir.prune(labels=labels)
    m = pruned.model
    assert m.stem.out_channels == 8 and m.branch_a[0].in_channels == m.branch_b[0].in_channels == 8
    assert m.branch_b[0].out_channels == 5 and m.branch_a[0].out_channels == 6
    for x in (positive, negative):
        torch.testing.assert_close(m(x), zeroed[id(x)], atol=1e-5, rtol=0)
        assert m(x).shape == expected[id(x)].shape


def test_more_inputs_take_pairs_tuples_and_tensors():
    positive, negative = _inputs()
    for more in ([negative], [(negative,)], [((negative,), {})]):
        ir = PruningIR(ValueBranch().eval()).infer_labels(positive, more_inputs=more)
        assert _stem_group(ir).prunable
