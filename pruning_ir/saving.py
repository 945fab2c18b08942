"""Safe saving and loading of pruned models: a JSON channel configuration plus plain weights.

A dill-saved IR pickles code, so loading one runs whatever it contains. ``save_pruned``
instead writes two data files into a folder:

- ``pruning_config.json``: per module, the shapes of its parameters and buffers and its
  integer size attributes (``out_channels``, ``num_heads``, ...), as pruning left them;
- ``weights.pt`` (a state dict that loads with ``torch.load(..., weights_only=True)``) or,
  with ``weights_format="safetensors"``, ``model.safetensors``.

``load_pruned(model, folder)`` takes a freshly built model of the original class, gives
every module the saved sizes (new, empty tensors of the saved shapes; tied weights stay
tied), then loads the weights. Everything is checked before the model is changed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .errors import PrunedModelFormatError, PruningIRError
from .pruning import tensor_holders

__all__ = ["save_pruned", "load_pruned", "PrunedModelFormatError", "CONFIG_FILE", "TORCH_WEIGHTS_FILE",
           "SAFETENSORS_WEIGHTS_FILE"]

CONFIG_FILE = "pruning_config.json"
TORCH_WEIGHTS_FILE = "weights.pt"
SAFETENSORS_WEIGHTS_FILE = "model.safetensors"
FORMAT = "pruning_ir.pruned_model"
FORMAT_VERSION = 1


def _is_size(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(_is_size(item) for item in value)


def _size_attributes(module: nn.Module) -> dict[str, Any]:
    """Public integer (or tuple-of-integer) attributes: where pruning writes new sizes."""
    return {name: value for name, value in vars(module).items() if not name.startswith("_") and _is_size(value)}


def _as_json(value: Any) -> Any:
    return [_as_json(item) for item in value] if isinstance(value, (tuple, list)) else value


def _like(template: Any, value: Any) -> Any:
    """``value`` from JSON, with the tuple/list structure of ``template`` (the fresh model's attribute)."""
    if isinstance(template, (tuple, list)) and isinstance(value, list) and len(template) == len(value):
        return type(template)(_like(old, new) for old, new in zip(template, value))
    return tuple(_like(None, item) for item in value) if isinstance(value, list) else value


def _model_class(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def channel_configuration(model: nn.Module) -> dict[str, Any]:
    """The JSON-ready sizes of every module: parameter and buffer shapes and size attributes."""
    modules = {}
    for path, module in model.named_modules():
        entry = {
            "type": type(module).__qualname__,
            "parameters": {name: list(p.shape) for name, p in module._parameters.items() if p is not None},
            "buffers": {name: list(b.shape) for name, b in module._buffers.items() if b is not None},
            "attributes": {name: _as_json(value) for name, value in _size_attributes(module).items()},
        }
        modules[path] = {key: value for key, value in entry.items() if value or key == "type"}
    return {"format": FORMAT, "version": FORMAT_VERSION, "model_class": _model_class(model), "modules": modules}


def _unwrap(model: Any) -> nn.Module:
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model  # a PruningIR
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a PruningIR, got {type(model).__name__}")
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike, *, weights_format: str = "torch") -> str:
    """Write ``model`` (or a PruningIR's model) to the folder ``path``; returns the folder.

    ``weights_format``: ``"torch"`` (``weights.pt``, loadable with ``weights_only=True``) or
    ``"safetensors"`` (``model.safetensors``; needs the ``safetensors`` package).
    """
    model = _unwrap(model)
    if weights_format not in ("torch", "safetensors"):
        raise ValueError(f"weights_format must be 'torch' or 'safetensors', got {weights_format!r}")
    if torch_prune.is_pruned(model):
        raise PruningIRError("the model still has soft masks (weight_orig / weight_mask): make them physical with "
                             "ir.prune(labels=ir.masked_labels()) or remove them with ir.unmask() before saving")
    config = channel_configuration(model)
    os.makedirs(path, exist_ok=True)
    for stale in (TORCH_WEIGHTS_FILE, SAFETENSORS_WEIGHTS_FILE):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if weights_format == "torch":
        torch.save(model.state_dict(), os.path.join(path, TORCH_WEIGHTS_FILE))
    else:
        from safetensors.torch import save_model
        save_model(model, os.path.join(path, SAFETENSORS_WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as file:
        json.dump(config, file, indent=1)
    return os.fspath(path)


def _read_configuration(path: str | os.PathLike) -> dict[str, Any]:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise PrunedModelFormatError(f"{os.fspath(path)!r} is not a saved pruned model: {CONFIG_FILE} is missing")
    with open(config_path) as file:
        config = json.load(file)
    if config.get("format") != FORMAT or not isinstance(config.get("modules"), dict):
        raise PrunedModelFormatError(f"{config_path} is not a pruning_ir configuration")
    if config.get("version", 0) > FORMAT_VERSION:
        raise PrunedModelFormatError(f"{config_path} has format version {config['version']}; this pruning_ir "
                                     f"reads up to {FORMAT_VERSION}: upgrade pruning_ir")
    return config


def _check_fits(model: nn.Module, config: dict[str, Any]) -> None:
    """Raise a PrunedModelFormatError naming the first module or tensor that differs in kind."""
    modules = dict(model.named_modules())
    saved = config["modules"]
    if config.get("model_class") != _model_class(model):
        raise PrunedModelFormatError(f"the configuration was saved from {config.get('model_class')}, "
                                     f"but the model is {_model_class(model)}")
    missing, extra = sorted(set(saved) - set(modules)), sorted(set(modules) - set(saved))
    if missing or extra:
        raise PrunedModelFormatError(f"the model's modules differ from the saved ones: missing {missing[:5]}, "
                                     f"unexpected {extra[:5]} (was it built with the same arguments?)")
    for path, entry in saved.items():
        module = modules[path]
        where = path or "<model>"
        if entry["type"] != type(module).__qualname__:
            raise PrunedModelFormatError(f"module {where} is {type(module).__qualname__} here but "
                                         f"{entry['type']} in the saved configuration")
        for kind, tensors in (("parameters", module._parameters), ("buffers", module._buffers)):
            present = {name for name, tensor in tensors.items() if tensor is not None}
            if set(entry.get(kind, {})) != present:
                raise PrunedModelFormatError(f"module {where} has {kind} {sorted(present)} here but "
                                             f"{sorted(entry.get(kind, {}))} in the saved configuration")


def _check_weights(state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    for path, entry in config["modules"].items():
        for name, shape in {**entry.get("parameters", {}), **entry.get("buffers", {})}.items():
            key = f"{path}.{name}" if path else name
            if key in state and list(state[key].shape) != shape:
                raise PrunedModelFormatError(f"the weights do not match the configuration: {key} has shape "
                                             f"{list(state[key].shape)} in the weights, {shape} in the configuration")


def apply_channel_configuration(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Resize ``model`` in place to the saved sizes (empty tensors; load the weights afterwards)."""
    _check_fits(model, config)
    modules = dict(model.named_modules())
    holders = tensor_holders(model)
    replaced: dict[int, torch.Tensor] = {}
    for path, entry in config["modules"].items():
        module = modules[path]
        for kind, store in (("parameters", module._parameters), ("buffers", module._buffers)):
            for name, shape in entry.get(kind, {}).items():
                tensor = store[name]
                if list(tensor.shape) == shape or id(tensor) in replaced:
                    continue
                new = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                replaced[id(tensor)] = new
                for holder, holder_name, is_parameter in holders[id(tensor)]:  # tied tensors stay tied
                    (holder._parameters if is_parameter else holder._buffers)[holder_name] = new
        for name, value in entry.get("attributes", {}).items():
            current = getattr(module, name, None)
            new_value = _like(current, value)
            if current != new_value:
                setattr(module, name, new_value)
    return model


def load_pruned(model: nn.Module, path: str | os.PathLike, *, map_location: str | torch.device | None = None
                ) -> nn.Module:
    """Give a freshly built ``model`` the saved channel configuration and weights; returns ``model``.

    Build ``model`` exactly as the original was built (same class and arguments), on the
    device and dtype you want; no code is unpickled (weights load with ``weights_only=True``).
    """
    config = _read_configuration(path)
    torch_file = os.path.join(path, TORCH_WEIGHTS_FILE)
    safetensors_file = os.path.join(path, SAFETENSORS_WEIGHTS_FILE)
    if not (os.path.isfile(torch_file) or os.path.isfile(safetensors_file)):
        raise PrunedModelFormatError(f"{os.fspath(path)!r} has no weights ({TORCH_WEIGHTS_FILE} or "
                                     f"{SAFETENSORS_WEIGHTS_FILE})")
    _check_fits(model, config)
    device = map_location or next(model.parameters(), torch.empty(0)).device
    if os.path.isfile(torch_file):
        state = torch.load(torch_file, map_location=device, weights_only=True)
        _check_weights(state, config)
        apply_channel_configuration(model, config)
        model.load_state_dict(state)
    else:
        from safetensors.torch import load_model
        apply_channel_configuration(model, config)
        load_model(model, safetensors_file, device=str(device))
    return model
