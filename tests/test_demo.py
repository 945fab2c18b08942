"""`make demo` in its quick mode, and batch-norm re-estimation (and batch statistics) on the digits task."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pruning_ir import (LossAwareCriterion, MagnitudeCriterion, PruningIR, UniformLabelSelector, batch_statistics,
                        load_pruned, tune_batchnorm_statistics)
from pruning_ir.demo.digits import DigitsResNet, accuracy, batches, build_model, digits_data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    environment = {**os.environ, "PYTHONPATH": ROOT, "PRUNING_IR_DEMO_QUICK": "1"}
    done = subprocess.run([sys.executable, "-m", "pruning_ir.cli", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_demo_meets_half_the_macs_and_keeps_accuracy(demo_output):
    out, stdout = demo_output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True
    assert summary["after"]["macs"] <= summary["macs_target"] <= 0.5 * summary["before"]["macs"] + 1
    assert summary["after"]["parameters"] < summary["before"]["parameters"]
    assert summary["after"]["accuracy"] > 0.8
    # the four steps refit the layers that read removed channels: accurate right after pruning
    assert summary["accuracy_path"]["pruned"] >= summary["before"]["accuracy"] - 0.05
    assert summary["accuracy_path"]["batchnorm_reestimated"] >= summary["accuracy_path"]["pruned"] - 0.02
    assert "| MACs per image |" in stdout and "test accuracy" in stdout


def test_demo_writes_report_chart_safe_model_and_ir(demo_output):
    out, _ = demo_output
    report = (out / "report.md").read_text()
    for section in ("| parameters |", "## Channels per dependency group", "## Knapsack iterations"):
        assert section in report
    assert (out / "channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    safe = load_pruned(DigitsResNet(), out / "pruned-model").eval()
    import dill
    ir = torch.load(out / "ir.pt", pickle_module=dill, weights_only=False)
    images = digits_data(0)[2][:32]
    with torch.no_grad():
        assert torch.equal(safe(images), ir.model.eval()(images))


def _pruned_digits_model() -> tuple[nn.Module, tuple]:
    x_train, y_train, x_test, y_test = digits_data(0)
    model = train(build_model(0), x_train, y_train, epochs=2)
    ir = PruningIR(model).infer_labels(x_train[:2])
    MagnitudeCriterion(ir).apply()
    pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir)).model
    return pruned, (x_train, y_train, x_test, y_test)


def test_batchnorm_reestimation_improves_a_pruned_model():
    pruned, (x_train, y_train, x_test, y_test) = _pruned_digits_model()
    weights = {name: p.clone() for name, p in pruned.named_parameters()}
    stale = accuracy(pruned, x_test, y_test)
    pruned.eval()
    tune_batchnorm_statistics(pruned, batches(x_train, y_train, 64, seed=None), verbose=False)
    assert accuracy(pruned, x_test, y_test) > stale + 0.05
    assert all(torch.equal(p, weights[name]) for name, p in pruned.named_parameters())
    assert not pruned.training and all(m.momentum == 0.1 for m in pruned.modules() if isinstance(m, nn.BatchNorm2d))


def test_batchnorm_reestimation_accepts_dict_batches_and_max_batches():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, images):
            return self.body(images)

    data = [{"images": torch.randn(8, 1, 6, 6) + 3.0} for _ in range(4)]
    tune_batchnorm_statistics(Wrapper(), data, max_batches=2, verbose=False)
    expected = torch.cat([model[0](batch["images"]) for batch in data[:2]]).mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected.detach(), atol=1e-5, rtol=1e-5)
    assert model[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize("verbose", [False, True])
def test_batchnorm_reestimation_iterates_the_loader_once(verbose):
    """A DataLoader is iterated once per re-estimation (tqdm.auto alone would call iter() twice)."""
    model, passes = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), []

    class Loader:
        def __iter__(self):
            passes.append(1)
            return iter([torch.randn(8, 1, 6, 6) for _ in range(3)])

    tune_batchnorm_statistics(model, Loader(), verbose=verbose)
    assert len(passes) == 1 and model[1].num_batches_tracked.item() == 3


def test_failed_reestimation_keeps_the_old_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batch"):
        tune_batchnorm_statistics(model, [], verbose=False)
    with pytest.raises(RuntimeError):
        tune_batchnorm_statistics(model, [torch.randn(2, 1, 6, 6), torch.randn(2, 7, 6, 6)], verbose=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _normed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(64, 3))
    model[1].running_mean.fill_(0.3)
    model[1].running_var.fill_(2.0)
    return model.eval()


def test_batch_statistics_normalizes_with_the_batch_and_restores_everything():
    model = _normed_model()
    inputs = torch.randn(8, 1, 6, 6) + 2.0
    before = copy.deepcopy(model.state_dict())
    features = model[0](inputs)
    expected = (features - features.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        features.var((0, 2, 3), unbiased=False, keepdim=True) + model[1].eps)
    expected = expected * model[1].weight[:, None, None] + model[1].bias[:, None, None]
    with batch_statistics(model) as inside:
        assert inside is model and model[1].training and not model[3].training and not model.training
        torch.testing.assert_close(model[1](features), expected, atol=1e-5, rtol=1e-5)
        first, second = model(inputs), model(inputs)
        torch.testing.assert_close(first, second, atol=0, rtol=0)  # dropout stays off, statistics are the batch's
    assert not model[1].training
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not torch.allclose(model(inputs), first)  # eval mode again: the running statistics


def test_batch_statistics_restores_after_an_error_and_under_loss_aware_scoring():
    model = _normed_model()
    model[1].train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError), batch_statistics(model):
        model(torch.randn(2, 7, 6, 6))
    assert model[1].training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    ir = PruningIR(model).infer_labels(torch.randn(1, 1, 6, 6))
    with batch_statistics(model), LossAwareCriterion(ir) as collector:
        for _ in range(3):
            collector(torch.randn(8, 1, 6, 6)).logsumexp(1).mean().backward()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    scores = [label.score for group in ir.label_groups() for label in group]
    assert scores and all(score > 0 for score in scores)
