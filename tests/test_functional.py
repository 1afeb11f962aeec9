"""symgrad.grad / vjp / jvp / hvp / hessian against torch.autograd.functional, in float64.

Elementwise ops (one and two inputs, broadcasting), index-notation ops (softmax cross-entropy,
layer norm, a user-defined tanh layer).  torch differentiates its own reference formula with its
tape; symgrad evaluates compiled kernels of symbolically derived formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch
import torch.autograd.functional as taf

import symgrad as sg
from symgrad.builtins import BUILTINS, TENSOR_BUILTINS
from symgrad.errors import ArgumentError, ShapeError
from symgrad.functional import jvp_op, vjp_op

# torch's mse_loss warns when the target broadcasts; broadcasting is what is tested here
pytestmark = [
    pytest.mark.filterwarnings("ignore:Using a target size"),
    pytest.mark.usefixtures("torch_state"),
]

RTOL = 1e-10
ATOL = 1e-12


def tanh_layer() -> Any:
    """The user tensor op of test_torch_function (same formula and name: the same kernels)."""
    b, i, j = sp.symbols("b i j", integer=True)
    B, N, M = sp.symbols("B N M", integer=True, positive=True)
    X, W = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("W", shape=(M, N))
    expr = sp.tanh(sp.Sum(W[i, j] * X[b, j], (j, 0, N - 1)))
    return sg.tensor_op(expr, out=(b, i), inputs=[X, W], name="user_tanh_layer")


def _simplex(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    a = rng.uniform(0.1, 1.0, size=shape)
    return a / a.sum(-1, keepdims=True)


def case(name: str) -> tuple[Any, tuple[np.ndarray, ...], Callable[..., torch.Tensor]]:
    """(op, inputs, torch reference of the op's output)."""
    rng = np.random.default_rng(CASES.index(name))
    if name in BUILTINS:
        entry = BUILTINS[name]
        inputs: tuple[np.ndarray, ...] = (rng.normal(size=(2, 3)),)
        if len(entry.inputs) == 2:
            inputs += (rng.normal(size=(3,)),)  # broadcasts against the first

        def ref(*t: torch.Tensor) -> torch.Tensor:
            return entry.torch_ref(torch, *t, **entry.params)  # type: ignore[no-any-return]

        return sg.builtin(name), inputs, ref
    if name in TENSOR_BUILTINS:
        tentry = TENSOR_BUILTINS[name]
        if name == "softmax_cross_entropy":
            inputs = (rng.normal(size=(3, 4)), _simplex(rng, (3, 4)))
        else:  # layer_norm
            inputs = (rng.normal(size=(3, 4)), rng.normal(size=(4,)), rng.normal(size=(4,)))

        def tref(*t: torch.Tensor) -> torch.Tensor:
            return tentry.torch_ref(torch, *t, **tentry.params)  # type: ignore[no-any-return]

        return sg.builtin(name), inputs, tref
    assert name == "user_tanh_layer"
    return (
        tanh_layer(),
        (rng.normal(size=(2, 3)), rng.normal(size=(4, 3))),
        lambda x, w: torch.tanh(x @ w.T),
    )


CASES = ["sigmoid", "gelu", "mse", "softmax_cross_entropy", "layer_norm", "user_tanh_layer"]


def tensors(arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(a, dtype=torch.float64) for a in arrays)


def close(ours: Any, ref: Any) -> None:
    if isinstance(ref, (tuple, list)):
        assert isinstance(ours, tuple) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            close(a, b)
        return
    ref = ref.detach().numpy()
    assert np.shape(ours) == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_hvp_equals_torch(name: str) -> None:
    op, inputs, ref = case(name)
    rng = np.random.default_rng(7)
    v = tuple(rng.normal(size=a.shape) for a in inputs)
    value, products = sg.hvp(op, inputs, v)
    ref_value, ref_products = taf.hvp(lambda *t: ref(*t).sum(), tensors(inputs), tensors(v))
    close(value, ref_value)
    close(products, ref_products)


@pytest.mark.parametrize("name", CASES)
def test_hessian_equals_torch(name: str) -> None:
    op, inputs, ref = case(name)
    ours = sg.hessian(op, inputs)
    close(ours, taf.hessian(lambda *t: ref(*t).sum(), tensors(inputs)))


@pytest.mark.parametrize("name", CASES)
def test_jvp_vjp_grad_equal_torch(name: str) -> None:
    op, inputs, ref = case(name)
    rng = np.random.default_rng(8)
    t = tuple(rng.normal(size=a.shape) for a in inputs)
    y, jy = sg.jvp(op, inputs, t)
    ref_y, ref_jy = taf.jvp(ref, tensors(inputs), tensors(t))
    close(y, ref_y)
    close(jy, ref_jy)
    w = rng.normal(size=y.shape)
    y2, grads = sg.vjp(op, inputs, w)
    close(y2, ref_y)
    close(grads, taf.vjp(ref, tensors(inputs), torch.tensor(w))[1])
    close(sg.grad(op, inputs), taf.vjp(lambda *a: ref(*a).sum(), tensors(inputs))[1])


def test_single_array_form_and_float32() -> None:
    """One array in, one array out (torch's convention); float32 in, float32 out."""
    op = sg.builtin("sigmoid")
    x = np.linspace(-3.0, 3.0, 4)
    h = sg.hessian(op, x)
    assert isinstance(h, np.ndarray) and h.shape == (4, 4)
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(np.diag(h), s * (1 - s) * (1 - 2 * s), rtol=1e-12)
    np.testing.assert_array_equal(h - np.diag(np.diag(h)), 0.0)
    value, hv = sg.hvp(op, x.astype(np.float32), np.ones(4, dtype=np.float32))
    assert isinstance(hv, np.ndarray)
    assert value.dtype == np.float32 and hv.dtype == np.float32
    np.testing.assert_allclose(hv, np.diag(h), rtol=1e-5, atol=1e-7)


def test_derived_ops_are_built_once_and_compiled_like_any_op() -> None:
    op = sg.builtin("softmax_cross_entropy")
    assert vjp_op(op) is vjp_op(op) and jvp_op(op) is jvp_op(op)
    derived = vjp_op(op).op
    assert derived.input_names == ("X", "T", "grad_y", "v_X", "v_T")
    assert "def vjp(" in derived.source  # generated Numba source, as for any op
    assert jvp_op(op).input_names == ("X", "T", "t_X", "t_T")


def test_functional_errors() -> None:
    op = sg.builtin("mse")
    x, y = np.ones(3), np.zeros(3)
    with pytest.raises(ArgumentError, match=r"takes 2 input\(s\) \(x, y\), got 1"):
        sg.grad(op, x)
    with pytest.raises(ShapeError, match=r"v for input 'y' has shape \(2,\)"):
        sg.hvp(op, (x, y), (x, np.ones(2)))
    with pytest.raises(ArgumentError, match="same form as inputs"):
        sg.jvp(op, (x, y), x)
    with pytest.raises(ArgumentError, match="max_size=4"):
        sg.hessian(op, (x, y), max_size=4)
    with pytest.raises(ArgumentError, match="op made by symgrad"):
        sg.grad(lambda a: a, x)  # type: ignore[arg-type]
