"""The sequential refit: consumers refit one after the other on the pruned model's own inputs.

Checked against a brute-force least squares on the inputs the pruned model really gives a layer,
for exactness on dead labels (sampled conv positions paired between the two models), for a lower
output error than the independent refit, and for its errors (nothing half-written)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import PruningIR, Reconstruction, UniformLabelSelector, collect_statistics, prune_in_rounds
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion
from pruning_ir.sequential_refit import RefitTarget, refit_sequentially
from helpers import pick_labels


def _calibrated(model: nn.Module, data: list, share: float = 0.5) -> tuple:
    """The IR of ``model``, its input statistics over ``data``, and the magnitude labels of ``share``."""
    ir = PruningIR(model).infer_labels(data[0])
    with collect_statistics(ir) as stats:
        for x in data:
            model(x)
    return ir, stats, UniformLabelSelector(share).select(MagnitudeCriterion(ir).apply())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().pow(2).mean())


def _conv_net(seed: int = 0) -> nn.Module:
    """conv(bias) -> bn, conv(no bias) -> bn (the shift goes out of its running mean), two linears."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    for module in model.modules():  # running statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _chain(seed: int = 0, width: int = 24, depth: int = 4, activation: type = nn.ReLU) -> nn.Module:
    """A deep MLP chain: every hidden layer is pruned and read by the next."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, width), activation()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), activation()]
    model = nn.Sequential(*layers, nn.Linear(width, 3)).eval()
    for layer in model:
        if isinstance(layer, nn.Linear):  # activations of order 1 all the way down
            nn.init.normal_(layer.weight, 0, (2 / layer.in_features) ** 0.5)
            nn.init.normal_(layer.bias, 0, 0.1)
    return model


def _batches(count: int, *shape: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,create_bias", [("least_squares", True), ("least_squares", False),
                                                ("bias", True)])
def test_dead_labels_stay_exact_with_sampled_conv_positions(method, create_bias):
    """Dead channels removed: each layer's inputs are the unpruned kept ones, so the refit changes
    nothing, which holds only if both models' patches are taken at the same sampled positions."""
    model = _conv_net()
    data = _batches(3, 8, 3, 8, 8)
    ir = PruningIR(model).infer_labels(data[0])
    labels = pick_labels(ir, 0.5, seed=1)
    ir.zero_labels(labels)
    with collect_statistics(ir, max_positions=20) as stats:  # 8 * 16 positions in the strided conv
        reference = [model(x) for x in data]
    reconstruction = Reconstruction(stats, method, create_bias=create_bias, sequential=data)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    for x, expected in zip(data + _batches(2, 8, 3, 8, 8, seed=5), reference + [model(x) for x in
                                                                              _batches(2, 8, 3, 8, 8, seed=5)]):
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    assert reconstruction.report.sequential == [name for name in ("3.weight", "8.weight", "10.weight")
                                                if name in reconstruction.report.refit]


def test_dead_llama_style_mlp_stays_exact():
    """Pre-norm residual MLP blocks (the down projections are the consumers)."""
    torch.manual_seed(0)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(2))
            self.up = nn.ModuleList(nn.Linear(16, 40) for _ in range(2))
            self.down = nn.ModuleList(nn.Linear(40, 16, bias=False) for _ in range(2))

        def forward(self, x):
            for norm, up, down in zip(self.norms, self.up, self.down):
                x = x + down(F.gelu(up(norm(x))))
            return x

    model = Blocks().eval()
    data = _batches(3, 4, 5, 16)
    ir = PruningIR(model).infer_labels(data[0])
    labels = pick_labels(ir, 0.4, seed=3)
    ir.zero_labels(labels)
    with collect_statistics(ir) as stats:
        reference = [model(x) for x in data]
    reconstruction = Reconstruction(stats, create_bias=False, sequential=data)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    for x, expected in zip(data, reference):
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    assert reconstruction.report.sequential == ["down.0.weight", "down.1.weight"]


@pytest.mark.filterwarnings("ignore:the pruned LlamaForCausalLM's config cannot describe it")  # created biases
@pytest.mark.parametrize("create_bias", [True, False])
def test_hugging_face_llama_dead_heads_and_mlp_stay_exact_in_call_order(create_bias):
    """o_proj and down_proj of each layer, refit in the order the model runs them; dead channels: same logits."""
    from hf_models import HF_ZOO
    model = HF_ZOO["llama"].build()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 100, (4, 16), generator=generator) for _ in range(4)]
    ir = PruningIR(model, gqa_unit="kv_groups").infer_labels(batches[0])
    inner = [g for g in ir.groups if g.prunable and all("self_attn" in m or ".mlp" in m for m in g.modules)]
    labels = [label for group in inner for label in group.labels[::2]]
    ir.zero_labels(labels)
    with collect_statistics(ir) as stats, torch.no_grad():
        reference = [model(ids).logits for ids in batches]
    reconstruction = Reconstruction(stats, create_bias=create_bias, sequential=batches[:3])
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    layers = range(len(model.model.layers))
    assert reconstruction.report.sequential == [f"model.layers.{i}.{name}.weight" for i in layers
                                                for name in ("self_attn.o_proj", "mlp.down_proj")]
    with torch.no_grad():
        for ids, expected in zip(batches, reference):
            torch.testing.assert_close(pruned(ids).logits, expected, atol=1e-5, rtol=1e-5)


# -- the fit ------------------------------------------------------------------------------------
def test_each_layer_is_the_least_squares_fit_on_its_pruned_inputs():
    """Brute force: the refit layer k equals the affine least squares of the unpruned output of
    layer k on the inputs the pruned model (layers before k already refit) gives it."""
    model = _chain(depth=3, activation=nn.Tanh)  # no dead units: the fits are well-posed without a ridge
    data = _batches(4, 64, 6)
    ir, stats, labels = _calibrated(model, data)
    reconstruction = Reconstruction(stats, ridge=0.0, sequential=data)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    assert reconstruction.report.sequential == ["2.weight", "4.weight", "6.weight"]
    x = torch.cat(data)
    removed = ir.index.removal_mask(np.array([label.class_id for label in labels]))
    for position in (2, 4, 6):
        inputs = pruned[:position](x).double()                       # what the refit layer reads now
        target = model[:position + 1](x).double()                    # the unpruned layer's output
        design = torch.cat([inputs, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, target).solution.T        # (out, in + 1)
        out_classes = [b.classes for b in ir.index.parameter_bindings
                       if b.target.name == f"{position}.weight" and b.target.dim == 0]
        if out_classes:  # a hidden layer: its kept output rows
            solution = solution[torch.as_tensor(np.flatnonzero(~removed[out_classes[0]]))]
        assert solution.shape[0] == pruned[position].out_features
        torch.testing.assert_close(pruned[position].weight.double(), solution[:, :-1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pruned[position].bias.double(), solution[:, -1], atol=1e-6, rtol=1e-5)


def test_one_consumer_after_unpruned_layers_equals_the_independent_refit():
    """With nothing refit before it, a consumer's pruned inputs are its unpruned kept ones: the
    sequential fit (no ridge) is the independent least squares."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 5)).eval()
    data = _batches(4, 50, 6)
    ir, stats, labels = _calibrated(model, data)
    independent = ir.prune(labels=labels, reconstruct=Reconstruction(stats, ridge=0.0)).model
    sequential = ir.prune(labels=labels, reconstruct=Reconstruction(stats, ridge=0.0, sequential=data)).model
    torch.testing.assert_close(sequential[2].weight, independent[2].weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sequential[2].bias, independent[2].bias, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,shape", [(_chain, (64, 6)), (_conv_net, (16, 3, 8, 8))])
def test_sequential_beats_the_independent_refit_on_held_out_data(make, shape):
    model = make(seed=0)
    calibration, held_out = _batches(6, *shape, seed=1), _batches(3, *shape, seed=7)
    ir, stats, labels = _calibrated(model, calibration)
    reference = torch.cat([model(x) for x in held_out])
    errors = {}
    for name, sequential in (("independent", None), ("sequential", calibration)):
        pruned = ir.prune(labels=labels, reconstruct=Reconstruction(stats, sequential=sequential)).model
        errors[name] = _mse(torch.cat([pruned(x) for x in held_out]), reference)
    plain = _mse(torch.cat([ir.prune(labels=labels).model(x) for x in held_out]), reference)
    assert errors["sequential"] < 0.95 * errors["independent"] and errors["independent"] < 0.5 * plain


def test_refine_after_the_prune_equals_the_option():
    model = _conv_net()
    data = _batches(3, 8, 3, 8, 8)
    ir, stats, labels = _calibrated(model, data, 0.4)
    option = ir.prune(labels=labels, reconstruct=Reconstruction(stats, sequential=data)).model
    reconstruction = Reconstruction(stats)
    pruned_ir = ir.prune(labels=labels, reconstruct=reconstruction)
    report = reconstruction.refine(ir.model, pruned_ir, data)
    assert report.sequential == ["3.weight", "8.weight", "10.weight"] and "sequential refit" in str(report)
    for x in data:
        torch.testing.assert_close(pruned_ir.model(x), option(x), atol=1e-6, rtol=1e-6)


def test_in_rounds_through_a_factory():
    model = _chain()
    data = [(x, torch.randint(0, 3, (64,))) for x in _batches(4, 64, 6)]
    made: list[Reconstruction] = []

    def factory(statistics):
        made.append(Reconstruction(statistics, sequential=[x for x, _ in data]))
        return made[-1]

    def calibrate(collector):
        for x, y in data:
            F.cross_entropy(collector(x), y).backward()

    ir = PruningIR(model).infer_labels(data[0][0])
    pruned = prune_in_rounds(ir, UniformLabelSelector, 0.5, calibrate, rounds=2, criterion=LossAwareCriterion,
                             reconstruct=factory, verbose=False)
    assert len(made) == 2 and all(r.report.sequential for r in made)
    assert pruned.model(data[0][0]).shape == (64, 3)


# -- errors -------------------------------------------------------------------------------------
def test_errors_name_the_problem_and_leave_the_pruned_model_as_it_was():
    model = _conv_net()
    data = _batches(3, 8, 3, 8, 8)
    ir, stats, labels = _calibrated(model, data)
    with pytest.raises(TypeError, match="re-iterable"):
        Reconstruction(stats, sequential=iter(data))
    reconstruction = Reconstruction(stats)
    with pytest.raises(RuntimeError, match="call ir.prune"):
        reconstruction.refine(model, model, data)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.raises(ValueError, match="same model twice"):
        reconstruction.refine(pruned, pruned, data)
    with pytest.raises(ValueError, match="not the pruned copy"):
        reconstruction.refine(model, _conv_net(), data)
    calls = []

    def failing(module, batch):  # fails in the second pass, after the first consumer was written
        calls.append(module)
        if len(calls) > 2 * len(data):
            raise RuntimeError("a batch that does not run")
        return module(batch)

    with pytest.raises(RuntimeError, match="does not run"):
        reconstruction.refine(model, pruned, data, forward=failing)
    for key, value in pruned.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    reconstruction.refine(model, pruned, data)  # the same call without the failure writes the weights
    assert not torch.equal(pruned.state_dict()["3.weight"], before["3.weight"])


def test_batches_that_do_not_run_fail_before_an_inplace_prune_writes_anything():
    model = _conv_net()
    data = _batches(2, 8, 3, 8, 8)
    ir, stats, labels = _calibrated(model, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):  # 5 input channels: the first conv cannot run them
        ir.prune(labels=labels, reconstruct=Reconstruction(stats, sequential=[torch.randn(2, 5, 8, 8)]),
                 inplace=True)
    with pytest.raises(ValueError, match="gave no batch"):
        ir.prune(labels=labels, reconstruct=Reconstruction(stats, sequential=[]), inplace=True)
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_saved_pruned_ir_does_not_carry_the_batches(tmp_path):
    import dill
    model = _conv_net()
    data = _batches(2, 8, 3, 8, 8)
    ir, stats, labels = _calibrated(model, data)
    reconstruction = Reconstruction(stats, sequential=data, forward=lambda module, batch: module(batch))
    pruned = ir.prune(labels=labels, reconstruct=reconstruction)
    torch.save(pruned, tmp_path / "ir.pt", pickle_module=dill)
    loaded = torch.load(tmp_path / "ir.pt", pickle_module=dill, weights_only=False)
    assert reconstruction.sequential is data  # the object in use keeps them
    assert loaded.reconstruction.sequential is None and loaded.reconstruction.forward is None
    assert loaded.reconstruction.report.sequential == reconstruction.report.sequential
    torch.testing.assert_close(loaded.model(data[0]), pruned.model(data[0]))


def test_training_flags_are_restored():
    model = _conv_net()
    data = _batches(2, 8, 3, 8, 8)
    ir, stats, labels = _calibrated(model, data)
    reconstruction = Reconstruction(stats)
    pruned = ir.prune(labels=labels, reconstruct=reconstruction).model
    pruned.train()
    reconstruction.refine(model, pruned, data)
    assert all(module.training for module in pruned.modules())
    assert not any(module.training for module in model.modules())


def test_refit_sequentially_refuses_an_iterator_and_unknown_names():
    model = _chain()
    with pytest.raises(TypeError, match="re-iterable"):
        refit_sequentially(model, _chain(), [], iter([torch.randn(2, 6)]))
    with pytest.raises(ValueError, match="no parameter 'missing.weight'"):
        refit_sequentially(model, _chain(), [RefitTarget("missing.weight", "least_squares", None, "bias",
                                                         "missing.bias")], [torch.randn(2, 6)])


# -- devices ------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sequential_refit_stays_on_the_device_and_exact():
    model = _conv_net().cuda()
    data = [x.cuda() for x in _batches(3, 16, 3, 8, 8)]
    ir = PruningIR(model).infer_labels(data[0])
    labels = pick_labels(ir, 0.5, seed=1)
    ir.zero_labels(labels)
    with collect_statistics(ir, max_positions=50) as stats:
        reference = [model(x) for x in data]
    pruned = ir.prune(labels=labels, reconstruct=Reconstruction(stats, sequential=data)).model
    assert all(p.is_cuda for p in pruned.parameters()) and all(b.is_cuda for b in pruned.buffers())
    for x, expected in zip(data, reference):
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
