"""Latency tables: each prunable group's latency as a function of how many channels it keeps.

Measuring a pruned copy of the whole model for every candidate selection is what makes a
measured-latency budget slow. A table instead times the ops a group touches in isolation: a
fresh ``nn.Conv2d``/``nn.Linear``/batch norm/layer norm with the pruned widths, on an input of
the recorded shape, timed with ``measure_latency``. A timing depends only on the op's
*signature* (type, constructor arguments, input shape, dtype, device, threads), so it is
measured once and cached in memory and, optionally, in a JSON file under a machine key (CPU
model, torch version, threads, device name) so that no timing is reused on other hardware.

A group's latency at a kept count is the sum, over the ops whose widths it changes (producers
of its channels, consumers reading them), of the op's time at that width with every other
group at its current width. Ops that cannot be isolated (element-wise ops, pooling, attention
matmuls, functional calls) are left out: the selector scales the table by the measured/predicted
ratio of the real model, which absorbs them.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..latency import TableLatency, allocator_mode, eval_mode, measure_latency, to_device
from .plan import SelectionPlan

__all__ = ["LatencyTable", "GroupTable", "OpSignature", "machine_key", "build_op", "cpu_model"]

CACHE_FORMAT = 1
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_KINDS = (*_CONVS, nn.Linear, *_NORMS, nn.LayerNorm)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: str | torch.device = "cpu", threads: int | None = None, steady: bool = True) -> str:
    """What a timing is only valid on: CPU model, torch version, intra-op threads, device name,
    and the CPU memory it ran with (``allocator_mode``: a steady heap or the process's own)."""
    device = torch.device(device)
    threads = torch.get_num_threads() if threads is None else threads
    name = "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    elif device.type != "cpu":
        name = device.type
    return (f"cpu={cpu_model()}; torch={torch.__version__}; threads={threads}; device={name}; "
            f"memory={allocator_mode(device, steady)}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


@dataclass(frozen=True)
class OpSignature:
    """Everything an isolated op's time depends on; ``key`` is its canonical string."""

    kind: str                    # torch.nn class name: Conv2d, Linear, BatchNorm2d, LayerNorm, ...
    args: tuple                  # (name, value) constructor arguments, sorted
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    threads: int

    @property
    def key(self) -> str:
        return json.dumps([self.kind, [[k, _jsonable(v)] for k, v in self.args], list(self.input_shape),
                           self.dtype, self.device, self.threads], separators=(",", ":"))


def module_arguments(module: nn.Module) -> tuple[str, dict] | None:
    """(nn class name, constructor arguments) of a module a table can time in isolation, else None."""
    kind = next((k for k in _KINDS if isinstance(module, k)), None)
    if kind is None:
        return None
    if kind in _CONVS:
        args = {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": tuple(module.kernel_size), "stride": tuple(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
                "dilation": tuple(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    elif kind is nn.Linear:
        args = {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    elif kind in _NORMS:
        args = {"num_features": module.num_features, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    else:
        args = {"normalized_shape": tuple(module.normalized_shape),
                "elementwise_affine": module.elementwise_affine}
    return kind.__name__, args


def pruned_input_shape(kind: str, args: dict, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape of an op with constructor ``args``: the recorded shape with its channel
    (or feature) dimensions set to the op's input width."""
    shape = list(shape)
    if kind.startswith("Conv"):
        shape[len(shape) - len(args["kernel_size"]) - 1] = args["in_channels"]
    elif kind == "Linear":
        shape[-1] = args["in_features"]
    elif kind.startswith("BatchNorm"):
        shape[1 if len(shape) > 1 else 0] = args["num_features"]
    else:
        normalized = tuple(args["normalized_shape"])
        shape[len(shape) - len(normalized):] = normalized
    return tuple(int(s) for s in shape)


def build_op(signature: OpSignature) -> tuple[nn.Module, torch.Tensor]:
    """A fresh module and input with the signature's shapes (uninitialized memory is filled:
    denormals would slow a CPU)."""
    cls = getattr(nn, signature.kind)
    device, dtype = torch.device(signature.device), getattr(torch, signature.dtype)
    module = torch.nn.utils.skip_init(cls, **dict(signature.args), device=device, dtype=dtype)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                tensor.fill_(1)
            elif tensor.is_floating_point():
                tensor.uniform_(-0.1, 0.1)
            else:
                tensor.zero_()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(signature.input_shape, generator=generator, dtype=dtype).to(device)
    return module, x


class LatencyTable:
    """Timings of isolated ops, keyed by :class:`OpSignature`, for one set of example inputs.

    ``example_inputs`` (and keyword inputs) give the shapes the ops see (batch included);
    ``device``, ``dtype`` (default: each module's own) and ``threads`` (default: torch's setting
    when the table is made) are part of every signature. ``warmup``/``repeats``/``statistic``:
    how each op is timed; ``steady``: with ``steady_allocator`` (see ``measure_latency``).
    ``cache_path``: a JSON file timings are read from and written to,
    under :func:`machine_key` (``machine`` overrides it). ``grid_points``: how many kept
    counts per group a row spans (all allowed counts near the current one, evenly spaced
    ones elsewhere). ``measurements`` counts the ops actually timed.
    """

    def __init__(self, *example_inputs: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 threads: int | None = None, warmup: int = 2, repeats: int = 5, statistic: str = "min",
                 cache_path: str | os.PathLike | None = None, grid_points: int = 12, machine: str | None = None,
                 verbose: bool = False, steady: bool = True, **example_kwargs: Any):
        if not isinstance(grid_points, int) or grid_points < 2:
            raise ValueError(f"grid_points must be an int >= 2, got {grid_points!r}")
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs
        self.device = torch.device(device)
        self.dtype = dtype
        self.threads = torch.get_num_threads() if threads is None else int(threads)
        self.warmup, self.repeats, self.statistic, self.steady = warmup, repeats, statistic, steady
        self.grid_points = grid_points
        self.verbose = verbose
        self.machine = machine if machine is not None else machine_key(self.device, self.threads, steady)
        self.cache_path = None if cache_path is None else os.fspath(cache_path)
        self.measurements = 0
        self._timings: dict[str, float] = self._load()
        self._unsaved = False

    @classmethod
    def from_function(cls, function: TableLatency, verbose: bool = False) -> "LatencyTable":
        """The table a :class:`~pruning_ir.latency.TableLatency` describes (same inputs, device, threads)."""
        options = dict(function.table_options)
        return cls(*function.inputs, verbose=verbose, **options,
                   **{k: v for k, v in function.kwargs.items() if k not in
                      ("device", "warmup", "repeats", "statistic", "threads", "steady")})

    # -- timings -------------------------------------------------------------------------------
    def signature(self, kind: str, args: dict, input_shape: Iterable[int], dtype: torch.dtype) -> OpSignature:
        dtype = self.dtype if self.dtype is not None else dtype
        return OpSignature(kind, tuple(sorted(args.items())), tuple(int(s) for s in input_shape),
                           str(dtype).removeprefix("torch."), str(self.device), self.threads)

    def module_signature(self, module: nn.Module, input_shape: Iterable[int]) -> OpSignature:
        """The signature of ``module`` run on an input of ``input_shape``."""
        described = module_arguments(module)
        if described is None:
            raise TypeError(f"a latency table times Conv1d/2d/3d, Linear, BatchNorm and LayerNorm modules, "
                            f"not {type(module).__name__}")
        parameter = next(module.parameters(), None)
        return self.signature(*described, input_shape, parameter.dtype if parameter is not None else torch.float32)

    def latency(self, signature: OpSignature) -> float:
        """Seconds of one call of the op, timed once per signature."""
        key = signature.key
        if key not in self._timings:
            self._timings[key] = self.measure(signature)
            self.measurements += 1
            self._unsaved = True
        return self._timings[key]

    def measure(self, signature: OpSignature) -> float:
        """Time a fresh op of this signature (a subclass may price ops another way)."""
        module, x = build_op(signature)
        return measure_latency(module, x, device=self.device, warmup=self.warmup, repeats=self.repeats,
                               statistic=self.statistic, threads=self.threads, steady=self.steady)

    def __len__(self) -> int:
        return len(self._timings)

    # -- the disk cache --------------------------------------------------------------------------
    def _read(self) -> dict:
        if self.cache_path is None or not os.path.exists(self.cache_path):
            return {"format": CACHE_FORMAT, "machines": {}}
        try:
            with open(self.cache_path) as file:
                data = json.load(file)
        except (OSError, ValueError):
            return {"format": CACHE_FORMAT, "machines": {}}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or \
                not isinstance(data.get("machines"), dict):
            return {"format": CACHE_FORMAT, "machines": {}}
        return data

    def _load(self) -> dict[str, float]:
        entries = self._read()["machines"].get(self.machine, {})
        return {k: float(v) for k, v in entries.items() if isinstance(v, (int, float))}

    def save(self) -> None:
        """Write the timings to ``cache_path`` under this machine's key (other machines' kept)."""
        if self.cache_path is None or not self._unsaved:
            return
        data = self._read()
        data["machines"].setdefault(self.machine, {}).update(self._timings)
        folder = os.path.dirname(os.path.abspath(self.cache_path))
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, sort_keys=True)
        os.replace(temporary, self.cache_path)
        self._unsaved = False

    # -- a model's groups ----------------------------------------------------------------------
    def bind(self, plan: SelectionPlan) -> "GroupTable":
        """The table of ``plan``'s groups: which ops each group's kept count changes, and how."""
        return GroupTable(self, plan)


@dataclass
class _Width:
    """A size attribute of an op: ``(fixed + prunable survivors) // divisor``; ``ranks[g]``
    holds the removal ranks of group ``g``'s labels among its positions, sorted."""

    attribute: str
    total: int
    divisor: int
    tuple_index: int | None
    ranks: dict[int, np.ndarray]

    def value(self, counts: np.ndarray) -> int:
        removed = sum(int(np.searchsorted(r, counts[g])) for g, r in self.ranks.items())
        return (self.total - removed) // self.divisor


@dataclass
class _Op:
    path: str
    kind: str
    args: dict
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]          # input shape of every call in the example forward pass
    widths: list[_Width] = field(default_factory=list)
    groups: frozenset[int] = frozenset()


class GroupTable:
    """A :class:`LatencyTable` applied to one plan: predicted latency of any counts vector and
    the per-group rows a multiple-choice knapsack needs."""

    def __init__(self, table: LatencyTable, plan: SelectionPlan):
        self.table, self.plan = table, plan
        index = plan.ir.index
        group_of = np.full(index.class_count, -1, dtype=np.int64)
        rank_of = np.zeros(index.class_count, dtype=np.int64)
        for gi, g in enumerate(plan.groups):
            ids = np.array([label.class_id for label in g.labels], dtype=np.int64)
            group_of[ids], rank_of[ids] = gi, np.arange(len(ids))
        bindings: dict[str, list] = {}
        for binding in index.attribute_bindings:
            bindings.setdefault(binding.target.module_path, []).append(binding)
        self.ops: list[_Op] = []
        for path, module, shapes in self._record(plan.ir.model):
            kind, args = module_arguments(module)
            parameter = next(module.parameters(), None)
            op = _Op(path, kind, args, parameter.dtype if parameter is not None else torch.float32, shapes)
            for binding in bindings.get(path, []):
                target = binding.target
                if target.attribute not in args:
                    continue
                groups = group_of[binding.classes]
                ranks = {int(g): np.sort(rank_of[binding.classes][groups == g]) for g in np.unique(groups[groups >= 0])}
                op.widths.append(_Width(target.attribute, len(binding.classes), target.divisor, target.tuple_index,
                                        ranks))
            op.groups = frozenset(g for width in op.widths for g in width.ranks)
            self.ops.append(op)
        self.touching = [[op for op in self.ops if gi in op.groups] for gi in range(len(plan.groups))]

    def _record(self, model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[int, ...]]]]:
        """Every timeable module that runs on the example inputs, with its input shapes."""
        shapes: dict[str, list] = {}
        modules = {path: m for path, m in model.named_modules() if module_arguments(m) is not None}
        handles = []
        for path, module in modules.items():
            def hook(module: nn.Module, args: tuple, path: str = path) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(path, []).append(tuple(args[0].shape))
            handles.append(module.register_forward_pre_hook(hook))
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        try:
            with eval_mode(model):
                model(*to_device(self.table.example_inputs, device), **to_device(self.table.example_kwargs, device))
        finally:
            for handle in handles:
                handle.remove()
        return [(path, modules[path], shapes[path]) for path in modules if path in shapes]

    # -- latency of a selection ------------------------------------------------------------------
    def op_args(self, op: _Op, counts: np.ndarray) -> dict:
        args = dict(op.args)
        for width in op.widths:
            value = width.value(counts)
            if width.tuple_index is None:
                args[width.attribute] = value
            else:
                items = list(args[width.attribute])
                items[width.tuple_index] = value
                args[width.attribute] = tuple(items)
        return args

    def op_latency(self, op: _Op, counts: np.ndarray) -> float:
        args = self.op_args(op, counts)
        return sum(self.table.latency(self.table.signature(op.kind, args, pruned_input_shape(op.kind, args, shape),
                                                           op.dtype)) for shape in op.shapes)

    def predict(self, counts: np.ndarray) -> float:
        """Sum of the isolated times of every timeable op with ``counts`` removed."""
        return sum(self.op_latency(op, counts) for op in self.ops)

    def group_latency(self, index: int, counts: np.ndarray) -> float:
        """Time of the ops group ``index`` touches, every group at ``counts``."""
        return sum(self.op_latency(op, counts) for op in self.touching[index])

    # -- rows -------------------------------------------------------------------------------------
    def grid(self, index: int, current: int) -> np.ndarray:
        """The removal counts a row spans: the allowed counts nearest ``current`` (a quarter of
        the points) and ones evenly spaced over the whole range, ends and ``current`` included."""
        allowed = self.plan.groups[index].counts
        points = self.table.grid_points
        if len(allowed) <= points or not self.touching[index]:
            return allowed if self.touching[index] else np.array([current])
        near = np.argsort(np.abs(allowed - current), kind="stable")[:max(2, points // 4)]
        spread = np.unique(np.round(np.linspace(0, len(allowed) - 1, points)).astype(np.int64))
        return np.unique(np.concatenate([allowed[near], allowed[spread], [current]])).astype(np.int64)

    def rows(self, current: np.ndarray, grids: list[np.ndarray]) -> list[np.ndarray]:
        """Per group, the time of the ops it touches at each count of its grid (others at ``current``)."""
        rows = []
        for index, grid in enumerate(tqdm(grids, desc="latency table", disable=not self.table.verbose, leave=False)):
            row = []
            for count in grid:
                counts = current.copy()
                counts[index] = count
                row.append(self.group_latency(index, counts))
            rows.append(np.array(row, dtype=np.float64))
        self.table.save()
        return rows
