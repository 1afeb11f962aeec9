"""TensorOp: the checked Python wrapper around a tensor op's compiled kernels.

Dims are bound from the arrays' shapes; a dim bound to two different sizes is a
:class:`~symgrad.errors.ShapeError` naming the dim and both arrays.  Arrays must have the
declared rank and one float dtype; non-contiguous arrays are copied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import sympy as sp

from ..errors import ArgumentError, DTypeError, ShapeError
from ..symbolic.index import TensorDerivation, TensorSpec
from .cache import import_module, purge_compiled, verified_text
from .elementwise import _as_float_array


class TensorOp:
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
        self.spec = spec
        self.name = spec.name
        self.input_names = tuple(str(b.label) for b in spec.inputs)
        self._path = path
        self._derive = derive
        self._derivation = derivation
        self._module: ModuleType | None = None
        self._recovered = False

    @property
    def source(self) -> str:
        """The generated Numba source of this op's kernels."""
        text = verified_text(self._path)
        if text is None:
            raise FileNotFoundError(
                f"the kernel source of {self.name!r} vanished from {self._path}"
            )
        return text

    def derivation(self) -> TensorDerivation:
        """The symbolic derivation behind the kernels."""
        if self._derivation is None:
            self._derivation = self._derive()
        return self._derivation

    def __repr__(self) -> str:
        return f"<symgrad tensor op {self.name}({', '.join(self.input_names)})>"

    def _run(self, name: str, *args: Any) -> Any:
        try:
            if self._module is None:
                self._module = import_module(self._path)
            return getattr(self._module, name)(*args)
        except Exception:
            if self._recovered:
                raise
            self._recovered = True  # a corrupt Numba cache file: drop it and retry once
            purge_compiled(self._path)
            self._module = import_module(self._path)
            return getattr(self._module, name)(*args)

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
            _as_float_array(a, f"op {self.name!r} input {nm!r}")
            for nm, a in zip(self.input_names, arrays, strict=True)
        ]
        dtypes = {a.dtype for a in checked}
        if len(dtypes) > 1:
            listing = ", ".join(
                f"{nm}: {a.dtype}" for nm, a in zip(self.input_names, checked, strict=True)
            )
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
        for nm, axis, dim, size, shape in deferred:
            expected = dim.xreplace(sizes)
            if not expected.is_Integer or int(expected) != size:
                raise ShapeError(
                    f"op {self.name!r}: axis {axis} of {nm!r} (shape {shape}) should be "
                    f"{dim} = {expected}, got {size}"
                )
        return [np.ascontiguousarray(a) for a in checked], sizes, dtypes.pop()

    def _out_shape(self, sizes: dict[sp.Symbol, int]) -> tuple[int, ...]:
        return tuple(int(d.xreplace(sizes)) for d in self.spec.out_shape)

    def _dims(self, sizes: dict[sp.Symbol, int]) -> list[int]:
        return [sizes[d] for d in self.spec.dims]

    def __call__(self, *arrays: object) -> np.ndarray:
        """Forward: the output tensor, of shape given by the ``out`` indices' ranges."""
        checked, sizes, dtype = self._bind(arrays)
        shape = self._out_shape(sizes)
        out = np.empty(shape if shape else (1,), dtype=dtype)
        self._run("forward", *checked, *self._dims(sizes), out)
        return out if shape else out.reshape(())

    def vjp(self, *arrays_and_grad: object) -> tuple[np.ndarray, ...]:
        """``op.vjp(*inputs, grad_output)``: one gradient per input, of its shape and dtype."""
        if not arrays_and_grad:
            raise ArgumentError(f"op {self.name!r}: vjp takes the inputs and then grad_output")
        *arrays, grad_output = arrays_and_grad
        checked, sizes, dtype = self._bind(tuple(arrays))
        shape = self._out_shape(sizes)
        g = np.asarray(grad_output)
        if g.dtype.kind not in "iuf" or g.dtype == np.bool_:
            raise DTypeError(
                f"op {self.name!r}: grad_output has dtype {g.dtype}; give a float array"
            )
        if g.shape != shape:
            raise ShapeError(
                f"op {self.name!r}: grad_output has shape {g.shape}, the output has shape {shape}"
            )
        g_arg: Any = float(g) if not shape else np.ascontiguousarray(g, dtype=dtype)
        grads = [np.empty(a.shape, dtype=dtype) for a in checked]
        self._run("vjp", *checked, *self._dims(sizes), g_arg, *grads)
        return tuple(grads)
