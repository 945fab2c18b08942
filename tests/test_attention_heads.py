"""Hand-written multi-head attention: q, k and v heads form one group, in every head layout.

Swept over head count x head size in {2, 3, 4, 8}^2 (``num_heads == head_dim`` once broke the
head-count binding) and the layouts of tests/reference_patterns.py (separate q/k/v with
``view(B, L, self.num_heads, -1)``, fused ``reshape(B, L, 3, self.n_att, self.head_dim)`` with a
head-count attribute of an unknown name, separate with both sizes unknown attributes, MaxViT's
per-head interleaved qkv). Each must tie head h of q, k and v, prune exactly and run.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


class FalconGroupedHeads(nn.Module):
    """Falcon-40B's fused projection: key/value groups, each holding its query heads, then its key and its value
    head: ``view(B, L, -1, group_size + 2, self.head_dim)``, the group size written as the quotient
    ``self.num_heads // self.num_kv_heads`` or as the attribute ``self.num_key_value_groups``."""

    def __init__(self, quotient=True, num_heads=4, num_kv_heads=2, head_dim=4):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups, self.quotient = num_heads // num_kv_heads, quotient
        self.embed = nn.Linear(5, num_heads * head_dim)
        self.query_key_value = nn.Linear(num_heads * head_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.dense = nn.Linear(num_heads * head_dim, num_heads * head_dim)
        self.head = nn.Linear(num_heads * head_dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, L, _ = x.shape
        group_size = self.num_heads // self.num_kv_heads if self.quotient else self.num_key_value_groups
        grouped = self.query_key_value(x).view(B, L, -1, group_size + 2, self.head_dim)
        q, k, v = grouped.split([group_size, 1, 1], dim=3)
        q = q.reshape(B, L, -1, self.head_dim)
        k, v = (t.expand(B, L, self.num_kv_heads, group_size, self.head_dim).reshape(B, L, -1, self.head_dim)
                for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2)
        return self.head(x + self.dense(y.reshape(B, L, self.num_heads * self.head_dim)))


def _falcon_grouped(quotient: bool, unit: str = "query_heads"):
    torch.manual_seed(0)
    model = FalconGroupedHeads(quotient).eval()
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1))
    ir = PruningIR(model, gqa_unit=unit).infer_labels(x)
    group = next(g for g in ir.groups if "query_key_value" in g.modules and "embed" not in g.modules)
    return model, x, ir, group


def test_falcon_grouped_view_sized_by_a_quotient_of_attributes_is_pinned_with_its_reason():
    """A size computed by ``//`` from attributes is no literal that stays: the channels it sizes are kept, with a
    reason, rather than reported exact and then refused (or silently wrong) when pruned."""
    model, x, ir, group = _falcon_grouped(quotient=True, unit="kv_groups")
    assert not group.prunable
    assert any("computed from channel counts or module attributes" in r for r in group.unprunable_reasons), \
        ir.describe()
    labels = [label for g in ir.groups if g.prunable for label in g.labels[:len(g.labels) // 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group is refused at prune() time
        pruned = ir.prune(labels=labels).model
    assert (pruned.num_heads, pruned.num_kv_heads, pruned.head_dim) == (4, 2, 4)
    with torch.no_grad():
        assert pruned(x).shape == (2, 6, 3)


def test_falcon_grouped_view_sized_by_the_group_size_attribute_loses_whole_groups():
    """``view(B, L, -1, self.num_key_value_groups + 2, self.head_dim)``: with the ``kv_groups`` unit a label is a
    key/value group with its query heads, removed exactly; with ``query_heads`` the key/value heads are kept and
    the group size is fixed by the view, so nothing in the attention is prunable (and the IR says why)."""
    model, x, ir, group = _falcon_grouped(quotient=False, unit="kv_groups")
    assert group.exact and len(group.labels) == 2, ir.describe()
    ir.zero_labels(group.labels[:1])
    with torch.no_grad():
        zeroed = model(x)
    pruned = ir.prune(labels=group.labels[:1]).model
    assert (pruned.num_heads, pruned.num_kv_heads, pruned.num_key_value_groups, pruned.head_dim) == (2, 1, 2, 4)
    assert pruned.query_key_value.out_features == (2 + 2) * 4 and pruned.dense.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed, atol=1e-5, rtol=0)
    _, _, ir, group = _falcon_grouped(quotient=False, unit="query_heads")
    assert not group.prunable and any("key/value heads are kept whole" in r for r in group.unprunable_reasons)
