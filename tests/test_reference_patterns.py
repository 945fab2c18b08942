"""Every reference pattern (tests/reference_patterns.py) prunes into a model that runs and is exact.

(a) exactness: a share of every exact group's labels is zeroed, exactly those are pruned
(``verify=False``: the safety net in prune() would hide a wrong rule), and the outputs must
equal the zeroed model's; (b) pruning everything uniformly or globally at 0.5 on an unscored
IR gives a model that runs on its example input with the same output shapes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import parameter_count, pick_labels, tensors
from pruning_ir import GlobalScoreLabelSelector, PruningIR, UniformLabelSelector
from reference_patterns import PATTERNS


def check_exact(entry, fraction: float = 0.5, seed: int = 0) -> PruningIR:
    """Zero a share of the exact labels, prune them without verification, compare outputs (1e-5)."""
    model, inputs = entry.build(), entry.example_inputs()
    ir = PruningIR(model).infer_labels(*inputs)
    labels = pick_labels(ir, fraction, seed)
    assert labels, f"no exact prunable labels:\n{ir.describe()}"
    ir.zero_labels(labels)
    with torch.no_grad():
        reference = tensors(model(*inputs))
    pruned = ir.prune(labels=labels, verify=False)
    assert parameter_count(pruned.model) < parameter_count(model)
    with torch.no_grad():
        outputs = tensors(pruned.model(*inputs))
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    return pruned


def check_prunes_everything(entry, selector) -> PruningIR:
    """Prune what ``selector`` picks on an unscored IR, unverified; the model must run unchanged in shape."""
    model, inputs = entry.build(), entry.example_inputs()
    ir = PruningIR(model).infer_labels(*inputs)
    with torch.no_grad():
        shapes = [t.shape for t in tensors(model(*inputs))]
    labels = selector.select(ir)
    assert labels, f"{type(selector).__name__} selected nothing:\n{ir.describe()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = ir.prune(labels=labels, verify=False)
    with torch.no_grad():
        assert [t.shape for t in tensors(pruned.model(*inputs))] == shapes
    return pruned


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("fraction,seed", [(0.5, 0), (0.3, 1)])
def test_pattern_prunes_exactly(name, fraction, seed):
    check_exact(PATTERNS[name], fraction, seed)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("selector", [UniformLabelSelector(0.5), GlobalScoreLabelSelector(0.5)],
                         ids=["uniform", "global"])
def test_pattern_prunes_everything_and_runs(name, selector):
    check_prunes_everything(PATTERNS[name], selector)


def test_verified_prune_keeps_every_selected_group():
    """The safety net in prune() never has to step in on these patterns: the rules are right."""
    for name, entry in PATTERNS.items():
        ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
        labels = UniformLabelSelector(0.5).select(ir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ir.prune(labels=labels)
        assert not [w for w in caught if "keep their labels" in str(w.message)], name


@pytest.mark.parametrize("name", ["swin-v1", "swin-v2", "maxvit", "coatnet"])
def test_relative_position_bias_follows_heads(name):
    """The bias table's head dimension is sliced with the heads."""
    entry = PATTERNS[name]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    tables = [p for g in ir.groups if g.prunable for p in g.parameters
              if "relative_position_bias_table" in p or "cpb_mlp.2.weight[0]" in p]
    assert tables, ir.describe()


def test_pvt_spatial_reduction_ties_the_token_width():
    """``sr(x).reshape(B, C, -1)`` with C read from the tokens: sr's channels go with the tokens'."""
    entry = PATTERNS["pvt-v2"]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    group = next(g for g in ir.groups if "attn.sr.weight[0]" in g.parameters)
    assert "patch_embed.weight[0]" in group.parameters and group.prunable


@pytest.mark.parametrize("name,parameter", [("cspnet", "stage.conv_exp.0.weight[0]"),
                                            ("yolov8-split", "c2f1.cv1.0.weight[0]")])
def test_split_sizes_from_attributes_follow_pruning(name, parameter):
    """``x.split(self.expand_chs // 2, 1)`` and ``x.split((self.c, self.c), 1)`` bind the attribute
    instead of pinning the split channels."""
    entry = PATTERNS[name]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    group = next(g for g in ir.groups if parameter in g.parameters)
    assert group.prunable and not group.unprunable_reasons, ir.describe()
