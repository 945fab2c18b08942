"""pruning_ir.prune, the one-call recipe: budgets met on zoo and Hugging Face models, with and without
data; the caller's model untouched (or pruned in place); the report against independent measurements;
the recipe it runs equal to the same recipe written out by hand; and clear errors for bad budgets."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning_ir
from pruning_ir import (KnapsackLabelSelector, PruneReport, PruningIR, Reconstruction, UniformLabelSelector, bind,
                        macs, parameter_count, prune_in_rounds, tune_batchnorm_statistics)
from hf_models import HF_ZOO, VOCAB_SIZE
from zoo import ZOO, BasicBlock, MobileNetV2, ResNet, seeded_build


def small_resnet() -> nn.Module:
    return seeded_build(lambda: ResNet(BasicBlock, (1, 1, 1, 1), base_width=8))()


def images(batches: int = 2, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(batches)]


def tokens(batches: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB_SIZE, (4, 8), generator=g) for _ in range(batches)]


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def snapshot(model: nn.Module) -> tuple[dict, list, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, list(model.parameters()),
            [m.training for m in model.modules()])


def assert_untouched(model: nn.Module, before: tuple[dict, list, list]) -> None:
    state, parameters, flags = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in state.items())
    assert all(a is b for a, b in zip(model.parameters(), parameters)) and len(list(model.parameters())) == len(
        parameters)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def assert_report_agrees(report: PruneReport, model: nn.Module, pruned: nn.Module, x: torch.Tensor,
                         *infer_args, **infer_kwargs) -> None:
    """The report's numbers against macs/parameter_count, and its removed channels against an
    independent one-shot prune of the original (``infer_*``: how prune() called the model)."""
    assert report.macs_before == macs(model, x) and report.macs_after == macs(pruned, x)
    assert report.params_before == parameter_count(model) and report.params_after == parameter_count(pruned)
    assert report.macs_ratio == pytest.approx(macs(pruned, x) / macs(model, x))
    assert report.params_ratio == pytest.approx(parameter_count(pruned) / parameter_count(model))
    original = PruningIR(model).infer_labels(*(infer_args or (() if infer_kwargs else (x,))), **infer_kwargs)
    prunable = [g for g in original.groups if g.prunable]
    assert [(g.group, g.labels) for g in report.groups] == [(g.id, len(g.classes)) for g in prunable]
    assert all(len(set(g.channels)) == g.removed for g in report.groups)
    labels = [group.labels[c] for group, row in zip(prunable, report.groups) for c in row.channels]
    assert len(labels) == report.labels_removed > 0
    rebuilt = dict(original.prune(labels=labels).model.named_parameters())
    kept = dict(pruned.named_parameters())
    assert kept.keys() == rebuilt.keys() and all(kept[k].shape == rebuilt[k].shape for k in kept)
    if "reconstruct=" not in report.recipe:                          # else the consumers were refit
        assert all(torch.equal(kept[k], rebuilt[k]) for k in kept)
    for group, row in [(g, r) for g, r in zip(prunable, report.groups) if r.removed][:3]:
        alone = original.prune(labels=[group.labels[c] for c in row.channels]).model
        assert row.parameters_removed == parameter_count(model) - parameter_count(alone) > 0
        assert row.macs_removed == macs(model, x) - macs(alone, x)
    assert all(r.parameters_removed == r.macs_removed == 0 for r in report.groups if not r.removed)
    assert set(report.timings) >= {"labels", "measure before", "prune", "measure after", "report"}
    assert all(seconds >= 0 for seconds in report.timings.values())
    text = str(report)
    assert report.recipe.split(":")[0] in text and all(len(line) <= 120 for line in text.splitlines())


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_a_macs_budget_with_data_is_met_and_the_callers_model_is_untouched(name, capfd):
    model = small_resnet() if name == "resnet" else ZOO["vit"].build()
    x = ZOO["vit"].example_inputs()[0]
    before = snapshot(model)
    capfd.readouterr()
    pruned, report = pruning_ir.prune(model, x, macs=0.5, data=images(), loss=F.cross_entropy, rounds=2,
                                      return_report=True, verbose=False)
    assert capfd.readouterr() == ("", "")                             # verbose=False: silent
    assert_untouched(model, before)
    assert type(pruned) is type(model) and pruned is not model
    assert macs(pruned, x) <= 0.5 * macs(model, x) and report.reached == report.macs_ratio
    assert macs(pruned, x) > 0.4 * macs(model, x)            # the knapsack meets the budget tightly
    assert outputs(pruned, x).shape == outputs(model, x).shape
    assert all(p.grad is None for p in pruned.parameters())
    assert report.budget == "macs" and report.asked == 0.5 and not report.data_free
    assert report.recipe.startswith("prune_in_rounds x2: LossAwareCriterion")
    assert ("in batch statistics" in report.recipe) == (name == "resnet")
    assert_report_agrees(report, model, pruned, x, images()[0][0])


def refit(method: str | None):
    """What the one call passes prune_in_rounds for ``reconstruct=method``: no bias is created."""
    return None if method is None else partial(Reconstruction, method=method, create_bias=False)


@pytest.mark.parametrize("reconstruct", ["least_squares", None])
def test_the_recipe_is_the_documented_one_written_out_by_hand(reconstruct):
    """Same widths and weights as prune_in_rounds in batch statistics with a knapsack to the MACs
    budget, the consumers refit by least squares in every round (the default; None: no refit) and
    batch norms re-estimated after every round; the statistics are those of the data."""
    model, data = small_resnet(), images()
    x = images(1, 2, seed=5)[0][0]
    pruned, report = pruning_ir.prune(model, x, macs=0.6, data=data, loss=F.cross_entropy, rounds=2, verbose=False,
                                      return_report=True, **({} if reconstruct else {"reconstruct": None}))
    assert ("refit by least squares (reconstruct='least_squares')" in report.recipe) == (reconstruct is not None)

    def calibrate(collector):
        for inputs, targets in data:
            F.cross_entropy(collector(inputs), targets).backward()

    cost = bind(macs, x)
    by_hand = prune_in_rounds(PruningIR(model).infer_labels(data[0][0]),
                              lambda budget: KnapsackLabelSelector(budget, cost, verbose=False), 0.6 * cost(model),
                              calibrate, rounds=2, latency_function=cost, batchnorm_loader=data,
                              score_in_batch_statistics=True, reconstruct=refit(reconstruct), verbose=False).model
    mine, theirs = pruned.state_dict(), by_hand.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs) and mine.keys() == theirs.keys()
    assert mine.keys() == model.state_dict().keys()                  # no bias created: loadable as built
    retuned = tune_batchnorm_statistics(copy.deepcopy(pruned), data, verbose=False).state_dict()
    assert all(torch.equal(retuned[k], v) for k, v in mine.items())


def test_a_forward_hook_on_a_batch_norm_model_re_estimates_the_statistics_after_every_round():
    model, data = small_resnet(), [{"pixels": x, "classes": y} for x, y in images()]
    x = data[0]["pixels"][:2]
    pruned, report = pruning_ir.prune(model, x, params=0.6, data=data, rounds=2, return_report=True, verbose=False,
                                      forward=lambda m, batch: F.cross_entropy(m(batch["pixels"]), batch["classes"]))
    assert parameter_count(pruned) <= 0.6 * parameter_count(model)
    assert "after every round" in report.recipe
    retuned = tune_batchnorm_statistics(copy.deepcopy(pruned), data, forward=lambda m, b: m(b["pixels"]),
                                        verbose=False).state_dict()
    assert all(torch.equal(retuned[k], v) for k, v in pruned.state_dict().items())


@pytest.mark.parametrize("budget", [{"params": 0.5}, {"ratio": 0.5}, {"macs": 0.5}])
def test_data_free_pruning_meets_every_budget_kind_and_says_it_is_data_free(budget):
    model, x = small_resnet(), ZOO["vit"].example_inputs()[0]
    before = snapshot(model)
    pruned, report = pruning_ir.prune(model, x, **budget, return_report=True, verbose=False)
    assert_untouched(model, before)
    assert report.data_free and report.recipe.startswith("data-free one shot: MagnitudeCriterion")
    assert any("data-free" in note and "data=" in note for note in report.notes)
    if "ratio" in budget:
        assert report.reached == pytest.approx(0.5, abs=0.05)
    else:
        kind = next(iter(budget))
        measure = macs(pruned, x) / macs(model, x) if kind == "macs" else parameter_count(pruned) / parameter_count(
            model)
        assert measure <= 0.5 and report.reached == measure
    assert outputs(pruned, x).shape == outputs(model, x).shape
    assert_report_agrees(report, model, pruned, x)


def test_a_ratio_with_data_on_a_mobilenet_is_uniform_selection_in_rounds():
    """The ratio recipe equals prune_in_rounds with UniformLabelSelector, scored in batch statistics,
    batch norms re-estimated after every round: same weights, same statistics."""
    model, data = seeded_build(lambda: MobileNetV2(width_mult=0.25))(), images()
    x = ZOO["mobilenet_v2"].example_inputs()[0]
    before = snapshot(model)
    pruned = pruning_ir.prune(model, x, ratio=0.4, data=data, loss=F.cross_entropy, rounds=2, verbose=False)
    assert_untouched(model, before)
    assert outputs(pruned, x).shape == outputs(model, x).shape

    def calibrate(collector):
        for inputs, targets in data:
            F.cross_entropy(collector(inputs), targets).backward()

    ir = PruningIR(model).infer_labels(data[0][0])
    by_hand = prune_in_rounds(ir, UniformLabelSelector, 0.4, calibrate, rounds=2, batchnorm_loader=data,
                              score_in_batch_statistics=True, reconstruct=refit("least_squares"), verbose=False)
    mine, theirs = pruned.state_dict(), by_hand.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    widths = [(len(g.classes), len(h.classes)) for g, h in zip(ir.groups, by_hand.groups) if g.prunable]
    assert all(after == before - min(before - 1, int(0.4 * before + 0.5)) for before, after in widths)


@pytest.mark.parametrize("budget", [{"macs": 0.5}, {"params": 0.7}])
def test_gpt2_with_a_forward_hook_meets_the_budget_and_still_generates_logits(budget):
    entry = HF_ZOO["gpt2"]
    model, (x,) = entry.build(), entry.example_inputs()
    before = snapshot(model)
    pruned, report = pruning_ir.prune(model, x, **budget, data=tokens(), forward=lm_loss, rounds=2,
                                      return_report=True, verbose=False)
    assert_untouched(model, before)
    kind, value = next(iter(budget.items()))
    measured = macs(pruned, x) / macs(model, x) if kind == "macs" else parameter_count(pruned) / parameter_count(model)
    assert measured <= value and report.reached == measured
    assert outputs(pruned, x).shape == outputs(model, x).shape
    assert not any("not found" in note for note in report.notes)   # calibration matched the traced graph
    first = tokens()[0]
    assert_report_agrees(report, model, pruned, x, input_ids=first, labels=first)


def test_inplace_prunes_the_callers_model():
    model, x = ZOO["vit"].build(), ZOO["vit"].example_inputs()[0]
    full = copy.deepcopy(model)
    pruned, report = pruning_ir.prune(model, (x,), macs=0.5, data=images(), loss=F.cross_entropy, rounds=2,
                                      inplace=True, return_report=True, verbose=False)
    assert pruned is model and parameter_count(model) < parameter_count(full)
    assert macs(model, x) <= 0.5 * macs(full, x) and report.macs_before == macs(full, x)
    assert all(g.parameters_removed is None for g in report.groups) and report.labels_removed > 0
    assert any("inplace=True" in note for note in report.notes)


def test_a_latency_budget_is_measured_and_reported():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8))
    x = torch.randn(64, 256)
    pruned, report = pruning_ir.prune(model, x, latency=0.5, return_report=True, verbose=False)
    assert report.budget == "latency" and report.latency_before > 0 and report.latency_after > 0
    assert report.reached == report.latency_ratio < 0.9                 # loose: CPU timings on a shared machine
    assert report.macs_ratio < 0.9 and "latency" in str(report)
    assert pruned(x).shape == (64, 8)


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, TypeError, "exactly one budget"),
    ({"macs": 0.5, "params": 0.5}, TypeError, "exactly one budget, got 2: macs=, params="),
    ({"macs": 1.5}, ValueError, r"macs= .* must lie in \(0, 1\), got 1.5"),
    ({"ratio": 0.0}, ValueError, r"ratio= .* must lie in \(0, 1\)"),
    ({"latency": "fast"}, TypeError, "latency= .* must be a share"),
    ({"macs": 0.5, "data": [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]}, TypeError, "needs loss=.*forward="),
    ({"macs": 0.5, "loss": F.cross_entropy}, TypeError, "pass data= too"),
    ({"macs": 0.5, "data": iter([]), "loss": F.cross_entropy}, TypeError, "re-iterable"),
    ({"macs": 0.5, "rounds": 0}, ValueError, "rounds must be a positive int"),
    ({"macs": 0.5, "reconstruct": "ridge"}, ValueError, r"reconstruct must be one of \('bias', 'least_squares'\)"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    model = small_resnet()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pruning_ir.prune(model, torch.randn(2, 3, 32, 32), verbose=False, **kwargs)
    assert_untouched(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_is_pruned_on_cuda():
    model, data = small_resnet().cuda(), images()
    x = data[0][0][:2]                                                # on the CPU: moved to the model's device
    pruned, report = pruning_ir.prune(model, x, macs=0.5, data=data, loss=F.cross_entropy, rounds=2,
                                      return_report=True, verbose=False)
    assert all(p.is_cuda for p in pruned.parameters()) and all(p.is_cuda for p in model.parameters())
    assert macs(pruned, x.cuda()) <= 0.5 * macs(model, x.cuda()) and report.macs_ratio <= 0.5
    timed, timing = pruning_ir.prune(model, x, latency=0.5, return_report=True, verbose=False)
    assert timing.latency_before > 0 and next(timed.parameters()).is_cuda


ALL_MODELS = {**ZOO, **HF_ZOO}


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_every_zoo_model_meets_each_budget_without_data(name):
    """Data-free, every model of the test zoo (CNNs, ViTs, Hugging Face): each budget met, outputs keep
    their shapes, the caller's model untouched."""
    entry = ALL_MODELS[name]
    model, inputs = entry.build().eval(), entry.example_inputs()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(*inputs)
    budgets = ({"macs": 0.6}, {"params": 0.7}, {"ratio": 0.3})
    if name in ("mobilenet_v2", "resnet50"):   # the largest: one budget keeps the suite short (the others share code)
        budgets = budgets[:1]
    for budget in budgets:
        pruned = pruning_ir.prune(model, inputs if len(inputs) > 1 else inputs[0], **budget, verbose=False)
        kind, value = next(iter(budget.items()))
        if kind == "macs":
            assert macs(pruned, *inputs) <= value * macs(model, *inputs)
        elif kind == "params":
            assert parameter_count(pruned) <= value * parameter_count(model)
        else:
            assert parameter_count(pruned) < parameter_count(model)
        with torch.no_grad():
            got = pruned(*inputs)
        flat_expected = [t.shape for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
        flat_got = [t.shape for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
        assert flat_got == flat_expected, (name, budget)
    assert_untouched(model, before)


# With data: every zoo model (CNNs, ViTs, Hugging Face) once, the budgets spread over them so each kind
# runs on CNNs, ViTs and Hugging Face models; the costly knapsack budgets on the small models.
WITH_DATA = {"lenet": {"params": 0.7}, "conv1d_net": {"macs": 0.6}, "vit": {"macs": 0.6}, "bert": {"macs": 0.6},
             "llama": {"macs": 0.6}, "resnet18": {"ratio": 0.3}, "vit_mha": {"params": 0.7},
             "vit_separate_qkv": {"params": 0.7}, "gpt2": {"params": 0.7}, "resnet50": {"ratio": 0.3},
             "mobilenet_v2": {"ratio": 0.3}, "efficientnet": {"ratio": 0.3}, "shufflenet_v2": {"ratio": 0.3},
             "densenet": {"ratio": 0.3}, "unet": {"ratio": 0.3}}


def tiny_data(name: str, model: nn.Module, inputs: tuple) -> dict:
    """Two batches shaped like the example inputs, and how to score them: a regression to random
    targets of the output's shape (zoo models), the LM loss (GPT-2, LLaMA), or BERT's hidden states."""
    g = torch.Generator().manual_seed(7)
    x = inputs[0]
    batches = [torch.randn(x.shape, generator=g) if x.dtype.is_floating_point else
               torch.randint(1, VOCAB_SIZE, x.shape, generator=g) for _ in range(2)]
    if name == "bert":
        return {"data": batches, "forward": lambda m, ids: m(input_ids=ids).last_hidden_state.pow(2).mean()}
    if name in HF_ZOO:
        return {"data": batches, "forward": lm_loss}
    with torch.no_grad():
        shape = model(x).shape
    return {"data": [(b, torch.randn(shape, generator=g)) for b in batches], "loss": F.mse_loss}


def prunable_labels(model: nn.Module, inputs: tuple) -> int:
    return sum(len(g.classes) for g in PruningIR(model).infer_labels(*inputs).groups if g.prunable)


def test_every_zoo_model_has_a_budget_with_data():
    assert set(WITH_DATA) == set(ALL_MODELS)
    assert {kind for budget in WITH_DATA.values() for kind in budget} == {"macs", "params", "ratio"}


@pytest.mark.parametrize("name", sorted(WITH_DATA))
def test_every_zoo_model_meets_its_budget_with_data(name):
    """With data (2 batches, 2 rounds, least-squares reconstruction on): the budget met, outputs keep
    their shapes and stay finite, the caller's model untouched."""
    entry = ALL_MODELS[name]
    model, inputs = entry.build(), entry.example_inputs()
    kwargs = tiny_data(name, model, inputs)
    before = snapshot(model)
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(*inputs))
    budget = WITH_DATA[name]
    pruned = pruning_ir.prune(model, inputs[0], **budget, rounds=2, verbose=False, **kwargs)
    assert_untouched(model, before)
    assert type(pruned) is type(model) and pruned is not model
    kind, value = next(iter(budget.items()))
    if kind == "macs":
        assert macs(pruned, *inputs) <= value * macs(model, *inputs)
    elif kind == "params":
        assert parameter_count(pruned) <= value * parameter_count(model)
    else:  # about that share of every group's labels removed (whole labels, at least one kept per group)
        assert 0.25 <= 1 - prunable_labels(pruned, inputs) / prunable_labels(model, inputs) <= 0.35
    with torch.no_grad():
        got = torch.utils._pytree.tree_leaves(pruned(*inputs))
    assert [t.shape for t in got if isinstance(t, torch.Tensor)] == [t.shape for t in expected
                                                                      if isinstance(t, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in got if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_warnings_that_differ_only_in_numbers_are_one_note_the_last():
    model, data = small_resnet(), images()
    calls = []

    def forward(run, batch):
        calls.append(len(calls))
        warnings.warn(f"custom: call {len(calls)} of the hook", UserWarning)
        warnings.warn("custom: a fixed message", UserWarning)
        return F.cross_entropy(run(batch[0]), batch[1])

    _, report = pruning_ir.prune(model, data[0][0][:2], ratio=0.3, data=data, forward=forward, rounds=2,
                                 return_report=True, verbose=False)
    numbered = [note for note in report.notes if "of the hook" in note]
    assert len(calls) > 2 and numbered == [f"UserWarning: custom: call {len(calls)} of the hook "
                                           f"({len(calls)} similar warnings; the last shown)"]
    assert [note for note in report.notes if "fixed" in note] == [
        f"UserWarning: custom: a fixed message ({len(calls)} similar warnings; the last shown)"]
