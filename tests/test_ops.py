"""Exactness of pruning dead labels, op by op.

Every model ends in a layer whose outputs are pinned (they reach the model output), so
each test also checks that producers, consumers and the attributes in between agree.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_exact_pruning, assert_prunes_and_runs
from pruning_ir import PruningIR


def seeded(module_factory):
    torch.manual_seed(0)
    return module_factory()


def image(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


class ConvNet(nn.Module):
    """conv -> bn -> act -> conv with configurable dimensionality and grouping."""

    def __init__(self, dims=2, groups=1, mid=8, multiplier=1, act=nn.ReLU, transposed=False):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}.get(dims)
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.stem = conv(3, mid, 3, padding=1)
        self.bn1 = bn(mid)
        self.act = act()
        if transposed:
            self.mid = tconv(mid, mid, 2, stride=2)
        else:
            self.mid = conv(mid, mid * multiplier, 3, padding=1, groups=groups)
        self.bn2 = bn(mid * multiplier)
        self.head = conv(mid * multiplier, 4, 1)

    def forward(self, x):
        x = self.act(self.bn1(self.stem(x)))
        return self.head(self.act(self.bn2(self.mid(x))))


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 16)), (2, (2, 3, 8, 8)), (3, (2, 3, 4, 4, 4))])
def test_conv_nd(dims, shape):
    assert_exact_pruning(seeded(lambda: ConvNet(dims=dims)), image(*shape))


def test_grouped_conv_keeps_groups_and_removes_same_index_from_each():
    model = seeded(lambda: ConvNet(groups=2))
    ir, pruned, _ = assert_exact_pruning(model, image(2, 3, 8, 8))
    assert pruned.model.mid.groups == 2
    assert pruned.model.mid.in_channels % 2 == 0 and pruned.model.mid.out_channels % 2 == 0


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_removes_whole_groups(multiplier):
    model = seeded(lambda: ConvNet(groups=8, multiplier=multiplier))
    ir, pruned, labels = assert_exact_pruning(model, image(2, 3, 8, 8))
    mid = pruned.model.mid
    assert mid.groups == mid.in_channels < 8
    assert mid.out_channels == mid.groups * multiplier


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 8)), (2, (2, 3, 4, 4))])
def test_conv_transpose(dims, shape):
    model = seeded(lambda: ConvNet(dims=dims, transposed=True))
    _, pruned, _ = assert_exact_pruning(model, image(*shape))
    assert pruned.model.mid.in_channels == pruned.model.stem.out_channels


class MLP(nn.Module):
    def __init__(self, norm=None):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)
        self.norm = norm

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        x = self.fc2(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.fc3(torch.relu(x))


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_linear_on_nd_inputs(shape):
    _, pruned, _ = assert_exact_pruning(seeded(MLP), image(*shape))
    assert pruned.model.fc1.out_features == pruned.model.fc2.in_features < 16


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm1d(12), lambda: nn.LayerNorm(12)])
def test_norms_on_features(norm):
    model = seeded(lambda: MLP(norm=norm()))
    if isinstance(model.norm, nn.LayerNorm):
        ir = PruningIR(model).infer_labels(image(4, 6))
        normalized = [g for g in ir.groups if "norm" in g.modules]
        assert normalized and not normalized[0].exact and "normalized over channels" in normalized[0].inexact_reasons[0]
        pruned = assert_prunes_and_runs(model, image(4, 6), fraction=0.5)
        assert pruned.model.norm.normalized_shape == (pruned.model.fc2.out_features,) != (12,)
    else:
        _, pruned, _ = assert_exact_pruning(model, image(4, 6))
        assert pruned.model.norm.num_features == pruned.model.fc2.out_features < 12


def test_batchnorm_on_sequences():
    model = seeded(lambda: ConvNet(dims=1))
    _, pruned, _ = assert_exact_pruning(model, image(2, 3, 16))
    assert pruned.model.bn1.running_mean.shape[0] == pruned.model.stem.out_channels


class NormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.silu(self.norm(self.conv(x))))


def test_group_norm_removes_whole_groups():
    model = seeded(lambda: NormNet(nn.GroupNorm(4, 8)))
    ir, pruned, _ = assert_exact_pruning(model, image(2, 3, 6, 6))
    group = next(g for g in ir.groups if "norm" in g.modules)
    assert len(group.classes) == 4
    assert pruned.model.norm.num_groups * 2 == pruned.model.norm.num_channels == pruned.model.conv.out_channels


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm(affine):
    model = seeded(lambda: NormNet(nn.InstanceNorm2d(8, affine=affine)))
    assert_exact_pruning(model, image(2, 3, 6, 6))


def test_prelu_per_channel():
    model = seeded(lambda: ConvNet(act=lambda: nn.PReLU(8)))
    _, pruned, _ = assert_exact_pruning(model, image(2, 3, 6, 6))
    assert pruned.model.act.num_parameters == pruned.model.stem.out_channels


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, ids):
        return self.fc(torch.tanh(self.embed(ids))).mean(1)


def test_embedding_columns():
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    _, pruned, _ = assert_exact_pruning(seeded(EmbeddingNet), ids)
    assert pruned.model.embed.embedding_dim == pruned.model.fc.in_features < 12
    assert pruned.model.embed.num_embeddings == 20


class PoolingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.conv1(x)), 2)
        x = F.avg_pool2d(self.drop(torch.tanh(self.conv2(x))), 2)
        x = F.interpolate(x, scale_factor=2, mode="nearest") + F.upsample(x, scale_factor=2)
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


def test_activations_dropout_pooling_interpolate():
    assert_exact_pruning(seeded(PoolingNet), image(2, 3, 8, 8))


class SqueezeExcitation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.other = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        b, c, _, _ = y.shape
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        y = y * gate
        y = (y - self.other(x)) / 2.0 + y * self.scale
        y = y.view(b, c, -1).view(b, c, *x.shape[2:])
        return self.head(y)


def test_broadcast_add_sub_mul_div_and_squeeze_excitation():
    ir, pruned, _ = assert_exact_pruning(seeded(SqueezeExcitation), image(2, 3, 6, 6))
    model = pruned.model
    assert model.conv.out_channels == model.other.out_channels == model.expand.out_channels \
        == model.scale.shape[1] == model.head.in_channels < 8


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(10, 8, 1)
        self.d = nn.Conv2d(4, 2, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], dim=1))
        first, second = y.chunk(2, dim=1)
        third, fourth = torch.split(y, 4, dim=1)
        return self.head(torch.cat([first + third, second * fourth], 1)) + self.d(first)


def test_cat_split_chunk():
    ir, pruned, _ = assert_exact_pruning(seeded(ConcatSplit), image(2, 3, 4, 4))
    model = pruned.model
    assert model.c.in_channels == model.a.out_channels + model.b.out_channels
    assert model.c.out_channels == 2 * model.d.in_channels


class Flattening(nn.Module):
    def __init__(self, style):
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16 * 5 * 5, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.style == "flatten":
            x = torch.flatten(x, 1)
        elif self.style == "view_size":
            x = x.view(x.size(0), -1)
        elif self.style == "reshape_shape":
            x = x.reshape(x.shape[0], x.shape[1] * x.shape[2] * x.shape[3])
        else:
            x = x.view(-1, 16 * 5 * 5)
        return self.fc(x)


@pytest.mark.parametrize("style", ["flatten", "view_size", "reshape_shape"])
def test_conv_features_flattened_into_linear(style):
    _, pruned, _ = assert_exact_pruning(seeded(lambda: Flattening(style)), image(2, 3, 7, 7))
    assert pruned.model.fc.in_features == pruned.model.conv.out_channels * 25


def test_hard_coded_view_pins_channels_with_reason():
    model = seeded(lambda: Flattening("literal"))
    ir = PruningIR(model).infer_labels(image(2, 3, 7, 7))
    conv_group = next(g for g in ir.groups if "conv" in g.modules)
    assert not conv_group.prunable
    assert any("literal 400" in reason for reason in conv_group.unprunable_reasons)
    assert "literal 400" in ir.describe()


class ChannelShuffle(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.left, self.right = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        if self.functional:
            y = F.channel_shuffle(y, 2)
        else:
            b, c, h, w = y.size()
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.mix(y)


@pytest.mark.parametrize("functional", [False, True])
def test_channel_shuffle_removes_same_channel_of_every_group(functional):
    ir, pruned, _ = assert_exact_pruning(seeded(lambda: ChannelShuffle(functional)), image(2, 3, 4, 4))
    group = next(g for g in ir.groups if "left" in g.modules)
    assert len(group.classes) == 6 and "right" in group.modules
    assert pruned.model.left.out_channels == pruned.model.right.out_channels


class Permuting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 1)             # (B, L, C)
        x = self.fc(x).transpose(1, 2).transpose(-1, -2)
        return self.out(x)


def test_permute_transpose():
    _, pruned, _ = assert_exact_pruning(seeded(Permuting), image(2, 4, 10))
    assert pruned.model.fc.in_features == pruned.model.conv.out_channels < 8


class HandWrittenAttention(nn.Module):
    def __init__(self, dim=16, heads=4, separate=False):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.separate = separate
        if separate:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.embed = nn.Linear(5, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        if self.separate:
            q, k, v = (layer(x).view(B, N, -1, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            attention = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(dim=-1)
            y = attention @ v
        y = y.transpose(1, 2).reshape(B, N, -1)
        return self.head(x + self.proj(y))


@pytest.mark.parametrize("separate", [False, True])
def test_hand_written_attention_removes_whole_heads(separate):
    model = seeded(lambda: HandWrittenAttention(separate=separate))
    ir, pruned, _ = assert_exact_pruning(model, image(2, 6, 5))
    heads = next(g for g in ir.groups if "proj" in g.modules and ("q" in g.modules or "qkv" in g.modules)
                 and "embed" not in g.modules)
    assert len(heads.classes) == 4
    assert pruned.model.num_heads < 4
    assert pruned.model.proj.in_features == pruned.model.num_heads * 4


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.head(x + self.attention(x, x, x, need_weights=False)[0])


def test_multihead_attention_module():
    ir, pruned, _ = assert_exact_pruning(seeded(MHABlock), image(2, 6, 5))
    attention = pruned.model.attention
    assert attention.num_heads < 4 and attention.embed_dim == attention.num_heads * 4
    assert attention.in_proj_weight.shape == (3 * attention.embed_dim, attention.embed_dim)


class FunctionalParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.kernel_bias = nn.Parameter(torch.randn(8))
        self.weight = nn.Parameter(torch.randn(6, 8) * 0.2)
        self.out = nn.Parameter(torch.randn(2, 6) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.kernel, self.kernel_bias, padding=1)).mean((2, 3))
        return F.linear(torch.tanh(F.linear(x, self.weight)), self.out)


def test_functional_ops_on_parameters():
    _, pruned, _ = assert_exact_pruning(seeded(FunctionalParameters), image(2, 3, 5, 5))
    assert pruned.model.kernel.shape[0] == pruned.model.weight.shape[1] < 8


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(self.shared(F.relu(self.shared(x))))


def test_module_called_twice():
    ir, pruned, _ = assert_exact_pruning(seeded(SharedModule), image(2, 3, 4, 4))
    assert len([g for g in ir.groups if g.prunable]) == 1  # both sides of the shared conv are one group


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.rnn = cell(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        features = self.conv(x).transpose(1, 2)
        hidden = self.rnn(features)[0]
        return self.out(F.relu(self.fc(hidden)))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_is_a_barrier_for_its_hidden_state_only(cell):
    model = seeded(lambda: Recurrent(cell))
    ir, pruned, _ = assert_exact_pruning(model, image(2, 3, 7))
    assert not any("rnn" in g.modules and "fc" in g.modules for g in ir.groups if g.prunable)
    assert pruned.model.rnn.input_size == pruned.model.conv.out_channels < 8
    assert pruned.model.rnn.hidden_size == 12 and pruned.model.fc.out_features < 6


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.down = nn.PixelUnshuffle(2)
        self.head = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        return self.head(self.down(F.relu(self.mid(self.up(self.conv(x))))))


def test_pixel_shuffle_and_unshuffle():
    ir, pruned, _ = assert_exact_pruning(seeded(PixelShuffleNet), image(2, 3, 4, 4))
    model = pruned.model
    assert model.conv.out_channels == 4 * model.mid.in_channels and model.head.in_channels == 4 * model.mid.out_channels


class SingleChannelOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.score = nn.Conv2d(8, 1, 1)
        self.mask = nn.Parameter(torch.ones(8, 8, 1, 1))
        self.refine = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.body(x))
        y = F.conv2d(y, self.refine.weight * self.mask, self.refine.bias)  # a computed weight
        return torch.sigmoid(self.score(F.relu(y)))


def test_computed_weights_and_single_channel_outputs():
    _, pruned, _ = assert_exact_pruning(seeded(SingleChannelOutput), image(2, 3, 4, 4))
    model = pruned.model
    assert model.refine.weight.shape[:2] == model.mask.shape[:2] and model.score.in_channels < 8


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 16, 3, padding=1)
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, x):
        y = F.glu(self.conv(x), dim=1)
        return self.head(torch.where(y > 0, y, y * 0.1) * (y.abs() < 10))


def test_glu_comparisons_and_where():
    _, pruned, _ = assert_exact_pruning(seeded(GatedNet), image(2, 3, 6))
    assert pruned.model.conv.out_channels == 2 * pruned.model.head.in_channels < 16


class PositionBiasAttention(nn.Module):
    """T5's cross-attention: a position bias of zeros sized by ``self.n_heads`` added to the scores."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.n_heads, self.d_kv = heads, dim // heads
        self.embed = nn.Linear(5, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, L, _ = x.shape
        q, k, v = (layer(x).view(B, L, -1, self.d_kv).transpose(1, 2) for layer in (self.q, self.k, self.v))
        position_bias = torch.zeros((1, self.n_heads, L, L), device=x.device, dtype=x.dtype)
        scores = torch.matmul(q, k.transpose(3, 2)) + position_bias
        y = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(B, L, -1)
        return self.head(x + self.o(y))


def test_zeros_sized_by_a_module_attribute_follow_the_heads():
    ir, pruned, _ = assert_exact_pruning(seeded(PositionBiasAttention), image(2, 6, 5))
    model = pruned.model
    assert 0 < model.n_heads < 4
    assert model.q.out_features == model.o.in_features == model.n_heads * 4
    heads = next(g for g in ir.groups if "o" in g.modules and "embed" not in g.modules)
    assert len(heads.classes) == 4


class MultiQuerySplit(nn.Module):
    """Falcon's fused multi-query projection: ``view(..., -1, head_dim)`` then ``split([self.num_heads, 1, 1])``:
    query heads, one key head, one value head; the heads merged back by ``self.num_heads * self.head_dim``."""

    def __init__(self, heads=4, head_dim=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        dim = heads * head_dim
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, (heads + 2) * head_dim, bias=False)
        self.dense = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, L, _ = x.shape
        fused = self.qkv(x).view(B, L, -1, self.head_dim)
        q, k, v = fused.split([self.num_heads, 1, 1], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.head(x + self.dense(y))


def test_split_with_fixed_size_pieces_keeps_those_and_prunes_the_rest():
    ir, pruned, _ = assert_exact_pruning(seeded(MultiQuerySplit), image(2, 6, 5))
    model = pruned.model
    assert 0 < model.num_heads < 4
    assert model.qkv.out_features == (model.num_heads + 2) * 4 == model.qkv.weight.shape[0]
    assert model.dense.in_features == model.num_heads * 4
    # the key and value heads: a piece of literal size keeps its channels
    assert any("split piece 1 has the literal size 1" in r for g in ir.groups for r in g.unprunable_reasons)


class WeightTransposedLinear(nn.Linear):
    """Falcon's FalconLinear: the product with ``self.weight.T`` written out."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class TransposedLinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = WeightTransposedLinear(5, 12)
        self.down = WeightTransposedLinear(12, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))))


def test_linear_subclass_multiplying_by_its_weight_transposed():
    _, pruned, _ = assert_exact_pruning(seeded(TransposedLinearNet), image(2, 4, 5))
    model = pruned.model
    assert model.up.out_features == model.up.weight.shape[0] == model.down.in_features == model.down.weight.shape[1]
    assert model.down.out_features == model.down.weight.shape[0] == model.head.in_features
    assert model.up.out_features < 12 and model.down.out_features < 6


class GroupedExperts(nn.Module):
    """Mixtral's experts in one parameter: ``torch._grouped_mm`` over token rows grouped by expert."""

    def __init__(self, experts=3, dim=8, hidden=16):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)     # (experts, out, in)
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) / hidden ** 0.5)
        self.head = nn.Linear(dim, 3)
        self.rows = 2  # token rows per expert

    def forward(self, x):
        tokens = self.embed(x).reshape(-1, self.up.shape[-1])
        offsets = torch.arange(1, self.up.shape[0] + 1, dtype=torch.int32) * self.rows
        hidden = F.relu(torch._grouped_mm(tokens, self.up.transpose(-2, -1), offs=offsets))
        return self.head(torch._grouped_mm(hidden, self.down.transpose(-2, -1), offs=offsets))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
def test_grouped_matmul_prunes_a_channel_of_every_expert():
    model, x = seeded(GroupedExperts).eval(), image(6, 5)
    ir = PruningIR(model).infer_labels(x)
    hidden = next(g for g in ir.groups if "up[1]" in g.parameters)
    assert hidden.width_multiple == 8   # the kernel's 16-byte rows, in half precision too
    labels = hidden.labels[1::2]         # 8 of 16: a multiple of 8 stays
    ir.zero_labels(labels)
    with torch.no_grad():
        expected = model(x)
        pruned = ir.prune(labels=labels).model
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-4)
    assert pruned.up.shape[0] == pruned.down.shape[0] == 3  # the experts are kept
    assert pruned.up.shape[1] == pruned.down.shape[2] == 8
    assert pruned.up.shape[2] == pruned.down.shape[1] == pruned.embed.out_features


class FusedGroupedQKV(nn.Module):
    """Phi-3's attention: one projection for q, k and v, sliced at ``num_heads * head_dim`` and
    ``num_heads * head_dim + num_key_value_heads * head_dim`` (key/value heads repeated by ``repeat_interleave``)."""

    def __init__(self, heads=4, kv_heads=2, head_dim=4):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, head_dim
        self.num_key_value_groups = heads // kv_heads
        self.embed = nn.Linear(5, 16)
        self.qkv_proj = nn.Linear(16, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, 16, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        B, L, _ = x.shape
        qkv = self.qkv_proj(x)
        query_pos = self.num_heads * self.head_dim
        q = qkv[..., :query_pos]
        k = qkv[..., query_pos:query_pos + self.num_key_value_heads * self.head_dim]
        v = qkv[..., query_pos + self.num_key_value_heads * self.head_dim:]
        q, k, v = (t.view(B, L, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        k, v = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2).reshape(B, L, -1)
        return self.head(x + self.o_proj(y))


@pytest.mark.parametrize("unit, heads, kv_heads", [("query_heads", 2, 2), ("kv_groups", 2, 1)])
def test_fused_projection_sliced_at_attribute_products_loses_whole_heads(unit, heads, kv_heads):
    """Half the head labels removed: the slice bounds (products of the attributes) move with the heads."""
    model = seeded(FusedGroupedQKV).eval()
    x = image(2, 6, 5)
    ir = PruningIR(model, gqa_unit=unit).infer_labels(x)
    group = next(g for g in ir.groups if g.prunable and "o_proj" in g.modules and "embed" not in g.modules)
    labels = group.labels[:len(group.labels) // 2]
    ir.zero_labels(labels)
    with torch.no_grad():
        zeroed = model(x)
    pruned = ir.prune(labels=labels).model
    assert (pruned.num_heads, pruned.num_key_value_heads, pruned.num_key_value_groups) == (heads, kv_heads,
                                                                                           heads // kv_heads)
    assert pruned.qkv_proj.out_features == (heads + 2 * kv_heads) * 4 == pruned.qkv_proj.weight.shape[0]
    assert pruned.o_proj.in_features == heads * 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed, atol=1e-5, rtol=0)


class AttributeSlices(nn.Module):
    """``x[..., :self.width]`` follows pruning (the attribute is bound); ``x[..., self.width + 2:]`` cuts after a
    sum with a constant, which no single attribute counts."""

    def __init__(self, shifted=False):
        super().__init__()
        self.width, self.shifted = 4, shifted
        self.a, self.head = nn.Linear(5, 8), nn.Linear(2 if shifted else 4, 3)

    def forward(self, x):
        y = self.a(x)
        return self.head(y[..., self.width + 2:] if self.shifted else y[..., :self.width])


def test_a_slice_bound_follows_a_lone_attribute_and_pins_before_a_sum():
    _, pruned, _ = assert_exact_pruning(seeded(AttributeSlices), image(2, 5))
    assert pruned.model.width == pruned.model.head.in_features < 4
    ir = PruningIR(seeded(lambda: AttributeSlices(shifted=True))).infer_labels(image(2, 5))
    reasons = [r for g in ir.groups for r in g.unprunable_reasons]
    assert any("the slice bound 6 is not one attribute times a fixed size" in r for r in reasons), reasons


class ConfiguredBlock(nn.Module):
    """A block reading its head count from a config object shared by every block (Phi-3's attention)."""

    def __init__(self, config):
        super().__init__()
        self.config, self.head_dim = config, 4
        self.qkv = nn.Linear(16, 3 * config.n_heads * 4, bias=False)
        self.out = nn.Linear(config.n_heads * 4, 16, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        qkv = self.qkv(x)
        width = self.config.n_heads * self.head_dim
        q, k, v = (qkv[..., i * width:(i + 1) * width].view(B, L, -1, self.head_dim).transpose(1, 2)
                   for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2).reshape(B, L, -1)
        return x + self.out(y)


class ConfiguredModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(n_heads=4, label="not an int")
        self.embed = nn.Linear(5, 16)
        self.blocks = nn.ModuleList(ConfiguredBlock(self.config) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_config_field_sizes_the_heads_of_every_block_that_shares_it():
    """``self.config.n_heads * self.head_dim`` slices each block's fused projection; the one config holds one
    count, so a label removes the same head from both blocks, and prune() writes the count into the config."""
    model = seeded(ConfiguredModel).eval()
    x = image(2, 6, 5)
    ir = PruningIR(model).infer_labels(x)
    assert type(model.config.n_heads) is int  # the traced marks are gone
    group, = [g for g in ir.groups if g.prunable and "blocks.0.out" in g.modules and "embed" not in g.modules]
    assert "blocks.1.out" in group.modules and len(group.labels) == 4
    labels = group.labels[:2]
    ir.zero_labels(labels)
    with torch.no_grad():
        zeroed = model(x)
    pruned = ir.prune(labels=labels).model
    assert pruned.config.n_heads == 2 and model.config.n_heads == 4
    assert all(block.qkv.out_features == 24 and block.out.in_features == 8 for block in pruned.blocks)
    assert pruned.blocks[0].config is pruned.blocks[1].config is pruned.config
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed, atol=1e-5, rtol=0)


class FalconSummedHeads(nn.Module):
    """Falcon's multi-query attention as its fused projection is often written: ``view(B, L, self.num_heads + 2,
    self.head_dim)`` (query heads, one key head, one value head), attention scaled by ``self.head_dim ** -0.5``.
    ``heads``: how the head count is written in the view (``sum``, ``-1``, or the literal ``num_heads + 2``);
    ``merge``: how the heads are merged back (``-1`` or ``num_heads * head_dim``); ``sdpa``: attention by
    ``F.scaled_dot_product_attention`` with that scale rather than written out."""

    def __init__(self, heads="sum", merge="-1", num_heads=4, head_dim=4, sdpa=False):
        super().__init__()
        self.num_heads, self.head_dim, self.heads, self.merge, self.sdpa = num_heads, head_dim, heads, merge, sdpa
        dim = num_heads * head_dim
        self.embed = nn.Linear(5, dim)
        self.query_key_value = nn.Linear(dim, (num_heads + 2) * head_dim, bias=False)
        self.dense = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, L, _ = x.shape
        size = {"sum": self.num_heads + 2, "-1": -1, "literal": 6}[self.heads]
        fused = self.query_key_value(x).view(B, L, size, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in fused.split([self.num_heads, 1, 1], dim=2))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5).transpose(1, 2)
        else:
            y = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(dim=-1) @ v
            y = y.transpose(1, 2)
        y = y.reshape(B, L, -1) if self.merge == "-1" else y.reshape(B, L, self.num_heads * self.head_dim)
        return self.head(x + self.dense(y))


def _attention_group(ir: PruningIR):
    return next(g for g in ir.groups if "dense" in g.modules and "embed" not in g.modules)


def _zeroed_then_pruned(model: nn.Module, x: torch.Tensor, **kwargs):
    """Half the labels of the attention group zeroed, then removed: the two models' outputs and the IR."""
    model.eval()
    ir = PruningIR(model, **kwargs).infer_labels(x)
    group = _attention_group(ir)
    labels = group.labels[:len(group.labels) // 2]
    ir.zero_labels(labels)
    with torch.no_grad():
        zeroed = model(x)
    pruned = ir.prune(labels=labels).model
    with torch.no_grad():
        return ir, group, pruned, zeroed, pruned(x)


@pytest.mark.parametrize("heads, merge, sdpa", [("sum", "-1", False), ("sum", "product", False), ("-1", "-1", False),
                                               ("-1", "product", False), ("sum", "-1", True)])
def test_falcon_view_by_head_count_plus_two_removes_whole_heads(heads, merge, sdpa):
    """``num_heads + 2`` is an attribute plus a constant: the heads are the unit (never positions within a head,
    whose removal would leave the scale computed from ``head_dim`` behind), the key and value heads are kept."""
    model = seeded(lambda: FalconSummedHeads(heads, merge, sdpa=sdpa))
    ir, group, pruned, zeroed, out = _zeroed_then_pruned(model, image(2, 6, 5))
    assert group.exact and len(group.labels) == 4, ir.describe()
    assert (pruned.num_heads, pruned.head_dim) == (2, 4)
    assert pruned.query_key_value.out_features == (2 + 2) * 4 == pruned.query_key_value.weight.shape[0]
    assert pruned.dense.in_features == 8
    torch.testing.assert_close(out, zeroed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sdpa", [False, True])
def test_falcon_view_by_a_literal_head_count_is_not_reported_exact(sdpa):
    """``view(B, L, 6, self.head_dim)``: the literal keeps the heads, so positions within a head are the unit;
    the scale computed from ``head_dim`` does not follow them, and the group says so."""
    model = seeded(lambda: FalconSummedHeads("literal", sdpa=sdpa))
    ir = PruningIR(model).infer_labels(image(2, 6, 5))
    group = _attention_group(ir)
    assert group.prunable and not group.exact, ir.describe()
    if not sdpa:
        assert any("a batched product of two tensors over channels" in r for r in group.inexact_reasons)
