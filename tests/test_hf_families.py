"""Config sync of Hugging Face families beyond ``test_hf_config.py`` (``pruning_ir.huggingface``, ``hf_fields``).

Tiny models (built from configs, no downloads), pruned with ``ChannelConstraint(same_across_layers=True)``:
- MLP widths a config field describes (GPT-J's ``n_inner``, DistilBERT's ``hidden_dim``, ALBERT's shared layer,
  Wav2Vec2 with its weight-normed positional convolution, BART/Whisper's ``encoder_ffn_dim`` /
  ``decoder_ffn_dim``, one per stack) are written, and ``from_pretrained`` rebuilds the model exactly;
- models without token embeddings (ResNet, ConvNeXt, MobileViT), with per-stage list fields (Swin's
  ``num_heads``, SegFormer's strict ``num_attention_heads``), and DistilBERT with heads pruned (its head size is
  ``dim / n_heads``) prune without a crash: ``prune()`` warns once, naming why the config cannot describe them,
  leaves it as it was, and ``save_pretrained_pruned`` / ``load_pretrained_pruned`` round-trip them.
Every unpruned model is expressible.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
T = transformers

from pruning_ir import ChannelConstraint, GlobalScoreLabelSelector, PruningIR, UniformLabelSelector  # noqa: E402
from pruning_ir.huggingface import expressible, load_pretrained_pruned, save_pretrained_pruned  # noqa: E402
from zoo import seeded_build  # noqa: E402

VOCAB = 100
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                max_position_embeddings=64)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=2)


def _tokens(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, VOCAB, (2, 8), generator=generator)}


def _seq2seq(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_tokens(generator), "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=generator)}


def _image(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}


# name: (model class, tiny config, inputs, the MLP's first module, the config field of its width per stack)
FAMILIES = {
    "gptj": (T.GPTJForCausalLM, lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, rotary_dim=4,
                                                       n_positions=64, bos_token_id=1, eos_token_id=2),
             _tokens, "mlp.fc_in", {"": "n_inner"}),
    "distilbert": (T.DistilBertModel, lambda: T.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_heads=4,
                                                                 n_layers=2, max_position_embeddings=64),
                   _tokens, "ffn.lin1", {"": "hidden_dim"}),
    # embedding_size is not the hidden size; the one layer group serves both layers
    "albert": (T.AlbertModel, lambda: T.AlbertConfig(embedding_size=16, **_ENCODER), _tokens, "ffn",
               {"": "intermediate_size"}),
    # weight_norm parametrizes the positional convolution: a class of its own per instance
    "wav2vec2": (T.Wav2Vec2Model, lambda: T.Wav2Vec2Config(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2), conv_kernel=(10, 3, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=1,
        feat_extract_norm="layer", mask_time_prob=0.0),
        lambda generator: {"input_values": torch.randn(2, 1440, generator=generator)}, "intermediate_dense",
        {"": "intermediate_size"}),
    "bart": (T.BartForConditionalGeneration, lambda: T.BartConfig(max_position_embeddings=64, **_SEQ2SEQ), _seq2seq,
             "fc1", {"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}),
    "whisper": (T.WhisperForConditionalGeneration, lambda: T.WhisperConfig(
        num_mel_bins=8, max_source_positions=16, max_target_positions=32, **_SEQ2SEQ),
        lambda generator: {"input_features": torch.randn(2, 8, 32, generator=generator),
                           "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=generator)},
        "fc1", {"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}),
    "resnet": (T.ResNetForImageClassification, lambda: T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=5), _image),
    "convnext": (T.ConvNextForImageClassification, lambda: T.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=16, num_labels=5), _image),
    "mobilevit": (T.MobileViTForImageClassification, lambda: T.MobileViTConfig(
        image_size=16, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48],
        num_attention_heads=2, mlp_ratio=2.0, num_labels=5), _image),
    "swin": (T.SwinForImageClassification, lambda: T.SwinConfig(
        image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2, mlp_ratio=2.0,
        num_labels=5), _image),
    "segformer": (T.SegformerForSemanticSegmentation, lambda: T.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[2, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3),
        _image),
}


def _build(family: str) -> nn.Module:
    model_class, config = FAMILIES[family][:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seeded_build(lambda: model_class(config()))()


def _inputs(family: str) -> dict[str, torch.Tensor]:
    return FAMILIES[family][2](torch.Generator().manual_seed(0))


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model.eval()(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _prune(ir: PruningIR, selector: GlobalScoreLabelSelector | UniformLabelSelector) -> tuple[nn.Module, list[str]]:
    """The pruned model and the messages of prune()'s config warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = ir.prune(labels=selector.select(ir)).model.eval()
    return pruned, [str(w.message) for w in caught if "config cannot describe" in str(w.message)]


def _mlp(family: str, group) -> str | None:
    """The stack ("encoder", "decoder", or "" for a model with one) of an MLP group, None for any other group."""
    up, first = FAMILIES[family][3], group.modules[0] if group.modules else ""
    if not (first == up or first.endswith("." + up)):
        return None
    return next((stack for stack in FAMILIES[family][4] if stack and f".{stack}." in group.modules[0]), "")


@pytest.mark.parametrize("family", ["gptj", "distilbert", "albert", "wav2vec2", "bart", "whisper"])
def test_mlp_widths_tied_across_layers_are_written_and_from_pretrained_rebuilds_them(family, tmp_path):
    """A decoder's MLP loses 8 channels per layer, an encoder's (or the only stack's) 16: the config fields
    hold 56 and 48 (GPT-J: 128 - 32), no warning, and from_pretrained rebuilds the model exactly."""
    original, inputs = _build(family), _inputs(family)
    assert expressible(original) == (True, "")
    ir = PruningIR(original).infer_labels(**inputs)
    stacks = {group.id: _mlp(family, group) for group in ir.groups}
    widths = {group.id: group.channel_count for group in ir.groups if stacks[group.id] is not None}
    # scores: an encoder's MLP labels rank below the decoder's twice as fast; nothing else is chosen
    ir.set_scores(lambda label: {None: 1000.0 + label.channel, "decoder": 2.0 * label.channel + 0.5}.get(
        stacks[label.group.id], float(label.channel)))
    removed = {stacks[group]: 8 if stacks[group] == "decoder" else width // 4 for group, width in widths.items()}
    count = sum(removed[stacks[group]] for group in widths)
    pruned, warned = _prune(ir, GlobalScoreLabelSelector(count, ChannelConstraint(same_across_layers=True)))
    assert warned == [] and expressible(pruned) == (True, "")
    for stack, field in FAMILIES[family][4].items():
        full = next(width for group, width in widths.items() if stacks[group] == stack)
        assert getattr(pruned.config, field) == full - removed[stack]
        assert getattr(original.config, field) in (full, None)  # GPT-J's n_inner: None, 4 * n_embd
    pruned.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = type(pruned).from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in original.parameters())
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)


# what the warning names. No token embedding (ResNet, ConvNeXt, MobileViT): the first stale shape; Swin's stages
# differ (and it lists heads per stage); SegFormer's heads are one value per stage, in a strict-dataclass field
# that refuses a number; DistilBERT's heads are read from q_lin/out_lin, and its head size is dim / n_heads
REASONS = {"resnet": "resnet.embedder.embedder.convolution.weight would be [8, 3, 7, 7] instead of [6, 3, 7, 7]",
           "convnext": "convnext.embeddings.patch_embeddings.weight would be [8, 3, 4, 4] instead of [6, 3, 4, 4]",
           "mobilevit": "mobilevit.conv_stem.convolution.weight would be [8, 3, 3, 3] instead of [6, 3, 3, 3]",
           "swin": "attention heads differ across layers (layer 0 keeps 1, layer 1 keeps 3)",
           "segformer": "num_attention_heads holds one value per stage ([2, 2]), which one number cannot rewrite",
           "distilbert": "with n_heads=3, hidden_dim=48, head_dim=8, DistilBertModel cannot be built (ValueError: "
                         "config.n_heads 3 must divide config.dim 32 evenly)"}


@pytest.mark.parametrize("family", list(REASONS))
def test_families_a_config_cannot_describe_warn_and_round_trip_through_the_pruned_pair(family, tmp_path):
    """A quarter of every group (tied across layers) leaves: prune() warns once, naming why, leaves the config as
    it was, and save_pretrained_pruned / load_pretrained_pruned rebuild the pruned model exactly."""
    original, inputs = _build(family), _inputs(family)
    assert expressible(original) == (True, "")
    ir = PruningIR(original).infer_labels(**inputs)
    ir.set_scores(lambda label: float(label.channel))
    pruned, warned = _prune(ir, UniformLabelSelector(0.25, ChannelConstraint(same_across_layers=True)))
    ok, why = expressible(pruned)
    assert not ok and REASONS[family] in why
    assert len(warned) == 1 and why in warned[0] and "save_pretrained_pruned" in warned[0]
    assert pruned.config.to_dict() == original.config.to_dict()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())
    save_pretrained_pruned(pruned, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_pretrained_pruned(type(pruned), tmp_path)
    torch.testing.assert_close(_output(loaded, inputs), _output(pruned, inputs), atol=1e-5, rtol=0)


def _qwen2_moe(layers: int) -> tuple[nn.Module, torch.Tensor]:
    """A tiny Qwen2-MoE (its experts run through ``torch._grouped_mm``) and token ids."""
    config = T.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=64,
                              moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    model = seeded_build(lambda: T.Qwen2MoeForCausalLM(config))()
    return model, torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def test_fused_experts_keep_aligned_widths_and_the_one_call_reaches_its_budget():
    """Qwen2-MoE runs its experts through ``torch._grouped_mm``, whose rows must stay 16-byte aligned:
    the groups its weights span keep multiples of 8 channels, so no selection breaks the kernel."""
    import pruning_ir
    model, ids = _qwen2_moe(2)
    ir = PruningIR(model).infer_labels(ids)
    experts = [g for g in ir.groups if g.prunable and any(".experts." in p for p in g.parameters)]
    assert experts and all(g.width_multiple == 8 for g in experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no group kept back because its removal broke the kernel
        pruned = pruning_ir.prune(model, (ids,), params=0.7, verbose=False)
    assert sum(p.numel() for p in pruned.parameters()) <= 0.7 * sum(p.numel() for p in model.parameters())
    for name, parameter in pruned.named_parameters():
        if ".experts." in name:
            assert all(size % 8 == 0 for size in parameter.shape[1:]), (name, parameter.shape)
    assert pruned(ids).logits.shape == (2, 8, VOCAB)


def test_biases_a_refit_created_round_trip_through_the_pruned_pair_given_the_ir(tmp_path):
    """A least-squares refit that creates biases (``create_bias=True``) leaves a model no config describes:
    ``save_pretrained_pruned(ir)`` records them, and ``load_pretrained_pruned`` rebuilds it exactly."""
    from pruning_ir import ActivationCriterion, Reconstruction, collect_statistics
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = seeded_build(lambda: T.LlamaForCausalLM(config))()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (2, 10), generator=generator) for _ in range(3)]
    ir = PruningIR(model, gqa_unit="kv_groups").infer_labels(batches[0])
    inside = lambda group: all("self_attn" in m or ".mlp" in m for m in group.modules)  # noqa: E731
    with collect_statistics(ir, groups=inside) as statistics, ActivationCriterion(ir, method="flap") as collector:
        for ids in batches:
            collector(input_ids=ids)
    labels = [label for label in UniformLabelSelector(0.5).select(ir) if inside(label.group)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the config cannot describe a created bias: said once, expected here
        pruned_ir = ir.prune(labels=labels, reconstruct=Reconstruction(statistics, "least_squares"))
    pruned = pruned_ir.model.eval()
    assert pruned.model.layers[0].self_attn.o_proj.bias is not None
    save_pretrained_pruned(pruned_ir, tmp_path)
    loaded = load_pretrained_pruned(T.AutoModelForCausalLM, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[1]).logits, pruned(batches[1]).logits, atol=0, rtol=0)


def test_gpt_oss_experts_stored_the_other_way_round_are_read_right():
    """GPT-OSS stores ``experts.down_proj`` as (experts, MLP width, hidden), Mixtral as (experts, hidden,
    MLP width): the unpruned model is expressible, and its MLP width is read from the right axis."""
    config = T.GptOssConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, intermediate_size=48, head_dim=8,
                            num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    model = seeded_build(lambda: T.GptOssForCausalLM(config))()
    assert expressible(model) == (True, "")


def test_labels_that_would_misalign_fused_experts_are_refused_before_anything_changes():
    model, ids = _qwen2_moe(1)
    ir = PruningIR(model).infer_labels(ids)
    experts = next(g for g in ir.groups if g.prunable and g.width_multiple == 8)
    from pruning_ir import InvalidLabelsError
    with pytest.raises(InvalidLabelsError, match="must keep a multiple of 8"):
        ir.prune(labels=experts.labels[:3])
    assert ir.prune(labels=experts.labels[:8]).model(torch.ones(1, 4, dtype=torch.long)).logits.shape == (1, 4, VOCAB)


def test_removal_costs_of_fused_experts_are_measured_at_widths_their_kernel_runs():
    from pruning_ir import measure_removal_costs
    model, ids = _qwen2_moe(1)
    ir = PruningIR(model).infer_labels(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # no scores yet: measured in channel order, said once
        curves = measure_removal_costs(ir, lambda m: m(ids, labels=ids).loss, points=4, verbose=False)
    for curve in curves:
        multiple = curve.group.width_multiple
        counts = curve.removed_counts
        assert len(counts) > 1 and all((curve.group.channel_count - n) % multiple == 0 for n in counts[1:]), counts
