"""Saved residuals: a forward keeps what the derived VJP reads; the VJP reading it equals the
recomputing VJP (symgrad.symbolic.residuals, op.forward_saved, vjp(..., saved=...))."""

import numpy as np
import pytest
import sympy as sp
from test_tensor_builtins import SHAPES, _inputs  # the registry's test inputs

import symgrad as sg
from symgrad.builtins import BUILTINS, TENSOR_BUILTINS
from symgrad.nn import Parameter, Tape
from symgrad.symbolic.index import derive_tensor, tensor_spec
from symgrad.symbolic.residuals import normal

SAVING = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_cross_entropy",
    "layer_norm",
    "masked_mean_pool",
    "masked_softmax",
    "add_layer_norm",
]


def _derivation(name: str):
    entry = TENSOR_BUILTINS[name]
    expr, out, inputs, constants = entry.build()
    return derive_tensor(tensor_spec(expr, out, inputs, name, constants, entry.wrt))


# -- symbolic (no numba, no torch) ----------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "masked_softmax"])
def test_softmax_vjp_reads_its_output_and_no_exp(name):
    saved = _derivation(name).saved
    assert saved.reads_output
    (vjp,) = [e for e in saved.partials if e is not None]
    assert not vjp.atoms(sp.exp)  # softmax's VJP is g·y - y·Σ g·y: nothing to exponentiate
    assert {str(a.base.label) for a in vjp.atoms(sp.Indexed)} == {"out", "grad_out"}


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm"])
def test_layer_norm_saves_mean_and_variance_sums(name):
    d = _derivation(name)
    saved = d.saved
    # Σ z and Σ (z - mean)² per row; add_layer_norm's z = R + X is summed as one sum Σ (R + X)
    # (the contraction splits it into Σ R + Σ X, join_sums adds them back: one pass)
    assert len(saved.residuals) == 2
    for r in saved.residuals:
        assert r.indices == d.spec.out[:-1]
    for e in saved.partials:
        if e is None:
            continue
        # no statistic of the forward is recomputed: every remaining sum reads grad_out
        for node in sp.preorder_traversal(e):
            if isinstance(node, sp.Sum):
                assert node.has(d.grad_output)


def test_linear_ops_save_nothing():
    for name in ("linear", "seq_linear", "attention_scores", "head_merge", "embedding"):
        assert not _derivation(name).saved.saves


def test_normal_form_equates_distributed_sums():
    j, b = sp.symbols("j b", integer=True)
    N, B = sp.symbols("N B", integer=True, positive=True)
    X, R = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("R", shape=(B, N))
    k = sp.Symbol("k", integer=True)
    joint = sp.Sum(X[b, j] + R[b, j], (j, 0, N - 1))
    split = sp.Sum(R[b, k], (k, 0, N - 1)) + sp.Sum(X[b, k], (k, 0, N - 1))
    assert normal(joint) == normal(split)
    assert normal(sp.Sum(2 * X[b, j], (j, 0, N - 1))) == normal(2 * sp.Sum(X[b, k], (k, 0, N - 1)))


# -- kernels: saved ≡ recomputed ------------------------------------------------------------


@pytest.mark.parametrize("name", SAVING)
def test_vjp_reading_residuals_equals_recomputing_vjp(name):
    op = sg.builtin(name)
    assert getattr(op.module, "RESIDUALS", None) is not None, "expected saved residuals"
    rng = np.random.default_rng(0)
    arrays = _inputs(name, SHAPES[0], rng)
    plain = op(*arrays)
    out, saved = op.forward_saved(*arrays)
    np.testing.assert_array_equal(out, plain)  # the same forward, bit for bit
    g = rng.normal(size=np.shape(plain))
    want = op.vjp(*arrays, g)
    got = op.vjp(*arrays, g, saved=saved)
    for w, gv in zip(want, got, strict=True):
        if w is None:
            assert gv is None
            continue
        np.testing.assert_allclose(gv, w, rtol=1e-13, atol=1e-13 * np.abs(w).max())


@pytest.mark.parametrize("name", ["gelu", "tanh", "sigmoid", "softplus", "silu", "elu"])
def test_elementwise_saved_partials_equal_recomputed_vjp(name):
    op = sg.builtin(name)
    assert op.module.SAVE_PARTIALS
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5)) * 4
    out, saved = op.forward_saved(x)
    np.testing.assert_array_equal(out, op(x))
    g = rng.normal(size=x.shape)
    (want,) = op.vjp(x, g)
    (got,) = op.vjp(x, g, saved=saved)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["relu", "add", "mse", "leaky_relu"])
def test_cheap_elementwise_ops_save_nothing(name):
    assert not sg.builtin(name).module.SAVE_PARTIALS
    args = [np.ones(3)] * len(BUILTINS[name].inputs)
    out, saved = sg.builtin(name).forward_saved(*args)
    assert saved is None and out.shape == (3,)


def test_tape_saves_only_where_a_gradient_flows():
    w = Parameter(np.ones(4))
    frozen = Parameter(np.ones(4), requires_grad=False)
    tape = Tape()
    x = np.linspace(-1, 1, 4)
    a = tape.apply(sg.builtin("gelu"), x)  # reads nothing trainable: not saved
    b = tape.apply(sg.builtin("mse"), a, frozen)
    c = tape.apply(sg.builtin("gelu"), tape.apply(sg.builtin("add"), b, w))
    saved = [r.saved is not None for r in tape._records]
    assert saved == [False, False, False, True]
    tape.backward(c, np.ones(4))
    (want,) = sg.builtin("gelu").vjp(b + 1, np.ones(4))
    np.testing.assert_allclose(w.grad, want, rtol=1e-15)
