"""Exactness and validity of pruning on the reference zoo and Hugging Face models."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_exact_pruning, assert_prunes_and_runs, pick_labels, tensors
from hf_models import HF_ZOO
from pruning_ir import LossAwareCriterion, PruningIR
from zoo import ZOO

ALL = {**ZOO, **HF_ZOO}


@pytest.mark.parametrize("name", sorted(ALL))
def test_exact_pruning_of_dead_labels(name):
    entry = ALL[name]
    assert_exact_pruning(entry.build(), *entry.example_inputs(), fraction=0.4)


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_group_prunes_and_runs(name):
    entry = ALL[name]
    assert_prunes_and_runs(entry.build(), *entry.example_inputs(), fraction=0.5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_recorded_graph_reproduces_the_model(name):
    """The fx graph the tracer records runs as a GraphModule and computes the model's outputs:
    no op was missed or mis-wired."""
    entry = ALL[name]
    model, inputs = entry.build(), entry.example_inputs()
    ir = PruningIR(model).infer_labels(*inputs)
    assert any(group.prunable for group in ir.groups), ir.describe()
    replay = torch.fx.GraphModule(model, ir.graph)
    with torch.no_grad():
        recorded, direct = replay(*inputs), tensors(model(*inputs))
    assert len(recorded) == len(direct)
    for a, b in zip(recorded, direct):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_loss_aware_scores_every_model(name):
    """The default LossAwareCriterion (joint scores) on every model: each label of an exact
    group gets a finite score, exactly 0 where its channel was zeroed, and above 0 for most
    others; the outputs inside the context are those without it."""
    entry = ALL[name]
    model, inputs = entry.build(), entry.example_inputs()
    ir = PruningIR(model).infer_labels(*inputs)
    dead = pick_labels(ir, 0.25, seed=1)
    ir.zero_labels(dead)
    with torch.no_grad():
        expected = tensors(model(*inputs))
    with LossAwareCriterion(ir) as collector:
        outputs = tensors(collector(*inputs))
        sum((t.float() ** 2).mean() for t in outputs if t.is_floating_point()).backward()
    for a, b in zip(outputs, expected):
        torch.testing.assert_close(a.detach(), b)
    model.zero_grad(set_to_none=True)
    scored = [label for group in ir.groups if group.exact for label in group.labels]
    dead_ids = {label.class_id for label in dead}
    assert dead and all(label.score == 0.0 for label in dead)
    alive = [label.score for label in scored if label.class_id not in dead_ids]
    assert all(math.isfinite(score) and score >= 0 for score in alive)
    assert sum(score > 0 for score in alive) >= 0.5 * len(alive), ir.describe()
