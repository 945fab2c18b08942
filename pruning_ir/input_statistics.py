"""Input statistics of the layers that read prunable channels, for reconstruction after pruning.

A *consumer* is a ``Linear`` or ``Conv1d/2d`` (or ``F.linear``/``F.conv1d``/``F.conv2d`` on a
parameter) whose weight's input dimension carries labels. Removing a label removes some of its
input features, and the layer's output loses their contribution; :mod:`pruning_ir.reconstruction`
gives it back from the statistics gathered here: the mean ``E[x]`` and second moment
``E[x x^T]`` of each consumer's input features (a Linear: over every row of its input; a conv:
over im2col patches, at most ``max_positions`` sampled output positions per call, so memory is
bounded by the batch and by ``D^2`` per consumer, ``D = C_in * prod(kernel)``).

Why a ``TorchFunctionMode`` and not module hooks: it sees functional calls on parameters too, and
the exact input the weight multiplies (after a module's own padding, ``padding_mode``, masks).
Sums are kept on the weight's device in ``dtype`` (float64 by default) and summed over the ranks
of ``torch.distributed`` when collection stops, so every rank refits the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .conv_patches import call_argument, conv_patches
from .criteria._distributed import all_reduce_sum, world_size
from .errors import PruningIRError

__all__ = ["InputStatistics", "collect_statistics", "ConsumerStatistics"]

_NOT_CONSUMERS = (nn.modules.conv._ConvTransposeNd, nn.Embedding, nn.EmbeddingBag)
_CONSUMER_OPS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d"}
_NOT_SEEN = ("no input statistics: not called as the weight of F.linear/F.conv1d/F.conv2d while collecting "
             "(a matmul, inside a leaf module such as nn.MultiheadAttention, or not run)")


@dataclass
class ConsumerStatistics:
    """Sums over the input features of one consumer weight (``name``): ``count`` rows (tokens or
    patches), ``total`` = sum of x, ``outer`` = sum of x x^T (None: means only)."""

    name: str
    features: int
    classes: np.ndarray                 # class of each input feature (im2col order for a conv)
    kernel: tuple[int, ...]             # the weight's shape after its input dimension
    bias: str | None = None             # the bias parameter the calls added, if any
    creatable_bias: bool = False        # the owner is a Linear/Conv whose bias can be created
    count: float = 0.0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    skipped: str | None = None
    outer_skipped: str | None = None
    kinds: set = field(default_factory=set)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1.0)

    def second_moment(self) -> torch.Tensor | None:
        return None if self.outer is None else self.outer / max(self.count, 1.0)


class _Interceptor(TorchFunctionMode):
    """Hands every F.linear / F.conv1d / F.conv2d call on a watched weight to the statistics."""

    def __init__(self, owner: "InputStatistics"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _CONSUMER_OPS.get(func)
        if kind is not None:
            self.owner._observe(kind, args, kwargs)
        return func(*args, **kwargs)


class InputStatistics:
    """Mean and second moment of the input features of every consumer of ``ir``'s labels.

    Use it as a with-block around any forward passes of ``ir.model`` (a criterion's included),
    or call it like a criterion (``stats(inputs)`` runs the model, inferring labels if needed);
    :meth:`run` goes over a loader. Args:

        max_features: consumers with more input features ``D`` keep means only (bias
            compensation, no least squares); the second moment costs ``D^2`` numbers.
        max_positions: conv patches sampled per call (None: every output position).
        second_moments: False keeps means only for every consumer (the opt-out of ``D^2`` memory).
        exclude: parameter or module names to leave out.
        groups: collect only the consumers that read a channel of these groups: group ids, or a
            predicate on each ``DependencyGroup`` (an LLM that keeps its hidden size needs only
            the consumers of its head and MLP groups: ``o_proj``, ``down_proj``; the projections
            reading the residual stream would cost ``hidden_size^2`` numbers each). None: all.
        dtype: accumulation dtype (float64; float32 halves the memory on a GPU).
        max_bytes: a cap on the second moments' memory: consumers keep them in order of fewest
            features while the sums fit; the others keep means only (None: no cap).
        max_rows: a consumer stops collecting once it has this many rows (None: no cap): the
            statistics settle long before a long calibration (or a training run) ends.
        product_dtype: the dtype of one call's outer products before they are added up in ``dtype``
            (float32: faster on CPU, rounding within a call only; None: ``dtype``).
    """

    def __init__(self, ir: Any, *, max_features: int = 4096, max_positions: int | None = 1024,
                 second_moments: bool = True, exclude: Iterable[str] = (),
                 groups: Iterable[int] | Callable[[Any], bool] | None = None, dtype: torch.dtype = torch.float64,
                 seed: int = 0, verbose: bool = False, max_bytes: int | None = None,
                 max_rows: int | None = None, product_dtype: torch.dtype | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be >= 1 or None, got {max_positions}")
        self.ir = ir
        self.max_features = int(max_features)
        self.max_positions = max_positions
        self.second_moments = second_moments
        self.exclude = set(exclude)
        self.groups = groups if groups is None or callable(groups) else {int(g) for g in groups}
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.product_dtype = product_dtype
        self.verbose = verbose
        self._generator = torch.Generator().manual_seed(seed)
        self.token: str | None = None
        self.consumers: dict[str, ConsumerStatistics] = {}
        self._by_id: dict[int, str] = {}
        self._current_id: dict[str, int] = {}
        self._handles: list = []
        self._owners: list[tuple[nn.Module, str, str]] = []
        self._mode: _Interceptor | None = None
        self._paused = False
        self._ready = False
        self._reduced = False

    # -- with-block ----------------------------------------------------------------------------
    def __enter__(self) -> "InputStatistics":
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.stop(failed=exc_type is not None)
        return False

    def start(self) -> "InputStatistics":
        """Begin watching the model's consumer calls (what entering the with-block does)."""
        if self._mode is not None:
            raise PruningIRError("these InputStatistics are already collecting (nested with-blocks)")
        self.ir.check_usable()
        if self.ir.labels_inferred:
            self._setup()  # before any forward, so a masked model's weights are followed from the first call
        self._mode = _Interceptor(self)
        self._install()
        self._mode.__enter__()
        return self

    def stop(self, failed: bool = False) -> None:
        """Stop watching; under torch.distributed, sum the statistics over the ranks."""
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        self._unwatch(mode)
        self._paused = False
        if not failed and world_size() > 1:
            self._setup()
            self._all_reduce()

    def _unwatch(self, mode: "_Interceptor") -> None:
        if not self._paused:
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pause_when_full(self) -> bool:
        """Stop watching, between forward passes, once every consumer seen has ``max_rows`` rows: the
        rest of a long calibration then runs at full speed (stop() still sums over the ranks)."""
        if self._mode is None or self._paused or self.max_rows is None or not self._ready:
            return self._paused
        counts = [s.count for s in self.consumers.values() if s.skipped is None and s.count > 0]
        if counts and min(counts) >= self.max_rows:
            self._unwatch(self._mode)
            self._paused = True
        return self._paused

    active = property(lambda self: self._mode is not None, doc="Whether the statistics are being collected.")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``ir.model(*args, **kwargs)`` (labels are inferred first when needed); returns its output."""
        if self._mode is None:
            raise PruningIRError("InputStatistics run the model only inside their with-block: "
                                 "`with collect_statistics(ir) as stats: stats(inputs)`")
        if not self.ir.labels_inferred:
            self._mode.__exit__(None, None, None)  # the tracer's pass is not a calibration batch
            try:
                self.ir.infer_labels(*args, **kwargs)
            finally:
                self._mode.__enter__()
            self._setup()
        return self.ir.model(*args, **kwargs)

    @torch.no_grad()
    def run(self, loader: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None,
            max_batches: int | None = None) -> "InputStatistics":
        """Collect over ``loader`` in eval mode without gradients (``forward(model, batch)`` runs a
        batch; default: a tensor, the first item of a tuple, a dict of keyword inputs); returns self."""
        from .batchnorm import default_forward
        from .latency import to_device
        from .modes import kept_training_flags
        forward = forward or (lambda model, batch: default_forward(self, batch))
        device = next(self.ir.model.parameters(), torch.empty(0)).device
        batches = iter(loader) if max_batches is None else islice(loader, max_batches)
        with (contextlib.nullcontext() if self.active else self), kept_training_flags(self.ir.model):
            self.ir.model.eval()
            for batch in tqdm(batches, desc="input statistics", disable=not self.verbose, leave=False):
                forward(self.ir.model, to_device(batch, device))
        return self

    # -- setup -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Find the consumer weights from the index (once labels exist) and watch their owners."""
        if self._ready:
            self._install()
            return
        index = self.ir.index
        self.token = index.token
        labels = index.label_mask()
        model = self.ir.model
        modules = dict(model.named_modules())
        parameters = dict(model.named_parameters(remove_duplicate=False))
        wanted = self._wanted_classes(index)
        holders: dict[int, int] = {}
        for tensor in parameters.values():
            holders[id(tensor)] = holders.get(id(tensor), 0) + 1
        for binding in index.parameter_bindings:
            name = binding.target.name
            weight = parameters.get(name, parameters.get(f"{name}_orig"))  # _orig: a masked model's
            if binding.target.dim != 1 or weight is None or name in self.consumers:
                continue
            path, _, attribute = name.rpartition(".")
            owner = modules.get(path)
            if weight.ndim < 2 or isinstance(owner, _NOT_CONSUMERS):
                continue  # dim 1 of their weight is an output dimension, not an input one
            if not labels[binding.classes].any() or len(binding.classes) != weight.shape[1]:
                continue
            kernel = tuple(weight.shape[2:])
            width = int(np.prod(kernel)) if kernel else 1
            stats = ConsumerStatistics(name, weight.shape[1] * width, np.repeat(binding.classes, width), kernel)
            stats.creatable_bias = attribute == "weight" and isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d))
            if isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d)) and attribute == "weight":
                stats.bias = f"{path}.bias" if owner.bias is not None else None
            if name in self.exclude or path in self.exclude:
                stats.skipped = "excluded"
            elif wanted is not None and not wanted[binding.classes].any():
                stats.skipped = "reads none of the groups asked for (groups=)"
            elif weight.ndim > 4:
                stats.skipped = "a 3-D convolution: not supported"
            elif holders[id(weight)] > 1:
                stats.skipped = "the weight is tied to another module's: a refit would change both"
            if not self.second_moments:
                stats.outer_skipped = "second moments turned off: bias compensation only"
            elif stats.features > self.max_features:
                stats.outer_skipped = (f"{stats.features} input features > max_features={self.max_features}: "
                                       "bias compensation only")
            self.consumers[name] = stats
            self._by_id[id(weight)] = name
            self._current_id[name] = id(weight)
            if owner is not None and stats.skipped is None:
                self._owners.append((owner, attribute, name))
        self._cap_second_moments()
        self._parameter_names = {id(p): n for n, p in parameters.items()}
        self._ready = True
        self._install()

    def _cap_second_moments(self) -> None:
        """Within ``max_bytes``, second moments first for the consumers that alone read their channels (an
        MLP's down projection, not the residual stream's many readers: one refit repairs a whole group),
        then for those with the fewest features."""
        if self.max_bytes is None:
            return
        itemsize, used = torch.empty(0, dtype=self.dtype).element_size(), 0
        readers = np.bincount(np.concatenate([np.unique(s.classes) for s in self.consumers.values()] or [[0]]))
        for stats in sorted(self.consumers.values(), key=lambda s: (readers[s.classes].max(), s.features, s.name)):
            if stats.skipped is not None or stats.outer_skipped is not None:
                continue
            cost = stats.features ** 2 * itemsize
            if used + cost > self.max_bytes:
                stats.outer_skipped = (f"the second moments would exceed max_bytes={self.max_bytes} (kept for "
                                       "consumers read alone or with fewer features first): bias compensation only")
            else:
                used += cost

    def second_moment_bytes(self) -> int:
        """Memory the second moments take (or will take, once every consumer was seen)."""
        return sum(s.features ** 2 * torch.empty(0, dtype=self.dtype).element_size() for s in self.consumers.values()
                   if s.skipped is None and s.outer_skipped is None)

    def _wanted_classes(self, index: Any) -> np.ndarray | None:
        """The classes of the groups asked for (``groups=``), as a mask; None when all are."""
        if self.groups is None:
            return None
        known = {group.id: group for group in index.groups}
        if callable(self.groups):
            chosen = [group for group in index.groups if self.groups(group)]
        else:
            unknown = sorted(self.groups - set(known))
            if unknown:
                raise ValueError(f"collect_statistics(groups=...): no group with id {unknown} in this IR "
                                 f"({len(known)} groups: see ir.groups)")
            chosen = [known[i] for i in sorted(self.groups)]
        wanted = np.zeros(index.class_count, dtype=bool)
        for group in chosen:
            wanted[group.classes] = True
        return wanted

    def _install(self) -> None:
        """Watch the consumers' owners while collecting (their pre-hooks follow masked weights)."""
        if self._mode is not None and self._ready and not self._handles:
            self._handles = [owner.register_forward_pre_hook(self._refresher(owner, attribute, name))
                             for owner, attribute, name in self._owners]

    def _refresher(self, owner: nn.Module, attribute: str, name: str) -> Callable:
        """A pre-hook that maps the tensor the owner will pass as the weight (a masked model computes
        it before each forward) to the consumer's name."""
        def hook(module: nn.Module, inputs: tuple) -> None:
            tensor = getattr(owner, attribute, None)
            if isinstance(tensor, torch.Tensor) and id(tensor) != self._current_id.get(name):
                self._by_id.pop(self._current_id.get(name), None)
                self._by_id[id(tensor)] = name
                self._current_id[name] = id(tensor)
        return hook

    # -- accumulation ----------------------------------------------------------------------------
    def _observe(self, kind: str, args: tuple, kwargs: dict) -> None:
        if not self.ir.labels_inferred:
            return  # the tracer's own pass
        if not self._ready:
            self._setup()
        weight = call_argument(args, kwargs, 1, "weight")
        name = self._by_id.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        stats = None if name is None else self.consumers[name]
        if stats is None or stats.skipped is not None or (self.max_rows is not None and stats.count >= self.max_rows):
            return
        x = call_argument(args, kwargs, 0, "input")
        bias = call_argument(args, kwargs, 2, "bias")
        with torch.no_grad():
            if kind == "linear":
                rows = x.detach().reshape(-1, stats.features)
            else:
                groups = call_argument(args, kwargs, 6, "groups", 1)
                if groups != 1:
                    stats.skipped = f"a grouped or depthwise convolution (groups={groups}): not reconstructed"
                    return
                rows = conv_patches(kind, x.detach(), weight, args, kwargs, self.max_positions, self._generator)
            if not stats.creatable_bias and bias is not None:
                stats.bias = self._parameter_names.get(id(bias), stats.bias)
            stats.kinds.add(kind)
            self._accumulate(stats, rows)

    def _accumulate(self, stats: ConsumerStatistics, rows: torch.Tensor) -> None:
        rows = rows.to(self.dtype)
        if stats.total is None:
            stats.total = torch.zeros(stats.features, dtype=self.dtype, device=rows.device)
            if stats.outer_skipped is None:
                stats.outer = torch.zeros(stats.features, stats.features, dtype=self.dtype, device=rows.device)
        stats.count += float(rows.shape[0])
        stats.total += rows.sum(0)
        if stats.outer is not None and self.product_dtype in (None, self.dtype):
            stats.outer.addmm_(rows.T, rows)
        elif stats.outer is not None:  # one call's products in a faster dtype, summed over calls in dtype
            part = rows.to(self.product_dtype)
            stats.outer += (part.T @ part).to(self.dtype)

    def _all_reduce(self) -> None:
        """Sum every consumer's count and sums over the ranks (zeros where a rank saw none)."""
        device = next(self.ir.model.parameters(), torch.empty(0)).device
        for name in sorted(self.consumers):
            stats = self.consumers[name]
            width = stats.features
            total = stats.total if stats.total is not None else torch.zeros(width, dtype=self.dtype, device=device)
            parts = [np.array([stats.count]), total.cpu().numpy().ravel()]
            with_outer = stats.outer_skipped is None
            if with_outer:
                outer = stats.outer if stats.outer is not None else torch.zeros(width, width, dtype=self.dtype)
                parts.append(outer.cpu().numpy().ravel())
            summed = all_reduce_sum(np.concatenate(parts))
            stats.count = float(summed[0])
            stats.total = torch.as_tensor(summed[1:1 + width], dtype=self.dtype, device=total.device)
            if with_outer:
                stats.outer = torch.as_tensor(summed[1 + width:], dtype=self.dtype,
                                              device=total.device).reshape(width, width)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, str]:
        """Consumer weights without statistics, and why."""
        return {name: s.skipped or (_NOT_SEEN if s.count == 0 else "")
                for name, s in self.consumers.items() if s.skipped is not None or s.count == 0}

    def collected(self) -> list[str]:
        """Consumer weights with statistics."""
        return [name for name, s in self.consumers.items() if s.skipped is None and s.count > 0]

    def mean(self, name: str) -> torch.Tensor:
        """``E[x]`` over the input features of consumer weight ``name`` (im2col order for a conv)."""
        return self._collected(name).mean()

    def second_moment(self, name: str) -> torch.Tensor | None:
        """``E[x x^T]`` over those features (None when only means were kept)."""
        return self._collected(name).second_moment()

    def count(self, name: str) -> float:
        """How many rows (tokens, patches) the statistics of ``name`` average over."""
        return self._collected(name).count

    def _collected(self, name: str) -> ConsumerStatistics:
        if self.consumers.get(name) is None or self.consumers[name].total is None:
            raise KeyError(f"no input statistics for '{name}' (collected: {self.collected()})")
        return self.consumers[name]

    def state_dict(self) -> dict[str, Any]:
        """The sums, per consumer weight, as tensors and plain values (``torch.save`` them)."""
        return {"token": self.token, "consumers": {
            name: {"count": s.count, "total": s.total, "outer": s.outer, "skipped": s.skipped,
                   "outer_skipped": s.outer_skipped, "bias": s.bias, "kinds": sorted(s.kinds)}
            for name, s in self.consumers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s sums into statistics of the same IR."""
        self._setup()
        if state["token"] not in (None, self.token):
            raise ValueError("these statistics were collected on another IR's labels")
        for name, values in state["consumers"].items():
            stats = self.consumers[name]
            stats.count, stats.total, stats.outer = values["count"], values["total"], values["outer"]
            stats.skipped, stats.outer_skipped, stats.bias, stats.kinds = (
                values["skipped"], values["outer_skipped"], values["bias"], set(values["kinds"]))

    def __repr__(self) -> str:
        return f"<InputStatistics: {len(self.collected())} consumers collected, {len(self.skipped)} without statistics>"


def collect_statistics(ir: Any, **options: Any) -> InputStatistics:
    """``with collect_statistics(ir) as stats: ...``: the input statistics of ``ir``'s consumers,
    gathered during the forward passes run in the block (see :class:`InputStatistics`)."""
    return InputStatistics(ir, **options)
