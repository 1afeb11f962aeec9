"""The strict Numba printer: SymPy expression → Python/Numba source text.

One table, :data:`NUMBA_FUNCTIONS`, lists every SymPy function symgrad can compile and the
``math`` function it becomes; Python built-ins (``abs``, ``min``, ``max``) and ``Piecewise``
(ternaries) are printed by SymPy's :class:`PythonCodePrinter`.  Anything else is a
:class:`~symgrad.errors.CodegenError` naming the function — never a partially printed kernel.
Floats are printed with all 17 significant digits, so float64 constants survive exactly.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.codeprinter import PrintMethodNotImplementedError
from sympy.printing.pycode import PythonCodePrinter

from ..errors import CodegenError, UnsupportedFunctionError

#: SymPy function name → name in Python's ``math`` module, which Numba compiles natively.
NUMBA_FUNCTIONS: dict[str, str] = {
    "exp": "exp",
    "log": "log",
    "log1p": "log1p",
    "expm1": "expm1",
    "sqrt": "sqrt",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "asin": "asin",
    "acos": "acos",
    "atan": "atan",
    "atan2": "atan2",
    "sinh": "sinh",
    "cosh": "cosh",
    "tanh": "tanh",
    "asinh": "asinh",
    "acosh": "acosh",
    "atanh": "atanh",
    "erf": "erf",
    "erfc": "erfc",
}

#: Functions the printer handles without the math module, and symgrad's own primitives (which
#: the emitter lowers to the functions above before printing).
STRUCTURAL = frozenset({"Abs", "Max", "Min", "sign", "Heaviside", "Piecewise", "sigmoid", "softplus"})


class NumbaPrinter(PythonCodePrinter):
    """``PythonCodePrinter`` restricted to :data:`NUMBA_FUNCTIONS`, strict, exact floats."""

    # PythonCodePrinter looks functions up in this table; we replace it with ours.
    _kf = {name: f"math.{target}" for name, target in NUMBA_FUNCTIONS.items()}

    def __init__(self) -> None:
        super().__init__({"strict": True, "fully_qualified_modules": True})
        self.known_functions = {**self._kf, "Abs": "abs", "Max": "max", "Min": "min"}

    def _print_Float(self, expr: sp.Float) -> str:
        return repr(float(expr))

    def _print_Rational(self, expr: sp.Rational) -> str:
        return f"({expr.p}/{expr.q})"

    def _print_Half(self, expr: sp.Rational) -> str:
        return "0.5"

    def _print_Integer(self, expr: sp.Integer) -> str:
        return f"{int(expr)}.0"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        if exp.is_Integer and abs(int(exp)) <= 4:
            # Small integer powers as products: exact, and faster than pow() in a loop.
            n = abs(int(exp))
            factor = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
            product = "*".join([factor] * n)
            return f"(1.0/({product}))" if exp < 0 else f"({product})"
        return super()._print_Pow(expr, rational=rational)

    def _print_ImaginaryUnit(self, expr: sp.Expr) -> str:
        raise CodegenError("the expression is complex (contains I): symgrad computes in reals")


def unsupported_functions(expr: sp.Basic) -> list[str]:
    """Names of the functions in ``expr`` that symgrad cannot compile, sorted."""
    names = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Function, sp.Piecewise)) or type(node).__name__ in ("Abs",):
            name = type(node).__name__
            if name not in NUMBA_FUNCTIONS and name not in STRUCTURAL:
                names.add(str(node.func) if isinstance(node, sp.core.function.AppliedUndef) else name)
    return sorted(names)


def check_supported(expr: sp.Basic, op: str, what: str = "the formula") -> None:
    """Raise :class:`UnsupportedFunctionError` if ``expr`` uses a function we cannot compile."""
    bad = unsupported_functions(expr)
    if bad:
        raise UnsupportedFunctionError(
            f"op {op!r}: {what} uses {', '.join(bad)}, which symgrad cannot differentiate and "
            f"compile. Supported functions: {', '.join(sorted(NUMBA_FUNCTIONS))}, "
            "Abs, Max, Min, sign, Heaviside, Piecewise"
        )


def print_expr(expr: sp.Expr, op: str) -> str:
    """Numba source for ``expr``; a :class:`CodegenError` if anything cannot be printed."""
    bad = unsupported_functions(expr)
    if bad:
        raise CodegenError(f"op {op!r}: cannot generate code for {', '.join(bad)} in {expr}")
    try:
        return NumbaPrinter().doprint(expr)
    except PrintMethodNotImplementedError as err:
        raise CodegenError(f"op {op!r}: cannot generate code for {expr}: {err}") from err
