"""PruningIR's contract: copies, in-place pruning, label checks, saving, training, leaves, errors."""

from __future__ import annotations

import io

import dill
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

from helpers import assert_exact_pruning, parameter_count, pick_labels, tensors
from pruning_ir import (InvalidLabelsError, LabelsNotInferredError, ModelExecutionError, PruningIR, PruningIRError,
                        TracingError, UniformLabelSelector)
from random_arch import random_architectures
from zoo import ZOO


def resnet():
    entry = ZOO["resnet18"]
    return entry.build(), entry.example_inputs()


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def test_prune_does_not_touch_the_users_model():
    model, inputs = resnet()
    before, text = state_bytes(model), repr(model)
    ir = PruningIR(model).infer_labels(*inputs)
    pruned = ir.prune(labels=pick_labels(ir, 0.5))
    assert state_bytes(model) == before and repr(model) == text
    assert parameter_count(pruned.model) < parameter_count(model)


def test_tracing_keeps_train_eval_flags_and_statistics():
    model, inputs = resnet()
    model.train()
    model.layer1.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    statistics = state_bytes(model)
    PruningIR(model).infer_labels(*inputs)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert state_bytes(model) == statistics


def test_empty_labels_give_a_copy():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    copy = ir.prune(labels=[])
    assert copy.model is not model
    assert all(a is not b for a, b in zip(copy.model.parameters(), model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(copy.model(*inputs), model(*inputs))


def test_inplace_modifies_the_model_and_retires_the_ir():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    count = parameter_count(model)
    pruned = ir.prune(labels=pick_labels(ir, 0.5), inplace=True)
    assert pruned.model is model and parameter_count(model) < count
    with pytest.raises(PruningIRError, match="inplace=True"):
        ir.label_groups()
    with torch.no_grad():
        assert model(*inputs).shape == (2, 10)


def test_labels_from_another_ir_are_refused():
    model, inputs = resnet()
    first = PruningIR(model).infer_labels(*inputs)
    second = PruningIR(model).infer_labels(*inputs)
    with pytest.raises(InvalidLabelsError, match="another PruningIR"):
        second.prune(labels=first.label_groups()[0][:1])
    pruned = first.prune(labels=first.label_groups()[0][:1])
    with pytest.raises(InvalidLabelsError, match="another PruningIR"):
        pruned.prune(labels=first.label_groups()[1][:1])


def test_labels_that_empty_a_group_are_refused():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    with pytest.raises(InvalidLabelsError, match="would remove all"):
        ir.prune(labels=ir.label_groups()[0])
    with pytest.raises(InvalidLabelsError, match="Label objects"):
        ir.prune(labels=["conv1"])


def test_labels_not_inferred_error():
    model, _ = resnet()
    with pytest.raises(LabelsNotInferredError, match="infer_labels"):
        PruningIR(model).label_groups()


def test_labels_are_hashable_and_sorted_by_score():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    group = ir.label_groups()[0]
    assert len(set(group)) == len(group) and group[0] == group[0].group.labels[group[0].channel]
    ir.set_scores(lambda label: -label.channel)
    rescored = ir.label_groups()[0]
    assert [label.score for label in rescored] == sorted(label.score for label in rescored)
    assert rescored[0].channel == len(rescored) - 1
    ir.set_scores({rescored[0]: 5.0})
    assert rescored[0].score == 5.0
    with pytest.raises(ValueError, match="not finite"):
        ir.set_scores({rescored[0]: float("nan")})


def test_pruned_model_trains_saves_and_reloads():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    labels = pick_labels(ir, 0.4, seed=3)
    pruned = ir.prune(labels=labels).model
    pruned.train()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(pruned(*inputs), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in pruned.parameters())
    twin = ir.prune(labels=labels).model
    twin.load_state_dict(pruned.state_dict())
    pruned.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(*inputs), pruned(*inputs))


def test_dill_round_trip_and_iterative_pruning():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    pruned = ir.prune(labels=pick_labels(ir, 0.3))
    buffer = io.BytesIO()
    torch.save(pruned, buffer, pickle_module=dill)
    buffer.seek(0)
    loaded = torch.load(buffer, pickle_module=dill, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(*inputs), pruned.model(*inputs))
    # The loaded IR is scored and pruned again without re-tracing; exactness still holds.
    loaded.set_scores(lambda label: float(label.channel))
    labels = pick_labels(loaded, 0.3, seed=1)
    loaded.zero_labels(labels)
    with torch.no_grad():
        reference = loaded.model(*inputs)
    again = loaded.prune(labels=labels)
    assert parameter_count(again.model) < parameter_count(loaded.model)
    with torch.no_grad():
        torch.testing.assert_close(again.model(*inputs), reference, atol=1e-5, rtol=1e-4)


class WithCustomBlock(nn.Module):
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8) * 0.1)

        def forward(self, x):
            return torch.einsum("bchw,cd->bdhw", x, self.weight)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mixer = self.Mixer()
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.body(F.relu(self.mixer(self.stem(x))))))


def test_op_without_rule_is_a_barrier_with_reason():
    torch.manual_seed(0)
    model = WithCustomBlock()
    ir, _, _ = assert_exact_pruning(model, torch.randn(2, 3, 5, 5))
    stem = next(g for g in ir.groups if "stem" in g.modules)
    assert not stem.prunable and any("einsum" in r for r in stem.unprunable_reasons)
    assert next(g for g in ir.groups if "body" in g.modules and "head" in g.modules).prunable


@pytest.mark.parametrize("leaf", ["type", "instance", "leaf_module"])
def test_leaf_modules(leaf):
    torch.manual_seed(0)
    model = WithCustomBlock()
    argument = {"type": WithCustomBlock.Mixer, "instance": model.mixer,
                "leaf_module": PruningIR.LeafModule(model.mixer, prunable_input=False)}[leaf]
    ir = PruningIR(model, leaf_modules=[argument]).infer_labels(torch.randn(2, 3, 5, 5))
    assert any(node.op == "call_module" and node.target == "mixer" for node in ir.graph.nodes)
    stem = next(g for g in ir.groups if "stem" in g.modules)
    assert not stem.prunable
    reasons = " ".join(stem.unprunable_reasons)
    assert "leaf module 'mixer'" in reasons and "no channel rule" in reasons
    with pytest.raises(TypeError, match="leaf_modules"):
        PruningIR(model, leaf_modules=["mixer"])


def test_leaf_module_flags_pin_a_rule_based_leaf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 6, batch_first=True))
    free = PruningIR(model).infer_labels(torch.randn(2, 3, 4))
    assert any(g.prunable and "0" in g.modules for g in free.groups)
    pinned = PruningIR(model, leaf_modules=[PruningIR.LeafModule(model[2], prunable_input=False)])
    pinned.infer_labels(torch.randn(2, 3, 4))
    assert not any(g.prunable for g in pinned.groups)


class ThroughNumpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1))
        self.block.register_forward_pre_hook(lambda m, args: (torch.from_numpy(args[0].numpy().copy()),))

    def forward(self, x):
        return self.block(self.conv(x))


def test_strict_tracing_names_the_submodule():
    model = ThroughNumpy()
    with pytest.raises(TracingError, match="'block.0'"):
        PruningIR(model, soft_tracing=False).infer_labels(torch.randn(1, 3, 4, 4))
    ir = PruningIR(model).infer_labels(torch.randn(1, 3, 4, 4))
    conv = next(g for g in ir.groups if "conv" in g.modules)
    assert not conv.prunable  # its channels leave through numpy: never assumed to flow on


def test_model_that_cannot_run_on_the_input():
    model, _ = resnet()
    with pytest.raises(ModelExecutionError, match=r"failed on the example inputs .*\(2, 5, 32, 32\)"):
        PruningIR(model).infer_labels(torch.randn(2, 5, 32, 32))
    with pytest.raises(TypeError, match="nn.Module"):
        PruningIR("resnet")


def test_describe_names_modules_parameters_and_reasons():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    text = ir.describe()
    assert "prunable groups" in text and "conv1.weight[0]" in text and "reaches the model output" in text
    assert text.count("\ngroup ") == len(ir.groups)


def test_channel_counts_match_parameters():
    model, inputs = resnet()
    ir = PruningIR(model).infer_labels(*inputs)
    stem = next(g for g in ir.groups if "conv1.weight[0]" in g.parameters)
    assert stem.channel_count == model.conv1.out_channels == len(stem.classes)
    assert np.all(stem.scores == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_is_traced_and_pruned_on_cuda():
    model, inputs = resnet()
    model, inputs = model.cuda(), tuple(t.cuda() for t in inputs)
    ir, pruned, _ = assert_exact_pruning(model, *inputs)
    assert all(p.is_cuda for p in pruned.model.parameters())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_architectures())
def test_random_architectures_prune_exactly(sample):
    model, example = sample
    ir = PruningIR(model.eval()).infer_labels(example)
    with torch.no_grad():
        shapes = [t.shape for t in tensors(model(example))]
    labels = pick_labels(ir, 0.5, seed=len(ir.groups), exact_only=False)
    ir.zero_labels(labels)
    with torch.no_grad():
        reference = tensors(model(example))
    pruned = ir.prune(labels=labels)
    with torch.no_grad():
        outputs = tensors(pruned.model(example))
    assert [t.shape for t in outputs] == shapes
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


class _Router(nn.Module):
    """Branches on its input's values: one forward records only one of the two paths."""

    def __init__(self, channels: int):
        super().__init__()
        self.quiet = nn.Conv2d(channels, channels, 1)
        self.loud = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.loud(x) if x.abs().amax() > 10 else self.quiet(x)


class _RoutedNet(nn.Module):
    def __init__(self, with_aux_head: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.router = _Router(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.aux_head = nn.Linear(8, 4) if with_aux_head else None

    def forward(self, x):
        features = self.router(self.stem(x))
        if self.training and self.aux_head is not None:
            return self.head(features), self.aux_head(features.mean((2, 3)))
        return self.head(features)


def test_channels_around_a_path_the_trace_did_not_see_are_kept():
    torch.manual_seed(0)
    model = _RoutedNet().eval()
    quiet, loud = torch.randn(2, 3, 8, 8), 100 * torch.randn(2, 3, 8, 8)
    ir = PruningIR(model).infer_labels(quiet)
    stem_group = next(g for g in ir.groups if "stem" in g.modules)
    assert not stem_group.prunable
    assert any("router" in reason and "router.loud.weight" in reason for reason in stem_group.unprunable_reasons)
    labels = [label for group in ir.label_groups() for label in group[: len(group) // 2]]
    pruned = ir.prune(labels=labels).model
    with torch.no_grad():
        assert pruned(loud).shape == model(loud).shape


def test_parameters_of_never_called_modules_are_reported():
    model = _RoutedNet(with_aux_head=True).eval()
    with pytest.warns(UserWarning, match="aux_head.weight"):
        PruningIR(model).infer_labels(torch.randn(2, 3, 8, 8))


def test_prune_takes_the_labels_positionally_too():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    ir = PruningIR(model).infer_labels(torch.randn(1, 3, 7, 7))
    labels = UniformLabelSelector(0.5).select(ir)
    positional, keyword = ir.prune(labels), ir.prune(labels=labels)
    assert positional.model[0].out_channels == keyword.model[0].out_channels == 4
    assert ir.prune("main", labels=labels).model[0].out_channels == 4  # ENOT's snapshot name still works
    with pytest.raises(TypeError, match="labels twice"):
        ir.prune(labels, labels=labels)
    with pytest.raises(TypeError, match="needs the labels"):
        ir.prune()


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_a_torchscript_model_is_refused_with_a_reason(compile_):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    compiled = torch.jit.script(model) if compile_ == "script" else torch.jit.trace(model, torch.randn(1, 3, 7, 7))
    with pytest.raises(TypeError, match="TorchScript.*pass the original nn.Module"):
        PruningIR(compiled)
