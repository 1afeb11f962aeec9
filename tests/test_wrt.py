"""``wrt``: ops that compute only some of their gradients (kernels derived for just those)."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch
from torch.autograd import gradcheck, gradgradcheck

import symgrad as sg
from symgrad import torch as sgt
from symgrad.errors import ArgumentError, DefinitionError


def _bce_inputs(n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=n) * 4, (rng.uniform(size=n) > 0.5).astype(np.float64)


def test_elementwise_wrt_computes_the_chosen_gradients_only() -> None:
    x, y = _bce_inputs()
    full, only_x = sg.builtin("bce_with_logits"), sg.builtin("bce_with_logits", wrt=["x"])
    assert only_x is not full and only_x.spec.key != full.spec.key
    g = np.linspace(-1.0, 1.0, x.size)
    gx, gy = only_x.vjp(x, y, g)
    fx, fy = full.vjp(x, y, g)
    assert gy is None and fy is not None
    np.testing.assert_array_equal(gx, fx)
    for reduction in ("none", "sum", "mean"):
        value, (vx, vy) = only_x.value_and_vjp(x, y, reduction=reduction)
        ref_value, (rx, _) = full.value_and_vjp(x, y, reduction=reduction)
        assert vy is None
        np.testing.assert_array_equal(value, ref_value)
        np.testing.assert_array_equal(vx, rx)
    assert "grad_t_y" not in only_x.source and "grad_t_y" in full.source  # y's gradient array
    assert [str(p.wrt) for p in only_x.derivation().partials] == ["x"]


def test_elementwise_wrt_by_symbol_and_broadcasting() -> None:
    a, b = sp.symbols("a b", real=True)
    op = sg.elementwise(a * sp.exp(b), inputs=[a, b], name="wrt_scaled_exp", wrt=[b])
    ga, gb = op.vjp(np.full((2, 3), 2.0), np.zeros(3), np.ones((2, 3)))
    assert ga is None
    np.testing.assert_array_equal(gb, np.full(3, 4.0))  # Σ over the broadcast axis of a·e^b


@pytest.mark.parametrize(
    "wrt, message",
    [
        (["z"], "wrt names 'z', which is not an input"),
        ([], "wrt must name one or more inputs"),
        (["x", "x"], "each once"),
        ("x", "wrt is a list of input names"),
    ],
)
def test_bad_wrt_is_named(wrt: object, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        sg.builtin("bce_with_logits", wrt=wrt)  # type: ignore[arg-type]


def test_tensor_builtin_wrt() -> None:
    rng = np.random.default_rng(1)
    x, w, c = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), rng.normal(size=5)
    g = rng.normal(size=(4, 5))
    params_only = sg.builtin("linear", wrt=["W", "c"])
    gx, gw, gc = params_only.vjp(x, w, c, g)
    assert gx is None
    np.testing.assert_allclose(gw, g.T @ x, rtol=1e-14)
    np.testing.assert_allclose(gc, g.sum(axis=0), rtol=1e-14)
    assert "grad_t_X" not in params_only.source and "grad_t_W" in params_only.source
    with pytest.raises(DefinitionError, match="wrt names 'Q'"):
        sg.builtin("linear", wrt=["Q"])


def test_torch_function_of_an_elementwise_wrt_op(torch_state: None) -> None:
    """Double backward works on the op's gradients, and asking for another one is an error."""
    op = sg.builtin("bce_with_logits", wrt=["x"])
    x, y = _bce_inputs(5)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y)
    fn = sgt.function(op)
    assert gradcheck(lambda a: fn.apply(a, ty), (tx,))
    assert gradgradcheck(lambda a: fn.apply(a, ty), (tx,))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(tx, ty, reduction="none")
    torch.testing.assert_close(fn.apply(tx, ty), ref, rtol=1e-13, atol=1e-15)
    with pytest.raises(ArgumentError, match=r"no gradient for input 'y'"):
        fn.apply(tx, ty.clone().requires_grad_(True)).sum().backward()
