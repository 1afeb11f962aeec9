"""TensorOp: the checked Python wrapper around a tensor op's compiled kernels.

Dims are bound from the arrays' shapes; a dim bound to two different sizes is a
:class:`~symgrad.errors.ShapeError` naming the dim and both arrays.  Arrays must have the
declared rank and one float dtype; non-contiguous arrays are copied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from ..errors import ArgumentError, DTypeError, IndexRangeError, ShapeError
from ..symbolic.index import TensorDerivation, TensorSpec
from .compiled import CompiledOp
from .elementwise import _as_float_array


def _as_index_array(value: object, what: str) -> np.ndarray:
    """An integer tensor's array, as int64."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise DTypeError(
            f"{what} is an integer tensor (token ids, labels) but has dtype {array.dtype}; "
            "give integers, e.g. np.asarray(ids, dtype=np.int64)"
        )
    return array.astype(np.int64, copy=False)


_SIZE = sp.Symbol("_size", integer=True)  # an axis's size, while solving a shape for a dim


class TensorOp(CompiledOp[TensorDerivation]):
    """A compiled tensor op.  Create it with :func:`symgrad.tensor_op`.

    ``op(*arrays)`` is the forward, ``op.vjp(*arrays, grad_output)`` returns one gradient per
    input, ``op.source`` the generated source, ``op.derivation()`` the symbolic derivation.
    """

    def __init__(
        self,
        spec: TensorSpec,
        path: Path,
        derive: Callable[[], TensorDerivation],
        derivation: TensorDerivation | None = None,
    ) -> None:
        super().__init__(spec.name, path, derive, derivation)
        self.spec = spec
        self.input_names = tuple(str(b.label) for b in spec.inputs)
        self._wrt = tuple(spec.inputs.index(b) for b in spec.wrt)
        # (integer tensor, axis, tensor it indexes, that axis's dim) for every gather
        uses = set()
        for access in spec.expr.atoms(sp.Indexed):
            for axis, (index, dim) in enumerate(
                zip(access.indices, access.base.shape, strict=True)
            ):
                for read in index.atoms(sp.Indexed):
                    if read.base.is_integer:
                        uses.add((str(read.base.label), axis, str(access.base.label), dim))
        self._index_uses = sorted(uses, key=str)
        self._solutions: dict[tuple[sp.Expr, sp.Symbol], sp.Expr] = {}

    def __repr__(self) -> str:
        return f"<symgrad tensor op {self.name}({', '.join(self.input_names)})>"

    def _bind(
        self, arrays: tuple[object, ...]
    ) -> tuple[list[np.ndarray], dict[sp.Symbol, int], np.dtype]:
        n = len(self.input_names)
        if len(arrays) != n:
            raise ArgumentError(
                f"op {self.name!r} takes {n} array(s) ({', '.join(self.input_names)}), "
                f"got {len(arrays)}"
            )
        checked = [
            _as_index_array(a, f"op {self.name!r} input {nm!r}")
            if base.is_integer
            else _as_float_array(a, f"op {self.name!r} input {nm!r}")
            for nm, base, a in zip(self.input_names, self.spec.inputs, arrays, strict=True)
        ]
        floats = [
            (nm, a)
            for nm, base, a in zip(self.input_names, self.spec.inputs, checked, strict=True)
            if not base.is_integer
        ]
        dtypes = {a.dtype for _, a in floats}
        if len(dtypes) > 1:
            listing = ", ".join(f"{nm}: {a.dtype}" for nm, a in floats)
            raise DTypeError(
                f"op {self.name!r}: inputs have different dtypes ({listing}); cast them to one"
            )
        sizes: dict[sp.Symbol, int] = {}
        where: dict[sp.Symbol, str] = {}
        deferred = []
        for nm, base, a in zip(self.input_names, self.spec.inputs, checked, strict=True):
            shape = tuple(sp.sympify(d) for d in base.shape)
            if a.ndim != len(shape):
                raise ShapeError(
                    f"op {self.name!r}: input {nm!r} must have {len(shape)} dims "
                    f"{tuple(map(str, shape))}, got an array of shape {a.shape}"
                )
            for axis, (dim, size) in enumerate(zip(shape, a.shape, strict=True)):
                if isinstance(dim, sp.Symbol):
                    if dim in sizes and sizes[dim] != size:
                        raise ShapeError(
                            f"op {self.name!r}: dim {dim} is {sizes[dim]} in {where[dim]} but "
                            f"{size} in {nm!r} (axis {axis}, shape {a.shape})"
                        )
                    sizes.setdefault(dim, size)
                    where.setdefault(dim, f"{nm!r} (shape {a.shape})")
                else:
                    deferred.append((nm, axis, dim, size, a.shape))
        self._solve_dims(deferred, sizes, where)
        for nm, axis, dim, size, shape in deferred:
            expected = dim.xreplace(sizes)
            if not expected.is_Integer or int(expected) != size:
                raise ShapeError(
                    f"op {self.name!r}: axis {axis} of {nm!r} (shape {shape}) should be "
                    f"{dim} = {expected}, got {size}"
                )
        self._check_index_ranges(checked, sizes)
        return [np.ascontiguousarray(a) for a in checked], sizes, dtypes.pop()

    def _solve_dims(
        self,
        deferred: list[tuple[str, int, sp.Expr, int, tuple[int, ...]]],
        sizes: dict[sp.Symbol, int],
        where: dict[sp.Symbol, str],
    ) -> None:
        """Bind the dims that appear only inside shape expressions (``N`` of an axis ``2*N``)
        by solving each expression with one unbound dim for it, until none is left."""
        progress = True
        while progress:
            progress = False
            for nm, axis, dim, size, shape in deferred:
                unknown = sorted(dim.free_symbols - set(sizes), key=str)
                if len(unknown) != 1:
                    continue
                (symbol,) = unknown
                solution = self._solution(dim, symbol).xreplace(sizes)
                value = solution.xreplace({_SIZE: size})
                if not value.is_Integer or value < 0:
                    raise ShapeError(
                        f"op {self.name!r}: axis {axis} of {nm!r} (shape {shape}) should be "
                        f"{dim}, but no whole {symbol} gives {size}"
                    )
                sizes[symbol] = int(value)
                where[symbol] = f"{nm!r} (shape {shape})"
                progress = True
        unbound = sorted({str(s) for _, _, dim, _, _ in deferred for s in dim.free_symbols} - {
            str(s) for s in sizes
        })
        if unbound:
            raise ShapeError(
                f"op {self.name!r}: dim(s) {unbound} cannot be found from the arrays' shapes; "
                "give some input an axis of that dim alone"
            )

    def _solution(self, dim: sp.Expr, symbol: sp.Symbol) -> sp.Expr:
        key = (dim, symbol)
        if key not in self._solutions:
            found = sp.solve(sp.Eq(dim, _SIZE), symbol, dict=False)
            if len(found) != 1:
                raise ShapeError(
                    f"op {self.name!r}: the shape entry {dim} does not determine {symbol}; "
                    "give some input an axis of that dim alone"
                )
            self._solutions[key] = found[0]
        return self._solutions[key]

    def _check_index_ranges(self, arrays: list[np.ndarray], sizes: dict[sp.Symbol, int]) -> None:
        """Every integer tensor's values must lie within each axis it subscripts: the
        compiled loops do not check bounds (a bad token id would read or write memory)."""
        by_label = dict(zip(self.input_names, arrays, strict=True))
        for label, axis, base, dim in self._index_uses:
            values = by_label[label]
            size = int(sp.sympify(dim).xreplace(sizes))
            if values.size and (values.min() < 0 or values.max() >= size):
                raise IndexRangeError(
                    f"op {self.name!r}: integer input {label!r} holds values in "
                    f"[{values.min()}, {values.max()}], but it indexes axis {axis} of "
                    f"{base!r}, of size {size} (valid: 0 to {size - 1})"
                )

    def _out_shape(self, sizes: dict[sp.Symbol, int]) -> tuple[int, ...]:
        return tuple(int(d.xreplace(sizes)) for d in self.spec.out_shape)

    def _dims(self, sizes: dict[sp.Symbol, int]) -> list[int]:
        return [sizes[d] for d in self.spec.dims]

    def _flatten_batch(
        self, arrays: tuple[object, ...]
    ) -> tuple[tuple[object, ...], tuple[int, ...] | None]:
        """The inputs with their leading (batch) axes flattened into one, and those axes'
        shape (None for an op without a batch dim); see ``batch`` in :func:`symgrad.tensor_op`."""
        batch = self.spec.batch
        if batch is None or len(arrays) != len(self.input_names):
            return arrays, None
        lead: tuple[int, ...] | None = None
        flat = []
        for nm, base, a in zip(self.input_names, self.spec.inputs, arrays, strict=True):
            shape = tuple(base.shape)
            if not shape or shape[0] != batch:
                flat.append(a)
                continue
            array = np.asarray(a)
            rest = len(shape) - 1
            if array.ndim < rest:
                raise ShapeError(
                    f"op {self.name!r}: input {nm!r} must have at least {rest} dims "
                    f"{tuple(map(str, shape[1:]))} after its batch axes, got shape {array.shape}"
                )
            here = array.shape[: array.ndim - rest]
            if lead is not None and here != lead:
                raise ShapeError(
                    f"op {self.name!r}: the batch axes {batch} of the inputs differ: {lead} "
                    f"and {here} (input {nm!r}, shape {array.shape})"
                )
            lead = here
            flat.append(array.reshape((int(np.prod(here)), *array.shape[array.ndim - rest :])))
        return tuple(flat), lead

    def _unflatten(self, out: np.ndarray, lead: tuple[int, ...] | None) -> np.ndarray:
        """The output with its batch axis as the inputs' leading axes."""
        if lead is None or not self.spec.out or self.spec.out_shape[0] != self.spec.batch:
            return out
        return out.reshape((*lead, *out.shape[1:]))

    def __call__(self, *arrays: object) -> np.ndarray:
        """Forward: the output tensor, of shape given by the ``out`` indices' ranges."""
        arrays, lead = self._flatten_batch(arrays)
        checked, sizes, dtype = self._bind(arrays)
        shape = self._out_shape(sizes)
        out = np.empty(shape if shape else (1,), dtype=dtype)
        self._run("forward", *checked, *self._dims(sizes), out)
        return self._unflatten(out, lead) if shape else out.reshape(())

    def vjp(self, *arrays_and_grad: object) -> tuple[Any, ...]:
        """``op.vjp(*inputs, grad_output)``: one gradient per input, of its shape and dtype
        (``None`` for integer inputs and inputs left out of ``wrt``)."""
        if not arrays_and_grad:
            raise ArgumentError(f"op {self.name!r}: vjp takes the inputs and then grad_output")
        *given, grad_output = arrays_and_grad
        arrays, lead = self._flatten_batch(tuple(given))
        checked, sizes, dtype = self._bind(arrays)
        shape = self._out_shape(sizes)
        g = np.asarray(grad_output)
        if g.dtype.kind not in "iuf" or g.dtype == np.bool_:
            raise DTypeError(
                f"op {self.name!r}: grad_output has dtype {g.dtype}; give a float array"
            )
        expected = self._unflatten(np.empty(shape, dtype=np.int8), lead).shape
        if g.shape != expected:
            raise ShapeError(
                f"op {self.name!r}: grad_output has shape {g.shape}, the output has shape "
                f"{expected}"
            )
        g = g.reshape(shape)
        g_arg: Any = float(g) if not shape else np.ascontiguousarray(g, dtype=dtype)
        grads = [np.empty(checked[n].shape, dtype=dtype) for n in self._wrt]
        self._run("vjp", *checked, *self._dims(sizes), g_arg, *grads)
        result: list[np.ndarray | None] = [None] * len(checked)
        for n, grad in zip(self._wrt, grads, strict=True):
            result[n] = grad.reshape(np.asarray(given[n]).shape) if lead is not None else grad
        return tuple(result)
