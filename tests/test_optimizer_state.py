"""prune(..., optimizer=): the optimizer moves onto the pruned model with its state sliced alike."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import PruningIR, PruningIRError


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        # no conv bias before a batch norm: its gradient is rounding noise, which Adam would amplify
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _data(steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator))
            for _ in range(steps)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _dead_model():
    """A CNN whose labels ``dead`` are exactly zero, trained 3 steps so the optimizer has state."""
    torch.manual_seed(0)
    model = SmallCNN()
    ir = PruningIR(model).infer_labels(torch.randn(2, 3, 8, 8))
    dead = [label for group in ir.label_groups() for label in sorted(group, key=lambda label: label.channel)[:3]]
    ir.zero_labels(dead)
    return model, ir, dead


OPTIMIZERS = {"adam": lambda p: torch.optim.Adam(p, lr=1e-2),
              "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
              "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("inplace", [False, True])
def test_training_resumes_as_if_the_dead_channels_never_existed(name, inplace):
    """Dead channels (exactly zero, so zero gradients and zero state) pruned with the optimizer
    carried: the next steps match the unpruned model's to 1e-5; a fresh optimizer does not."""
    model, ir, dead = _dead_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    _train(model, optimizer, _data(3, seed=1))
    assert all(float(p.detach().abs().sum()) == 0 for p in (model.conv1.weight[:3], model.conv2.weight[:3]))
    reference, reference_optimizer = copy.deepcopy((model, optimizer))
    fresh = ir.prune(labels=dead).model
    pruned = ir.prune(labels=dead, inplace=inplace, optimizer=optimizer).model
    assert (pruned is model) == inplace and pruned.conv1.out_channels == 5 and pruned.conv2.out_channels == 9
    pruned_parameters = {id(p) for p in pruned.parameters()}
    assert all(id(p) in pruned_parameters for group in optimizer.param_groups for p in group["params"])
    assert len(optimizer.state) == len(reference_optimizer.state)

    later = _data(3, seed=2)
    _train(reference, reference_optimizer, later)
    _train(pruned, optimizer, later)
    _train(fresh, OPTIMIZERS[name](fresh.parameters()), later)
    x = torch.randn(4, 3, 8, 8)
    for module in (reference, pruned, fresh):
        module.eval()
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-4)
        assert (fresh(x) - expected).abs().max() > 1e-3  # the carried state is what makes them match


def test_a_foreign_optimizer_is_refused_with_nothing_changed():
    model, ir, dead = _dead_model()
    stranger = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(stranger.parameters()), lr=0.1, momentum=0.9)
    _train(model, optimizer, _data(1, seed=1))
    before = [list(group["params"]) for group in optimizer.param_groups]
    weights = model.conv1.weight
    with pytest.raises(PruningIRError, match="not the model's"):
        ir.prune(labels=dead, inplace=True, optimizer=optimizer)
    assert [list(group["params"]) for group in optimizer.param_groups] == before
    assert model.conv1.weight is weights and model.conv1.out_channels == 8
    ir.prune(labels=dead)  # the IR is still usable: nothing was consumed


def test_state_of_another_shape_is_refused_before_pruning():
    """Adafactor keeps factored (row / column) statistics: they cannot be sliced like the
    parameter, so the move is refused and the in-place model is left whole."""
    model, ir, dead = _dead_model()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    _train(model, optimizer, _data(1, seed=1))
    with pytest.raises(PruningIRError, match="Adafactor's state 'row_var'"):
        ir.prune(labels=dead, inplace=True, optimizer=optimizer)
    assert model.conv1.out_channels == 8 and model.conv1.weight.shape[0] == 8


def test_a_masked_model_moves_its_optimizer_off_the_masked_tensors():
    """Masks keep the trained parameter as ``<name>_orig``, the object the optimizer holds: pruning
    the masked labels moves the optimizer onto the plain, smaller parameters."""
    model, ir, dead = _dead_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ir.mask(dead)
    _train(model, optimizer, _data(2, seed=1))
    pruned = ir.prune(labels=ir.masked_labels(), optimizer=optimizer).model
    by_id = {id(p): name for name, p in pruned.named_parameters()}
    names = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert sorted(names) == sorted(by_id.values()) and not any(n.endswith("_orig") for n in names)
    for parameter, state in optimizer.state.items():
        assert state["exp_avg"].shape == parameter.shape
    _train(pruned, optimizer, _data(1, seed=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_carried_state_stays_on_the_model_device():
    model, ir, dead = _dead_model()
    model.cuda()
    ir = PruningIR(model).infer_labels(torch.randn(2, 3, 8, 8, device="cuda"))
    dead = [label for group in ir.label_groups() for label in sorted(group, key=lambda label: label.channel)[:3]]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, [(x.cuda(), y.cuda()) for x, y in _data(2, seed=1)])
    pruned = ir.prune(labels=dead, optimizer=optimizer).model
    for parameter, state in optimizer.state.items():
        assert parameter.is_cuda and state["exp_avg"].is_cuda and state["exp_avg"].shape == parameter.shape
    _train(pruned, optimizer, [(x.cuda(), y.cuda()) for x, y in _data(1, seed=2)])
