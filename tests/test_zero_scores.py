"""Scores that cannot be right: a live label never scores exactly 0 because of how it is wired
(a conv applied to its own output, token mixing through transposes, nn.MultiheadAttention heads),
and selection says so when every score is 0 (nothing calibrated, a zero-initialised head)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import PruningIR, UniformLabelSelector
from pruning_ir.criteria import LossAwareCriterion

from zoo import ConvBNAct, TokenTransformer


class SelfApplied(nn.Module):
    """``conv(conv(x))``: the same module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8)
        self.conv = ConvBNAct(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.conv(self.stem(x))).mean((2, 3)))


class TokenMixing(nn.Module):
    """A Linear over the pixel positions, reached and left through transposes (its bias writes into
    every channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        mixed = self.mix(x.flatten(2).transpose(1, 2).transpose(1, 2)).transpose(1, 2)
        return self.head((x + mixed.transpose(1, 2).reshape(x.shape)).mean((2, 3)))


def _image() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 100, (4, 10))


CASES = {
    "self_applied": (SelfApplied, _image),
    "token_mixing": (TokenMixing, _image),
    "multihead_attention": (lambda: TokenTransformer(dim=16, depth=1, num_classes=5), _tokens),
}


def _calibrated(name: str, seed: int):
    make_model, make_input = CASES[name]
    torch.manual_seed(seed)
    model = make_model().train()
    ir = PruningIR(model).infer_labels(make_input())
    batches = [(make_input(), torch.randint(0, 5, (4,))) for _ in range(6)]
    with LossAwareCriterion(ir) as collector:
        for inputs, targets in batches:
            F.cross_entropy(collector(inputs), targets).backward()
    return ir, batches


def _loss_without(ir: PruningIR, label, batches) -> float:
    copy_ir = copy.deepcopy(ir)
    copy_ir.zero_labels([l for l in copy_ir.labels() if (l.group.id, l.channel) == (label.group.id, label.channel)])
    model = copy_ir.model.train()
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y).item() for x, y in batches)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_live_label_scores_above_zero_and_the_order_means_something(name):
    agree = 0
    seeds = range(5)
    for seed in seeds:
        ir, batches = _calibrated(name, seed)
        groups = [g for g in ir.groups if g.prunable]
        assert groups
        for group in groups:
            assert (group.scores > 0).all(), (name, seed, group.modules, group.scores)
        group = max(groups, key=lambda g: len(g.classes))
        order = ir.label_groups()[[g.id for g in groups].index(group.id)]
        with torch.no_grad():
            base = sum(F.cross_entropy(copy.deepcopy(ir.model).train()(x), y).item() for x, y in batches)
        low = abs(_loss_without(ir, order[0], batches) - base)
        high = abs(_loss_without(ir, order[-1], batches) - base)
        agree += low < high
    assert agree >= 4, f"{name}: the lowest-scored label moved the loss less in only {agree} of {len(seeds)} seeds"


def test_selecting_before_any_calibration_warns_and_says_what_to_do():
    ir = PruningIR(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))).infer_labels(torch.randn(2, 4))
    with pytest.warns(UserWarning, match="every label of the IR scores 0.*calibrate with a criterion first"):
        UniformLabelSelector(0.5).select(ir)


def test_a_zero_initialised_head_gets_a_warning_naming_its_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[4].weight)
    ir = PruningIR(model).infer_labels(torch.randn(2, 4))
    with LossAwareCriterion(ir) as collector:
        for _ in range(3):
            F.cross_entropy(collector(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    with pytest.warns(UserWarning, match=r"every label of (the IR|groups \d).*MagnitudeCriterion"):
        UniformLabelSelector(0.5).select(ir)
