"""ActivationCriterion: Wanda / FLAP scores equal a brute-force computation from the captured
inputs of the consumers, no gradient is ever created, and selection on them prunes a tiny
Llama that still runs; under torch.distributed the sums are all-reduced."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers import free_port
from pruning_ir import ActivationCriterion, GlobalScoreLabelSelector, LossAwareCriterion, PruningIR, UniformLabelSelector
from pruning_ir.criteria import ActivationCriterion as FromCriteria

from hf_models import HF_ZOO

METHODS = ["wanda", "flap"]


def _batches(shape: tuple[int, ...], count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def _terms(method: str, inputs: list[torch.Tensor], weight: torch.Tensor) -> np.ndarray:
    """Brute force from every captured input row: one term per input column of ``weight``."""
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
    w = weight.detach().double()
    if method == "wanda":
        return (w.abs().sum(0) * rows.pow(2).mean(0).sqrt()).numpy()
    return (w.pow(2).sum(0) * rows.var(0, unbiased=False)).numpy()


def _capture(module: nn.Module, store: list) -> None:
    module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


def _classes(ir: PruningIR, name: str) -> np.ndarray:
    """The class of every input channel of weight ``name`` (its dim-1 binding)."""
    return next(b.classes for b in ir.index.parameter_bindings if b.target.name == name and b.target.dim == 1)


class _Attention(nn.Module):
    """An input projection, then multi-head attention with q/k/v/o Linear modules."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.inp = nn.Linear(6, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        b, t, _ = h.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


def test_exported():
    assert ActivationCriterion is FromCriteria


@pytest.mark.parametrize("method", METHODS)
def test_mlp_scores_equal_brute_force_and_zero_channel_scores_zero(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    with torch.no_grad():
        model[0].weight[3] = 0.0
        model[0].bias[3] = 0.0          # hidden channel 3 is exactly zero on every input
    batches = _batches((4, 6))
    seen: list[torch.Tensor] = []
    _capture(model[2], seen)
    ir = PruningIR(model)
    ir.infer_labels(batches[0])
    seen.clear()
    with ActivationCriterion(ir, method=method) as collector:
        for x in batches:
            output = collector(x)
    assert len(seen) == len(batches)
    expected = _terms(method, seen, model[2].weight)
    assert torch.equal(output, model(batches[-1]))
    classes = _classes(ir, "2.weight")
    scores = ir.index.class_scores[classes]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-12)
    assert scores[3] == 0.0
    assert (np.delete(scores, 3) > 0).all()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_attention_head_scores_sum_their_columns(method):
    torch.manual_seed(0)
    model = _Attention().eval()
    batches = _batches((2, 5, 6))
    seen = {name: [] for name in ("q", "k", "v", "o")}
    for name, store in seen.items():
        _capture(getattr(model, name), store)
    ir = PruningIR(model)
    ir.infer_labels(batches[0])
    for store in seen.values():
        store.clear()
    with ActivationCriterion(ir, method=method) as collector:
        for x in batches:
            collector(x)
    expected = np.zeros(ir.index.class_count)
    for name in ("q", "k", "v", "o"):  # hidden channels: q, k and v read them; heads: o reads them
        np.add.at(expected, _classes(ir, f"{name}.weight"), _terms(method, seen[name], getattr(model, name).weight))
    heads = np.unique(_classes(ir, "o.weight"))
    assert len(heads) == 4  # one label per head, each spanning head_dim columns of o
    labels = np.array([label.class_id for label in ir.labels()])
    assert np.isin(heads, labels).all()
    np.testing.assert_allclose(ir.index.class_scores[labels], expected[labels], rtol=1e-6, atol=1e-12)


def test_llama_no_gradients_and_pruning_runs():
    entry = HF_ZOO["llama"]
    model = entry.build()
    (input_ids,) = entry.example_inputs()
    ir = PruningIR(model)
    with ActivationCriterion(ir, method="flap") as collector:
        for shift in range(3):
            output = collector(input_ids=(input_ids + shift) % 100)
            assert not output.logits.requires_grad
    assert all(p.grad is None for p in model.parameters())
    scores = np.array([label.score for label in ir.labels()])
    assert np.isfinite(scores).all() and (scores > 0).all()
    pruned = ir.prune(labels=UniformLabelSelector(0.25).select(ir))
    assert pruned.model.model.layers[0].mlp.up_proj.weight.shape[0] == 48
    assert pruned.model(input_ids).logits.shape == (2, 8, 100)


def test_standardize_gives_per_group_z_scores_for_global_selection():
    entry = HF_ZOO["llama"]
    model = entry.build()
    (input_ids,) = entry.example_inputs()
    ir = PruningIR(model)
    with ActivationCriterion(ir, standardize=True) as collector:
        collector(input_ids)
    for group in ir.groups:
        if group.prunable and len(group.classes) > 2:
            values = ir.index.class_scores[group.classes]
            assert abs(values.mean()) < 1e-9 and abs(values.std() - 1) < 1e-9
    with pytest.warns(UserWarning, match="config cannot describe"):
        pruned = ir.prune(labels=GlobalScoreLabelSelector(0.3).select(ir))
    assert pruned.model(input_ids).logits.shape == (2, 8, 100)


def test_bfloat16_model_sums_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    batches = _batches((16, 6))
    reference = PruningIR(model)
    with ActivationCriterion(reference) as collector:
        for x in batches:
            collector(x)
    low = PruningIR(model.to(torch.bfloat16))
    with ActivationCriterion(low) as collector:
        for x in batches:
            collector(x.to(torch.bfloat16))
    a = np.array([label.score for label in reference.labels()])
    b = np.array([label.score for label in low.labels()])
    np.testing.assert_allclose(b, a, rtol=0.05)


def test_errors_and_repeated_contexts():
    with pytest.raises(ValueError, match="method"):
        ActivationCriterion(PruningIR(nn.Linear(2, 2)), method="taylor")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    ir = PruningIR(model)
    x = _batches((4, 6), count=1)[0]
    criterion = ActivationCriterion(ir)
    with criterion as collector:
        collector(x)
    first = ir.index.class_scores.copy()
    with criterion as collector:  # a new context starts afresh: same data, same scores
        collector(x)
    np.testing.assert_allclose(ir.index.class_scores, first)
    with pytest.warns(UserWarning, match="never ran"):
        with criterion:
            pass
    np.testing.assert_allclose(ir.index.class_scores, first)


# -- torch.distributed ----------------------------------------------------------------------

def _distributed_scores(batches: list[torch.Tensor]) -> np.ndarray:
    torch.manual_seed(0)
    model = _Attention().eval()
    ir = PruningIR(model)
    with ActivationCriterion(ir, method="flap") as collector:
        for x in batches:
            collector(x)
    return np.array([label.score for label in ir.labels()])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), _distributed_scores(_batches((2, 5, 6), 4)[rank::2]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sums_are_all_reduced_across_ranks(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    assert np.array_equal(ranks[0], ranks[1])
    np.testing.assert_allclose(ranks[0], _distributed_scores(_batches((2, 5, 6), 4)), rtol=1e-9)
    assert not np.allclose(ranks[0], _distributed_scores(_batches((2, 5, 6), 4)[0::2]))


# -- LossAwareCriterion(keep_gradients=False) -----------------------------------------------

def test_loss_aware_keep_gradients_false_leaves_no_grad_and_same_scores():
    entry = HF_ZOO["llama"]
    (input_ids,) = entry.example_inputs()
    scores = []
    for keep in (True, False):
        model = entry.build()
        ir = PruningIR(model)
        with LossAwareCriterion(ir, keep_gradients=keep) as collector:
            for shift in range(2):
                ids = (input_ids + shift) % 100
                collector(input_ids=ids, labels=ids).loss.backward()
        assert all((p.grad is not None) == keep for p in model.parameters())
        scores.append(np.array([label.score for label in ir.labels()]))
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-9)
    # a gradient present on entry (the user's training step) is left to accumulate as before
    model = entry.build()
    head = model.lm_head.weight
    head.grad = torch.ones_like(head)
    ir = PruningIR(model)
    with LossAwareCriterion(ir, keep_gradients=False) as collector:
        collector(input_ids=input_ids, labels=input_ids).loss.backward()
    assert head.grad is not None and not torch.equal(head.grad, torch.ones_like(head))
    assert model.model.embed_tokens.weight.grad is None
    model(input_ids=input_ids, labels=input_ids).loss.backward()  # hooks are gone after the context
    assert model.model.embed_tokens.weight.grad is not None


class TransposedWeightMlp(nn.Module):
    """An MLP whose second layer is transformers' ``Conv1D`` (GPT-2's Linear, weight stored (in, out)) or
    the nn.Linear with the transposed weight."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, linear = nn.Linear(8, 16), nn.Linear(16, 4)
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.down = Conv1D(4, 16)
            with torch.no_grad():
                self.down.weight.copy_(linear.weight.T)
                self.down.bias.copy_(linear.bias)
        else:
            self.down = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("method", ["wanda", "flap"])
def test_gpt2_conv1d_consumers_score_as_the_linear_they_are(method):
    pytest.importorskip("transformers")
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))
    scores = []
    for conv1d in (True, False):
        ir = PruningIR(TransposedWeightMlp(conv1d))
        with ActivationCriterion(ir, method=method) as collector:
            collector(x)
        scores.append(next(g for g in ir.groups if g.prunable).scores)
    assert np.count_nonzero(scores[0]) == 16
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6)
