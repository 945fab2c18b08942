"""Hypothesis strategy for random small DAG CNNs.

``random_architectures()`` draws an :class:`ArchSpec` (a short straight-line program over named
tensors) and builds it into a :class:`RandomNet` that runs on a 2x3x8x8 input. Ops:

* ``conv``  - Conv(k in {1, 3}, stride 1/2, dense / grouped / depthwise) -> BN -> activation
* ``add``   - residual add of two tensors with the same shape
* ``cat``   - ``torch.cat`` of two tensors along channels
* ``split`` - ``torch.split`` / ``Tensor.chunk`` / ``x[:, :k]`` along channels (balanced or not),
  keeping one or both parts
* ``self``  - one conv applied to its own output (``conv(conv(x))``, the same module twice)
* ``attn``  - hand-written multi-head attention over the pixels as tokens, in every head layout of
  ``reference_patterns.HandAttention``, back to an image with sizes read from the input
* ``mix``   - token mixing through transposes: a Linear over the pixel positions
* ``branch``- Python steered by a channel count: ``conv(x) if x.shape[1] >= k else x``

Every tensor that no later op consumes (a leaf) feeds the head: pool (or not) -> flatten ->
concatenate -> ``nn.Linear``, so no op is dead code. The spec's ``repr`` is the program itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

try:  # tests/ is on sys.path
    from reference_patterns import ATTENTION_LAYOUTS, HandAttention
    from zoo import ConvBNAct, image_input, seeded_build
except ImportError:  # imported as ``tests.random_arch``
    from .reference_patterns import ATTENTION_LAYOUTS, HandAttention
    from .zoo import ConvBNAct, image_input, seeded_build

__all__ = ["ArchSpec", "Conv", "Add", "Cat", "Split", "SelfApply", "Attend", "TokenMix", "Head", "RandomNet", "build", "arch_specs",
           "random_architectures", "example_input", "INPUT_SHAPE"]

INPUT_SHAPE = (2, 3, 8, 8)
NUM_CLASSES = 10
MIN_CHANNELS, MAX_CHANNELS = 4, 16
MAX_CAT_CHANNELS = 32
ACTIVATIONS: dict[str, type[nn.Module] | None] = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "none": None}

T = TypeVar("T")
Shape = tuple[int, int]  # (channels, spatial side)
Shapes = dict[str, Shape]


# --------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    """``name = act(bn(conv(src)))``."""

    name: str
    src: str
    out_channels: int
    kernel: int
    stride: int
    groups: int
    act: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.src,)

    def out_shapes(self, shapes: Shapes) -> Shapes:
        _, side = shapes[self.src]
        return {self.name: (self.out_channels, side // self.stride)}

    def __str__(self) -> str:
        return (f"{self.name} = conv({self.src}, out={self.out_channels}, k={self.kernel}, "
                f"stride={self.stride}, groups={self.groups}, act={self.act})")


@dataclass(frozen=True)
class Add:
    """``name = a + b`` (same shape)."""

    name: str
    a: str
    b: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.a, self.b)

    def out_shapes(self, shapes: Shapes) -> Shapes:
        return {self.name: shapes[self.a]}

    def __str__(self) -> str:
        return f"{self.name} = {self.a} + {self.b}"


@dataclass(frozen=True)
class Cat:
    """``name = torch.cat([a, b], dim=1)`` (same spatial size)."""

    name: str
    a: str
    b: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.a, self.b)

    def out_shapes(self, shapes: Shapes) -> Shapes:
        (ca, side), (cb, _) = shapes[self.a], shapes[self.b]
        return {self.name: (ca + cb, side)}

    def __str__(self) -> str:
        return f"{self.name} = torch.cat([{self.a}, {self.b}], dim=1)"


@dataclass(frozen=True)
class Split:
    """Two-way channel split of ``src`` into ``sizes``; ``use`` keeps the first, second or both parts.

    ``mode`` is ``chunk`` (``src.chunk(2, dim=1)``), ``list`` (``torch.split(src, [s0, s1], dim=1)``),
    ``int`` (``torch.split(src, s0, dim=1)``, with ``s0 >= s1``) or ``slice`` (``src[:, :s0]``, ``src[:, s0:]``). Kept parts are named ``name``
    (one part) or ``name + "a"`` / ``name + "b"`` (both).
    """

    name: str
    src: str
    mode: str
    sizes: tuple[int, int]
    use: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.src,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.name + "a", self.name + "b") if self.use == "both" else (self.name,)

    def keep(self, parts: tuple[T, T]) -> tuple[T, ...]:
        """The parts this split keeps, in the order of :attr:`outputs`."""
        return {"first": parts[:1], "second": parts[1:], "both": parts}[self.use]

    def out_shapes(self, shapes: Shapes) -> Shapes:
        _, side = shapes[self.src]
        return {name: (c, side) for name, c in zip(self.outputs, self.keep(self.sizes))}

    def call(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "chunk":
            return x.chunk(2, dim=1)
        if self.mode == "list":
            return torch.split(x, list(self.sizes), dim=1)
        if self.mode == "slice":
            return x[:, :self.sizes[0]], x[:, self.sizes[0]:]
        return torch.split(x, self.sizes[0], dim=1)

    def __str__(self) -> str:
        call = {"chunk": f"{self.src}.chunk(2, dim=1)",
                "list": f"torch.split({self.src}, {list(self.sizes)}, dim=1)",
                "int": f"torch.split({self.src}, {self.sizes[0]}, dim=1)",
                "slice": f"{self.src}[:, :{self.sizes[0]}], {self.src}[:, {self.sizes[0]}:]"}[self.mode]
        targets = {"first": f"{self.name}, _", "second": f"_, {self.name}", "both": ", ".join(self.outputs)}[self.use]
        return f"{targets} = {call}"


class _SameShape:
    """An op of one input (``src``) whose output has the input's shape."""

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.src,)

    def out_shapes(self, shapes: Shapes) -> Shapes:
        return {self.name: shapes[self.src]}


@dataclass(frozen=True)
class SelfApply(_SameShape):
    """``name = conv(conv(src))``: one 3x3 conv (channels -> channels) applied to its own output."""

    name: str
    src: str

    def __str__(self) -> str:
        return f"{self.name} = conv(conv({self.src}))  # the same module twice"


@dataclass(frozen=True)
class Attend(_SameShape):
    """``name = [src +] image(attn(tokens(src)))``: pixels as tokens, ``HandAttention`` in ``layout``."""

    name: str
    src: str
    heads: int
    head_dim: int
    layout: str
    residual: bool

    def __str__(self) -> str:
        call = f"attn_{self.layout}(heads={self.heads}, head_dim={self.head_dim})({self.src})"
        return f"{self.name} = {self.src + ' + ' if self.residual else ''}{call}"


@dataclass(frozen=True)
class TokenMix(_SameShape):
    """``name = mix(src.flatten(2).transpose(1, 2).transpose(1, 2)).transpose(1, 2)...``: a Linear
    over the pixel positions, reached and left through transposes."""

    name: str
    src: str

    def __str__(self) -> str:
        return f"{self.name} = token_mix({self.src})"


@dataclass(frozen=True)
class Branch(_SameShape):
    """``name = conv(src) if src.shape[1] >= threshold else src``: Python steered by a channel count
    (pruning must not flip the recorded branch: the compared count is pinned)."""

    name: str
    src: str
    threshold: int

    def __str__(self) -> str:
        return f"{self.name} = conv({self.src}) if {self.src}.shape[1] >= {self.threshold} else {self.src}"


Op = Conv | Add | Cat | Split | SelfApply | Attend | TokenMix | Branch


@dataclass(frozen=True)
class Head:
    """Per-leaf ``pool`` then ``flatten`` style, concatenation, then a Linear classifier.

    ``pool``: ``adaptive_avg`` (1x1), ``mean`` (``x.mean((2, 3))``), ``adaptive_avg_2x2`` or
    ``none`` (flatten the spatial map straight into the Linear).
    ``flatten``: ``torch.flatten`` (``torch.flatten(x, 1)``), ``method`` (``x.flatten(1)``) or ``view``.
    """

    pool: str
    flatten: str

    def features(self, shape: Shape) -> int:
        channels, side = shape
        spatial = {"adaptive_avg": 1, "mean": 1, "adaptive_avg_2x2": 4, "none": side * side}[self.pool]
        return channels * spatial

    def __str__(self) -> str:
        steps = [f"pool={self.pool}"] + ([] if self.pool == "mean" else [f"flatten={self.flatten}"])
        return " -> ".join(steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "adaptive_avg":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.pool == "adaptive_avg_2x2":
            x = F.adaptive_avg_pool2d(x, 2)
        elif self.pool == "mean":
            return x.mean((2, 3))
        if self.flatten == "torch.flatten":
            return torch.flatten(x, 1)
        if self.flatten == "method":
            return x.flatten(1)
        return x.view(x.size(0), -1)


@dataclass(frozen=True)
class ArchSpec:
    """A random DAG CNN: ``ops`` in topological order over named tensors (input ``x``), plus a head."""

    ops: tuple[Op, ...]
    head: Head
    seed: int

    def shapes(self) -> Shapes:
        """Shape of every named tensor, including the input ``x``."""
        shapes: Shapes = {"x": (INPUT_SHAPE[1], INPUT_SHAPE[2])}
        for op in self.ops:
            shapes.update(op.out_shapes(shapes))
        return shapes

    def leaves(self) -> list[str]:
        """Tensors no op consumes, in creation order; they all feed the head."""
        consumed = {name for op in self.ops for name in op.inputs}
        return [name for name in self.shapes() if name not in consumed]

    def __repr__(self) -> str:
        shapes = self.shapes()
        lines = [f"ArchSpec(seed={self.seed}, input={INPUT_SHAPE})"]
        for op in self.ops:
            outs = ", ".join(f"{shapes[n][0]}x{shapes[n][1]}x{shapes[n][1]}" for n in op.out_shapes(shapes))
            lines.append(f"  {op!s:<70} # {outs}")
        lines.append(f"  head: each of [{', '.join(self.leaves())}] -> {self.head} -> cat -> linear({NUM_CLASSES})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------


class RandomNet(nn.Module):
    """Executes an :class:`ArchSpec`; ``self.spec`` holds the spec, and ``repr`` shows it."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        shapes = spec.shapes()
        self.convs = nn.ModuleDict({
            op.name: ConvBNAct(shapes[op.src][0], op.out_channels, op.kernel, op.stride, op.groups, ACTIVATIONS[op.act])
            for op in spec.ops if isinstance(op, Conv)
        })
        self.selfs = nn.ModuleDict({op.name: ConvBNAct(shapes[op.src][0], shapes[op.src][0], 3, 1, 1, nn.ReLU)
                                    for op in spec.ops if isinstance(op, SelfApply)})
        self.attns = nn.ModuleDict({op.name: HandAttention(shapes[op.src][0], op.heads, op.head_dim, op.layout)
                                    for op in spec.ops if isinstance(op, Attend)})
        self.branches = nn.ModuleDict({op.name: ConvBNAct(shapes[op.src][0], shapes[op.src][0], 1, 1, 1, nn.ReLU)
                                       for op in spec.ops if isinstance(op, Branch)})
        self.mixes = nn.ModuleDict({op.name: nn.Linear(shapes[op.src][1] ** 2, shapes[op.src][1] ** 2)
                                    for op in spec.ops if isinstance(op, TokenMix)})
        self.leaves = spec.leaves()
        self.fc = nn.Linear(sum(spec.head.features(shapes[name]) for name in self.leaves), NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {"x": x}
        for op in self.spec.ops:
            if isinstance(op, Conv):
                env[op.name] = self.convs[op.name](env[op.src])
            elif isinstance(op, Add):
                env[op.name] = env[op.a] + env[op.b]
            elif isinstance(op, Cat):
                env[op.name] = torch.cat([env[op.a], env[op.b]], dim=1)
            elif isinstance(op, SelfApply):
                env[op.name] = self.selfs[op.name](self.selfs[op.name](env[op.src]))
            elif isinstance(op, Attend):
                x = env[op.src]
                B, C, H, W = x.shape
                y = self.attns[op.name](x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)
                env[op.name] = (x + y if op.residual else y).contiguous()
            elif isinstance(op, Branch):
                x = env[op.src]
                env[op.name] = self.branches[op.name](x) if x.shape[1] >= op.threshold else x
            elif isinstance(op, TokenMix):
                x = env[op.src]
                tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
                mixed = self.mixes[op.name](tokens.transpose(1, 2)).transpose(1, 2)
                env[op.name] = mixed.transpose(1, 2).reshape(x.shape).contiguous()
            else:
                first, second = op.call(env[op.src])  # explicit unpacking keeps torch.fx tracing happy
                env.update(zip(op.outputs, op.keep((first, second))))
        features = [self.spec.head(env[name]) for name in self.leaves]
        return self.fc(torch.cat(features, dim=1) if len(features) > 1 else features[0])

    def extra_repr(self) -> str:
        return repr(self.spec)


def build(spec: ArchSpec) -> RandomNet:
    """Deterministically build (seeded by ``spec.seed``, eval mode, randomised BN) the net for ``spec``."""
    return seeded_build(lambda: RandomNet(spec), seed=spec.seed)()


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------


def _recent_first(shapes: Shapes) -> list[str]:
    """Tensor names, newest first: draws (and shrinking) favour chains over wide fan-out."""
    return list(reversed(shapes))


@st.composite
def _conv(draw: st.DrawFn, name: str, shapes: Shapes, dense_only: bool = False) -> Conv:
    src = draw(st.sampled_from(_recent_first(shapes)))
    in_channels, side = shapes[src]
    existing = sorted({c for c, _ in shapes.values() if MIN_CHANNELS <= c <= MAX_CHANNELS})
    group_sizes = [g for g in (2, 4) if in_channels % g == 0 and in_channels > g]
    # Dense convs are listed twice so that they are drawn about half the time.
    kinds = ["dense"] if dense_only else ["dense", "dense", "depthwise"] + (["grouped"] if group_sizes else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "depthwise":
        out_channels = groups = in_channels
    elif kind == "grouped":
        groups = draw(st.sampled_from(group_sizes))
        out_channels = draw(st.sampled_from([c for c in range(MIN_CHANNELS, MAX_CHANNELS + 1) if c % groups == 0]))
    else:
        groups = 1
        # Re-using an existing width makes residual adds between nodes possible later on.
        widths = st.integers(MIN_CHANNELS, MAX_CHANNELS)
        out_channels = draw(st.sampled_from(existing) | widths if existing else widths)
    return Conv(
        name,
        src,
        out_channels,
        kernel=draw(st.sampled_from([3, 1])),
        stride=draw(st.sampled_from([1, 1, 1, 2])) if side >= 4 else 1,
        groups=groups,
        act=draw(st.sampled_from(list(ACTIVATIONS))),
    )


@st.composite
def _self_apply(draw: st.DrawFn, name: str, shapes: Shapes) -> SelfApply:
    return SelfApply(name, draw(st.sampled_from(_recent_first(shapes))))


@st.composite
def _attend(draw: st.DrawFn, name: str, shapes: Shapes) -> Attend:
    return Attend(name, draw(st.sampled_from(_recent_first(shapes))), heads=draw(st.sampled_from([1, 2, 3, 4])),
                  head_dim=draw(st.sampled_from([1, 2, 3, 4])), layout=draw(st.sampled_from(ATTENTION_LAYOUTS)),
                  residual=draw(st.booleans()))


@st.composite
def _branch(draw: st.DrawFn, name: str, shapes: Shapes) -> Branch:
    src = draw(st.sampled_from(_recent_first(shapes)))
    return Branch(name, src, threshold=draw(st.integers(1, shapes[src][0])))  # the conv branch runs when traced


@st.composite
def _token_mix(draw: st.DrawFn, name: str, shapes: Shapes) -> TokenMix:
    return TokenMix(name, draw(st.sampled_from(_recent_first(shapes))))


def _pairs(shapes: Shapes, same_channels: bool) -> list[tuple[str, str]]:
    names = _recent_first(shapes)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1:]
        if shapes[a][1] == shapes[b][1]
        and (shapes[a][0] == shapes[b][0] if same_channels else shapes[a][0] + shapes[b][0] <= MAX_CAT_CHANNELS)
    ]


@st.composite
def _binary(draw: st.DrawFn, cls: type[Add] | type[Cat], name: str, pairs: list[tuple[str, str]]) -> Add | Cat:
    a, b = draw(st.sampled_from(pairs))
    if draw(st.booleans()):
        a, b = b, a
    return cls(name, a, b)


@st.composite
def _split(draw: st.DrawFn, name: str, shapes: Shapes) -> Split:
    src = draw(st.sampled_from([n for n in _recent_first(shapes) if shapes[n][0] >= 2]))
    channels = shapes[src][0]
    mode = draw(st.sampled_from(["chunk", "list", "int", "slice"]))
    half = -(-channels // 2)  # chunk(2) puts the odd channel in the first part
    if mode == "chunk":
        first = half
    elif mode == "int":
        first = draw(st.integers(half, channels - 1))  # exactly two parts
    else:  # list, slice: a != b allowed
        first = draw(st.integers(1, channels - 1))
    return Split(name, src, mode, (first, channels - first), use=draw(st.sampled_from(["both", "first", "second"])))


@st.composite
def arch_specs(draw: st.DrawFn, min_nodes: int = 2, max_nodes: int = 8) -> ArchSpec:
    """Strategy for :class:`ArchSpec`: a stem conv on ``x`` followed by ``min_nodes - 1 .. max_nodes - 1`` ops."""
    num_nodes = draw(st.integers(min_nodes, max_nodes))
    shapes: Shapes = {"x": (INPUT_SHAPE[1], INPUT_SHAPE[2])}
    ops: list[Op] = [draw(_conv(name="n0", shapes=shapes, dense_only=True))]
    shapes.update(ops[0].out_shapes(shapes))
    for i in range(1, num_nodes):
        name = f"n{i}"
        choices = [_conv(name, shapes), _split(name, shapes), _self_apply(name, shapes), _attend(name, shapes),
                   _token_mix(name, shapes), _branch(name, shapes)]
        for cls, same_channels in ((Add, True), (Cat, False)):
            if pairs := _pairs(shapes, same_channels):
                choices.append(_binary(cls, name, pairs))
        op = draw(st.one_of(choices))
        ops.append(op)
        shapes.update(op.out_shapes(shapes))
    head = Head(
        pool=draw(st.sampled_from(["adaptive_avg", "mean", "adaptive_avg_2x2", "none"])),
        flatten=draw(st.sampled_from(["torch.flatten", "method", "view"])),
    )
    return ArchSpec(tuple(ops), head, seed=draw(st.integers(0, 2**16 - 1)))


def example_input() -> torch.Tensor:
    """The deterministic 2x3x8x8 input every random architecture runs on."""
    return image_input(*INPUT_SHAPE)()[0]


def random_architectures(min_nodes: int = 2, max_nodes: int = 8) -> st.SearchStrategy[tuple[RandomNet, torch.Tensor]]:
    """Strategy of ``(module, example_input)`` pairs; ``module.spec`` is the drawn :class:`ArchSpec`."""
    return arch_specs(min_nodes, max_nodes).map(lambda spec: (build(spec), example_input()))
