"""LossAwareCriterion and measure_removal_costs under torch.distributed: two CPU processes (gloo)
on different data shards end with identical scores, equal to one process that sees all the batches."""

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
from pruning_ir import PruningIR
from pruning_ir.criteria import LossAwareCriterion, MagnitudeCriterion, measure_removal_costs

WORLD_SIZE = 2
BATCHES = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    ).train()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(BATCHES)]


def _scores(batches, joint: bool) -> np.ndarray:
    model = _model()
    ir = PruningIR(model)
    with LossAwareCriterion(ir, joint=joint) as collector:
        for x, y in batches:
            F.cross_entropy(collector(x), y).backward()
            model.zero_grad()
    return np.array([label.score for label in ir.labels()])


def _worker(rank: int, port: int, out_dir: str, joint: bool) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        shard = _batches()[rank::WORLD_SIZE]
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), _scores(shard, joint))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("joint", [False, True], ids=["single", "joint"])
def test_scores_are_all_reduced_across_ranks(tmp_path, joint):
    """Single-label sums, and with joint scores the per-group outer products too."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path), joint), nprocs=WORLD_SIZE, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(WORLD_SIZE)]
    assert np.array_equal(ranks[0], ranks[1])  # every rank selects the same labels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _scores(_batches(), joint)  # one process, every batch
        local = _scores(_batches()[0::WORLD_SIZE], joint)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(ranks[0], single, rtol=1e-6, atol=1e-12)
    assert not np.allclose(local, single)  # the all-reduce did something


def _measured_scores(batches) -> np.ndarray:
    """The labels' scores, then the measured curves behind them."""
    model = _model()
    ir = PruningIR(model).infer_labels(batches[0][0])
    MagnitudeCriterion(ir).apply()
    curves = measure_removal_costs(ir, lambda m: sum(F.cross_entropy(m(x), y) for x, y in batches) / len(batches),
                                   points=3, verbose=False)
    return np.concatenate([[label.score for label in ir.labels()]] + [curve.loss_increase for curve in curves])


def _measuring_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), _measured_scores(_batches()[rank::WORLD_SIZE]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_measured_costs_are_averaged_across_ranks(tmp_path):
    """measure_removal_costs on two shards: both ranks get the scores of the loss over all the data."""
    mp.spawn(_measuring_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(WORLD_SIZE)]
    assert np.array_equal(ranks[0], ranks[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        union = _measured_scores(_batches())  # equal shards: the mean of the shard losses is the loss of all
        local = _measured_scores(_batches()[0::WORLD_SIZE])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(ranks[0], union, rtol=1e-5, atol=1e-6)  # float32 losses
    assert np.abs(local - union).max() > 1e-3  # the shards alone measure other curves
