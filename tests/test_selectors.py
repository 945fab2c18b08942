"""Label selectors: what each one selects, constraints, knapsack accuracy on MACs, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tensors
from pruning_ir import PruningIR
from pruning_ir.latency import LatencyMeasurementError, bind, macs, parameter_count
from pruning_ir.selectors import (BinarySearchLatencyLabelSelector, ChannelConstraint, GlobalScoreLabelSelector,
                                  KnapsackLabelSelector, LatencyFunctionError, UniformLabelSelector)
from zoo import ZOO


def scored_ir(name: str, seed: int = 0) -> PruningIR:
    """An IR of a zoo model with distinct pseudo-random scores (deterministic per label)."""
    entry = ZOO[name]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    scores = np.random.default_rng(seed).random(max(label.class_id for label in ir.labels()) + 1)
    ir.set_scores(lambda label: scores[label.class_id])
    return ir


def macs_of(name: str):
    return bind(macs, ZOO[name].example_inputs()[0][:1])


def removed_per_group(labels) -> dict[int, list]:
    groups: dict[int, list] = {}
    for label in labels:
        groups.setdefault(label.group.id, []).append(label)
    return groups


def assert_prefixes(ir: PruningIR, labels) -> None:
    """Within each group, the removed labels are the lowest-scored ones."""
    removed = removed_per_group(labels)
    for group in ir.label_groups():
        count = len(removed.get(group[0].group.id, []))
        assert set(removed.get(group[0].group.id, [])) == set(group[:count])


KNAPSACK_ON_MACS = ("resnet50", "mobilenet_v2")   # their knapsack runs are the MACs tests below


def zoo_selectors(name: str, ir: PruningIR) -> list:
    """Every selector; the latency-aware ones with the parameter count as a cheap latency."""
    cost = parameter_count(ir.model)
    selectors = [UniformLabelSelector(0.5), GlobalScoreLabelSelector(0.4),
                 BinarySearchLatencyLabelSelector(0.6 * cost, parameter_count)]
    if name not in KNAPSACK_ON_MACS:
        selectors.append(KnapsackLabelSelector(0.6 * cost, parameter_count, verbose=False, tolerance=0.05))
    return selectors


# -- every selector on the zoo ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_selector_prunes_every_zoo_model(name):
    entry = ZOO[name]
    ir = scored_ir(name)
    inputs = entry.example_inputs()
    with torch.no_grad():
        shapes = [t.shape for t in tensors(ir.model(*inputs))]
    cost = parameter_count(ir.model)
    for selector in zoo_selectors(name, ir):
        labels = selector.select(ir.snapshot())
        assert labels and len(set(labels)) == len(labels)
        assert_prefixes(ir, labels)
        pruned = ir.prune(labels=labels)
        with torch.no_grad():
            assert [t.shape for t in tensors(pruned.model(*inputs))] == shapes
        if hasattr(selector, "target_latency"):
            assert parameter_count(pruned.model) <= selector.target_latency < cost


# -- uniform and global ----------------------------------------------------------------------------
def test_uniform_removes_the_same_share_of_every_group():
    ir = scored_ir("resnet18")
    removed = removed_per_group(UniformLabelSelector(0.25).select(ir))
    for group in ir.label_groups():
        assert len(removed[group[0].group.id]) == int(np.floor(0.25 * len(group) + 0.5))
    assert UniformLabelSelector(0.0).select(ir) == []


def test_global_removes_the_networkwide_lowest_scores():
    ir = scored_ir("resnet18")
    labels = GlobalScoreLabelSelector(100).select(ir)
    assert len(labels) == 100
    threshold = max(label.score for label in labels)
    assert sum(label.score <= threshold for label in ir.labels()) == 100
    assert len(GlobalScoreLabelSelector(0.3).select(ir)) == round(0.3 * len(ir.labels()))


def group_means_scaled(ir: PruningIR, factor: float) -> PruningIR:
    """``ir`` with the first group's scores multiplied by ``factor`` (a layer whose scores are all small)."""
    first = set(ir.label_groups()[0])
    scores = {label: label.score * (factor if label in first else 1.0) for label in ir.labels()}
    ir.set_scores(scores)
    return ir


def normalized_by_mean(ir: PruningIR) -> PruningIR:
    """A copy of ``ir`` whose scores are divided by their group's mean, by hand."""
    import copy
    other = copy.deepcopy(ir)
    means = {id(label.group): np.mean([m.score for m in group]) for group in other.label_groups() for label in group}
    other.set_scores({label: label.score / means[id(label.group)] for label in other.labels()})
    return other


def test_normalize_mean_makes_every_group_mean_one_and_leaves_the_ir_alone():
    from pruning_ir.selectors.plan import SelectionPlan
    ir = group_means_scaled(scored_ir("resnet18"), 1e-3)
    before = [label.score for label in ir.labels()]
    selector = GlobalScoreLabelSelector(0.3, normalize="mean")
    plan = SelectionPlan(ir, selector.constraint)
    selector._normalize(plan)
    np.testing.assert_allclose([g.scores.mean() for g in plan.groups], 1.0)
    for g in plan.groups:   # the order inside a group is the criterion's
        assert (np.diff(g.scores) >= 0).all()
    selector.select(ir)
    assert [label.score for label in ir.labels()] == before
    with pytest.raises(ValueError, match="normalize"):
        GlobalScoreLabelSelector(0.3, normalize="median")


def test_normalized_global_selection_does_not_empty_the_layer_with_small_scores():
    """Raw: a group whose scores are all 1000x smaller loses every label it can before any other
    group loses one. normalize="mean": the selection made on scores divided by each group's mean."""
    ir = group_means_scaled(scored_ir("resnet18"), 1e-3)
    small = ir.label_groups()[0]
    count = len(small) + 10
    raw = removed_per_group(GlobalScoreLabelSelector(count).select(ir))
    assert len(raw[small[0].group.id]) == len(small) - 1     # all but the one the constraint keeps
    normalized = GlobalScoreLabelSelector(count, normalize="mean").select(ir)
    assert len(normalized) == count
    assert len(removed_per_group(normalized).get(small[0].group.id, [])) < len(small) // 2
    by_hand = GlobalScoreLabelSelector(count).select(normalized_by_mean(ir))
    assert [(label.group.id, label.channel) for label in normalized] == \
        [(label.group.id, label.channel) for label in by_hand]
    assert_prefixes(ir, normalized)


def test_normalized_knapsack_keeps_the_most_normalized_score():
    ir = group_means_scaled(scored_ir("resnet18"), 1e-3)
    budget = 0.6 * parameter_count(ir.model)
    channels = []
    for scored, normalize in ((ir, "mean"), (normalized_by_mean(ir), None)):
        selector = KnapsackLabelSelector(budget, parameter_count, verbose=False, normalize=normalize)
        channels.append([(label.group.id, label.channel) for label in selector.select(scored)])
        assert selector.latency <= budget
    assert channels[0] == channels[1]


def test_unscored_selection_is_deterministic_by_group_then_channel():
    entry = ZOO["resnet18"]
    ir = PruningIR(entry.build()).infer_labels(*entry.example_inputs())
    labels = GlobalScoreLabelSelector(20).select(ir)
    first = ir.label_groups()[0]
    assert labels == first[:15] + ir.label_groups()[1][:5]   # 16 channels: one always stays
    assert [label.channel for label in first] == list(range(len(first)))
    assert UniformLabelSelector(0.5).select(ir) == UniformLabelSelector(0.5).select(ir)


def test_default_constraint_keeps_a_channel_in_every_group():
    ir = scored_ir("mobilenet_v2")
    removed = removed_per_group(UniformLabelSelector(0.99).select(ir))
    for group in ir.label_groups():
        assert len(removed.get(group[0].group.id, [])) < group[0].group.channel_count
    most = sum(len(g) - 1 for g in ir.label_groups())
    assert len(GlobalScoreLabelSelector(most).select(ir)) == most
    with pytest.raises(ValueError, match=f"at most {most}"):
        GlobalScoreLabelSelector(most + 1).select(ir)


# -- constraints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "global", "binary", "knapsack"])
def test_channel_constraint_is_respected_by_every_selector(kind):
    ir = scored_ir("resnet18")
    constraint = ChannelConstraint(low=8, high=0.9, step=8)
    cost = parameter_count(ir.model)
    selector = {
        "uniform": lambda: UniformLabelSelector(0.6, constraint),
        "global": lambda: GlobalScoreLabelSelector(0.5, constraint=constraint),
        "binary": lambda: BinarySearchLatencyLabelSelector(0.5 * cost, parameter_count, constraint),
        "knapsack": lambda: KnapsackLabelSelector(0.5 * cost, parameter_count, constraint=constraint,
                                                  verbose=False),
    }[kind]()
    removed = removed_per_group(selector.select(ir))
    for group in (g for g in ir.groups if g.prunable):
        kept = group.channel_count - len(removed.get(group.id, []))
        assert 8 <= kept <= int(0.9 * group.channel_count) and kept % 8 == 0, (group, kept)


def test_constraint_arguments_are_checked():
    with pytest.raises(ValueError, match="at least 1 channel"):
        ChannelConstraint(low=0)
    with pytest.raises(ValueError, match="step"):
        ChannelConstraint(step=0)
    ir = scored_ir("lenet")
    with pytest.raises(ValueError, match="allows no width for group"):
        UniformLabelSelector(0.5, ChannelConstraint(low=500)).select(ir)
    with pytest.raises(ValueError, match="once"):
        KnapsackLabelSelector(1.0, parameter_count, channels_constraint=ChannelConstraint(step=2),
                              constraint=ChannelConstraint(step=4))
    selector = KnapsackLabelSelector(1.0, parameter_count, constraint=ChannelConstraint(step=4))
    assert selector.channels_constraint.step == 4


# -- knapsack with MACs ----------------------------------------------------------------------------
TARGETS = (0.7, 0.5, 0.3)


@pytest.fixture(scope="module", params=["resnet50", "mobilenet_v2"])
def knapsack_runs(request):
    """Per target share: (labels, MACs of the pruned model, selector), on one IR."""
    name = request.param
    ir, latency = scored_ir(name), macs_of(name)
    original = latency(ir.model)
    runs = {}
    for share in TARGETS:
        selector = KnapsackLabelSelector(share * original, latency, verbose=False)
        labels = selector.select(ir)
        runs[share] = (labels, latency(ir.prune(labels=labels).model), selector)
    return name, ir, original, latency, runs


def test_knapsack_lands_within_3_percent_below_the_macs_target(knapsack_runs):
    name, ir, original, _, runs = knapsack_runs
    for share, (labels, achieved, selector) in runs.items():
        assert 0.97 <= achieved / (share * original) <= 1.0, (name, share, selector.history)
        assert selector.latency == achieved
        assert_prefixes(ir, labels)


def test_knapsack_keeps_at_least_the_score_of_lowest_scores_first(knapsack_runs):
    _, ir, original, latency, runs = knapsack_runs
    labels = runs[0.3][0]
    baseline = BinarySearchLatencyLabelSelector(0.3 * original, latency).select(ir)
    assert sum(label.score for label in labels) < sum(label.score for label in baseline)   # removes less


def test_lower_target_never_keeps_more_macs(knapsack_runs):
    _, _, _, _, runs = knapsack_runs
    achieved = [runs[share][1] for share in TARGETS]
    assert achieved == sorted(achieved, reverse=True)


def test_knapsack_same_inputs_give_the_same_labels(knapsack_runs):
    name, ir, original, latency, runs = knapsack_runs
    again = KnapsackLabelSelector(0.5 * original, latency, verbose=False).select(ir)
    assert again == runs[0.5][0]


def test_knapsack_on_a_fresh_ir_gives_the_same_channels():
    def channels(name):
        ir, latency = scored_ir(name), macs_of(name)   # a new IR: nothing cached, measured anew
        labels = KnapsackLabelSelector(0.4 * latency(ir.model), latency, verbose=False).select(ir)
        return [(label.group.id, label.channel) for label in labels]

    assert channels("resnet18") == channels("resnet18")


def test_knapsack_keeps_more_score_than_uniform_at_equal_macs():
    ir, latency = scored_ir("resnet18"), macs_of("resnet18")
    uniform = UniformLabelSelector(0.4).select(ir)
    budget = latency(ir.prune(labels=uniform).model)
    selector = KnapsackLabelSelector(budget, latency, verbose=False)
    knapsack = selector.select(ir)
    assert selector.latency <= budget
    total = lambda labels: sum(label.score for label in labels)  # noqa: E731
    assert total(knapsack) < total(uniform)   # removes less score, keeps more


def test_knapsack_steps_towards_large_speedups():
    ir, latency = scored_ir("resnet18"), macs_of("resnet18")
    original = latency(ir.model)
    selector = KnapsackLabelSelector(0.2 * original, latency, verbose=False, max_relative_latency_step=0.4)
    selector.select(ir)
    assert selector.history[0].aim == pytest.approx(0.6 * original)
    assert selector.history[-1].aim <= 0.2 * original
    assert selector.latency <= 0.2 * original
    assert selector.latency_calls > 0


def test_knapsack_without_strict_order_is_valid_and_close():
    ir, latency = scored_ir("resnet18"), macs_of("resnet18")
    target = 0.5 * latency(ir.model)
    selector = KnapsackLabelSelector(target, latency, strict_label_order=False, verbose=False)
    labels = selector.select(ir)
    ir.check_labels(labels)
    assert 0.97 * target <= latency(ir.prune(labels=labels).model) <= target


def test_knapsack_target_bounds():
    ir, latency = scored_ir("resnet18"), macs_of("resnet18")
    original = latency(ir.model)
    assert KnapsackLabelSelector(original, latency, verbose=False).select(ir) == []
    assert BinarySearchLatencyLabelSelector(2 * original, latency).select(ir) == []
    minimum = latency(ir.prune(labels=[l for g in ir.label_groups() for l in g[:-1]]).model)
    with pytest.raises(ValueError, match=f"smallest reachable latency {minimum:.6g}"):
        KnapsackLabelSelector(0.5 * minimum, latency, verbose=False).select(ir)
    with pytest.raises(ValueError, match="smallest reachable"):
        BinarySearchLatencyLabelSelector(0.5 * minimum, latency).select(ir)


def test_knapsack_verbose_prints_each_iteration_and_quiet_prints_nothing(capsys):
    ir, latency = scored_ir("lenet"), macs_of("lenet")
    target = 0.6 * latency(ir.model)
    KnapsackLabelSelector(target, latency, verbose=False).select(ir)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    ir = scored_ir("lenet")
    selector = KnapsackLabelSelector(target, latency, verbose=True)
    selector.select(ir)
    out = capsys.readouterr().out
    loop = [record for record in selector.history if not record.checked]   # the band's checks print their own line
    assert out.count("estimated") == len(loop) >= 1 and "measured" in out and "kept score" in out


def test_binary_search_takes_the_fewest_lowest_scores_that_meet_the_target():
    ir, latency = scored_ir("resnet18"), macs_of("resnet18")
    target = 0.5 * latency(ir.model)
    selector = BinarySearchLatencyLabelSelector(target, latency)
    labels = selector.select(ir)
    assert selector.latency == latency(ir.prune(labels=labels).model) <= target
    fewer = GlobalScoreLabelSelector(len(labels) - 1).select(ir)
    assert latency(ir.prune(labels=fewer).model) > target
    assert selector.latency_calls <= 2 + int(np.ceil(np.log2(len(ir.labels()))))


# -- errors ------------------------------------------------------------------------------------------
def test_bad_arguments_give_clear_errors():
    ir = scored_ir("lenet")
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"pruning_ratio must lie in \[0, 1\)"):
            UniformLabelSelector(ratio)
    with pytest.raises(ValueError, match="only 210 prunable labels"):
        GlobalScoreLabelSelector(1000).select(ir)
    with pytest.raises(ValueError, match="whole number"):
        GlobalScoreLabelSelector(2.5)
    with pytest.raises(ValueError, match="1.0 is ambiguous"):
        GlobalScoreLabelSelector(1.0)
    assert len(GlobalScoreLabelSelector(1).select(ir)) == 1
    for target in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="target_latency must be a positive"):
            KnapsackLabelSelector(target, parameter_count)
        with pytest.raises(ValueError, match="target_latency must be a positive"):
            BinarySearchLatencyLabelSelector(target, parameter_count)
    with pytest.raises(TypeError, match="callable"):
        KnapsackLabelSelector(1.0, 3.0)
    with pytest.raises(TypeError, match="PruningIR"):
        UniformLabelSelector(0.5).select(ir.model)


def test_latency_functions_that_fail_give_clear_errors():
    ir = scored_ir("lenet")
    with pytest.raises(LatencyFunctionError, match="must return a number, got str"):
        KnapsackLabelSelector(1.0, lambda model: "fast", verbose=False).select(ir)
    with pytest.raises(LatencyFunctionError, match=r"use \.item\(\)"):
        BinarySearchLatencyLabelSelector(1.0, lambda model: torch.tensor(2.0)).select(ir)

    def broken(model):
        raise KeyError("no such device")

    with pytest.raises(LatencyFunctionError, match="raised KeyError on the unpruned model"):
        KnapsackLabelSelector(1.0, broken, verbose=False).select(ir)


def test_configurations_the_function_cannot_measure_are_avoided():
    ir = scored_ir("resnet18")
    full = parameter_count(ir.model)
    stem = ir.label_groups()[0][0].group

    def picky(model):   # refuses any model whose stem lost more than 4 channels
        if model.conv1.out_channels < stem.channel_count - 4:
            raise LatencyMeasurementError("stem too thin for this device")
        return parameter_count(model)

    labels = KnapsackLabelSelector(0.5 * full, picky, verbose=False).select(ir)
    assert sum(label.group is stem for label in labels) <= 4
    assert parameter_count(ir.prune(labels=labels).model) <= 0.5 * full


def test_the_knapsack_warns_only_when_it_ran_out_of_iterations():
    """Below the tolerance band after every iteration: the warning says so and names the limit; a run
    that reaches the band (or keeps more score below it) says nothing."""
    import warnings
    ir = scored_ir("lenet")
    example = ZOO["lenet"].example_inputs()
    latency = bind(macs, *example)
    original = latency(ir.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KnapsackLabelSelector(0.5 * original, latency, verbose=False).select(ir)
    assert not [w for w in caught if "KnapsackLabelSelector" in str(w.message)]
    selector = KnapsackLabelSelector(0.5 * original, latency, max_iterations=1, tolerance=0.0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selector.select(ir)
    messages = [str(w.message) for w in caught if "KnapsackLabelSelector" in str(w.message)]
    assert selector.latency < 0.5 * original   # tolerance 0: one iteration does not hit the target exactly
    assert messages and "used all 1 iterations" in messages[0] and f"{selector.latency:.6g}" in messages[0]
