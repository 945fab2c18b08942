"""Hugging Face configs of pruned models: write the pruned sizes into ``model.config``.

Pruning changes a transformers model's modules, not its ``config``, and ``from_pretrained``
builds the model from the config: a stale one cannot take the saved weights. ``sync_config``
reads the new sizes from the modules (hidden size, heads, key/value heads, head size, MLP
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
from .saving import load_pruned, save_pruned

__all__ = ["is_transformers_model", "sync_config", "expressible", "save_pretrained_pruned",
           "load_pretrained_pruned", "SHAPES_FOLDER"]

SHAPES_FOLDER = "pruning_ir"
"""Subfolder of a ``save_pretrained_pruned`` checkpoint holding the per-layer shapes (``save_pruned``)."""

ATTENTION = ("self_attn", "self_attention", "attention", "attn", "SelfAttention", "EncDecAttention", "crossattention",
             "encoder_attn", "cross_attn")
QUERY = ("q_proj", "query", "q")
KEY = ("k_proj", "key", "k")
FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
OUTPUT = ("o_proj", "out_proj", "c_proj", "dense", "o")
HEAD_SIZE = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
MLP_UP = ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "intermediate.dense", "w1", "wi", "wi_0")
MLP_GATE_UP = ("gate_up_proj",)  # gate and up fused: twice the MLP width
MLP_EXPERTS_DOWN = "experts.down_proj"  # Mixtral's experts in one parameter, (experts, hidden size, MLP width)
MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")
KV_FIELDS = ("num_key_value_heads", "num_kv_heads")
QUANTITIES = {"hidden": "hidden size", "heads": "attention heads", "kv_heads": "key/value heads",
              "head_dim": "head size", "mlp": "MLP channels"}


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


def _width(module: nn.Module | None, side: str) -> int | None:
    """Output (``side="out"``) or input width of a Linear-like module; GPT-2's Conv1D stores (in, out)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    transposed = type(module).__name__ == "Conv1D"
    return int(weight.shape[(side == "out") == transposed])


def _find(root: nn.Module, names: tuple[str, ...], skip: str | None = None) -> tuple[str, nn.Module | None]:
    """The first submodule whose path ends with one of ``names`` (outside ``skip``), and its path."""
    for path, module in root.named_modules():
        if skip and (path == skip or path.startswith(skip + ".")):
            continue
        if path and any(path == name or path.endswith("." + name) for name in names):
            return path, module
    return "", None


def _head_size(attention: nn.Module) -> int | None:
    for module in attention.modules():
        for name in HEAD_SIZE:
            value = vars(module).get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _attentions(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of one layer, outermost matches only (T5's decoder block has two)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in layer.named_modules():
        inside = any(path.startswith(outer + ".") for outer, _ in found)
        if path and not inside and any(path == name or path.endswith("." + name) for name in ATTENTION):
            found.append((path, module))
    return found


def _attention_sizes(attention: nn.Module) -> dict[str, int]:
    """Heads, key/value heads, head size and output width of one attention module."""
    sizes: dict[str, int] = {}
    head_dim = _head_size(attention)
    if not head_dim:
        return sizes
    output = _find(attention, OUTPUT)[1]
    query_width = _width(output, "in") or _width(_find(attention, QUERY)[1], "out")
    if query_width:
        sizes.update(head_dim=head_dim, heads=query_width // head_dim)
    if _width(output, "out"):
        sizes["hidden"] = _width(output, "out")
    key, fused = _find(attention, KEY)[1], _find(attention, FUSED_QKV)[1]
    if _width(key, "out"):
        sizes["kv_heads"] = _width(key, "out") // head_dim
    elif _width(fused, "out") and query_width:
        sizes["kv_heads"] = (_width(fused, "out") - query_width) // (2 * head_dim)
    return sizes


def _layer_sizes(layer: nn.Module) -> list[dict[str, int]]:
    """What one decoder/encoder layer holds now: residual width, heads, key/value heads, head size and
    MLP width in the first entry, and one more entry per further attention module (cross-attention)."""
    attentions = _attentions(layer)
    entries = [_attention_sizes(module) for _, module in attentions] or [{}]
    skip = attentions[0][0] if attentions else None
    up = _width(_find(layer, MLP_UP, skip=skip)[1], "out")
    gate_up = _width(_find(layer, MLP_GATE_UP, skip=skip)[1], "out")
    experts = next((int(p.shape[-1]) for name, p in layer.named_parameters() if name.endswith(MLP_EXPERTS_DOWN)
                    and p.dim() == 3), None)  # fused experts: (experts, hidden size, MLP width)
    if up or gate_up or experts:
        entries[0]["mlp"] = up or (gate_up // 2 if gate_up else experts)
    return entries


def _layer_stacks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's layer stacks: the outermost ModuleLists of ``config.num_hidden_layers`` (or, for an
    encoder-decoder, ``num_decoder_layers``) entries, with their paths (T5: encoder.block, decoder.block)."""
    counts = {getattr(model.config, name, None) for name in ("num_hidden_layers", "num_decoder_layers")} - {None}
    stacks: list[tuple[str, list[nn.Module]]] = []
    for path, module in model.named_modules():
        if any(path.startswith(outer + ".") for outer, _ in stacks):
            continue
        if isinstance(module, nn.ModuleList) and len(module) in counts:
            stacks.append((path, list(module)))
    return stacks


def _per_layer(model: nn.Module) -> list[tuple[str, dict[str, int]]]:
    """(name, sizes) of every layer, and of every further attention module of a layer."""
    stacks = _layer_stacks(model)
    entries = []
    for path, layers in stacks:
        for i, layer in enumerate(layers):
            name = f"layer {i}" if len(stacks) == 1 else f"{path} {i}"
            names = [name] + [f"{name} {attention}" for attention, _ in _attentions(layer)[1:]]
            entries.extend(zip(names, _layer_sizes(layer)))
    return entries


def _disagreement(quantity: str, values: list[tuple[str, int | None]]) -> str:
    shown = ", ".join(f"{name} keeps {value}" for name, value in values[:6])
    return f"{QUANTITIES[quantity]} differ across layers ({shown}{', ...' if len(values) > 6 else ''})"


def _derived_fields(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """Config fields whose value the modules now contradict, with the values they hold, and the
    quantities that differ across layers (written nowhere: a config field has one value)."""
    config = model.config
    uniform: dict[str, int] = {}
    varying = []
    per_layer = _per_layer(model)
    for quantity in QUANTITIES:
        values = [(name, sizes[quantity]) for name, sizes in per_layer if quantity in sizes]
        if len({value for _, value in values}) > 1:
            varying.append(_disagreement(quantity, values))
        elif values:
            uniform[quantity] = values[0][1]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_width = _width(embeddings, "in") if isinstance(embeddings, nn.Embedding) else None  # (tokens, width)
    if embedding_width:
        uniform.setdefault("hidden", embedding_width)
    targets = {"hidden": "hidden_size", "heads": "num_attention_heads", "head_dim": "head_dim",
               "kv_heads": next((name for name in KV_FIELDS if hasattr(config, name)), None),
               "mlp": next((name for name in MLP_FIELDS if hasattr(config, name)), None)}
    fields: dict[str, Any] = {}
    for quantity, value in uniform.items():
        name = targets[quantity]
        if name and (name != "head_dim" or hasattr(config, name)) and getattr(config, name, None) != value:
            fields[name] = value
    if embedding_width and hasattr(config, "word_embed_proj_dim") and config.word_embed_proj_dim != embedding_width:
        fields["word_embed_proj_dim"] = embedding_width  # OPT: the embedding's own width
    kv_names = [name for name in KV_FIELDS if hasattr(config, name)]
    if kv_names and kv_names[0] in fields:  # Falcon holds both (the model reads num_kv_heads)
        kv_heads = fields[kv_names[0]]
        fields.update({name: kv_heads for name in kv_names[1:] if getattr(config, name) != kv_heads})
    hidden, heads, head_dim = (uniform.get(q) for q in ("hidden", "heads", "head_dim"))
    hidden = hidden or getattr(config, "hidden_size", None)
    heads = heads or getattr(config, "num_attention_heads", None)
    if head_dim and hidden and heads and "head_dim" not in fields and getattr(config, "head_dim", None) is None \
            and hidden // heads != head_dim:
        fields["head_dim"] = head_dim  # no longer follows from hidden_size / num_attention_heads
    return fields, varying


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
        if type(mine) is not type(module):
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


def _plan(model: nn.Module) -> tuple[dict[str, Any], str, nn.Module | None]:
    """(the fields to write, why no config can describe the model or "", the model built from the new config)."""
    fields, varying = _derived_fields(model)
    candidate, written = copy.deepcopy(model.config), {}
    for name, value in fields.items():
        try:
            setattr(candidate, name, value)
            written[name] = value
        except (AttributeError, TypeError):  # a derived, read-only property (e.g. Falcon's head_dim)
            continue
    fresh, problem = _rebuilt(model, candidate)
    problem = problem or _refused(model.config, candidate)
    attribute_map = getattr(model.config, "attribute_map", {}) or {}
    tried = ", ".join(f"{attribute_map.get(name, name)}={value}" for name, value in written.items())
    problems = [f"with {tried or 'the config unchanged'}, {problem}"] if problem else []
    return written, "; ".join(varying + problems), fresh


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
    if head_dim and hidden and heads and hidden // heads != head_dim:
        for copy_ in _configs(model):
            setattr(copy_, "head_dim", head_dim)


_SHAPES_FILES = ("pruning_config.json", "weights.pt", "model.safetensors")


def save_pretrained_pruned(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> str:
    """``model.save_pretrained(path, **kwargs)``, plus the per-layer shapes when no config describes the model.

    The config is synced first. When ``expressible(model)`` is false, ``save_pruned`` writes the
    shapes and weights into ``path/pruning_ir/`` (the weights twice: ``from_pretrained`` cannot
    read them); ``load_pretrained_pruned`` reads either kind of folder. Returns ``path``.
    """
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
        save_pruned(model, shapes)
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
