"""Tensor ops: every bad definition or call is a SymgradError subclass naming the culprit."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import symgrad as sg
from symgrad.codegen.names import mangle
from symgrad.errors import (
    ArgumentError,
    DefinitionError,
    DTypeError,
    ShapeError,
    SymgradError,
    UnboundSymbolError,
    UnsupportedFunctionError,
)

b, i, j = sp.symbols("b i j", integer=True)
B, N, M = sp.symbols("B N M", integer=True, positive=True)
X = sp.IndexedBase("X", shape=(B, N))
W = sp.IndexedBase("W", shape=(M, N))


@pytest.fixture(scope="module")
def linear():
    return sg.builtin("linear")


def _ok(shape_x=(2, 3), shape_w=(4, 3), shape_c=(4,), dtype=np.float64):
    return np.ones(shape_x, dtype), np.ones(shape_w, dtype), np.ones(shape_c, dtype)


# -- call-time errors -----------------------------------------------------------------------


def test_dim_bound_to_two_sizes_names_the_dim_and_both_arrays(linear):
    with pytest.raises(ShapeError) as err:
        linear(*_ok(shape_w=(4, 4)))
    message = str(err.value)
    assert "dim N" in message and "'X'" in message and "'W'" in message
    assert "is 3 in 'X' (shape (2, 3)) but 4 in 'W'" in message
    with pytest.raises(ShapeError, match=r"dim M is 4 in 'W' .* but 5 in 'c'"):
        linear(*_ok(shape_c=(5,)))


def test_dim_mismatch_is_checked_in_vjp_too(linear):
    with pytest.raises(ShapeError, match=r"dim N is 3 in 'X'"):
        linear.vjp(*_ok(shape_w=(4, 4)), np.ones((2, 4)))


def test_wrong_rank(linear):
    with pytest.raises(
        ShapeError,
        match=r"input 'W' must have 2 dims \('M', 'N'\), got an array "
        r"of shape \(3,\)",
    ):
        linear(*_ok(shape_w=(3,)))
    # X's batch axes are any number of leading axes (batch=B): at least the feature axis
    with pytest.raises(ShapeError, match=r"input 'X' must have at least 1 dims \('N',\)"):
        linear(np.float64(1.0), *_ok()[1:])


def test_batch_axes_must_agree():
    Z = sp.IndexedBase("Z", shape=(B, N))
    add = sg.tensor_op(X[b, j] + Z[b, j], out=(b, j), inputs=[X, Z], name="batch_add", batch=B)
    assert add(np.ones((2, 5, 3)), np.ones((2, 5, 3))).shape == (2, 5, 3)
    with pytest.raises(ShapeError, match=r"the batch axes of the inputs differ: \(2, 5\) and "
                       r"\(10,\) \(input 'Z', shape \(10, 3\)\)"):
        add(np.ones((2, 5, 3)), np.ones((10, 3)))


def test_batch_must_be_the_leading_axis():
    with pytest.raises(DefinitionError, match="batch=N stands for any number of leading axes"):
        sg.tensor_op(X[b, j], out=(b, j), inputs=[X], name="bad_batch", batch=N)


def test_wrong_number_of_arrays(linear):
    with pytest.raises(ArgumentError, match=r"op 'linear' takes 3 array\(s\) \(X, W, c\), got 2"):
        linear(*_ok()[:2])
    with pytest.raises(ArgumentError, match=r"takes 3 array\(s\)"):
        linear.vjp(*_ok()[:2], np.ones((2, 4)))
    with pytest.raises(ArgumentError, match=r"vjp takes the inputs and then grad_output"):
        linear.vjp()


def test_mixed_dtypes(linear):
    x, w, c = _ok()
    with pytest.raises(
        DTypeError, match=r"different dtypes \(X: float64, W: float32, c: float64\)"
    ):
        linear(x, w.astype(np.float32), c)


def test_integer_arrays(linear):
    with pytest.raises(DTypeError, match=r"input 'X' has dtype int64"):
        linear(*_ok(dtype=np.int64))


def test_grad_output_of_the_wrong_shape(linear):
    with pytest.raises(
        ShapeError,
        match=r"grad_output has shape \(2, 3\), the output has shape "
        r"\(2, 4\)",
    ):
        linear.vjp(*_ok(), np.ones((2, 3)))
    with pytest.raises(ShapeError, match=r"grad_output has shape \(\)"):
        linear.vjp(*_ok(), 1.0)


def test_grad_output_that_is_not_a_number(linear):
    with pytest.raises(DTypeError, match=r"grad_output has dtype bool"):
        linear.vjp(*_ok(), np.ones((2, 4), dtype=bool))


def test_errors_derive_from_the_builtin_exceptions(linear):
    with pytest.raises(ValueError):
        linear(*_ok(shape_w=(4, 4)))
    with pytest.raises(TypeError):
        linear(*_ok(dtype=np.int32))


# -- definition-time errors -----------------------------------------------------------------


def test_undeclared_tensor_used_in_the_formula():
    Z = sp.IndexedBase("Z", shape=(B, N))
    with pytest.raises(
        UnboundSymbolError,
        match=r"tensor\(s\) \['Z'\] are used but not declared "
        r"in inputs=\[...\] \(\['X'\]\)",
    ):
        sg.tensor_op(X[b, j] * Z[b, j], out=(b, j), inputs=[X], name="uses_z")


def test_indexed_base_without_shape():
    V = sp.IndexedBase("V")
    with pytest.raises(
        DefinitionError,
        match=r"input tensor V has no shape; declare it with "
        r"sympy.IndexedBase\('V', shape=",
    ):
        sg.tensor_op(X[b, j] * V[j], out=(b, j), inputs=[X, V], name="shapeless")


def test_free_index_not_in_out():
    with pytest.raises(
        UnboundSymbolError,
        match=r"symbol\(s\) \['j'\] are free in the formula "
        r"but are neither output indices \(\['b', 'i'\]\)",
    ):
        sg.tensor_op(X[b, j] * W[i, j], out=(b, i), inputs=[X, W], name="forgot_sum")


def test_unbound_constant_is_named():
    alpha = sp.Symbol("alpha", real=True)
    with pytest.raises(UnboundSymbolError, match=r"\['alpha'\].*constants=\{...\}"):
        sg.tensor_op(alpha * X[b, j], out=(b, j), inputs=[X], name="scaled")


def test_index_used_over_two_different_dims():
    Z = sp.IndexedBase("Z", shape=(B, M))
    with pytest.raises(
        DefinitionError,
        match=r"index j runs over dim N in X\[b, j\] but over "
        r"dim M in Z\[b, j\]; use separate indices",
    ):
        sg.tensor_op(
            sp.Sum(X[b, j] * Z[b, j], (j, 0, N - 1)), out=(b,), inputs=[X, Z], name="mixed_dims"
        )


def test_output_index_that_indexes_nothing():
    with pytest.raises(DefinitionError, match=r"output index i does not index any input tensor"):
        sg.tensor_op(X[b, j], out=(b, j, i), inputs=[X], name="extra_index")


@pytest.mark.parametrize(
    "position", [sp.Rational(1, 2), j + sp.Rational(1, 2), sp.Float(1.0), j / 2, (j + 1) / 3]
)
def test_a_subscript_that_is_not_an_integer_is_named(position):
    with pytest.raises(DefinitionError, match=r"reads position .* which is not an integer"):
        sg.tensor_op(X[b, position] + X[b, j], out=(b, j), inputs=[X], name="half_index")


def test_a_piecewise_without_a_default_is_named():
    """Where none of its conditions holds a Piecewise has no value: refused at definition,
    for tensor and elementwise formulas; complementary conditions are a default."""
    with pytest.raises(DefinitionError, match=r"Piecewise\(\(X\[b, j\]\*\*2, X\[b, j\] > 0\)\) "
                       r"has no value where none of its conditions holds"):
        sg.tensor_op(sp.Piecewise((X[b, j] ** 2, X[b, j] > 0)), out=(b, j), inputs=[X],
                     name="pw_no_default")
    x = sp.Symbol("x", real=True)
    with pytest.raises(DefinitionError, match=r"end it with a default, \(value, True\)"):
        sg.elementwise(sp.Piecewise((x, x > 0), (-x, x < 0)), inputs=[x], name="pw_gap")
    both = sg.elementwise(sp.Piecewise((x, x > 0), (-x, x <= 0)), inputs=[x], name="pw_abs")
    np.testing.assert_array_equal(both(np.array([-2.0, 0.0, 3.0])), [2.0, 0.0, 3.0])
    y = sp.Symbol("y", real=True)  # exhaustive as propositions, not by SymPy's simplify
    gate = sp.Piecewise((x * y, (x > 0) & (y > 0)), (0, (x <= 0) | (y <= 0)))
    gated = sg.elementwise(gate, inputs=[x, y], name="pw_gate")
    np.testing.assert_array_equal(gated(np.array([-1.0, 2.0]), np.array([3.0, 3.0])), [0, 6])
    # conditions on indices hold by the indices' ranges: left to them
    halves = sg.tensor_op(sp.Piecewise((X[b, j], j <= 1), (2 * X[b, j], j >= 2)), out=(b, j),
                          inputs=[X], name="pw_index_halves")
    np.testing.assert_array_equal(halves(np.ones((1, 4))), [[1, 1, 2, 2]])


def test_repeated_output_index_and_input_names():
    with pytest.raises(DefinitionError, match=r"output indices repeat: \(b, b\)"):
        sg.tensor_op(X[b, j], out=(b, b), inputs=[X], name="twice")
    with pytest.raises(DefinitionError, match=r"input tensor names repeat: \['X', 'X'\]"):
        sg.tensor_op(X[b, j], out=(b, j), inputs=[X, X], name="twice_in")


@pytest.mark.parametrize("label", ["grad_out", "out", "np", "math", "_hidden", "grad_Y"])
def test_names_the_generated_kernels_use_are_mangled(label):
    """A tensor named like a variable of the generated source (or, as ``grad_Y`` next to an
    input ``Y``, like a gradient array) is usable: every user name is printed mangled
    (``t_<label>``), so it cannot meet the kernels' own names.  (They compute correctly:
    tests/test_hardening.py.)"""
    T = sp.IndexedBase(label, shape=(N,))
    Y = sp.IndexedBase("Y", shape=(N,))
    op = sg.tensor_op(2 * T[j] * Y[j], out=(j,), inputs=[T, Y], name=f"mangled_{label}")
    assert f"def forward({mangle(label, 't')}, t_Y, s_N, out):" in op.source


def test_an_index_named_like_a_module_is_mangled():
    np_index = sp.Symbol("np", integer=True)
    op = sg.tensor_op(X[np_index, j], out=(np_index, j), inputs=[X], name="np_index")
    assert "for s_np in range(" in op.source and "np.dot" not in op.source


def test_input_that_is_not_an_indexed_base():
    x = sp.Symbol("x", real=True)
    with pytest.raises(DefinitionError, match=r"input x is not a sympy.IndexedBase"):
        sg.tensor_op(X[b, j], out=(b, j), inputs=[x], name="symbol_input")


def test_unsupported_function_is_named():
    f = sp.Function("f")
    with pytest.raises(UnsupportedFunctionError, match=r"uses f, which"):
        sg.tensor_op(f(X[b, j]), out=(b, j), inputs=[X], name="undefined_function")


def test_unknown_builtin_parameter():
    with pytest.raises(
        DefinitionError,
        match=r"built-in op 'layer_norm' has no parameter\(s\) "
        r"\['epsilon'\]; its parameters are \['eps'\]",
    ):
        sg.builtin("layer_norm", epsilon=1e-3)
    with pytest.raises(
        DefinitionError,
        match=r"built-in op 'softmax' has no parameter\(s\) "
        r"\['dim'\]; its parameters are none",
    ):
        sg.builtin("softmax", dim=1)


def test_unknown_builtin_name_lists_the_names():
    with pytest.raises(
        DefinitionError,
        match=r"no built-in op 'layernorm' \(did you mean 'layer_norm'\?\); built-ins are .*"
        r"layer_norm",
    ):
        sg.builtin("layernorm")


def test_index_sum_needs_a_tensor_to_infer_from():
    with pytest.raises(DefinitionError, match=r"index i does not index any tensor"):
        sg.index_sum(X[b, j], i)


def test_every_error_is_a_symgrad_error(linear):
    for call in (
        lambda: linear(*_ok(shape_w=(4, 4))),
        lambda: linear(*_ok(dtype=np.int64)),
        lambda: linear(*_ok()[:2]),
        lambda: sg.builtin("layer_norm", epsilon=1.0),
    ):
        with pytest.raises(SymgradError):
            call()
