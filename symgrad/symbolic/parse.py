"""Formula strings → SymPy expressions, without evaluating any Python.

``sympy.sympify`` and ``parse_expr`` call ``eval``: a string such as
``__import__('os').system('...')`` given to them *runs*.  :func:`parse_formula` never evaluates
the text.  It parses it with :func:`ast.parse` (which only builds a syntax tree), checks every
node of the tree against an allow-list, and only then builds the SymPy expression from the
tree, node by node:

* numbers (``int``, finite ``float``), the constants ``pi`` and ``E``; a decimal number is read
  exactly as written (``0.5`` is ``1/2``, ``0.1`` is ``1/10``: see :func:`exact_decimal`);
* names — each becomes a real :class:`sympy.Symbol`; a name may not start with an underscore
  (so no dunder names) and must be short;
* the operators ``+ - * / **`` and unary ``-``/``+``;
* calls of the functions in :data:`FUNCTIONS` (plain positional arguments only), and
  ``Piecewise((value, condition), ..., (value, True))`` with comparisons ``< <= > >=`` joined
  by ``and``/``or``/``not`` (or SymPy's ``&``/``|``/``~``) as conditions — so what
  ``sympy.sstr`` prints of symgrad's derivations parses back.

Everything else — attribute access, subscripts, lambdas, comprehensions, strings, keyword
arguments, calls of any other name — is a :class:`~symgrad.errors.FormulaError` naming the
construct and its column.  Inputs longer than :data:`MAX_LENGTH` characters, deeper than
:data:`MAX_DEPTH` or with more than :data:`MAX_NODES` nodes are refused before SymPy sees them,
and so are a constant exponent above :data:`MAX_POWER` (expanding ``(x + 1)**100000`` would not
end), integers of more than :data:`MAX_DIGITS` digits, and a ``Max``/``Min`` with more than 16
arguments once SymPy has merged the nested ones (SymPy compares every pair as it builds one).

:func:`as_expression` is the one door for formulas given to symgrad's Python API: SymPy objects
pass, strings come here, and anything else — a tuple or dict of strings, which ``sympify``
evaluates even with ``strict=True`` — is refused.

>>> parse_formula("x*tanh(softplus(x))")
x*tanh(softplus(x))
>>> parse_formula("__import__('os').system('echo hi')")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
symgrad.errors.FormulaError: formula "__import__('os').system('echo hi')": attribute access ...
"""

from __future__ import annotations

import ast
import keyword
import math
import numbers
import re
import warnings
from collections.abc import Callable

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from ..errors import DefinitionError, FormulaError, closest
from .functions import sigmoid, softplus

#: The longest formula accepted, in characters.
MAX_LENGTH = 2000
#: The most syntax-tree nodes a formula may have.
MAX_NODES = 1000
#: The deepest nesting of the syntax tree (and of brackets in the text).
MAX_DEPTH = 60
#: The largest constant exponent, in absolute value.
MAX_POWER = 64
#: The most digits of an integer, written or computed.
MAX_DIGITS = 100
#: The longest symbol name.
MAX_NAME = 40

_Fn = Callable[..., sp.Expr]

#: Function name → (SymPy function, fewest arguments, most arguments).  A new function is one
#: entry; every one of them can be differentiated and compiled by symgrad.
FUNCTIONS: dict[str, tuple[_Fn, int, int]] = {
    "exp": (sp.exp, 1, 1),
    "log": (sp.log, 1, 1),
    "log1p": (log1p, 1, 1),
    "expm1": (expm1, 1, 1),
    "sqrt": (sp.sqrt, 1, 1),
    "sin": (sp.sin, 1, 1),
    "cos": (sp.cos, 1, 1),
    "tan": (sp.tan, 1, 1),
    "asin": (sp.asin, 1, 1),
    "acos": (sp.acos, 1, 1),
    "atan": (sp.atan, 1, 1),
    "atan2": (sp.atan2, 2, 2),
    "sinh": (sp.sinh, 1, 1),
    "cosh": (sp.cosh, 1, 1),
    "tanh": (sp.tanh, 1, 1),
    "asinh": (sp.asinh, 1, 1),
    "acosh": (sp.acosh, 1, 1),
    "atanh": (sp.atanh, 1, 1),
    "erf": (sp.erf, 1, 1),
    "erfc": (sp.erfc, 1, 1),
    "Abs": (sp.Abs, 1, 1),
    "abs": (sp.Abs, 1, 1),
    "sign": (sp.sign, 1, 1),
    "Heaviside": (sp.Heaviside, 1, 1),
    "Max": (sp.Max, 2, 16),
    "Min": (sp.Min, 2, 16),
    "max": (sp.Max, 2, 16),
    "min": (sp.Min, 2, 16),
    "sigmoid": (sigmoid, 1, 1),
    "softplus": (softplus, 1, 1),
    "Piecewise": (sp.Piecewise, 1, 16),
}

#: Names that stand for numbers rather than symbols.
CONSTANTS: dict[str, sp.Expr] = {"pi": sp.pi, "E": sp.E}

_BINARY: dict[type[ast.operator], Callable[[sp.Expr, sp.Expr], sp.Expr]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
_COMPARE: dict[type[ast.cmpop], Callable[[sp.Expr, sp.Expr], sp.Basic]] = {
    ast.Lt: sp.Lt,
    ast.LtE: sp.Le,
    ast.Gt: sp.Gt,
    ast.GtE: sp.Ge,
}
# Node types that may appear anywhere in the tree; everything else is refused by name.
_ALLOWED = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call,
    ast.Tuple, ast.Compare, ast.BoolOp,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or,
    ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.BitAnd, ast.BitOr, ast.Invert,
)  # fmt: skip
_LOGIC = (ast.BitAnd, ast.BitOr)  # SymPy's & and |: only between conditions
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_DESCRIBE: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "a subscript ([...])",
    ast.Lambda: "a lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.IfExp: "a conditional expression (use Piecewise((a, cond), (b, True)))",
    ast.JoinedStr: "an f-string",
    ast.List: "a list",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.Starred: "a starred argument",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.keyword: "a keyword argument",
    ast.Slice: "a slice",
    ast.BitXor: "the operator ^ (write powers as x**2)",
    ast.FloorDiv: "the operator //",
    ast.Mod: "the operator %",
    ast.MatMult: "the operator @",
    ast.LShift: "the operator <<",
    ast.RShift: "the operator >>",
    ast.Eq: "the comparison ==",
    ast.NotEq: "the comparison !=",
    ast.Is: "the comparison is",
    ast.IsNot: "the comparison is not",
    ast.In: "the comparison in",
    ast.NotIn: "the comparison not in",
}


def _sorted(names: object) -> list[str]:
    return sorted(names, key=lambda n: (n.lower(), n))  # type: ignore[call-overload]


def _allowed_summary() -> str:
    return "numbers, symbols, the constants pi and E, + - * / **, and calls of " + ", ".join(
        _sorted(FUNCTIONS)
    )


EXACT_LIMIT = 2**53
"""A decimal literal becomes an exact rational when its numerator and denominator stay below
this (every float64 integer is exact below it); others stay floats (``1e-30``)."""


def exact_decimal(value: float) -> sp.Expr:
    """A float literal as the exact rational its shortest decimal spells (``0.5`` → ``1/2``,
    ``0.044715`` → ``8943/200000``), so a derivation prints ``1/2`` rather than
    ``0.500000000000000`` and the kernels compute the number the formula wrote; a number whose
    exact form would need numerator or denominator ≥ 2**53 (``1e-30``) stays a ``Float``.

    >>> exact_decimal(0.5), exact_decimal(2.5e-3), exact_decimal(1e-30)
    (1/2, 1/400, 1.00000000000000e-30)
    """
    exact = sp.Rational(repr(value))
    if abs(exact.p) < EXACT_LIMIT and exact.q < EXACT_LIMIT:
        return exact
    return sp.Float(value)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        shown = text if len(text) <= 80 else text[:77] + "..."
        self.shown = repr(shown)

    def fail(self, what: str, node: ast.AST | None = None, hint: str = "") -> FormulaError:
        where = ""
        col = getattr(node, "col_offset", None)
        if col is not None:
            where = f" at column {col + 1}"
        hint = hint or f"a formula may only use {_allowed_summary()}"
        return FormulaError(f"formula {self.shown}: {what}{where} is not allowed; {hint}")

    # -- checks before anything is built ----------------------------------------------------

    def check(self, tree: ast.Expression) -> None:
        count = 0
        stack: list[tuple[ast.AST, int]] = [(tree, 0)]
        while stack:  # iterative: a deep tree must not exhaust Python's recursion limit
            node, depth = stack.pop()
            count += 1
            if count > MAX_NODES:
                raise FormulaError(
                    f"formula {self.shown}: more than {MAX_NODES} syntax nodes; split it up or "
                    "define the op with symgrad.elementwise in Python"
                )
            if depth > MAX_DEPTH:
                raise FormulaError(
                    f"formula {self.shown}: nested deeper than {MAX_DEPTH} levels; simplify it "
                    "or define the op with symgrad.elementwise in Python"
                )
            if not isinstance(node, _ALLOWED):
                raise self.fail(self.describe(node), node)
            if isinstance(node, ast.Name):
                self.check_name(node)
            if isinstance(node, ast.Call):
                self.check_call(node)
            if isinstance(node, ast.Constant):
                self.check_constant(node)
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))

    def describe(self, node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"attribute access (.{node.attr})"
        if isinstance(node, ast.Call):
            return "the result of a call"
        return _DESCRIBE.get(type(node), type(node).__name__)

    def check_name(self, node: ast.Name) -> None:
        name = node.id
        if name.startswith("_"):
            raise self.fail(
                f"the name {name!r} (names starting with an underscore)",
                node,
                "symbols are plain names such as x, y, alpha",
            )
        if not _NAME.fullmatch(name) or len(name) > MAX_NAME or keyword.iskeyword(name):
            raise self.fail(
                f"the name {name[:MAX_NAME]!r}",
                node,
                f"symbols are ASCII names of at most {MAX_NAME} characters",
            )

    def check_call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name):
            what = (
                f"calling {self.describe(node.func)}"
                if not isinstance(node.func, ast.Attribute)
                else f"attribute access (.{node.func.attr})"
            )
            raise self.fail(what, node.func)
        name = node.func.id
        if name not in FUNCTIONS:
            close = closest(name, FUNCTIONS)
            hint = f"; did you mean {close!r}?" if close is not None else ""
            raise self.fail(
                f"calling {name!r} (not a known function{hint})",
                node,
                "known functions: " + ", ".join(_sorted(FUNCTIONS)),
            )
        if node.keywords:
            raise self.fail(f"a keyword argument in {name}(...)", node.keywords[0].value)
        _, low, high = FUNCTIONS[name]
        if not low <= len(node.args) <= high:
            count = f"{low}" if low == high else f"{low} to {high}"
            raise FormulaError(
                f"formula {self.shown}: {name} takes {count} argument(s), got {len(node.args)} "
                f"at column {node.col_offset + 1}"
            )

    def check_constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            return  # allowed only as a Piecewise condition; checked while building
        if isinstance(value, int):
            if len(str(abs(value))) > MAX_DIGITS:
                raise self.fail(f"an integer of more than {MAX_DIGITS} digits", node, "use a float")
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(f"the non-finite number {value!r}", node, "use a finite float")
            return
        kind = "a complex number" if isinstance(value, complex) else f"a {type(value).__name__}"
        raise self.fail(f"{kind} ({value!r})"[:80], node)

    # -- building ---------------------------------------------------------------------------

    def build(self, node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.Expression):
            return self.build(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                raise self.fail(
                    f"the truth value {node.value}", node, "True and False are Piecewise conditions"
                )
            if isinstance(node.value, int):
                return sp.Integer(node.value)
            assert isinstance(node.value, float)  # check_constant allowed nothing else
            return exact_decimal(node.value)
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            if node.id in FUNCTIONS:
                raise self.fail(
                    f"the function {node.id!r} used as a value", node, f"call it: {node.id}(x)"
                )
            return sp.Symbol(node.id, real=True)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.Not, ast.Invert)):
                raise self.fail("a negated condition outside a Piecewise condition", node)
            operand = self.build(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, _LOGIC):
                raise self.fail("a condition (& or |) outside a Piecewise condition", node)
            left, right = self.build(node.left), self.build(node.right)
            if isinstance(node.op, ast.Pow):
                self.check_power(left, right, node)
            return self.checked(_BINARY[type(node.op)](left, right), node)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)  # checked in check_call
            name = node.func.id
            if name == "Piecewise":
                return self.piecewise(node)
            function, _, most = FUNCTIONS[name]
            args = [self.build(a) for a in node.args]
            if function in (sp.Max, sp.Min):  # SymPy merges nested ones: count the merged
                merged = 0
                for a in args:
                    merged += len(a.args) if a.func is function else 1
                if merged > most:
                    raise FormulaError(
                        f"formula {self.shown}: {name} at column {node.col_offset + 1} has "
                        f"{merged} arguments once nested {name}s are merged, more than {most}"
                    )
            try:
                return self.checked(function(*args), node)
            except (TypeError, ValueError) as err:
                raise FormulaError(f"formula {self.shown}: {name}(...) failed: {err}") from err
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            raise self.fail("a comparison outside a Piecewise condition", node)
        if isinstance(node, ast.Tuple):
            raise self.fail("a tuple outside Piecewise((value, condition), ...)", node)
        raise self.fail(self.describe(node), node)  # unreachable after check()

    def check_power(self, base: sp.Expr, exponent: sp.Expr, node: ast.BinOp) -> None:
        """Refuse a power SymPy would take too long to evaluate, before it is built."""
        if exponent.is_number and not (exponent.is_real and abs(exponent) <= MAX_POWER):
            raise FormulaError(
                f"formula {self.shown}: the exponent {str(exponent)[:40]} at column "
                f"{node.right.col_offset + 1} is above {MAX_POWER} in absolute value; "
                "expanding such a power would not finish"
            )
        if base.is_Rational and exponent.is_number:
            size = max(abs(base.p), abs(base.q))  # type: ignore[attr-defined]
            if len(str(size)) * float(abs(exponent)) > MAX_DIGITS * 10:
                raise FormulaError(
                    f"formula {self.shown}: the power at column {node.col_offset + 1} is a number "
                    f"of more than {MAX_DIGITS * 10} digits"
                )

    def checked(self, expr: sp.Expr, node: ast.AST) -> sp.Expr:
        """``expr`` if SymPy's automatic simplification left no oversized power or number."""
        for sub in sp.preorder_traversal(expr):
            if isinstance(sub, sp.Pow) and sub.exp.is_number and abs(sub.exp) > MAX_POWER:
                raise FormulaError(
                    f"formula {self.shown}: the power {str(sub)[:60]} (at column "
                    f"{getattr(node, 'col_offset', 0) + 1}) has an exponent above {MAX_POWER}"
                )
            if isinstance(sub, sp.Integer) and len(str(abs(int(sub)))) > MAX_DIGITS * 10:
                raise FormulaError(
                    f"formula {self.shown}: a number of more than {MAX_DIGITS * 10} digits"
                )
        return expr

    def piecewise(self, node: ast.Call) -> sp.Expr:
        pairs = []
        for arg in node.args:
            if not (isinstance(arg, ast.Tuple) and len(arg.elts) == 2):
                raise self.fail(
                    "a Piecewise argument that is not a pair",
                    arg,
                    "write Piecewise((value, condition), ..., (value, True))",
                )
            pairs.append((self.build(arg.elts[0]), self.condition(arg.elts[1])))
        try:
            return sp.Piecewise(*pairs)
        except (TypeError, ValueError) as err:
            raise FormulaError(f"formula {self.shown}: Piecewise(...) failed: {err}") from err

    def condition(self, node: ast.AST) -> sp.Basic:
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return sp.true if node.value else sp.false
        if isinstance(node, ast.Compare):
            terms = [self.build(node.left), *(self.build(c) for c in node.comparators)]
            parts = [
                _COMPARE[type(op)](a, b)
                for op, a, b in zip(node.ops, terms[:-1], terms[1:], strict=True)
            ]
            return sp.And(*parts) if len(parts) > 1 else parts[0]
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(v) for v in node.values]
            return sp.And(*parts) if isinstance(node.op, ast.And) else sp.Or(*parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _LOGIC):
            left, right = self.condition(node.left), self.condition(node.right)
            return sp.And(left, right) if isinstance(node.op, ast.BitAnd) else sp.Or(left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
            return sp.Not(self.condition(node.operand))
        raise self.fail(
            "a condition that is not a comparison",
            node,
            "conditions are comparisons (< <= > >=) joined by and/or/not, or True",
        )


def parse_formula(text: str) -> sp.Expr:
    """The SymPy expression of a formula string, built without evaluating any Python.

    Args:
        text: a formula in Python syntax over symbols, numbers, ``+ - * / **`` and the
            functions of :data:`FUNCTIONS`, e.g. ``"x*tanh(softplus(x))"``.

    Returns:
        The expression; every name becomes a real ``Symbol``.

    Raises:
        FormulaError: the text is not such a formula (too long, a syntax error, or a construct
            outside the allow-list), naming what and where.

    >>> parse_formula("Piecewise((x, x > 0), (0.01*x, True))")
    Piecewise((x, x > 0), (x/100, True))
    """
    if not isinstance(text, str):
        raise FormulaError(f"a formula is a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FormulaError(
            f"formula of {len(text)} characters is longer than the limit of {MAX_LENGTH}; "
            "define a large op with symgrad.elementwise in Python instead"
        )
    parser = _Parser(text)
    if not text.strip():
        raise FormulaError("the formula is empty; give an expression such as 'x*tanh(x)'")
    depth = deepest = 0
    for char in text:  # before ast.parse, whose own recursion has limits of its own
        depth += char in "([{"
        depth -= char in ")]}"
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise FormulaError(
            f"formula {parser.shown}: brackets nested {deepest} deep, more than {MAX_DEPTH}"
        )
    try:
        with warnings.catch_warnings():  # e.g. "'str' object is not callable": refused below
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text.strip(), mode="eval")  # builds a tree; nothing is evaluated
    except SyntaxError as err:
        where = f" at column {err.offset}" if err.offset else ""
        raise FormulaError(
            f"formula {parser.shown} is not a valid expression: {err.msg}{where}"
        ) from None
    except (ValueError, RecursionError, MemoryError) as err:
        raise FormulaError(f"formula {parser.shown} cannot be parsed: {err}") from None
    parser.check(tree)
    expr = parser.build(tree)
    if not isinstance(expr, sp.Expr):
        raise FormulaError(f"formula {parser.shown} is not an expression, got {expr}")
    return expr


def as_expression(value: object, what: str, strings: bool = True) -> sp.Basic:
    """A formula given to symgrad's API as a SymPy object, without evaluating any Python.

    SymPy objects pass unchanged; a string goes through :func:`parse_formula` (when
    ``strings``; else it is refused: index notation has no string form); a real number
    becomes a SymPy number.  Everything else — in particular a tuple, list or dict, which
    ``sympify`` would evaluate element by element even with ``strict=True`` — is a
    :class:`~symgrad.errors.DefinitionError`.

    >>> as_expression("x*tanh(x)", "op 'f': the formula")
    x*tanh(x)
    >>> as_expression(("__import__('os')",), "op 'f': the formula")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    symgrad.errors.DefinitionError: op 'f': the formula ... is a tuple, not a SymPy expression...
    """
    if isinstance(value, sp.Basic):
        return value
    if isinstance(value, str):
        if not strings:
            raise DefinitionError(
                f"{what} is a string ({value[:60]!r}); write it as a SymPy expression over "
                "IndexedBase tensors (strings are never evaluated)"
            )
        return parse_formula(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return sp.Integer(int(value))
        return sp.Float(float(value))
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise DefinitionError(
        f"{what} {shown} is a {type(value).__name__}, not a SymPy expression; build it "
        "from sympy symbols and functions (or give a formula string)"
    )
