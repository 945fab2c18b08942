"""The checks ``load_pruned`` runs before it changes a model: configuration, weights, consistency.

A saved folder is data from anywhere, so nothing in it is trusted: ``plan_configuration``
turns the JSON configuration into a ``LoadPlan`` (new tensor shapes, new attribute
values) and refuses anything pruning could not have written (growing a tensor, a
non-size attribute, a method name, a bool) and every created parameter but a bias on a
Linear or convolution built without one; ``check_weights`` then requires the weights to be
exactly the state dict the planned model has. Every refusal is a
``PrunedModelFormatError`` naming the module, the tensor or attribute, and why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, NoReturn

import torch
from torch import nn

from .channel_rules.registry import HEAD_COUNT_ATTRIBUTES, SIZE_ATTRIBUTES
from .errors import PrunedModelFormatError
from .pruning import tensor_holders

FORMAT = "pruning_ir.pruned_model"
FORMAT_VERSION = 2   # the newest version read; 2 adds created_parameters, files without any are written as 1
FIRST_VERSION = 1
MAX_DIMENSION = 2 ** 31
ENTRY_KEYS = {"type", "parameters", "buffers", "attributes"}
CREATED_KEYS = {"module", "name", "shape"}

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FEATURE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
LAYER_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# The attributes pruning_ir's channel rules rewrite on torch.nn modules (channel_rules/*.py).
KNOWN_SIZE_ATTRIBUTES: tuple[tuple[tuple[type, ...], tuple[str, ...]], ...] = (
    (CONVOLUTIONS, ("in_channels", "out_channels", "groups")),
    ((nn.Linear,), ("in_features", "out_features")),
    (FEATURE_NORMS, ("num_features",)),
    ((nn.GroupNorm,), ("num_channels", "num_groups")),
    (LAYER_NORMS, ("normalized_shape",)),
    ((nn.Embedding, nn.EmbeddingBag), ("embedding_dim",)),
    ((nn.MultiheadAttention,), ("embed_dim", "kdim", "vdim", "num_heads", "head_dim")),
    ((nn.PReLU,), ("num_parameters",)),
    ((nn.RNNBase,), ("input_size",)),
)
# On user modules: the sizes forward() reads (registry.SIZE_ATTRIBUTES, rewritten under any enclosing
# module), and those the layer rules bind on a module owning a functional op's weight (layers.bind_sizes).
USER_SIZE_ATTRIBUTES = frozenset(SIZE_ATTRIBUTES) | frozenset(HEAD_COUNT_ATTRIBUTES) | {
    "in_channels", "out_channels", "in_features", "out_features", "embedding_dim", "num_parameters", "groups",
    "num_groups", "num_channels"}


def is_size(value: Any) -> bool:
    """An int (never a bool), or a non-empty tuple/list of them: what a size attribute holds."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(is_size(item) for item in value)


def like(template: Any, value: Any) -> Any:
    """``value`` from JSON, with the tuple/list structure of ``template`` (the fresh model's attribute)."""
    if isinstance(template, (tuple, list)) and isinstance(value, list) and len(template) == len(value):
        return type(template)(like(old, new) for old, new in zip(template, value))
    return tuple(like(None, item) for item in value) if isinstance(value, list) else value


def model_class(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


@dataclass
class LoadPlan:
    """What loading writes: every configured tensor's shape (by identity) and the attributes that change."""

    shapes: dict[int, list[int]] = field(default_factory=dict)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    attributes: dict[tuple[int, str], tuple[nn.Module, str, Any]] = field(default_factory=dict)
    created: dict[str, tuple[nn.Module, str, list[int]]] = field(default_factory=dict)  # by state-dict key

    def shape(self, tensor: torch.Tensor) -> list[int]:
        return self.shapes.get(id(tensor), list(tensor.shape))

    def resized(self) -> dict[int, list[int]]:
        return {key: shape for key, shape in self.shapes.items() if shape != list(self.tensors[key].shape)}

    def value(self, module: nn.Module, name: str) -> Any:
        planned = self.attributes.get((id(module), name))
        return planned[2] if planned is not None else getattr(module, name, None)


def allowed_attributes(module: nn.Module) -> frozenset[str] | None:
    """The size attributes loading may change on ``module``: those pruning_ir rewrites there.

    None for a transformers module: any integer size attribute may shrink there, as pruning
    aligns them all with the model the pruned config builds (GPT-2's ``Conv1D.nx``).
    """
    origin = type(module).__module__
    if origin.startswith("transformers"):
        return None
    allowed = set() if origin.startswith("torch.") else set(USER_SIZE_ATTRIBUTES)
    for types, names in KNOWN_SIZE_ATTRIBUTES:
        if isinstance(module, types):
            allowed.update(names)
    return frozenset(allowed)


def _fail(message: str) -> NoReturn:
    raise PrunedModelFormatError(message)


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a tampered file may hold a huge value."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_header(config: Any, where: str) -> None:
    """The configuration is a pruning_ir configuration of the version this code reads."""
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("modules"), dict):
        _fail(f"{where} is not a pruning_ir configuration")
    version = config.get("version")
    if type(version) is not int:
        _fail(f"{where} has no valid format version (got {version!r}, expected {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        _fail(f"{where} has format version {version}; this pruning_ir reads up to {FORMAT_VERSION}: "
              f"upgrade pruning_ir")
    if version < FIRST_VERSION:
        _fail(f"{where} has the unknown format version {version} (this pruning_ir reads {FIRST_VERSION} to "
              f"{FORMAT_VERSION})")


def _checked_shape(shape: Any, tensor: torch.Tensor, what: str) -> list[int]:
    """``shape`` if a pruned ``tensor`` can have it: same rank, every dimension a positive int no larger."""
    def refuse(why: str) -> NoReturn:
        _fail(f"{what} has shape {_short(shape)} in the configuration: {why}")
    if not isinstance(shape, list):
        refuse("a shape is a list of ints")
    if len(shape) != tensor.dim():
        refuse(f"rank {len(shape)}, but the model's tensor has rank {tensor.dim()} {list(tensor.shape)}")
    for dim, (size, current) in enumerate(zip(shape, tensor.shape)):
        if type(size) is not int:
            refuse(f"dimension {dim} is {_short(size)}, not an int")
        if size == current:
            continue
        if size < 1:
            refuse(f"dimension {dim} is {size}, not positive")
        if size > MAX_DIMENSION:
            refuse(f"dimension {dim} is {size}, over 2**31")
        if size > current:
            refuse(f"dimension {dim} is {size}, larger than the model's {current}: pruning only shrinks, so "
                   f"the model must be built as the unpruned original was (same class, same arguments)")
    return list(shape)


def _checked_attribute(module: nn.Module, path: str, name: Any, value: Any, pruned: bool) -> tuple[bool, Any]:
    """(changes, new value) for ``module.<name> = value``, or a PrunedModelFormatError saying why not.
    On a user module pruning rewrites any int attribute forward() reads as a size (a split size such
    as Res2Net's ``width``, a head count named ``nh``, FasterNet's ``dim_untouched``): one outside the
    known names may shrink where the configuration prunes the model (``pruned``: it resizes a tensor)."""
    label = f"{path}.{name}" if path else _short(name)

    def refuse(why: str) -> NoReturn:
        _fail(f"the configuration sets {label} = {_short(value)} on a {type(module).__qualname__}: {why}")
    if not isinstance(name, str) or name.startswith("_"):
        refuse("a private attribute is never a size")
    missing = object()
    current = getattr(module, name, missing)
    if (current is missing or current is None) and is_size(value):
        return False, None   # state forward writes (Funnel's seq_len, pooling_mult), not a size: left as built
    if current is missing:
        refuse("the module has no such attribute")
    if not is_size(current):
        kind = "method" if isinstance(current, MethodType) else type(current).__name__
        refuse(f"{label} is not an integer size attribute (it is a {kind})")
    if not is_size(value):
        refuse("a size is a positive int (a list of them for normalized_shape)")
    new = like(current, value)
    if new == current:
        return False, current
    allowed = allowed_attributes(module)
    follows_pruning = pruned and type(current) is int and not type(module).__module__.startswith("torch.")
    if allowed is not None and name not in allowed and not follows_pruning:
        refuse(f"pruning_ir never changes {name} on a {type(module).__qualname__} "
               f"(it changes only {sorted(allowed)})")
    olds, news = (current, new) if isinstance(current, (tuple, list)) else ((current,), (new,))
    if isinstance(current, (tuple, list)) != isinstance(new, (tuple, list)) or len(olds) != len(news) \
            or not all(type(item) is int for item in news):
        refuse(f"it must have the structure of the current value {current!r}")
    for old, size in zip(olds, news):
        if size < 1:
            refuse("a size must be positive")
        if size > old:
            refuse(f"{size} is larger than the current value {old}: pruning only shrinks, so the model "
                   f"must be built as the unpruned original was")
    return True, new


def plan_configuration(model: nn.Module, config: Any, where: str = "the configuration") -> LoadPlan:
    """Check ``config`` against ``model`` (changing nothing) and return what loading would write."""
    check_header(config, where)
    if config.get("model_class") != model_class(model):
        _fail(f"the configuration was saved from {_short(config.get('model_class'))}, but the model is "
              f"{model_class(model)}")
    modules = dict(model.named_modules())
    saved = config["modules"]
    unknown, absent = sorted(set(saved) - set(modules)), sorted(set(modules) - set(saved))
    if unknown or absent:
        _fail(f"the model's modules differ from the saved ones: unexpected {_short(unknown[:5])} (not in the model), "
              f"missing {absent[:5]} (was it built with the same arguments?)")
    plan, first_at, pending = LoadPlan(), {}, []
    created = _planned_creations(config.get("created_parameters", []), modules)
    for path, entry in saved.items():
        module, name_of = modules[path], path or "<model>"
        if not isinstance(entry, dict) or not set(entry) <= ENTRY_KEYS:
            _fail(f"module {name_of}: the configuration entry must be an object with keys {sorted(ENTRY_KEYS)}")
        if entry.get("type") != type(module).__qualname__:
            _fail(f"module {name_of} is {type(module).__qualname__} here but {_short(entry.get('type'))} in the saved "
                  f"configuration")
        for kind, store in (("parameters", module._parameters), ("buffers", module._buffers)):
            shapes, new = entry.get(kind, {}), created.get(path, {}) if kind == "parameters" else {}
            present = {name for name, tensor in store.items() if tensor is not None} | set(new)
            if not isinstance(shapes, dict) or set(shapes) != present:
                _fail(f"module {name_of} has {kind} {sorted(present)} here but "
                      f"{sorted(shapes) if isinstance(shapes, dict) else _short(shapes)} in the saved configuration"
                      f"{_created_hint(module, shapes, present)}")
            for name, shape in shapes.items():
                label = f"{path}.{name}" if path else name
                if name in new:
                    if shape != new[name]:
                        _fail(f"{label} is created with shape {new[name]}, but module {name_of} gives it "
                              f"{_short(shape)}")
                    plan.created[label] = (module, name, new[name])
                    continue
                tensor = store[name]
                checked = _checked_shape(shape, tensor, f"module {name_of}: {kind[:-1]} {name}")
                if plan.shapes.setdefault(id(tensor), checked) != checked:
                    _fail(f"{label} is tied to {first_at[id(tensor)]} (one tensor), but the configuration gives "
                          f"{label} the shape {checked} and {first_at[id(tensor)]} {plan.shapes[id(tensor)]}")
                plan.tensors[id(tensor)] = tensor
                first_at.setdefault(id(tensor), label)
        attributes = entry.get("attributes", {})
        if not isinstance(attributes, dict):
            _fail(f"module {name_of}: attributes must be an object, got {_short(attributes)}")
        pending.append((module, path, attributes))
    pruned = bool(plan.resized())
    for module, path, attributes in pending:   # after every shape: whether the configuration prunes at all
        for name, value in attributes.items():
            changes, new = _checked_attribute(module, path, name, value, pruned)
            if changes:
                plan.attributes[(id(module), name)] = (module, name, new)
    check_consistency(model, plan)
    return plan


CREATES_BIAS = (nn.Linear,) + CONVOLUTIONS  # the layers prune(reconstruct=...) may give a bias


def _planned_creations(entries: Any, modules: dict[str, nn.Module]) -> dict[str, dict[str, list[int]]]:
    """The parameters the configuration creates, by module path: only what prune(reconstruct=...)
    creates, a bias of shape [n] on a Linear or convolution the model built without one, once."""
    if not isinstance(entries, list):
        _fail(f"created_parameters must be a list, got {_short(entries)}")
    created: dict[str, dict[str, list[int]]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != CREATED_KEYS:
            _fail(f"created_parameters: each entry is an object with keys {sorted(CREATED_KEYS)}, got {_short(entry)}")
        path, name, shape = entry["module"], entry["name"], entry["shape"]
        module = modules.get(path) if isinstance(path, str) else None
        if module is None:
            _fail(f"created_parameters names the module {_short(path)}, which the model does not have")
        where = f"module {path or '<model>'} ({type(module).__qualname__})"
        if not isinstance(module, CREATES_BIAS):
            _fail(f"created_parameters creates {_short(name)} on {where}: pruning creates a parameter only on a "
                  f"Linear or a convolution")
        if name != "bias":
            _fail(f"created_parameters creates {_short(name)} on {where}: pruning only ever creates a bias")
        if module._parameters.get("bias") is not None or "bias" in module._buffers or "bias" in vars(module):
            _fail(f"created_parameters creates a bias on {where}, which already has one: only a bias the model "
                  f"was built without is created (was it built with the same arguments?)")
        if "bias" not in module._parameters:
            _fail(f"created_parameters creates a bias on {where}, which has no place for one (bias=None)")
        if name in created.get(path, {}):
            _fail(f"created_parameters creates the bias of {where} twice")
        if not isinstance(shape, list) or len(shape) != 1 or type(shape[0]) is not int \
                or not 1 <= shape[0] <= MAX_DIMENSION:
            _fail(f"created_parameters gives the bias of {where} the shape {_short(shape)}: a bias has the shape "
                  f"[out channels]")
        created.setdefault(path, {})[name] = shape
    return created


def _created_hint(module: nn.Module, shapes: Any, present: set[str]) -> str:
    """Why a saved bias may be missing from the model: prune(reconstruct=...) created it, unrecorded."""
    if isinstance(module, CREATES_BIAS) and isinstance(shapes, dict) and set(shapes) - present == {"bias"}:
        return (" (a bias created by prune(reconstruct=...) is rebuilt only when the file records it: save the IR "
                "that prune() returned, save_pruned(ir, path), not its model)")
    return ""


def _expected_shapes(module: nn.Module, value: Callable[[str], Any]) -> tuple[tuple[str, ...], dict]:
    """The attributes a known module's tensor shapes follow from, and those shapes (a string instead: the
    attributes disagree among themselves); nothing for a module of another kind."""
    if isinstance(module, CONVOLUTIONS):
        inputs, outputs, groups = value("in_channels"), value("out_channels"), value("groups")
        if inputs % groups or outputs % groups:
            return ("in_channels", "out_channels", "groups"), {"groups": "a divisor of in_channels and out_channels"}
        first = [inputs, outputs // groups] if module.transposed else [outputs, inputs // groups]
        return ("in_channels", "out_channels", "groups", "kernel_size"), {
            "weight": first + list(value("kernel_size")), "bias": [outputs]}
    if isinstance(module, nn.Linear):
        return ("in_features", "out_features"), {"weight": [value("out_features"), value("in_features")],
                                                 "bias": [value("out_features")]}
    if isinstance(module, FEATURE_NORMS):
        return ("num_features",), {name: [value("num_features")]
                                   for name in ("weight", "bias", "running_mean", "running_var")}
    if isinstance(module, nn.GroupNorm):
        channels, groups = value("num_channels"), value("num_groups")
        if channels % groups:
            return ("num_channels", "num_groups"), {"num_groups": "a divisor of num_channels"}
        return ("num_channels",), {"weight": [channels], "bias": [channels]}
    if isinstance(module, LAYER_NORMS):
        shape = list(value("normalized_shape"))
        return ("normalized_shape",), {"weight": shape, "bias": shape}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return ("num_embeddings", "embedding_dim"), {"weight": [value("num_embeddings"), value("embedding_dim")]}
    if isinstance(module, nn.PReLU):
        return ("num_parameters",), {"weight": [value("num_parameters")]}
    if isinstance(module, nn.MultiheadAttention):
        width, kdim, vdim = value("embed_dim"), value("kdim"), value("vdim")
        names = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim")
        if value("num_heads") * value("head_dim") != width:
            return names, {"embed_dim": "num_heads * head_dim"}
        if getattr(module, "_qkv_same_embed_dim", False) and not kdim == vdim == width:
            return names, {"kdim": "embed_dim, like vdim (one fused in_proj_weight)"}
        return names, {"in_proj_weight": [3 * width, width], "in_proj_bias": [3 * width],
                       "q_proj_weight": [width, width], "k_proj_weight": [width, kdim],
                       "v_proj_weight": [width, vdim], "bias_k": [1, 1, width], "bias_v": [1, 1, width]}
    return (), {}


def check_consistency(model: nn.Module, plan: LoadPlan) -> None:
    """Every known module the plan changes keeps its tensor shapes and size attributes in agreement."""
    touched = {id(module): module for module, _, _ in [*plan.attributes.values(), *plan.created.values()]}
    holders = tensor_holders(model)
    for key in plan.resized():
        touched.update({id(holder): holder for holder, _, _ in holders[key]})
    paths = {id(module): path for path, module in model.named_modules()}
    for key, module in touched.items():
        # a tied tensor counts for its first holder only: pruning updates that module's sizes, and may
        # leave those of a module that borrows it (a tied output Linear's in_features) as they were
        tensors = {name: tensor for name, tensor in {**module._parameters, **module._buffers}.items()
                   if tensor is not None and holders[id(tensor)][0][0] is module}
        if any(nn.parameter.is_lazy(tensor) for tensor in tensors.values()):
            continue
        where = paths.get(key) or "<model>"
        try:
            names, expected = _expected_shapes(module, lambda name: plan.value(module, name))
        except (TypeError, ValueError, ZeroDivisionError) as error:
            _fail(f"module {where} ({type(module).__qualname__}): its size attributes do not compute ({error})")
        given = ", ".join(f"{name}={plan.value(module, name)!r}" for name in names)
        created = {name: shape for holder, name, shape in plan.created.values() if holder is module}
        for name, want in expected.items():
            if isinstance(want, str):
                _fail(f"module {where} ({type(module).__qualname__}): {name} must be {want}, but {given}")
            shape = plan.shape(tensors[name]) if name in tensors else created.get(name)
            if shape is not None and shape != want:
                _fail(f"module {where} ({type(module).__qualname__}) is inconsistent after loading: {name} would "
                      f"have shape {shape}, but {given} make it {want}")
        if isinstance(module, nn.RNNBase):
            for name in ("weight_ih_l0", "weight_ih_l0_reverse"):
                if tensors.get(name) is not None and plan.shape(tensors[name])[1] != plan.value(module, "input_size"):
                    _fail(f"module {where} ({type(module).__qualname__}) is inconsistent after loading: {name} "
                          f"would have shape {plan.shape(tensors[name])}, but input_size="
                          f"{plan.value(module, 'input_size')}")


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers the state dict leaves out (ALiBi slopes, a sinusoidal table): a fresh model rebuilds them at
    full width, so a saved pruned model holds their values too."""
    return {f"{path}.{name}" if path else name: module._buffers[name] for path, module in model.named_modules()
            for name in sorted(module._non_persistent_buffers_set) if module._buffers.get(name) is not None}


def check_weights(model: nn.Module, plan: LoadPlan, state: Any, tied_may_be_missing: bool = False) -> dict[str, Any]:
    """Require ``state`` to be exactly the planned model's state dict (with the created parameters): same
    keys, planned shapes, and floating values where the model's are floating. Returns it with tied aliases filled in when
    ``tied_may_be_missing`` (safetensors stores a tied tensor once)."""
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        _fail(f"the weights are not a state dict (a mapping of names to tensors): got {type(state).__name__}")
    expected = model.state_dict(keep_vars=True)   # and the non-persistent buffers saved (files from 0.1 have none)
    expected.update({key: value for key, value in non_persistent_buffers(model).items() if key in state})
    present = {id(value): key for key, value in expected.items() if key in state}
    state = dict(state)
    if tied_may_be_missing:
        for key, value in expected.items():
            if key not in state and id(value) in present and isinstance(value, torch.Tensor):
                state[key] = state[present[id(value)]]
    shapes = {key: plan.shape(value) for key, value in expected.items() if isinstance(value, torch.Tensor)}
    for key, (module, _, shape) in plan.created.items():  # a created bias: typed like its layer's weight
        expected[key], shapes[key] = module.weight, shape
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        _fail(f"the weights do not match the model: missing {missing[:10]}"
              f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
              f"{f' and {len(extra) - 10} more' if len(extra) > 10 else ''}")
    for key, current in expected.items():
        if not isinstance(current, torch.Tensor):
            continue
        loaded = state[key]
        if not isinstance(loaded, torch.Tensor):
            _fail(f"the weights hold a {type(loaded).__name__} for {key}, not a tensor")
        if list(loaded.shape) != shapes[key]:
            _fail(f"the weights do not match the configuration: {key} has shape {list(loaded.shape)} in the "
                  f"weights, {shapes[key]} expected")
        if (loaded.is_floating_point(), loaded.is_complex()) != (current.is_floating_point(), current.is_complex()):
            kind = "floating point" if current.is_floating_point() else "not floating point"
            _fail(f"the weights hold {key} as {loaded.dtype}, but the model's {key} is {kind} ({current.dtype})")
    covered = {id(value) for value in expected.values()}
    uncovered = [key for key in plan.resized() if key not in covered]
    if uncovered:
        labels = {id(t): f"{path}.{name}" if path else name for path, module in model.named_modules()
                  for name, t in {**module._parameters, **module._buffers}.items() if t is not None}
        _fail(f"the configuration resizes {sorted(labels[key] for key in uncovered)[:5]}, which the weights do "
              f"not hold (non-persistent buffers, saved by an older pruning_ir): their values could not be restored")
    return state
