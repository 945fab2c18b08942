"""Guards around pruning: a model changed after its labels were inferred, a failed in-place prune,
selectors that measure candidates of a Hugging Face model, the one call's failures and bad input,
and refit targets: each refused or reported clearly, never a silently wrong model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning_ir
from pruning_ir import (BudgetUnreachableError, KnapsackLabelSelector, LossAwareCriterion, MagnitudeCriterion,
                        PruningIR, PruningIRError, Reconstruction, RefitTarget, UniformLabelSelector,
                        collect_statistics)
from pruning_ir.latency import bind, parameter_count


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def batches(count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 10, generator=generator), torch.randint(0, 3, (16,), generator=generator))
            for _ in range(count)]


def test_a_layer_replaced_after_labelling_is_refused_and_nothing_changes():
    torch.manual_seed(0)
    model = ThreeLayers()
    ir = PruningIR(model).infer_labels(torch.randn(4, 10))
    MagnitudeCriterion(ir).apply()
    labels = UniformLabelSelector(0.5).select(ir)
    model.a, model.b = nn.Linear(10, 48), nn.Linear(48, 32)   # widened meanwhile
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(PruningIRError, match=r"the model changed since its labels were inferred: a\.weight has "
                                             r"shape \(48, 10\), but the labels were inferred with 32"):
        ir.prune(labels=labels, inplace=True)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


class Interrupted:
    """A calibration loader that is interrupted (Ctrl-C) on its third batch."""

    def __init__(self, data: list) -> None:
        self.data = data

    def __iter__(self):
        for index, batch in enumerate(self.data):
            if index == 2:
                raise KeyboardInterrupt
            yield batch


def test_an_in_place_prune_that_fails_midway_retires_its_ir():
    torch.manual_seed(0)
    model, data = ThreeLayers(), batches()
    ir = PruningIR(model)
    with collect_statistics(ir) as statistics, LossAwareCriterion(ir, input_statistics=False) as collector:
        for x, y in data:
            F.cross_entropy(collector(x), y).backward()
    refit = Reconstruction(statistics, "least_squares", sequential=Interrupted(data))
    with pytest.raises(KeyboardInterrupt):
        ir.prune(labels=UniformLabelSelector(0.5).select(ir), reconstruct=refit, inplace=True)
    assert model.b.weight.shape == (16, 16)   # the model is left as far as pruning got, as documented
    with pytest.raises(PruningIRError, match="pruned with inplace=True.*failed midway"):
        ir.labels()


def test_a_selector_measuring_candidates_of_a_transformers_model_leaves_their_configs_alone():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (1, 8))
    ir = PruningIR(model).infer_labels(ids)
    MagnitudeCriterion(ir).apply()
    count = bind(parameter_count)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "the pruned ...'s config cannot describe it" about a candidate
        labels = KnapsackLabelSelector(0.7 * count(model), count, verbose=False).select(ir)
    assert labels and model.config.hidden_size == 32


def test_the_one_call_refuses_a_loss_that_is_not_a_function():
    with pytest.raises(TypeError, match=r"loss= must be a function .* got str 'ce'"):
        pruning_ir.prune(ThreeLayers(), torch.randn(2, 10), macs=0.5, data=batches(), loss="ce")


def test_the_one_call_says_when_nothing_can_be_pruned():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(BudgetUnreachableError, match="nothing in this model can be pruned"):
        pruning_ir.prune(model, torch.randn(2, 4), macs=0.5, verbose=False)


def test_an_in_place_one_call_that_fails_midway_says_so_and_clears_gradients():
    torch.manual_seed(0)
    model, calls = ThreeLayers(), []

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 6:   # in the second round
            raise RuntimeError("the data went away")
        return F.cross_entropy(output, target)

    with pytest.raises(RuntimeError, match="the data went away") as caught:
        pruning_ir.prune(model, torch.randn(2, 10), macs=0.3, data=batches(), loss=loss, rounds=3, inplace=True,
                         verbose=False)
    notes = getattr(caught.value, "__notes__", [])
    assert any("failed midway" in note for note in notes) or not hasattr(caught.value, "add_note")
    assert all(p.grad is None for p in model.parameters())


def test_a_refit_target_with_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"method must be one of \('bias', 'least_squares'\), got 'bogus'"):
        RefitTarget("fc.weight", "bogus", None, "bias", "fc.bias")
