"""Size limits of the symbolic stages: every step's work bounded by counts, never by time.

SymPy's algorithms have no step limits of their own, and some blow up on small inputs:
``sympy.expand((x + y + z + w + 1)**64)`` builds 814,385 terms, a product of 16 ``Piecewise``
folds into 65,536 branches.  symgrad therefore *measures* an expression before a step that could
blow up and decides from the measure alone — the same formula always takes the same path, on
any machine, thread or load:

* :func:`tree_size` — nodes of the expression tree, a shared subtree counted at every use (what
  differentiation, printing and CSE walk).  An intermediate result above :data:`MAX_NODES` is a
  :class:`~symgrad.errors.ComplexityError` naming the op, the step and the limit
  (:func:`check_size`).
* :func:`expansion_terms` — an upper bound on the terms ``sympy.expand`` (and ``cancel``, which
  expands) would create anywhere in the expression, computed from the shape of the tree
  without expanding.  Optional rewrites that expand are skipped above
  :data:`MAX_EXPANSION_TERMS` (:func:`may_expand`); they only ever simplify.
* :func:`is_zero` — whether an expression is identically zero, deciding by expansion only when
  that is small, else answering "not known to be zero" (callers treat that conservatively).

Both measures are linear in the number of *distinct* subexpressions (memoized), so measuring
is cheap even where the tree itself is exponentially large.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import comb
from typing import TypeVar

import sympy as sp

from ..errors import ComplexityError

#: The most tree nodes any intermediate expression of a derivation may have.  The built-in
#: ops stay below 1,000; a formula past this limit would take minutes to differentiate,
#: simplify, share subexpressions in and compile.
MAX_NODES = 20_000
#: The most terms a rewrite may create by expanding products and integer powers.
MAX_EXPANSION_TERMS = 2_000
#: The most additive terms the Kronecker-delta contraction may split a gradient into.
MAX_TERMS = 5_000
_CAP = 10**18  # measures saturate here: they are compared against limits, never printed raw
B = TypeVar("B", bound=sp.Basic)


def _weight(node: sp.Basic) -> int:
    """A node's share of a size: ``Max``/``Min`` count once per pair of arguments — SymPy
    compares every pair each time it builds one (differentiating ``Max(a, b, c)`` builds
    ``Max(b, c)``, ``Max(a, c)``, ...), which makes them by far the costliest nodes."""
    if isinstance(node, (sp.Max, sp.Min)):
        return len(node.args) ** 2
    return 1


def tree_size(expr: sp.Basic) -> int:
    """The number of nodes of ``expr``'s tree, shared subtrees counted at every use.

    >>> import sympy as sp
    >>> x = sp.Symbol("x")
    >>> tree_size(sp.sin(x) + x)
    4
    """
    memo: dict[sp.Basic, int] = {}
    stack: list[tuple[sp.Basic, bool]] = [(expr, False)]
    while stack:  # iterative: a deep tree must not exhaust Python's recursion limit
        node, ready = stack.pop()
        if node in memo:
            continue
        if ready:
            memo[node] = min(_CAP, _weight(node) + sum(memo[a] for a in node.args))
            continue
        stack.append((node, True))
        stack.extend((a, False) for a in node.args if a not in memo)
    return memo[expr]


def expansion_terms(expr: sp.Basic) -> int:
    """An upper bound on the number of terms ``sympy.expand`` creates in any subexpression.

    A sum has as many terms as its parts together, a product as their product, a power
    ``u**n`` with integer ``|n|`` (or a rational with integer part ``n``) the number of
    monomials of degree ``n`` in the terms of ``u``; a function's arguments are expanded on
    their own (its value counts as one term).

    >>> import sympy as sp
    >>> x, y, z, w = sp.symbols("x y z w")
    >>> expansion_terms((x + y + z + w + 1)**64)
    814385
    >>> expansion_terms((x + 1) * (y + 1))
    4
    """
    memo: dict[sp.Basic, int] = {}
    worst = 1
    stack: list[tuple[sp.Basic, bool]] = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if node in memo:
            continue
        if not ready:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if a not in memo)
            continue
        terms = 1
        if isinstance(node, sp.Add):
            terms = sum(memo[a] for a in node.args)
        elif isinstance(node, sp.Mul):
            terms = 1
            for a in node.args:
                terms = min(_CAP, terms * memo[a])
        elif isinstance(node, sp.Pow) and node.exp.is_Rational:
            base, n = memo[node.base], int(abs(node.exp))
            terms = 1 if base == 1 or n == 0 else _monomials(base, n)
        memo[node] = terms = min(_CAP, terms)
        worst = max(worst, terms)
    return worst


def _monomials(terms: int, degree: int) -> int:
    """The number of monomials of ``degree`` in ``terms`` variables (saturating)."""
    if terms > 10**6 or degree > 10**6:
        return _CAP
    return min(_CAP, comb(degree + terms - 1, terms - 1))


def may_expand(expr: sp.Basic, limit: int = MAX_EXPANSION_TERMS) -> bool:
    """Whether expanding ``expr`` stays within ``limit`` terms (see :func:`expansion_terms`)."""
    return expansion_terms(expr) <= limit


def check_size(expr: B, op: str, step: str, limit: int = MAX_NODES) -> B:
    """``expr``, if its tree has at most ``limit`` nodes; else a :class:`ComplexityError`.

    ``step`` says what produced it (e.g. "the derivative with respect to x").
    """
    _check(tree_size(expr), op, step, limit)
    return expr


def check_derivatives(expr: sp.Basic, wrt: Iterable[sp.Basic], op: str) -> None:
    """A :class:`ComplexityError` *before* differentiating ``expr`` when its derivatives by
    ``wrt`` would together exceed :data:`MAX_NODES` (estimated by :func:`derivative_size`):
    the kernels evaluate them together, and each costs in proportion to its size."""
    sizes = {str(x): derivative_size(expr, x) for x in wrt}
    total = sum(sizes.values())
    if total > MAX_NODES:
        largest = max(sizes, key=lambda name: sizes[name])
        _check(total, op, f"the derivatives (largest: with respect to {largest})", MAX_NODES)


def _check(size: int, op: str, step: str, limit: int) -> None:
    if size > limit:
        raise ComplexityError(
            f"op {op!r}: {step} would have {_count(size)} expression nodes, more than the limit "
            f"of {limit:,} (symgrad.symbolic.bounds); symbolic work on it would not end in "
            "reasonable time. Simplify the formula, or split it into smaller ops composed in "
            "a network"
        )


def is_zero(expr: sp.Basic) -> bool:
    """Whether ``expr`` is identically zero: True only when shown (by SymPy's automatic
    simplification, else by expanding when :func:`may_expand`); False means "not shown"."""
    if expr == 0:
        return True
    if not may_expand(expr):
        return False
    return bool(sp.expand(expr) == 0)


def _count(n: int) -> str:
    return f"more than {_CAP:,}" if n >= _CAP else f"{n:,}"


def derivative_size(expr: sp.Basic, x: sp.Basic) -> int:
    """An estimate of the tree size of ``sympy.diff(expr, x)``, computed without
    differentiating: a sum differentiates term by term; any other node ``f(a, b, ...)``
    contributes, for each argument holding ``x``, a copy of itself (the partial derivative,
    ``∂f/∂a`` is about as large as ``f``) times that argument's derivative.  With ``x`` an
    element ``X[k]`` of a tensor, every element of ``X`` counts (it differentiates to
    Kronecker deltas).

    >>> import sympy as sp
    >>> x, y = sp.symbols("x y")
    >>> derivative_size(sp.sin(x * y) + y, x)  # y*cos(x*y) has 6 nodes
    8
    """
    sizes: dict[sp.Basic, int] = {}
    memo: dict[sp.Basic, int] = {}
    stack: list[tuple[sp.Basic, bool]] = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if node in memo:
            continue
        if not ready:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if a not in memo)
            continue
        sizes[node] = min(_CAP, _weight(node) + sum(sizes[a] for a in node.args))
        if node == x:
            memo[node] = 1
        elif isinstance(x, sp.Indexed) and isinstance(node, sp.Indexed) and node.base == x.base:
            memo[node] = 1 + 2 * len(node.indices)  # a product of Kronecker deltas
        elif not any(memo[a] for a in node.args):
            memo[node] = 0
        elif isinstance(node, sp.Add):  # term by term
            memo[node] = min(_CAP, 1 + sum(memo[a] for a in node.args))
        elif isinstance(node, sp.Sum):  # the body's derivative, summed over the same limits
            body, *limits = node.args
            memo[node] = min(_CAP, 1 + memo[body] + sum(sizes[a] for a in limits))
        elif isinstance(node, sp.Piecewise):  # branch by branch, conditions kept
            memo[node] = min(_CAP, 1 + sum(memo[p.args[0]] + sizes[p.args[1]] for p in node.args))
        elif isinstance(node, sp.Mul):  # the product rule: the other factors times a'
            memo[node] = min(
                _CAP, sum(sizes[node] - sizes[a] + memo[a] for a in node.args if memo[a])
            )
        else:  # f'(a)·a': about as large as f(a), times a's derivative
            memo[node] = min(
                _CAP, sum(sizes[node] + memo[a] for a in node.args if memo[a])
            )
    return memo[expr]
