"""Safe saving and loading of pruned models: a JSON channel configuration plus plain weights.

A dill-saved IR pickles code, so loading one runs whatever it contains. ``save_pruned``
instead writes two data files into a folder:

- ``pruning_config.json``: per module, the shapes of its parameters and buffers and its
  integer size attributes (``out_channels``, ``num_heads``, ...), as pruning left them, and
  the parameters pruning created (a bias ``prune(reconstruct=...)`` gave a layer built without
  one: module path, name, shape), which loading creates before it loads the weights;
- ``weights.pt`` (a state dict that loads with ``torch.load(..., weights_only=True)``) or,
  with ``weights_format="safetensors"``, ``model.safetensors``.

``load_pruned(model, folder)`` takes a freshly built model of the original class and gives
every module the saved sizes and weights (resized tensors are replaced, tied ones stay
tied; the others keep their identity). The folder is data from anywhere: the configuration
and the weights are checked in full (``saving_checks``) before the model is changed, and a
failure while writing restores it.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .errors import PrunedModelFormatError, PruningIRError
from .pruning import tensor_holders
from .saving_checks import (FIRST_VERSION, FORMAT, FORMAT_VERSION, LoadPlan, check_weights, is_size, model_class,
                            non_persistent_buffers, plan_configuration)

__all__ = ["save_pruned", "load_pruned", "PrunedModelFormatError", "CONFIG_FILE", "TORCH_WEIGHTS_FILE",
           "SAFETENSORS_WEIGHTS_FILE"]

CONFIG_FILE = "pruning_config.json"
TORCH_WEIGHTS_FILE = "weights.pt"
SAFETENSORS_WEIGHTS_FILE = "model.safetensors"


def _size_attributes(module: nn.Module) -> dict[str, Any]:
    """Public integer (or tuple-of-integer) attributes: where pruning writes new sizes."""
    return {name: value for name, value in vars(module).items() if not name.startswith("_") and is_size(value)}


def _as_json(value: Any) -> Any:
    return [_as_json(item) for item in value] if isinstance(value, (tuple, list)) else value


def channel_configuration(model: nn.Module, created: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON-ready sizes of every module: parameter and buffer shapes and size attributes, and the
    ``created`` parameters (``PruningIR.created_parameters``) the model still holds."""
    modules, records = {}, []
    paths = dict(model.named_modules())
    for name in created:
        path, _, attribute = name.rpartition(".")
        parameter = paths[path]._parameters.get(attribute) if path in paths else None
        if parameter is not None:
            records.append({"module": path, "name": attribute, "shape": list(parameter.shape)})
    for path, module in model.named_modules():
        entry = {
            "type": type(module).__qualname__,
            "parameters": {name: list(p.shape) for name, p in module._parameters.items() if p is not None},
            "buffers": {name: list(b.shape) for name, b in module._buffers.items() if b is not None},
            "attributes": {name: _as_json(value) for name, value in _size_attributes(module).items()},
        }
        modules[path] = {key: value for key, value in entry.items() if value or key == "type"}
    config = {"format": FORMAT, "version": FORMAT_VERSION if records else FIRST_VERSION,  # older readers read 1
              "model_class": model_class(model), "modules": modules}
    return {**config, "created_parameters": records} if records else config


def _unwrap(model: Any) -> nn.Module:
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model  # a PruningIR
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a PruningIR, got {type(model).__name__}")
    return model


def _write_temporary(folder: str, name: str, write: Callable[[str], Any]) -> str:
    """Write a file through ``write(path)`` under a temporary name in ``folder``; removed if writing fails."""
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return temporary


def save_pruned(model: Any, path: str | os.PathLike, *, weights_format: str = "torch") -> str:
    """Write ``model`` (or a PruningIR's model) to the folder ``path``; returns the folder.

    Save the IR that ``prune(reconstruct=...)`` returned when it created biases: the IR knows them
    (``created_parameters``) and the file records them; its bare model's look built in, and
    ``load_pruned`` refuses that file, saying so.

    ``weights_format``: ``"torch"`` (``weights.pt``, loadable with ``weights_only=True``) or
    ``"safetensors"`` (``model.safetensors``; needs the ``safetensors`` package). Files are
    written under temporary names and renamed once all are complete: a failed save leaves
    the folder as it was.
    """
    created = () if isinstance(model, nn.Module) else tuple(getattr(model, "created_parameters", ()))
    model = _unwrap(model)
    if weights_format not in ("torch", "safetensors"):
        raise ValueError(f"weights_format must be 'torch' or 'safetensors', got {weights_format!r}")
    if torch_prune.is_pruned(model):
        raise PruningIRError("the model still has soft masks (weight_orig / weight_mask): make them physical with "
                             "ir.prune(labels=ir.masked_labels()) or remove them with ir.unmask() before saving")
    text = json.dumps(channel_configuration(model, created), indent=1)
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    buffers = {key: buffer.detach() for key, buffer in non_persistent_buffers(model).items()}
    if weights_format == "torch":
        weights_file, stale = TORCH_WEIGHTS_FILE, SAFETENSORS_WEIGHTS_FILE
        write_weights = functools.partial(torch.save, {**model.state_dict(), **buffers})
    else:
        from safetensors.torch import save_file
        weights_file, stale = SAFETENSORS_WEIGHTS_FILE, TORCH_WEIGHTS_FILE
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, tensor in model.state_dict(keep_vars=True).items():   # a tied tensor once, as save_model does
            if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
                seen.add(id(tensor))
                tensors[key] = tensor.detach().contiguous()
        tensors.update({key: buffer.contiguous() for key, buffer in buffers.items()})
        write_weights = functools.partial(save_file, tensors, metadata={"format": "pt"})
    temporaries = {weights_file: _write_temporary(folder, weights_file, write_weights)}
    try:
        temporaries[CONFIG_FILE] = _write_temporary(folder, CONFIG_FILE, lambda name: _write_text(name, text))
    except BaseException:
        os.remove(temporaries[weights_file])
        raise
    for name, temporary in temporaries.items():
        os.replace(temporary, os.path.join(folder, name))
    if os.path.exists(os.path.join(folder, stale)):
        os.remove(os.path.join(folder, stale))
    return folder


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _read_configuration(path: str | os.PathLike) -> Any:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise PrunedModelFormatError(f"{os.fspath(path)!r} is not a saved pruned model: {CONFIG_FILE} is missing")
    with open(config_path, "rb") as file:
        try:
            return json.load(file, parse_constant=_no_constant)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise PrunedModelFormatError(f"{config_path} is not valid JSON: {error}") from error


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _read_weights(path: str | os.PathLike, device: str | torch.device) -> tuple[Any, bool]:
    """The saved state dict (nothing unpickled but tensors) and whether tied aliases may be absent."""
    torch_file = os.path.join(path, TORCH_WEIGHTS_FILE)
    safetensors_file = os.path.join(path, SAFETENSORS_WEIGHTS_FILE)
    file = torch_file if os.path.isfile(torch_file) else safetensors_file
    if not os.path.isfile(file):
        raise PrunedModelFormatError(f"{os.fspath(path)!r} has no weights ({TORCH_WEIGHTS_FILE} or "
                                     f"{SAFETENSORS_WEIGHTS_FILE})")
    try:
        if file == torch_file:
            return torch.load(file, map_location=device, weights_only=True), False
        from safetensors.torch import load_file
        return load_file(file, device=str(device)), True  # safetensors stores a tied tensor once
    except (ImportError, OSError):
        raise
    except Exception as error:
        raise PrunedModelFormatError(f"{file} could not be read as weights: {error}") from error


def _restorer(module: nn.Module, name: str) -> Callable[[], None]:
    """A function that gives ``module.<name>`` back its present value."""
    if name in vars(module):
        old = vars(module)[name]
        return functools.partial(vars(module).__setitem__, name, old)
    old = getattr(module, name)

    def restore() -> None:  # a class attribute or a property
        if name in vars(module):
            del vars(module)[name]
        elif getattr(module, name) != old:
            setattr(module, name, old)
    return restore


def _set_data(tensor: torch.Tensor, data: torch.Tensor) -> None:
    tensor.data = data


def _write(model: nn.Module, plan: LoadPlan, state: dict[str, Any] | None) -> None:
    """Write ``plan`` (and the checked ``state``) into ``model``; restore it if anything fails.

    New tensors are all built off the model first. Resized tensors are then replaced in
    every holder (tied ones stay tied); the others keep their identity and get new data;
    created parameters take the empty slot (a bias of None) of their module.
    """
    resized = plan.resized()
    replacements: dict[int, torch.Tensor] = {}
    new_data: list[tuple[torch.Tensor, torch.Tensor]] = []
    extra_state: dict[str, Any] = {}
    seen: set[int] = set()
    buffers = {key: buffer for key, buffer in non_persistent_buffers(model).items() if state is not None and key in state}
    tensors = {**model.state_dict(keep_vars=True), **buffers} if state is not None else {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            extra_state[key] = state[key]
        elif id(tensor) not in seen:  # tied tensors are loaded once
            seen.add(id(tensor))
            data = torch.empty(plan.shape(tensor), dtype=tensor.dtype, device=tensor.device) \
                if id(tensor) in resized else torch.empty_like(tensor)
            with torch.no_grad():
                data.copy_(state.pop(key))
            if id(tensor) in resized:
                replacements[id(tensor)] = _like_tensor(tensor, data)
            else:
                new_data.append((tensor, data))
    created = []
    for key, (module, name, shape) in plan.created.items():  # typed and placed like the layer's weight
        weight = module.weight
        data = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        if state is not None:
            with torch.no_grad():
                data.copy_(state.pop(key))
        created.append((module, name, nn.Parameter(data, requires_grad=weight.requires_grad)))
    for key, shape in resized.items():  # no weights (apply_channel_configuration): empty tensors
        if key not in replacements:
            tensor = plan.tensors[key]
            replacements[key] = _like_tensor(tensor, torch.empty(shape, dtype=tensor.dtype, device=tensor.device))
    undo: list[Callable[[], None]] = []
    try:
        holders = tensor_holders(model)
        for key, new in replacements.items():
            for holder, name, is_parameter in holders[key]:
                store = holder._parameters if is_parameter else holder._buffers
                undo.append(functools.partial(store.__setitem__, name, store[name]))
                store[name] = new
        for tensor, data in new_data:
            undo.append(functools.partial(_set_data, tensor, tensor.data))
            tensor.data = data
        for module, name, parameter in created:
            undo.append(functools.partial(module._parameters.__setitem__, name, module._parameters[name]))
            module._parameters[name] = parameter
        for module, name, value in plan.attributes.values():
            undo.append(_restorer(module, name))
            setattr(module, name, value)
        if extra_state:
            model.load_state_dict(extra_state, strict=False)
    except BaseException:
        for action in reversed(undo):
            try:
                action()
            except Exception:  # restore everything else; the original error is the one to see
                pass
        raise


def _like_tensor(tensor: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(data, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data


def apply_channel_configuration(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Resize ``model`` in place to the saved sizes (empty tensors; load the weights afterwards).

    The configuration is checked first; a refused one raises PrunedModelFormatError and changes nothing.
    """
    _write(model, plan_configuration(model, config), None)
    return model


def load_pruned(model: nn.Module, path: str | os.PathLike, *, map_location: str | torch.device | None = None
                ) -> nn.Module:
    """Give a freshly built ``model`` the saved channel configuration and weights; returns ``model``.

    Build ``model`` exactly as the original was built (same class and arguments), on the
    device and dtype you want; no code is unpickled (weights load with ``weights_only=True``).
    The configuration and the weights are checked in full before the model is touched (a
    refusal raises PrunedModelFormatError); if writing still fails, the model is restored.
    """
    config = _read_configuration(path)
    plan = plan_configuration(model, config, os.path.join(os.fspath(path), CONFIG_FILE))
    device = map_location or next(model.parameters(), torch.empty(0)).device
    state, tied_may_be_missing = _read_weights(path, device)
    state = check_weights(model, plan, state, tied_may_be_missing)
    _write(model, plan, state)
    return model
