"""Exactness and validity of pruning on the reference zoo and Hugging Face models."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_exact_pruning, assert_prunes_and_runs, tensors
from hf_models import HF_ZOO
from pruning_ir import PruningIR
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
