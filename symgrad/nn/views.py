"""Array operations a :class:`~symgrad.nn.Tape` records: reshape, transpose, slicing and
integer indexing, concatenation, stacking — each an index formula, its VJP derived.

NumPy's views and copies of a recorded array are invisible to a tape (a gradient cannot flow
through them); these ops are the recorded forms.  Each is a :func:`symgrad.tensor_op` built
for the operation's rank and parameters (cached), so its gradient comes out of the index
calculus like any op's — nothing here is a backward pass:

* transpose: ``Y[i₀, i₁] = X[i₁, i₀]`` (any permutation of the axes);
* slice: a shifted, strided read ``Y[.., i, ..] = X[.., start + step·i, ..]``; an integer
  index reads a fixed position and drops the axis, ``Y[i, k] = X[i, 2, k]``;
* concatenation: shifted reads that are 0 outside their tensor,
  ``Y[.., i, ..] = X₀[.., i, ..] + X₁[.., i − L₀, ..]``;
* stack: ``Y[.., k, ..] = X₀[..] if k = 0, X₁[..] if k = 1, ...`` (a condition on ``k``);
* reshape: axes are grouped where the two shapes' products meet; a group of input axes
  ``(a₁, .., aₚ)`` becomes output axes ``(o₁, .., o_q)`` through the flat offset
  ``f = Σ o·stride``: ``Y[o₁, .., o_q] = Σ_{a₁..aₚ₋₁} X[a₁, .., aₚ₋₁, f − Σ a·stride]`` (the
  one term in range survives; a split, ``p = 1``, is a single read).

Axes the operation leaves alone, and axes a reshape merges, keep symbolic sizes (one op serves
every batch size); the sizes the formula depends on (a slice's length, a split's sizes) are
part of the op.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ArgumentError, ShapeError


def _sympy() -> Any:
    import sympy as sp  # SymPy only when an op is first built

    return sp


def _dims(prefix: str, rank: int) -> list[Any]:
    sp = _sympy()
    return [sp.Symbol(f"{prefix}{a}", integer=True, positive=True) for a in range(rank)]


def _indices(rank: int, name: str = "i") -> list[Any]:
    sp = _sympy()
    return [sp.Symbol(f"{name}{a}", integer=True) for a in range(rank)]


def _tensor_op(expr: Any, out: Sequence[Any], inputs: Sequence[Any], name: str, shape: Any) -> Any:
    from ..api import tensor_op

    return tensor_op(expr, out=tuple(out), inputs=list(inputs), name=name, out_shape=tuple(shape))


@functools.cache
def transpose_op(axes: tuple[int, ...]) -> Any:
    """``Y = X.transpose(axes)``: ``Y[i₀, ..] = X[..]`` with ``X``'s axis ``axes[k]`` read
    at ``iₖ``."""
    sp = _sympy()
    rank = len(axes)
    dims, out = _dims("D", rank), _indices(rank)
    X = sp.IndexedBase("X", shape=tuple(dims))
    read = [None] * rank
    for k, a in enumerate(axes):
        read[a] = out[k]
    name = "view_transpose_" + "_".join(map(str, axes))
    return _tensor_op(X[tuple(read)], out, [X], name, [dims[a] for a in axes])


@functools.cache
def index_op(rank: int, picks: tuple[tuple[str, int, int, int], ...]) -> Any:
    """Basic indexing: ``picks[a]`` is ``("slice", start, step, length)`` or ``("int",
    position, 0, 0)`` for each axis ``a`` of ``X`` (an integer drops the axis)."""
    sp = _sympy()
    dims = _dims("D", rank)
    X = sp.IndexedBase("X", shape=tuple(dims))
    out, shape, read = [], [], []
    for a, (kind, start, step, length) in enumerate(picks):
        if kind == "int":
            read.append(start)
            continue
        i = sp.Symbol(f"i{a}", integer=True)
        out.append(i)
        whole = start == 0 and step == 1 and length < 0
        shape.append(dims[a] if whole else length)
        read.append(i if whole else start + step * i)
    parts = [
        "all" if k == "slice" and s0 == 0 and st == 1 and n < 0 else f"{k}{s0}_{st}_{n}"
        for k, s0, st, n in picks
    ]
    name = "view_index_" + "_".join(p.replace("-", "m") for p in parts)
    return _tensor_op(X[tuple(read)], out, [X], name, shape)


@functools.cache
def concatenate_op(rank: int, axis: int, count: int) -> Any:
    """``np.concatenate`` of ``count`` arrays of rank ``rank`` along ``axis``."""
    sp = _sympy()
    dims, out = _dims("D", rank), _indices(rank)
    lengths = [sp.Symbol(f"L{k}", integer=True, positive=True) for k in range(count)]
    inputs, terms, offset = [], [], sp.S.Zero
    for k in range(count):
        shape = [*dims[:axis], lengths[k], *dims[axis + 1 :]]
        X = sp.IndexedBase(f"X{k}", shape=tuple(shape))
        read = [*out[:axis], out[axis] - offset, *out[axis + 1 :]]
        terms.append(X[tuple(read)])  # 0 outside X_k: the zero padding of a shifted read
        inputs.append(X)
        offset += lengths[k]
    shape = [*dims[:axis], offset, *dims[axis + 1 :]]
    return _tensor_op(sp.Add(*terms), out, inputs, f"view_concat_r{rank}_a{axis}_n{count}", shape)


@functools.cache
def stack_op(rank: int, axis: int, count: int) -> Any:
    """``np.stack`` of ``count`` arrays of rank ``rank`` along a new axis ``axis``."""
    sp = _sympy()
    dims, idx = _dims("D", rank), _indices(rank)
    k = sp.Symbol("k", integer=True)
    inputs = [sp.IndexedBase(f"X{n}", shape=tuple(dims)) for n in range(count)]
    pieces = [(X[tuple(idx)], sp.Eq(k, n)) for n, X in enumerate(inputs[:-1])]
    body = sp.Piecewise(*pieces, (inputs[-1][tuple(idx)], True))
    out = [*idx[:axis], k, *idx[axis:]]
    shape = [*dims[:axis], count, *dims[axis:]]
    return _tensor_op(body, out, inputs, f"view_stack_r{rank}_a{axis}_n{count}", shape)


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[tuple[Any, ...], ...]:
    """The axes of ``old`` and ``new`` in consecutive groups whose products meet: ``("keep",)``
    for an axis the reshape keeps, ``("merge", p)`` for ``p`` axes made one — both with
    symbolic sizes (one op for every batch size) — else ``("regroup", sizes in old, sizes in
    new)``, whose sizes are part of the op (a split needs them)."""
    if not old or not new:
        raise ShapeError(
            f"Tape.reshape: {old} to {new}: a 0-d array is not reshaped on a tape (index it, or "
            "reshape the 1-element array around it)"
        )
    groups: list[tuple[list[int], list[int]]] = []
    a = b = 0
    while a < len(old) or b < len(new):
        ga: list[int] = []
        gb: list[int] = []
        pa = pb = 1
        while True:  # an axis from each side, then from the side with the smaller product
            if a < len(old) and (not ga or pa < pb):
                ga.append(old[a])
                pa *= old[a]
                a += 1
            elif b < len(new) and (not gb or pb < pa):
                gb.append(new[b])
                pb *= new[b]
                b += 1
            else:
                break
        if groups and (not ga or not gb):  # trailing size-1 axes join the last group
            groups[-1][0].extend(ga)
            groups[-1][1].extend(gb)
        else:
            groups.append((ga, gb))
    return tuple(
        ("keep",)
        if len(ga) == 1 and gb == ga
        else ("merge", len(ga))
        if len(gb) == 1
        else ("regroup", tuple(ga), tuple(gb))
        for ga, gb in groups
    )


@functools.cache
def reshape_op(groups: tuple[tuple[Any, ...], ...]) -> Any:
    """A reshape (C order) of the axis groups of :func:`reshape_groups`."""
    sp = _sympy()
    rank = sum(1 if g[0] == "keep" else g[1] if g[0] == "merge" else len(g[1]) for g in groups)
    dims = _dims("D", rank)
    X = sp.IndexedBase("X", shape=tuple(dims))
    read: list[Any] = []
    out: list[Any] = []
    shape: list[Any] = []
    sums = []
    for group in groups:
        if group[0] == "keep":
            sizes_in = sizes_out = [dims[len(read)]]
        elif group[0] == "merge":
            sizes_in = dims[len(read) : len(read) + group[1]]
            sizes_out = [sp.Mul(*sizes_in)]
        else:
            sizes_in, sizes_out = list(group[1]), list(group[2])
        os_ = [sp.Symbol(f"o{len(out) + k}", integer=True) for k in range(len(sizes_out))]
        out += os_
        shape += sizes_out
        flat, stride = sp.S.Zero, sp.S.One  # the offset within the group, from the output's
        for o, n in zip(reversed(os_), reversed(sizes_out), strict=True):  # indices
            flat += o * stride
            stride *= n
        js = [sp.Symbol(f"j{len(read) + k}", integer=True) for k in range(len(sizes_in) - 1)]
        stride, rest = sizes_in[-1], flat
        for j, n in zip(reversed(js), reversed(sizes_in[:-1]), strict=True):
            rest -= j * stride
            stride *= n
        sums += [(j, 0, n - 1) for j, n in zip(js, sizes_in[:-1], strict=True)]
        read += [*js, rest]  # the last axis read where the group's other indices leave it
    expr = sp.Sum(X[tuple(read)], *sums) if sums else X[tuple(read)]
    text = "_".join(
        "k" if g[0] == "keep" else f"m{g[1]}" if g[0] == "merge"
        else "x".join(map(str, g[1])) + "to" + "x".join(map(str, g[2]))
        for g in groups
    )  # fmt: skip
    return _tensor_op(expr, out, [X], f"view_reshape_{text}", shape)


# -- the arguments, as NumPy takes them ------------------------------------------------------


def reshape_args(shape: tuple[int, ...], new: Any) -> tuple[int, ...]:
    """``new`` as NumPy would resolve it for an array of ``shape`` (one ``-1`` allowed)."""
    wanted = [int(new)] if isinstance(new, (int, np.integer)) else [int(n) for n in new]
    size = int(np.prod(shape, dtype=np.int64))
    known = int(np.prod([n for n in wanted if n != -1], dtype=np.int64))
    free = wanted.count(-1)
    if free == 1 and known > 0 and size % known == 0:
        wanted[wanted.index(-1)] = size // known
    if free > 1 or any(n < 0 for n in wanted) or int(np.prod(wanted, dtype=np.int64)) != size:
        raise ShapeError(
            f"Tape.reshape: cannot reshape an array of shape {shape} (size {size}) to {new}"
        )
    return tuple(wanted)


def transpose_args(ndim: int, axes: Any) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim - 1, -1, -1))
    order = tuple(int(a) % ndim if -ndim <= int(a) < ndim else ndim for a in axes)
    if sorted(order) != list(range(ndim)):
        raise ShapeError(
            f"Tape.transpose: axes {tuple(axes)} are not a permutation of the {ndim} axes"
        )
    return order


def index_args(shape: tuple[int, ...], index: Any) -> tuple[tuple[str, int, int, int], ...]:
    """The picks of :func:`index_op` for a basic NumPy index (ints, slices, one Ellipsis);
    an ArgumentError for what the tape does not record (arrays, masks, None)."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if item is None:
            raise ArgumentError(
                "Tape.getitem: None (np.newaxis) is not recorded; add the axis with tape.reshape"
            )
        if isinstance(item, (bool, np.bool_)) or not (
            item is Ellipsis or isinstance(item, (slice, int, np.integer))
        ):
            raise ArgumentError(
                f"Tape.getitem: {type(item).__name__} indices (advanced indexing: a gather) "
                "are not recorded; use ints, slices and Ellipsis, or write the gather as an op "
                "(the built-in embedding: Y[b, s] = W[ids[b, s]])"
            )
    if sum(item is Ellipsis for item in items) > 1:
        raise ArgumentError("Tape.getitem: an index can have one Ellipsis")
    explicit = len(items) - (1 if Ellipsis in items else 0)
    if explicit > len(shape):
        raise ShapeError(f"Tape.getitem: {explicit} indices for an array of shape {shape}")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = (slice(None),) * (len(shape) - explicit)
        items = items[:at] + fill + items[at + 1 :]
    items = items + (slice(None),) * (len(shape) - len(items))
    picks = []
    for axis, (item, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            start, stop, step = item.indices(size)
            length = len(range(start, stop, step))
            if length == 0:
                raise ShapeError(f"Tape.getitem: the slice {item} of axis {axis} is empty")
            if (start, step, length) == (0, 1, size):
                picks.append(("slice", 0, 1, -1))  # the whole axis: any size
            else:
                picks.append(("slice", start, step, length))
        else:
            k = int(item)
            if not -size <= k < size:
                raise ShapeError(
                    f"Tape.getitem: index {k} is out of range for axis {axis} of size {size}"
                )
            picks.append(("int", k % size, 0, 0))
    return tuple(picks)
