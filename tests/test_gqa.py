"""Grouped-query attention at two grains (``PruningIR(model, gqa_unit=...)``).

``"query_heads"`` (default): a label is query head ``j`` of every key/value group, so removing it
keeps the layout grouped (8/2 heads -> 6/2); ``"kv_groups"``: a label is a key/value head with its
query heads. On tiny Llama, Mistral, Qwen2, Qwen3 and Gemma with several query/key-value ratios,
removing zeroed labels must leave the outputs unchanged, ``generate`` must give the same tokens with
and without the KV cache, and the config must describe the result (``from_pretrained`` rebuilds it).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pruning_ir import PruningIR, UniformLabelSelector  # noqa: E402
from pruning_ir.huggingface import expressible, load_pretrained_pruned, save_pretrained_pruned  # noqa: E402
from zoo import seeded_build  # noqa: E402

T = transformers
VOCAB = 100
FAMILIES = {"llama": (T.LlamaForCausalLM, T.LlamaConfig), "mistral": (T.MistralForCausalLM, T.MistralConfig),
            "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config), "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config),
            "gemma": (T.GemmaForCausalLM, T.GemmaConfig)}
RATIOS = [(8, 2), (4, 2), (6, 3), (4, 1)]  # query heads / key-value heads
CASES = [pytest.param(family, heads, kv, id=f"{family}-{heads}q{kv}kv")
         for family in FAMILIES for heads, kv in RATIOS]


def _build(family: str, heads: int, kv: int, implementation: str = "sdpa", hidden: int = 48) -> nn.Module:
    model_class, config_class = FAMILIES[family]
    config = config_class(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, max_position_embeddings=64,
                          attn_implementation=implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seeded_build(lambda: model_class(config))()


def _inputs() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(inputs, **kwargs).logits


def _generate(model: nn.Module, inputs: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)


def _attention_groups(ir: PruningIR) -> list:
    """The prunable groups that hold query-projection rows, one per layer."""
    return [group for group in ir.groups
            if group.prunable and any(name.endswith("q_proj.weight[0]") for name in group.parameters)]


def _uniform(ir: PruningIR, share: float) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unscored: labels leave in channel order
        return UniformLabelSelector(share).select(ir)


def _infer(model: nn.Module, unit: str, **kwargs) -> PruningIR:
    return PruningIR(model, gqa_unit=unit).infer_labels(_inputs(), **kwargs)


def _check_exact_and_reloadable(model: nn.Module, ir: PruningIR, labels: list, tmp_path, heads: int, kv: int,
                                **kwargs) -> nn.Module:
    """Prune ``labels`` (verify=False: the raw rules), then compare with the zeroed original, generate with
    and without the cache, and round-trip through save_pretrained / from_pretrained."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the pruned .* config cannot describe it")  # the config must describe it
        pruned = ir.prune(labels=labels, verify=False).model.eval()
    ir.zero_labels(labels)
    inputs = _inputs()
    torch.testing.assert_close(_logits(pruned, inputs, **kwargs), _logits(model, inputs, **kwargs),
                               atol=1e-5, rtol=0)
    attention = pruned.model.layers[0].self_attn
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (heads, kv)
    assert attention.q_proj.out_features == heads * 8 and attention.k_proj.out_features == kv * 8
    assert attention.num_key_value_groups == heads // kv
    with_cache = _generate(pruned, inputs, use_cache=True)
    assert torch.equal(with_cache, _generate(pruned, inputs, use_cache=False))
    pruned.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = type(pruned).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pruned, inputs), atol=1e-6, rtol=0)
    assert torch.equal(_generate(loaded, inputs, use_cache=True), with_cache)
    return pruned


@pytest.mark.parametrize("family, heads, kv", CASES)
def test_query_heads_within_groups_prune_exactly_and_reload(family, heads, kv, tmp_path):
    model = _build(family, heads, kv)
    ir = _infer(model, "query_heads")
    groups = _attention_groups(ir)
    per_group = heads // kv
    assert len(groups) == 2 and all(len(group.classes) == per_group and group.exact for group in groups)
    assert not any(name.endswith("k_proj.weight[0]") for group in ir.groups if group.prunable
                   for name in group.parameters)  # key/value heads are kept
    labels = [group.labels[1] for group in groups]  # query head 1 of every key/value group
    _check_exact_and_reloadable(model, ir, labels, tmp_path, heads - kv, kv)


@pytest.mark.parametrize("family, heads, kv", [case for case in CASES if case.values[2] > 1])
def test_whole_key_value_groups_prune_exactly_and_reload(family, heads, kv, tmp_path):
    model = _build(family, heads, kv)
    ir = _infer(model, "kv_groups")
    groups = _attention_groups(ir)
    assert len(groups) == 2 and all(len(group.classes) == kv and group.exact for group in groups)
    labels = [group.labels[0] for group in groups]  # key/value head 0 with its query heads
    _check_exact_and_reloadable(model, ir, labels, tmp_path, heads - heads // kv, kv - 1)


@pytest.mark.parametrize("implementation, masked", [("sdpa", True), ("eager", False), ("eager", True)])
def test_every_attention_path_gives_the_same_units(implementation, masked, tmp_path):
    """SDPA with enable_gqa (no mask), and repeat_kv (expand + reshape) with a mask or in eager attention."""
    model = _build("llama", 8, 2, implementation)
    kwargs = {"attention_mask": torch.ones(2, 8, dtype=torch.long)} if masked else {}
    ir = _infer(model, "query_heads", **kwargs)
    groups = _attention_groups(ir)
    assert [len(group.classes) for group in groups] == [4, 4]
    labels = [label for group in groups for label in group.labels[:2]]
    _check_exact_and_reloadable(model, ir, labels, tmp_path, 4, 2, **kwargs)


def test_the_rules_keep_the_group_size_in_step_without_the_config_sync():
    model = _build("llama", 8, 2)
    ir = _infer(model, "query_heads")
    labels = [group.labels[0] for group in _attention_groups(ir)]
    pruned = ir.prune(labels=labels, sync_config=False).model.eval()
    assert pruned.config.num_attention_heads == 8  # not synced
    assert [layer.self_attn.num_key_value_groups for layer in pruned.model.layers] == [3, 3]
    inputs = _inputs()
    assert torch.equal(_generate(pruned, inputs, use_cache=True), _generate(pruned, inputs, use_cache=False))


def test_a_uniform_share_maps_to_query_heads_per_group_or_to_whole_groups():
    """0.35 of 4 query heads per group rounds to 1 (8/2 -> 6/2); 0.35 of 2 key/value groups rounds to 1."""
    model = _build("llama", 8, 2)
    for unit, expected in (("query_heads", (6, 2)), ("kv_groups", (4, 1))):
        ir = _infer(model, unit)
        attention = {group.id for group in _attention_groups(ir)}
        labels = [label for label in _uniform(ir, 0.35) if label.group.id in attention]
        assert len(labels) == 2  # one label per layer
        pruned = ir.prune(labels=labels).model
        assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == expected


def test_by_default_a_uniform_share_never_takes_half_of_a_layers_attention():
    """The default unit is the query head within its group: 0.35 removes 1 of 4 query heads per group."""
    model = _build("llama", 8, 2)
    ir = PruningIR(model).infer_labels(_inputs())
    groups = _attention_groups(ir)
    assert [len(group.classes) for group in groups] == [4, 4]
    pruned = ir.prune(labels=_uniform(ir, 0.35)).model
    assert [(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features)
            for layer in pruned.model.layers] == [(48, 16), (48, 16)]  # 6 query heads, 2 key/value heads of 8


def test_uniform_pruning_of_everything_with_query_heads_stays_expressible(tmp_path):
    model = _build("llama", 8, 2)
    ir = _infer(model, "query_heads")
    labels = _uniform(ir, 0.25)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the pruned .* config cannot describe it")
        pruned = ir.prune(labels=labels).model.eval()
    config = pruned.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads) == (36, 48, 6, 2)
    pruned.save_pretrained(tmp_path)
    loaded = type(pruned).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, _inputs()), _logits(pruned, _inputs()), atol=1e-6, rtol=0)


def test_llama_refuses_a_head_count_that_does_not_divide_the_hidden_size(tmp_path):
    """LlamaConfig asks for hidden_size % num_attention_heads == 0 even with head_dim set: 64 / 6 heads is
    refused by save_pretrained, so prune() keeps the config and warns; the pruned pair still round-trips.
    Mistral has no such check."""
    for family, expressible_ in (("llama", False), ("mistral", True)):
        model = _build(family, 8, 2, hidden=64)
        ir = _infer(model, "query_heads")
        labels = [group.labels[0] for group in _attention_groups(ir)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned = ir.prune(labels=labels).model.eval()
        warned = [str(w.message) for w in caught if "config cannot describe" in str(w.message)]
        ok, why = expressible(pruned)
        assert ok == expressible_ and bool(warned) != expressible_, why
        if not ok:
            assert "LlamaConfig refuses it" in why and "not a multiple of the number of attention heads" in why
            assert pruned.config.num_attention_heads == 8  # left as it was
        save_pretrained_pruned(pruned, tmp_path / family)
        loaded = load_pretrained_pruned(T.AutoModelForCausalLM, tmp_path / family)
        assert loaded.model.layers[0].self_attn.q_proj.out_features == 48
        torch.testing.assert_close(_logits(loaded, _inputs()), _logits(pruned, _inputs()), atol=1e-6, rtol=0)


def test_both_units_compose_in_two_steps(tmp_path):
    """One channel position belongs to one label: query heads first, then whole groups on a new trace."""
    model = _build("llama", 8, 2)
    first = _infer(model, "query_heads")
    pruned = first.prune(labels=[group.labels[0] for group in _attention_groups(first)]).model.eval()
    reference = copy.deepcopy(pruned)
    second = _infer(pruned, "kv_groups")
    groups = _attention_groups(second)
    assert [len(group.classes) for group in groups] == [2, 2]
    _check_exact_and_reloadable(pruned, second, [group.labels[1] for group in groups], tmp_path, 3, 1)
    assert not torch.equal(_logits(pruned, _inputs()), _logits(reference, _inputs()))  # zeroed in place


def test_the_unit_is_an_option_of_the_ir():
    assert PruningIR(nn.Linear(2, 2)).gqa_unit == "query_heads"
    assert PruningIR(nn.Linear(2, 2), gqa_unit="kv_groups").gqa_unit == "kv_groups"
    assert PruningIR(nn.Linear(2, 2), gqa_unit="query_heads").gqa_unit == "query_heads"
    with pytest.raises(ValueError, match="query_heads"):
        PruningIR(nn.Linear(2, 2), gqa_unit="heads")


class HandWrittenGQA(nn.Module):
    """Grouped-query attention written by hand: key/value heads repeated with repeat_interleave(self.n_rep)."""

    def __init__(self, width: int = 32, heads: int = 6, kv_heads: int = 2, head_dim: int = 4):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.n_rep = heads, kv_heads, head_dim, heads // kv_heads
        self.q = nn.Linear(width, heads * head_dim)
        self.kv = nn.Linear(width, 2 * kv_heads * head_dim)
        self.out = nn.Linear(heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in self.kv(x).chunk(2, dim=-1))
        k, v = (y.repeat_interleave(self.n_rep, dim=1) for y in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, -1)) + x


@pytest.mark.parametrize("unit, labels_per_layer, kept", [("query_heads", 3, (4, 2, 2)), ("kv_groups", 2, (3, 1, 3))])
def test_hand_written_repeat_interleave(unit, labels_per_layer, kept):
    torch.manual_seed(0)
    model = nn.Sequential(HandWrittenGQA(), HandWrittenGQA()).eval()
    x = torch.randn(2, 5, 32)
    ir = PruningIR(model, gqa_unit=unit).infer_labels(x)
    groups = [g for g in ir.groups if g.prunable and any(".q.weight[0]" in name for name in g.parameters)]
    assert [len(g.classes) for g in groups] == [labels_per_layer] * 2 and all(g.exact for g in groups)
    labels = [group.labels[0] for group in groups]
    pruned = ir.prune(labels=labels, verify=False).model
    ir.zero_labels(labels)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    for layer in pruned:
        assert (layer.q.out_features // 4, layer.kv.out_features // 8, layer.n_rep) == kept
