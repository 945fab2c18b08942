"""Hugging Face configs of pruned models: write the pruned sizes into ``model.config``.

Pruning changes a transformers model's modules, not its ``config``, and ``from_pretrained``
builds the model from the config: a stale one cannot take the saved weights. ``sync_config``
reads the new sizes from the modules (``hf_fields``: hidden size, heads, key/value heads, head size, MLP
width; in every layer stack, both of an encoder-decoder, and every attention of a layer, a
cross-attention too), writes them into every copy of the config, and checks the result by
building the model from the new config on the meta device: same tensors, same shapes, same float attributes
(attention scaling, embedding scale), and by the config class's own validation (which
``save_pretrained`` runs: LLaMA's wants ``hidden_size % num_attention_heads == 0``). A config
holds one value per field, so per-layer widths (global selection) or sizes a family derives
(GPT-2's head size is ``n_embd / n_head``) may not be expressible: ``expressible`` says why,
``save_pretrained_pruned`` then also saves the per-layer shapes and ``load_pretrained_pruned``
applies them. transformers is imported lazily.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from .errors import PrunedModelFormatError
from .hf_fields import derived_fields
from .saving import load_pruned, save_pruned

__all__ = ["is_transformers_model", "sync_config", "expressible", "save_pretrained_pruned",
           "load_pretrained_pruned", "SHAPES_FOLDER"]

SHAPES_FOLDER = "pruning_ir"
"""Subfolder of a ``save_pretrained_pruned`` checkpoint holding the per-layer shapes (``save_pruned``)."""


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` with a config (transformers is not imported)."""
    return (isinstance(model, nn.Module) and hasattr(getattr(model, "config", None), "to_dict")
            and any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
                    for cls in type(model).__mro__))


def _configs(model: nn.Module) -> list[Any]:
    """``model.config`` and every separate copy of it (same class) that a submodule holds."""
    found: dict[int, Any] = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if type(config) is type(model.config):
            found.setdefault(id(config), config)
    return list(found.values())


def _own_class(module: nn.Module) -> type:
    """The module's class before torch's parametrizations (weight_norm makes a ``Parametrized<Class>`` class of
    its own for every module it touches, so two parametrized modules of one class never share a type)."""
    return torch.nn.utils.parametrize.type_before_parametrizations(module)


def _tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: tuple(tensor.shape) for name, tensor in tensors}


def _rebuilt(model: nn.Module, config: Any) -> tuple[nn.Module | None, str]:
    """``type(model)`` built from ``config`` on the meta device (no memory, no init), and how it differs
    from ``model``: other modules or tensors, other float attributes, other shapes ("" when none)."""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as error:  # the family refuses these sizes (e.g. hidden size not a multiple of heads)
        return None, f"{type(model).__name__} cannot be built ({type(error).__name__}: {error})"
    modules = dict(model.named_modules())
    for path, module in fresh.named_modules():
        mine = modules.get(path)
        if mine is None or _own_class(mine) is not _own_class(module):
            return None, f"the model built from the config has another module at {path or '<model>'}"
        for key, value in vars(module).items():
            own = vars(mine).get(key)
            if isinstance(value, float) and not key.startswith("_") and not (
                    isinstance(own, float) and math.isclose(own, value, rel_tol=1e-9, abs_tol=1e-12)):
                own = f"{own:.6g}" if isinstance(own, float) else repr(own)
                return None, (f"{path or '<model>'}.{key} would be {value:.6g} instead of {own} (the family "
                              f"derives it from the sizes)")
    ours, theirs = _tensor_shapes(model), _tensor_shapes(fresh)
    if set(ours) != set(theirs):
        return None, f"the model built from the config has other tensors: {sorted(set(ours) ^ set(theirs))[:4]}"
    for name, shape in ours.items():
        if theirs[name] != shape:
            return None, f"{name} would be {list(theirs[name])} instead of {list(shape)}"
    return fresh, ""


def _refused(original: Any, candidate: Any) -> str:
    """Why the config class's own validation (run by ``save_pretrained`` / ``from_pretrained``) refuses
    ``candidate`` when it accepts ``original``: LLaMA's asks for ``hidden_size % num_attention_heads == 0``
    even with an explicit ``head_dim``. "" when it accepts it, or has no validation."""
    validate = getattr(candidate, "validate", None)
    if not callable(validate):
        return ""
    try:
        validate()
    except Exception as error:  # the class's validators raise their own error types
        try:
            original.validate()
        except Exception:
            return ""  # the original fails too: not the pruning's doing
        cause = getattr(error, "__cause__", None) or error
        return f"{type(candidate).__name__} refuses it ({cause})"
    return ""


def _field_errors() -> tuple[type[BaseException], ...]:
    """What setting a config field raises when the field refuses the value: AttributeError or TypeError (a
    read-only property, e.g. Falcon's head_dim) and huggingface_hub's strict-dataclass validation errors (a
    ``@strict`` config such as SegFormer's checks every value it is given against the field's type)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict dataclasses
        return AttributeError, TypeError
    return AttributeError, TypeError, StrictDataclassError


def _plan(model: nn.Module) -> tuple[dict[str, Any], str, nn.Module | None]:
    """(the fields to write, why no config can describe the model or "", the model built from the new config).

    What no field can take (widths that differ across layers, a field with one value per stage) is named in the
    reason only when the config does not rebuild the model: Swin's stages differ, and its config says so."""
    fields, unwritten = derived_fields(model)
    candidate, written, refused = copy.deepcopy(model.config), {}, []
    for name, value in fields.items():
        try:
            setattr(candidate, name, value)
            written[name] = value
        except _field_errors() as error:
            if not isinstance(error, (AttributeError, TypeError)):  # a read-only property is derived: not needed
                refused.append(f"{type(model.config).__name__} refuses {name}={value} "
                               f"({type(error).__name__}: {str(error).splitlines()[0]})")
    fresh, problem = _rebuilt(model, candidate)
    problem = problem or _refused(model.config, candidate)
    attribute_map = getattr(model.config, "attribute_map", {}) or {}
    tried = ", ".join(f"{attribute_map.get(name, name)}={value}" for name, value in written.items())
    problems = [f"with {tried or 'the config unchanged'}, {problem}"] if problem else []
    return written, "; ".join(unwritten + refused + problems) if problems else "", fresh


def _is_size(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_size(item) for item in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _align_sizes(model: nn.Module, fresh: nn.Module) -> None:
    """Give ``model``'s integer size attributes the values of ``fresh`` (built from the synced config):
    pruning leaves some stale (``LlamaMLP.intermediate_size``, which forward never reads), and the model
    must be what ``from_pretrained`` builds, for ``save_pruned`` after a later, per-layer pruning."""
    modules = dict(model.named_modules())
    for path, module in fresh.named_modules():
        mine = vars(modules[path])
        for key, value in vars(module).items():
            if not key.startswith("_") and _is_size(value) and _is_size(mine.get(key)) and mine[key] != value:
                setattr(modules[path], key, value)


def expressible(model: nn.Module) -> tuple[bool, str]:
    """Whether a config can describe ``model`` as it is now (``from_pretrained`` rebuilds it), and why not."""
    if not is_transformers_model(model):
        return False, f"{type(model).__name__} is not a Hugging Face transformers model with a config"
    _, reason, _ = _plan(model)
    return not reason, reason


def sync_config(model: nn.Module, *, warn: bool = True, stacklevel: int = 2) -> list[str]:
    """Write the pruned sizes into ``model.config`` (and every copy of it); returns the fields changed.

    Does nothing for a model that is not a transformers model. When no config can describe the
    model (``expressible``: per-layer widths, or sizes the family derives otherwise) nothing is
    written, so the config still builds the model as it was before this pruning (what
    ``load_pruned`` resizes from), and ``warn`` says why, once (``stacklevel`` as in ``warnings.warn``).
    """
    if not is_transformers_model(model):
        return []
    fields, reason, fresh = _plan(model)
    if reason:
        _keep_head_size(model, fields)
        if warn:
            warnings.warn(f"the pruned {type(model).__name__}'s config cannot describe it, so it is left "
                          f"unchanged: {reason}. save_pretrained() output will not reload with from_pretrained(); "
                          f"save with pruning_ir.huggingface.save_pretrained_pruned / load_pretrained_pruned (or "
                          f"pruning_ir.save_pruned / load_pruned), which keep the per-layer shapes",
                          stacklevel=stacklevel)
        return []
    for config in _configs(model):
        for name, value in fields.items():
            setattr(config, name, value)
    _align_sizes(model, fresh)
    attribute_map = getattr(model.config, "attribute_map", {}) or {}
    return [attribute_map.get(name, name) for name in fields]


def _keep_head_size(model: nn.Module, fields: dict[str, Any]) -> None:
    """A field forward reads was pruned with the heads (Phi-3's num_attention_heads): when the config as pruning
    left it implies another head size than the model's, write head_dim, so that it still builds the model's heads."""
    head_dim, config = fields.get("head_dim"), model.config
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if head_dim and isinstance(hidden, int) and isinstance(heads, int) and hidden // heads != head_dim:
        for copy_ in _configs(model):
            setattr(copy_, "head_dim", head_dim)


_SHAPES_FILES = ("pruning_config.json", "weights.pt", "model.safetensors")


def save_pretrained_pruned(model: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """``model.save_pretrained(path, **kwargs)``, plus the per-layer shapes when no config describes the model.

    The config is synced first. When ``expressible(model)`` is false, ``save_pruned`` writes the
    shapes and weights into ``path/pruning_ir/`` (the weights twice: ``from_pretrained`` cannot
    read them); ``load_pretrained_pruned`` reads either kind of folder. ``model`` may be the
    PruningIR that ``prune()`` returned: pass it when its refit created biases, which it records.
    Returns ``path``.
    """
    source = model
    model = model if isinstance(model, nn.Module) else getattr(model, "model", model)   # a PruningIR's model
    if not is_transformers_model(model):
        raise TypeError(f"expected a Hugging Face transformers model, got {type(model).__name__}")
    sync_config(model, warn=False)
    ok, _ = expressible(model)
    model.save_pretrained(path, **kwargs)
    shapes = os.path.join(path, SHAPES_FOLDER)
    if ok:
        for name in _SHAPES_FILES:  # a previous save's shapes must not apply to this checkpoint
            if os.path.isfile(os.path.join(shapes, name)):
                os.remove(os.path.join(shapes, name))
    else:
        save_pruned(source, shapes)   # an IR records the biases its refit created
    return os.fspath(path)


def load_pretrained_pruned(model_class: Any, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a ``save_pretrained_pruned`` folder with ``model_class`` (an ``AutoModel...`` class or a model class).

    With saved per-layer shapes: builds the model from the saved config (``from_config``),
    gives it the shapes and weights (``load_pruned``) and returns it in eval mode; otherwise a
    plain ``model_class.from_pretrained(path, **kwargs)``.
    """
    shapes = os.path.join(path, SHAPES_FOLDER)
    if os.path.isfile(os.path.join(shapes, _SHAPES_FILES[0])):
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(path)
        build = getattr(model_class, "from_config", None) or model_class._from_config
        model = build(config, **kwargs)
        return load_pruned(model, shapes).eval()
    if os.path.isfile(os.path.join(path, "config.json")):
        return model_class.from_pretrained(path, **kwargs)
    raise PrunedModelFormatError(f"{os.fspath(path)!r} holds neither a Hugging Face checkpoint (config.json) nor "
                                 f"pruning_ir shapes ({SHAPES_FOLDER}/{_SHAPES_FILES[0]}): save it with "
                                 f"save_pretrained_pruned")
