"""User-defined elementwise ops no built-in covers, against finite differences and torch.

Each op's torch twin is its formula written by hand in this file.  Tolerances: torch in float64
``rtol = 1e-10``, ``atol = 1e-12 × max|reference|``; finite differences (fourth-order central,
``h = 1e-3·max(1, |v|)``: truncation ~1e-12·f⁽⁵⁾, rounding ~1e-13·|f|) ``rtol = 1e-8``,
``atol = 1e-9 × max|reference|``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import symgrad as sg

x, y, w = sp.symbols("x y w", real=True)
alpha = sp.Symbol("alpha", real=True)
ALPHA = 0.3


def mish_torch(t):
    return t * torch.tanh(torch.log1p(torch.exp(t)))


def tri_torch(a, b, c):
    return ALPHA * a * b + torch.sin(c) * torch.exp(-a * a) / (1 + b * b)


def pw_torch(a):
    # sqrt(x² + 1) - 1 for x > 0, erf(x)/2 otherwise; torch.where differentiates both branches,
    # masked (the unselected one is finite everywhere here)
    return torch.where(a > 0, torch.sqrt(a * a + 1) - 1, torch.erf(a) / 2)


@pytest.fixture(scope="module")
def mish():
    # written naively; stabilization turns log(1 + exp(x)) into softplus
    return sg.elementwise(x * sp.tanh(sp.log(1 + sp.exp(x))), inputs=[x], name="mish_user")


@pytest.fixture(scope="module")
def tri():
    formula = alpha * x * y + sp.sin(w) * sp.exp(-x * x) / (1 + y * y)
    return sg.elementwise(formula, inputs=[x, y, w], name="tri_user", constants={alpha: ALPHA})


@pytest.fixture(scope="module")
def pw():
    formula = sp.Piecewise((sp.sqrt(x * x + 1) - 1, x > 0), (sp.erf(x) / 2, True))
    return sg.elementwise(formula, inputs=[x], name="pw_user")


def torch_value_and_grads(fn, arrays, grad_output):
    leaves = [torch.tensor(np.array(a, order="C"), dtype=torch.float64, requires_grad=True)
              for a in arrays]
    out = fn(*leaves)
    out.backward(torch.tensor(np.array(grad_output, order="C"), dtype=torch.float64))
    return out.detach().numpy(), [leaf.grad.numpy() for leaf in leaves]


def assert_close(got, want, rtol, atol_scale, what="", floor=0.0):
    """``|got - want| <= rtol·|want| + atol_scale·max(max|want|, floor)``: ``floor`` is the
    size of the terms that cancel where the reference is (near) 0."""
    want = np.asarray(want, dtype=np.float64)
    assert np.shape(got) == want.shape, (what, np.shape(got), want.shape)
    scale = max(float(np.max(np.abs(want), initial=0.0)), floor)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_scale * scale, err_msg=what)


def fd_vjp(op, arrays, g, k):
    """g · ∂op/∂(input k) by a fourth-order central difference of op's own forward."""
    v = arrays[k]
    h = 1e-3 * np.maximum(1.0, np.abs(v))

    def f(moved):
        return op(*[moved if j == k else a for j, a in enumerate(arrays)])

    return g * (f(v - 2 * h) - 8 * f(v - h) + 8 * f(v + h) - f(v + 2 * h)) / (12 * h)


def check(op, torch_fn, arrays, g, what):
    value = op(*arrays)
    grads = op.vjp(*arrays, g)
    ref_value, ref_grads = torch_value_and_grads(torch_fn, arrays, g)
    assert_close(value, ref_value, 1e-10, 1e-12, f"{what} forward")
    for k, (ours, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert ours.shape == np.shape(arrays[k]) and ours.dtype == np.float64
        assert_close(ours, ref, 1e-10, 1e-12, f"{what} gradient {k} vs torch")


# -- against torch and finite differences ----------------------------------------------------


def test_mish(mish):
    rng = np.random.default_rng(0)
    a = rng.uniform(-20, 20, 500)
    g = rng.normal(size=500)
    check(mish, mish_torch, [a], g, "mish")
    check(mish, torch.nn.functional.mish, [a], g, "mish vs torch.nn.functional.mish")
    smooth = a  # mish is smooth everywhere
    assert_close(mish.vjp(smooth, g)[0], fd_vjp(mish, [smooth], g, 0), 1e-8, 1e-9, "mish FD")
    assert "softplus" in mish.derivation().to_text()


def test_mish_edges_are_finite_and_match_torch(mish):
    a = np.array([-1e3, -30.0, -1.0, 0.0, 1.0, 30.0, 1e3])
    value, (grad,) = mish.value_and_vjp(a, grad_output=np.ones_like(a))
    assert np.isfinite(value).all() and np.isfinite(grad).all()
    ref_value, (ref_grad,) = torch_value_and_grads(torch.nn.functional.mish, [a], np.ones_like(a))
    assert_close(value, ref_value, 1e-10, 1e-12, "mish edges")
    assert_close(grad, ref_grad, 1e-10, 1e-12, "mish edge gradients")
    a32 = np.clip(a, -1e2, 1e2).astype(np.float32)
    value32, (grad32,) = mish.value_and_vjp(a32, grad_output=np.ones_like(a32))
    assert value32.dtype == np.float32 and np.isfinite(value32).all()
    assert np.isfinite(grad32).all()


def test_three_inputs_and_a_constant(tri):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(20, 30)) for _ in range(3)]
    g = rng.normal(size=(20, 30))
    check(tri, tri_torch, arrays, g, "tri")
    for k, ours in enumerate(tri.vjp(*arrays, g)):
        assert_close(ours, fd_vjp(tri, arrays, g, k), 1e-8, 1e-9, f"tri FD input {k}")
    assert dict(tri.spec.constants) == {"alpha": ALPHA}


def test_three_inputs_broadcast(tri):
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=(5, 1)), rng.normal(size=(1, 4)), rng.normal(size=(4,))]
    g = rng.normal(size=(5, 4))
    check(tri, tri_torch, arrays, g, "tri broadcast")


def test_three_inputs_float32(tri):
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=400).astype(np.float32) for _ in range(3)]
    g = rng.normal(size=400).astype(np.float32)
    value = tri(*arrays)
    grads = tri.vjp(*arrays, g)
    ref_value, ref_grads = torch_value_and_grads(tri_torch, arrays, g)
    # float32: unit roundoff 6e-8, a few dozen roundings
    assert value.dtype == np.float32
    assert_close(value, ref_value, 1e-5, 1e-6)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert ours.dtype == np.float32
        assert_close(ours, ref, 1e-5, 1e-6)


def test_erf_sqrt_piecewise(pw):
    rng = np.random.default_rng(4)
    a = rng.normal(size=600) * 2
    a = a[np.abs(a) > 0.01]  # finite differences need both sides of x on one branch
    g = rng.normal(size=a.shape)
    check(pw, pw_torch, [a], g, "piecewise")
    assert_close(pw.vjp(a, g)[0], fd_vjp(pw, [a], g, 0), 1e-8, 1e-9, "piecewise FD")


def test_piecewise_kink_takes_the_default_branch_like_torch(pw):
    """At x = 0 (condition x > 0 false) the derivative is erf's: 1/√π, as torch.where's."""
    a = np.array([0.0])
    _, (ref_grad,) = torch_value_and_grads(pw_torch, [a], np.ones(1))
    np.testing.assert_allclose(pw.vjp(a, np.ones(1))[0], ref_grad, rtol=1e-15)


def test_user_op_reduction(tri):
    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=50) for _ in range(3)]
    value, grads = tri.value_and_vjp(*arrays, grad_output=2.0, reduction="mean")
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    mean = tri_torch(*leaves).mean()
    (2.0 * mean).backward()
    terms = float(tri_torch(*map(torch.tensor, arrays)).abs().mean())
    np.testing.assert_allclose(float(value), mean.item(), rtol=1e-10, atol=1e-12 * terms)
    for ours, leaf in zip(grads, leaves, strict=True):
        assert_close(ours, leaf.grad.numpy(), 1e-10, 1e-12)


def test_input_names_that_clash_with_generated_code():
    """Inputs named like the kernels' own locals, a keyword, or a module are mangled safely."""
    i, out, lam, t0, np_ = sp.symbols("i out lambda _t0 np", real=True)
    op = sg.elementwise(i * sp.exp(out) - lam * sp.sin(t0) + np_**2,
                        inputs=[i, out, lam, t0, np_], name="user_awkward")
    rng = np.random.default_rng(6)
    arrays = [rng.normal(size=40) for _ in range(5)]

    def by_hand(a, b, c, d, e):
        return a * torch.exp(b) - c * torch.sin(d) + e**2

    check(op, by_hand, arrays, rng.normal(size=40), "awkward names")


def test_constant_formula_and_unused_input():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    three = sg.elementwise(sp.Integer(3), inputs=[x], name="user_three")
    np.testing.assert_array_equal(three(a), np.full((3, 4), 3.0))
    np.testing.assert_array_equal(three.vjp(a, np.ones((3, 4)))[0], np.zeros((3, 4)))
    square = sg.elementwise(x**2, inputs=[x, y], name="user_unused")
    check(square, lambda p, q: p**2 + 0 * q, [a, b], rng.normal(size=(3, 4)), "unused input")


# -- properties -------------------------------------------------------------------------------

FLOATS = st.floats(-20, 20, allow_nan=False, allow_infinity=False)


def arrays_of(n: int, elements=FLOATS):
    return hnp.arrays(np.float64, n, elements=elements)


@given(data=st.data(), n=st.integers(1, 40),
       c1=st.floats(-4, 4), c2=st.floats(-4, 4))
def test_vjp_is_linear_in_grad_output(tri, data, n, c1, c2):
    arrays = [data.draw(arrays_of(n)) for _ in range(3)]
    g1, g2 = data.draw(arrays_of(n)), data.draw(arrays_of(n))
    combined = tri.vjp(*arrays, c1 * g1 + c2 * g2)
    ones = tri.vjp(*arrays, np.ones(n))
    for lhs, a1, a2, d in zip(combined, tri.vjp(*arrays, g1), tri.vjp(*arrays, g2), ones,
                              strict=True):
        # each side is g·∂f with a couple of roundings: error ≲ eps·(|c1 g1| + |c2 g2|)·|∂f|
        bound = 1e-14 * (np.abs(c1 * g1) + np.abs(c2 * g2) + 1) * np.abs(d) + 1e-300
        assert np.all(np.abs(lhs - (c1 * a1 + c2 * a2)) <= bound)


@given(data=st.data(), n=st.integers(1, 40), k=st.integers(-3, 3))
def test_vjp_scales_exactly_by_powers_of_two(mish, data, n, k):
    a, g = data.draw(arrays_of(n)), data.draw(arrays_of(n))
    (base,) = mish.vjp(a, g)
    (scaled,) = mish.vjp(a, g * 2.0**k)
    normal = np.abs(base) > 1e-290  # subnormal products round differently when scaled
    np.testing.assert_array_equal(scaled[normal], base[normal] * 2.0**k)
    assert np.all(np.abs(scaled[~normal]) <= 1e-290 * 2.0**k)


@given(a=arrays_of(st.integers(0, 30)))
def test_mish_agrees_with_torch(mish, a):
    g = np.linspace(-1, 1, a.size)
    check(mish, mish_torch, [a], g, "mish (hypothesis)")


@given(data=st.data(), n=st.integers(1, 30))
def test_three_input_op_agrees_with_torch(tri, data, n):
    arrays = [data.draw(arrays_of(n, st.floats(-6, 6))) for _ in range(3)]
    g = data.draw(arrays_of(n, st.floats(-2, 2)))
    check(tri, tri_torch, arrays, g, "tri (hypothesis)")


@given(data=st.data(), n=st.integers(1, 30))
def test_sum_reduction_gradient_is_vjp_of_ones(tri, data, n):
    arrays = [data.draw(arrays_of(n)) for _ in range(3)]
    total, grads = tri.value_and_vjp(*arrays, reduction="sum")
    values = tri(*arrays)
    np.testing.assert_allclose(float(total), values.sum(),
                               rtol=1e-12, atol=1e-13 * np.abs(values).sum() + 1e-300)
    for ours, plain in zip(grads, tri.vjp(*arrays, np.ones(n)), strict=True):
        np.testing.assert_allclose(ours, plain, rtol=1e-14, atol=1e-300)


def test_a_long_sum_adds_each_blocks_terms_pairwise():
    """A loss summed over 2**20 equal terms (the worst case for one accumulator: every addition
    rounds the same way): each block's terms are folded pairwise, so the sum is within 1e-13 of
    the exact one (``math.fsum``); added in element order it was 1e-12 off (1.5e-11 in one
    chunk).  Serial and parallel variants give the same bits."""
    x = sp.Symbol("x", real=True)
    square = sg.elementwise(x * x, inputs=[x], name="square_for_a_long_sum")
    a = np.full(2**20, np.sqrt(0.1))
    exact = math.fsum(a * a)
    with sg.num_threads(1):
        total, _ = square.value_and_vjp(a, reduction="sum")
    assert abs(float(total) - exact) <= 1e-13 * exact
    with sg.num_threads(2):
        assert square.value_and_vjp(a, reduction="sum")[0] == total


def _domain(d):
    if d.kind == "uniform":
        return st.floats(d.low, d.high, allow_nan=False)
    return st.floats(-6 * d.scale, 6 * d.scale, allow_nan=False)


@given(data=st.data(), name=st.sampled_from(sorted(sg.BUILTINS)), n=st.integers(1, 20))
def test_builtins_agree_with_torch_on_random_floats(data, name, n):
    entry = sg.BUILTINS[name]
    op = sg.builtin(name)
    arrays = [data.draw(hnp.arrays(np.float64, n, elements=_domain(d))) for d in entry.domain]
    if name == "bce":  # torch's backward is not the clamped formula's derivative there
        assume(np.all(arrays[0] * (1 - arrays[0]) > 1e-12))
    g = data.draw(arrays_of(n, st.floats(-2, 2)))
    value = op(*arrays)
    grads = op.vjp(*arrays, g)
    leaves = [torch.tensor(a, requires_grad=flag)
              for a, flag in zip(arrays, entry.torch_grads, strict=True)]
    out = entry.torch_ref(torch, *leaves, **entry.params)
    out.backward(torch.tensor(g))
    assert_close(value, out.detach().numpy(), 1e-10, 1e-12, name)
    for ours, leaf in zip(grads, leaves, strict=True):
        if leaf.grad is not None:
            # where the gradient is exactly 0 in torch (bce at x = y) ours may keep 1 ulp of
            # the g-sized terms that cancel
            floor = float(np.max(np.abs(g), initial=0.0))
            assert_close(ours, leaf.grad.numpy(), 1e-10, 1e-12, f"{name} gradient", floor)
