"""Channel rules for ops that move positions around: reshape, permute, cat, split, indexing."""

from __future__ import annotations

import operator

import numpy as np
import torch.fx as fx

from ..channels import PINNED, TensorLayout, dim_atoms
from ..tracing import AttributeInt, ShapeInt
from .attention import grouped_repeat, repeated_key_value
from .registry import RuleContext, channel_rule
from .slices import bounds_follow, sliced_atoms

def _flat_sizes(args) -> list:
    """``view(2, 3)`` / ``view((2, 3))`` / ``view(torch.Size)`` -> [2, 3]."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    return list(args)


def _chunks(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims that hold the same elements."""
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    chunks, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        group_in, group_out = [ins[i]], [outs[j]]
        product_in, product_out = in_shape[ins[i]], out_shape[outs[j]]
        while product_in != product_out:
            if product_in < product_out:
                i += 1
                group_in.append(ins[i])
                product_in *= in_shape[ins[i]]
            else:
                j += 1
                group_out.append(outs[j])
                product_out *= out_shape[outs[j]]
        chunks.append((group_in, group_out))
        i, j = i + 1, j + 1
    return chunks


def reshape_layout(ctx: RuleContext, layout: TensorLayout | None, in_shape, out_shape,
                   size_arguments: list | None = None) -> TensorLayout:
    """Layout after any reshape (view, reshape, flatten, unflatten, squeeze, unsqueeze).

    Input dims merged into one output dim broadcast their atoms over it. An input dim split
    into several output dims must stay a product set after pruning, so its atoms are
    unioned along all split dims but one (the carrier): the outermost whose size follows pruning
    (``-1``, read from a tensor, a module attribute, or one attribute times a size plus a constant:
    Falcon's ``self.num_heads + 2``) is preferred, then one equal to a known attribute name, then the
    outermost. ``view(B, T, -1, head_dim)``, ``view(B, T, self.heads, -1)`` and ``view(B, T,
    self.num_heads + 2, self.head_dim)`` so remove whole heads (q, k and v alike), and
    ``view(b, g, c // g, h, w)`` (channel shuffle, ``g`` literal) the same channel of every group.
    The other split dims must keep their size: one computed from channel counts, or from attributes
    by arithmetic pruning does not follow (``num_heads // num_kv``), pins.
    """
    out_dims: list = [None] * len(out_shape)
    split_carriers: set[int] = set()
    if layout is None or all(a is None for a in layout.dims):
        return TensorLayout(tuple(out_dims), True if layout is None else layout.dead_is_zero)
    if 0 in in_shape:
        ctx.pin_layout(layout, "reshape of an empty tensor")
        return TensorLayout(tuple(out_dims), layout.dead_is_zero)
    for d, size in enumerate(in_shape):
        if size == 1:
            ctx.pin(layout.dims[d], "a single channel is reshaped away")
    for chunk_in, chunk_out in _chunks(in_shape, out_shape):
        carrying = [d for d in chunk_in if layout.dims[d] is not None]
        if not carrying:
            continue
        for d in carrying[1:]:
            ctx.pin(layout.dims[d], "reshape merges two channel dimensions")
        carrier = carrying[0]
        sizes_in = [in_shape[d] for d in chunk_in]
        view = [in_shape[d] if d == carrier else 1 for d in chunk_in]
        flat = np.broadcast_to(layout.dims[carrier].reshape(view), sizes_in).ravel()
        block = flat.reshape([out_shape[d] for d in chunk_out])
        axis = _lossless_axis(block)
        if axis is None:
            ranks = [ctx.size_rank(size_arguments[d]) if size_arguments else 0 for d in chunk_out]
            axis = min(range(len(chunk_out)), key=lambda a: (ranks[a], a))
            moved = np.moveaxis(block, axis, 0).reshape(block.shape[axis], -1)
            ctx.union(moved[:, :-1].ravel(), moved[:, 1:].ravel())
            split_carriers.add(chunk_out[axis])
            if ctx.size_kind(size_arguments[chunk_out[axis]] if size_arguments else -1) == "free":
                ctx.bind_head_count(block.shape[axis], moved[:, 0])
            for d in chunk_out:
                if d != chunk_out[axis] and size_arguments and not ctx.size_is_fixed(size_arguments[d]):
                    reason = f"the size of output dim {d} must not change, but is computed from channel counts " \
                             "or module attributes"
                    ctx.pin(moved[:, 0], reason)
                    ctx.pin_size_sources(size_arguments[d], reason)
        atoms = np.moveaxis(block, axis, 0).reshape(block.shape[axis], -1)[:, 0].copy()
        if (atoms == PINNED).all():
            continue
        out_dims[chunk_out[axis]] = atoms
    if size_arguments:
        for d, atoms in enumerate(out_dims):
            if atoms is not None:
                ctx.size_follows(size_arguments[d], atoms, f"the size of output dim {d}", heads=d in split_carriers)
    return TensorLayout(tuple(out_dims), layout.dead_is_zero)


def _lossless_axis(block: np.ndarray) -> int | None:
    """The axis along which ``block`` varies, if it is constant along all the others."""
    if block.ndim == 1:
        return 0
    for axis in range(block.ndim):
        moved = np.moveaxis(block, axis, 0).reshape(block.shape[axis], -1)
        if (moved == moved[:, :1]).all():
            return axis
    return None


@channel_rule("view", "reshape")
def view(ctx: RuleContext) -> TensorLayout:
    source = ctx.node.args[0]
    sizes = _flat_sizes(ctx.node.args[1:]) or list(ctx.node.kwargs.get("shape", ()))
    if len(sizes) == 1 and not isinstance(sizes[0], int):  # view(dtype)
        return ctx.layout(source)
    return reshape_layout(ctx, ctx.layout(source), ctx.shape(source), ctx.out_shape, sizes)


@channel_rule("flatten", "unflatten", "squeeze", "unsqueeze", "ravel", "view_as", "reshape_as")
def implicit_reshape(ctx: RuleContext) -> TensorLayout:
    source = ctx.argument(0, "input")
    sizes = None
    if ctx.op == "unflatten":
        dim = ctx.argument(1, "dim") % len(ctx.shape(source))
        new = list(ctx.argument(2, "sizes"))
        sizes = [ShapeInt(s) for s in ctx.shape(source)[:dim]] + new + \
                [ShapeInt(s) for s in ctx.shape(source)[dim + 1:]]
    return reshape_layout(ctx, ctx.layout(source), ctx.shape(source), ctx.out_shape, sizes)


def _permuted(layout: TensorLayout | None, order: list[int]) -> TensorLayout | None:
    if layout is None:
        return None
    return layout.with_dims(layout.dims[d] for d in order)


@channel_rule("permute")
def permute(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.node.args[0])
    order = _flat_sizes(ctx.node.args[1:]) or list(ctx.node.kwargs["dims"])
    return _permuted(layout, [d % layout.ndim for d in order]) if layout else None


@channel_rule("transpose", "swapaxes", "swapdims", "t", "T", "mT", "movedim", "moveaxis")
def transpose(ctx: RuleContext) -> TensorLayout | None:
    layout = ctx.layout(ctx.argument(0, "input"))
    if layout is None:
        return None
    order = list(range(layout.ndim))
    if ctx.op in ("t", "T", "mT") or (ctx.node.target is getattr and ctx.node.args[1] in ("T", "mT")):
        if layout.ndim >= 2:
            first = 0 if ctx.op == "T" or (ctx.node.target is getattr and ctx.node.args[1] == "T") else -2
            if first == 0:
                order = order[::-1]
            else:
                order[-2], order[-1] = order[-1], order[-2]
        return _permuted(layout, order)
    first, second = ctx.argument(1), ctx.argument(2)
    if ctx.op in ("movedim", "moveaxis"):
        sources = first if isinstance(first, (list, tuple)) else [first]
        targets = second if isinstance(second, (list, tuple)) else [second]
        sources = [s % layout.ndim for s in sources]
        targets = [t % layout.ndim for t in targets]
        rest = [d for d in order if d not in sources]
        order = [None] * layout.ndim
        for s, t in zip(sources, targets):
            order[t] = s
        order = [o if o is not None else rest.pop(0) for o in order]
        return _permuted(layout, order)
    first, second = first % layout.ndim, second % layout.ndim
    order[first], order[second] = order[second], order[first]
    return _permuted(layout, order)


@channel_rule("getattr")
def tensor_property(ctx: RuleContext) -> TensorLayout | None:
    if ctx.node.args[1] in ("T", "mT"):
        return transpose(ctx)
    return ctx.layout(ctx.node.args[0])  # .data, .real


@channel_rule("expand", "broadcast_to", "expand_as")
def expand(ctx: RuleContext) -> TensorLayout | None:
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    in_shape, out_shape = ctx.shape(source), ctx.out_shape
    if ctx.op == "expand_as":
        sizes = [ShapeInt(s) for s in out_shape]
    else:
        sizes = _flat_sizes(ctx.node.args[1:]) or list(ctx.node.kwargs.get("size", ()))
    offset = len(out_shape) - len(in_shape)
    dims: list = [None] * len(out_shape)
    for d in range(len(in_shape)):
        atoms = layout.dims[d] if layout is not None else None
        if atoms is not None and in_shape[d] == out_shape[d + offset]:
            if ctx.size_follows(sizes[d + offset], atoms, f"the size of expanded dim {d + offset}"):
                dims[d + offset] = atoms
        elif in_shape[d] == 1 and layout is not None:  # HF repeat_kv: heads expanded by the group size
            repeated_key_value(ctx, dims, d + offset, sizes[d + offset])
    return TensorLayout(tuple(dims), layout.dead_is_zero if layout else True)


@channel_rule("repeat", "tile")
def repeat(ctx: RuleContext) -> TensorLayout | None:
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    repeats = _flat_sizes(ctx.node.args[1:]) or list(ctx.node.kwargs.get("dims", ()))
    in_ndim = len(ctx.shape(source))
    out_ndim = len(ctx.out_shape)
    repeats = [1] * (out_ndim - len(repeats)) + list(repeats)
    dims: list = [None] * out_ndim
    for d in range(in_ndim):
        atoms = layout.dims[d] if layout is not None else None
        if atoms is not None:
            dims[d + out_ndim - in_ndim] = np.tile(atoms, repeats[d + out_ndim - in_ndim])
    return TensorLayout(tuple(dims), layout.dead_is_zero if layout else True)


@channel_rule("repeat_interleave")
def repeat_interleave(ctx: RuleContext) -> TensorLayout | None:
    source, repeats, dim = ctx.argument(0, "input"), ctx.argument(1, "repeats"), ctx.argument(2, "dim")
    layout = ctx.layout(source)
    if layout is None or dim is None or isinstance(repeats, fx.Node):
        ctx.pin_layout(layout, "repeat_interleave with tensor repeats or no dim")
        return TensorLayout.empty(len(ctx.out_shape))
    dims = list(layout.dims)
    if grouped_repeat(ctx, dims, dim % len(dims), ctx.shape(source)[dim], repeats):  # grouped-query key/values
        return layout.with_dims(dims)
    if dims[dim] is not None:
        dims[dim] = np.repeat(dims[dim], repeats)
    return layout.with_dims(dims)


def _tie_other_dims(ctx: RuleContext, values: list, skip: int | None, out_ndim: int, offset: int = 0) -> list:
    dims = []
    for d in range(out_ndim):
        if d == skip:
            dims.append(None)
            continue
        local = d - offset if skip is not None and d > skip and offset else d
        dims.append(ctx.tie([ctx.atoms_of(v, local) for v in values], "concatenated with a tensor without "
                            "channel identity along this dimension"))
    return dims


@channel_rule("cat", "concat", "concatenate")
def concatenate(ctx: RuleContext) -> TensorLayout:
    values = [v for v in ctx.argument(0, "tensors") if isinstance(v, fx.Node)]
    dim = ctx.argument(1, "dim", 0) % len(ctx.out_shape)
    values = [v for v in values if ctx.shape(v) != (0,)]
    dims = _tie_other_dims(ctx, values, dim, len(ctx.out_shape))
    parts = [dim_atoms(ctx.layout(v), dim, ctx.shape(v)[dim]) for v in values]
    joined = np.concatenate(parts) if parts else None
    dims[dim] = None if joined is None or (joined == PINNED).all() else joined
    return TensorLayout(tuple(dims), all(ctx.layout(v) is None or ctx.layout(v).dead_is_zero for v in values))


@channel_rule("stack")
def stack(ctx: RuleContext) -> TensorLayout:
    values = [v for v in ctx.argument(0, "tensors") if isinstance(v, fx.Node)]
    dim = ctx.argument(1, "dim", 0) % len(ctx.out_shape)
    in_ndim = len(ctx.out_shape) - 1
    tied = [ctx.tie([ctx.atoms_of(v, d) for v in values], "stacked with a tensor without channel identity")
            for d in range(in_ndim)]
    return TensorLayout(tuple(tied[:dim] + [None] + tied[dim:]))


def _split_pieces(ctx: RuleContext, atoms: np.ndarray, sizes: list[int], size_argument, equal: bool):
    """Atoms of each piece of a split along a channel dim; pieces must keep their boundaries."""
    if equal and len(set(sizes)) == 1 and len(sizes) > 1:
        pieces = atoms.reshape(len(sizes), -1)
        if size_argument is None or ctx.size_follows(size_argument, pieces[0], "the split size"):
            ctx.union(pieces[1:].ravel(), pieces[:-1].ravel())
            return [pieces[0]] * len(sizes)
    elif not equal and any(isinstance(s, (ShapeInt, AttributeInt)) for s in size_argument):
        # Falcon's split([self.num_heads, 1, 1]): a piece of literal size keeps its channels
        bounds = np.cumsum([0] + sizes)
        pieces = [atoms[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        first_of: dict = {}  # pieces sized by the same attribute keep equal sizes
        for i, size in enumerate(size_argument):
            if not isinstance(size, (ShapeInt, AttributeInt)):
                ctx.pin(pieces[i], f"split piece {i} has the literal size {size}")
                continue
            if isinstance(size, AttributeInt):
                key = (size.module_path, size.attribute, size.divisor)
                if key in first_of:
                    ctx.union(pieces[first_of[key]], pieces[i])
                    pieces[i] = pieces[first_of[key]]
                    continue
                first_of[key] = i
            ctx.size_follows(size, pieces[i], f"the size of split piece {i}")
        return pieces
    ctx.pin(atoms, "split into pieces whose sizes do not follow pruning")
    return [None] * len(sizes)


@channel_rule("split", "chunk", "tensor_split", "split_with_sizes", "unbind")
def split(ctx: RuleContext) -> tuple:
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    shape = ctx.shape(source)
    if ctx.op == "unbind":
        dim = ctx.argument(1, "dim", 0) % len(shape)
        piece_dims = [None if d == dim else a for d, a in enumerate(layout.dims)] if layout else None
        if layout is not None:
            ctx.pin(layout.dims[dim], "unbind turns channels into separate tensors")
        count = shape[dim]
        piece = TensorLayout(tuple(a for d, a in enumerate(piece_dims) if d != dim)) if layout else None
        return (piece,) * count
    argument = ctx.argument(1, "split_size_or_sections", ctx.argument(1, "chunks"))
    default_dim = 0
    dim = ctx.argument(2, "dim", default_dim) % len(shape)
    users = [u for u in ctx.node.users if u.target is operator.getitem]
    sizes = [None] * (max((u.args[1] for u in users), default=-1) + 1)
    for user in users:
        sizes[user.args[1]] = user.meta["shape"][dim]
    if layout is None or layout.dims[dim] is None or None in sizes:
        base = layout.dims if layout is not None else (None,) * len(shape)
        return tuple(TensorLayout(tuple(base)) if s is not None else None for s in sizes)
    atoms = layout.dims[dim]
    if sum(sizes) != shape[dim]:
        ctx.pin(atoms, "split pieces do not cover the channel dimension")
        pieces = [None] * len(sizes)
    elif ctx.op == "chunk":
        pieces = _split_pieces(ctx, atoms, sizes, None, equal=True)
    elif isinstance(argument, int):
        pieces = _split_pieces(ctx, atoms, sizes, argument, equal=True)
    else:
        pieces = _split_pieces(ctx, atoms, sizes, list(argument), equal=False)
    results = []
    for piece in pieces:
        dims = list(layout.dims)
        dims[dim] = piece
        results.append(TensorLayout(tuple(dims), layout.dead_is_zero))
    return tuple(results)


@channel_rule("getitem")
def getitem(ctx: RuleContext):
    """``x[...]`` on a tensor (and picking one output of a multi-output op)."""
    source, index = ctx.node.args
    if source.meta.get("shape") is None:  # element of a tuple returned by an op
        parent = ctx.state.layout_of(source, allow_tuple=True)
        return parent[index] if isinstance(parent, tuple) and index < len(parent) else None
    layout = ctx.layout(source)
    if layout is None:
        return None
    return index_layout(ctx, layout, ctx.shape(source), index if isinstance(index, tuple) else (index,), source)


def index_layout(ctx: RuleContext, layout: TensorLayout, shape, index: tuple,
                 source: fx.Node | None = None) -> TensorLayout:
    """Basic and (single-block) advanced indexing: full slices keep channels, and so do slices whose
    bounds are computed from attributes (``slices``); anything else that selects positions on a
    channel dimension pins it."""
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for item in index:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - consumed))
        else:
            expanded.append(item)
    expanded.extend([slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None)))
    dims: list = []
    advanced_done = False
    d = 0
    for item in expanded:
        if item is None:
            dims.append(None)
            continue
        atoms = layout.dims[d]
        size = shape[d]
        if isinstance(item, slice):
            full = item.step in (None, 1) and item.start in (None, 0) and \
                (item.stop is None or (isinstance(item.stop, int) and item.stop >= size))
            if not full and atoms is not None and source is not None and bounds_follow(item):
                dims.append(sliced_atoms(ctx, source, d, atoms, item))
                d += 1
                continue
            if not full:
                ctx.pin(atoms, "sliced with fixed bounds")
                for bound in (item.start, item.stop):
                    ctx.note_attributes(bound, f"also bounds a slice of dim {d}, which has no channels", fixed=True)
            dims.append(atoms if full else None)
        elif isinstance(item, fx.Node):
            ctx.pin(atoms, "indexed with a tensor")
            if not advanced_done:
                dims.extend([None] * (len(item.meta["shape"]) if item.meta.get("shape") else 1))
                advanced_done = True
        else:
            ctx.pin(atoms, "indexed with a fixed position")
        d += 1
    if len(dims) != len(ctx.out_shape):
        ctx.pin_layout(layout, "indexing pattern not understood")
        return TensorLayout.empty(len(ctx.out_shape))
    return TensorLayout(tuple(dims), layout.dead_is_zero)


@channel_rule("numpy", "__array__", "tolist", "item", "__iter__", "__bool__", "__index__", "__int__", "__float__",
              "data_ptr", "untyped_storage")
def escape(ctx: RuleContext) -> None:
    """Values that leave torch (``.numpy()``, ``.tolist()``...) are not followed: their channels are pinned."""
    ctx.pin_layout(ctx.layout(ctx.node.args[0]), f"values leave torch through .{ctx.op}()")


@channel_rule("narrow", "select", "index_select", "gather", "take_along_dim", "masked_select", "diagonal",
              "unfold", "as_strided", "setitem", "index_put", "index_add", "index_copy", "scatter",
              "scatter_add", "masked_fill", "masked_scatter", "fill", "zero", "copy")
def positional(ctx: RuleContext) -> TensorLayout | None:
    """Ops that read or write chosen positions: every channel they touch is pinned. (A
    ``masked_fill`` whose mask spans no channel dimension keeps the channels.)"""
    source = ctx.argument(0, "input")
    layout = ctx.layout(source)
    if ctx.op == "masked_fill" and isinstance(ctx.argument(1), fx.Node):
        mask_shape = ctx.shape(ctx.argument(1))
        out_shape = ctx.out_shape
        spans = [len(mask_shape) - len(out_shape) + d >= 0 and
                 mask_shape[len(mask_shape) - len(out_shape) + d] == out_shape[d] != 1
                 for d in range(len(out_shape))]
        if layout is not None and not any(s and layout.dims[d] is not None for d, s in enumerate(spans)):
            return TensorLayout(layout.dims, False)
    for value in list(ctx.node.args) + list(ctx.node.kwargs.values()):
        ctx.pin_layout(ctx.layout(value), f"{ctx.op} reads or writes chosen positions")
    shape = ctx.node.meta.get("shape")
    return None if shape is None else TensorLayout.empty(len(shape))
