"""print(ir) / ir.summary(): per group the labels and what one label is, channels, the parameters
and MACs the group's channels hold, modules and why a group is pinned; lines of at most 120
characters; repeated blocks folded in the compact view."""

from __future__ import annotations

import re

import torch
from torch import nn

from pruning_ir import PruningIR, macs
from pruning_ir.summary import group_rows
from zoo import ZOO


def test_a_group_holds_its_producers_and_consumers_params_and_macs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    image = torch.randn(1, 3, 9, 9)
    ir = PruningIR(model).infer_labels(image)
    rows = {row.group: row for row in group_rows(model, ir.index, ((image,), {}))}
    hidden = next(row for row in rows.values() if row.labels == 8)
    # the 8 hidden channels: all of conv 0 (weight and bias) and the input side of conv 2's weight
    assert hidden.parameters == 8 * 3 * 9 + 8 + 4 * 8 * 9
    first = macs(nn.Sequential(model[0]), image)
    assert abs(hidden.macs - macs(model, image)) < 1e-6 * first  # both convs' MACs scale with these channels
    text = str(ir)
    assert "pinned: output" in text and all(len(line) <= 120 for line in text.splitlines())


def test_heads_say_how_many_channels_a_label_is_and_the_root_module_is_named():
    entry = ZOO["vit"]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    text = ir.summary()
    heads = [row for row in group_rows(ir.model, ir.index, None) if "attn.proj" in row.modules]
    assert heads and all(row.label_size == ir.model.blocks[0].attn.head_dim for row in heads)
    assert all(row.macs is None for row in heads)  # no inputs: MACs are not counted
    assert "<model>" in text and all(len(line) <= 120 for line in text.splitlines())
    assert len(re.findall(r"^\s+\d+\s", text, flags=re.M)) == len(ir.groups)


def test_the_compact_view_folds_repeated_blocks():
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=100)).eval()
    ir = PruningIR(model).infer_labels(torch.randint(0, 100, (1, 8)))
    rows = group_rows(ir.model, ir.index, ir_inputs := ((torch.randint(0, 100, (1, 8)),), {}))
    compact = ir.summary(compact=True)
    assert compact.count(" x6 ") == 2 and "encoder.layer.*.intermediate.dense" in compact
    mlp = [row for row in rows if "intermediate.dense" in row.modules]
    folded = next(line for line in compact.splitlines() if "intermediate.dense" in line)
    assert len(mlp) == 6 and f"{sum(r.parameters for r in mlp) / 1e3:.3g}k" in folded
    assert ir.summary(compact=False).count("intermediate.dense") == 6 and ir_inputs
