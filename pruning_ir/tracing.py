"""Tracing: record one concrete forward pass of a model into a torch.fx graph.

Why a concrete recorder and not ``torch.fx.symbolic_trace`` or ``torch.export``:
symbolic tracing stops at any Python control flow on tensor values or shapes, which
rules out most Hugging Face models (BERT, GPT-2, LLaMA all fail it); ``torch.export``
traces them but specializes every shape to a literal (``view(B, T, -1, D)`` becomes
``view(2, 5, 12, 64)``) and lowers to ATen, losing both the difference between a size
that follows the channels and one hard-coded in ``forward``, and the modules that own
the parameters. Labels are inferred from concrete inputs anyway, so we run the model
once under a ``TorchFunctionMode`` that writes every torch-level call (``F.conv2d``,
``Tensor.view``, ``torch.cat``...) into an ``fx.Graph``: it follows any Python the
model runs, keeps the arguments as written (``-1`` stays ``-1``), and sizes read from
tensors come back as :class:`ShapeInt` so a rule can tell them from literals.
Module forward hooks give each node its module stack and turn leaf modules into
``call_module`` nodes.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import ModelExecutionError, TracingError
from .modes import kept_training_flags
from .recorded_ints import AttributeInt, ShapeInt, attribute_ints, comparisons_to

__all__ = ["AttributeInt", "ShapeInt", "attribute_ints", "Comparison", "LeafModule", "LeafPolicy", "TracedGraph",
           "Recorder", "recording", "trace_model"]


class LeafModule:
    """Marks a module as an atomic unit of the IR (its forward is not recorded).

    ``prunable_input`` / ``prunable_output``: when False, the channels entering /
    leaving the module are never pruned, whatever its rule says.
    """

    def __init__(self, module: nn.Module, prunable_input: bool = True, prunable_output: bool = True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"LeafModule expects an nn.Module, got {type(module).__name__}")
        self.module = module
        self.prunable_input = prunable_input
        self.prunable_output = prunable_output

    def __repr__(self) -> str:
        return (f"LeafModule({type(self.module).__name__}, prunable_input={self.prunable_input}, "
                f"prunable_output={self.prunable_output})")


@dataclass
class LeafPolicy:
    """Which modules are leaves, resolved from the user's ``leaf_modules`` argument.

    Instances are held by reference (never by ``id``), so ``copy.deepcopy`` and pickling of an
    IR carry them to the copied model; ``moved_to`` carries them onto a pruned copy.
    """

    types: tuple[type, ...] = ()
    instances: list[LeafModule] = field(default_factory=list)

    @classmethod
    def from_argument(cls, leaf_modules: Iterable[Any] | None, builtin_types: tuple[type, ...]) -> "LeafPolicy":
        types: list[type] = list(builtin_types)
        instances: list[LeafModule] = []
        for item in leaf_modules or ():
            if isinstance(item, LeafModule):
                instances.append(item)
            elif isinstance(item, type) and issubclass(item, nn.Module):
                types.append(item)
            elif isinstance(item, nn.Module):
                instances.append(LeafModule(item))
            else:
                raise TypeError(
                    "leaf_modules takes nn.Module types, nn.Module instances or PruningIR.LeafModule; "
                    f"got {item!r}")
        return cls(tuple(types), instances)

    def leaf_spec(self, module: nn.Module) -> LeafModule | None:
        for spec in self.instances:
            if spec.module is module:
                return spec
        if isinstance(module, self.types):
            return LeafModule(module)
        return None

    def moved_to(self, old_model: nn.Module, new_model: nn.Module) -> "LeafPolicy":
        """The same policy for ``new_model``, a copy of ``old_model``: each leaf instance is
        replaced by the module at the same path in the copy."""
        if not self.instances or new_model is old_model:
            return self
        paths = {id(module): path for path, module in old_model.named_modules(remove_duplicate=False)}
        moved = []
        for spec in self.instances:
            path = paths.get(id(spec.module))
            module = spec.module if path is None else new_model.get_submodule(path)
            moved.append(LeafModule(module, spec.prunable_input, spec.prunable_output))
        return LeafPolicy(self.types, moved)


@dataclass
class Comparison:
    """The model's Python compared a recorded size with a number (``if x.shape[1] >= 8:``) in module
    ``module_path`` ("" for the model's own forward): control flow that may flip after pruning."""

    symbol: str
    size: ShapeInt
    other: Any
    module_path: str


@dataclass
class TracedGraph:
    """Recorded forward passes: the graph and what the channel analysis needs beside it
    (``paths``: how many example inputs were recorded into it, see ``recorded_paths``)."""

    graph: fx.Graph
    input_nodes: list[fx.Node]
    output_nodes: list[fx.Node]
    leaf_specs: dict[str, LeafModule]
    comparisons: list[Comparison] = field(default_factory=list)
    paths: int = 1


_METADATA_GETTERS = {"dtype", "device", "requires_grad", "is_cuda", "ndim", "is_leaf", "grad_fn",
                     "layout", "is_sparse", "is_quantized", "is_meta", "names", "itemsize", "nbytes",
                     "is_nested", "grad", "_version", "output_nr", "_base", "is_mps", "is_xpu"}
_TENSOR_GETTERS = {"T", "mT", "H", "mH", "data", "real", "imag"}
_UNRECORDED = {"dim", "numel", "stride", "is_contiguous", "element_size", "nelement", "storage_offset",
               "get_device", "__len__", "__format__", "__repr__", "__hash__", "is_floating_point",
               "is_complex", "_is_view", "__reduce_ex__", "__deepcopy__", "_set_grad_enabled"}
# Calls through which values leave torch: recorded, so that their rule pins the channels
# (a tensor rebuilt from them later cannot be traced back to its channels).
ESCAPES = {"numpy", "__array__", "tolist", "item", "__iter__", "__bool__", "__index__", "__int__",
           "__float__", "data_ptr", "untyped_storage"}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(item) for item in value)
    return isinstance(value, dict) and any(_has_tensor(item) for item in value.values())


class Recorder(TorchFunctionMode):
    """Writes each torch-level call of one forward pass into an fx graph.

    Subclasses (the loss-aware criterion's site finder) may extend ``bind_tensor``,
    ``bind_outputs`` and ``__torch_function__``; ``pre_hook``/``post_hook`` are the module
    hooks :func:`recording` installs.
    """

    def __init__(self, model: nn.Module, leaf_policy: LeafPolicy, strict: bool):
        super().__init__()
        self.graph = fx.Graph()
        self.strict = strict
        self.leaf_policy = leaf_policy
        self.parameter_names = {id(p): name for name, p in model.named_parameters()}
        self.buffer_names = {id(b): name for name, b in model.named_buffers()}
        self.module_paths = {id(m): name for name, m in model.named_modules()}
        self.attribute_nodes: dict[str, fx.Node] = {}
        self.tensor_nodes: dict[int, tuple[weakref.ref, fx.Node]] = {}
        self.module_stack: list[str] = []
        self.leaf_depth = 0
        self.leaf_inputs: list[tuple[tuple, dict]] = []
        self.leaf_specs: dict[str, LeafModule] = {}
        self.comparisons: list[Comparison] = []
        self.calling = 0  # inside a torch call: its own size checks are not the model's control flow

    def compared(self, symbol: str, size: ShapeInt, other: Any) -> None:
        """A ShapeInt was compared by the model's Python (see ``recorded_ints.comparisons_to``)."""
        if not self.calling and not self.leaf_depth:
            where = self.module_stack[-1] if self.module_stack else ""
            self.comparisons.append(Comparison(symbol, size, other, where))

    # -- tensors <-> nodes -------------------------------------------------------------
    def bind_tensor(self, tensor: torch.Tensor, node: fx.Node) -> None:
        node.meta["shape"] = tuple(tensor.shape)
        node.meta["dtype"] = tensor.dtype
        self.tensor_nodes[id(tensor)] = (weakref.ref(tensor), node)

    def node_of(self, tensor: torch.Tensor) -> fx.Node:
        name = self.parameter_names.get(id(tensor)) or self.buffer_names.get(id(tensor))
        if name is not None:
            node = self.attribute_nodes.get(name)
            if node is None:
                node = self.graph.get_attr(name)
                node.meta.update(shape=tuple(tensor.shape), dtype=tensor.dtype, module_stack=())
                self.attribute_nodes[name] = node
            return node
        entry = self.tensor_nodes.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        where = self.module_stack[-1] if self.module_stack else "<model>"
        if self.strict:
            raise TracingError(
                f"in submodule '{where}': a tensor of shape {tuple(tensor.shape)} enters an op without "
                "coming from the inputs, a parameter, a buffer or a recorded op (built outside torch?). "
                "Use soft_tracing=True to treat it as a constant, or make the submodule a leaf.")
        node = self.graph.call_function(torch.Tensor.clone, (tensor.detach().clone(),))
        node.meta.update(external=True, module_stack=tuple(self.module_stack))
        self.bind_tensor(tensor, node)
        return node

    def map_arguments(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node_of(value)
        if isinstance(value, torch.Size):
            return tuple(value)
        if isinstance(value, (list, tuple)):
            mapped = [self.map_arguments(v) for v in value]
            return type(value)(mapped) if type(value) in (list, tuple) else tuple(mapped)
        if isinstance(value, dict):
            return {k: self.map_arguments(v) for k, v in value.items()}
        return value

    def bind_outputs(self, result: Any, node: fx.Node) -> None:
        node.meta["module_stack"] = tuple(self.module_stack)
        if isinstance(result, torch.Tensor):
            self.bind_tensor(result, node)
            return
        node.meta["shape"] = None
        if isinstance(result, (list, tuple)):
            for index, item in enumerate(result):
                if isinstance(item, torch.Tensor):
                    item_node = self.graph.call_function(operator.getitem, (node, index))
                    item_node.meta["module_stack"] = tuple(self.module_stack)
                    self.bind_tensor(item, item_node)

    # -- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            return self.property_access(func, args)
        self.calling += 1
        try:
            result = func(*args, **kwargs)
        finally:
            self.calling -= 1
        if self.leaf_depth:
            return result
        if name == "size":
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return self.shape_ints(result, args[0] if args else None, dim)
        if name in ESCAPES:
            self.record(func, args, kwargs, None)
        elif name == "__setitem__":
            self.record(func, args, kwargs, args[0])
        elif name not in _UNRECORDED and _has_tensor(result):
            self.record(func, args, kwargs, result)
        return result

    def property_access(self, getter, args):
        attribute = getter.__self__.__name__
        result = getter(*args)
        if self.leaf_depth or attribute in _METADATA_GETTERS:
            return result
        if attribute == "shape":
            return self.shape_ints(result, args[0] if args else None)
        if attribute in _TENSOR_GETTERS and isinstance(result, torch.Tensor):
            node = self.graph.call_function(getattr, (self.node_of(args[0]), attribute))
            self.bind_outputs(result, node)
        return result

    def shape_ints(self, result, tensor=None, dim=None):
        """Sizes as :class:`ShapeInt`, each remembering the tensor dimension it was read from."""
        name = self._known_node_name(tensor) if isinstance(tensor, torch.Tensor) else None
        if isinstance(result, torch.Size):
            return torch.Size(ShapeInt(s, None if name is None else (name, d)) for d, s in enumerate(result))
        if isinstance(result, int):
            known = name is not None and isinstance(dim, int) and tensor.dim() > 0
            return ShapeInt(result, (name, dim % tensor.dim()) if known else None)
        return result

    def _known_node_name(self, tensor) -> str | None:
        """The name of the node already recorded for ``tensor`` (None: not recorded; no node is made)."""
        name = self.parameter_names.get(id(tensor)) or self.buffer_names.get(id(tensor))
        entry = self.tensor_nodes.get(id(tensor), (lambda: None, None)) if name is None else (None, None)
        node = self.attribute_nodes.get(name) if name is not None else entry[1] if entry[0]() is tensor else None
        return None if node is None else node.name

    def record(self, func, args, kwargs, result) -> None:
        node_args = self.map_arguments(tuple(args))
        node_kwargs = self.map_arguments(dict(kwargs))
        qualname = getattr(func, "__qualname__", "")
        if qualname.startswith(("TensorBase.", "Tensor.")) and node_args and isinstance(node_args[0], fx.Node):
            node = self.graph.call_method(func.__name__, node_args, node_kwargs)
        else:
            node = self.graph.call_function(func, node_args, node_kwargs)
        self.bind_outputs(result, node)

    # -- module hooks ------------------------------------------------------------------
    def pre_hook(self, module, args):
        """Global forward pre-hook: every module call in the process; ours keep the stack."""
        path = self.module_paths.get(id(module))
        if path is None:
            return None
        if self.leaf_depth:
            self.leaf_depth += 1
            return None
        self.module_stack.append(path)
        return None

    def leaf_pre_hook(self, module, args, kwargs):
        """Registered on leaf modules only (it needs kwargs); runs right after ``pre_hook``."""
        if self.leaf_depth:
            return None
        path = self.module_stack[-1]
        self.leaf_specs[path] = self.leaf_policy.leaf_spec(module)
        self.leaf_inputs.append((self.map_arguments(tuple(args)), self.map_arguments(dict(kwargs))))
        self.leaf_depth = 1
        return None

    def post_hook(self, module, args, output):
        """Global forward hook (always called, also when forward raises)."""
        if id(module) not in self.module_paths:
            return None
        if self.leaf_depth > 1:
            self.leaf_depth -= 1
            return None
        path = self.module_stack.pop() if self.module_stack else "?"
        if self.leaf_depth == 1:
            self.leaf_depth = 0
            node_args, node_kwargs = self.leaf_inputs.pop()
            node = self.graph.call_module(path, node_args, node_kwargs)
            self.module_stack.append(path)
            self.bind_outputs(output, node)
            self.module_stack.pop()
        return None


@contextlib.contextmanager
def recording(model: nn.Module, recorder: "Recorder", args: tuple, kwargs: dict):
    """Install ``recorder`` on ``model`` (input placeholders, module hooks, the mode) for one call.

    The model's train/eval and grad modes are the caller's: the tracer wraps this in eval
    mode and ``no_grad``; a criterion records the user's own training step as it runs.
    """
    flat_inputs, _ = pytree.tree_flatten((args, kwargs))
    for index, value in enumerate(flat_inputs):
        if isinstance(value, torch.Tensor):
            node = recorder.graph.placeholder(f"input_{index}")
            node.meta["module_stack"] = ()
            recorder.bind_tensor(value, node)
    handles = []
    try:
        # Two global hooks instead of two per module: registering hooks costs more than the call.
        handles.append(nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook))
        # no with_kwargs: torch never forgets a global with_kwargs hook's id after removal, and
        # torch.compile then warns about global hooks for the rest of the process
        handles.append(nn.modules.module.register_module_forward_hook(recorder.post_hook, always_call=True))
        for module in model.modules():
            if module is not model and recorder.leaf_policy.leaf_spec(module) is not None:
                handles.append(module.register_forward_pre_hook(recorder.leaf_pre_hook, with_kwargs=True))
        with recorder, comparisons_to(recorder.compared):
            yield recorder
    finally:
        for handle in handles:
            handle.remove()


def trace_model(model: nn.Module, args: tuple, kwargs: dict, leaf_policy: LeafPolicy,
                strict: bool = False) -> tuple[TracedGraph, Any]:
    """Run ``model(*args, **kwargs)`` once and record it; returns the graph and the output.

    The model runs in eval mode under ``torch.no_grad()`` (so batch-norm statistics are
    not updated); the train/eval flag of every submodule is restored afterwards.
    """
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise TracingError(f"{type(model).__name__} has lazy parameters not yet materialised ({', '.join(lazy[:3])}"
                           f"{', ...' if len(lazy) > 3 else ''}): run the model once on an example input first "
                           "(torch gives nn.LazyLinear and the other lazy modules their sizes on the first call)")
    recorder = Recorder(model, leaf_policy, strict)
    with kept_training_flags(model):
        model.eval()
        with torch.no_grad(), attribute_ints(model), recording(model, recorder, args, kwargs):
            try:
                output = model(*args, **kwargs)
            except TracingError:
                raise
            except Exception as error:
                where = recorder.module_stack[-1] if recorder.module_stack else "<model>"
                shapes = [tuple(t.shape) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                raise ModelExecutionError(
                    f"{type(model).__name__} failed on the example inputs (tensor shapes {shapes}) "
                    f"in submodule '{where}': {type(error).__name__}: {error}") from error
    input_nodes = list(recorder.graph.find_nodes(op="placeholder"))
    output_nodes = [recorder.node_of(t) for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    recorder.graph.output(tuple(output_nodes))
    return TracedGraph(recorder.graph, input_nodes, output_nodes, recorder.leaf_specs, recorder.comparisons), output
