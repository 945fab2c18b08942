"""Reconstruction after pruning: input statistics against brute force, the bias and least-squares
refits against their closed forms, exactness on dead labels, and composition with batch-norm
re-estimation, rounds, masks and torch.distributed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pruning_ir import (PruningIR, Reconstruction, UniformLabelSelector, collect_statistics, prune_in_rounds,
                        tune_batchnorm_statistics)
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion
from helpers import free_port, pick_labels


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().pow(2).mean())


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()


class _MLPBlock(nn.Module):
    """A pre-norm transformer MLP (up, GELU, down) on a residual stream, twice."""

    def __init__(self, width: int = 16, hidden: int = 48):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(width), "up": nn.Linear(width, hidden),
                                                   "down": nn.Linear(hidden, width)}) for _ in range(2))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["down"](F.gelu(block["up"](block["norm"](x))))
        return self.head(x)


class _Functional(nn.Module):
    """F.linear / F.conv1d on parameters, no module owns them."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 2, 3) * 0.5)
        self.w2 = nn.Parameter(torch.randn(4, 6, 3) * 0.5)
        self.b2 = nn.Parameter(torch.randn(4))
        self.w3 = nn.Parameter(torch.randn(5, 4 * 7) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv1d(x, self.w1, padding=1))
        x = F.relu(F.conv1d(x, self.w2, self.b2, padding="same"))
        return F.linear(x.flatten(1), self.w3)


# -- statistics ---------------------------------------------------------------------------------
def test_linear_statistics_equal_brute_force_over_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    batches = [torch.randn(4, 6, 5) for _ in range(3)]  # (batch, tokens, features)
    ir = PruningIR(model).infer_labels(batches[0])
    with collect_statistics(ir) as stats:
        for x in batches:
            model(x)
    assert stats.collected() == ["2.weight"]
    rows = torch.cat([F.relu(model[0](x)).reshape(-1, 8) for x in batches]).double()
    assert stats.count("2.weight") == rows.shape[0]
    torch.testing.assert_close(stats.mean("2.weight"), rows.mean(0))
    torch.testing.assert_close(stats.second_moment("2.weight"), rows.T @ rows / rows.shape[0])


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 2)])
def test_conv2d_statistics_equal_unfold_over_all_patches(stride, dilation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, stride=stride, padding=2, dilation=dilation)).eval()
    batches = [torch.randn(2, 3, 7, 9) for _ in range(2)]
    ir = PruningIR(model).infer_labels(batches[0])
    with collect_statistics(ir, max_positions=None) as stats:
        for x in batches:
            stats(x)
    patches = [F.unfold(F.relu(model[0](x)), 3, dilation=dilation, padding=2, stride=stride) for x in batches]
    rows = torch.cat([p.transpose(1, 2).reshape(-1, 6 * 9) for p in patches]).double()
    assert stats.count("2.weight") == rows.shape[0]
    torch.testing.assert_close(stats.mean("2.weight"), rows.mean(0))
    torch.testing.assert_close(stats.second_moment("2.weight"), rows.T @ rows / rows.shape[0])


def test_conv_patches_are_sampled_within_the_cap():
    model = _conv_net()
    x = torch.randn(8, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir, max_positions=50) as stats:
        model(x)
        model(x)
    assert stats.count("3.weight") == 100  # 8 * 64 positions, 50 drawn per call
    assert stats.count("8.weight") == 16  # a Linear: every row


def test_functional_consumers_and_same_padding():
    torch.manual_seed(0)
    model = _Functional().eval()
    x = torch.randn(3, 2, 7)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir, max_positions=None) as stats:
        model(x)
    assert sorted(stats.collected()) == ["w2", "w3"]
    hidden = F.relu(F.conv1d(x, model.w1, padding=1))
    rows = F.unfold(hidden.unsqueeze(2), (1, 3), padding=(0, 1)).transpose(1, 2).reshape(-1, 18).double()
    torch.testing.assert_close(stats.mean("w2"), rows.mean(0))
    torch.testing.assert_close(stats.second_moment("w2"), rows.T @ rows / rows.shape[0])
    assert stats.consumers["w2"].bias == "b2"


def test_skips_grouped_convs_and_caps_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 5, 5)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir, max_features=50) as stats:
        model(x)
    assert "grouped" in stats.skipped["2.weight"]
    assert stats.second_moment("4.weight") is None  # 72 features > 50: means only
    assert "max_features" in stats.consumers["4.weight"].outer_skipped


def test_state_dict_round_trip():
    model = _conv_net()
    x = torch.randn(4, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        model(x)
    restored = collect_statistics(ir)
    restored.load_state_dict(stats.state_dict())
    for name in stats.collected():
        torch.testing.assert_close(restored.second_moment(name), stats.second_moment(name))


# -- refits -------------------------------------------------------------------------------------
def _linear_pair(hidden_rank: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 3)).eval()
    x = torch.randn(64, 4) + 0.5
    return model, x


def test_bias_compensation_equals_closed_form():
    model = _conv_net()
    x = torch.randn(16, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        model(x)
    labels = UniformLabelSelector(0.5).select(ir)
    removed = ir.index.removal_mask(np.array([label.class_id for label in labels]))
    pruned = ir.prune(labels=labels, reconstruct=Reconstruction(stats, "bias")).model
    for name, module in (("8.weight", "8"), ("10.weight", "10")):
        drop = removed[stats.consumers[name].classes]
        weight = model.get_parameter(name).detach().double()
        expected = model.get_submodule(module).bias.double() + weight[:, drop] @ stats.mean(name)[drop]
        out_rows = slice(None) if name == "10.weight" else ~removed[_out_classes(ir, name)]
        torch.testing.assert_close(pruned.get_submodule(module).bias.double(), expected[out_rows].detach())
        torch.testing.assert_close(pruned.get_parameter(name).double(), weight[out_rows][:, ~drop])
    # the conv has no bias but a batch norm after it: the shift leaves through the norm's running mean
    drop = removed[stats.consumers["3.weight"].classes]
    weight = model[3].weight.detach().double().reshape(12, -1)
    kept_out = ~removed[_out_classes(ir, "3.weight")]
    shift = (weight[:, drop] @ stats.mean("3.weight")[drop])[kept_out]
    assert pruned[3].bias is None
    torch.testing.assert_close(pruned[4].running_mean.double(), model[4].running_mean.double()[kept_out] - shift,
                               rtol=1e-6, atol=1e-6)


def test_a_created_bias_is_pruned_with_its_layer_later():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(64, 4)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        reference = model(x)
    first = [label for label in ir.labels() if label.group.channel_count == 8][:3]
    removed = ir.index.removal_mask(np.array([label.class_id for label in first]))
    pruned = ir.prune(labels=first, reconstruct=Reconstruction(stats, "bias"))
    drop = removed[stats.consumers["2.weight"].classes]
    expected = model[2].weight.detach().double()[:, drop] @ stats.mean("2.weight")[drop]
    torch.testing.assert_close(pruned.model[2].bias.double(), expected.detach())
    assert _mse(pruned.model(x), reference) < _mse(ir.prune(labels=first).model(x), reference)
    second = [label for label in pruned.labels() if label.group.channel_count == 6][:2]
    smaller = pruned.prune(labels=second).model
    assert smaller[2].bias.shape == (4,) and smaller(x).shape == (64, 3)


def _out_classes(ir: PruningIR, name: str) -> np.ndarray:
    return next(b.classes for b in ir.index.parameter_bindings if b.target.name == name and b.target.dim == 0)


def test_least_squares_reproduces_linear_combinations_exactly():
    """The hidden layer has rank 4 of 8: any removed unit is a combination of the kept ones."""
    model, x = _linear_pair()
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        reference = model(x)
    labels = [label for label in ir.labels() if label.channel in (1, 4, 6)]
    assert len(labels) == 3
    plain = ir.prune(labels=labels).model
    fitted = ir.prune(labels=labels, reconstruct=Reconstruction(stats, ridge=1e-10)).model
    assert _mse(plain(x), reference) > 1e-2
    torch.testing.assert_close(fitted(x), reference, atol=1e-5, rtol=1e-5)


def test_least_squares_beats_no_reconstruction_and_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    x = torch.randn(256, 6)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        reference = model(x)
    labels = UniformLabelSelector(0.5).select(ir)
    errors = {method: _mse(ir.prune(labels=labels, reconstruct=None if method is None else
                                    Reconstruction(stats, method)).model(x), reference)
              for method in (None, "bias", "least_squares")}
    assert errors["least_squares"] < errors["bias"] < errors[None]
    assert errors["least_squares"] < 0.5 * errors[None]


def test_least_squares_on_held_out_data_is_closer_than_no_reconstruction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    calibration, held_out = torch.randn(512, 6), torch.randn(256, 6)
    ir = PruningIR(model).infer_labels(calibration)
    with collect_statistics(ir) as stats:
        model(calibration)
    labels = UniformLabelSelector(0.5).select(ir)
    reference = model(held_out)
    none = _mse(ir.prune(labels=labels).model(held_out), reference)
    fitted = _mse(ir.prune(labels=labels, reconstruct=Reconstruction(stats)).model(held_out), reference)
    assert fitted < 0.5 * none


@pytest.mark.parametrize("method", ["bias", "least_squares"])
def test_dead_labels_stay_exact(method):
    model = _conv_net()
    x = torch.randn(8, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    labels = pick_labels(ir, 0.5, seed=1)
    ir.zero_labels(labels)
    with collect_statistics(ir) as stats:
        reference = model(x)
    removed = ir.index.removal_mask(np.array([label.class_id for label in labels]))
    for name in stats.collected():  # the consumers see exactly 0 on the removed channels
        drop = removed[stats.consumers[name].classes]
        assert drop.any() and torch.all(stats.second_moment(name)[drop] == 0)
    reconstruction = Reconstruction(stats, method)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    torch.testing.assert_close(pruned(x), reference, atol=1e-5, rtol=1e-5)
    assert sorted(reconstruction.report.refit) == ["10.weight", "3.weight", "8.weight"]


def test_masked_model_statistics_and_exactness():
    """Statistics follow the weights a masked model computes before each forward (GradualPruner's)."""
    model = _conv_net()
    x = torch.randn(8, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    labels = pick_labels(ir, 0.5, seed=2)
    ir.mask(labels)
    with collect_statistics(ir) as stats:
        reference = model(x)
    assert sorted(stats.collected()) == ["10.weight", "3.weight", "8.weight"]
    pruned = ir.prune(labels=ir.masked_labels(), reconstruct=Reconstruction(stats)).model
    torch.testing.assert_close(pruned(x), reference, atol=1e-5, rtol=1e-5)


def test_conv_net_with_batchnorm_reestimation():
    model = _conv_net()
    data = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    ir = PruningIR(model).infer_labels(data[0])
    with collect_statistics(ir) as stats:
        for x in data:
            model(x)
    labels = UniformLabelSelector(0.5).select(MagnitudeCriterion(ir).apply())
    reference = torch.cat([model(x) for x in data])
    errors = {}
    for method in (None, "least_squares"):
        pruned = ir.prune(labels=labels, reconstruct=None if method is None else Reconstruction(stats, method))
        tune_batchnorm_statistics(pruned.model, data, verbose=False)
        errors[method] = _mse(torch.cat([pruned.model(x) for x in data]), reference)
    assert errors["least_squares"] < errors[None]


def test_transformer_mlp_down_projections_are_refit():
    torch.manual_seed(0)
    model = _MLPBlock().eval()
    x = torch.randn(8, 10, 16)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        reference = model(x)
    mlp = [group for group in ir.groups if group.prunable and any("up.weight" in p for p in group.parameters)]
    labels = [label for group in mlp for label in group.labels[::2]]
    reconstruction = Reconstruction(stats)
    fitted = _mse(ir.prune(labels=labels, reconstruct=reconstruction).model(x), reference)
    plain = _mse(ir.prune(labels=labels).model(x), reference)
    assert sorted(reconstruction.report.refit) == ["blocks.0.down.weight", "blocks.1.down.weight"]
    assert fitted < 0.5 * plain


def test_attention_inside_a_leaf_is_reported_skipped():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.proj(x)
            return self.head(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 4)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        model(x)
    heads = [g for g in ir.groups if g.prunable and any("in_proj" in p for p in g.parameters)]
    assert heads
    reconstruction = Reconstruction(stats)
    with pytest.warns(UserWarning, match="not refit"):
        ir.prune(labels=heads[0].labels[:1], reconstruct=reconstruction)
    assert any("leaf module" in reason for reason in reconstruction.report.skipped.values())


def test_statistics_of_another_ir_are_refused():
    model = _conv_net()
    x = torch.randn(4, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x)
    with collect_statistics(ir) as stats:
        model(x)
    smaller = ir.prune(labels=UniformLabelSelector(0.25).select(ir))
    with pytest.raises(ValueError, match="another IR"):
        smaller.prune(labels=UniformLabelSelector(0.25).select(smaller), reconstruct=Reconstruction(stats))


def test_inside_a_criterion_and_inferring_labels_on_the_first_call():
    model = _conv_net().train()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    ir = PruningIR(model)
    with collect_statistics(ir) as stats, LossAwareCriterion(ir) as collector:
        for x, y in data:
            F.cross_entropy(collector(x), y).backward()
    assert stats.count("8.weight") == 24  # the tracer's pass is not counted
    model.eval()
    reference = model(data[0][0])
    labels = UniformLabelSelector(0.5).select(ir)
    fitted = _mse(ir.prune(labels=labels, reconstruct=Reconstruction(stats, "bias")).model(data[0][0]), reference)
    assert np.isfinite(fitted)


def test_prune_in_rounds_recollects_every_round():
    model = _conv_net()
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))) for _ in range(3)]
    ir = PruningIR(model).infer_labels(data[0][0])

    def calibrate(collector):
        for x, y in data:
            F.cross_entropy(collector(x), y).backward()

    with torch.no_grad():
        reference = torch.cat([model(x) for x, _ in data])
    results = {}
    for method in (None, "least_squares"):
        pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibrate, rounds=2, reconstruct=method,
                                 verbose=False)
        with torch.no_grad():
            results[method] = _mse(torch.cat([pruned.model.eval()(x) for x, _ in data]), reference)
    assert results["least_squares"] < results[None]


# -- devices ------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_and_refit_stay_on_the_device():
    model = _conv_net().cuda()
    x = torch.randn(16, 3, 8, 8, device="cuda")
    ir = PruningIR(model).infer_labels(x)
    labels = pick_labels(ir, 0.5, seed=1)
    ir.zero_labels(labels)
    with collect_statistics(ir, dtype=torch.float32) as stats:
        reference = model(x)
    assert all(stats.mean(name).is_cuda for name in stats.collected())
    pruned = ir.prune(labels=labels, reconstruct=Reconstruction(stats)).model
    assert all(p.is_cuda for p in pruned.parameters())
    torch.testing.assert_close(pruned(x), reference, atol=1e-4, rtol=1e-4)


WORLD_SIZE = 2


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 3, 8, 8, generator=g) for _ in range(4)]


def _collected(batches) -> dict[str, np.ndarray]:
    model = _conv_net()
    ir = PruningIR(model).infer_labels(_batches()[0])
    with collect_statistics(ir, max_positions=None) as stats:
        for x in batches:
            model(x)
    return {name: stats.second_moment(name).numpy() for name in sorted(stats.collected())}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **_collected(_batches()[rank::WORLD_SIZE]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_statistics_are_all_reduced_across_ranks(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(WORLD_SIZE)]
    single = _collected(_batches())
    assert sorted(ranks[0]) == sorted(single)
    for name, value in single.items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])
        np.testing.assert_allclose(ranks[0][name], value, rtol=1e-10, atol=1e-12)


# -- a Hugging Face Llama: attention output and MLP down projections --------------------------------
def _llama_heads_and_mlp(gqa_unit: str) -> tuple[PruningIR, list, list[torch.Tensor]]:
    """A tiny HF Llama (4 query / 2 key-value heads), its IR, and half the labels of every head and MLP group
    (the hidden size kept)."""
    from hf_models import HF_ZOO
    model = HF_ZOO["llama"].build()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 100, (4, 16), generator=generator) for _ in range(6)]
    ir = PruningIR(model, gqa_unit=gqa_unit).infer_labels(batches[0])
    inner = [g for g in ir.groups if g.prunable and all("self_attn" in m or ".mlp" in m for m in g.modules)]
    labels = [label for group in inner for label in group.labels[::2]]
    return ir, labels, batches


def _llama_consumers(ir: PruningIR) -> list[str]:
    return sorted(f"model.layers.{i}.{name}.weight" for i in range(len(ir.model.model.layers))
                  for name in ("self_attn.o_proj", "mlp.down_proj"))


@pytest.mark.filterwarnings("ignore:the pruned LlamaForCausalLM's config cannot describe it")  # created biases
@pytest.mark.parametrize("gqa_unit", ["kv_groups", "query_heads"])
@pytest.mark.parametrize("method", ["bias", "least_squares"])
def test_llama_dead_heads_and_mlp_channels_stay_exact(gqa_unit, method):
    """o_proj (reading the removed heads) and down_proj (reading the removed MLP channels) are refit, none
    skipped; with those channels exactly 0, the refit pruned model gives the same logits."""
    ir, labels, batches = _llama_heads_and_mlp(gqa_unit)
    ir.zero_labels(labels)
    with collect_statistics(ir) as stats, torch.no_grad():
        for ids in batches[:4]:
            ir.model(ids)
        reference = ir.model(batches[4]).logits
    reconstruction = Reconstruction(stats, method)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    assert sorted(reconstruction.report.refit) == _llama_consumers(ir)
    assert reconstruction.report.skipped == {}
    assert pruned.model.layers[0].self_attn.o_proj.in_features < ir.model.model.layers[0].self_attn.o_proj.in_features
    with torch.no_grad():
        torch.testing.assert_close(pruned(batches[4]).logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:the pruned LlamaForCausalLM's config cannot describe it")  # created biases
@pytest.mark.parametrize("gqa_unit", ["kv_groups", "query_heads"])
def test_llama_least_squares_lowers_the_output_error(gqa_unit):
    """On held-out batches from the calibration distribution, least squares brings the pruned logits closer to
    the unpruned ones than no reconstruction; without a created bias (create_bias=False: the uncentred refit)
    the model keeps Llama's bias-free layers, so its config still describes it."""
    ir, _, batches = _llama_heads_and_mlp(gqa_unit)
    labels = UniformLabelSelector(0.5).select(MagnitudeCriterion(ir).apply())
    labels = [label for label in labels if all("self_attn" in m or ".mlp" in m for m in label.group.modules)]
    with collect_statistics(ir) as stats, torch.no_grad():
        for ids in batches[:4]:
            ir.model(ids)
    held_out = torch.cat(batches[4:])
    with torch.no_grad():
        reference = ir.model(held_out).logits
        errors = {}
        for name, reconstruct in (("none", None), ("least_squares", Reconstruction(stats)),
                                  ("no_bias", Reconstruction(stats, create_bias=False))):
            pruned = ir.prune(labels=labels, reconstruct=reconstruct).model
            errors[name] = _mse(pruned(held_out).logits, reference)
            if reconstruct is not None:
                assert sorted(reconstruct.report.refit) == _llama_consumers(ir)
    assert errors["least_squares"] < 0.9 * errors["none"], errors
    assert errors["no_bias"] < 0.9 * errors["none"], errors
    assert not any(name.endswith("bias") for name, _ in pruned.named_parameters())
    assert pruned.config.intermediate_size == pruned.model.layers[0].mlp.down_proj.in_features


@pytest.mark.filterwarnings("ignore:the pruned LlamaForCausalLM's config cannot describe it")  # created biases
def test_statistics_of_chosen_groups_only():
    """groups= keeps only the consumers of those groups (here o_proj and down_proj: the residual stream's readers
    are left out) and refits them exactly as statistics of every consumer do; an unknown group id is refused."""
    ir, labels, batches = _llama_heads_and_mlp("kv_groups")
    inner = {label.group.id for label in labels}
    collected = {}
    for groups in (None, inner, lambda group: group.id in inner):
        with collect_statistics(ir, groups=groups) as stats, torch.no_grad():
            for ids in batches[:4]:
                ir.model(ids)
        reconstruction = Reconstruction(stats)
        with torch.no_grad():
            collected[groups is None] = (sorted(stats.collected()), ir.prune(
                labels=labels, reconstruct=reconstruction).model(batches[4]).logits)
        assert sorted(reconstruction.report.refit) == _llama_consumers(ir)
        if groups is not None:
            assert collected[False][0] == _llama_consumers(ir)
            assert "reads none of the groups" in stats.skipped["lm_head.weight"]
            torch.testing.assert_close(collected[False][1], collected[True][1], atol=1e-6, rtol=1e-6)
    refused = collect_statistics(ir, groups=[10 ** 6])
    with pytest.raises(ValueError, match="no group with id"):
        refused.start()
    assert not refused.active


@pytest.mark.filterwarnings("ignore:the pruned LlamaForCausalLM's config cannot describe it")  # created biases
def test_llama_hidden_size_refits_every_reader_and_no_embedding():
    """Pruning the hidden size too: every projection reading the residual stream (q/k/v, gate/up, lm_head) is refit;
    the embedding, whose weight's dimension 1 is its output, is not a consumer (not reported as skipped)."""
    ir, _, batches = _llama_heads_and_mlp("kv_groups")
    with collect_statistics(ir) as stats, torch.no_grad():
        for ids in batches[:4]:
            ir.model(ids)
    assert "model.embed_tokens.weight" not in stats.consumers
    labels = UniformLabelSelector(0.25).select(MagnitudeCriterion(ir).apply())
    reconstruction = Reconstruction(stats)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    assert pruned.model.norm.weight.shape[0] < ir.model.model.norm.weight.shape[0]  # the hidden size went down
    assert reconstruction.report.skipped == {}
    layers = len(ir.model.model.layers)
    readers = [f"model.layers.{i}.{name}.weight" for i in range(layers) for name in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert set(readers + ["lm_head.weight"]) <= set(reconstruction.report.refit)
