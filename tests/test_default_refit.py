"""The four steps refit by default: LossAwareCriterion leaves input statistics with the IR, and
``ir.prune(labels=...)`` refits the layers that read removed channels by least squares, unless the
statistics no longer describe the weights (changed parameters, masks, other labels)."""

from __future__ import annotations

import dill
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_ir import InputStatistics, LossAwareCriterion, MagnitudeCriterion, PruningIR, UniformLabelSelector
from pruning_ir.errors import PruningIRError
from helpers import pick_labels


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 5)).eval()


def _data(batches: int = 4):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator))
            for _ in range(batches)]


def _calibrated(model: nn.Module, **options) -> PruningIR:
    ir = PruningIR(model)
    with LossAwareCriterion(ir, **options) as score_collector:
        for x, y in _data():
            F.cross_entropy(score_collector(x), y).backward()
    model.zero_grad(set_to_none=True)
    return ir


def _error(pruned: nn.Module, model: nn.Module) -> float:
    x = torch.cat([x for x, _ in _data()])
    with torch.no_grad():
        return float((pruned(x) - model(x)).pow(2).mean())


def test_the_four_steps_refit_by_least_squares_and_lose_less_of_the_output():
    model = _net()
    ir = _calibrated(model)
    assert isinstance(ir.input_statistics, InputStatistics) and len(ir.input_statistics.collected()) == 3
    labels = UniformLabelSelector(0.5).select(ir)
    refit = ir.prune(labels=labels)
    plain = ir.prune(labels=labels, reconstruct=None)
    assert refit.reconstruction is not None and refit.reconstruction.method == "least_squares"
    assert "least squares" in refit.reconstruction_note
    assert sorted(refit.reconstruction.report.refit) == ["10.weight", "3.weight", "8.weight"]
    assert plain.reconstruction is None and "reconstruct=None" in plain.reconstruction_note
    assert refit.created_parameters == ()   # no bias created: state dicts and configs keep their keys
    assert _error(refit.model, model) < 0.5 * _error(plain.model, model)
    # the pruned models have the same shapes
    assert [p.shape for p in refit.model.parameters()] == [p.shape for p in plain.model.parameters()]


def test_exactly_zero_channels_stay_exact_with_the_default_refit():
    model = _net()
    ir = PruningIR(model)
    ir.infer_labels(_data()[0][0])
    labels = pick_labels(ir, 0.4, seed=3)
    ir.zero_labels(labels)               # zeroed before calibration: the statistics see them dead
    with LossAwareCriterion(ir) as score_collector:
        for x, y in _data():
            F.cross_entropy(score_collector(x), y).backward()
    pruned = ir.prune(labels=labels)
    assert pruned.reconstruction is not None
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pruned.model(x), model(x), atol=1e-5)


def test_a_parameter_changed_after_calibration_makes_the_statistics_stale():
    model = _net()
    ir = _calibrated(model)
    labels = UniformLabelSelector(0.5).select(ir)
    with torch.no_grad():
        model[8].weight.add_(0.01)       # e.g. a training step between calibration and pruning
    pruned = ir.prune(labels=labels)
    assert pruned.reconstruction is None and "8.weight" in pruned.reconstruction_note
    exact = ir.prune(labels=labels, reconstruct=None)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(pruned.model(x), exact.model(x))


def test_a_masked_ir_is_not_refit():
    model = _net()
    ir = _calibrated(model)
    labels = UniformLabelSelector(0.5).select(ir)
    ir.mask(labels)
    pruned = ir.prune(labels=labels)
    assert pruned.reconstruction is None and "masked" in pruned.reconstruction_note


def test_opting_out_gives_enots_exact_slicing():
    model = _net()
    ir = _calibrated(model, input_statistics=False)
    assert ir.input_statistics is None
    pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir))
    assert pruned.reconstruction is None and "no input statistics held" in pruned.reconstruction_note
    with pytest.raises(ValueError, match="input_statistics"):
        LossAwareCriterion(ir, input_statistics="yes")
    with pytest.raises(ValueError, match="reconstruct"):
        ir.prune(labels=[], reconstruct="least_squares")


def test_a_data_free_criterion_leaves_no_statistics():
    ir = PruningIR(_net())
    ir.infer_labels(_data()[0][0])
    with MagnitudeCriterion(ir):
        pass
    assert ir.input_statistics is None


def test_a_failed_calibration_leaves_no_statistics():
    model = _net()
    ir = PruningIR(model)
    with pytest.raises(RuntimeError, match="boom"):
        with LossAwareCriterion(ir) as score_collector:
            score_collector(_data()[0][0])
            raise RuntimeError("boom")
    assert ir.input_statistics is None


def test_the_pruned_ir_and_a_saved_one_hold_no_statistics(tmp_path):
    model = _net()
    ir = _calibrated(model)
    labels = UniformLabelSelector(0.5).select(ir)
    path = tmp_path / "ir.pt"
    torch.save(ir, path, pickle_module=dill)
    loaded = torch.load(path, pickle_module=dill, weights_only=False)
    assert loaded.input_statistics is None
    assert "no input statistics held" in loaded.prune(labels=labels).reconstruction_note
    pruned = ir.prune(labels=labels)
    assert pruned.input_statistics is None   # they describe the unpruned layers


def test_statistics_of_another_ir_are_refused():
    first, second = _calibrated(_net()), PruningIR(_net())
    with pytest.raises(PruningIRError, match="another IR"):
        second.hold_statistics(first.input_statistics)
    first.hold_statistics(None)
    assert first.input_statistics is None


def test_max_bytes_keeps_second_moments_for_the_narrowest_consumers_first():
    model = _net()
    ir = PruningIR(model)
    ir.infer_labels(_data()[0][0])
    cap = (16 ** 2 + 24 ** 2) * 8 + 100     # the two Linears (16 and 24 features), not the conv (12 * 9)
    with InputStatistics(ir, max_bytes=cap) as stats:
        for x, _ in _data(1):
            model(x)
    assert stats.second_moment("8.weight") is not None and stats.second_moment("10.weight") is not None
    assert stats.second_moment("3.weight") is None and stats.mean("3.weight").shape == (108,)
    assert "max_bytes" in stats.consumers["3.weight"].outer_skipped
    assert stats.second_moment_bytes() <= cap
    with pytest.raises(ValueError, match="max_bytes"):
        InputStatistics(ir, max_bytes=-1)


def test_max_rows_stops_a_consumer_once_it_has_enough_rows():
    model = _net()
    ir = PruningIR(model)
    ir.infer_labels(_data()[0][0])
    with InputStatistics(ir, max_rows=20) as stats:
        for x, _ in _data(3):
            model(x)
    assert stats.count("8.weight") == 32     # 16 rows per batch: stopped after the batch that reached 20
    assert stats.count("3.weight") == 1024   # a conv's first call already has more rows than the cap


def test_a_hugging_face_llama_refit_by_the_four_steps_reloads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_models import FAMILIES, family_inputs
    torch.manual_seed(0)
    model = FAMILIES["llama"].model_class(FAMILIES["llama"].config()).eval()
    inputs = family_inputs("llama")
    ir = PruningIR(model)
    with LossAwareCriterion(ir) as score_collector:
        for _ in range(2):
            logits = score_collector(**inputs).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
    labels = []  # half of every head and MLP group, the hidden size kept
    for group in ir.groups:
        if group.prunable and not any("embed_tokens" in name for name in group.parameters):
            labels += sorted(group.labels, key=lambda label: label.score)[:len(group.labels) // 2]
    pruned = ir.prune(labels=labels)
    assert pruned.reconstruction is not None and pruned.reconstruction.report.refit
    assert pruned.created_parameters == ()
    pruned.model.save_pretrained(tmp_path)
    reloaded = getattr(transformers, FAMILIES["llama"].auto).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, pruned.model(**inputs).logits, atol=1e-5)


def test_collection_pauses_once_every_layer_has_its_rows_and_stop_still_ends_it():
    from torch.overrides import _get_current_function_mode_stack
    model = _net()
    ir = PruningIR(model)
    ir.infer_labels(_data()[0][0])
    depth = len(_get_current_function_mode_stack())
    stats = InputStatistics(ir, max_rows=20).start()
    model(_data()[0][0])
    assert not stats.pause_when_full()        # the Linears have 16 rows of 20
    model(_data()[1][0])
    assert stats.pause_when_full() and len(_get_current_function_mode_stack()) == depth
    model(_data()[2][0])                      # runs without the interceptor
    assert stats.count("8.weight") == 32 and stats.active
    stats.stop()
    assert not stats.active and len(_get_current_function_mode_stack()) == depth
    uncapped = InputStatistics(ir).start()
    model(_data()[0][0])
    assert not uncapped.pause_when_full()     # no max_rows: never pauses
    uncapped.stop()


class _Residual(nn.Module):
    """A residual stream (16 wide) read by every block's up projection and the head; each down projection
    alone reads its block's 48 hidden units."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ups = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.downs = nn.ModuleList(nn.Linear(48, 16) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for up, down in zip(self.ups, self.downs):
            x = x + down(F.relu(up(x)))
        return self.head(x)


def test_max_bytes_serves_the_layers_that_alone_read_their_channels_first():
    model = _Residual()
    ir = PruningIR(model)
    x = torch.randn(8, 16)
    ir.infer_labels(x)
    with InputStatistics(ir, max_bytes=2 * 48 ** 2 * 8) as stats:   # room for the two down projections only
        model(x)
    assert [name for name in stats.collected() if stats.second_moment(name) is not None] == \
        ["downs.0.weight", "downs.1.weight"]     # not the narrower readers of the stream


def test_measured_removal_costs_restore_the_weights_so_the_refit_still_applies():
    from pruning_ir import measure_removal_costs
    x, y = torch.cat([x for x, _ in _data()]), torch.cat([y for _, y in _data()])

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    model = _net()
    ir = _calibrated(model)
    measure_removal_costs(ir, loss, verbose=False)   # zeroes labels in place, then copies the weights back
    pruned = ir.prune(labels=UniformLabelSelector(0.5).select(ir))
    assert pruned.reconstruction is not None, pruned.reconstruction_note
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-3                # a real change is still seen
    assert "0.weight" in ir.prune(labels=UniformLabelSelector(0.5).select(ir)).reconstruction_note


def test_an_inplace_prune_refits_like_a_copy():
    model = _net()
    ir = _calibrated(model)
    labels = UniformLabelSelector(0.5).select(ir)
    copy_ir = ir.prune(labels=labels)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = copy_ir.model(x)
        inplace = ir.prune(labels=labels, inplace=True)
        assert inplace.model is model and inplace.reconstruction is not None
        torch.testing.assert_close(inplace.model(x), expected, atol=1e-6, rtol=1e-5)
