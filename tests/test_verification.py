"""prune() verifies a removal on a shape-only copy before writing it: a removal that would break
the model on its example inputs keeps the responsible groups (a warning names them and the
error), or raises PruningError with strict=True, leaving the model as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pruning_ir import GlobalScoreLabelSelector, PruningError, PruningIR, UniformLabelSelector


class SRAttention(nn.Module):
    def __init__(self, dim=32, heads=2, sr=2):
        super().__init__()
        self.heads = heads; self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim); self.kv = nn.Linear(dim, 2 * dim)
        self.sr = nn.Conv2d(dim, dim, sr, stride=sr); self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
        x_ = self.sr(x_).reshape(B, C, -1).permute(0, 2, 1)
        x_ = self.norm(x_)
        kv = self.kv(x_).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)

class PVT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 2, stride=2)
        self.attn = SRAttention()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)
    def forward(self, img):
        x = self.embed(img); B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.attn(x, H, W)
        x = x + self.mlp(x)
        return self.head(x.mean(1))



def pvt_ir() -> tuple[PruningIR, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.randn(2, 3, 16, 16)
    return PruningIR(PVT().eval()).infer_labels(image), image


def test_an_unverified_removal_breaks_this_model():
    """The reference: spatial-reduction attention pruned globally without verification fails."""
    ir, image = pvt_ir()
    pruned = ir.prune(labels=GlobalScoreLabelSelector(0.5).select(ir), verify=False)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        pruned.model(image)


def test_verification_keeps_the_groups_that_break_it_and_says_why():
    ir, image = pvt_ir()
    mlp = [label for group in ir.label_groups() if len(group) == 64 for label in group[:32]]  # the MLP units
    labels = list(dict.fromkeys(GlobalScoreLabelSelector(0.5).select(ir) + mlp))
    with pytest.warns(UserWarning, match=r"(?s)groups keep their labels.*group \d+ \(.*RuntimeError"):
        pruned = ir.prune(labels=labels)
    assert pruned.model(image).shape == ir.model(image).shape
    assert pruned.model.mlp[0].out_features == 32  # the groups that run are pruned


@pytest.mark.parametrize("inplace", [False, True])
def test_strict_raises_and_changes_nothing(inplace):
    ir, image = pvt_ir()
    labels = GlobalScoreLabelSelector(0.5).select(ir)
    before = {name: value.clone() for name, value in ir.model.state_dict().items()}
    expected = ir.model(image)
    with pytest.raises(PruningError, match=r"groups responsible:\n  group \d+"):
        ir.prune(labels=labels, inplace=inplace, strict=True)
    after = ir.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(ir.model(image), expected)
    ir.prune(labels=UniformLabelSelector(0.5).select(ir))  # still usable


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
