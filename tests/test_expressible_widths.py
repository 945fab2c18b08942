"""``ChannelConstraint(same_across_layers=True)``: every layer keeps the same widths, under every selector.

A Hugging Face config holds one MLP width and one head count for all layers. With the constraint,
global and knapsack selection (parameter, MAC and latency-table budgets) leave a tiny LLaMA (grouped-query
attention) and a tiny Qwen2 with equal widths in every layer, which a config describes
(``expressible``), so ``save_pretrained`` + ``from_pretrained`` give the same outputs; without it the
same selections differ across layers. Non-Hugging-Face repeated blocks are tied too; the tied knapsacks
are checked against brute force on small random instances.
"""

from __future__ import annotations

import functools
import itertools
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pruning_ir import PruningIR, prune  # noqa: E402
from pruning_ir.criteria import MagnitudeCriterion  # noqa: E402
from pruning_ir.huggingface import expressible  # noqa: E402
from pruning_ir.latency import bind, macs, parameter_count  # noqa: E402
from pruning_ir.selectors import (BinarySearchLatencyLabelSelector, ChannelConstraint,  # noqa: E402
                                  GlobalScoreLabelSelector, KnapsackLabelSelector, UniformLabelSelector)
from pruning_ir.selectors.multiple_choice import solve_multiple_choice  # noqa: E402
from pruning_ir.selectors.plan import SelectionPlan  # noqa: E402
from pruning_ir.selectors.solver import Linearization, solve_knapsack  # noqa: E402
from pruning_ir.selectors.ties import layer_pattern  # noqa: E402
from test_latency_table import MacsTable  # noqa: E402
from zoo import ZOO, seeded_build  # noqa: E402

VOCAB = 100
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", use_cache=False)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
}
# LLaMA's config refuses hidden_size % num_attention_heads != 0: its hidden size is kept (keep=)
TIED = {"llama": ChannelConstraint(same_across_layers=True, keep="model.embed_tokens"),
        "qwen2": ChannelConstraint(same_across_layers=True)}
UNTIED = {"llama": ChannelConstraint(keep="model.embed_tokens"), "qwen2": ChannelConstraint()}


def _inputs() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _build(family: str) -> nn.Module:
    model_class, config_class = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seeded_build(lambda: model_class(config_class(**TINY)))()


@functools.lru_cache(maxsize=None)
def _scored(family: str) -> tuple[nn.Module, PruningIR]:
    """(the model, its IR with magnitude scores); shared by the tests, which never prune in place."""
    model = _build(family)
    ir = PruningIR(model).infer_labels(_inputs())
    MagnitudeCriterion(ir).apply()
    return model, ir


def _widths(model: nn.Module) -> list[tuple[int, int]]:
    """(query rows, MLP channels) of every layer."""
    return [(layer.self_attn.q_proj.out_features, layer.mlp.up_proj.out_features) for layer in model.model.layers]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_inputs()).logits


def _selector(kind: str, model: nn.Module, constraint: ChannelConstraint):
    if kind == "global":
        return GlobalScoreLabelSelector(0.4, constraint, normalize="mean")
    if kind == "params":
        return KnapsackLabelSelector(0.6 * parameter_count(model), parameter_count, constraint=constraint,
                                     verbose=False, normalize="mean")
    cost = bind(macs, _inputs())
    table = MacsTable(_inputs(), threads=1) if kind == "macs_table" else None
    return KnapsackLabelSelector(0.6 * cost(model), cost, constraint=constraint, verbose=False, normalize="mean",
                                 latency_table=table)


def _pruned(family: str, kind: str, constraint: ChannelConstraint) -> tuple[nn.Module, object]:
    model, ir = _scored(family)
    selector = _selector(kind, model, constraint)
    labels = selector.select(ir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # an inexpressible model warns (the untied selections)
        return ir.prune(labels=labels).model.eval(), selector


# -- which groups are tied -------------------------------------------------------------------------
def test_layer_indices_are_blotted_out_but_digits_inside_names_stay():
    assert layer_pattern("model.layers.11.mlp.up_proj.weight[0]") == "model.layers.#.mlp.up_proj.weight[0]"
    assert layer_pattern("0.conv.weight[1]") == "#.conv.weight[1]"
    assert layer_pattern("layer1.0.conv1.weight[0]") == "layer1.#.conv1.weight[0]"
    assert layer_pattern("blocks.3[0]") == "blocks.#[0]"


def test_the_mlp_and_head_groups_of_every_layer_are_tied_and_the_hidden_size_is_not():
    _, ir = _scored("llama")
    tied = ChannelConstraint(same_across_layers=True).tied_groups(ir.groups)
    described = sorted(sorted(layer_pattern(group.parameters[0]) for group in members) for members in tied)
    assert described == [["model.layers.#.mlp.gate_proj.weight[0]"] * 2,
                         ["model.layers.#.self_attn.q_proj.weight[0]"] * 2]
    assert all(group.prunable for members in tied for group in members)
    assert ChannelConstraint().tied_groups(ir.groups) == []
    hidden = next(g for g in ir.groups if "model.embed_tokens" in g.modules)
    kept = ChannelConstraint(same_across_layers=True, keep="model.embed_tokens")
    assert kept.removal_counts(hidden).tolist() == [0]
    assert kept.tied_groups(ir.groups) == tied


# -- Hugging Face: expressible widths, under every selector -------------------------------------------
@pytest.mark.parametrize("kind", ["global", "params", "macs_table"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tied_selection_is_expressible_and_round_trips_through_from_pretrained(family, kind, tmp_path):
    model, _ = _scored(family)
    pruned, selector = _pruned(family, kind, TIED[family])
    widths = _widths(pruned)
    assert len(set(widths)) == 1, widths
    assert widths[0] != _widths(model)[0] or pruned.model.embed_tokens.embedding_dim < 32   # something went
    assert expressible(pruned) == (True, "")
    if kind == "params":
        assert parameter_count(pruned) <= 0.6 * parameter_count(model)
    if kind == "macs_table":
        assert macs(pruned, _inputs()) <= 0.6 * macs(model, _inputs())
        assert selector.latency_table.measurements > 0
    pruned.save_pretrained(tmp_path)
    reloaded = FAMILIES[family][0].from_pretrained(tmp_path)
    assert _widths(reloaded) == widths
    torch.testing.assert_close(_logits(reloaded), _logits(pruned), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["global", "params"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_without_the_constraint_the_same_selection_differs_across_layers(family, kind):
    pruned, _ = _pruned(family, kind, UNTIED[family])
    assert len(set(_widths(pruned))) > 1
    ok, reason = expressible(pruned)
    assert not ok and "differ across layers" in reason


@pytest.mark.parametrize("kind", ["binary_search", "knapsack_any_order"])
def test_the_other_latency_selectors_keep_equal_widths_too(kind):
    model, ir = _scored("qwen2")
    budget = 0.6 * parameter_count(model)
    selector = BinarySearchLatencyLabelSelector(budget, parameter_count, TIED["qwen2"], normalize="mean") \
        if kind == "binary_search" else \
        KnapsackLabelSelector(budget, parameter_count, strict_label_order=False, constraint=TIED["qwen2"],
                              verbose=False, normalize="mean")
    pruned = ir.prune(labels=selector.select(ir)).model
    assert len(set(_widths(pruned))) == 1 and _widths(pruned) != _widths(model)
    assert parameter_count(pruned) <= budget
    assert expressible(pruned) == (True, "")


def test_the_one_call_api_passes_the_constraint_through():
    model = _build("llama")
    constraint = ChannelConstraint(same_across_layers=True, keep="model.embed_tokens")
    pruned = prune(model, _inputs(), params=0.7, constraint=constraint, verbose=False)
    assert len(set(_widths(pruned))) == 1 and _widths(pruned) != _widths(model)
    assert expressible(pruned) == (True, "")
    assert parameter_count(pruned) <= 0.7 * parameter_count(model)


# -- head counts the config accepts ----------------------------------------------------------------
GQA_8_2 = dict(TINY, num_attention_heads=8, head_dim=4)   # 4 query heads per key/value head: 4 labels a layer


def _accepted_by_llama(group, kept: int) -> bool:
    """LLaMA's config asks for hidden_size % num_attention_heads == 0; a label is one query head per
    key/value head (gqa_unit="query_heads"), so ``kept`` labels are 2 * kept heads."""
    if any(name.endswith("self_attn.q_proj.weight[0]") for name in group.parameters):
        return GQA_8_2["hidden_size"] % (kept * GQA_8_2["num_key_value_heads"]) == 0
    return True


@pytest.mark.parametrize("kind", ["uniform", "global"])
def test_allow_limits_head_counts_to_those_the_config_accepts(kind, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = seeded_build(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**GQA_8_2)))()
    ir = PruningIR(model).infer_labels(_inputs())
    MagnitudeCriterion(ir).apply()
    tied = dict(same_across_layers=True, keep="model.embed_tokens")
    plain, allowed = ChannelConstraint(**tied), ChannelConstraint(**tied, allow=_accepted_by_llama)

    def pruned(constraint: ChannelConstraint) -> nn.Module:
        selector = UniformLabelSelector(0.25, constraint) if kind == "uniform" else \
            GlobalScoreLabelSelector(0.3, constraint, normalize="mean")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ir.prune(labels=selector.select(ir)).model.eval()

    ok, reason = expressible(pruned(plain))   # one of four query heads per key/value head goes: 6 heads
    assert not ok and "refuses" in reason and "(6)" in reason
    result = pruned(allowed)
    heads = {layer.self_attn.q_proj.out_features // 4 for layer in result.model.layers}
    assert len(heads) == 1 and 32 % min(heads) == 0
    if kind == "uniform":   # removing 1 of 4 labels is refused; 0 and 2 are as near, and the fewer wins
        assert heads == {8}
    else:
        assert max(heads) < 8
    assert expressible(result) == (True, "")
    result.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path)), _logits(result),
                               rtol=0, atol=1e-5)


# -- floors, earlier prunes and uniform selection compose ---------------------------------------------
def _tied_ids(ir: PruningIR) -> list[list[int]]:
    return [[g.id for g in members] for members in ChannelConstraint(same_across_layers=True).tied_groups(ir.groups)]


def _removed(labels) -> dict[int, int]:
    counts: dict[int, int] = {}
    for label in labels:
        counts[label.group.id] = counts.get(label.group.id, 0) + 1
    return counts


def test_a_floor_on_one_layer_raises_the_count_of_every_tied_layer():
    _, ir = _scored("qwen2")
    mlp = next(ids for ids in _tied_ids(ir) if len(ir.index.groups[ids[0]].classes) == 64)
    constraint = ChannelConstraint(same_across_layers=True, step=4)
    removed = _removed(GlobalScoreLabelSelector(1, constraint).select(ir, floors={mlp[0]: 10}))
    assert removed[mlp[0]] == removed[mlp[1]] == 12   # at least 10, in steps of 4: 64 - 12 = 52 kept
    untied = _removed(GlobalScoreLabelSelector(1, ChannelConstraint(step=4)).select(ir, floors={mlp[0]: 10}))
    assert untied.get(mlp[1], 0) != untied[mlp[0]]


def test_uniform_selection_is_equal_even_when_earlier_prunes_differ():
    _, ir = _scored("qwen2")
    mlp = next(ids for ids in _tied_ids(ir) if len(ir.index.groups[ids[0]].classes) == 64)
    for constraint, equal in ((ChannelConstraint(same_across_layers=True), True), (ChannelConstraint(), False)):
        removed = _removed(UniformLabelSelector(0.5, constraint).select(ir, removed_before={mlp[0]: 8}))
        assert (removed[mlp[0]] == removed[mlp[1]]) is equal


# -- repeated blocks outside Hugging Face -----------------------------------------------------------
@pytest.mark.parametrize("name, classes", [("vit", 2), ("resnet18", 4)])
def test_repeated_blocks_of_other_models_keep_equal_widths(name, classes):
    entry = ZOO[name]
    torch.manual_seed(0)
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    MagnitudeCriterion(ir).apply()
    tied = _tied_ids(ir)
    assert len(tied) >= classes
    for constraint, equal in ((ChannelConstraint(same_across_layers=True), True), (ChannelConstraint(), False)):
        removed = _removed(GlobalScoreLabelSelector(0.4, constraint, normalize="mean").select(ir))
        equal_classes = [len({removed.get(g, 0) for g in ids}) == 1 for ids in tied]
        assert all(equal_classes) if equal else not all(equal_classes)
    pruned = ir.prune(labels=GlobalScoreLabelSelector(0.4, ChannelConstraint(same_across_layers=True),
                                                      normalize="mean").select(ir)).model
    with torch.no_grad():
        assert torch.isfinite(pruned.eval()(*entry.example_inputs())).all()


# -- brute force: the tied knapsacks are optimal ------------------------------------------------------
class Blocks(nn.Module):
    """Three residual blocks of the same shape (4 -> 3 -> 4): their inner groups are tied."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


@functools.lru_cache(maxsize=None)
def _blocks_ir() -> PruningIR:
    torch.manual_seed(0)
    return PruningIR(Blocks()).infer_labels(torch.randn(2, 4))


@pytest.mark.parametrize("seed", range(12))
def test_the_tied_linearized_knapsack_is_optimal(seed):
    ir = _blocks_ir()
    rng = np.random.default_rng(seed)
    for group in ir.groups:
        for label in group.labels:
            label.score = float(rng.uniform(0, 1))
    plan = SelectionPlan(ir, ChannelConstraint(same_across_layers=True))
    assert [len(members) for members in plan.ties] == [3]
    reference = 1000.0
    savings = rng.integers(1, 40, len(plan.groups)).astype(float)
    base = plan.base_counts()
    linear = Linearization(base, reference, savings, [g.counts for g in plan.groups])
    budget = reference - float(rng.integers(1, int(savings @ plan.max_counts()))) - 0.5
    best = -np.inf
    for counts in itertools.product(*(g.counts for g in plan.groups)):
        counts = np.array(counts)
        if not np.array_equal(plan.repair(counts), counts) or linear.estimate(counts) > budget:
            continue   # untied, or a tensor emptied, or over the budget
        best = max(best, plan.kept_score(counts))
    solved = solve_knapsack(plan, linear, budget, reference, True, 10.0)
    if best == -np.inf:
        assert solved is None
        return
    assert len({int(solved[gi]) for gi in plan.ties[0]}) == 1
    assert linear.estimate(solved) <= budget
    total = sum(float(np.abs(g.scores).sum()) for g in plan.groups)
    assert plan.kept_score(solved) >= best - 2e-3 * total   # the solver stops within 0.1% of the optimum


@pytest.mark.parametrize("seed", range(20))
def test_the_multiple_choice_knapsack_with_tied_groups_matches_brute_force(seed):
    rng = random.Random(seed)
    values = [[rng.randint(-20, 100) for _ in range(4)] for _ in range(4)]
    weights = [[rng.randint(0, 50) for _ in range(4)] for _ in range(4)]
    capacity = rng.randint(0, 200)
    tied = [[0, 2, 3]]
    best = None
    for choice in itertools.product(range(4), repeat=4):
        if len({choice[g] for g in tied[0]}) > 1 or sum(w[j] for w, j in zip(weights, choice)) > capacity:
            continue
        value = sum(v[j] for v, j in zip(values, choice))
        best = value if best is None else max(best, value)
    chosen = solve_multiple_choice(values, weights, capacity, same_choice=tied)
    if best is None:
        assert chosen is None
        return
    assert len({chosen[g] for g in tied[0]}) == 1
    assert sum(w[j] for w, j in zip(weights, chosen)) <= capacity
    assert sum(v[j] for v, j in zip(values, chosen)) == best


# -- errors ----------------------------------------------------------------------------------------
def test_bad_arguments_give_clear_errors():
    with pytest.raises(TypeError, match="same_across_layers"):
        ChannelConstraint(same_across_layers="yes")
    with pytest.raises(TypeError, match="keep"):
        ChannelConstraint(keep=[3])
    with pytest.raises(TypeError, match="allow must be a function"):
        ChannelConstraint(allow=3)
    _, ir = _scored("qwen2")
    with pytest.raises(ValueError, match="model.embed"):
        GlobalScoreLabelSelector(0.3, ChannelConstraint(keep="model.embed")).select(ir)
    with pytest.raises(ValueError, match="different numbers of choices"):
        solve_multiple_choice([[1, 2], [1, 2, 3]], [[1, 1], [1, 1, 1]], 5, same_choice=[[0, 1]])
    assert ChannelConstraint(keep=["a.b"]) == ChannelConstraint(keep="a.b")   # a list is kept as a tuple
    hash(ChannelConstraint(keep=["a.b"], same_across_layers=True))
