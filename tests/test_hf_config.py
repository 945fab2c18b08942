"""After ``prune()``, a Hugging Face model's ``config`` describes the pruned model (``pruning_ir.huggingface``).

Tiny models of eighteen families, Falcon in both of its layouts (``hf_models.FAMILIES``, built from
configs: no downloads), are pruned uniformly, with the hidden size (``all``) or without it
(``keep_hidden``): the config must hold the new sizes, ``save_pretrained`` + ``from_pretrained`` must
rebuild the pruned model exactly, and ``generate`` must give the same tokens with and without the KV
cache. Removing
zeroed heads and MLP channels changes no output, and a global selection (widths per layer)
round-trips through ``save_pretrained_pruned`` in every family. Where a config cannot express the
pruned model, ``prune`` warns, the config keeps its stale fields, the from_pretrained round trip
is an ``xfail(strict=True)`` naming why, and ``save_pretrained_pruned`` / ``load_pretrained_pruned``
round-trip it instead.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pruning_ir import GlobalScoreLabelSelector, PruningIR, UniformLabelSelector  # noqa: E402
from pruning_ir.errors import PrunedModelFormatError  # noqa: E402
from pruning_ir.huggingface import (SHAPES_FOLDER, expressible, load_pretrained_pruned,  # noqa: E402
                                    save_pretrained_pruned, sync_config)
from hf_models import FAMILIES, family_inputs  # noqa: E402
from zoo import seeded_build  # noqa: E402

# The grouped-query unit is a key/value head with its query heads here (the cases below count heads that way).
GQA_UNIT = "kv_groups"
# Falcon has a single key/value head (multi-query attention): under either unit its query heads are the labels.
UNITS: dict[str, str] = {}  # a family that needs another grouped-query unit

# (family, scenario): the config fields after prune(), and why no config can express it ("" when one can; when
# none can, the config is left as it was: it still builds the unpruned model, which load_pruned resizes).
# Uniform 0.25 keeps 24 of 32 hidden channels, 48 of 64 MLP channels (GPT-2, Falcon: 96 of 128), 3 of 4 heads
# (GPT-2, OPT, GPT-NeoX, BERT; heads pruned one by one) or 1 of 2 key/value heads with their query heads (GQA).
GQA_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)
ORIGINAL_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)
CASES = {
    ("llama", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("llama", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("mistral", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("mistral", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, **GQA_HEADS), ""),
    ("qwen2", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("qwen2", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("qwen3", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("qwen3", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, **GQA_HEADS), ""),
    ("gemma", "all"): (dict(hidden_size=32, intermediate_size=64, **ORIGINAL_HEADS),
                       "Gemma scales its embeddings by sqrt(hidden_size) (scalar_embed_scale), fixed at build time: "
                       "a config with hidden_size=24 would rescale them"),
    ("gemma", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, **GQA_HEADS), ""),
    # Phi-3 slices its fused qkv_proj at config.num_attention_heads * head_dim: the config field follows the heads
    ("phi3", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("phi3", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    # Mixtral's experts are one parameter each for all experts: a channel goes from every expert at once
    ("mixtral", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("mixtral", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, **GQA_HEADS), ""),
    ("gpt2", "all"): (dict(n_embd=24, n_head=3, n_inner=96), ""),
    ("gpt2", "keep_hidden"): (dict(n_embd=32, n_head=4, n_inner=None),
                              "GPT-2 derives the head size as n_embd / n_head: 32 / 3 heads does not build"),
    ("opt", "all"): (dict(hidden_size=24, word_embed_proj_dim=24, num_attention_heads=3, ffn_dim=48), ""),
    ("opt", "keep_hidden"): (dict(hidden_size=32, num_attention_heads=4, ffn_dim=64),
                             "OPT derives the head size as hidden_size / num_attention_heads: 32 / 3 does not build"),
    ("neox", "all"): (dict(hidden_size=24, num_attention_heads=3, intermediate_size=48), ""),
    ("neox", "keep_hidden"): (dict(hidden_size=32, num_attention_heads=4, intermediate_size=64),
                              "GPT-NeoX derives the head size as hidden_size / num_attention_heads (32 / 3 = 10, "
                              "not 8): attention scaling and shapes differ"),
    ("falcon", "all"): (dict(hidden_size=24, num_attention_heads=3, ffn_hidden_size=96), ""),
    ("falcon", "keep_hidden"): (dict(hidden_size=32, num_attention_heads=4, ffn_hidden_size=128),
                                "Falcon derives the head size as hidden_size / num_attention_heads: 32 / 3 heads does "
                                "not build"),
    ("falcon_gqa", "all"): (dict(hidden_size=32, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128),
                            "Falcon derives the head size as hidden_size / num_attention_heads: 24 / 2 heads = 12, "
                            "not 8 (one of its 2 key/value groups removed)"),
    ("falcon_gqa", "keep_hidden"): (dict(hidden_size=32, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128),
                                    "Falcon derives the head size as hidden_size / num_attention_heads: 32 / 2 heads "
                                    "= 16, not 8"),
    ("falcon_gqa", "half"): (dict(hidden_size=16, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=64), ""),
    ("bert", "all"): (dict(hidden_size=32, num_attention_heads=4, intermediate_size=64),
                      "BERT derives the head size as hidden_size / num_attention_heads: 32 / 3 heads does not build "
                      "(its hidden size is not prunable)"),
    ("bert", "mlp"): (dict(hidden_size=32, num_attention_heads=4, intermediate_size=48), ""),
    ("olmo2", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    ("olmo2", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, **GQA_HEADS), ""),
    ("granite", "all"): (dict(hidden_size=24, intermediate_size=48, head_dim=8, embedding_multiplier=2.0,
                              residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0, **GQA_HEADS), ""),
    ("granite", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, attention_multiplier=0.2, **GQA_HEADS),
                                 ""),
    ("gemma2", "all"): (dict(hidden_size=32, intermediate_size=64, **ORIGINAL_HEADS),
                        "Gemma2 scales its embeddings by sqrt(hidden_size) (scalar_embed_scale), fixed at build time: "
                        "a config with hidden_size=24 would rescale them"),
    ("gemma2", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, head_dim=8, attn_logit_softcapping=5.0,
                                     **GQA_HEADS), ""),
    ("gemma3", "all"): (dict(hidden_size=32, intermediate_size=64, **ORIGINAL_HEADS),
                        "Gemma3 scales its embeddings by sqrt(hidden_size) (scalar_embed_scale), fixed at build time: "
                        "a config with hidden_size=24 would rescale them"),
    ("gemma3", "keep_hidden"): (dict(hidden_size=32, intermediate_size=48, head_dim=8, **GQA_HEADS), ""),
    # T5's encoder output (encoder_last_hidden_state) is a model output, so d_model is never pruned; heads
    # (self- and cross-attention, the relative attention bias with them) and d_ff are; d_kv stays 8
    ("t5", "all"): (dict(d_model=32, d_kv=8, d_ff=48, num_heads=3, num_layers=2, num_decoder_layers=2), ""),
    ("vit", "all"): (dict(hidden_size=24, num_attention_heads=3, intermediate_size=48), ""),
    ("vit", "keep_hidden"): (dict(hidden_size=32, num_attention_heads=3, head_dim=8, intermediate_size=48), ""),
}
REASON_TEXT = {"gemma": "scalar_embed_scale", "gemma2": "scalar_embed_scale", "gemma3": "scalar_embed_scale",
               "gpt2": "divisible by num_heads", "opt": "divisible by num_heads", "neox": "scaling",
               "falcon": "divisible by num_heads", "falcon_gqa": "inv_norm_factor",
               "bert": "not a multiple of the number of attention heads"}


def _inputs(family: str = "llama") -> dict[str, torch.Tensor]:
    return family_inputs(family)


def _build(family: str) -> nn.Module:
    model_class, config = FAMILIES[family].model_class, FAMILIES[family].config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seeded_build(lambda: model_class(config()))()


def _labels(ir: PruningIR, model: nn.Module, scenario: str) -> list:
    embedding = model.get_input_embeddings()
    skipped = set()
    for group in ir.groups:
        modules = [model.get_submodule(name) for name in group.modules]
        if scenario not in ("all", "half") and any(module is embedding for module in modules):
            skipped.add(group.id)  # the hidden size
        if scenario == "mlp" and any("attention" in name for name in group.modules):
            skipped.add(group.id)
    share = 0.5 if scenario == "half" else 0.25  # "half": every group, hidden size included, by half
    return [label for label in UniformLabelSelector(share).select(ir) if label.group.id not in skipped]


@functools.lru_cache(maxsize=None)
def _pruned(family: str, scenario: str) -> tuple[nn.Module, nn.Module, list[str], nn.Module]:
    """(original, pruned, messages of the warnings prune() gave, pruned without the config sync);
    built once per case, never modified."""
    original = _build(family)
    ir = PruningIR(original, gqa_unit=UNITS.get(family, GQA_UNIT)).infer_labels(**_inputs(family))
    labels = _labels(ir, original, scenario)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = ir.prune(labels=labels).model.eval()
    unsynced = ir.prune(labels=labels, sync_config=False).model.eval()
    return original, pruned, [str(w.message) for w in caught if "config cannot describe" in str(w.message)], unsynced


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model.eval()(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    return {path: {key: value for key, value in vars(module).items()
                   if isinstance(value, int) and not isinstance(value, bool)} for path, module in model.named_modules()}


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], use_cache: bool) -> torch.Tensor:
    """Greedy tokens (4 new) from the prompt ``input_ids`` (T5: the encoder's input)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, use_cache=use_cache,
                              pad_token_id=model.config.eos_token_id or 0)


def _generates(model: nn.Module) -> bool:
    return type(model).can_generate()


def _generated_length(model: nn.Module) -> int:
    return 1 + 4 if model.config.is_encoder_decoder else 8 + 4  # T5 starts from decoder_start_token_id


def _case_param(case: tuple[str, str], for_from_pretrained: bool = False):
    reason = CASES[case][1]
    marks = []
    if reason and for_from_pretrained:
        marks.append(pytest.mark.xfail(strict=True, reason=f"no config can express it: {reason}"))
    return pytest.param(*case, id="-".join(case), marks=marks)


@pytest.mark.parametrize("family, scenario", [_case_param(case) for case in CASES])
def test_prune_writes_the_pruned_sizes_into_the_config(family, scenario):
    original, pruned, warned, unsynced = _pruned(family, scenario)
    fields, reason = CASES[(family, scenario)]
    assert {name: getattr(pruned.config, name) for name in fields} == fields
    # the vocabulary (ViT: the classes) is never pruned, in the embedding or in the output
    assert _output(pruned, _inputs(family)).shape == _output(original, _inputs(family)).shape
    if isinstance(original.get_input_embeddings(), nn.Embedding):
        assert pruned.get_input_embeddings().num_embeddings == original.get_input_embeddings().num_embeddings
    ok, why = expressible(pruned)
    assert ok == (not reason), why
    if reason:
        assert len(warned) == 1 and REASON_TEXT[family] in why and why in warned[0]
        assert "from_pretrained" in warned[0] and "save_pretrained_pruned" in warned[0]
    else:
        assert not warned and why == ""
    # the original model's config is untouched, and the pruned model computes what it computed before the sync
    assert original.config.to_dict() == _build(family).config.to_dict()
    torch.testing.assert_close(_output(pruned, _inputs(family)), _output(unsynced, _inputs(family)), atol=0, rtol=0)
    if reason:
        assert pruned.config.to_dict() == original.config.to_dict()
    assert sync_config(pruned, warn=False) == []  # already in sync


@pytest.mark.parametrize("family, scenario", [_case_param(case, for_from_pretrained=True) for case in CASES])
def test_save_pretrained_then_from_pretrained_rebuilds_the_pruned_model(family, scenario, tmp_path):
    _, pruned, _, _ = _pruned(family, scenario)
    pruned.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = type(pruned).from_pretrained(tmp_path).eval()
    inputs = _inputs(family)
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)
    assert _sizes(loaded) == _sizes(pruned)  # the pruned model is what from_pretrained builds, size attributes too
    if _generates(pruned):
        with_cache = _generate(pruned, inputs, use_cache=True)
        assert with_cache.shape == (2, _generated_length(pruned))
        assert torch.equal(with_cache, _generate(pruned, inputs, use_cache=False))
        assert torch.equal(with_cache, _generate(loaded, inputs, use_cache=True))


@pytest.mark.parametrize("family, scenario", [_case_param(case) for case in CASES])
def test_save_pretrained_pruned_round_trips_every_case(family, scenario, tmp_path):
    _, pruned, _, _ = _pruned(family, scenario)
    auto = getattr(transformers, FAMILIES[family].auto)
    save_pretrained_pruned(pruned, tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / SHAPES_FOLDER / "pruning_config.json").is_file() == bool(CASES[(family, scenario)][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_pretrained_pruned(auto, tmp_path)
    assert type(loaded) is type(pruned) and not loaded.training
    inputs = _inputs(family)
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)
    if _generates(pruned):
        assert torch.equal(_generate(loaded, inputs, use_cache=True), _generate(pruned, inputs, use_cache=False))


def _hidden_groups(ir: PruningIR, model: nn.Module) -> set[int]:
    """The groups that hold the input embedding (the hidden size)."""
    embedding = model.get_input_embeddings()
    return {group.id for group in ir.groups if any(model.get_submodule(name) is embedding for name in group.modules)}


def _is_attention(group) -> bool:
    return any(part in name for name in group.modules for part in ("attn", "attention", "Attention"))


# Families whose heads are inexact (OLMo2 normalizes q and k over all heads together): what the exact selection
# below leaves.
EXACT_PARTS = {"olmo2": {"mlp"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zeroed_heads_and_mlp_channels_changes_no_output(family):
    """Every exact group (heads, MLP channels) loses a quarter of its labels: the pruned model computes
    what the original computes with those channels zeroed."""
    original = _build(family)
    inputs = _inputs(family)
    ir = PruningIR(original, gqa_unit=UNITS.get(family, GQA_UNIT)).infer_labels(**inputs)
    exact = {group.id: group for group in ir.groups if group.prunable and group.exact}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unscored: labels in channel order; configs that cannot describe it
        labels = [label for label in UniformLabelSelector(0.25).select(ir) if label.group.id in exact]
        pruned = ir.prune(labels=labels).model
    parts = {"attention" if _is_attention(exact[label.group.id]) else "mlp" for label in labels}
    assert parts == EXACT_PARTS.get(family, {"attention", "mlp"})
    before = _output(original, inputs)
    ir.zero_labels(labels)
    zeroed = _output(original, inputs)
    assert (zeroed - before).abs().max() > 1e-4  # the zeroed channels mattered
    torch.testing.assert_close(_output(pruned, inputs), zeroed, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())


def _layer_index(group) -> int:
    """The first layer number in the group's first module path (0 when none: the embedding)."""
    found = re.search(r"\.(\d+)(\.|$)", group.modules[0])
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("family", FAMILIES)
def test_global_selection_keeps_per_layer_widths_and_round_trips_through_the_pruned_pair(family, tmp_path):
    """Scores that rank layer 0 below layer 1 make a global selection prune layer 0 only (the hidden size
    kept): no config describes it, prune() says which widths differ, and save_pretrained_pruned /
    load_pretrained_pruned rebuild it; generate agrees with and without the KV cache."""
    original = _build(family)
    inputs = _inputs(family)
    ir = PruningIR(original, gqa_unit=UNITS.get(family, GQA_UNIT)).infer_labels(**inputs)
    ir.set_scores(lambda label: label.channel / label.group.channel_count + _layer_index(label.group))
    hidden = _hidden_groups(ir, original)
    labels = [label for label in GlobalScoreLabelSelector(0.25).select(ir) if label.group.id not in hidden]
    assert labels and {_layer_index(label.group) for label in labels} == {0}
    with pytest.warns(UserWarning, match="differ across layers") as caught:
        pruned = ir.prune(labels=labels).model.eval()
    assert len([w for w in caught if "config cannot describe" in str(w.message)]) == 1
    assert not expressible(pruned)[0]
    save_pretrained_pruned(pruned, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_pretrained_pruned(getattr(transformers, FAMILIES[family].auto), tmp_path)
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)
    if _generates(pruned):
        with_cache = _generate(pruned, inputs, use_cache=True)
        assert torch.equal(with_cache, _generate(pruned, inputs, use_cache=False))
        assert torch.equal(with_cache, _generate(loaded, inputs, use_cache=True))


def test_t5_with_a_deeper_decoder_syncs_both_stacks(tmp_path):
    """Encoder and decoder stacks of different depths (2 and 3 blocks) are both read: uniform pruning is
    expressible and from_pretrained rebuilds it; one decoder block pruned alone is named in the warning.
    (No generate: transformers 5.25 sizes T5's cache by the encoder's depth and fails even unpruned.)"""
    family = FAMILIES["t5"]
    config = family.config()
    config.num_decoder_layers = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = seeded_build(lambda: family.model_class(config))()
    inputs = _inputs("t5")
    ir = PruningIR(original).infer_labels(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unscored: labels in channel order
        pruned = ir.prune(labels=UniformLabelSelector(0.25).select(ir)).model.eval()
    assert (pruned.config.num_heads, pruned.config.d_ff, pruned.config.num_decoder_layers) == (3, 48, 3)
    assert expressible(pruned) == (True, "")
    pruned.save_pretrained(tmp_path)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)
    ir = PruningIR(copy.deepcopy(original)).infer_labels(**inputs)
    expected = ("MLP channels differ across layers (encoder.block 0 keeps 64, encoder.block 1 keeps 64, "
                "decoder.block 0 keeps 64, decoder.block 1 keeps 64, decoder.block 2 keeps 56)")
    with pytest.warns(UserWarning, match=re.escape(expected)):
        ir.prune(labels=_layer_labels(ir, {"decoder.block.2.layer.2": 8}))


def _layer_labels(ir: PruningIR, counts: dict[str, int]) -> list:
    """The first ``counts[part]`` labels of the group whose modules name ``part`` (e.g. "layers.0.mlp")."""
    labels = []
    for group in ir.label_groups():
        modules = group[0].group.modules
        labels += next((group[:count] for part, count in counts.items() if all(part in name for name in modules)), [])
    return labels


def _globally_pruned() -> tuple[nn.Module, nn.Module]:
    """LLaMA with 16 MLP channels removed from layer 0 and 8 from layer 1, and one key/value head from layer 0."""
    original = _build("llama")
    ir = PruningIR(original, gqa_unit=GQA_UNIT).infer_labels(**_inputs())
    labels = _layer_labels(ir, {"layers.0.mlp": 16, "layers.1.mlp": 8, "layers.0.self_attn": 1})
    with pytest.warns(UserWarning, match="config cannot describe") as caught:
        pruned = ir.prune(labels=labels).model.eval()
    assert len([w for w in caught if "config cannot describe" in str(w.message)]) == 1
    return original, pruned


def test_per_layer_widths_warn_are_not_expressible_and_round_trip_through_the_pruned_pair(tmp_path):
    _, pruned = _globally_pruned()
    assert [layer.mlp.up_proj.out_features for layer in pruned.model.layers] == [48, 56]
    ok, why = expressible(pruned)
    assert not ok
    assert "MLP channels differ across layers (layer 0 keeps 48, layer 1 keeps 56)" in why
    assert "attention heads differ across layers (layer 0 keeps 2, layer 1 keeps 4)" in why
    assert "key/value heads differ across layers (layer 0 keeps 1, layer 1 keeps 2)" in why
    # the per-layer fields keep their values: one number cannot describe two layers
    assert (pruned.config.intermediate_size, pruned.config.num_attention_heads,
            pruned.config.num_key_value_heads) == (64, 4, 2)
    save_pretrained_pruned(pruned, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["intermediate_size"] == 64
    loaded = load_pretrained_pruned(transformers.AutoModelForCausalLM, tmp_path)
    assert [layer.mlp.up_proj.out_features for layer in loaded.model.layers] == [48, 56]
    inputs = _inputs()
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)
    assert torch.equal(_generate(loaded, inputs, use_cache=True), _generate(pruned, inputs, use_cache=False))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # a plain from_pretrained refuses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_per_layer_pruning_after_a_synced_one_round_trips(tmp_path):
    """The second pruning's save starts from the first one's config: the model must be what it builds."""
    _, first, _, _ = _pruned("llama", "all")
    ir = PruningIR(copy.deepcopy(first), gqa_unit=GQA_UNIT).infer_labels(**_inputs())
    with pytest.warns(UserWarning, match="MLP channels differ across layers"):
        second = ir.prune(labels=_layer_labels(ir, {"layers.0.mlp": 8})).model.eval()
    assert (second.config.hidden_size, second.config.intermediate_size) == (24, 48)
    save_pretrained_pruned(second, tmp_path)
    loaded = load_pretrained_pruned(transformers.AutoModelForCausalLM, tmp_path)
    assert [layer.mlp.up_proj.out_features for layer in loaded.model.layers] == [40, 48]
    torch.testing.assert_close(_output(loaded, _inputs()), _output(second, _inputs()), atol=1e-5, rtol=0)


def test_global_selection_with_scores_is_reported_per_layer():
    original = _build("llama")
    ir = PruningIR(original, gqa_unit=GQA_UNIT).infer_labels(**_inputs())
    ir.set_scores(lambda label: float(label.channel) + (100.0 if "layers.1" in " ".join(label.group.modules) else 0))
    labels = [label for label in GlobalScoreLabelSelector(0.3).select(ir)
              if any(".mlp." in name for name in label.group.modules)]
    with pytest.warns(UserWarning, match="MLP channels differ across layers"):
        pruned = ir.prune(labels=labels).model
    assert pruned.config.intermediate_size == 64


def test_resaving_an_expressible_model_removes_stale_shapes(tmp_path):
    _, pruned = _globally_pruned()
    save_pretrained_pruned(pruned, tmp_path)
    assert (tmp_path / SHAPES_FOLDER / "pruning_config.json").is_file()
    _, uniform, _, _ = _pruned("llama", "all")
    save_pretrained_pruned(uniform, tmp_path)
    assert not (tmp_path / SHAPES_FOLDER / "pruning_config.json").exists()
    loaded = load_pretrained_pruned(transformers.AutoModelForCausalLM, tmp_path)
    torch.testing.assert_close(_output(loaded, _inputs()), _output(uniform, _inputs()), atol=1e-5, rtol=0)


def test_load_pretrained_pruned_names_what_is_missing(tmp_path):
    with pytest.raises(PrunedModelFormatError, match="neither a Hugging Face checkpoint"):
        load_pretrained_pruned(transformers.AutoModelForCausalLM, tmp_path)


def test_models_outside_transformers_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = {"hidden_size": 4}
    assert sync_config(model) == []
    assert expressible(model)[0] is False
    with pytest.raises(TypeError):
        save_pretrained_pruned(model, "unused")


def test_every_copy_of_the_config_is_synced():
    """A submodule holding its own copy of the config (T5's stacks do) gets the new sizes too."""
    model = _build("llama")
    model.model.config = copy.deepcopy(model.config)
    ir = PruningIR(model, gqa_unit=GQA_UNIT).infer_labels(**_inputs())
    pruned = ir.prune(labels=_labels(ir, model, "all")).model
    assert pruned.model.config is not pruned.config
    for config in (pruned.config, pruned.model.config):
        assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads) == (24, 48, 1)


@pytest.mark.parametrize("unit, heads, kv_heads", [("query_heads", 2, 2), ("kv_groups", 2, 1)])
def test_phi3_heads_leave_the_fused_projection_of_every_layer_and_the_config_follows(unit, heads, kv_heads, tmp_path):
    """Phi-3 slices its fused qkv_proj at ``config.num_attention_heads * head_dim``, and one config serves every
    layer: a head label removes the same heads from every layer (query heads within each key/value group by
    default, whole groups with ``kv_groups``). Zeroed heads removed change no output, the config holds the new
    counts, generate agrees with and without the cache, and from_pretrained rebuilds the model."""
    original, inputs = _build("phi3"), _inputs("phi3")
    ir = PruningIR(original, gqa_unit=unit).infer_labels(**inputs)
    hidden = _hidden_groups(ir, original)
    group, = [g for g in ir.groups if g.prunable and g.id not in hidden and any("qkv_proj" in n for n in g.modules)]
    assert {_layer_index(g) for g in [group]} == {0} and any("layers.1." in name for name in group.modules)
    assert group.exact and len(group.labels) == 2
    labels = group.labels[:1]
    ir.zero_labels(labels)
    zeroed = _output(original, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group kept back, no config left stale
        pruned = ir.prune(labels=labels).model.eval()
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (heads, kv_heads)
    for layer in pruned.model.layers:
        attention = layer.self_attn
        assert attention.qkv_proj.out_features == (heads + 2 * kv_heads) * 8 == attention.qkv_proj.weight.shape[0]
        assert attention.o_proj.in_features == heads * 8
        assert (attention.num_key_value_heads, attention.num_key_value_groups) == (kv_heads, heads // kv_heads)
    torch.testing.assert_close(_output(pruned, inputs), zeroed, atol=1e-5, rtol=0)
    with_cache = _generate(pruned, inputs, use_cache=True)
    assert torch.equal(with_cache, _generate(pruned, inputs, use_cache=False))
    pruned.save_pretrained(tmp_path)
    loaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)
    assert torch.equal(_generate(loaded, inputs, use_cache=True), with_cache)
