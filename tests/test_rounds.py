"""Pruning in rounds: the one-shot widths, re-scoring on the partly pruned model, batch norms,
latency targets, normalization over unmasked labels, the carried optimizer, and bad arguments."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from functools import partial

from pruning_ir import (BinarySearchLatencyLabelSelector, GlobalScoreLabelSelector, LabelsNotInferredError,
                        LossAwareCriterion, MagnitudeCriterion, PruningIR, PruningIRError, Reconstruction,
                        UniformLabelSelector, batch_statistics, bind, prune_in_rounds, tune_batchnorm_statistics)
from pruning_ir.latency import macs
from test_gradual import build, data
from test_optimizer_state import _data, _dead_model, _train


def calibration(x: torch.Tensor, y: torch.Tensor, seen: list | None = None, batch: int = 8):
    """``calibrate(score_collector)`` over (x, y); records the label count of the model it saw in ``seen``."""
    def calibrate(collector):
        if seen is not None:
            seen.append(len(collector.ir.labels()))
        for start in range(0, len(x), batch):
            F.cross_entropy(collector(x[start:start + batch]), y[start:start + batch]).backward()
    return calibrate


def group_widths(ir: PruningIR) -> list[int]:
    return [len(group) for group in ir.label_groups()]


def test_rounds_end_at_the_one_shot_widths_scored_on_the_partly_pruned_model():
    model = build().eval()
    x, y = data()
    ir = PruningIR(model).infer_labels(x[:1])
    before = copy.deepcopy(model.state_dict())
    seen = []
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibration(x, y, seen), rounds=3, verbose=False)
    one_shot = ir.prune(labels=UniformLabelSelector(0.5).select(ir))
    assert group_widths(pruned) == group_widths(one_shot) == [4, 4, 8]
    total = sum(group_widths(ir))
    # each round scores the model the previous rounds pruned
    assert len(seen) == 3 and seen[0] == total and total > seen[1] > seen[2] > total // 2
    assert not torch_prune.is_pruned(model) and not torch_prune.is_pruned(pruned.model)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in pruned.model.parameters())
    assert pruned.model(x).shape == (len(x), 5)


def test_labels_are_inferred_on_the_first_calibration_call_of_a_copy():
    x, y = data()
    ir = PruningIR(build().eval())
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibration(x, y), rounds=2, verbose=False)
    assert group_widths(pruned) == [4, 4, 8] and not ir.labels_inferred


def _one_shot_labels(ir: PruningIR, x: torch.Tensor, y: torch.Tensor, in_batch_statistics: bool) -> list:
    with batch_statistics(ir.model) if in_batch_statistics else contextlib.nullcontext(), \
            LossAwareCriterion(ir, reset=True) as collector:
        calibration(x, y, batch=16)(collector)
    return UniformLabelSelector(0.5).select(ir)


@pytest.mark.parametrize("in_batch_statistics", [False, True])
def test_one_round_is_one_shot_selection(in_batch_statistics):
    """One round selects what one-shot scoring does, in eval mode or inside batch_statistics
    (the two pick other labels here, so the option is seen to act)."""
    x, y = data()
    ir = PruningIR(build().eval()).infer_labels(x[:1])
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibration(x, y, batch=16), rounds=1,
                             score_in_batch_statistics=in_batch_statistics, verbose=False)
    assert not any(module.training for module in pruned.model.modules())
    other = _one_shot_labels(ir, x, y, not in_batch_statistics)
    labels = _one_shot_labels(ir, x, y, in_batch_statistics)
    assert set(labels) != set(other)
    one_shot = ir.prune(labels=labels, reconstruct=None)  # rounds without reconstruct= slice exactly
    for (name, theirs), mine in zip(one_shot.model.state_dict().items(), pruned.model.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_batch_norms_are_re_estimated_after_every_round():
    x, y = data()
    ir = PruningIR(build().eval()).infer_labels(x[:1])
    loader = [x[:16], x[16:]]
    seen = []
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibration(x, y, seen), rounds=2,
                             batchnorm_loader=loader, verbose=False)
    fresh = tune_batchnorm_statistics(copy.deepcopy(pruned.model), loader, verbose=False)
    norms = [(mine, theirs) for mine, theirs in zip(pruned.model.modules(), fresh.modules())
             if isinstance(mine, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and not torch.allclose(norms[0][0].running_var, torch.ones(4))  # not the untrained 1s
    for mine, theirs in norms:
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)


def test_latency_target_in_rounds_with_a_data_free_criterion():
    x, _ = data()
    example = x[:1]
    ir = PruningIR(build().eval()).infer_labels(example)
    latency = bind(macs, example)
    full = latency(ir.model)
    pruned = prune_in_rounds(ir, lambda target: BinarySearchLatencyLabelSelector(target, latency, normalize="mean"),
                             0.5 * full, rounds=3, criterion=MagnitudeCriterion, latency_function=latency,
                             verbose=False)
    assert 0.4 * full <= latency(pruned.model) <= 0.5 * full


def test_mean_normalization_ranks_as_if_masked_labels_were_pruned():
    x, _ = data()
    ir = PruningIR(build()).infer_labels(x[:1])
    rng = np.random.default_rng(0)
    groups = ir.label_groups()
    scores = {label: float(rng.uniform(1.0, 2.0)) for group in groups for label in group}
    gone = groups[0][:3]  # a masked channel scores 0
    scores.update({label: 0.0 for label in gone})
    ir.set_scores(scores)
    pruned = ir.prune(labels=gone)
    ir.mask(gone)
    for count in (2, 5, 9):
        on_masked = GlobalScoreLabelSelector(count + len(gone), normalize="mean").select(ir)
        on_pruned = GlobalScoreLabelSelector(count, normalize="mean").select(pruned)
        removed = [sum(label.group is group[0].group for label in on_masked) for group in ir.label_groups()]
        removed[0] -= len(gone)
        assert removed == [sum(label.group is group[0].group for label in on_pruned)
                           for group in pruned.label_groups()]


@pytest.mark.parametrize("arguments, error, match", [
    (dict(target=1.2), ValueError, "share of labels"),
    (dict(target=0.5, rounds=0), ValueError, "rounds"),
    (dict(target=0.5, calibrate=None), TypeError, "calibrate"),
    (dict(target=10 ** 9, latency_function=bind(macs, torch.zeros(1, 1, 8, 8))), ValueError, "own latency"),
    (dict(target=0.5, reconstruct="ridge"), ValueError, r"reconstruct must be one of \('bias', 'least_squares'\)"),
])
def test_bad_arguments_are_refused(arguments, error, match):
    x, y = data()
    ir = PruningIR(build()).infer_labels(x[:1])
    seen = []
    arguments = {"calibrate": calibration(x, y, seen), **arguments}
    with pytest.raises(error, match=match):
        prune_in_rounds(ir, UniformLabelSelector, verbose=False, **arguments)
    assert seen == []                                              # refused before the first round


def mlp_rounds(reconstruct) -> PruningIR:
    """An MLP whose last Linear has no bias and no batch norm after it, pruned in 2 rounds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3, bias=False))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    return prune_in_rounds(PruningIR(model).infer_labels(x[:1]), UniformLabelSelector, 0.5, calibration(x, y),
                           rounds=2, reconstruct=reconstruct, verbose=False)


def test_a_reconstruction_factory_sets_the_refit_options():
    created = mlp_rounds("least_squares").model.state_dict()
    assert "2.bias" in created                                     # the string: a bias is created
    same = mlp_rounds(lambda statistics: Reconstruction(statistics, "least_squares")).model.state_dict()
    assert same.keys() == created.keys() and all(torch.equal(same[k], created[k]) for k in created)
    kept = mlp_rounds(partial(Reconstruction, method="least_squares", create_bias=False)).model.state_dict()
    assert sorted(kept) == ["0.bias", "0.weight", "2.weight"] and kept["2.weight"].shape == (3, 8)
    assert not torch.equal(kept["2.weight"], mlp_rounds(None).model.state_dict()["2.weight"])  # refit, uncentred


def test_a_reconstruction_factory_must_return_a_reconstruction():
    with pytest.raises(TypeError, match="the reconstruct factory returned dict, not a Reconstruction"):
        mlp_rounds(lambda statistics: {})


def test_data_free_rounds_need_inferred_labels():
    with pytest.raises(LabelsNotInferredError, match="infer"):
        prune_in_rounds(PruningIR(build()), UniformLabelSelector, 0.5, criterion=MagnitudeCriterion, verbose=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rounds_stay_on_the_model_device():
    x, y = data()
    x, y = x.cuda(), y.cuda()
    ir = PruningIR(build().cuda().eval()).infer_labels(x[:1])
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibration(x, y), rounds=2, batchnorm_loader=[x],
                             verbose=False)
    assert {parameter.device.type for parameter in pruned.model.parameters()} == {"cuda"}
    assert pruned.model(x).device.type == "cuda"


@pytest.mark.parametrize("inplace", [False, True])
def test_the_optimizer_follows_the_rounds_onto_the_pruned_model(inplace):
    """Dead channels (exactly zero) pruned in rounds with Adam carried: training resumes to 1e-5 as
    on the unpruned model, like ``ir.prune(optimizer=)``."""
    model, ir, _ = _dead_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, _data(3, seed=1))
    reference, reference_optimizer = copy.deepcopy((model, optimizer))
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.25, rounds=2, criterion=MagnitudeCriterion,
                             inplace=inplace, optimizer=optimizer, verbose=False).model
    assert (pruned is model) == inplace and pruned.conv1.out_channels == 6 and pruned.conv2.out_channels == 9
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in pruned.parameters()}
    later = _data(3, seed=2)
    _train(reference, reference_optimizer, later)
    _train(pruned, optimizer, later)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-4)


def test_a_failed_round_leaves_the_optimizer_as_it_was():
    model, ir, _ = _dead_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer, _data(1, seed=1))
    parameters, state = [p for group in optimizer.param_groups for p in group["params"]], optimizer.state
    calls = []

    def calibrate(collector):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the data loader broke")
        for x, y in _data(2, seed=3):
            F.cross_entropy(collector(x), y).backward()

    with pytest.raises(RuntimeError, match="loader broke"):
        prune_in_rounds(ir, UniformLabelSelector, 0.5, calibrate, rounds=3, optimizer=optimizer, verbose=False)
    assert [p for group in optimizer.param_groups for p in group["params"]] == parameters
    assert optimizer.state is state and model.conv1.out_channels == 8 and not torch_prune.is_pruned(model)


def test_an_optimizer_that_cannot_follow_is_refused_before_the_first_round():
    model, ir, _ = _dead_model()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    _train(model, optimizer, _data(1, seed=1))
    with pytest.raises(PruningIRError, match="Adafactor's state"):
        prune_in_rounds(ir, UniformLabelSelector, 0.5, rounds=2, criterion=MagnitudeCriterion, inplace=True,
                        optimizer=optimizer, verbose=False)
    assert not torch_prune.is_pruned(model) and model.conv1.out_channels == 8


def test_later_rounds_score_every_site_after_reconstruction_created_biases():
    """Round 2 calibrates a model whose bias-free projections got a bias from round 1's refit: the
    criterion still finds every activation site of the recorded graph (a created bias is not a
    different call)."""
    pytest.importorskip("transformers")
    import warnings

    from hf_models import HF_ZOO
    entry = HF_ZOO["llama"]
    (ids,) = entry.example_inputs()

    def calibrate(collector):
        for shift in range(2):
            batch = (ids + shift) % 100
            collector(input_ids=batch, labels=batch).loss.backward()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = prune_in_rounds(PruningIR(entry.build()), UniformLabelSelector, 0.5, calibrate, rounds=2,
                                 reconstruct="least_squares", verbose=False)
    assert any(name.endswith("o_proj.bias") for name in pruned.created_parameters)
    assert not [w for w in caught if "sites were not found" in str(w.message)]
