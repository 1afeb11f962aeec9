"""The formula parser of ``symgrad derive``: an allow-list over Python's ``ast``, no ``eval``.

Valid formulas build the same SymPy expression as the SymPy API; everything outside the
allow-list — unknown names, attribute access, dunder names, lambdas, subscripts, very long or
deep inputs — is a ``FormulaError`` naming the problem, and nothing in the text ever runs.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st
from sympy.codegen.cfunctions import expm1, log1p

from symgrad.cli import main
from symgrad.codegen.printer import check_supported
from symgrad.errors import DefinitionError, FormulaError, SymgradError
from symgrad.symbolic.functions import sigmoid, softplus
from symgrad.symbolic.parse import FUNCTIONS, MAX_DEPTH, MAX_LENGTH, MAX_POWER, parse_formula

x, y, alpha = sp.symbols("x y alpha", real=True)

# text → the same formula written with the SymPy API
VALID = [
    ("x*tanh(softplus(x))", x * sp.tanh(softplus(x))),
    ("-x**2", -(x**2)),
    ("(-x)**2", x**2),
    ("2*x + 3/y", 2 * x + sp.Integer(3) / y),
    ("x/(1 + abs(x))", x / (1 + sp.Abs(x))),
    ("exp(-Abs(x))", sp.exp(-sp.Abs(x))),
    ("Max(x, 0) + min(x, y)", sp.Max(x, 0) + sp.Min(x, y)),
    ("alpha*log1p(x) - expm1(y)", alpha * log1p(x) - expm1(y)),
    ("sigmoid(x)*(1 - sigmoid(x))", sigmoid(x) * (1 - sigmoid(x))),
    ("x/2*(1 + erf(x/sqrt(2)))", x / 2 * (1 + sp.erf(x / sp.sqrt(2)))),
    ("pi*x + E**y", sp.pi * x + sp.E**y),
    # decimals are read exactly: 1e-3 is 1/1000, 0.5 is 1/2
    ("1e-3*x + 0.5", x / 1000 + sp.Rational(1, 2)),
    ("1e-30*x", sp.Float(1e-30) * x),  # its exact form would not fit a float64 integer
    ("atan2(y, x)", sp.atan2(y, x)),
    ("+x", x),
    (
        "Piecewise((x, x > 0), (0.01*x, True))",
        sp.Piecewise((x, x > 0), (x / 100, True)),
    ),
    (
        "Piecewise((x, (x >= 0) and not (x > 1)), (0, True))",
        sp.Piecewise((x, sp.And(x >= 0, sp.Not(x > 1))), (0, True)),
    ),
    ("Piecewise((x, 0 < x < 1), (y, True))", sp.Piecewise((x, sp.And(x > 0, x < 1)), (y, True))),
    # SymPy's own printing of logic, as in sstr() of derivations
    (
        "Piecewise((0, (x >= 1.0) | (x <= -1.0)), (1, True))",
        sp.Piecewise((0, sp.Or(x >= 1, x <= -1)), (1, True)),
    ),
    (
        "Piecewise((x, ~(x < 0) & (y > 0)), (0, True))",
        sp.Piecewise((x, (x >= 0) & (y > 0)), (0, True)),
    ),
    ("x**" + str(MAX_POWER), x**MAX_POWER),
    ("   x   ", x),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[t for t, _ in VALID])
def test_valid_formulas_build_the_sympy_expression(text: str, expected: sp.Expr) -> None:
    assert parse_formula(text) == expected


def test_symbols_are_real_like_op_inputs() -> None:
    expr = parse_formula("Abs(a) + b")
    assert all(s.is_real for s in expr.free_symbols)
    # Abs of a real symbol differentiates to sign, as for op inputs (not to a complex form)
    assert sp.diff(expr, sp.Symbol("a", real=True)) == sp.sign(sp.Symbol("a", real=True))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_allowed_function_is_one_symgrad_compiles(name: str) -> None:
    low = FUNCTIONS[name][1]
    text = (
        "Piecewise((x, x > 0), (y, True))"
        if name == "Piecewise"
        else f"{name}({', '.join('xy'[:low])})"
    )
    expr = parse_formula(text)
    check_supported(expr, "parser_check")  # raises for anything codegen cannot compile


# -- rejected: each with a FormulaError naming the construct ----------------------------------

REJECTED = [
    # unknown names called as functions
    ("foo(x)", "calling 'foo'"),
    ("eval('1')", "calling 'eval'"),
    ("exec('x = 1')", "calling 'exec'"),
    ("open('f', 'w')", "calling 'open'"),
    ("getattr(x, 'real')", "calling 'getattr'"),
    ("Symbol('x')", "calling 'Symbol'"),
    ("sympify('x')", "calling 'sympify'"),
    ("f(x)(y)", "the result of a call"),
    # attribute access
    ("x.real", "attribute access (.real)"),
    ("sp.exp(x)", "attribute access (.exp)"),
    ("(1).__class__", "attribute access (.__class__)"),
    ("x.__class__.__bases__", "attribute access"),
    ("__import__('os').system('ls')", "attribute access (.system)"),
    # dunder and underscore names
    ("__import__", "'__import__'"),
    ("__builtins__ + x", "'__builtins__'"),
    ("__import__('os')", "'__import__'"),
    ("_x + 1", "'_x'"),
    # lambdas and other expressions Python would run
    ("lambda: 0", "a lambda"),
    ("(lambda q: q)(1)", "a lambda"),
    ("[q for q in (1, 2)]", "a comprehension"),
    ("(q for q in (1,))", "a generator expression"),
    ("(y := 2)", "an assignment expression"),
    ("x if x else y", "a conditional expression"),
    ("f'{x}'", "an f-string"),
    # subscripts, containers, literals that are not numbers
    ("x[0]", "a subscript"),
    ("().__class__.__bases__[0]", "a subscript"),
    ("[x, y]", "a list"),
    ("{x: 1}", "a dict"),
    ("'x'", "a str"),
    ("b'x'", "a bytes"),
    ("1j*x", "a complex number"),
    ("1e999*x", "non-finite"),
    ("None", "a NoneType"),
    ("...", "a ellipsis"),
    # operators and constructs outside the allow-list
    ("x^2", "write powers as x**2"),
    ("x // 2", "//"),
    ("x % 2", "%"),
    ("x @ y", "@"),
    ("x & y", "outside a Piecewise condition"),
    ("~x", "outside a Piecewise condition"),
    ("x < y", "outside a Piecewise condition"),
    ("x == y", "=="),
    ("True", "the truth value True"),
    ("(x, y)", "a tuple"),
    ("exp", "used as a value"),
    ("exp(x=1)", "keyword argument"),
    ("exp(*x)", "starred"),
    ("exp(x, y)", "exp takes 1 argument"),
    ("Piecewise(x)", "not a pair"),
    ("Piecewise((x, exp(x)), (0, True))", "not a comparison"),
    # statements and syntax errors
    ("import os", "not a valid expression"),
    ("x = 1", "not a valid expression"),
    ("x; y", "not a valid expression"),
    ("x +", "not a valid expression"),
    ("", "empty"),
    ("x\0", "null bytes"),
    # sizes
    ("(x + 1)**100000", f"above {MAX_POWER}"),
    ("((x + 1)**10)**10", f"above {MAX_POWER}"),
    ("9**99**9", f"above {MAX_POWER}"),
    ("1" * 150, "digits"),
    ("x" * 60, "at most 40 characters"),
]


@pytest.mark.parametrize(("text", "message"), REJECTED, ids=[t[:40] for t, _ in REJECTED])
def test_rejected_cleanly_with_a_message_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    assert message in str(info.value)
    assert isinstance(info.value, SymgradError) and isinstance(info.value, DefinitionError)


def test_very_long_input_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import ast

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ast.parse must not be reached")

    monkeypatch.setattr(ast, "parse", no_parse)
    text = "x+" * (MAX_LENGTH // 2) + "x"
    with pytest.raises(FormulaError, match=f"longer than the limit of {MAX_LENGTH}"):
        parse_formula(text)


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_DEPTH + 5) + "x" + ")" * (MAX_DEPTH + 5),
        "-" * 900 + "x",
        "exp(" * 200 + "x" + ")" * 200,
        "+".join(["x"] * 900),
        "[" * 500,
    ],
    ids=["parens", "unary", "calls", "many-nodes", "open-brackets"],
)
def test_deep_or_large_trees_are_refused_without_recursion_errors(text: str) -> None:
    with pytest.raises(FormulaError):
        parse_formula(text)


def test_not_a_string() -> None:
    with pytest.raises(FormulaError, match="a formula is a string"):
        parse_formula(b"x")  # type: ignore[arg-type]


# -- nothing runs --------------------------------------------------------------------------


def _forbid_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser evaluated its input")

    for name in ("eval", "exec"):  # (__import__ stays: pytest itself imports lazily)
        monkeypatch.setattr(builtins, name, forbidden)
    monkeypatch.setattr(sp, "sympify", forbidden)
    monkeypatch.setattr(sp, "parse_expr", forbidden)
    monkeypatch.setattr(sp.parsing.sympy_parser, "parse_expr", forbidden)


def test_parsing_never_calls_eval_exec_or_sympify(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_evaluation(monkeypatch)
    assert parse_formula("x*tanh(softplus(x))") == x * sp.tanh(softplus(x))
    with pytest.raises(FormulaError):
        parse_formula("__import__('os').system('true')")


@pytest.mark.parametrize(
    "template",
    [
        "__import__('os').system('touch {path}')",
        "open('{path}', 'w')",
        "exec(\"open('{path}', 'w')\")",
        "eval(\"open('{path}', 'w')\")",
        "(lambda: open('{path}', 'w'))()",
        "[open('{path}', 'w') for _ in (1,)]",
        "x + __import__('pathlib').Path('{path}').touch()",
    ],
)
def test_a_formula_that_would_create_a_file_creates_nothing(tmp_path: Path, template: str) -> None:
    path = tmp_path / "created"
    text = template.format(path=path)
    with pytest.raises(FormulaError):
        parse_formula(text)
    assert main(["derive", text]) == 2  # the command line refuses it the same way
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# -- property: any text either parses or is a FormulaError ---------------------------------

_TOKENS = st.sampled_from(
    ["x", "y", "1", "2.5", "+", "-", "*", "/", "**", "(", ")", ",", "exp", "log", "Max",
     "Piecewise", "True", "<", ">", "and", "or", "not", ".", "[", "]", "_", "__", "lambda",
     ":", "'", "=", "^", "&", "|", "~", " ", "sigmoid", "1e308", "9" * 20]
)  # fmt: skip


@given(st.lists(_TOKENS, max_size=25).map("".join))
def test_any_token_soup_parses_or_raises_formula_error(text: str) -> None:
    try:
        expr = parse_formula(text)
    except FormulaError:
        return
    assert isinstance(expr, sp.Expr)


@given(st.text(max_size=80))
def test_any_text_parses_or_raises_formula_error(text: str) -> None:
    try:
        expr = parse_formula(text)
    except FormulaError:
        return
    assert isinstance(expr, sp.Expr)
