"""What a pruned Hugging Face model's modules hold, as config fields (for ``pruning_ir.huggingface``).

``derived_fields`` reads the sizes pruning changes from the modules (per layer of every layer
stack: residual width, heads, key/value heads, head size, MLP width) and names the config fields
that hold them: one field for all stacks, or one per stack where the family has both
(``encoder_ffn_dim`` / ``decoder_ffn_dim``). What one field cannot hold is reported, never written:
widths that differ across layers, and fields that hold one value per stage (Swin's ``num_heads``).
Whether the config then describes the model is for the caller's rebuild to decide.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["derived_fields", "input_embeddings"]

ATTENTION = ("self_attn", "self_attention", "attention", "attn", "SelfAttention", "EncDecAttention", "crossattention",
             "encoder_attn", "cross_attn")
QUERY = ("q_proj", "query", "q", "q_lin")
KEY = ("k_proj", "key", "k", "k_lin")
FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
OUTPUT = ("o_proj", "out_proj", "c_proj", "dense", "o", "out_lin")
HEAD_SIZE = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
MLP_UP = ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "intermediate.dense", "w1", "wi", "wi_0", "fc_in", "lin1",
          "ffn", "intermediate_dense")  # GPT-J, DistilBERT, ALBERT, Wav2Vec2: the last four
MLP_GATE_UP = ("gate_up_proj",)  # gate and up fused: twice the MLP width
MLP_EXPERTS_DOWN = "experts.down_proj"  # fused experts in one parameter (Mixtral, GPT-OSS)
MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "hidden_dim")
KV_FIELDS = ("num_key_value_heads", "num_kv_heads")
STACK_FIELDS = {"mlp": {"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}}  # one field per stack (BART)
LAYER_COUNTS = ("num_hidden_layers", "num_decoder_layers", "num_hidden_groups")  # ALBERT shares groups of layers
QUANTITIES = {"hidden": "hidden size", "heads": "attention heads", "kv_heads": "key/value heads",
              "head_dim": "head size", "mlp": "MLP channels"}


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's token embedding, or None for a model without one: transformers raises NotImplementedError
    from ``get_input_embeddings`` for ResNet, ConvNeXt, SegFormer, Swin and other models without tokens."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except NotImplementedError:
        return None


def _width(module: nn.Module | None, side: str) -> int | None:
    """Output (``side="out"``) or input width of a Linear-like module; GPT-2's Conv1D stores (in, out)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    transposed = type(module).__name__ == "Conv1D"
    return int(weight.shape[(side == "out") == transposed])


def _find(root: nn.Module, names: tuple[str, ...], skip: str | None = None,
          linear: bool = False) -> tuple[str, nn.Module | None]:
    """The first submodule whose path ends with one of ``names`` (outside ``skip``; with ``linear``, only
    Linear-like ones: DistilBERT's ``ffn`` holds the ``lin1`` that ALBERT's ``ffn`` is), and its path."""
    for path, module in root.named_modules():
        if skip and (path == skip or path.startswith(skip + ".")):
            continue
        if path and any(path == name or path.endswith("." + name) for name in names) \
                and (not linear or _width(module, "out")):
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
    up = _width(_find(layer, MLP_UP, skip=skip, linear=True)[1], "out")
    gate_up = _width(_find(layer, MLP_GATE_UP, skip=skip)[1], "out")
    down = next((p for name, p in layer.named_parameters() if name.endswith(MLP_EXPERTS_DOWN) and p.dim() == 3), None)
    experts = None   # fused experts: (experts, hidden size, MLP width) as Mixtral, or (experts, MLP width, hidden)
    if down is not None:
        hidden = entries[0].get("hidden")
        swapped = hidden is not None and down.shape[2] == hidden != down.shape[1]   # GPT-OSS's layout
        experts = int(down.shape[1] if swapped else down.shape[2])
    if up or gate_up or experts:
        entries[0]["mlp"] = up or (gate_up // 2 if gate_up else experts)
    return entries


def _layer_stacks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's layer stacks: the outermost ModuleLists of ``config.num_hidden_layers`` (or, for an
    encoder-decoder, ``num_decoder_layers``; ALBERT: ``num_hidden_groups``) entries, with their paths
    (T5: encoder.block, decoder.block)."""
    counts = {getattr(model.config, name, None) for name in LAYER_COUNTS} - {None}
    stacks: list[tuple[str, list[nn.Module]]] = []
    for path, module in model.named_modules():
        if any(path.startswith(outer + ".") for outer, _ in stacks):
            continue
        if isinstance(module, nn.ModuleList) and len(module) in counts:
            stacks.append((path, list(module)))
    return stacks


def _per_layer(model: nn.Module) -> list[tuple[str, str, dict[str, int]]]:
    """(stack path, name, sizes) of every layer, and of every further attention module of a layer."""
    stacks = _layer_stacks(model)
    entries = []
    for path, layers in stacks:
        for i, layer in enumerate(layers):
            name = f"layer {i}" if len(stacks) == 1 else f"{path} {i}"
            names = [name] + [f"{name} {attention}" for attention, _ in _attentions(layer)[1:]]
            entries.extend((path, entry, sizes) for entry, sizes in zip(names, _layer_sizes(layer)))
    return entries


def _disagreement(quantity: str, values: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"{name} keeps {value}" for name, value in values[:6])
    return f"{QUANTITIES[quantity]} differ across layers ({shown}{', ...' if len(values) > 6 else ''})"


def _role(stack: str) -> str | None:
    parts = stack.split(".")
    return "decoder" if "decoder" in parts else "encoder" if "encoder" in parts else None


def _field_groups(config: Any, quantity: str, generic: str | None,
                  entries: list[tuple[str, str, int]]) -> list[tuple[str | None, list[tuple[str, int]]]]:
    """The values of ``quantity`` by the config field that holds them: one field per stack where the config
    has one for every stack's role (BART's ``encoder_ffn_dim`` / ``decoder_ffn_dim``), else ``generic``."""
    per_stack = STACK_FIELDS.get(quantity, {})
    roles = {stack: _role(stack) for stack, _, _ in entries}
    if per_stack and all(role in per_stack and hasattr(config, per_stack[role]) for role in roles.values()):
        fields = [per_stack[role] for role in dict.fromkeys(roles.values())]
        return [(field, [(name, value) for stack, name, value in entries if per_stack[roles[stack]] == field])
                for field in fields]
    return [(generic, [(name, value) for _, name, value in entries])]


def derived_fields(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """(config fields whose value the modules now contradict, with the values they hold; what no field can
    take: quantities that differ across layers, fields with one value per stage). The second says why only
    when the config does not rebuild the model (Swin's stages differ by design, and its config lists them)."""
    config = model.config
    uniform: dict[str, int] = {}
    unwritten: list[str] = []
    fields: dict[str, Any] = {}
    targets = {"hidden": "hidden_size", "heads": "num_attention_heads", "head_dim": "head_dim",
               "kv_heads": next((name for name in KV_FIELDS if hasattr(config, name)), None),
               "mlp": next((name for name in MLP_FIELDS if hasattr(config, name)), None)}
    per_layer = _per_layer(model)
    read = {quantity for _, _, sizes in per_layer for quantity in sizes}
    for quantity in QUANTITIES:
        entries = [(stack, name, sizes[quantity]) for stack, name, sizes in per_layer if quantity in sizes]
        for field, values in _field_groups(config, quantity, targets[quantity], entries):
            if len({value for _, value in values}) > 1:
                unwritten.append(_disagreement(quantity, values))
            elif values:
                if field == targets[quantity]:
                    uniform[quantity] = values[0][1]
                _propose(config, field, values[0][1], fields, unwritten)
    embeddings = input_embeddings(model)
    embedding_width = _width(embeddings, "in") if isinstance(embeddings, nn.Embedding) else None  # (tokens, width)
    if embedding_width and "hidden" not in read and not hasattr(config, "embedding_size"):  # ALBERT: its own
        uniform["hidden"] = embedding_width
        _propose(config, "hidden_size", embedding_width, fields, unwritten)
    for name in ("word_embed_proj_dim", "embedding_size"):  # OPT, ALBERT: the embedding's own width
        if embedding_width:
            _propose(config, name, embedding_width, fields, unwritten)
    kv_names = [name for name in KV_FIELDS if hasattr(config, name)]
    if kv_names and kv_names[0] in fields:  # Falcon holds both (the model reads num_kv_heads)
        kv_heads = fields[kv_names[0]]
        fields.update({name: kv_heads for name in kv_names[1:] if getattr(config, name) != kv_heads})
    hidden, heads, head_dim = (uniform.get(q) for q in ("hidden", "heads", "head_dim"))
    hidden = hidden or getattr(config, "hidden_size", None)
    heads = heads or getattr(config, "num_attention_heads", None)
    if head_dim and isinstance(hidden, int) and isinstance(heads, int) and "head_dim" not in fields \
            and getattr(config, "head_dim", None) is None and hidden // heads != head_dim:
        fields["head_dim"] = head_dim  # no longer follows from hidden_size / num_attention_heads
    return fields, unwritten


def _propose(config: Any, field: str | None, value: int, fields: dict[str, Any], unwritten: list[str]) -> None:
    """Add ``field=value`` to ``fields`` when the config has that field and holds another single value there;
    a field with one value per stage (a list: Swin's ``num_heads``) is named in ``unwritten`` instead."""
    if not field or not hasattr(config, field):
        return
    current = getattr(config, field)
    if isinstance(current, (list, tuple)):
        unwritten.append(f"{field} holds one value per stage ({list(current)}), which one number cannot rewrite")
    elif current != value:
        fields[field] = value
