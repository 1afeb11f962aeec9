"""Elementwise ops: every bad definition or call is the right SymgradError subclass, raised
before any kernel runs, with a message that names the culprit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sympy as sp

import symgrad as sg
from symgrad.errors import (
    ArgumentError,
    CacheError,
    CodegenError,
    DefinitionError,
    DTypeError,
    NonDifferentiableError,
    ShapeError,
    SymgradError,
    UnboundSymbolError,
    UnsupportedFunctionError,
)

x = sp.Symbol("x", real=True)
alpha = sp.Symbol("alpha_free")


def test_hierarchy():
    """Each subclass is a SymgradError and the builtin exception a caller would catch."""
    assert issubclass(UnboundSymbolError, DefinitionError)
    assert issubclass(UnsupportedFunctionError, DefinitionError)
    assert issubclass(NonDifferentiableError, DefinitionError)
    for cls in (DefinitionError, CodegenError, ShapeError):
        assert issubclass(cls, SymgradError) and issubclass(cls, ValueError)
    for cls in (DTypeError, ArgumentError):
        assert issubclass(cls, SymgradError) and issubclass(cls, TypeError)
    assert issubclass(CacheError, OSError)


@pytest.fixture(scope="module")
def mse():
    return sg.builtin("mse")


# -- definition time --------------------------------------------------------------------------


def test_unbound_symbol_is_named_with_the_inputs():
    with pytest.raises(UnboundSymbolError) as err:
        sg.elementwise(x * alpha, inputs=[x], name="e_unbound")
    message = str(err.value)
    assert "alpha_free" in message and "['x']" in message and "e_unbound" in message
    assert "constants=" in message  # says what to do


@pytest.mark.parametrize(
    ("formula", "culprit"),
    [
        (sp.besselj(0, x), "besselj"),
        (sp.Function("mystery_fn")(x), "mystery_fn"),
        (sp.gamma(x) + x, "gamma"),
        (sp.exp(sp.Function("inner_fn")(x)), "inner_fn"),
    ],
    ids=["besselj", "undefined", "gamma", "nested"],
)
def test_unsupported_function_is_named(formula, culprit):
    with pytest.raises(UnsupportedFunctionError, match=rf"op 'e_unsupported': .*\b{culprit}\b"):
        sg.elementwise(formula, inputs=[x], name="e_unsupported")


@pytest.mark.parametrize("formula", [x * sp.Heaviside(x), x * sp.sign(x)], ids=str)
def test_derivative_with_dirac_delta_is_non_differentiable(formula):
    with pytest.raises(NonDifferentiableError) as err:
        sg.elementwise(formula, inputs=[x], name="e_kink")
    message = str(err.value)
    assert "DiracDelta" in message and "e_kink" in message and "Piecewise" in message


def test_formula_with_no_numeric_value_is_rejected():
    with pytest.raises(NonDifferentiableError, match="Integral"):
        sg.elementwise(sp.Integral(x, x), inputs=[x], name="e_integral")
    with pytest.raises(UnsupportedFunctionError, match="DiracDelta"):
        sg.elementwise(sp.DiracDelta(x), inputs=[x], name="e_delta")


def test_complex_formula_is_a_codegen_error():
    with pytest.raises(CodegenError, match=r"complex \(contains I\)"):
        sg.elementwise(x * sp.I, inputs=[x], name="e_complex")


@pytest.mark.parametrize("name", ["1bad", "class", "a-b", "", 3, None], ids=repr)
def test_bad_op_name(name):
    with pytest.raises(DefinitionError) as err:
        sg.elementwise(x, inputs=[x], name=name)
    assert repr(name) in str(err.value)


def test_constant_not_in_formula():
    with pytest.raises(DefinitionError, match=r"constant 'beta_typo' does not occur .*\['x'\]"):
        sg.elementwise(x, inputs=[x], name="e_const", constants={sp.Symbol("beta_typo"): 1.0})


def test_constant_that_is_also_an_input():
    with pytest.raises(DefinitionError, match=r"'x' is declared both as an input and as a const"):
        sg.elementwise(x, inputs=[x], name="e_const", constants={x: 1.0})
    with pytest.raises(DefinitionError, match="'x' is declared both"):
        sg.elementwise(x, inputs=[x], name="e_const", constants={"x": 1.0})


@pytest.mark.parametrize(
    ("value", "shown"),
    [("1.0", "'1.0'"), (True, "True"), (1j, "1j"), (sp.Symbol("q"), "q"),
     (float("inf"), "inf"), (float("nan"), "nan"), (None, "None")],
    ids=repr,
)
def test_non_numeric_constant(value, shown):
    with pytest.raises(DefinitionError) as err:
        sg.elementwise(x * alpha, inputs=[x], name="e_const", constants={alpha: value})
    assert f"alpha_free = {shown}" in str(err.value)


def test_constant_key_that_is_not_a_name():
    with pytest.raises(DefinitionError, match="constant key 3"):
        sg.elementwise(x * alpha, inputs=[x], name="e_const", constants={3: 1.0})


@pytest.mark.parametrize(
    ("formula", "inputs", "fragment"),
    [
        (("x + 1",), [x], "is a tuple, not a SymPy expression"),  # sympify would eval it
        (x, [], "at least one input"),
        (x, [x + 1], r"input x \+ 1 is not a SymPy Symbol"),
        (x, [x, sp.Symbol("x")], r"input names repeat: \['x'\]"),
        (sp.Eq(x, 1), [x], "scalar SymPy expression, got Equality"),
        (sp.IndexedBase("X")[x] + x, [x], "tensor_op"),
    ],
    ids=["tuple", "no-inputs", "non-symbol-input", "duplicate", "relation", "indexed"],
)
def test_malformed_definitions(formula, inputs, fragment):
    with pytest.raises(DefinitionError, match=fragment):
        sg.elementwise(formula, inputs=inputs, name="e_malformed")


def test_unknown_builtin_and_parameter():
    with pytest.raises(DefinitionError, match=r"no built-in op 'nosuchop'; built-ins are .*relu"):
        sg.builtin("nosuchop")
    with pytest.raises(DefinitionError, match=r"'elu' has no parameter\(s\) \['beta'\]; .*alpha"):
        sg.builtin("elu", beta=2.0)
    with pytest.raises(DefinitionError, match=r"'relu' has no parameter\(s\) \['alpha'\]; .*none"):
        sg.builtin("relu", alpha=2.0)
    with pytest.raises(DefinitionError, match=r"alpha='big' is not allowed"):
        sg.builtin("elu", alpha="big")


def test_unwritable_cache_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SYMGRAD_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(sg.api, "_OPS", {})
    with pytest.raises(CacheError, match="SYMGRAD_CACHE_DIR") as err:
        sg.elementwise(x * 3, inputs=[x], name="e_cache")
    assert str(blocker / "cache") in str(err.value)


# -- call time --------------------------------------------------------------------------------


def test_wrong_number_of_arrays(mse):
    with pytest.raises(ArgumentError, match=r"op 'mse' takes 2 input array\(s\) \(x, y\), got 1"):
        mse(np.ones(3))
    with pytest.raises(ArgumentError, match="got 3"):
        mse(np.ones(3), np.ones(3), np.ones(3))
    with pytest.raises(ArgumentError, match="got 1"):
        mse.vjp(np.ones(3), np.ones(3))  # grad_output missing: one input too few
    with pytest.raises(ArgumentError, match="vjp takes the inputs and then grad_output"):
        mse.vjp()
    with pytest.raises(ArgumentError, match="got 3"):
        mse.value_and_vjp(np.ones(3), np.ones(3), np.ones(3))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.complex128, np.float16, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_non_float_array(mse, dtype):
    bad = np.ones(3, dtype=dtype)
    for call in (lambda: mse(bad, bad), lambda: mse.vjp(bad, bad, np.ones(3)),
                 lambda: mse.value_and_vjp(bad, bad)):
        with pytest.raises(DTypeError) as err:
            call()
        assert np.dtype(dtype).name in str(err.value) and "'x'" in str(err.value)


def test_non_float_list_input(mse):
    with pytest.raises(DTypeError, match=r"input 'y' has dtype complex128"):
        mse(np.ones(3), [1j, 2, 3])
    with pytest.raises(DTypeError, match=r"input 'y' has dtype <U1"):
        mse(np.ones(3), ["a", "b", "c"])


def test_mixed_float_dtypes(mse):
    with pytest.raises(DTypeError, match=r"different dtypes \(x: float32, y: float64\)"):
        mse(np.ones(3, dtype=np.float32), np.ones(3))
    with pytest.raises(DTypeError, match=r"x: float64, y: bool"):
        mse(np.ones(3), np.ones(3, dtype=bool))
    # a NumPy scalar has a dtype too (a Python float takes the arrays')
    with pytest.raises(DTypeError, match=r"x: float64, y: float32"):
        mse(np.ones(3), np.float32(0.5))
    with pytest.raises(DTypeError, match=r"y: int64"):
        mse(np.ones(3), np.int64(1))


@pytest.mark.parametrize(("sx", "sy"), [((3,), (4,)), ((2, 3), (3, 2)), ((5, 1, 2), (4, 3))],
                         ids=str)
def test_shapes_that_do_not_broadcast(mse, sx, sy):
    for call in (lambda: mse(np.ones(sx), np.ones(sy)),
                 lambda: mse.vjp(np.ones(sx), np.ones(sy), 1.0),
                 lambda: mse.value_and_vjp(np.ones(sx), np.ones(sy), reduction="mean")):
        with pytest.raises(ShapeError) as err:
            call()
        assert f"x: {sx}, y: {sy}" in str(err.value)


def test_grad_output_of_the_wrong_shape(mse):
    with pytest.raises(ShapeError, match=r"grad_output has shape \(4,\), the output has shape "
                                         r"\(3,\)"):
        mse.vjp(np.ones(3), np.ones(3), np.ones(4))
    with pytest.raises(ShapeError, match=r"grad_output has shape \(3, 1\)"):
        mse.value_and_vjp(np.ones(3), np.ones(3), grad_output=np.ones((3, 1)))
    # a broadcast output shape is the one grad_output must have
    with pytest.raises(ShapeError, match=r"the output has shape \(2, 3\)"):
        mse.vjp(np.ones((2, 1)), np.ones(3), np.ones(3))


def test_grad_output_of_the_wrong_dtype(mse):
    with pytest.raises(DTypeError, match="grad_output has dtype complex128"):
        mse.vjp(np.ones(3), np.ones(3), np.ones(3, dtype=complex))
    with pytest.raises(DTypeError, match="grad_output has dtype bool"):
        mse.vjp(np.ones(3), np.ones(3), np.ones(3, dtype=bool))


def test_bad_reduction(mse):
    with pytest.raises(ArgumentError, match=r"reduction must be 'none', 'sum' or 'mean', got "
                                            r"'avg'"):
        mse.value_and_vjp(np.ones(3), np.ones(3), reduction="avg")
    with pytest.raises(ArgumentError, match=r"reduction='sum' grad_output is a real scalar"):
        mse.value_and_vjp(np.ones(3), np.ones(3), grad_output=np.ones(3), reduction="sum")
    with pytest.raises(ArgumentError, match=r"reduction='mean' grad_output is a real scalar"):
        mse.value_and_vjp(np.ones(3), np.ones(3), grad_output=1j, reduction="mean")


def test_errors_leave_the_op_usable(mse):
    """A rejected call does not poison the op (no half-initialised state)."""
    with pytest.raises(ShapeError):
        mse(np.ones(3), np.ones(4))
    a, b = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    np.testing.assert_array_equal(mse(a, b), (a - b) ** 2)


# -- command line -----------------------------------------------------------------------------


def test_cli_derive_unknown_op_exits_non_zero():
    out = subprocess.run([sys.executable, "-m", "symgrad", "derive", "nosuchop"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "nosuchop" in out.stderr
    assert "Traceback" not in out.stderr
