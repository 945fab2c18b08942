"""prune() verifies a removal on a shape-only copy before writing it: a removal that would break
the model on its example inputs keeps the responsible groups (a warning names them and the
error), or raises PruningError with strict=True, leaving the model as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pruning_ir import PruningError, PruningIR, UniformLabelSelector


class ChannelCountBranch(nn.Module):
    """Python control flow on a channel count: after pruning the stem, the other branch runs and the
    output changes shape (the recorder follows one path; the check sees the other)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)
        self.small_head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).mean((2, 3))
        x = x + self.mlp(x)
        if x.shape[1] % 16 == 0:
            return self.head(x)
        return self.small_head(x[:, :8])


def branch_ir() -> tuple[PruningIR, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small_head is never called on the recorded path
        return PruningIR(ChannelCountBranch().eval()).infer_labels(image), image


def test_an_unverified_removal_breaks_this_model():
    """The reference: pruning the stem flips the branch, and the output changes shape."""
    ir, image = branch_ir()
    pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir), verify=False)
    assert pruned.model(image).shape != ir.model(image).shape


def test_verification_keeps_the_groups_that_break_it_and_says_why():
    ir, image = branch_ir()
    labels = UniformLabelSelector(0.5).select(ir)
    with pytest.warns(UserWarning, match=r"(?s)groups keep their labels.*group \d+ \(stem.*shape \[2, 5\]"):
        pruned = ir.prune(labels=labels)
    assert pruned.model(image).shape == ir.model(image).shape
    assert pruned.model.stem.out_channels == 16 and pruned.model.mlp[0].out_features == 16  # the MLP is pruned
    # the returned IR pins the group it kept, with the reason: selecting again does not pick it
    stem = next(group for group in pruned.groups if "stem" in group.modules)
    assert not stem.prunable and any("breaks the model" in reason for reason in stem.unprunable_reasons)
    again = pruned.prune(labels=UniformLabelSelector(0.5).select(pruned))
    assert again.model.stem.out_channels == 16 and again.model(image).shape == ir.model(image).shape


@pytest.mark.parametrize("inplace", [False, True])
def test_strict_raises_and_changes_nothing(inplace):
    ir, image = branch_ir()
    labels = UniformLabelSelector(0.5).select(ir)
    before = {name: value.clone() for name, value in ir.model.state_dict().items()}
    expected = ir.model(image)
    with pytest.raises(PruningError, match=r"groups responsible:\n  group \d+"):
        ir.prune(labels=labels, inplace=inplace, strict=True)
    after = ir.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(ir.model(image), expected)
    mlp = [label for group in ir.label_groups() if len(group) == 32 for label in group[:16]]
    assert ir.prune(labels=mlp, strict=True).model.mlp[0].out_features == 16  # still usable


def test_a_removal_that_runs_is_untouched_and_silent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    image = torch.randn(2, 3, 9, 9)
    ir = PruningIR(model).infer_labels(image)
    labels = UniformLabelSelector(0.5).select(ir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checked = ir.prune(labels=labels)
    unchecked = ir.prune(labels=labels, verify=False)
    assert torch.equal(checked.model(image), unchecked.model(image))
    assert checked.model[0].out_channels == 4
