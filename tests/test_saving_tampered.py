"""load_pruned refuses tampered files before it changes the model (issue 23).

Each case edits a genuinely saved pruned LeNet so that the loader of before the fix
accepted it silently or failed half-way; the loader must raise and leave the freshly
built model bit-identical: same tensors (values and identities), same attributes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import pick_labels
from pruning_ir import PruningIR, load_pruned, save_pruned
from pruning_ir.errors import PrunedModelFormatError
from pruning_ir.saving import CONFIG_FILE, SAFETENSORS_WEIGHTS_FILE, TORCH_WEIGHTS_FILE
from zoo import ZOO

FORMATS = ["torch", pytest.param("safetensors", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("safetensors"), reason="needs safetensors"))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pruned LeNet saved in both weight formats: (pruned model, {format: folder})."""
    entry = ZOO["lenet"]
    ir = PruningIR(entry.build().eval()).infer_labels(*entry.example_inputs())
    pruned = ir.prune(labels=pick_labels(ir, 0.5)).model.eval()
    assert pruned.fc1.out_features < 120 and pruned.conv1.out_channels < 6
    return pruned, saved_in_each_format(pruned, tmp_path_factory)


def saved_in_each_format(pruned, tmp_path_factory) -> dict:
    """``save_pruned(pruned)`` into a fresh folder per weights format installed: {format: folder}."""
    folders = {}
    for weights_format in ("torch", "safetensors"):
        if weights_format == "safetensors" and not __import__("importlib").util.find_spec("safetensors"):
            continue
        folders[weights_format] = save_pruned(pruned, tmp_path_factory.mktemp(weights_format),
                                              weights_format=weights_format)
    return folders


def copy_saved(saved, tmp_path: Path, weights_format: str = "torch") -> Path:
    folder = tmp_path / "saved"
    shutil.copytree(saved[1][weights_format], folder)
    return folder


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    edit(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _edited(state: dict, edit) -> dict:
    """``edit`` changes the weights in place, or returns new ones (a dict)."""
    returned = edit(state)
    return returned if isinstance(returned, dict) else state


def edit_weights(folder: Path, edit) -> None:
    if (folder / TORCH_WEIGHTS_FILE).exists():
        state = torch.load(folder / TORCH_WEIGHTS_FILE, weights_only=True)
        state = _edited(state, edit)
        torch.save(state, folder / TORCH_WEIGHTS_FILE)
    else:
        from safetensors.torch import load_file, save_file
        state = load_file(folder / SAFETENSORS_WEIGHTS_FILE)
        state = _edited(state, edit)
        save_file(state, folder / SAFETENSORS_WEIGHTS_FILE)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "attributes": {path: {k: v for k, v in vars(module).items() if not k.startswith("_")}
                       for path, module in model.named_modules()},
        "identities": {(path, name): id(tensor) for path, module in model.named_modules()
                       for name, tensor in {**module._parameters, **module._buffers}.items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["identities"] == before["identities"]
    assert after["attributes"] == before["attributes"]
    assert after["state"].keys() == before["state"].keys()
    for key, tensor in before["state"].items():
        assert after["state"][key].dtype == tensor.dtype and torch.equal(after["state"][key], tensor), key


def assert_refused(folder: Path, match: str, error: type[Exception] = PrunedModelFormatError) -> None:
    model = ZOO["lenet"].build()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_pruned(model, folder)
    assert_unchanged(model, before)


def _set(path: str, kind: str, name: str, value):
    def edit(config):
        config["modules"][path].setdefault(kind, {})[name] = value
    return edit


def _drop(key: str):
    def edit(state):
        del state[key]
    return edit


# ---- the weights -------------------------------------------------------------------------


@pytest.mark.parametrize("weights_format", FORMATS)
def test_weights_missing_a_key(saved, tmp_path, weights_format):
    folder = copy_saved(saved, tmp_path, weights_format)
    edit_weights(folder, _drop("fc2.bias"))
    assert_refused(folder, r"missing \['fc2.bias'\]")


@pytest.mark.parametrize("weights_format", FORMATS)
def test_weights_with_an_extra_key(saved, tmp_path, weights_format):
    folder = copy_saved(saved, tmp_path, weights_format)
    edit_weights(folder, lambda state: state.update({"fc2.scale": torch.ones(1)}))
    assert_refused(folder, r"unexpected \['fc2.scale'\]")


@pytest.mark.parametrize("weights_format", FORMATS)
def test_a_weight_with_a_wrong_shape(saved, tmp_path, weights_format):
    folder = copy_saved(saved, tmp_path, weights_format)
    edit_weights(folder, lambda state: state.update({"fc2.bias": torch.zeros(state["fc2.bias"].numel() - 1)}))
    assert_refused(folder, "fc2.bias has shape")


@pytest.mark.parametrize("weights_format", FORMATS)
def test_an_integer_weight_where_the_model_has_floats(saved, tmp_path, weights_format):
    folder = copy_saved(saved, tmp_path, weights_format)
    edit_weights(folder, lambda state: state.update({"fc2.weight": state["fc2.weight"].to(torch.int32)}))
    assert_refused(folder, "fc2.weight.*floating")


def test_weights_that_are_not_a_state_dict(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    torch.save([torch.zeros(1)], folder / TORCH_WEIGHTS_FILE)
    assert_refused(folder, "not a state dict")


def test_weights_that_do_not_unpickle(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    (folder / TORCH_WEIGHTS_FILE).write_bytes(b"not a torch file")
    assert_refused(folder, TORCH_WEIGHTS_FILE)


# ---- shapes in the configuration ------------------------------------------------------------
# The weights of the tampered tensor are removed (or made to agree), so that only the
# configuration can refuse the file.


def test_config_with_a_huge_shape(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "parameters", "weight", [2 ** 40, saved[0].fc1.in_features]))
    edit_weights(folder, _drop("fc1.weight"))
    assert_refused(folder, r"fc1: parameter weight .*2\*\*31")


def test_config_with_a_negative_shape(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "parameters", "weight", [-3, saved[0].fc1.in_features]))
    edit_weights(folder, _drop("fc1.weight"))
    assert_refused(folder, "fc1: parameter weight .*is -3, not positive")


def test_config_with_a_zero_in_a_shape(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "parameters", "weight", [0, saved[0].fc1.in_features]))
    edit_weights(folder, lambda state: state.update({"fc1.weight": torch.zeros(0, saved[0].fc1.in_features)}))
    assert_refused(folder, "fc1: parameter weight .*is 0, not positive")


@pytest.mark.parametrize("value", [30.5, "30", True, None])
def test_config_with_a_non_int_in_a_shape(saved, tmp_path, value):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "parameters", "weight", [value, saved[0].fc1.in_features]))
    edit_weights(folder, _drop("fc1.weight"))
    assert_refused(folder, "fc1: parameter weight .*not an int")


def test_config_with_a_shape_larger_than_the_models(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    inputs = saved[0].fc1.in_features
    edit_config(folder, _set("fc1", "parameters", "weight", [121, inputs]))
    edit_config(folder, _set("fc1", "parameters", "bias", [121]))
    edit_weights(folder, lambda state: state.update({"fc1.weight": torch.ones(121, inputs),
                                                      "fc1.bias": torch.ones(121)}))
    assert_refused(folder, "fc1: parameter weight .*121.*larger than .*120.*only shrinks")


def test_config_with_a_wrong_rank(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    shape = list(saved[0].fc1.weight.shape) + [1]
    edit_config(folder, _set("fc1", "parameters", "weight", shape))
    edit_weights(folder, lambda state: state.update({"fc1.weight": state["fc1.weight"].unsqueeze(-1)}))
    assert_refused(folder, "fc1: parameter weight .*rank 3.*rank 2")


def test_config_with_an_unknown_module_path(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config["modules"].update({"ghost": {"type": "Linear"}}))
    assert_refused(folder, r"unexpected \['ghost'\]|modules differ")


def test_config_with_an_unknown_parameter_name(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "parameters", "weight_v", [1]))
    assert_refused(folder, "fc1.*weight_v")


def test_tied_tensors_with_conflicting_shapes(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    save_pruned(model, tmp_path)
    edit_config(tmp_path, _set("0", "parameters", "weight", [2, 4]))
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fresh[1].weight = fresh[0].weight
    before = snapshot(fresh)
    with pytest.raises(PrunedModelFormatError, match="tied"):
        load_pruned(fresh, tmp_path)
    assert_unchanged(fresh, before)


# ---- attributes in the configuration --------------------------------------------------------


def test_config_setting_padding_mode(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("conv1", "attributes", "padding_mode", "circular"))
    assert_refused(folder, "conv1.padding_mode.*not an integer size attribute")


def test_config_setting_forward(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "attributes", "forward", 3))
    assert_refused(folder, "fc1.forward.*not an integer size attribute")


def test_config_setting_a_huge_out_channels(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("conv1", "attributes", "out_channels", 10 ** 18))
    assert_refused(folder, "conv1.out_channels.*larger than")


@pytest.mark.parametrize("value", ["3", True, 2.0, [3], None])
def test_config_with_a_non_int_for_an_int_attribute(saved, tmp_path, value):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("conv1", "attributes", "out_channels", value))
    assert_refused(folder, "conv1.out_channels")


def test_config_with_an_attribute_larger_than_the_models(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc1", "attributes", "out_features", 121))
    assert_refused(folder, "fc1.out_features.*121.*larger than.*120.*only shrinks")


@pytest.mark.parametrize("name, value", [("kernel_size", [3, 3]), ("stride", [2, 2]), ("_version", 3),
                                         ("training", 0)])
def test_config_changing_an_attribute_pruning_never_changes(saved, tmp_path, name, value):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("conv2", "attributes", name, value))
    assert_refused(folder, f"conv2.{name}")


def test_config_whose_attributes_contradict_its_shapes(saved, tmp_path):
    """conv1 loses an output channel in its tensors but keeps out_channels."""
    folder = copy_saved(saved, tmp_path)
    weight = list(saved[0].conv1.weight.shape)
    edit_config(folder, _set("conv1", "parameters", "weight", [weight[0] - 1] + weight[1:]))
    edit_config(folder, _set("conv1", "parameters", "bias", [weight[0] - 1]))
    edit_weights(folder, lambda state: state.update({"conv1.weight": state["conv1.weight"][1:],
                                                      "conv1.bias": state["conv1.bias"][1:]}))
    assert_refused(folder, "conv1.*out_channels")


def test_config_whose_linear_contradicts_its_weight(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, _set("fc2", "attributes", "in_features", saved[0].fc2.in_features - 1))
    assert_refused(folder, "fc2.*in_features")


class Block(nn.Module):
    """A user module with a size forward() may read (num_heads), another int and a string."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.num_heads, self.depth, self.mode = 4, 3, "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("name, value, match", [("depth", 2, "never changes depth"),
                                                ("mode", "slow", "not an integer size attribute"),
                                                ("num_heads", 8, "larger than the current value 4"),
                                                ("num_heads", "2", "a size is a positive int")])
def test_user_module_attributes_outside_what_pruning_writes(tmp_path, name, value, match):
    save_pruned(Block(), tmp_path)
    edit_config(tmp_path, _set("", "attributes", name, value))
    model = Block()
    before = snapshot(model)
    with pytest.raises(PrunedModelFormatError, match=match):
        load_pruned(model, tmp_path)
    assert_unchanged(model, before)


def test_user_module_size_attribute_that_pruning_writes_loads(tmp_path):
    save_pruned(Block(), tmp_path)
    edit_config(tmp_path, _set("", "attributes", "num_heads", 2))
    assert load_pruned(Block(), tmp_path).num_heads == 2


# ---- the header --------------------------------------------------------------------------


def test_config_from_another_model_class(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config.update({"model_class": "zoo.ResNet"}))
    assert_refused(folder, "saved from 'zoo.ResNet'")


@pytest.mark.parametrize("version", [0, 3, "1", None, True])
def test_config_with_an_unknown_format_version(saved, tmp_path, version):
    folder = copy_saved(saved, tmp_path)
    edit_config(folder, lambda config: config.update({"version": version}) if version is not None
                 else config.pop("version"))
    assert_refused(folder, "version")


def test_config_that_is_not_json(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    (folder / CONFIG_FILE).write_text('{"format": ')
    assert_refused(folder, "not valid JSON")


# ---- failures after the first write ---------------------------------------------------------


class Heads(nn.Module):
    """A user module whose size attribute is a property that fails when set."""

    @property
    def heads(self) -> int:
        return 4

    @heads.setter
    def heads(self, value: int) -> None:
        raise RuntimeError("heads cannot be set")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Fragile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.gate = Heads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.norm(self.proj(x)))


def test_a_failure_after_the_first_write_restores_the_model(tmp_path):
    """The checks pass, but setting an attribute fails after tensors were swapped in: roll back."""
    save_pruned(Fragile(), tmp_path)
    edit_config(tmp_path, _set("gate", "attributes", "heads", 2))
    edit_config(tmp_path, _set("proj", "parameters", "weight", [4, 8]))
    edit_config(tmp_path, _set("proj", "parameters", "bias", [4]))
    edit_config(tmp_path, _set("proj", "attributes", "out_features", 4))
    edit_weights(tmp_path, lambda state: state.update({"proj.weight": torch.ones(4, 8), "proj.bias": torch.ones(4),
                                                        "norm.weight": torch.full((8,), 2.0)}))
    model = Fragile()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="heads cannot be set"):
        load_pruned(model, tmp_path)
    assert_unchanged(model, before)


# ---- saving ------------------------------------------------------------------------------


def test_a_failed_save_leaves_the_folder_as_it_was(saved, tmp_path, monkeypatch):
    folder = copy_saved(saved, tmp_path)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def failing_save(obj, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(saved[0], folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_a_failed_config_write_leaves_the_folder_as_it_was(saved, tmp_path, monkeypatch):
    folder = copy_saved(saved, tmp_path)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    model = ZOO["lenet"].build()
    monkeypatch.setattr(json, "dump", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("no json")))
    monkeypatch.setattr(json, "dumps", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("no json")))
    with pytest.raises(ValueError, match="no json"):
        save_pruned(model, folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_the_untampered_files_still_load(saved, tmp_path):
    for weights_format, folder in saved[1].items():
        loaded = load_pruned(ZOO["lenet"].build(), folder).eval()
        example = ZOO["lenet"].example_inputs()[0]
        with torch.no_grad():
            assert torch.equal(loaded(example), saved[0](example)), weights_format
