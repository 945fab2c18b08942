"""Criteria: LossAwareCriterion against explicit gates, training left untouched, no leftovers,
memory, autocast / eval / varying batches, accumulation, and the data-free criteria."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import LabelsNotInferredError, PruningIR
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion, RandomCriterion
from pruning_ir.criteria._joint import joint_scores

IMPLEMENTATIONS = ["auto", "activations"]


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# Models with explicit gates: forward(x, gates) multiplies each gate site by a vector z,
# so dL/dz is the reference the criterion must reproduce (gates=None is the plain model).
# --------------------------------------------------------------------------------------


class GatedCNN(nn.Module):
    """Stem, a residual block (the stream is gated at both branches), a concatenation with
    a 1x1 branch, a mixing conv and a linear head. In-place ReLU after the stem's BN."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.branch, self.branch_bn = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.mix, self.mix_bn = nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)
        with torch.no_grad():
            for bn in (self.stem_bn, self.bn1, self.bn2, self.branch_bn, self.mix_bn):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x, gates=None):
        gates = gates or {}

        def gate(name, t):
            return t * gates[name].view(1, -1, 1, 1) if name in gates else t

        s = self.act(gate("stream", self.stem_bn(self.stem(x))))
        h = F.relu(gate("inner", self.bn1(self.conv1(s))))
        s = F.relu(s + gate("stream", self.bn2(self.conv2(h))))
        b = F.relu(gate("branch", self.branch_bn(self.branch(s))))
        y = F.relu(gate("mix", self.mix_bn(self.mix(torch.cat([s, b], 1)))))
        return self.fc(y.mean((2, 3)))


CNN_GATES = {"stream": ("stem_bn.weight", 8), "inner": ("bn1.weight", 6), "branch": ("branch_bn.weight", 4),
             "mix": ("mix_bn.weight", 10)}


class GatedViT(nn.Module):
    """Pre-norm transformer block: the stream is gated at every LayerNorm output, heads at the
    fused qkv output, the MLP hidden channels at fc1's output."""

    def __init__(self, dim=16, heads=4, hidden=24, tokens=5, features=6, classes=3):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, dim))
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2, self.norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.2)

    def forward(self, x, gates=None):
        gates = gates or {}

        def gate(name, t):
            if name not in gates:
                return t
            z = gates[name]
            if name == "heads":
                z = z.repeat_interleave(self.head_dim).repeat(3)
            return t * z

        B, N, _ = x.shape
        s = self.embed(x) + self.pos
        qkv = gate("heads", self.qkv(gate("stream", self.norm1(s))))
        q, k, v = qkv.reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attention = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(dim=-1)
        s = s + self.proj((attention @ v).transpose(1, 2).reshape(B, N, -1))
        s = s + self.fc2(F.gelu(gate("hidden", self.fc1(gate("stream", self.norm2(s))))))
        return self.head(gate("stream", self.norm(s)).mean(1))


VIT_GATES = {"stream": ("norm1.weight", 16), "heads": ("qkv.weight", 4), "hidden": ("fc1.weight", 24)}
VIT_STRIDE = {"heads": 4}  # qkv.weight position of head h is h * head_dim


def cnn_batches(sizes=(4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


def vit_batches(sizes=(4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def build(cls, seed=0):
    torch.manual_seed(seed)
    return cls()


def label_for(ir, parameter, position):
    """The label at ``position`` of dim 0 of ``parameter``."""
    by_class = {label.class_id: label for label in ir.labels()}
    for binding in ir._index.parameter_bindings:
        if binding.target.name == parameter and binding.target.dim == 0:
            return by_class[int(binding.classes[position])]
    raise KeyError(parameter)


def reference_scores(model, batches, gate_spec):
    """mean over batches of (dL/dz)^2 for explicit gates z = 1."""
    model = copy.deepcopy(model)
    totals = {name: torch.zeros(size, dtype=torch.float64) for name, (_, size) in gate_spec.items()}
    for x, y in batches:
        gates = {name: torch.ones(size, requires_grad=True) for name, (_, size) in gate_spec.items()}
        loss = F.cross_entropy(model(x, gates=gates), y)
        grads = torch.autograd.grad(loss, list(gates.values()))
        for name, grad in zip(gates, grads):
            totals[name] += grad.double() ** 2
    return {name: total / len(batches) for name, total in totals.items()}


def collect(ir, model, batches, **options):
    with LossAwareCriterion(ir, **options) as collector:
        for x, y in batches:
            F.cross_entropy(collector(x), y).backward()
    return collector


def collect_again(collector, batches, reset):
    """Open ``collector`` once more (start/stop, as a workflow does) and run ``batches`` through it."""
    collector.start(reset=reset)
    try:
        for x, y in batches:
            F.cross_entropy(collector(x), y).backward()
    finally:
        collector.stop()
    return collector


# --------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cls, gate_spec, batches, train", [
    (GatedCNN, CNN_GATES, cnn_batches, True),
    (GatedCNN, CNN_GATES, cnn_batches, False),
    (GatedViT, VIT_GATES, vit_batches, True),
], ids=["cnn-train", "cnn-eval", "vit"])
def test_scores_equal_explicit_gate_derivatives(cls, gate_spec, batches, train, implementation):
    model = build(cls)
    model.train(train)
    data = batches()
    reference = reference_scores(model, data, gate_spec)
    ir = PruningIR(model)
    collect(ir, model, data, implementation=implementation, joint=False)  # the single-label formula
    assert sum(len(g) for g in ir.label_groups()) == sum(size for _, size in gate_spec.values())
    for name, (parameter, size) in gate_spec.items():
        stride = VIT_STRIDE.get(name, 1) if cls is GatedViT else 1
        ours = torch.tensor([label_for(ir, parameter, i * stride).score for i in range(size)], dtype=torch.float64)
        torch.testing.assert_close(ours, reference[name], rtol=1e-4, atol=1e-7 * float(reference[name].max()))
    scores = np.array([label.score for label in ir.labels()])
    assert np.isfinite(scores).all() and (scores > 0).mean() > (0.9 if train else 0.5)  # eval: some ReLUs are dead


def test_label_groups_sorted_by_scores_and_zero_channels_score_zero():
    model = build(GatedCNN)
    ir = PruningIR(model).infer_labels(cnn_batches()[0][0])
    dead = [group[0] for group in ir.label_groups()] + [ir.label_groups()[0][3]]
    ir.zero_labels(dead)
    model.train()
    for implementation in IMPLEMENTATIONS:
        collect(ir, model, cnn_batches(), implementation=implementation)
        for label in dead:
            assert label.score == 0.0
        for group in ir.label_groups():
            scores = [label.score for label in group]
            assert scores == sorted(scores)
        alive = [label.score for label in ir.labels() if label not in dead]
        assert min(alive) > 0


# --------------------------------------------------------------------------------------
# Training is untouched, nothing is left behind, nothing is kept alive
# --------------------------------------------------------------------------------------


def _step(model, x, y, collector=None):
    output = (collector or model)(x)
    loss = F.cross_entropy(output, y)
    loss.backward()
    return output.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cls, batches", [(GatedCNN, cnn_batches), (GatedViT, vit_batches)], ids=["cnn", "vit"])
def test_training_is_unchanged_and_nothing_remains(cls, batches, implementation):
    plain, observed = build(cls), build(cls)
    plain.train(), observed.train()
    modules_before = [(name, type(m)) for name, m in observed.named_modules()]
    ir = PruningIR(observed)
    with LossAwareCriterion(ir, implementation=implementation) as collector:
        for x, y in batches((4, 3, 5)):
            expected = _step(plain, x, y)
            got = _step(observed, x, y, collector)
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
            for name in expected[2]:
                assert torch.equal(expected[2][name], got[2][name]), name
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name  # batch-norm statistics updated the same way
    assert [(name, type(m)) for name, m in observed.named_modules()] == modules_before
    for module in observed.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    for parameter in observed.parameters():
        assert not parameter._backward_hooks
    assert torch._C._len_torch_function_stack() == 0
    # a forward after exit runs plain and scores nothing more
    scores = ir._index.class_scores.copy()
    x, y = batches((2,))[0]
    F.cross_entropy(observed(x), y).backward()
    assert np.array_equal(scores, ir._index.class_scores)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_activation_outlives_its_backward(implementation):
    model = build(GatedCNN).train()
    ir = PruningIR(model)
    alive: list[weakref.ref] = []
    handles = [m.register_forward_hook(lambda m, i, o: alive.append(weakref.ref(o)))
               for m in model.modules() if not list(m.children())]
    try:
        with LossAwareCriterion(ir, implementation=implementation) as collector:
            for x, y in cnn_batches((4, 4)):
                alive.clear()
                loss = F.cross_entropy(collector(x), y)
                loss.backward()
                del loss
                gc.collect()
                assert len(alive) > 5 and not any(ref() is not None for ref in alive)
            # a forward whose backward never comes is released by the exit
            alive.clear()
            output = collector(cnn_batches((4,))[0][0])
            del output
        gc.collect()
        assert not any(ref() is not None for ref in alive)
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------
# Modes: eval, autocast, varying batches; first call infers labels
# --------------------------------------------------------------------------------------


def test_eval_autocast_and_varying_batch_sizes():
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = build(GatedCNN).eval()
        ir = PruningIR(model)  # labels inferred by the first call
        reference = build(GatedCNN).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with LossAwareCriterion(ir, implementation=implementation) as collector:
                for x, y in cnn_batches((3, 7, 2)):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        output = collector(x)
                        expected = reference(x)
                    assert output.dtype == torch.bfloat16 and torch.equal(output, expected)
                    F.cross_entropy(output.float(), y).backward()
                assert collector.batches == 3
        assert ir.labels_inferred
        results[implementation] = np.array([label.score for label in ir.labels()])
    auto, activations = results["auto"], results["activations"]
    assert np.isfinite(auto).all() and (auto > 0).mean() > 0.5
    # bf16 activations vs fp32 parameter gradients: same ranking up to rounding
    assert np.corrcoef(auto, activations)[0, 1] > 0.99


# --------------------------------------------------------------------------------------
# Accumulation across contexts, saved and pruned IRs
# --------------------------------------------------------------------------------------


def test_reset_and_continue():
    data = cnn_batches((4, 4, 4, 4))
    model = build(GatedCNN).eval()
    whole = PruningIR(copy.deepcopy(model))
    collect(whole, whole.model, data)
    expected = np.array([label.score for label in whole.labels()])

    ir = PruningIR(model)
    collector = collect(ir, model, data[:2])
    collect_again(collector, data[2:], reset=False)   # the same criterion continues its sums
    continued = np.array([label.score for label in ir.labels()])
    np.testing.assert_allclose(continued, expected, rtol=1e-10)
    # a new criterion has nothing to continue: reset=False starts from zero
    collect(ir, model, data[2:], reset=False)
    fresh = np.array([label.score for label in ir.labels()])
    assert not np.allclose(fresh, expected)

    collect_again(collector, data[2:], reset=True)  # only the last two batches
    restarted = np.array([label.score for label in ir.labels()])
    only_last = PruningIR(copy.deepcopy(model))
    collect(only_last, only_last.model, data[2:])
    np.testing.assert_allclose(restarted, [label.score for label in only_last.labels()], rtol=1e-10)
    assert not np.allclose(restarted, expected)


def test_reloaded_and_pruned_irs_are_scored():
    model = build(GatedViT).eval()
    data = vit_batches()
    ir = PruningIR(model)
    collect(ir, model, data)
    expected = [label.score for label in ir.labels()]
    reloaded = pickle.loads(pickle.dumps(ir))  # the recorded graph is not pickled
    try:
        has_graph = reloaded.graph is not None
    except Exception:
        has_graph = False
    assert not has_graph
    collect(reloaded, reloaded.model, data)
    np.testing.assert_allclose([label.score for label in reloaded.labels()], expected, rtol=1e-6)

    pruned = ir.prune(labels=[group[0] for group in ir.label_groups()])
    per_implementation = []
    for implementation in IMPLEMENTATIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            collect(pruned, pruned.model, data, implementation=implementation)
        per_implementation.append(np.array([label.score for label in pruned.labels()]))
    assert (per_implementation[0] > 0).all()
    np.testing.assert_allclose(per_implementation[0], per_implementation[1], rtol=1e-4)


def test_several_forwards_feeding_one_backward():
    """A siamese-style loss: both forwards count in the one batch, on both implementations."""
    model = build(GatedCNN).eval()
    data = cnn_batches((4, 4, 4, 4))
    results = []
    for implementation in IMPLEMENTATIONS:
        ir = PruningIR(model)
        with LossAwareCriterion(ir, implementation=implementation) as collector:
            for (x1, y1), (x2, y2) in zip(data[0::2], data[1::2]):
                (F.cross_entropy(collector(x1), y1) + F.cross_entropy(collector(x2), y2)).backward()
            assert collector.batches == 2
        results.append(np.array([label.score for label in ir.labels()]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-7 * results[1].max())


def test_criterion_must_be_entered():
    ir = PruningIR(build(GatedCNN))
    with pytest.raises(Exception, match="with-block"):
        LossAwareCriterion(ir)(cnn_batches((2,))[0][0])


# --------------------------------------------------------------------------------------
# Joint scores: the estimate for sets of labels within a group
# --------------------------------------------------------------------------------------


def reference_gate_derivatives(model, batches, gate_spec):
    """dL_b/dz for explicit gates z = 1, one row per batch: {name: (batches, size)}."""
    model = copy.deepcopy(model)
    rows = {name: [] for name in gate_spec}
    for x, y in batches:
        gates = {name: torch.ones(size, requires_grad=True) for name, (_, size) in gate_spec.items()}
        grads = torch.autograd.grad(F.cross_entropy(model(x, gates=gates), y), list(gates.values()))
        for name, grad in zip(gates, grads):
            rows[name].append(grad.double())
    return {name: torch.stack(values).numpy() for name, values in rows.items()}


def set_cost(gram, labels):
    """C(S) = 1_S^T M 1_S."""
    return float(gram[np.ix_(labels, labels)].sum())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_joint_scores_follow_the_set_estimate_of_explicit_gates(implementation):
    model = build(GatedCNN).eval()
    data = cnn_batches((4, 4, 4, 4, 4))
    derivatives = reference_gate_derivatives(model, data, CNN_GATES)
    single = PruningIR(copy.deepcopy(model))
    collect(single, single.model, data, implementation=implementation)
    ir = PruningIR(model)
    collect(ir, model, data, implementation=implementation, joint=True)
    for name, (parameter, size) in CNN_GATES.items():
        gram = derivatives[name].T @ derivatives[name] / len(data)
        ours = np.array([label_for(ir, parameter, i).score for i in range(size)])
        np.testing.assert_allclose(ours, joint_scores(gram), rtol=1e-4, atol=1e-7 * gram.max())
        order = np.argsort(ours, kind="stable")
        assert [label_for(ir, parameter, i) for i in order] == next(
            group for group in ir.label_groups() if label_for(ir, parameter, 0) in group)
        # the lowest label scores what it scores alone; the k lowest add up to at least C(S_k)
        assert ours[order[0]] == pytest.approx(label_for(single, parameter, int(order[0])).score, rel=1e-6)
        for k in range(1, size + 1):
            cost = set_cost(gram, order[:k])
            assert ours[order[:k]].sum() >= cost - 1e-4 * abs(cost) - 1e-7 * gram.max()


def test_joint_scores_charge_redundant_channels_for_removing_them_together():
    rng = np.random.default_rng(0)
    effect, other = rng.normal(size=(2, 200))
    other -= effect * (effect @ other) / (effect @ effect)    # uncorrelated with the copies
    other *= 1.2 * np.linalg.norm(effect) / np.linalg.norm(other)
    derivatives = np.stack([effect, other, effect, np.zeros(200)], axis=1)  # channels 0 and 2 are copies; 3 is dead
    gram = derivatives.T @ derivatives / 200
    scores = joint_scores(gram)
    # alone, each copy is the cheapest live channel (the default scores would remove both first);
    # with its twin gone, removing the other copy costs 2 M_02 + M_22 = 3 M_00 more
    assert scores[3] == 0.0
    assert scores[0] == pytest.approx(gram[0, 0])
    assert scores[1] == pytest.approx(gram[1, 1]) and gram[0, 0] < gram[1, 1] < 3 * gram[0, 0]
    assert scores[2] == pytest.approx(3 * gram[0, 0])
    order = np.argsort(scores, kind="stable")
    assert order.tolist() == [3, 0, 1, 2]
    for k in range(1, 5):
        assert scores[order[:k]].sum() == pytest.approx(set_cost(gram, order[:k]))


def test_joint_scores_never_decrease_along_the_removal_order():
    # channels whose effects cancel make later marginal costs smaller: scores stay ordered
    rng = np.random.default_rng(1)
    effect = rng.normal(size=100)
    derivatives = np.stack([effect, -effect * 1.1, rng.normal(size=100) * 0.5, -effect * 0.9], axis=1)
    gram = derivatives.T @ derivatives / 100
    scores = joint_scores(gram)
    ranked = np.sort(scores)
    assert (np.diff(ranked) > 0).all() and (scores >= 0).all()
    order = np.argsort(scores, kind="stable")
    for k in range(1, 5):
        assert scores[order[:k]].sum() >= set_cost(gram, order[:k]) - 1e-12


def test_joint_reset_and_continue():
    data = cnn_batches((4, 4, 4, 4))
    model = build(GatedCNN).eval()
    whole = PruningIR(copy.deepcopy(model))
    collect(whole, whole.model, data, joint=True)
    ir = PruningIR(model)
    collector = collect(ir, model, data[:2], joint=True)
    collect_again(collector, data[2:], reset=False)
    np.testing.assert_allclose([label.score for label in ir.labels()],
                               [label.score for label in whole.labels()], rtol=1e-10)
    single = collect(ir, model, data[:2], joint=False)   # nothing for a joint context to continue
    joint = LossAwareCriterion(ir, joint=True)
    joint.load_state_dict(single.state_dict())
    with pytest.warns(UserWarning, match="starts afresh"):
        collect_again(joint, data[2:], reset=False)
    only_last = PruningIR(copy.deepcopy(model))
    collect(only_last, only_last.model, data[2:], joint=True)
    np.testing.assert_allclose([label.score for label in ir.labels()],
                               [label.score for label in only_last.labels()], rtol=1e-10)


@pytest.mark.parametrize("joint", [False, True])
def test_accumulated_state_moves_to_another_ir(joint, tmp_path):
    """state_dict / load_state_dict: saved sums continue on a fresh IR of the same model as if
    the first context had run there; sums of another model are refused."""
    data = cnn_batches((4, 4, 4, 4))
    model = build(GatedCNN).eval()
    whole = PruningIR(copy.deepcopy(model))
    collect(whole, whole.model, data, joint=joint)
    first = PruningIR(copy.deepcopy(model))
    assert LossAwareCriterion(first.infer_labels(data[0][0])).state_dict() == {}
    first_collector = collect(first, first.model, data[:2], joint=joint)
    path = tmp_path / "state.pt"
    torch.save(first_collector.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert (state["grams"] is not None) == joint and state["batches"] == 2

    second = PruningIR(copy.deepcopy(model)).infer_labels(data[0][0])
    second_collector = LossAwareCriterion(second, joint=joint)
    second_collector.load_state_dict(state)
    np.testing.assert_allclose([label.score for label in second.labels()],
                               [label.score for label in first.labels()], rtol=1e-12)
    collect_again(second_collector, data[2:], reset=False)
    np.testing.assert_allclose([label.score for label in second.labels()],
                               [label.score for label in whole.labels()], rtol=1e-10)

    broken = [{**state, "sum": state["sum"][:-1]}, {**state, "batches": 0}]
    if joint:
        broken.append({**state, "grams": state["grams"][1:]})
    for wrong in broken:
        with pytest.raises(ValueError, match="do not fit"):
            second_collector.load_state_dict(wrong)


def test_joint_auto_is_the_default_and_caps_the_group_width(monkeypatch):
    """The default, joint="auto", gives joint scores to groups up to JOINT_AUTO_MAX_LABELS labels
    and single-label scores to wider ones; anything else is refused."""
    import pruning_ir.criteria.loss_aware as loss_aware
    data = cnn_batches((4, 4, 4))
    model = build(GatedCNN).eval()
    runs = {}
    for joint in ("auto", True, False):
        ir = PruningIR(copy.deepcopy(model))
        collect(ir, ir.model, data, **({} if joint == "auto" else {"joint": joint}))
        runs[joint] = [np.array([label.score for label in group]) for group in sorted_groups(ir)]
    for auto, joint in zip(runs["auto"], runs[True]):
        np.testing.assert_allclose(auto, joint, rtol=1e-12)
    assert any(not np.allclose(single, joint) for single, joint in zip(runs[False], runs[True]))

    widths = sorted(len(group) for group in runs[True])
    assert widths[0] < widths[-1]
    monkeypatch.setattr(loss_aware, "JOINT_AUTO_MAX_LABELS", widths[0])
    ir = PruningIR(copy.deepcopy(model))
    collect(ir, ir.model, data)
    for scores, single, joint in zip(sorted_groups(ir), runs[False], runs[True]):
        expected = joint if len(scores) <= widths[0] else single
        np.testing.assert_allclose([label.score for label in scores], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="joint must be"):
        LossAwareCriterion(ir, joint="yes")


def sorted_groups(ir):
    """The IR's groups with their labels in channel order (label_groups() sorts them by score)."""
    return [sorted(group, key=lambda label: label.class_id) for group in ir.label_groups()]


# --------------------------------------------------------------------------------------
# Data-free criteria
# --------------------------------------------------------------------------------------


def test_magnitude_is_the_norm_of_the_producing_weights():
    model = build(GatedCNN).eval()
    ir = PruningIR(model).infer_labels(cnn_batches((2,))[0][0])
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def norms(weight, p=2.0):
        return weight.detach().double().abs().pow(p).flatten(1).sum(1)

    def fold(bn):
        return (bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.double() + bn.eps))

    for p, folded in [(2, False), (1, False), (2, True)]:
        with MagnitudeCriterion(ir, p=p, fold_batchnorm=folded):
            pass
        f = (lambda bn: fold(bn) ** p) if folded else (lambda bn: 1.0)
        stream = norms(model.stem.weight, p) * f(model.stem_bn) + norms(model.conv2.weight, p) * f(model.bn2)
        expected = {"stem_bn.weight": stream, "bn1.weight": norms(model.conv1.weight, p) * f(model.bn1),
                    "branch_bn.weight": norms(model.branch.weight, p) * f(model.branch_bn),
                    "mix_bn.weight": norms(model.mix.weight, p) * f(model.mix_bn)}
        for parameter, values in expected.items():
            ours = [label_for(ir, parameter, i).score for i in range(len(values))]
            np.testing.assert_allclose(ours, values.numpy() ** (1 / p), rtol=1e-10)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_data_free_criteria_need_labels_or_inputs():
    ir = PruningIR(build(GatedCNN))
    with pytest.raises(LabelsNotInferredError, match="infer_labels"):
        with MagnitudeCriterion(ir):
            pass
    x = cnn_batches((2,))[0][0]
    with RandomCriterion(ir, seed=3) as collector:
        output = collector(x)  # infers labels and scores them
    assert output.shape == (2, 5)
    first = [label.score for label in ir.labels()]
    assert all(0 <= s < 1 for s in first) and len(set(first)) == len(first)
    RandomCriterion(ir, seed=3).apply()
    assert [label.score for label in ir.labels()] == first
    RandomCriterion(ir, seed=4).apply()
    assert [label.score for label in ir.labels()] != first


# --------------------------------------------------------------------------------------
# Reference zoo: both implementations agree; every label has a gate; errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet", "unet", "vit_mha", "densenet"])
def test_zoo_implementations_agree(name):
    from zoo import ZOO
    entry = ZOO[name]
    model = entry.build().train()
    inputs = entry.example_inputs()
    ir = PruningIR(model).infer_labels(*inputs)
    results = []
    for implementation in IMPLEMENTATIONS:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every label has a gate, every site is found
            with LossAwareCriterion(ir, implementation=implementation) as collector:
                for _ in range(2):
                    collector(*inputs).float().square().mean().backward()
        results.append(np.array([label.score for label in ir.labels()]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-6 * results[1].max())
    assert (results[0] > 0).mean() > 0.9


def test_non_finite_loss_is_reported():
    model = build(GatedCNN).train()
    ir = PruningIR(model)
    x, y = cnn_batches((4,))[0]
    with pytest.raises(Exception, match="not finite"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with LossAwareCriterion(ir) as collector:
                (collector(x).sum() * float("inf")).backward()


# --------------------------------------------------------------------------------------
# Scoring in batch statistics (LossAwareCriterion(batch_statistics=...))
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, size, in_batch_statistics", [
    ("auto", 16, True),      # frozen batch norms, batches of 16: scored in batch statistics
    ("auto", 8, False),      # smaller batches: as run (eval mode)
    (True, 4, True),
    (False, 16, False),
    (None, 16, False),       # the default: as run
])
def test_batch_statistics_scores_equal_explicit_gates_in_that_mode_and_leave_the_norms(option, size,
                                                                                       in_batch_statistics):
    model = build(GatedCNN).eval()
    data = cnn_batches((size, size))
    reference = reference_scores(copy.deepcopy(model).train(in_batch_statistics), data, CNN_GATES)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    ir = PruningIR(model)
    collect(ir, model, data, joint=False, **({} if option is None else {"batch_statistics": option}))
    for name, (parameter, width) in CNN_GATES.items():
        ours = torch.tensor([label_for(ir, parameter, i).score for i in range(width)], dtype=torch.float64)
        torch.testing.assert_close(ours, reference[name], rtol=1e-4, atol=1e-7 * float(reference[name].max()))
    assert not any(m.training for m in model.modules())            # modes and running statistics as before
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_batch_statistics_auto_runs_a_model_in_train_mode_as_it_is():
    model = build(GatedCNN).train()
    data = cnn_batches((16, 16))
    ir = PruningIR(model)
    collect(ir, model, data, batch_statistics="auto")
    assert all(m.training for m in model.modules())
    assert int(model.bn1.num_batches_tracked) == 2         # the running statistics updated, as in training


def test_batch_statistics_must_be_auto_true_or_false():
    with pytest.raises(ValueError, match="batch_statistics must be 'auto', True or False, got 'yes'"):
        LossAwareCriterion(PruningIR(build(GatedCNN)), batch_statistics="yes")
