"""measure_removal_costs: scores equal to measured loss curves, the model left as it was, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import LabelsNotInferredError, PruningIR, PruningIRError, tune_batchnorm_statistics
from pruning_ir.criteria import MagnitudeCriterion, RandomCriterion, measure_removal_costs
from zoo import ZOO, randomize_norms


class SmallResidualCNN(nn.Module):
    """Stem, one residual block and a linear head: a stream group (through the add) and an interior group."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def _cnn_task(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_norms(SmallResidualCNN()).eval()
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 4, (32,))
    return model, x, y


def _scored_ir(model, example, seed: int = 0) -> PruningIR:
    ir = PruningIR(model).infer_labels(example)
    RandomCriterion(ir, seed=seed).apply()
    return ir


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _reference_scores(increases: np.ndarray) -> np.ndarray:
    """Marginal costs on the lower convex envelope of ``increases`` (at 0..n-1), by brute force:
    the envelope at k is the lowest chord over pairs i <= k <= j; the last label scores at least the total."""
    n = len(increases)
    envelope = np.array([min(increases[i] + (increases[j] - increases[i]) * (k - i) / (j - i) if j > i
                             else increases[i] for i in range(k + 1) for j in range(k, n)) for k in range(n)])
    marginal = np.maximum(np.diff(envelope), 0.0)
    return np.append(marginal, max(envelope[-1] - envelope[0], marginal.max(initial=0.0)))


def _measured_on_pruned_copies(ir: PruningIR, loss, loader, counts) -> list[np.ndarray]:
    """The loss increase of removing each group's ``k`` lowest-scored labels, on pruned copies."""
    def measure(model):
        tune_batchnorm_statistics(model, loader, verbose=False)
        with torch.no_grad():
            return float(loss(model.eval()))

    base = measure(ir.prune(labels=[]).model)
    return [np.array([measure(ir.prune(labels=labels[:k]).model) - base for k in counts(len(labels))])
            for labels in ir.label_groups()]


def _assert_scores_match(ir: PruningIR, expected_increases: list[np.ndarray], counts) -> None:
    for labels, increases in zip(ir.label_groups(), expected_increases):
        n = len(labels)
        curve = np.interp(np.arange(n), counts(n), increases)
        scores = np.array([label.score for label in labels])
        np.testing.assert_allclose(scores, _reference_scores(curve), rtol=1e-4, atol=1e-6)
        assert np.all(np.diff(scores) > 0), "scores must rise strictly along the group's order"


def test_scores_are_the_measured_loss_curve_of_each_group():
    model, x, y = _cnn_task()
    ir = _scored_ir(model, x[:1])
    order = [[label.channel for label in labels] for labels in ir.label_groups()]
    loader = [x[:16], x[16:]]
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    curves = measure_removal_costs(ir, loss, batchnorm_loader=loader, points=16, verbose=False)

    every = lambda n: np.arange(n)  # noqa: E731  (points >= n - 1: every prefix is measured)
    assert [list(curve.removed_counts) for curve in curves] == [list(every(len(g))) for g in order]
    assert [[label.channel for label in labels] for labels in ir.label_groups()] == order
    expected = _measured_on_pruned_copies(ir, loss, loader, every)
    for curve, increases in zip(curves, expected):  # zeroing in place measured what pruning gives
        np.testing.assert_allclose(curve.loss_increase, increases, rtol=1e-4, atol=1e-6)
    _assert_scores_match(ir, expected, every)
    assert any(np.ptp(increases) > 1e-3 for increases in expected)  # the removals really move the loss


def test_a_coarse_grid_is_interpolated():
    model, x, y = _cnn_task(seed=1)
    ir = _scored_ir(model, x[:1], seed=1)
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    curves = measure_removal_costs(ir, loss, points=2, verbose=False)
    grid = lambda n: np.unique(np.rint(np.linspace(0, n - 1, 3)).astype(int))  # noqa: E731
    assert [list(curve.removed_counts) for curve in curves] == [[0, 4, 7], [0, 2, 5]]
    expected = [np.array(increases) for increases in (curve.loss_increase for curve in curves)]
    _assert_scores_match(ir, expected, grid)
    assert expected == [pytest.approx(e) for e in _measured_on_pruned_copies_no_bn(ir, loss, grid)]


def _measured_on_pruned_copies_no_bn(ir, loss, counts):
    with torch.no_grad():
        base = float(loss(ir.prune(labels=[]).model))
        return [np.array([float(loss(ir.prune(labels=labels[:k]).model)) - base for k in counts(len(labels))])
                for labels in ir.label_groups()]


def test_the_model_is_left_exactly_as_it_was_also_when_the_loss_fails():
    model, x, y = _cnn_task(seed=2)
    model.train()
    model.stem_bn.eval()
    flags = {name: module.training for name, module in model.named_modules()}
    ir = _scored_ir(model, x[:1], seed=2)
    before = _state(model)
    measure_removal_costs(ir, lambda m: F.cross_entropy(m(x), y), batchnorm_loader=[x], points=3, verbose=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert flags == {name: module.training for name, module in model.named_modules()}

    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("loss blew up")
        return F.cross_entropy(m(x), y)

    scores = [label.score for label in ir.labels()]
    with pytest.raises(RuntimeError, match="loss blew up"):
        measure_removal_costs(ir, failing, batchnorm_loader=[x], points=3, verbose=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert flags == {name: module.training for name, module in model.named_modules()}
    assert scores == [label.score for label in ir.labels()]  # no half-written scores


def test_a_generator_loader_is_read_once_and_a_loader_is_iterated_each_time():
    model, x, y = _cnn_task(seed=3)
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    results, passes = [], []

    class Loader:
        def __iter__(self):
            passes.append(1)
            return iter([x[:16], x[16:]])

    for loader in (Loader(), (batch for batch in [x[:16], x[16:]])):
        ir = _scored_ir(model, x[:1], seed=3)
        curves = measure_removal_costs(ir, loss, batchnorm_loader=loader, points=2, verbose=False)
        results.append(np.concatenate([curve.loss_increase for curve in curves]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-9)
    assert len(passes) == 1 + sum(len(curve.removed_counts) - 1 for curve in curves)


def test_one_evaluation_per_point_and_group_plus_the_unpruned_model():
    model, x, y = _cnn_task()
    ir = _scored_ir(model, x[:1])
    calls = []
    measure_removal_costs(ir, lambda m: calls.append(1) or F.cross_entropy(m(x), y), points=3, verbose=False)
    assert len(calls) == 1 + sum(min(3, len(labels) - 1) for labels in ir.label_groups())


def test_inexact_groups_are_measured_on_pruned_copies():
    entry = ZOO["vit"]
    model = entry.build()
    (image,) = entry.example_inputs()
    x = torch.randn(8, *image.shape[1:], generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    ir = PruningIR(model).infer_labels(image)
    MagnitudeCriterion(ir).apply()
    assert any(not labels[0].group.exact for labels in ir.label_groups())
    before = _state(model)
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    curves = measure_removal_costs(ir, loss, points=2, verbose=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    grid = lambda n: np.unique(np.rint(np.linspace(0, n - 1, 3)).astype(int))  # noqa: E731
    expected = _measured_on_pruned_copies_no_bn(ir, loss, grid)
    for curve, increases in zip(curves, expected):
        np.testing.assert_allclose(curve.loss_increase, increases, rtol=1e-4, atol=1e-6)
    _assert_scores_match(ir, expected, grid)


def test_bad_input_is_refused_with_the_reason():
    model, x, y = _cnn_task()
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    with pytest.raises(LabelsNotInferredError):
        measure_removal_costs(PruningIR(model), loss, verbose=False)
    ir = _scored_ir(model, x[:1])
    for points in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="points"):
            measure_removal_costs(ir, loss, points=points, verbose=False)
    assert len(measure_removal_costs(ir, loss, points=np.int64(2), verbose=False)) == 2  # numpy integers too
    with pytest.raises(TypeError, match="callable"):
        measure_removal_costs(ir, 1.0, verbose=False)
    with pytest.raises(ValueError, match="finite"):
        measure_removal_costs(ir, lambda m: float("nan"), verbose=False)
    with pytest.raises(ValueError, match="one number"):
        measure_removal_costs(ir, lambda m: m(x), verbose=False)
    ir.mask(ir.label_groups()[0][:1])
    with pytest.raises(PruningIRError, match="unmask"):
        measure_removal_costs(ir, loss, verbose=False)
    ir.unmask()
    with pytest.warns(RuntimeWarning, match="no scores"):
        measure_removal_costs(PruningIR(model).infer_labels(x[:1]), loss, points=1, verbose=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measures_on_cuda():
    model, x, y = _cnn_task()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    ir = _scored_ir(model, x[:1])
    before = _state(model)
    curves = measure_removal_costs(ir, lambda m: F.cross_entropy(m(x), y), batchnorm_loader=[x], verbose=False)
    assert all(np.isfinite(curve.loss_increase).all() for curve in curves)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
