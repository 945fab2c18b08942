"""Safe save/load of pruned models: JSON channel configuration + weights, no pickled code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from helpers import pick_labels, tensors
from hf_models import HF_ZOO
from pruning_ir import PruningIR, load_pruned, save_pruned
from pruning_ir.saving import CONFIG_FILE, TORCH_WEIGHTS_FILE, PrunedModelFormatError
from zoo import ZOO

ALL = {**ZOO, **HF_ZOO}


def _pruned(name: str, fraction: float = 0.5):
    entry = ALL[name]
    model, inputs = entry.build().eval(), entry.example_inputs()
    ir = PruningIR(model).infer_labels(*inputs)
    pruned = ir.prune(labels=pick_labels(ir, fraction, exact_only=False)).model.eval()
    return entry, pruned, inputs


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return tensors(model.eval()(*inputs))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2", "unet", "conv1d_net", "vit", "vit_mha",
                                  "gpt2", "llama", "bert"])
def test_round_trip_gives_identical_outputs(name, tmp_path):
    entry, pruned, inputs = _pruned(name)
    save_pruned(pruned, tmp_path)
    fresh = entry.build()
    assert sum(p.numel() for p in fresh.parameters()) > sum(p.numel() for p in pruned.parameters())
    loaded = load_pruned(fresh, tmp_path)
    assert loaded is fresh and type(loaded) is type(pruned)
    for ours, theirs in zip(_outputs(loaded, inputs), _outputs(pruned, inputs)):
        assert torch.equal(ours, theirs)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_weights_load_with_weights_only_and_config_is_json(tmp_path):
    _, pruned, _ = _pruned("resnet18")
    save_pruned(pruned, tmp_path)
    state = torch.load(tmp_path / TORCH_WEIGHTS_FILE, weights_only=True)
    assert state.keys() == pruned.state_dict().keys()
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    conv = config["modules"]["layer1.0.conv1"]
    assert conv["attributes"]["out_channels"] == pruned.layer1[0].conv1.out_channels
    assert conv["parameters"]["weight"] == list(pruned.layer1[0].conv1.weight.shape)


def test_size_attributes_are_restored(tmp_path):
    """num_heads and friends follow pruning; the loaded model must carry the pruned values."""
    entry, pruned, inputs = _pruned("vit")
    save_pruned(pruned, tmp_path)
    loaded = load_pruned(entry.build(), tmp_path)
    pruned_sizes = {path: {k: v for k, v in vars(m).items() if isinstance(v, int) and not isinstance(v, bool)}
                    for path, m in pruned.named_modules()}
    loaded_sizes = {path: {k: v for k, v in vars(m).items() if isinstance(v, int) and not isinstance(v, bool)}
                    for path, m in loaded.named_modules()}
    assert loaded_sizes == pruned_sizes


def test_tied_weights_stay_tied(tmp_path):
    entry, pruned, _ = _pruned("gpt2")
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    save_pruned(pruned, tmp_path)
    loaded = load_pruned(entry.build(), tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_safetensors_format(tmp_path):
    pytest.importorskip("safetensors")
    entry, pruned, inputs = _pruned("gpt2")
    save_pruned(pruned, tmp_path, weights_format="safetensors")
    assert not (tmp_path / TORCH_WEIGHTS_FILE).exists()
    loaded = load_pruned(entry.build(), tmp_path)
    for ours, theirs in zip(_outputs(loaded, inputs), _outputs(pruned, inputs)):
        assert torch.equal(ours, theirs)


def test_saving_a_pruning_ir_saves_its_model(tmp_path):
    entry = ZOO["lenet"]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    pruned_ir = ir.prune(labels=pick_labels(ir, 0.5))
    save_pruned(pruned_ir, tmp_path)
    loaded = load_pruned(entry.build(), tmp_path)
    assert loaded.fc1.out_features == pruned_ir.model.fc1.out_features < 120


def test_wrong_model_is_refused_before_anything_changes(tmp_path):
    _, pruned, _ = _pruned("resnet18")
    save_pruned(pruned, tmp_path)
    other = ZOO["resnet50"].build()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PrunedModelFormatError, match="modules differ"):
        load_pruned(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(PrunedModelFormatError, match="saved from"):
        load_pruned(ZOO["lenet"].build(), tmp_path)


def test_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(PrunedModelFormatError, match=CONFIG_FILE):
        load_pruned(ZOO["lenet"].build(), tmp_path / "nothing-here")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"hello": 1}))
    with pytest.raises(PrunedModelFormatError, match="not a pruning_ir configuration"):
        load_pruned(ZOO["lenet"].build(), tmp_path)


def test_mismatched_weights_are_refused(tmp_path):
    entry, pruned, _ = _pruned("lenet")
    save_pruned(pruned, tmp_path)
    state = torch.load(tmp_path / TORCH_WEIGHTS_FILE, weights_only=True)
    state["fc1.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / TORCH_WEIGHTS_FILE)
    with pytest.raises(PrunedModelFormatError, match="fc1.weight"):
        load_pruned(entry.build(), tmp_path)


def test_soft_masks_must_be_made_physical_first(tmp_path):
    model = ZOO["lenet"].build()
    torch.nn.utils.prune.random_unstructured(model.fc1, "weight", amount=0.5)
    with pytest.raises(Exception, match="soft masks"):
        save_pruned(model, tmp_path)


def test_weights_load_into_the_dtype_of_the_fresh_model_and_unresized_tensors_keep_their_identity(tmp_path):
    entry, pruned, inputs = _pruned("lenet")
    save_pruned(pruned, tmp_path)
    fresh = entry.build().double()
    kept = fresh.fc3.bias  # fc3 keeps its 10 outputs
    loaded = load_pruned(fresh, tmp_path)
    assert loaded.fc3.bias is kept and loaded.fc1.weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs[0].double()).float(), pruned(inputs[0]))
