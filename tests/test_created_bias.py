"""A bias created by prune(reconstruct=...) is trained by the optimizer passed to prune() and
survives save_pruned / load_pruned (and a dill-saved IR); tampered records of created
parameters are refused with the freshly built model bit-identical (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import dill
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import pick_labels
from pruning_ir import PruningIR, Reconstruction, UniformLabelSelector, collect_statistics, load_pruned, \
    prune_in_rounds, save_pruned
from pruning_ir.errors import PrunedModelFormatError
from pruning_ir.saving import CONFIG_FILE, SAFETENSORS_WEIGHTS_FILE, TORCH_WEIGHTS_FILE
from test_saving_tampered import (FORMATS, Heads, assert_unchanged, copy_saved, edit_config, edit_weights,
                                  saved_in_each_format, snapshot)

CREATED = ["conv2.bias", "fc1.bias", "fc2.bias"]


class NoBiasNet(nn.Module):
    """Layers built without a bias and no batch norm after them: reconstruction creates their biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(12, 16, bias=False)
        self.fc2 = nn.Linear(16, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


class Gated(NoBiasNet):
    """NoBiasNet with a module whose size attribute fails when set (after the tensors are written)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Heads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(super().forward(x))


def _calibrated(cls: type[NoBiasNet] = NoBiasNet):
    """A model, its IR and input statistics, labels removing a share of every group, and inputs."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(32, 3, 8, 8)
    ir = PruningIR(model).infer_labels(x[:2])
    with collect_statistics(ir) as stats:
        model(x)
    return model, ir, stats, pick_labels(ir, 0.4), x


def _reconstructed(method: str = "least_squares", cls: type[NoBiasNet] = NoBiasNet):
    model, ir, stats, labels, x = _calibrated(cls)
    pruned = ir.prune(labels=labels, reconstruct=Reconstruction(stats, method))
    assert sorted(pruned.created_parameters) == CREATED and model.fc1.bias is None
    return pruned, x


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    targets = torch.arange(len(x)) % 5
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), targets).backward()
        optimizer.step()


# ---- the optimizer ---------------------------------------------------------------------------

OPTIMIZERS = {"adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
              "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_created_bias_joins_the_group_of_its_weight_and_trains(name):
    """Two groups, fc2's weight frozen: conv2.bias joins group 0, fc1.bias group 1, fc2.bias none;
    the other parameters' state is what the same prune without reconstruction carries."""
    model, ir, stats, labels, x = _calibrated()

    def groups(m):
        return [{"params": [m.conv1.weight, m.conv1.bias, m.conv2.weight]}, {"params": [m.fc1.weight], "lr": 1e-3}]
    optimizer = OPTIMIZERS[name](groups(model))
    _train(model, optimizer, x, steps=2)
    twin = OPTIMIZERS[name](groups(model))
    twin.load_state_dict(optimizer.state_dict())
    plain = ir.prune(labels=labels, optimizer=twin)
    pruned = ir.prune(labels=labels, optimizer=optimizer, reconstruct=Reconstruction(stats))
    assert plain.created_parameters == () and sorted(pruned.created_parameters) == CREATED

    def placed(ir_, opt):
        names = {id(p): n for n, p in ir_.model.named_parameters()}
        return {names[id(p)]: (i, opt.state.get(p)) for i, group in enumerate(opt.param_groups) for p in group["params"]}
    ours, theirs = placed(pruned, optimizer), placed(plain, twin)
    assert {n: i for n, (i, _) in ours.items()} == {**{n: i for n, (i, _) in theirs.items()},
                                                    "conv2.bias": 0, "fc1.bias": 1}
    assert ours["conv2.bias"][1] is None and ours["fc1.bias"][1] is None  # fresh state
    for n, (_, state) in theirs.items():
        assert state.keys() == ours[n][1].keys() and state
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ours[n][1][key])), (n, key)

    before = {n: pruned.model.get_parameter(n).detach().clone() for n in CREATED}
    _train(pruned.model.train(), optimizer, x, steps=1)
    for n in ("conv2.bias", "fc1.bias"):
        assert not torch.equal(pruned.model.get_parameter(n), before[n]), n
        assert pruned.model.get_parameter(n) in optimizer.state
    assert torch.equal(pruned.model.fc2.bias, before["fc2.bias"])  # its layer is frozen: so is the bias


def test_created_biases_are_trained_after_pruning_in_rounds():
    torch.manual_seed(0)
    model = NoBiasNet()
    x = torch.randn(16, 3, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def calibrate(collector):
        F.cross_entropy(collector(x), torch.arange(16) % 5).backward()
    pruned = prune_in_rounds(PruningIR(model), UniformLabelSelector, 0.4, calibrate, rounds=2, optimizer=optimizer,
                             reconstruct="bias", verbose=False)
    assert sorted(pruned.created_parameters) == CREATED
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in pruned.model.parameters()} == held
    before = pruned.model.fc2.bias.detach().clone()
    _train(pruned.model, optimizer, x, steps=1)
    assert not torch.equal(pruned.model.fc2.bias, before)


# ---- save_pruned / load_pruned ----------------------------------------------------------------

@pytest.mark.parametrize("weights_format", FORMATS)
@pytest.mark.parametrize("method", ["bias", "least_squares"])
def test_round_trip_rebuilds_the_created_biases(tmp_path, method, weights_format):
    pruned, x = _reconstructed(method)
    save_pruned(pruned, tmp_path, weights_format=weights_format)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["version"] == 2
    assert sorted(config["created_parameters"], key=lambda entry: entry["module"]) == [
        {"module": n.rpartition(".")[0], "name": "bias", "shape": [pruned.model.get_parameter(n).shape[0]]}
        for n in CREATED]
    fresh = NoBiasNet()
    assert fresh.conv2.bias is None and fresh.fc1.bias is None and fresh.fc2.bias is None
    loaded = load_pruned(fresh, tmp_path).eval()
    assert list(loaded.state_dict()) == list(pruned.model.state_dict())
    for n in CREATED:
        bias = loaded.get_parameter(n)
        assert isinstance(bias, nn.Parameter) and bias.requires_grad
        assert torch.equal(bias, pruned.model.get_parameter(n))
    assert {id(p) for p in loaded.parameters()} >= {id(loaded.get_parameter(n)) for n in CREATED}
    with torch.no_grad():
        assert (loaded(x) - pruned.model(x)).abs().max() < 1e-6


def test_a_created_bias_pruned_again_is_saved_with_its_new_shape(tmp_path):
    pruned, x = _reconstructed()
    again = pruned.prune(labels=pick_labels(pruned, 0.3))
    assert again.created_parameters == pruned.created_parameters
    assert again.model.conv2.bias.shape[0] == again.model.conv2.out_channels < pruned.model.conv2.out_channels
    save_pruned(again, tmp_path)
    loaded = load_pruned(NoBiasNet(), tmp_path).eval()
    assert loaded.conv2.bias.shape == again.model.conv2.bias.shape
    with torch.no_grad():
        assert (loaded(x) - again.model.eval()(x)).abs().max() < 1e-6


def test_a_file_without_created_parameters_stays_version_1(tmp_path):
    model, ir, _, labels, _ = _calibrated()
    save_pruned(ir.prune(labels=labels), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["version"] == 1 and "created_parameters" not in config


def test_the_bare_model_of_a_reconstructed_prune_is_refused_with_a_hint(tmp_path):
    """Its created biases look built-in to save_pruned: load_pruned refuses the file, saying why."""
    pruned, _ = _reconstructed()
    save_pruned(pruned.model, tmp_path)
    _assert_refused(tmp_path, r"created by prune\(reconstruct=...\).*save_pruned\(ir, path\)")


def test_dill_round_trip_of_an_ir_with_created_biases(tmp_path):
    pruned, x = _reconstructed()
    torch.save(pruned, tmp_path / "ir.pt", pickle_module=dill)
    loaded = torch.load(tmp_path / "ir.pt", pickle_module=dill, weights_only=False)
    assert loaded.created_parameters == pruned.created_parameters
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), pruned.model.eval()(x))
    again = loaded.prune(labels=pick_labels(loaded, 0.3))
    save_pruned(again, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(load_pruned(NoBiasNet(), tmp_path / "saved").eval()(x), again.model.eval()(x))


# ---- tampered records ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A reconstructed NoBiasNet (created biases) saved in both weight formats: (pruned model, {format: folder})."""
    pruned, _ = _reconstructed()
    return pruned.model, saved_in_each_format(pruned, tmp_path_factory)


def _assert_refused(folder: Path, match: str, cls: type[NoBiasNet] = NoBiasNet,
                    error: type[Exception] = PrunedModelFormatError) -> None:
    model = cls()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_pruned(model, folder)
    assert_unchanged(model, before)
    assert model.fc1.bias is None


def _create(module: str, name: str, shape) -> callable:
    def edit(config):
        config["created_parameters"].append({"module": module, "name": name, "shape": shape})
    return edit


def _bias_of(module: str, size: int):
    """Edits giving ``module`` a bias of ``size`` in the module entry, the created record and the weights."""
    def config_edit(config):
        config["modules"][module]["parameters"]["bias"] = [size]
        for entry in config["created_parameters"]:
            if entry["module"] == module:
                entry["shape"] = [size]

    def weights_edit(state):
        state[f"{module}.bias"] = torch.zeros(size)
    return config_edit, weights_edit


@pytest.mark.parametrize("weights_format", FORMATS)
def test_the_untampered_files_load(saved, tmp_path, weights_format):
    loaded = load_pruned(NoBiasNet(), copy_saved(saved, tmp_path, weights_format))
    assert all(torch.equal(loaded.get_parameter(n), saved[0].get_parameter(n)) for n in CREATED)


def test_a_created_bias_on_a_module_that_has_one(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _create("conv1", "bias", [saved[0].conv1.out_channels]))
    _assert_refused(folder, "conv1 .*already has one")


@pytest.mark.parametrize("name", ["weight", "forward", "bias_orig", 3])
def test_a_created_parameter_that_is_not_a_bias(saved, tmp_path, name):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config["created_parameters"][1].update({"name": name}))
    _assert_refused(folder, "only ever creates a bias")


@pytest.mark.parametrize("module, match", [("", "NoBiasNet.*only on a Linear or a convolution"),
                                           ("ghost", "'ghost', which the model does not have"),
                                           (["fc1"], "which the model does not have")])
def test_a_created_bias_on_a_module_of_another_kind(saved, tmp_path, module, match):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _create(module, "bias", [5]))
    _assert_refused(folder, match)


def test_a_created_bias_on_a_module_of_another_kind_with_consistent_weights(tmp_path):
    """Gated's gate (a user module) holds no bias: a bias created there, in the entry and the weights, is refused."""
    pruned, _ = _reconstructed(cls=Gated)
    save_pruned(pruned, tmp_path)
    edit_config(tmp_path, _create("gate", "bias", [5]))
    edit_config(tmp_path, lambda config: config["modules"]["gate"].update({"parameters": {"bias": [5]}}))
    edit_weights(tmp_path, lambda state: state.update({"gate.bias": torch.zeros(5)}))
    _assert_refused(tmp_path, "Heads.*only on a Linear or a convolution", cls=Gated)


def test_a_created_bias_whose_shape_contradicts_the_out_channels(saved, tmp_path):
    """Entry, record and weights agree on one more output than fc1 has: the layer's sizes refuse it."""
    folder = copy_saved(saved, tmp_path)
    config_edit, weights_edit = _bias_of("fc1", saved[0].fc1.out_features + 1)
    edit_config(folder, config_edit)
    edit_weights(folder, weights_edit)
    _assert_refused(folder, r"fc1 \(Linear\) is inconsistent after loading: bias")


@pytest.mark.parametrize("shape", [[3, 1], [0], [-2], ["4"], [2 ** 40], 7, None])
def test_a_created_bias_with_an_invalid_shape(saved, tmp_path, shape):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config["created_parameters"][0].update({"shape": shape}))
    _assert_refused(folder, r"the shape .*\[out channels\]")


def test_a_created_bias_whose_record_and_module_entry_disagree(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    size = saved[0].fc1.out_features
    edit_config(folder, lambda config: config["modules"]["fc1"]["parameters"].update({"bias": [size - 1]}))
    _assert_refused(folder, f"fc1.bias is created with shape \\[{size}\\], but module fc1 gives it \\[{size - 1}\\]")


def test_a_created_bias_the_module_entry_does_not_list(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config["modules"]["fc1"]["parameters"].pop("bias"))
    _assert_refused(folder, r"fc1 has parameters \['bias', 'weight'\] here but \['weight'\]")


def test_a_created_bias_recorded_twice(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config["created_parameters"].append(dict(config["created_parameters"][0])))
    _assert_refused(folder, "twice")


@pytest.mark.parametrize("records, match", [({}, "must be a list"), ([["fc1", "bias", [3]]], "keys"),
                                            ([{"module": "fc1", "name": "bias"}], "keys"),
                                            ([{"module": "fc1", "name": "bias", "shape": [3], "init": 1}], "keys")])
def test_malformed_created_parameters(saved, tmp_path, records, match):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config.update({"created_parameters": records}))
    _assert_refused(folder, match)


def test_the_record_dropped_from_the_configuration(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config.pop("created_parameters"))
    _assert_refused(folder, "created by prune")


@pytest.mark.parametrize("weights_format", FORMATS)
def test_weights_without_the_created_bias(saved, tmp_path, weights_format):
    folder = copy_saved(saved, tmp_path, weights_format)
    edit_weights(folder, lambda state: state.pop("fc1.bias"))
    _assert_refused(folder, r"missing \['fc1.bias'\]")


@pytest.mark.parametrize("weights_format", FORMATS)
def test_weights_with_a_created_bias_of_another_shape(saved, tmp_path, weights_format):
    folder = copy_saved(saved, tmp_path, weights_format)
    edit_weights(folder, lambda state: state.update({"fc1.bias": torch.zeros(len(state["fc1.bias"]) - 1)}))
    _assert_refused(folder, "fc1.bias has shape")


def test_weights_with_an_integer_created_bias(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_weights(folder, lambda state: state.update({"fc1.bias": state["fc1.bias"].to(torch.int64)}))
    _assert_refused(folder, "fc1.bias.*floating")


def test_a_failure_after_the_created_bias_is_written_restores_the_model(tmp_path):
    """The checks pass, but setting the gate's heads fails after the biases were created: roll back."""
    pruned, _ = _reconstructed(cls=Gated)
    save_pruned(pruned, tmp_path)
    edit_config(tmp_path, lambda config: config["modules"]["gate"].update({"attributes": {"heads": 2}}))
    _assert_refused(tmp_path, "heads cannot be set", cls=Gated, error=RuntimeError)
