"""Hand-written multi-head attention: q, k and v heads form one group, in every head layout.

Swept over head count x head size in {2, 3, 4, 8}^2 (``num_heads == head_dim`` once broke the
head-count binding) and the layouts of tests/reference_patterns.py (separate q/k/v with
``view(B, L, self.num_heads, -1)``, fused ``reshape(B, L, 3, self.n_att, self.head_dim)`` with a
head-count attribute of an unknown name, separate with both sizes unknown attributes, MaxViT's
per-head interleaved qkv). Each must tie head h of q, k and v, prune exactly and run.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pruning_ir import PruningIR, UniformLabelSelector
from reference_patterns import ATTENTION_LAYOUTS, attention_entry, qkv_parameters
from test_reference_patterns import check_exact, check_prunes_everything

SIZES = (2, 3, 4, 8)
SWEEP = [(h, d, layout) for layout in ATTENTION_LAYOUTS for h, d in itertools.product(SIZES, SIZES)]


def qkv_classes(ir: PruningIR) -> list[np.ndarray]:
    """The classes of q's, k's and v's output channels."""
    ir.groups  # builds group_of_class
    found = []
    for name, rows in qkv_parameters(ir.model):
        binding = next(b for b in ir.index.parameter_bindings if b.target.name == name and b.target.dim == 0)
        found.append(binding.classes[rows])
    return found


@pytest.mark.parametrize("num_heads,head_dim,layout", SWEEP)
def test_qkv_heads_are_one_group_and_prune_exactly(num_heads, head_dim, layout):
    entry = attention_entry(num_heads, head_dim, layout)
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    q, k, v = qkv_classes(ir)
    assert np.array_equal(q, k) and np.array_equal(q, v), "head h of q, k and v must be one label"
    groups = set(ir.index.group_of_class[np.concatenate([q, k, v])].tolist())
    assert len(groups) == 1
    group = ir.groups[groups.pop()]
    assert len(group.classes) == num_heads and group.exact, ir.describe()
    pruned = check_exact(entry, 0.5, seed=num_heads * 10 + head_dim)
    attention = pruned.model.attn
    kept_heads = getattr(attention, "num_heads", None) or attention.n_att
    assert kept_heads < num_heads
    assert (getattr(attention, "head_dim", None) or attention.d_att) == head_dim


@pytest.mark.parametrize("num_heads,head_dim,layout", [(h, d, layout) for layout in ATTENTION_LAYOUTS
                                                        for h, d in ((2, 2), (3, 3), (4, 8), (8, 4))])
def test_attention_prunes_everything_and_runs(num_heads, head_dim, layout):
    check_prunes_everything(attention_entry(num_heads, head_dim, layout), UniformLabelSelector(0.5))
