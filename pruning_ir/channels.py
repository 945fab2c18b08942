"""Channel atoms: the vocabulary in which channel rules state their facts.

Every position of every channel-carrying tensor dimension holds an *atom* (an int).
Rules relate atoms: ``union`` (these positions are removed together), ``pin`` (never
removed, with a reason), ``bind_parameter`` (this parameter dimension is sliced by
these atoms). Atom 0 is the pinned atom: a position that holds it can never be removed.
Dependencies are found once, at the end, as connected components over all unions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PINNED = 0


@dataclass(frozen=True)
class TensorLayout:
    """Which atom sits at each position of each dimension of one tensor.

    ``dims[d]`` is None when dimension d carries no channel identity (batch, spatial,
    sequence positions). ``dead_is_zero``: a channel whose producers are zeroed carries
    exactly 0 here (False after e.g. a sigmoid, where it carries 0.5).
    """

    dims: tuple[np.ndarray | None, ...]
    dead_is_zero: bool = True

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def carries(self, dim: int) -> bool:
        return self.dims[dim] is not None

    def with_dims(self, dims) -> "TensorLayout":
        return TensorLayout(tuple(dims), self.dead_is_zero)

    @staticmethod
    def empty(ndim: int, dead_is_zero: bool = True) -> "TensorLayout":
        return TensorLayout((None,) * ndim, dead_is_zero)


def owner_path(tensor_name: str) -> str:
    """The module a parameter or buffer belongs to: ``conv`` for ``conv.weight``, and for a
    parametrized tensor too (``conv.parametrizations.weight.original0``, from ``weight_norm``)."""
    return tensor_name.rpartition(".")[0].split(".parametrizations.")[0]


def pinned(size: int) -> np.ndarray:
    """Atoms for ``size`` positions without channel identity."""
    return np.full(size, PINNED, dtype=np.int64)


def dim_atoms(layout: TensorLayout | None, dim: int, size: int) -> np.ndarray:
    """The atoms of one dimension, with pinned atoms standing in for 'no channel identity'."""
    atoms = None if layout is None else layout.dims[dim]
    return pinned(size) if atoms is None else atoms


@dataclass
class ParameterBinding:
    """Dimension ``dim`` of parameter or buffer ``name`` is sliced like ``atoms``."""

    name: str
    dim: int
    atoms: np.ndarray


@dataclass
class AttributeBinding:
    """After pruning, ``module.attribute`` becomes the number of kept positions of ``atoms``
    (divided by ``divisor``; written into ``tuple_index`` when the attribute is a tuple)."""

    module_path: str
    attribute: str
    atoms: np.ndarray
    divisor: int = 1
    tuple_index: int | None = None


class AtomTable:
    """Collects atoms, unions, pins and bindings during one propagation pass."""

    def __init__(self) -> None:
        self.count = 1  # atom 0 is PINNED
        self.union_left: list[np.ndarray] = []
        self.union_right: list[np.ndarray] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.inexact: list[tuple[np.ndarray, str]] = []
        self.multiples: list[tuple[np.ndarray, int, str]] = []

    def fresh(self, n: int) -> np.ndarray:
        atoms = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return atoms

    def union(self, left: np.ndarray, right: np.ndarray,
              reason: str = "meets a position without channel identity") -> None:
        """Position i of ``left`` and of ``right`` are removed together; a pair that meets
        the pinned atom pins the other side, with ``reason``."""
        if left is right:
            return
        left = np.asarray(left, dtype=np.int64).ravel()
        right = np.asarray(right, dtype=np.int64).ravel()
        if left.shape != right.shape:
            raise ValueError(f"internal: union of {left.shape} and {right.shape} atoms")
        touches_pinned = (left == PINNED) | (right == PINNED)
        if touches_pinned.any():
            self.pin(np.concatenate([left[touches_pinned], right[touches_pinned]]), reason)
            keep = ~touches_pinned
            left, right = left[keep], right[keep]
        if left.size:
            self.union_left.append(left)
            self.union_right.append(right)

    def union_all(self, atoms: np.ndarray) -> None:
        """Every atom in ``atoms`` is removed together with the others."""
        atoms = np.asarray(atoms, dtype=np.int64).ravel()
        if atoms.size > 1:
            self.union(atoms[:-1], atoms[1:])

    def pin(self, atoms: np.ndarray, reason: str) -> None:
        atoms = np.asarray(atoms, dtype=np.int64).ravel()
        atoms = atoms[atoms != PINNED]
        if atoms.size:
            self.pins.append((atoms, reason))

    def mark_inexact(self, atoms: np.ndarray, reason: str) -> None:
        atoms = np.asarray(atoms, dtype=np.int64).ravel()
        atoms = atoms[atoms != PINNED]
        if atoms.size:
            self.inexact.append((atoms, reason))

    def require_multiple(self, atoms: np.ndarray, multiple: int, reason: str) -> None:
        """Of ``atoms`` (one dimension of one tensor), a multiple of ``multiple`` must remain, or all."""
        atoms = np.asarray(atoms, dtype=np.int64).ravel()
        if multiple > 1 and atoms.size and (atoms != PINNED).any():
            self.multiples.append((atoms, multiple, reason))

    def classes(self) -> np.ndarray:
        """Class id of every atom (its component's smallest atom); pins are not unions, so
        class 0 holds PINNED alone and a pinned class keeps its own id."""
        if not self.union_left:
            return np.arange(self.count, dtype=np.int64)
        left = np.concatenate(self.union_left)
        right = np.concatenate(self.union_right)
        return connected_components(self.count, left, right)


def connected_components(count: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Smallest member of each element's component, for the graph with edges left[i]-right[i].

    Vectorized min-label hooking with pointer jumping: O(E log V) numpy work.
    """
    parent = np.arange(count, dtype=np.int64)
    while True:
        root_left, root_right = parent[left], parent[right]
        differ = root_left != root_right
        if not differ.any():
            return parent
        low = np.minimum(root_left[differ], root_right[differ])
        high = np.maximum(root_left[differ], root_right[differ])
        np.minimum.at(parent, high, low)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
