"""Derivatives of any op as functions of arrays: ``grad``, ``vjp``, ``jvp``, ``hvp``, ``hessian``.

The signatures follow ``torch.autograd.functional``: ``inputs`` is one array or a tuple of
arrays (one per input of the op, in call order), and a result has the same form — a tuple for a
tuple, an array for an array.  "The output" of an elementwise op is the array of its values;
``grad``, ``hvp`` and ``hessian`` differentiate the *sum* of the output's elements (for an op
with a scalar output, the output itself).

Every derivative is a compiled op built by :mod:`symgrad.api` from a formula derived in
:mod:`symgrad.symbolic.higher`: the JVP is the formula differentiated in the direction of the
tangents (forward mode); second derivatives come from the op's derived VJP, contracted with a
cotangent and differentiated again (:func:`vjp_op`) — no finite differences, no tape.

>>> import numpy as np, sympy as sp, symgrad as sg
>>> x = sp.Symbol("x", real=True)
>>> cube = sg.elementwise(x**3, inputs=[x], name="doc_cube")
>>> sg.grad(cube, np.array([1.0, 2.0]))
array([ 3., 12.])
>>> sg.hvp(cube, np.array([1.0, 2.0]), np.array([1.0, 1.0]))
(array(9.), array([ 6., 12.]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .api import elementwise, tensor_op
from .errors import ArgumentError, ShapeError
from .runtime.elementwise import ElementwiseOp
from .runtime.tensor import TensorOp
from .symbolic.higher import elementwise_jvp, elementwise_vjp_dot, tensor_jvp, tensor_vjp_dot

Op = ElementwiseOp | TensorOp
Arrays = np.ndarray | Sequence[np.ndarray]

#: ``hessian`` refuses inputs with more elements than this (its result has size² entries).
HESSIAN_MAX_SIZE = 4096


@dataclass(frozen=True)
class VJPOp:
    """An op's derived VJP, contracted with cotangents of its outputs, compiled as an op.

    ``op`` is ``H(*inputs, grad_y, *v) = Σ_k ⟨v_k, grad_x_k(inputs, grad_y)⟩``
    (:mod:`symgrad.symbolic.higher`): elementwise for an elementwise op, a scalar for a tensor
    op.  Its VJP with a unit cotangent is the VJP of the VJP (:meth:`vjp`).  A tensor op with
    a scalar output takes ``grad_y`` with shape ``(1,)`` inside ``H``; :meth:`vjp` reshapes.
    """

    op: Op
    n_inputs: int
    scalar_output: bool

    def vjp(
        self, inputs: Sequence[np.ndarray], grad_y: np.ndarray, v: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, ...]:
        """The VJP of the base op's VJP at ``(inputs, grad_y)`` with cotangents ``v``.

        ``v[k]`` has the shape of ``inputs[k]``.  Returns ``n + 1`` arrays: the gradients
        with respect to each input, then with respect to ``grad_y`` (of ``grad_y``'s shape).
        """
        g = np.asarray(grad_y)
        args = [*inputs, g.reshape(1) if self.scalar_output else g, *v]
        grads = self.op.vjp(*args, np.ones((), dtype=g.dtype))
        n = self.n_inputs
        return (*grads[:n], grads[n].reshape(g.shape))


_VJP_OPS: dict[str, VJPOp] = {}
_JVP_OPS: dict[str, Op] = {}


def _check_op(op: object, what: str) -> Op:
    if not isinstance(op, (ElementwiseOp, TensorOp)):
        raise ArgumentError(
            f"{what} takes an op made by symgrad.elementwise, symgrad.tensor_op or "
            f"symgrad.builtin, got {op!r}"
        )
    return op


def vjp_op(op: Op) -> VJPOp:
    """The derived VJP of ``op`` as a compiled op of its own (built once per op).

    >>> import numpy as np, sympy as sp, symgrad as sg
    >>> x = sp.Symbol("x", real=True)
    >>> d = vjp_op(sg.elementwise(x**3, inputs=[x], name="doc_cube"))
    >>> d.op.input_names      # H(x, grad_y, v_x) = grad_y · v_x · 3x²
    ('x', 'grad_y', 'v_x')
    >>> d.vjp([np.array(2.0)], np.array(1.0), [np.array(1.0)])   # ∂H/∂x, ∂H/∂grad_y
    (array(12.), array(12.))
    """
    op = _check_op(op, "vjp_op")
    key = op.spec.key
    if key not in _VJP_OPS:
        name = f"{op.name}_vjp"
        if isinstance(op, ElementwiseOp):
            formula = elementwise_vjp_dot(op.derivation())
            spec = op.spec
            derived: Op = elementwise(
                formula.expr, inputs=formula.inputs, name=name,
                fastmath=spec.fastmath, parallel=spec.parallel,
            )
            scalar = False
        else:
            tformula = tensor_vjp_dot(op.derivation())
            derived = tensor_op(tformula.expr, out=tformula.out, inputs=tformula.inputs, name=name)
            scalar = not op.spec.out
        _VJP_OPS[key] = VJPOp(derived, len(op.input_names), scalar)
    return _VJP_OPS[key]


def jvp_op(op: Op) -> Op:
    """The JVP of ``op`` as a compiled op: ``J(*inputs, *tangents)``, one tangent per input.

    ``J`` has the output's shape: ``Σ_k (∂y/∂x_k) · t_k``, derived in forward mode.
    """
    op = _check_op(op, "jvp_op")
    key = op.spec.key
    if key not in _JVP_OPS:
        name = f"{op.name}_jvp"
        if isinstance(op, ElementwiseOp):
            formula = elementwise_jvp(op.spec)
            _JVP_OPS[key] = elementwise(
                formula.expr, inputs=formula.inputs, name=name,
                fastmath=op.spec.fastmath, parallel=op.spec.parallel,
            )
        else:
            tformula = tensor_jvp(op.spec)
            _JVP_OPS[key] = tensor_op(
                tformula.expr, out=tformula.out, inputs=tformula.inputs, name=name
            )
    return _JVP_OPS[key]


# -- the functional API --------------------------------------------------------------------


def _unpack(op: Op, inputs: Arrays, what: str) -> tuple[list[np.ndarray], bool]:
    """``(arrays, given_as_tuple)``; the count is checked against the op's inputs."""
    is_tuple = isinstance(inputs, (tuple, list))
    arrays = [np.asarray(a) for a in inputs] if is_tuple else [np.asarray(inputs)]
    if len(arrays) != len(op.input_names):
        raise ArgumentError(
            f"{what}: op {op.name!r} takes {len(op.input_names)} input(s) "
            f"({', '.join(op.input_names)}), got {len(arrays)}; pass a tuple with one array per "
            "input"
        )
    return arrays, is_tuple


def _like_inputs(
    op: Op, v: Arrays, inputs: list[np.ndarray], is_tuple: bool, what: str, dtype: np.dtype
) -> list[np.ndarray]:
    """One array per input, of that input's shape, cast to ``dtype``."""
    if is_tuple != isinstance(v, (tuple, list)):
        raise ArgumentError(f"{what}: give v in the same form as inputs (a tuple for a tuple)")
    vs = [np.asarray(a) for a in v] if isinstance(v, (tuple, list)) else [np.asarray(v)]
    if len(vs) != len(inputs):
        raise ArgumentError(f"{what}: {len(inputs)} input(s) but {len(vs)} vector(s) in v")
    for name, a, b in zip(op.input_names, inputs, vs, strict=True):
        if a.shape != b.shape:
            raise ShapeError(
                f"{what}: v for input {name!r} has shape {b.shape}, the input has shape "
                f"{a.shape}; they must match"
            )
    return [np.asarray(b, dtype=dtype) for b in vs]


def _pack(values: Sequence[np.ndarray], is_tuple: bool) -> np.ndarray | tuple[np.ndarray, ...]:
    return tuple(values) if is_tuple else values[0]


def grad(op: Op, inputs: Arrays) -> np.ndarray | tuple[np.ndarray, ...]:
    """The gradient of ``Σ op(*inputs)``: one array per input, of that input's shape.

    For an elementwise op it is each partial derivative at every element (summed over any
    broadcast axis); for a tensor op with a scalar output, its gradient.

    >>> import numpy as np, symgrad as sg
    >>> sg.grad(sg.builtin("mse"), (np.array([3.0]), np.array([1.0])))
    (array([4.]), array([-4.]))
    """
    op = _check_op(op, "grad")
    arrays, is_tuple = _unpack(op, inputs, "grad")
    y = op(*arrays)
    return _pack(op.vjp(*arrays, np.ones_like(y)), is_tuple)


def vjp(
    op: Op, inputs: Arrays, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray | tuple[np.ndarray, ...]]:
    """``(output, vᵀ·J)``: the output and the vector-Jacobian product, one array per input.

    ``v`` has the output's shape.
    """
    op = _check_op(op, "vjp")
    arrays, is_tuple = _unpack(op, inputs, "vjp")
    y = op(*arrays)
    return y, _pack(op.vjp(*arrays, np.asarray(v)), is_tuple)


def jvp(op: Op, inputs: Arrays, v: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """``(output, J·v)``: the output and its directional derivative along ``v``.

    ``v`` holds one tangent per input, of that input's shape; ``J·v`` has the output's shape.
    Computed by the compiled forward-mode op :func:`jvp_op`.
    """
    op = _check_op(op, "jvp")
    arrays, is_tuple = _unpack(op, inputs, "jvp")
    y = op(*arrays)
    tangents = _like_inputs(op, v, arrays, is_tuple, "jvp", y.dtype)
    return y, jvp_op(op)(*arrays, *tangents)


def hvp(
    op: Op, inputs: Arrays, v: Arrays
) -> tuple[np.ndarray, np.ndarray | tuple[np.ndarray, ...]]:
    """``(Σ output, H·v)``: the Hessian of ``Σ op(*inputs)`` times ``v``, one array per input.

    ``v`` holds one vector per input, of that input's shape; so does the result.  ``H·v`` is
    the gradient of ``⟨v, ∇ Σ y⟩``, the op's derived VJP (with a cotangent of ones) contracted
    with ``v`` and differentiated symbolically (:func:`vjp_op`).
    """
    op = _check_op(op, "hvp")
    arrays, is_tuple = _unpack(op, inputs, "hvp")
    y = op(*arrays)
    vs = _like_inputs(op, v, arrays, is_tuple, "hvp", y.dtype)
    products = vjp_op(op).vjp(arrays, np.ones_like(y), vs)[: len(arrays)]
    return np.asarray(y.sum(), dtype=y.dtype), _pack(products, is_tuple)


def hessian(
    op: Op, inputs: Arrays, *, max_size: int = HESSIAN_MAX_SIZE
) -> np.ndarray | tuple[tuple[np.ndarray, ...], ...]:
    """The Hessian of ``Σ op(*inputs)``, for small inputs.

    One input ``x``: an array of shape ``x.shape + x.shape``.  A tuple of inputs: a tuple of
    tuples, ``H[i][j]`` of shape ``inputs[i].shape + inputs[j].shape`` holding
    ``∂²/∂inputs[i]∂inputs[j]`` — the layout of ``torch.autograd.functional.hessian``.  Built
    column by column from :func:`hvp` with unit vectors; inputs with more than ``max_size``
    elements in all are refused.
    """
    op = _check_op(op, "hessian")
    arrays, is_tuple = _unpack(op, inputs, "hessian")
    total = sum(a.size for a in arrays)
    if total > max_size:
        raise ArgumentError(
            f"hessian: the inputs have {total} elements, more than max_size={max_size}; the "
            f"Hessian would have {total**2} entries. Use hvp for products with vectors, or "
            "raise max_size"
        )
    y = op(*arrays)
    derived = vjp_op(op)
    ones = np.ones_like(y)
    blocks = [
        [np.empty((*a.shape, *b.shape), dtype=y.dtype) for b in arrays] for a in arrays
    ]
    for j, b in enumerate(arrays):
        for flat in range(b.size):
            vs = [np.zeros(a.shape, dtype=y.dtype) for a in arrays]
            vs[j].reshape(-1)[flat] = 1
            column = derived.vjp(arrays, ones, vs)
            for i, a in enumerate(arrays):  # a view: the blocks are C-contiguous
                blocks[i][j].reshape((*a.shape, b.size))[..., flat] = column[i]
    if not is_tuple:
        return blocks[0][0]
    return tuple(tuple(row) for row in blocks)
