"""``LossAwareCriterion(keep_gradients=False)`` computes no gradient that no gate reads.

An LLM's embedding and output layer (vocabulary x hidden each) are read by no gate: while the
context is open they stop requiring gradients, so backward never builds their (transient,
model-sized) gradients; activations still get theirs, the scores are those of
``keep_gradients=True`` (``test_activation_criterion``), and every flag is restored on exit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import HF_ZOO  # noqa: E402
from pruning_ir import LossAwareCriterion, PruningIR  # noqa: E402


def test_ungated_parameters_need_no_gradient_while_the_context_is_open():
    entry = HF_ZOO["llama"]
    (input_ids,) = entry.example_inputs()
    model = entry.build()
    model.model.norm.weight.requires_grad_(False)  # the user's own frozen parameter stays frozen
    seen = {}

    def record(module, args, output):
        seen["embedding_weight"] = module.weight.requires_grad

    handle = model.model.embed_tokens.register_forward_hook(record)
    ir = PruningIR(model)
    with LossAwareCriterion(ir, keep_gradients=False) as collector:
        collector(input_ids=input_ids, labels=input_ids).loss.backward()
        assert not model.lm_head.weight.requires_grad
        assert any(p.requires_grad for p in model.parameters())  # the gated weights still do
    handle.remove()
    assert seen == {"embedding_weight": False}
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "model.norm.weight")
    assert not model.model.norm.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert any(label.score > 0 for label in ir.labels())
    with LossAwareCriterion(ir, keep_gradients=True) as collector:
        collector(input_ids=input_ids, labels=input_ids).loss.backward()
        assert model.lm_head.weight.requires_grad
