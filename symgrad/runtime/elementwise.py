"""ElementwiseOp: the checked Python wrapper around an op's compiled kernels.

Numba does not bounds-check, so every argument is checked here before a kernel runs: the number
of arrays, their dtypes (float32 or float64, one dtype per call), and their shapes (NumPy
broadcasting; a gradient is summed back to the shape of its input).  Non-contiguous arrays are
copied to contiguous ones.  Results have the inputs' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import ArgumentError, DTypeError, ShapeError
from .compiled import CompiledOp, Saved
from .output_pool import empty

if TYPE_CHECKING:  # the symbolic stages import SymPy; running kernels does not need it
    from ..symbolic.derive import Derivation
    from ..symbolic.spec import OpSpec

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = np.dtype(np.int64)
Reduction = Literal["none", "sum", "mean"]


def _as_float_array(value: object, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype not in _FLOATS:
        if array.dtype.newbyteorder("=") in _FLOATS:
            native = array.dtype.newbyteorder("=").name
            raise DTypeError(
                f"{what} is {native} in the other byte order ({array.dtype.str}); symgrad "
                f"computes in the machine's: convert it first, x.astype(np.{native})"
            )
        raise DTypeError(
            f"{what} has dtype {array.dtype}; symgrad computes in float32 or float64: convert "
            f"it first, e.g. np.asarray(x, dtype=np.float64)"
        )
    return canonical_dtype(array)


def canonical_dtype(array: np.ndarray) -> np.ndarray:
    """``array``, or a view of it with NumPy's own dtype object where it has an equal copy
    (an unpickled array's dtype is one), which the ops' fast identity checks would miss."""
    dtype = array.dtype
    if dtype.isbuiltin != 1:  # not NumPy's own object: find it
        for own in (*_FLOATS, _INT64):
            if dtype == own:
                return array.view(own)
    return array


def mean(total: float, count: int) -> float:
    """``total / count``: the mean of ``count`` values summing to ``total``.  The mean of no
    values is NaN, as torch's mean of an empty tensor (not 0: an empty batch has no loss)."""
    return total / count if count else math.nan


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` (of the broadcast shape) back down to an input's ``shape``."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + k for k, n in enumerate(shape) if n == 1 and grad.shape[lead + k] != 1
    )
    return np.asarray(grad.sum(axis=axes)).reshape(shape)  # an array even when 0-d


class ElementwiseOp(CompiledOp["Derivation"]):
    """A compiled elementwise op.  Create it with :func:`symgrad.elementwise`.

    ``op(*arrays)`` is the forward, ``op.vjp(*arrays, grad_output)`` the gradients,
    ``op.value_and_vjp`` both in one pass; ``op.source`` is the generated Numba source and
    ``op.derivation()`` the symbolic derivation behind it.
    """

    def __init__(
        self,
        spec: OpSpec,
        path: Path,
        derive: Callable[[], Derivation],
        derivation: Derivation | None,
        emit: Callable[[Derivation], str],
    ) -> None:
        super().__init__(spec.name, path, derive, derivation, emit, spec.key)
        self._spec: OpSpec | None = spec
        self._spec_factory: Callable[[], OpSpec] = lambda: spec
        self.input_names = tuple(s.name for s in spec.inputs)
        self._wrt = tuple(spec.inputs.index(s) for s in spec.wrt)

    @classmethod
    def stored(
        cls,
        name: str,
        key: str,
        path: Path,
        inputs: tuple[str, ...],
        wrt: tuple[int, ...],
        spec: Callable[[], OpSpec],
        derive: Callable[[], Derivation],
        emit: Callable[[Derivation], str],
    ) -> ElementwiseOp:
        """An op from the cache without SymPy; its spec built by ``spec`` on first use."""
        op = cls.__new__(cls)
        CompiledOp.__init__(op, name, path, derive, None, emit, key)
        op._spec, op._spec_factory = None, spec
        op.input_names = tuple(inputs)
        op._wrt = tuple(wrt)
        return op

    @property
    def spec(self) -> OpSpec:
        """The validated formula (built on first use for an op loaded from the cache)."""
        if self._spec is None:
            self._spec = self._spec_factory()
        return self._spec

    def __repr__(self) -> str:
        consts = "".join(f", {k}={v!r}" for k, v in self.spec.constants)
        return f"<symgrad elementwise op {self.name}({', '.join(self.input_names)}{consts})>"

    # -- kernel calls ----------------------------------------------------------------------

    def _inputs(
        self, arrays: tuple[object, ...]
    ) -> tuple[list[np.ndarray], tuple[int, ...], np.dtype]:
        n = len(self.input_names)
        if len(arrays) != n:
            raise ArgumentError(
                f"op {self.name!r} takes {n} input array(s) ({', '.join(self.input_names)}), "
                f"got {len(arrays)}"
            )
        # NumPy scalars carry a dtype like arrays do (np.float32(1.0) is a float32 input);
        # only Python numbers and lists take the arrays' dtype.
        given = [np.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a for a in arrays]
        dtypes = {a.dtype for a in given if isinstance(a, np.ndarray)}
        if len(dtypes) > 1:
            for nm, a in zip(self.input_names, given, strict=True):
                if isinstance(a, np.ndarray) and not a.dtype.isnative:
                    _as_float_array(a, f"op {self.name!r} input {nm!r}")  # names the byte order
            listing = ", ".join(
                f"{nm}: {a.dtype}"
                for nm, a in zip(self.input_names, given, strict=True)
                if isinstance(a, np.ndarray)
            )
            raise DTypeError(
                f"op {self.name!r}: inputs have different dtypes ({listing}); cast them to one "
                "dtype, float32 or float64"
            )
        dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
        checked = []
        for nm, a in zip(self.input_names, given, strict=True):
            if isinstance(a, np.ndarray):
                checked.append(_as_float_array(a, f"op {self.name!r} input {nm!r}"))
            else:  # a Python scalar or list takes the arrays' dtype
                raw = np.asarray(a)
                if raw.dtype.kind not in "iuf" or raw.dtype == np.bool_:
                    _as_float_array(raw, f"op {self.name!r} input {nm!r}")
                checked.append(raw.astype(dtype))
        try:
            shape = np.broadcast_shapes(*(a.shape for a in checked))
        except ValueError:
            listing = ", ".join(
                f"{nm}: {a.shape}" for nm, a in zip(self.input_names, checked, strict=True)
            )
            raise ShapeError(
                f"op {self.name!r}: input shapes do not match and do not broadcast ({listing}); "
                "give arrays of one shape, or shapes NumPy can broadcast together"
            ) from None
        return checked, shape, dtype

    @staticmethod
    def _flat(arrays: list[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
        return [np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(-1) for a in arrays]

    def _cotangent(
        self, grad_output: object, shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[np.ndarray, int]:
        g = np.asarray(grad_output)
        if g.dtype.kind not in "iuf" or g.dtype == np.bool_:
            raise DTypeError(
                f"op {self.name!r}: grad_output has dtype {g.dtype}; give a float array"
            )
        if g.ndim == 0:
            return np.full(1, g, dtype=dtype), 0
        if g.shape != shape:
            raise ShapeError(
                f"op {self.name!r}: grad_output has shape {g.shape}, the output has shape "
                f"{shape}; give a cotangent of the output's shape (or a scalar)"
            )
        return np.ascontiguousarray(g, dtype=dtype).reshape(-1), 1

    def output_shape(self, *arrays: object) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of ``op(*arrays)``, its arguments checked, nothing computed."""
        _, shape, dtype = self._inputs(arrays)
        return tuple(shape), dtype

    def __call__(self, *arrays: object) -> np.ndarray:
        """Forward: ``f`` applied element by element; inputs broadcast, output of their dtype."""
        checked, shape, dtype = self._inputs(arrays)
        flat = self._flat(checked, shape)
        out = empty(flat[0].shape, dtype)
        self._run("forward", dtype, *flat, out)
        return out.reshape(shape)

    def forward_saved(self, *arrays: object) -> tuple[np.ndarray, Saved | None]:
        """The forward, and the local partial derivatives ``∂f/∂x`` computed in the same pass
        (``None`` when they cost no math function to recompute: relu, a sum): then
        ``op.vjp(*inputs, grad_output, saved=saved)`` is a product, no ``exp``/``erf`` again."""
        if not getattr(self.module, "SAVE_PARTIALS", False):
            return self(*arrays), None
        checked, shape, dtype = self._inputs(arrays)
        flat = self._flat(checked, shape)
        partials = self._gradients(flat[0].shape, dtype)
        out = empty(flat[0].shape, dtype)
        self._run("value_and_vjp", dtype, *flat, np.ones(1, dtype=dtype), 0, out, *partials)
        return out.reshape(shape), Saved(out, tuple(partials))

    def vjp(self, *arrays_and_grad: object, saved: Saved | None = None) -> tuple[Any, ...]:
        """``op.vjp(*inputs, grad_output)``: one gradient per input, of its shape and dtype
        (``None`` for an input outside the op's ``wrt``).

        ``grad_output`` has the output's shape (or is a scalar, broadcast).  ``saved``: what
        :meth:`forward_saved` returned for these inputs (the local partials, multiplied by the
        cotangent instead of being evaluated again).
        """
        if not arrays_and_grad:
            raise ArgumentError(f"op {self.name!r}: vjp takes the inputs and then grad_output")
        *arrays, grad_output = arrays_and_grad
        checked, shape, dtype = self._inputs(tuple(arrays))
        if saved is not None:
            g, _ = self._cotangent(grad_output, shape, dtype)
            grads = [np.multiply(g, p, out=empty(p.shape, dtype)) for p in saved.arrays]
            return self._shaped(grads, checked, shape)
        flat = self._flat(checked, shape)
        g, step = self._cotangent(grad_output, shape, dtype)
        grads = self._gradients(flat[0].shape, dtype)
        self._run("vjp", dtype, *flat, g, step, *grads)
        return self._shaped(grads, checked, shape)

    def value_and_vjp(
        self, *arrays: object, grad_output: object = 1.0, reduction: Reduction = "none"
    ) -> tuple[np.ndarray, tuple[Any, ...]]:
        """Value and gradients in one pass over memory (``None`` for inputs outside ``wrt``).

        ``reduction="none"``: the elementwise values, and ``grad_output`` of the output's shape
        (or a scalar).  ``"sum"`` / ``"mean"``: the reduced value as a 0-d array, and the
        gradients of ``grad_output * sum`` (or mean) — the form of a loss.
        """
        checked, shape, dtype = self._inputs(arrays)
        flat = self._flat(checked, shape)
        grads = self._gradients(flat[0].shape, dtype)
        if reduction == "none":
            g, step = self._cotangent(grad_output, shape, dtype)
            out = empty(flat[0].shape, dtype)
            self._run("value_and_vjp", dtype, *flat, g, step, out, *grads)
            value = out.reshape(shape)
        elif reduction in ("sum", "mean"):
            g = np.asarray(grad_output)
            if g.ndim != 0 or g.dtype.kind not in "iuf" or g.dtype == np.bool_:
                raise ArgumentError(
                    f"op {self.name!r}: with reduction={reduction!r} grad_output is a real "
                    f"scalar, got {grad_output!r}"
                )
            count = int(np.prod(shape))
            # the mean's weight 1/count (NaN for no elements: then there is no gradient to scale)
            scale = float(g) * mean(1.0, count) if reduction == "mean" else float(g)
            total = self._run("value_and_vjp_sum", dtype, *flat, dtype.type(scale), *grads)
            value = np.asarray(mean(total, count) if reduction == "mean" else total, dtype=dtype)
        else:
            raise ArgumentError(
                f"op {self.name!r}: reduction must be 'none', 'sum' or 'mean', got {reduction!r}"
            )
        return value, self._shaped(grads, checked, shape)

    def _gradients(self, size: tuple[int, ...], dtype: np.dtype) -> list[np.ndarray]:
        """Empty flat gradient arrays, one per input in the op's ``wrt``."""
        return [empty(size, dtype) for _ in self._wrt]

    def _shaped(
        self, grads: list[np.ndarray], checked: list[np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Any, ...]:
        """One gradient per input, summed back to its shape; None for inputs outside wrt."""
        result: list[np.ndarray | None] = [None] * len(checked)
        for n, gr in zip(self._wrt, grads, strict=True):
            result[n] = _unbroadcast(gr.reshape(shape), checked[n].shape)
        return tuple(result)
