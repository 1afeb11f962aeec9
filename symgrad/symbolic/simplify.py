"""Deterministic simplification: a ladder of rewrites, each bounded by the expression's size.

``sympy.simplify`` tries dozens of strategies and can take minutes on a modest derivative, so
it cannot run unbounded; bounding it by a clock would make the generated code depend on the
machine's load and on the thread (a timer is only available on the main thread).
:func:`bounded_simplify` instead tries a fixed ladder of SymPy rewrites, cheapest first, and keeps
the one with the fewest operations (``count_ops``; ties keep the earlier).  Whether a rung runs is
decided by measures of the expression alone (:mod:`symgrad.symbolic.bounds`): rewrites that
expand products and powers are skipped when the expansion could exceed
:data:`~symgrad.symbolic.bounds.MAX_EXPANSION_TERMS` terms, and an expression of more than
:data:`MAX_SIMPLIFY_NODES` nodes is left as it is.  No signal, timer or thread is involved: the
result is a pure function of the input.

Every rung is an identity: the result is mathematically equal to the input, and evaluates to the
same floating-point values up to rounding (a factor ``1.0`` is dropped only where it is exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from .bounds import may_expand, tree_size

#: Expressions larger than this (tree nodes) are not simplified (see :func:`bounded_simplify`).
MAX_SIMPLIFY_NODES = 1_000


def _drop_unit_floats(expr: sp.Expr) -> sp.Expr:
    """``1.0*a`` → ``a`` (also in conditions: ``1.0*x > 20.0`` → ``x > 20.0``).

    Multiplying by 1.0 is exact in IEEE arithmetic, so this changes no value; bound parameters
    with torch's defaults (``beta=1.0``) leave such factors behind."""

    def unit(node: sp.Basic) -> bool:
        return isinstance(node, sp.Mul) and any(
            a.is_Float and float(a) == 1.0 for a in node.args
        )

    def drop(node: sp.Mul) -> sp.Expr:
        return sp.Mul(*[a for a in node.args if not (a.is_Float and float(a) == 1.0)])

    return expr.replace(unit, drop)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Rung:
    """One rewrite of the ladder; ``expands`` rewrites run only where expansion stays small."""

    name: str
    rewrite: Callable[[sp.Expr], sp.Expr]
    expands: bool = False


#: The ladder, cheapest first.  Each rung rewrites the input (after the exact clean-up of
#: :func:`_drop_unit_floats`); the smallest result wins.
LADDER: tuple[Rung, ...] = (
    Rung("expand", sp.expand, expands=True),
    Rung("factor_terms", sp.factor_terms),
    Rung("factor_terms of the expansion", lambda e: sp.factor_terms(sp.expand(e)), expands=True),
    Rung("cancel", sp.cancel, expands=True),
    Rung("powsimp", sp.powsimp),
)

# What a rung raises when it does not apply to an expression (e.g. cancel on a relational).
_NOT_APPLICABLE = (sp.PolynomialError, TypeError, ValueError, NotImplementedError)


def bounded_simplify(expr: sp.Expr) -> sp.Expr:
    """The smallest (by ``count_ops``) of the :data:`LADDER` rewrites of ``expr``.

    Deterministic: which rungs run depends only on ``expr`` (its size and the terms expansion
    would create), never on time, thread or load.

    >>> import sympy as sp
    >>> x = sp.Symbol("x")
    >>> bounded_simplify((x**2 - 1) / (x - 1))
    x + 1
    """
    if tree_size(expr) > MAX_SIMPLIFY_NODES:
        return expr
    best, best_ops = expr, sp.count_ops(expr)
    start = _drop_unit_floats(expr)
    expandable = may_expand(start)
    for candidate in _candidates(start, expandable):
        if tree_size(candidate) > MAX_SIMPLIFY_NODES:
            continue
        ops = sp.count_ops(candidate)
        if ops < best_ops:
            best, best_ops = candidate, ops
    return best


def _candidates(expr: sp.Expr, expandable: bool) -> list[sp.Expr]:
    """``expr`` and each applicable rung's rewrite of it, in ladder order."""
    out = [expr]
    for rung in LADDER:
        if rung.expands and not expandable:
            continue
        try:
            out.append(rung.rewrite(expr))
        except _NOT_APPLICABLE:
            continue  # a rung that does not apply to this expression
    return out
