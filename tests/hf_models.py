"""Tiny Hugging Face transformers built from configs (no weight downloads), as ``ZooEntry`` items.

Each model uses ``attn_implementation="sdpa"``, is built under ``torch.manual_seed(0)`` with
randomised norm parameters, and is returned in eval mode. ``example_inputs()`` returns
``(input_ids,)`` of shape 2x8; an ``attention_mask`` may be passed separately as a keyword.
Forward returns the model's default ``ModelOutput`` (``last_hidden_state`` / ``logits``).
"""

from __future__ import annotations

from collections.abc import Callable

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

__all__ = ["HF_ZOO", "VOCAB_SIZE", "SEQ_LEN"]

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
