"""Gradual pruning: schedules against their formulas, soft masks through training, finalize,
identity, state round trips, every criterion, and a latency-target schedule."""

from __future__ import annotations

import copy
import functools
import io
import itertools
import warnings

import dill
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

from pruning_ir import (GlobalScoreLabelSelector, GradualPruner, KnapsackLabelSelector, LossAwareCriterion,
                        MagnitudeCriterion, PruningIR, PruningIRError, RandomCriterion, UniformLabelSelector, bind)
from pruning_ir.gradual import CubicSchedule, LinearSchedule, StaticSchedule, make_schedule
from pruning_ir.latency import macs
from pruning_ir.masking import plain_forward, plain_parameters


class SmallNet(nn.Module):
    """conv-bn stem, a residual block, a strided conv, a classifier: four prunable groups."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.down, self.down_bn = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.down_bn(self.down(x)))
        return self.fc(x.mean((2, 3)))


class FunctionalHead(nn.Module):
    """The parent reads ``proj.weight`` in its own forward without calling ``proj``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return F.linear(x, self.proj.weight, self.proj.bias)


def data(seed: int = 0, n: int = 32, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def build(seed: int = 0, cls=SmallNet) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


def train_steps(model, optimizer, pruner=None, steps: int = 10, seed: int = 0):
    model.train()
    for step in range(steps):
        x, y = data(seed * 1000 + step)
        optimizer.zero_grad()
        F.cross_entropy((pruner or model)(x), y).backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()


def masked_positions(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(effective tensor, mask) of every masked tensor, recomputed from ``<name>_orig``."""
    found = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                found.append((hook.apply_mask(module), getattr(module, hook._tensor_name + "_mask")))
    return found


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# -- schedules ----------------------------------------------------------------------------------
def test_gradual_schedule_follows_n2d2_steps():
    start, threshold, gamma, stepsize = 0.1, 0.5, 0.15, 7
    schedule = LinearSchedule(threshold=threshold, start=start, gamma=gamma, stepsize=stepsize)
    expected, ratio, updates = [], 0.0, []
    for step in range(80):  # simulate N2D2: first update masks `start`, each next adds gamma, clipped
        if step > 0 and step % stepsize == 0 and ratio < threshold:
            ratio = start if not updates else min(ratio + gamma, threshold)
            updates.append(step)
        expected.append(ratio)
    assert [schedule.ratio_at(t) for t in range(80)] == pytest.approx(expected, abs=1e-12)
    assert [t for t in range(80) if schedule.is_update(t)] == updates == [7, 14, 21, 28]
    assert schedule.final_ratio == threshold and schedule.last_update == 28
    assert StaticSchedule(threshold=0.3, stepsize=5).ratio_at(4) == 0 and StaticSchedule(0.3, 5).ratio_at(5) == 0.3


def test_agp_schedule_follows_cubic_formula():
    s_i, s_f, t0, t_end, frequency = 0.05, 0.6, 3, 20, 4
    schedule = CubicSchedule(threshold=s_f, start=s_i, start_step=t0, end_step=t_end, frequency=frequency)
    updates = [3, 7, 11, 15, 19, 20]
    assert [t for t in range(40) if schedule.is_update(t)] == updates
    for t in range(40):
        done = [u for u in updates if u <= t]
        want = 0.0 if not done else s_f + (s_i - s_f) * (1 - (done[-1] - t0) / (t_end - t0)) ** 3
        assert schedule.ratio_at(t) == pytest.approx(want, abs=1e-12), t
    assert schedule.ratio_at(t0) == pytest.approx(s_i) and schedule.ratio_at(t_end) == pytest.approx(s_f)


@pytest.mark.parametrize("mode, options, error", [
    ("gradual", dict(start=0.6, threshold=0.5), ValueError),
    ("agp", dict(start=0.6, threshold=0.5, end_step=10), ValueError),
    ("gradual", dict(threshold=0.5, stepsize=0), ValueError),
    ("gradual", dict(threshold=0.5, stepsize=-3), ValueError),
    ("static", dict(threshold=0.5, stepsize=0), ValueError),
    ("agp", dict(threshold=0.5, end_step=10, frequency=0), ValueError),
    ("agp", dict(threshold=0.5, start_step=10, end_step=10), ValueError),
    ("gradual", dict(threshold=1.0), ValueError),
    ("gradual", dict(threshold=0.5, start=-0.1), ValueError),
    ("static", dict(threshold=1.5), ValueError),
    ("gradual", dict(threshold=0.5, gamma=0.0), ValueError),
    ("agp", dict(threshold=0.5, end_step=10, gamma=0.1), TypeError),
    ("shrink", dict(threshold=0.5), ValueError),
])
def test_bad_schedules_are_refused(mode, options, error):
    with pytest.raises(error):
        make_schedule(mode, **options)
    ir = PruningIR(build()).infer_labels(data()[0])
    with pytest.raises(error):
        GradualPruner(ir, mode=mode, criterion=RandomCriterion, **options)


def test_threshold_required_and_step_after_finalize():
    model = build()
    ir = PruningIR(model).infer_labels(data()[0])
    with pytest.raises(TypeError, match="threshold"):
        GradualPruner(ir, mode="gradual")
    pruner = GradualPruner(ir, mode="static", threshold=0.5, stepsize=2, criterion=MagnitudeCriterion)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.01), pruner, steps=2)
    pruner.finalize()
    with pytest.raises(PruningIRError, match="finalized"):
        pruner.step()


# -- soft masks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd", "adam"])
def test_masked_channels_stay_exactly_zero_through_training(optimizer):
    model = build()
    x, _ = data()
    ir = PruningIR(model).infer_labels(x)
    optimizer = optimizer(model.parameters())  # built before masking: it keeps training the same tensors
    train_steps(model, optimizer, steps=3)  # momentum and Adam state from before the masks
    labels = UniformLabelSelector(0.5).select(ir)
    ir.mask(labels)
    train_steps(model, optimizer, steps=6, seed=1)
    found = masked_positions(model)
    assert found and sum(int((mask == 0).sum()) for _, mask in found) > 0
    for effective, mask in found:
        assert torch.equal(effective[mask == 0], torch.zeros_like(effective[mask == 0]))
    activations = {}
    handle = model.stem_bn.register_forward_hook(lambda m, i, o: activations.update(stem=o))
    outputs(model, x)
    handle.remove()
    stem_group = next(g for g in ir.groups if "stem" in g.modules)
    dead = [label.channel for label in labels if label.group is stem_group]
    assert dead and torch.count_nonzero(activations["stem"][:, dead]) == 0
    reference = outputs(model, x)
    pruned = ir.prune(labels=ir.masked_labels())
    torch.testing.assert_close(outputs(pruned.model, x), reference, atol=1e-5, rtol=0)


def test_mask_unmask_restores_the_original_model():
    model = build()
    x, _ = data()
    ir = PruningIR(model).infer_labels(x)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    order = [name for name, _ in model.named_parameters()]
    reference = outputs(model, x)
    labels = UniformLabelSelector(0.5).select(ir)
    ir.mask(labels)
    assert torch_prune.is_pruned(model)
    assert set(ir.masked_labels()) == set(labels)
    assert "stem.weight_orig" in model.state_dict() and "stem.weight_mask" in model.state_dict()
    assert [name.replace("_orig", "") for name, _ in model.named_parameters()] == order
    assert not torch.allclose(outputs(model, x), reference)
    ir.mask(labels[: len(labels) // 2])  # masks move: same layout, fewer zeros
    assert set(ir.masked_labels()) == set(labels[: len(labels) // 2])
    ir.unmask()
    assert not torch_prune.is_pruned(model) and ir.masked_labels() == []
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert [name for name, _ in model.named_parameters()] == order
    assert torch.equal(outputs(model, x), reference)


def _masked_after_backward(selector):
    """A model masked with ``selector``'s labels after one backward pass (its masked tensors are
    then non-leaf, which deepcopy and pickling must handle), with its input and outputs."""
    model = build()
    x, y = data()
    ir = PruningIR(model).infer_labels(x)
    ir.mask(selector.select(ir))
    model.train()
    F.cross_entropy(model(x), y).backward()
    return model, x, ir, outputs(model, x)


def test_prune_of_masked_ir_copies_bakes_and_keeps_the_original_masked():
    model, x, ir, reference = _masked_after_backward(UniformLabelSelector(0.4))
    pruned = ir.prune(labels=ir.masked_labels())
    assert not torch_prune.is_pruned(pruned.model) and pruned.masked_labels() == []
    assert torch_prune.is_pruned(model)
    torch.testing.assert_close(outputs(pruned.model, x), reference, atol=1e-5, rtol=0)
    partial = ir.prune(labels=ir.masked_labels()[:3])  # masked but kept labels stay zero in the result
    torch.testing.assert_close(outputs(partial.model, x), reference, atol=1e-5, rtol=0)
    in_place = ir.prune(labels=ir.masked_labels(), inplace=True)
    assert in_place.model is model and not torch_prune.is_pruned(model)
    torch.testing.assert_close(outputs(model, x), reference, atol=1e-5, rtol=0)


def test_existing_torch_pruning_is_combined_and_restored():
    model = build()
    x, _ = data()
    torch_prune.l1_unstructured(model.conv1, "weight", amount=0.3)
    foreign_mask = model.conv1.weight_mask.clone()
    foreign_hook = next(iter(model.conv1._forward_pre_hooks.values()))
    ir = PruningIR(model).infer_labels(x)
    labels = UniformLabelSelector(0.5).select(ir)
    ir.mask(labels)
    combined = model.conv1.weight_mask
    assert torch.all(combined <= foreign_mask) and (combined < foreign_mask).any()
    ir.unmask()
    assert torch.equal(model.conv1.weight_mask, foreign_mask)
    assert next(iter(model.conv1._forward_pre_hooks.values())) is foreign_hook


def test_functional_use_outside_the_module_sees_current_masked_values():
    model = build(cls=FunctionalHead)
    x, y = data(classes=4)
    ir = PruningIR(model).infer_labels(x)
    labels = UniformLabelSelector(0.5).select(ir)
    ir.mask(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert model.proj.weight_orig.grad is not None and model.proj.weight_orig.grad.abs().sum() > 0
        optimizer.step()
    expected = model.proj.weight_orig.detach() * model.proj.weight_mask
    model(x)
    assert torch.equal(model.proj.weight.detach(), expected)


def test_dill_round_trip_of_a_masked_ir():
    model, x, ir, reference = _masked_after_backward(GlobalScoreLabelSelector(0.3))
    buffer = io.BytesIO()
    torch.save(ir, buffer, pickle_module=dill)
    buffer.seek(0)
    loaded = torch.load(buffer, pickle_module=dill, weights_only=False)
    assert torch_prune.is_pruned(loaded.model)
    assert [(lb.group.id, lb.channel) for lb in loaded.masked_labels()] == \
        [(lb.group.id, lb.channel) for lb in ir.masked_labels()]
    torch.testing.assert_close(outputs(loaded.model, x), reference, atol=0, rtol=0)
    pruned = loaded.prune(labels=loaded.masked_labels())
    torch.testing.assert_close(outputs(pruned.model, x), reference, atol=1e-5, rtol=0)
    loaded.unmask()
    assert not torch_prune.is_pruned(loaded.model)


# -- the pruner ---------------------------------------------------------------------------------
def test_finalize_equals_the_masked_model_and_is_smaller():
    model = build()
    x, _ = data()
    ir = PruningIR(model)
    pruner = GradualPruner(ir, UniformLabelSelector, mode="gradual", start=0.2, threshold=0.5, gamma=0.15,
                           stepsize=3, verbose=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train_steps(model, optimizer, pruner, steps=12)
    assert [u.step for u in pruner.history] == [3, 6, 9]
    assert [u.ratio for u in pruner.history] == pytest.approx([0.2, 0.35, 0.5])
    counts = [u.masked for u in pruner.history]
    assert counts == sorted(counts) and counts[-1] == len(UniformLabelSelector(0.5).select(ir))
    reference = outputs(model, x)
    small = pruner.finalize()
    torch.testing.assert_close(outputs(small, x), reference, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 2
    assert pruner.finalize() is small


def test_finalize_carries_the_training_optimizer():
    """finalize(optimizer=) moves the optimizer off the masked tensors: training the small model on
    goes exactly as training the masked one would (momentum and weight decay included)."""
    model = build()
    ir = PruningIR(model)
    pruner = GradualPruner(ir, UniformLabelSelector, mode="gradual", start=0.2, threshold=0.5, gamma=0.15,
                           stepsize=3, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train_steps(model, optimizer, pruner, steps=12)
    x, _ = data()
    outputs(model, x)  # recompute the masked weights outside autograd, so that the model can be copied
    masked_model, masked_optimizer = copy.deepcopy((model, optimizer))
    small = pruner.finalize(optimizer=optimizer)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in small.parameters()}
    train_steps(small, optimizer, steps=3, seed=1)
    train_steps(masked_model, masked_optimizer, steps=3, seed=1)
    torch.testing.assert_close(outputs(small, x), outputs(masked_model, x), atol=1e-5, rtol=1e-4)


def test_identity_changes_nothing():
    model = build()
    x, _ = data()
    ir = PruningIR(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reference = copy.deepcopy(model)
    pruner = GradualPruner(ir, mode="identity")
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), pruner, steps=4)
    train_steps(reference, torch.optim.SGD(reference.parameters(), lr=0.1), steps=4)
    assert not torch_prune.is_pruned(model) and pruner.history == [] and pruner.ratio == 0
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(state[k], before[k]) for k in before)  # it did train
    small = pruner.finalize()
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), state.values()))
    assert pruner._scorer is None  # nothing was scored: no criterion hooks on the model


@pytest.mark.parametrize("criterion", [LossAwareCriterion, functools.partial(LossAwareCriterion,
                                       implementation="activations"), MagnitudeCriterion, RandomCriterion],
                         ids=["loss_aware", "loss_aware_activations", "magnitude", "random"])
def test_every_criterion_drives_the_masks(criterion):
    model = build()
    x, _ = data()
    ir = PruningIR(model).infer_labels(x)
    pruner = GradualPruner(ir, GlobalScoreLabelSelector, criterion=criterion, mode="agp", start=0.1,
                           threshold=0.4, start_step=2, end_step=8, frequency=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), pruner, steps=8)
    assert [u.step for u in pruner.history] == [2, 4, 6, 8]
    assert len(ir.masked_labels()) == round(0.4 * len(ir.labels()))
    reference = outputs(model, x)
    torch.testing.assert_close(outputs(pruner.finalize(), x), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["auto", "activations"])
def test_loss_aware_scores_on_masked_model_equal_a_zeroed_copy(implementation):
    model = build()
    x, y = data()
    ir = PruningIR(model).infer_labels(x)
    zeroed = copy.deepcopy(model)
    zeroed_ir = PruningIR(zeroed).infer_labels(x)
    zeroed_ir.zero_labels(UniformLabelSelector(0.4).select(zeroed_ir))
    with LossAwareCriterion(zeroed_ir, implementation=implementation) as collector:
        for _ in range(2):
            F.cross_entropy(collector(x), y).backward()
    ir.mask(UniformLabelSelector(0.4).select(ir))
    with plain_parameters(model):
        collector = LossAwareCriterion(ir, implementation=implementation).__enter__()
    for _ in range(2):
        with plain_forward(model):
            out = collector(x)
        F.cross_entropy(out, y).backward()
    collector.__exit__(None, None, None)
    np.testing.assert_allclose(ir._index.class_scores, zeroed_ir._index.class_scores, rtol=1e-6, atol=1e-12)
    assert torch_prune.is_pruned(model) and "conv1.weight_orig" in dict(model.named_parameters())


@pytest.mark.parametrize("criterion", [LossAwareCriterion, MagnitudeCriterion], ids=["loss_aware", "magnitude"])
def test_masked_channels_score_zero_so_masks_stay_even_when_free_to_move(criterion):
    model = build()
    ir = PruningIR(model).infer_labels(data()[0])
    pruner = GradualPruner(ir, UniformLabelSelector, criterion=criterion, mode="gradual", start=0.2,
                           threshold=0.6, gamma=0.2, stepsize=2, monotone=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sets, zero_scored = [], []
    for _ in range(3):
        train_steps(model, optimizer, pruner, steps=2)
        if sets:  # the labels masked before this update were scored exactly 0 at it
            zero_scored.append(all(ir._index.class_scores[c] == 0 for c in sets[-1]))
        sets.append({label.class_id for label in ir.masked_labels()})
    assert zero_scored == [True, True]
    assert sets[0] < sets[1] < sets[2]


def test_monotone_keeps_masks_and_free_masks_move():
    seeds = itertools.count()

    def run(monotone: bool) -> list[set]:
        model = build()
        ir = PruningIR(model).infer_labels(data()[0])
        fresh_seed = lambda ir: RandomCriterion(ir, seed=next(seeds))  # noqa: E731 - new scores each update
        pruner = GradualPruner(ir, UniformLabelSelector, criterion=fresh_seed, mode="gradual", start=0.2,
                               threshold=0.6, gamma=0.2, stepsize=1, monotone=monotone)
        sets = []
        for _ in range(3):
            pruner.step()
            sets.append({(label.group.id, label.channel) for label in ir.masked_labels()})
        return sets

    kept = run(True)
    assert kept[0] < kept[1] < kept[2]
    moved = run(False)
    assert not (moved[0] <= moved[1] <= moved[2])


def test_state_dict_and_pickle_continue_the_same_run():
    def start():
        model = build()
        ir = PruningIR(model).infer_labels(data()[0])
        pruner = GradualPruner(ir, UniformLabelSelector, mode="gradual", start=0.2, threshold=0.6, gamma=0.2,
                               stepsize=4)
        return model, pruner, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, pruner, optimizer = start()
    train_steps(model, optimizer, pruner, steps=6)  # stops mid-window: 2 of the 4 batches scored
    checkpoint = io.BytesIO()
    torch.save({"pruner": pruner.state_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict()},
               checkpoint)
    pickled_model, pickled_pruner = dill.loads(dill.dumps((model, pruner)))  # optimizers do not pickle
    # the masked model lists its parameters in the unmasked order: the optimizer state fits
    pickled_optimizer = torch.optim.SGD(pickled_model.parameters(), lr=0.05, momentum=0.9)
    pickled_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    pickled = (pickled_model, pickled_pruner, pickled_optimizer)
    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    restarted, restarted_pruner, restarted_optimizer = start()
    restarted_pruner.load_state_dict(saved["pruner"])
    restarted.load_state_dict(saved["model"])
    restarted_optimizer.load_state_dict(saved["optimizer"])
    forgetful, forgetful_pruner, forgetful_optimizer = start()  # control: the window's sums not restored
    forgetful_pruner.load_state_dict(dict(saved["pruner"], scores=None))
    forgetful.load_state_dict(saved["model"])
    forgetful_optimizer.load_state_dict(saved["optimizer"])
    runs = [(model, pruner, optimizer), (restarted, restarted_pruner, restarted_optimizer), pickled,
            (forgetful, forgetful_pruner, forgetful_optimizer)]
    scores_at_8 = []
    for run_model, run_pruner, run_optimizer in runs:
        for step in range(6, 16):  # the same batches as an uninterrupted run
            run_model.train()
            x, y = data(step)
            run_optimizer.zero_grad()
            F.cross_entropy(run_pruner(x), y).backward()
            run_optimizer.step()
            if run_pruner.steps == 7:
                run_pruner._close_window()  # the scores the update at step 8 will use
                scores_at_8.append(run_pruner.ir._index.class_scores.copy())
                run_pruner._resume_scores = True
                run_pruner._open_window_if_due()
            run_pruner.step()
    np.testing.assert_allclose(scores_at_8[1], scores_at_8[0], rtol=1e-9, atol=0)
    np.testing.assert_allclose(scores_at_8[2], scores_at_8[0], rtol=1e-9, atol=0)
    assert not np.allclose(scores_at_8[3], scores_at_8[0], rtol=1e-3)
    runs = runs[:3]
    histories = [run_pruner.history for _, run_pruner, _ in runs]
    assert histories[0] == histories[1] == histories[2] and len(histories[0]) == 3
    keys = [[(lb.group.id, lb.channel) for lb in run_pruner.ir.masked_labels()] for _, run_pruner, _ in runs]
    assert keys[0] == keys[1] == keys[2]
    x, _ = data(99)
    torch.testing.assert_close(outputs(restarted, x), outputs(model, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs(pickled[0], x), outputs(model, x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="schedule"):
        GradualPruner(PruningIR(build()).infer_labels(x), mode="static", threshold=0.5).load_state_dict(
            saved["pruner"])


def test_knapsack_latency_target_schedule():
    model = build()
    x, _ = data()
    example = x[:1]
    ir = PruningIR(model).infer_labels(x)
    latency = bind(macs, example)
    full = latency(model)
    pruner = GradualPruner(ir, lambda target: KnapsackLabelSelector(target, latency, verbose=False),
                           criterion=MagnitudeCriterion, mode="gradual", start=0.2, threshold=0.5, gamma=0.15,
                           stepsize=2, latency_function=latency)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    measured, masked = [], []
    for _ in range(3):
        train_steps(model, optimizer, pruner, steps=2)
        masked.append(set(ir.masked_labels()))
        update = pruner.history[-1]
        assert update.target == pytest.approx((1 - update.ratio) * full)
        with plain_parameters(model):
            measured.append(latency(ir.prune(labels=ir.masked_labels()).model))
        assert measured[-1] <= update.target * 1.001
    assert [u.ratio for u in pruner.history] == pytest.approx([0.2, 0.35, 0.5])
    assert measured == sorted(measured, reverse=True) and measured[-1] >= 0.45 * full
    assert masked[0] < masked[1] < masked[2]  # monotone: each group keeps at least its masked labels
    small = pruner.finalize()
    assert latency(small) == pytest.approx(measured[-1])


def test_loss_aware_without_routed_batches_is_an_error():
    model = build()
    ir = PruningIR(model).infer_labels(data()[0])
    pruner = GradualPruner(ir, mode="static", threshold=0.5, stepsize=2)
    pruner.step()  # no batch ran through the pruner (nor any backward pass)
    with pytest.raises(PruningIRError, match="pruner\\(inputs\\)"):
        pruner.step()
