"""Leaf modules given as instances follow the model through every copy of an IR: deepcopy
before labels are inferred, dill, prune() on a copy, prune_in_rounds and GradualPruner."""

from __future__ import annotations

import copy

import dill
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import GradualPruner, LossAwareCriterion, PruningIR, UniformLabelSelector, prune_in_rounds


class Embedder(nn.Module):
    """A custom leaf: a lookup table whose output width must never change."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(tokens, width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embedder(20, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x).mean(1)


def tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (8, 5), generator=generator), torch.randint(0, 4, (8,), generator=generator)


def leaf_ir() -> PruningIR:
    torch.manual_seed(0)
    model = TokenModel()
    return PruningIR(model, leaf_modules=[PruningIR.LeafModule(model.embed, prunable_output=False)])


def calibrate(collector) -> None:
    ids, targets = tokens()
    F.cross_entropy(collector(ids), targets).backward()


def assert_hidden_kept(model: TokenModel) -> None:
    assert model.embed.table.shape == (20, 16) and model.down.out_features == 16
    assert model.up.out_features < 32  # the MLP units were pruned: the leaf pinned only its output


def pruned_half(ir: PruningIR) -> TokenModel:
    if not ir.labels_inferred:
        ir.infer_labels(tokens()[0])
    return ir.prune(labels=UniformLabelSelector(0.5).select(ir)).model


def test_the_leaf_pins_the_hidden_size():
    assert_hidden_kept(pruned_half(leaf_ir()))


@pytest.mark.parametrize("copier", ["deepcopy", "dill"])
def test_a_copy_made_before_inference_keeps_the_leaf(copier):
    ir = leaf_ir()
    copied = copy.deepcopy(ir) if copier == "deepcopy" else dill.loads(dill.dumps(ir))
    assert copied.model is not ir.model
    assert copied.leaf_policy.leaf_spec(copied.model.embed) is not None
    assert_hidden_kept(pruned_half(copied))


def test_a_pruned_copy_keeps_the_leaf_on_its_own_model():
    ir = leaf_ir().infer_labels(tokens()[0])
    pruned = ir.prune(labels=UniformLabelSelector(0.25).select(ir))
    assert pruned.model is not ir.model
    spec = pruned.leaf_policy.leaf_spec(pruned.model.embed)
    assert spec is not None and spec.prunable_output is False
    assert pruned.leaf_policy.leaf_spec(ir.model.embed) is None  # not the original's module any more
    # scoring the pruned copy replays its model with the leaf intact: every site is found
    with _no_warning():
        with LossAwareCriterion(pruned) as collector:
            calibrate(collector)
    assert_hidden_kept(pruned.prune(labels=UniformLabelSelector(0.25).select(pruned)).model)


def test_prune_in_rounds_on_an_ir_not_inferred_keeps_the_leaf():
    ir = leaf_ir()
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibrate, rounds=2, verbose=False)
    assert_hidden_kept(pruned.model)
    assert not ir.labels_inferred  # the rounds worked on a deep copy


def test_gradual_pruning_keeps_the_leaf():
    ir = leaf_ir()
    pruner = GradualPruner(ir, UniformLabelSelector, mode="static", threshold=0.5, stepsize=2)
    ids, targets = tokens()
    for _ in range(2):
        F.cross_entropy(pruner(ids), targets).backward()
        pruner.step()
    assert_hidden_kept(pruner.finalize())


class _no_warning:
    """Fails the block on any warning (the replay warns when it misses a site)."""

    def __enter__(self):
        import warnings
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        return False


@pytest.mark.parametrize("with_data", [False, True])
def test_the_one_call_keeps_the_leaf(with_data):
    import pruning_ir
    torch.manual_seed(0)
    model = TokenModel()
    ids, targets = tokens()
    options = dict(data=[(ids, targets)], loss=F.cross_entropy, rounds=2) if with_data else {}
    pruned = pruning_ir.prune(model, ids, ratio=0.5, verbose=False, **options,
                              leaf_modules=[PruningIR.LeafModule(model.embed, prunable_output=False)])
    assert_hidden_kept(pruned)
