"""Latency functions: exact MAC counts, parameter counts, wall-time measurement, binding."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from pruning_ir.latency import LatencyMeasurementError, bind, compare_latency, macs, measure_latency, parameter_count


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


def test_macs_counts_convolutions_and_matmuls_exactly():
    x = torch.randn(2, 3, 8, 8)
    conv = 2 * 8 * 3 * 9 * 64        # batch * out * in * kernel * positions
    linear = 2 * 512 * 10
    assert macs(small_net(), x) == conv + linear
    assert macs(small_net(), x) == macs(small_net(), x)   # deterministic


def test_macs_leaves_the_model_flags_statistics_and_threads_alone():
    model = small_net().train()
    model[2].eval()   # mixed flags; the batch norm is in training mode and would update its statistics
    flags = [m.training for m in model.modules()]
    mean = model[1].running_mean.clone()
    threads = torch.get_num_threads()
    macs(model, torch.randn(2, 3, 8, 8))
    measure_latency(model, torch.randn(2, 3, 8, 8), warmup=0, repeats=1)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, mean)
    assert torch.get_num_threads() == threads


def test_parameter_count():
    model = small_net()
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) == 8 * 27 + 8 + 16 + 5120 + 10


def test_measure_latency_is_a_positive_median_and_grows_with_work():
    x = torch.randn(1, 64)
    small, large = nn.Linear(64, 8), nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    t_small = measure_latency(small, x, warmup=2, repeats=15)
    t_large = measure_latency(large, x, warmup=2, repeats=15)
    assert 0 < t_small < t_large
    assert 0 < measure_latency(large, x, warmup=2, repeats=15, statistic="min") < t_large * 1.5


def test_measure_latency_errors_are_clear():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(LatencyMeasurementError, match="Broken raised RuntimeError.*boom"):
        measure_latency(Broken(), torch.randn(1))
    with pytest.raises(ValueError, match="statistic must be one of"):
        measure_latency(small_net(), torch.randn(1, 3, 8, 8), statistic="mean")
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(small_net(), torch.randn(1, 3, 8, 8), repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(LatencyMeasurementError, match="cuda"):
            measure_latency(small_net(), torch.randn(1, 3, 8, 8), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_latency_on_cuda_leaves_the_model_on_cpu():
    model = small_net()
    assert measure_latency(model, torch.randn(1, 3, 8, 8), device="cuda", repeats=3) > 0
    assert next(model.parameters()).device.type == "cpu"


def test_bind_gives_a_picklable_one_argument_function():
    x = torch.randn(2, 3, 8, 8)
    function = pickle.loads(pickle.dumps(bind(macs, x)))
    assert function(small_net()) == macs(small_net(), x)
    assert "macs" in repr(function)
    assert bind(measure_latency, x, repeats=3)(small_net()) > 0


def test_compare_latency_measures_in_rotation_and_checks_its_arguments():
    order = []

    class Probe(nn.Module):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def forward(self, x):
            order.append(self.name)
            return x

    times = compare_latency([Probe("a"), Probe("b")], torch.randn(2), rounds=3, warmup=0, repeats=1, threads=1)
    assert order == ["a", "b", "b", "a", "a", "b"] and len(times) == 2 and all(t >= 0 for t in times)
    small, large = nn.Linear(64, 8), nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    fast, slow = compare_latency([small, large], torch.randn(1, 64), rounds=2, repeats=5)
    assert 0 < fast < slow
    with pytest.raises(ValueError, match="rounds >= 1"):
        compare_latency([small], torch.randn(1, 64), rounds=0)
    with pytest.raises(ValueError, match="at least one model"):
        compare_latency([], torch.randn(1, 64))
