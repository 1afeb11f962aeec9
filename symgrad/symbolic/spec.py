"""OpSpec: a validated op definition, the input of every later stage.

:func:`elementwise_spec` checks a user's formula at definition time — names, inputs, constants,
unbound symbols — and returns a frozen :class:`OpSpec` whose ``key`` (a content hash) names the
op's compiled kernels in the cache.
"""

from __future__ import annotations

import hashlib
import keyword
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sympy as sp
from sympy.logic.inference import satisfiable

from ..errors import DefinitionError, UnboundSymbolError
from .parse import as_expression

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class OpSpec:
    """An elementwise op: ``out = expr(*inputs)``, applied element by element.

    ``inputs`` are real symbols (the user's symbols, re-declared ``real=True`` so that
    ``Abs`` and ``sign`` differentiate as on the real line); ``expr`` has every constant
    substituted.  ``constants`` keeps the user's bindings for printouts.
    """

    name: str
    expr: sp.Expr
    inputs: tuple[sp.Symbol, ...]
    constants: tuple[tuple[str, float], ...]
    fastmath: bool = False
    parallel: bool = False
    wrt: tuple[sp.Symbol, ...] = ()  # the inputs that get a gradient (all, unless chosen)

    @property
    def key(self) -> str:
        """A content hash of everything that determines the generated code."""
        text = "|".join(
            [
                "elementwise",
                self.name,
                sp.srepr(self.expr),
                ",".join(s.name for s in self.inputs),
                repr(self.constants),
                f"fastmath={self.fastmath}",
                f"parallel={self.parallel}",
                "wrt=" + ",".join(s.name for s in self.wrt),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()


def check_name(name: object) -> str:
    """An op name: a Python identifier (it names generated functions and cache files)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or keyword.iskeyword(name):
        raise DefinitionError(
            f"op name {name!r} is not usable: give a Python identifier such as 'softsign' "
            "(letters, digits and underscores, not starting with a digit, not a keyword)"
        )
    return name


def fresh_name(stem: str, taken: Iterable[str]) -> str:
    """``stem``, with underscores appended until it is none of ``taken``."""
    used = set(taken)
    name = stem
    while name in used:
        name += "_"
    return name


def _as_number(symbol: sp.Symbol, value: object) -> sp.Expr:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, sp.Number)):
        raise DefinitionError(
            f"constant {symbol} = {value!r} ({type(value).__name__}) is not a real number: "
            "bind constants to int, float or a SymPy number"
        )
    number = sp.sympify(value)
    if not (number.is_real and number.is_finite):
        raise DefinitionError(f"constant {symbol} = {value!r} is not a finite real number")
    return number


def bind_constants(
    expr: sp.Expr, constants: Mapping[sp.Symbol | str, object] | None, reserved: Iterable[str]
) -> tuple[sp.Expr, tuple[tuple[str, float], ...]]:
    """Substitute ``constants`` into ``expr``; reject unknown, unused or clashing names."""
    reserved = set(reserved)
    by_name = {s.name: s for s in expr.free_symbols if isinstance(s, sp.Symbol)}
    substitutions: dict[sp.Symbol, sp.Expr] = {}
    record: list[tuple[str, float]] = []
    for key, value in (constants or {}).items():
        name = key.name if isinstance(key, sp.Symbol) else key
        if not isinstance(name, str):
            raise DefinitionError(f"constant key {key!r} is neither a SymPy Symbol nor a name")
        if name in reserved:
            raise DefinitionError(
                f"{name!r} is declared both as an input and as a constant: drop one of the two"
            )
        if name not in by_name:
            raise DefinitionError(
                f"constant {name!r} does not occur in the formula {expr}: remove it or fix its "
                f"name (the formula's symbols are {sorted(by_name)})"
            )
        number = _as_number(by_name[name], value)
        substitutions[by_name[name]] = number
        record.append((name, float(number)))
    bound = expr.xreplace(substitutions) if substitutions else expr
    return bound, tuple(sorted(record))


def check_piecewise(op: str, formula: sp.Expr) -> None:
    """Every ``Piecewise`` of ``formula`` whose conditions are on values (not on indices) has
    a value everywhere: its conditions together always hold (SymPy folds complementary ones,
    ``x > 0`` then ``x <= 0``, into a last ``True``; others are compared as propositions, a
    relation and its negation being one); else a :class:`DefinitionError` (the formula would
    have no value where none holds).  Conditions on integer indices (``i <= 1``, ``i >= 2``)
    hold or not by the indices' ranges, which are not known here: they are left alone."""
    for pw in formula.atoms(sp.Piecewise):
        conds = [arg.cond for arg in pw.args]
        if conds[-1] == sp.true or any(_on_indices(c) for c in conds):
            continue
        if not _exhaustive(conds):
            raise DefinitionError(
                f"op {op!r}: {pw} has no value where none of its conditions holds; end it "
                "with a default, (value, True)"
            )


def _on_indices(cond: sp.Basic) -> bool:
    """Whether ``cond`` tests an integer index (not only the values of tensors read at one)."""
    values = {x: sp.Dummy(real=True) for x in cond.atoms(sp.Indexed) if not x.base.is_integer}
    return any(s.is_integer for s in cond.xreplace(values).free_symbols)


def _exhaustive(conds: list[sp.Basic]) -> bool:
    """Whether one of ``conds`` always holds: by SymPy's simplification, or as propositions
    over their relations (``a > b`` and ``a <= b`` one proposition and its negation)."""
    if sp.Or(*conds).simplify() == sp.true:
        return True
    atoms: dict[sp.Basic, sp.Basic] = {}

    def proposition(rel: sp.Basic) -> sp.Basic:
        key, negated = rel.canonical, rel.negated.canonical
        if negated in atoms:
            return sp.Not(atoms[negated])
        return atoms.setdefault(key, sp.Dummy("p"))

    values = {x: sp.Dummy(real=True) for c in conds for x in c.atoms(sp.Indexed)}
    relations = {r for c in conds for r in c.xreplace(values).atoms(sp.core.relational.Relational)}
    table = {r: proposition(r) for r in sorted(relations, key=sp.default_sort_key)}
    logic = sp.Or(*(c.xreplace(values).xreplace(table) for c in conds))
    return not satisfiable(sp.Not(logic))


def elementwise_spec(
    expr: object,
    inputs: Iterable[sp.Symbol],
    name: str,
    constants: Mapping[sp.Symbol | str, object] | None = None,
    fastmath: bool = False,
    parallel: bool = False,
    wrt: Iterable[sp.Symbol | str] | None = None,
) -> OpSpec:
    """Validate an elementwise definition and return its :class:`OpSpec`.

    ``wrt`` names the inputs that get a gradient (symbols or their names; default: all).
    """
    name = check_name(name)
    formula = as_expression(expr, f"op {name!r}: the formula")
    if not isinstance(formula, sp.Expr) or isinstance(formula, sp.Indexed):
        raise DefinitionError(
            f"op {name!r}: the formula must be a scalar SymPy expression, got "
            f"{type(formula).__name__} {formula}"
        )
    if formula.has(sp.Indexed, sp.IndexedBase):
        raise DefinitionError(
            f"op {name!r}: the formula uses indexed tensors; use symgrad.tensor_op for index "
            "notation, symgrad.elementwise for scalar formulas"
        )
    inputs = tuple(inputs)
    if not inputs:
        raise DefinitionError(f"op {name!r}: give at least one input symbol in inputs=[...]")
    for symbol in inputs:
        if not isinstance(symbol, sp.Symbol):
            raise DefinitionError(
                f"op {name!r}: input {symbol!r} is not a SymPy Symbol; declare inputs with "
                "sympy.Symbol('x', real=True)"
            )
    names = [s.name for s in inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DefinitionError(f"op {name!r}: input names repeat: {duplicates}")

    formula, bound = bind_constants(formula, constants, reserved=names)
    check_piecewise(name, formula)
    unbound = sorted(
        s.name for s in formula.free_symbols if not (isinstance(s, sp.Symbol) and s.name in names)
    )
    if unbound:
        raise UnboundSymbolError(
            f"op {name!r}: symbol(s) {unbound} are neither inputs ({names}) nor bound constants; "
            f"add them to inputs=[...] or bind them with constants={{{unbound[0]}: value}}"
        )
    real_inputs = tuple(sp.Symbol(n, real=True) for n in names)
    by_name = dict(zip(names, real_inputs, strict=True))
    renamed = {s: by_name[s.name] for s in formula.free_symbols if s != by_name[s.name]}
    if renamed:  # (xreplace rebuilds every node above a replaced symbol, even by itself)
        formula = formula.xreplace(renamed)
    if wrt is None:
        chosen = real_inputs
    else:
        wanted = [getattr(w, "name", w) for w in wrt]
        for w in wanted:
            if w not in by_name:
                raise DefinitionError(
                    f"op {name!r}: wrt names {w!r}, which is not an input {names}"
                )
        if len(set(wanted)) != len(wanted) or not wanted:
            raise DefinitionError(
                f"op {name!r}: wrt must name one or more inputs, each once; got {wanted}"
            )
        chosen = tuple(s for s in real_inputs if s.name in wanted)
    return OpSpec(
        name, formula, real_inputs, bound, fastmath=fastmath, parallel=parallel, wrt=chosen
    )
