"""Tiny Hugging Face transformers built from configs (no weight downloads), as ``ZooEntry`` items.

Each model uses ``attn_implementation="sdpa"``, is built under ``torch.manual_seed(0)`` with
randomised norm parameters, and is returned in eval mode. ``example_inputs()`` returns
``(input_ids,)`` of shape 2x8; an ``attention_mask`` may be passed separately as a keyword.
Forward returns the model's default ``ModelOutput`` (``last_hidden_state`` / ``logits``).

``FAMILIES`` holds one tiny config of every family in the Hugging Face tests (2 layers, hidden size
32, 4 heads of 8 channels, MLP 64), with ``family_inputs`` for its kind of input: token ids,
token ids and decoder ids (T5), or images (ViT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import transformers as T
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

try:  # tests/ is on sys.path (pytest rootdir conftest, or running from tests/)
    from zoo import ZooEntry, seeded_build, token_input
except ImportError:  # imported as part of the ``tests`` package, e.g. ``tests.hf_models``
    from .zoo import ZooEntry, seeded_build, token_input

__all__ = ["HF_ZOO", "VOCAB_SIZE", "SEQ_LEN", "FAMILIES", "Family", "family_inputs"]

VOCAB_SIZE = 100
SEQ_LEN = 8
ATTN_IMPLEMENTATION = "sdpa"


def _bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    return BertModel(config)


def _gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=VOCAB_SIZE - 1,  # GPT-2's default 50256 lies outside the tiny vocabulary
        eos_token_id=VOCAB_SIZE - 1,
        use_cache=False,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    return GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    return LlamaForCausalLM(config)


def _entry(name: str, factory: Callable[[], nn.Module]) -> ZooEntry:
    # Token ids start at 1: id 0 is BERT's pad token and would trigger padding warnings.
    return ZooEntry(name, seeded_build(factory), token_input(VOCAB_SIZE, 2, SEQ_LEN))


HF_ZOO: dict[str, ZooEntry] = {
    entry.name: entry for entry in (_entry("bert", _bert), _entry("gpt2", _gpt2), _entry("llama", _llama))
}


class Family(NamedTuple):
    """A transformers family: its model class, a tiny config, its input kind and the Auto class that loads it."""
    model_class: type
    config: Callable[[], Any]
    inputs: str = "tokens"  # "tokens", "seq2seq" (input_ids and decoder_input_ids) or "image" (pixel_values)
    auto: str = "AutoModelForCausalLM"


_COMMON = dict(vocab_size=VOCAB_SIZE, num_hidden_layers=2, max_position_embeddings=64,
               attn_implementation=ATTN_IMPLEMENTATION)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **_COMMON)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary

FAMILIES: dict[str, Family] = {  # 2 layers, hidden 32, 4 heads of 8 channels (2 key/value heads where grouped)
    "llama": Family(T.LlamaForCausalLM, lambda: T.LlamaConfig(**_LLAMA_LIKE)),
    "mistral": Family(T.MistralForCausalLM, lambda: T.MistralConfig(**_LLAMA_LIKE)),
    "qwen2": Family(T.Qwen2ForCausalLM, lambda: T.Qwen2Config(**_LLAMA_LIKE)),
    "qwen3": Family(T.Qwen3ForCausalLM, lambda: T.Qwen3Config(head_dim=8, **_LLAMA_LIKE)),
    "gemma": Family(T.GemmaForCausalLM, lambda: T.GemmaConfig(head_dim=8, **_LLAMA_LIKE)),
    # Gemma2 soft-caps its attention logits, which only eager attention does
    "gemma2": Family(T.Gemma2ForCausalLM, lambda: T.Gemma2Config(
        head_dim=8, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        **{**_LLAMA_LIKE, "attn_implementation": "eager"})),
    "gemma3": Family(T.Gemma3ForCausalLM, lambda: T.Gemma3TextConfig(head_dim=8, sliding_window=4,
                                                                     final_logit_softcapping=3.0, **_LLAMA_LIKE)),
    "phi3": Family(T.Phi3ForCausalLM, lambda: T.Phi3Config(**_TOKENS, **_LLAMA_LIKE)),
    "mixtral": Family(T.MixtralForCausalLM, lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                    **_LLAMA_LIKE)),
    "olmo2": Family(T.Olmo2ForCausalLM, lambda: T.Olmo2Config(**_TOKENS, **_LLAMA_LIKE)),
    "granite": Family(T.GraniteForCausalLM, lambda: T.GraniteConfig(
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
        **_LLAMA_LIKE)),
    "gpt2": Family(T.GPT2LMHeadModel, lambda: T.GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1, attn_implementation=ATTN_IMPLEMENTATION)),
    "opt": Family(T.OPTForCausalLM, lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                                        word_embed_proj_dim=32, pad_token_id=1, **_COMMON)),
    "neox": Family(T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                                                 num_attention_heads=4, **_COMMON)),
    "falcon": Family(T.FalconForCausalLM, lambda: T.FalconConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        attn_implementation=ATTN_IMPLEMENTATION)),
    # Falcon-40B's layout: key/value groups, each holding its query heads, then its key and value head
    "falcon_gqa": Family(T.FalconForCausalLM, lambda: T.FalconConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, attn_implementation=ATTN_IMPLEMENTATION)),
    "bert": Family(T.BertModel, lambda: T.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                     **_COMMON), auto="AutoModel"),
    # T5: d_kv independent of d_model, relative attention bias per head, a cross-attention per decoder layer
    "t5": Family(T.T5ForConditionalGeneration, lambda: T.T5Config(
        vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation=ATTN_IMPLEMENTATION),
        inputs="seq2seq", auto="AutoModelForSeq2SeqLM"),
    "vit": Family(T.ViTForImageClassification, lambda: T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=5, attn_implementation=ATTN_IMPLEMENTATION),
        inputs="image", auto="AutoModelForImageClassification"),
}


def family_inputs(name: str) -> dict[str, torch.Tensor]:
    """Keyword inputs for a family (fixed seed): token ids 2x8 from 1 (id 0 is a pad token), plus
    decoder ids 2x5 for T5, or 2 images of 3x16x16 for ViT."""
    generator = torch.Generator().manual_seed(0)
    kind = FAMILIES[name].inputs
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    inputs = {"input_ids": torch.randint(1, VOCAB_SIZE, (2, SEQ_LEN), generator=generator)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB_SIZE, (2, 5), generator=generator)
    return inputs
