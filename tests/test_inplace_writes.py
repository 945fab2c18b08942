"""``ir.prune(inplace=True)`` writes one tensor at a time and puts everything back on a failure.

Each pruned tensor is replaced before the next is sliced (so peak memory stays near the model's
size); a failure while writing (here: a module whose parameter dict refuses a write) must leave
the model bit-identical, with the parameter objects an optimizer holds restored as they were.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_ir import PruningIR, UniformLabelSelector


class RefusingWrites(dict):
    """A module's parameter dict that refuses to take a real (non-meta) tensor: a write that fails."""

    def __setitem__(self, key, value):
        if value is not None and value.device.type != "meta":
            raise MemoryError(f"no memory left for {key}")
        super().__setitem__(key, value)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 4)).eval()


def _snapshot(model: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _selected(model: nn.Module) -> tuple[PruningIR, list]:
    ir = PruningIR(model).infer_labels(torch.randn(3, 8))
    for group in ir.groups:
        group.index.set_class_scores(group.classes, torch.arange(len(group.classes), dtype=torch.float64).numpy())
    return ir, UniformLabelSelector(0.5).select(ir)


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [16, 16, 16, 4]


@pytest.mark.parametrize("refusing_layer", [0, 4, 6])
def test_a_failed_write_puts_every_replaced_tensor_back(refusing_layer):
    model = _model()
    ir, labels = _selected(model)
    before = _snapshot(model)
    x = torch.randn(5, 8)
    expected = model(x)
    model[refusing_layer]._parameters = RefusingWrites(model[refusing_layer]._parameters)
    with pytest.raises(MemoryError, match="no memory left"):
        ir.prune(labels=labels, inplace=True)
    _assert_unchanged(model, before)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_parameters_an_optimizer_holds_are_restored_as_the_same_objects():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    held = list(model.parameters())
    ir, labels = _selected(model)
    before = _snapshot(model)
    model[4]._parameters = RefusingWrites(model[4]._parameters)
    with pytest.raises(MemoryError):
        ir.prune(labels=labels, inplace=True)
    _assert_unchanged(model, before)
    assert all(a is b for a, b in zip(model.parameters(), held))
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], held))


def test_in_place_pruning_frees_each_old_tensor():
    """Nothing but the model holds the full-size tensors: each is gone once replaced."""
    import weakref
    model = _model()
    ir, labels = _selected(model)
    old = [weakref.ref(p) for p in model.parameters()]
    pruned = ir.prune(labels=labels, inplace=True).model
    assert pruned is model
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [8, 8, 8, 4]
    assert sum(ref() is None for ref in old) >= 6  # every pruned weight and bias was released
