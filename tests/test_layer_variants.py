"""Layers used their own way: a weight computed in ``forward`` (weight standardisation, a mixture of
expert kernels), a subclass that reads its parameter directly (Whisper's positional embedding), a
split size in a user attribute (Res2Net), a channel count used as a number, ``baddbmm`` called with
keywords (BLOOM), a parameter fed to a submodule (DeBERTa's MACs), and a budget below what pruning
can reach. Each either prunes exactly, saves and loads, or is kept and reported, never broken."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pruning_ir
from helpers import assert_exact_pruning
from pruning_ir import (BudgetUnreachableError, LossAwareCriterion, PruningIR, UniformLabelSelector, load_pruned,
                        save_pruned)
from pruning_ir.latency import macs


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (BiT's ``StdConv2d``): the weight is normalised in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = StdConv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


def test_a_standardised_weight_keeps_its_module_sizes_true_and_saves(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned = pruning_ir.prune(StdConvNet(), x, ratio=0.5, verbose=False)
    weight = pruned.conv.weight
    assert weight.shape[0] < 16 and weight.shape[1] < 16
    assert (pruned.conv.out_channels, pruned.conv.in_channels) == tuple(weight.shape[:2])
    save_pruned(pruned, tmp_path)
    torch.manual_seed(1)
    loaded = load_pruned(StdConvNet(), tmp_path)
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)


class ExpertConv(nn.Module):
    """A grouped convolution whose kernel mixes experts by einsum (CondConv): no channel identity."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.experts = nn.Parameter(torch.randn(3, 8, 4, 3, 3) * 0.1)
        self.route = nn.Linear(8, 3)
        self.head, self.tail = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        weights = torch.softmax(self.route(x.mean((2, 3))), -1).mean(0)
        kernel = torch.einsum("k,koixy->oixy", weights, self.experts)
        x = torch.relu(self.head(torch.relu(F.conv2d(x, kernel, padding=1, groups=2))))
        return self.tail(x).mean((2, 3))


def test_a_grouped_convolution_of_a_computed_kernel_keeps_its_input_and_prunes_the_rest():
    torch.manual_seed(0)
    model, x = ExpertConv().eval(), torch.randn(2, 3, 6, 6)
    ir = PruningIR(model).infer_labels(x)
    stem = next(g for g in ir.groups if "stem" in g.modules)
    assert not stem.prunable   # the einsum kernel's input width cannot shrink
    assert [g.modules for g in ir.groups if g.prunable] == [["head", "tail"]]
    assert_exact_pruning(model, x)


class Res2Block(nn.Module):
    """Res2Net's split: ``torch.split(x, self.width, 1)`` with the split size in a user attribute."""

    def __init__(self, channels: int = 16, scale: int = 2) -> None:
        super().__init__()
        self.width = channels // scale
        self.conv1 = nn.Conv2d(3, channels, 1)
        self.convs = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1) for _ in range(scale))
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(self.conv1(x), self.width, 1)
        y = torch.cat([conv(torch.relu(part)) for conv, part in zip(self.convs, parts)], 1)
        return self.head(y.mean((2, 3)))


def test_a_split_size_in_a_user_attribute_is_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned = pruning_ir.prune(Res2Block(), x, ratio=0.5, verbose=False)
    assert pruned.width < 8 and pruned.width == pruned.convs[0].in_channels
    save_pruned(pruned, tmp_path)
    loaded = load_pruned(Res2Block(), tmp_path)
    assert loaded.width == pruned.width
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)


class PositionTable(nn.Embedding):
    """Whisper's positional embedding: indexes ``self.weight`` instead of calling ``F.embedding``."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class PositionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 16)
        self.positions = PositionTable(10, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.fc(torch.relu(h))


def test_an_embedding_that_indexes_its_weight_keeps_embedding_dim_true_and_saves(tmp_path):
    torch.manual_seed(0)
    model, ids = PositionNet().eval(), torch.randint(0, 20, (2, 6))
    _, pruned, _ = assert_exact_pruning(model, ids)
    table = pruned.model.positions
    assert table.embedding_dim == table.weight.shape[1] < 16
    save_pruned(pruned.model, tmp_path)
    torch.manual_seed(1)
    loaded = load_pruned(PositionNet(), tmp_path)
    torch.testing.assert_close(loaded(ids), pruned.model(ids), atol=0, rtol=0)


class CountScaled(nn.Module):
    """A channel count used as a number: ``x * C ** -0.5``, or a mean written as ``sum / C``."""

    def __init__(self, manual_mean: bool) -> None:
        super().__init__()
        self.manual_mean = manual_mean
        self.a, self.b = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        if self.manual_mean:
            return self.b(x - x.sum(1, keepdim=True) / x.shape[1])
        return self.b(x * x.shape[1] ** -0.5)


@pytest.mark.parametrize("manual_mean", [False, True])
def test_a_channel_count_used_as_a_number_makes_its_channels_inexact(manual_mean):
    torch.manual_seed(0)
    model, x = CountScaled(manual_mean).eval(), torch.randn(2, 3, 6, 6)
    ir = PruningIR(model).infer_labels(x)
    group = next(g for g in ir.groups if "a" in g.modules)
    assert group.prunable and not group.exact
    assert "their count is a number" in ir.describe()
    ir.zero_labels(group.labels[:4])
    with torch.no_grad():
        before = model(x)
        after = ir.prune(labels=group.labels[:4]).model(x)
    assert (after - before).abs().max() > 1e-4   # what the flag says: removing them changes the output


class AlibiScores(nn.Module):
    """BLOOM's scores: ``alibi.baddbmm(batch1=q, batch2=k, beta=, alpha=)``, all by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alibi = torch.zeros(x.shape[0], x.shape[1], x.shape[1])
        scores = alibi.baddbmm(batch1=self.q(x), batch2=self.k(x).transpose(1, 2), beta=1.0, alpha=0.25)
        return self.out(torch.softmax(scores, -1) @ self.v(x))


def test_baddbmm_with_keyword_factors_is_traced_and_prunes_exactly():
    torch.manual_seed(0)
    assert_exact_pruning(AlibiScores(), torch.randn(2, 5, 8))


def test_macs_counts_a_model_that_feeds_a_parameter_to_a_submodule():
    """DeBERTa's relative embeddings: torch's counter fails on them without gradients."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=32, relative_attention=True,
                                          pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1)
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(config).eval()
    ids = torch.randint(1, 50, (1, 8))
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    assert macs(model, ids) == counter.get_total_flops() / 2 > 0
    assert all(p.grad is None for p in model.parameters())


class MostlyPinned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).view(-1, 8 * 36)   # a literal width pins b's output


def test_an_unreachable_budget_is_named_in_the_budget_the_caller_gave():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(BudgetUnreachableError, match=r"macs=0\.1 cannot be reached: the smallest model pruning can "
                                                     r"reach keeps 0\.\d+ of the macs") as caught:
        pruning_ir.prune(MostlyPinned(), x, macs=0.1, verbose=False)
    assert isinstance(caught.value, ValueError) and caught.value.smallest > caught.value.target


def weight_normed(parametrized: bool) -> nn.Sequential:
    """A vocoder-style stack of weight-normed Conv1d (``parametrizations.weight_norm``, or the older
    ``nn.utils.weight_norm`` that recomputes ``weight`` in a forward pre-hook)."""
    norm = nn.utils.parametrizations.weight_norm if parametrized else nn.utils.weight_norm
    torch.manual_seed(0)
    return nn.Sequential(norm(nn.Conv1d(2, 12, 3, padding=1)), nn.ReLU(), norm(nn.Conv1d(12, 12, 3, padding=1)),
                         nn.ReLU(), norm(nn.Conv1d(12, 2, 1)))


@pytest.mark.filterwarnings("ignore::FutureWarning")   # nn.utils.weight_norm is deprecated, still common
@pytest.mark.parametrize("parametrized", [True, False])
def test_weight_normed_convolutions_are_pruned_after_calibration(tmp_path, parametrized):
    model, x = weight_normed(parametrized), torch.randn(2, 2, 16)
    ir = PruningIR(model)
    with LossAwareCriterion(ir) as collector:   # a forward with gradients: the old API's weight is non-leaf
        collector(x).pow(2).mean().backward()
    assert [len(g.labels) for g in ir.groups if g.prunable] == [12, 12]
    assert all(not g.exact for g in ir.groups if g.prunable)   # the norm runs over each kernel's inputs
    pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir)).model
    for conv, (out_channels, in_channels) in zip(pruned[::2], [(6, 2), (6, 6), (2, 6)]):
        g = conv.parametrizations.weight.original0 if parametrized else conv.weight_g
        assert (conv.out_channels, conv.in_channels, g.shape[0]) == (out_channels, in_channels, out_channels)
    assert pruned(torch.randn(3, 2, 20)).shape == (3, 2, 20)
    if parametrized:
        save_pruned(pruned, tmp_path)
        loaded = load_pruned(weight_normed(True), tmp_path)
        torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)


class HiddenScaled(nn.Module):
    """``self.hidden_dim`` is both a size (a view) and a number (a divisor): pruning rewrites both."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_dim = 48
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h.view(x.shape[0], self.hidden_dim) / self.hidden_dim)


def test_an_attribute_used_as_a_number_makes_the_channels_it_counts_inexact():
    ir = PruningIR(HiddenScaled().eval()).infer_labels(torch.randn(4, 16))
    group = next(g for g in ir.groups if g.prunable)
    assert not group.exact and "hidden_dim is a number" in group.inexact_reasons[0]


class HeadAttention(nn.Module):
    """Hand-written attention with its head count in ``self.nh`` and an ALiBi-like non-persistent buffer."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.nh, self.hd = heads, width // heads
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.register_buffer("slopes", torch.linspace(0.1, 1.0, heads).view(heads, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)
        bias = -self.slopes * (torch.arange(t)[None, :] - torch.arange(t)[:, None]).abs()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class HeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 32), HeadAttention(), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.attn(h))


@pytest.mark.parametrize("weights_format", ["torch", "safetensors"])
def test_a_head_count_attribute_and_a_non_persistent_buffer_are_saved_and_loaded(tmp_path, weights_format):
    if weights_format == "safetensors":
        pytest.importorskip("safetensors")
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    ir = PruningIR(HeadNet().eval()).infer_labels(x)
    heads = next(g for g in ir.groups if any("slopes" in p for p in g.parameters))
    pruned = ir.prune(labels=heads.labels[:2]).model
    assert pruned.attn.nh == 2 and pruned.attn.slopes.shape == (2, 1, 1)
    save_pruned(pruned, tmp_path, weights_format=weights_format)
    torch.manual_seed(1)
    loaded = load_pruned(HeadNet(), tmp_path)
    assert loaded.attn.nh == 2
    torch.testing.assert_close(loaded.attn.slopes, pruned.attn.slopes, atol=0, rtol=0)
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)


def test_an_orthogonal_parametrization_keeps_the_layer_sizes_true(tmp_path):
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.utils.parametrizations.orthogonal(  # noqa: E731
        nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 8)
    pruned = pruning_ir.prune(build(), x, ratio=0.5, verbose=False)
    square = pruned[2]
    assert (square.out_features, square.in_features) == tuple(square.weight.shape)
    save_pruned(pruned, tmp_path)
    torch.testing.assert_close(load_pruned(build(), tmp_path)(x), pruned(x), atol=1e-6, rtol=1e-5)


def test_macs_count_attention_that_torch_would_run_fused():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 8, 32)
    with FlopCounterMode(display=False) as counter:   # with gradients: torch's unfused path
        layer(x)
    assert macs(layer, x) == counter.get_total_flops() / 2 > 0


def test_channels_last_weights_stay_channels_last():
    model = StdConvNet().to(memory_format=torch.channels_last)
    pruned = pruning_ir.prune(model, torch.randn(2, 3, 8, 8), ratio=0.5, verbose=False)
    assert pruned.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert pruned.stem.weight.shape[0] < 16 and not pruned.stem.weight.is_contiguous()


def test_lazy_modules_not_yet_materialised_are_named_and_left_as_they_were():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(4))
    with pytest.raises(pruning_ir.TracingError, match=r"lazy parameters not yet materialised \(0\.weight.*run the "
                                                      r"model once"):
        PruningIR(model).infer_labels(torch.randn(2, 8))
    assert model(torch.randn(2, 8)).shape == (2, 4)   # still lazy, materialised by this first call
    assert_exact_pruning(model, torch.randn(2, 8))


class ComplexRotaryAttention(nn.Module):
    """Meta's LLaMA attention: rotary embeddings applied in complex numbers (``view_as_complex``)."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.n_heads, self.head_dim = heads, width // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(width, width, bias=False) for _ in range(4))
        angles = torch.outer(torch.arange(16).float(), 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * self.freqs_cis[: x.shape[1], None, :]).flatten(3).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = self.rotate(q), self.rotate(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


def test_complex_rotary_embeddings_keep_heads_prunable_and_exact():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 32), ComplexRotaryAttention(), nn.Linear(32, 4)).eval(), torch.randn(2, 6, 8)
    ir = PruningIR(model).infer_labels(x)
    heads = [g for g in ir.groups if g.prunable and "1.wq.weight[0]" in g.parameters]
    assert [len(g.labels) for g in heads] == [4] and heads[0].exact
    _, pruned, _ = assert_exact_pruning(model, x)
    assert pruned.model[1].n_heads < 4


class FunctionalGroupNorm(nn.Module):
    """``F.group_norm(h, self.groups, self.w, self.b)``: the group count is the module's own attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.groups, self.w, self.b = 4, nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(F.group_norm(self.conv(x), self.groups, self.w, self.b)))


def test_a_functional_group_norm_keeps_its_channels_and_the_module_its_attributes():
    torch.manual_seed(0)
    model = FunctionalGroupNorm().eval()
    ir = PruningIR(model).infer_labels(torch.randn(2, 3, 8, 8))
    group = next(g for g in ir.groups if "conv.weight[0]" in g.parameters)
    assert not group.prunable and "num_groups is an argument of a functional group_norm" in group.unprunable_reasons[0]
    pruned = pruning_ir.prune(model, torch.randn(2, 3, 8, 8), ratio=0.5, verbose=False)
    assert not hasattr(pruned, "num_groups") and pruned.groups == 4


class PoolOverChannels(nn.Module):
    """A max pool along the channel axis (channels moved last): neighbouring channels mix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        b, c, height, width = h.shape
        pooled = F.max_pool1d(h.flatten(2).transpose(1, 2), 3, 1, 1).transpose(1, 2).reshape(b, c, height, width)
        return self.head(pooled)


def test_pooling_along_the_channel_axis_keeps_those_channels():
    ir = PruningIR(PoolOverChannels().eval()).infer_labels(torch.randn(2, 3, 6, 6))
    group = next(g for g in ir.groups if "conv.weight[0]" in g.parameters)
    assert not group.prunable and "neighbouring positions mix" in group.unprunable_reasons[0]


class NonLocal(nn.Module):
    """A non-local block: ``self.inter_channels`` sizes the views of g, theta and phi alike."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.theta, self.phi, self.g, self.w = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1), \
            nn.Conv2d(8, 16, 1)
        self.inter_channels, self.fc = 8, nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        b = h.size(0)
        g = self.g(h).view(b, self.inter_channels, -1).permute(0, 2, 1)
        theta = self.theta(h).view(b, self.inter_channels, -1).permute(0, 2, 1)
        phi = self.phi(h).view(b, self.inter_channels, -1)
        y = torch.matmul(F.softmax(torch.matmul(theta, phi), dim=-1), g).permute(0, 2, 1)
        return self.fc((self.w(y.reshape(b, self.inter_channels, *h.shape[2:])) + h).mean((2, 3)))


def test_one_attribute_sizing_two_tensors_ties_their_channels():
    torch.manual_seed(0)
    model, x = NonLocal().eval(), torch.randn(2, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    inner = [g for g in ir.groups if g.prunable and "g.weight[0]" in g.parameters]
    assert len(inner) == 1 and {"theta.weight[0]", "phi.weight[0]"} <= set(inner[0].parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no group kept back because its removal broke the model
        pruned = pruning_ir.prune(model, x, macs=0.5, verbose=False)
    assert pruned.inter_channels < 8 and pruned(x).shape == (2, 3)


class PartialConv(nn.Module):
    """FasterNet's partial convolution: ``split(x, [self.dim_conv3, self.dim_untouched], 1)``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim_conv3, self.dim_untouched = dim // 4, dim - dim // 4
        self.conv = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.split(x, [self.dim_conv3, self.dim_untouched], 1)
        return torch.cat((self.conv(first), rest), 1)


def partial_conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), PartialConv(), nn.ReLU(), nn.Conv2d(16, 4, 1))


def test_a_split_size_of_a_module_without_those_channels_is_saved_and_loaded(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    pruned = pruning_ir.prune(partial_conv_net(), x, ratio=0.5, verbose=False)
    assert pruned[2].dim_untouched < 12
    save_pruned(pruned, tmp_path)
    loaded = load_pruned(partial_conv_net(), tmp_path)
    assert loaded[2].dim_untouched == pruned[2].dim_untouched
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution: a per-sample kernel, grouped by sample."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.style = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(4, 8)
        self.weight = nn.Parameter(torch.randn(1, 8, 8, 3, 3) * 0.2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        b = h.shape[0]
        kernel = (self.weight * self.style(w)[:, None, :, None, None]).view(b * 8, 8, *self.weight.shape[3:])
        h = F.conv2d(h.reshape(1, b * 8, *h.shape[2:]), kernel, padding=1, groups=b).view(b, 8, *h.shape[2:])
        return self.head(h)


def test_a_per_sample_kernel_keeps_its_spatial_size():
    ir = PruningIR(ModulatedConv().eval()).infer_labels(torch.randn(2, 3, 6, 6), torch.randn(2, 4))
    kernel_dims = [g for g in ir.groups if {"weight[3]", "weight[4]"} & set(g.parameters)]
    assert kernel_dims and not any(g.prunable for g in kernel_dims)
    assert all("spatial size is kept" in g.unprunable_reasons[0] for g in kernel_dims)


class SqrtScaled(nn.Module):
    """``x / math.sqrt(x.shape[1])``: the count turned into a float, where no operator follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h / math.sqrt(h.shape[1]))


def test_a_channel_count_through_math_sqrt_makes_its_channels_inexact():
    ir = PruningIR(SqrtScaled().eval()).infer_labels(torch.randn(2, 3, 6, 6))
    group = next(g for g in ir.groups if "a.weight[0]" in g.parameters)
    assert group.prunable and not group.exact and "into a float" in group.inexact_reasons[0]


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d(8), nn.GroupNorm(2, 8, affine=False)], ids=["instance", "group"])
def test_norms_without_parameters_follow_the_pruning(norm):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(8, 2, 1)).eval(), \
        torch.randn(2, 3, 6, 6)
    ir = PruningIR(model).infer_labels(x)
    group = next(g for g in ir.groups if "0.weight[0]" in g.parameters)
    assert group.prunable
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # InstanceNorm warns on every call when num_features is stale
        pruned = ir.prune(labels=group.labels[:len(group.labels) // 2]).model
        pruned(x)
    size = pruned[1].num_features if isinstance(norm, nn.InstanceNorm2d) else pruned[1].num_channels
    assert size == pruned[0].out_channels < 8


class BagNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.fc, self.out = nn.EmbeddingBag(20, 16, mode="sum"), nn.Linear(16, 8), nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.bag(ids, offsets))))


def test_an_embedding_bag_prunes_its_columns_exactly_and_saves(tmp_path):
    torch.manual_seed(0)
    ids, offsets = torch.randint(0, 20, (10,)), torch.tensor([0, 4, 7])
    _, pruned, _ = assert_exact_pruning(BagNet(), ids, offsets)
    assert pruned.model.bag.embedding_dim == pruned.model.bag.weight.shape[1] < 16
    save_pruned(pruned.model, tmp_path)
    torch.manual_seed(0)
    torch.testing.assert_close(load_pruned(BagNet(), tmp_path)(ids, offsets), pruned.model(ids, offsets), atol=0, rtol=0)


class SizeAndTimeSlice(nn.Module):
    """``self.d`` sizes the channels of a view and bounds a slice over time: it cannot follow pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d = nn.Linear(2, 8), nn.Linear(8, 3), 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).reshape(x.shape[0], -1, self.d)
        return self.b(h[:, :self.d])


def test_an_attribute_that_also_bounds_a_slice_over_time_keeps_its_channels():
    ir = PruningIR(SizeAndTimeSlice().eval()).infer_labels(torch.randn(2, 12, 2))
    group = next(g for g in ir.groups if "a.weight[0]" in g.parameters)
    assert not group.prunable and "d also bounds a slice of dim 1" in group.unprunable_reasons[0]


class Scan(nn.Module):
    """A recurrent state made by ``torch.zeros(b, d)`` with ``d`` read from the input (a selective scan
    written in plain torch): it carries the input's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 16), nn.Linear(16, 2)
        self.decay = nn.Parameter(torch.rand(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inp(x)
        b, steps, d = u.shape
        h, states = torch.zeros(b, d), []
        for t in range(steps):
            h = self.decay * h + u[:, t]
            states.append(h)
        return self.out(torch.stack(states, 1))


def test_a_zero_state_sized_by_a_channel_count_keeps_those_channels_prunable():
    torch.manual_seed(0)
    _, pruned, _ = assert_exact_pruning(Scan(), torch.randn(2, 5, 4))
    assert pruned.model.decay.shape[0] < 16


class RuntimeState(nn.Module):
    """``torch.where(mask)`` (indices, as ``nonzero(as_tuple=True)``), and an int attribute that forward writes
    (Funnel's ``seq_len``): neither is a size a saved model must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.seq_len = nn.Linear(8, 16), nn.Linear(16, 8), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seq_len = x.shape[0]
        h = torch.relu(self.a(x))
        rows, = torch.where(x[:, 0] > 0)
        return self.b(h).index_add(0, rows, torch.ones(len(rows), 8))


def test_one_argument_where_and_state_written_by_forward(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    _, pruned, _ = assert_exact_pruning(RuntimeState(), x)
    save_pruned(pruned.model, tmp_path)
    torch.manual_seed(0)
    fresh = RuntimeState()
    torch.testing.assert_close(load_pruned(fresh, tmp_path)(x), pruned.model(x), atol=0, rtol=0)
