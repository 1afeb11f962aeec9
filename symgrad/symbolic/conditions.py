"""Conditions on indices in index notation: indicators, index intervals, bounds from conditions.

A condition ``c`` inside a product is carried as an *indicator* ``[c]``, written
``Piecewise((1, c), (0, True))``.  Indicators come from three places:

* a ``Piecewise`` under a sum, split into its branches (``Piecewise((e1, c1), (e2, True))`` is
  ``e1·[c1] + e2·[¬c1]``) so that a Kronecker delta in a branch can be contracted and a
  condition on the summation index can become a bound;
* contracting a delta over a sum whose range may not hold the other index:
  ``Σ_{t=lo}^{hi} δ(t, k)·f(t) = [lo ≤ k]·[k ≤ hi]·f(k)`` (a triangular sum, a shifted index);
* ``Heaviside(s - t, 1)`` of indices, a causal mask.

An indicator on a summation index whose condition is a linear inequality becomes a bound:
``Σ_{u=0}^{S-1} [u ≤ s]·f(u) = Σ_{u=0}^{s} f(u)`` — the lowering then loops over the triangle,
and the max shift of a ``Σ exp`` sees only the scores the condition keeps.  Before code is
generated, :func:`refold_indicators` turns every product with indicators back into
``Piecewise((product, c), (0, True))``: a branch that is not taken is never evaluated, so a
masked ``exp(1000)`` never meets its ``0``.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp
from sympy.logic.boolalg import Boolean, BooleanFalse, BooleanTrue

Range = tuple[sp.Expr, sp.Expr]  # inclusive (low, high)

_RELATIONS = (sp.StrictLessThan, sp.LessThan, sp.StrictGreaterThan, sp.GreaterThan)


def indicator(cond: Boolean | bool) -> sp.Expr:
    """``[cond]``: 1 where ``cond`` holds, else 0."""
    cond = sp.sympify(cond)
    if cond is sp.true or isinstance(cond, BooleanTrue):
        return sp.S.One
    if cond is sp.false or isinstance(cond, BooleanFalse):
        return sp.S.Zero
    return sp.Piecewise((sp.S.One, cond), (sp.S.Zero, True))


def indicator_condition(factor: sp.Basic) -> Boolean | None:
    """The condition of an indicator factor (also of a power of one), else None."""
    if isinstance(factor, sp.Pow) and factor.exp.is_Integer and factor.exp > 0:
        factor = factor.base
    if (
        isinstance(factor, sp.Piecewise)
        and len(factor.args) == 2
        and factor.args[0].expr == 1
        and factor.args[1].expr == 0
        and factor.args[1].cond == sp.true
    ):
        return factor.args[0].cond
    return None


def conjuncts(cond: Boolean) -> list[Boolean]:
    """``a & b & c`` → ``[a, b, c]``."""
    return list(cond.args) if isinstance(cond, sp.And) else [cond]


def split_indicators(term: sp.Expr) -> tuple[list[Boolean], sp.Expr]:
    """A product's indicator conditions (as conjuncts) and the product of its other factors."""
    conds: list[Boolean] = []
    rest = []
    for f in sp.Mul.make_args(term):
        c = indicator_condition(f)
        if c is None:
            rest.append(f)
        else:
            conds += [d for d in conjuncts(c) if d not in conds]
    return conds, sp.Mul(*rest)


def reads_float(expr: sp.Basic) -> bool:
    """Whether ``expr`` depends on a value that is not an index: a float tensor's element or
    a real symbol."""
    if any(not a.base.is_integer for a in expr.atoms(sp.Indexed)):
        return True
    indexed = {s for a in expr.atoms(sp.Indexed) for s in a.free_symbols}
    return any(not s.is_integer for s in expr.free_symbols - indexed)


def is_index_condition(cond: sp.Basic) -> bool:
    """A condition on indices alone (``t <= s``, ``Ne(j, labels[b])``), not on tensor values."""
    return isinstance(cond, Boolean) and not reads_float(cond)


def piecewise_branches(pw: sp.Piecewise) -> list[tuple[sp.Expr, list[Boolean]]]:
    """The branches of ``pw`` with mutually exclusive conditions: branch ``n`` holds where its
    condition does and no earlier one does."""
    branches = []
    earlier: list[Boolean] = []
    for e, c in pw.args:
        conds = [] if c == sp.true else conjuncts(c)
        mine = [*conds, *[sp.Not(p) for p in earlier]]
        if not any(m == sp.false for m in mine):
            branches.append((e, [m for m in mine if m != sp.true]))
        if c == sp.true:
            break
        earlier.append(c)
    return branches


def as_indicator_terms(pw: sp.Piecewise) -> sp.Expr:
    """``Piecewise((e1, c1), (e2, True))`` → ``e1·[c1] + e2·[¬c1]``."""
    return sp.Add(
        *[e * sp.Mul(*[indicator(c) for c in conds]) for e, conds in piecewise_branches(pw)]
    )


def refold_indicators(expr: sp.Expr) -> sp.Expr:
    """Every product with indicator factors as ``Piecewise((product, c), (0, True))``, so
    the product is evaluated only where the condition holds (see the module docstring)."""

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        if isinstance(node, sp.Mul):
            conds, rest = split_indicators(node)
            if conds:
                return sp.Piecewise((rest, sp.And(*conds)), (sp.S.Zero, True))
        return node

    return visit(expr)


def heaviside_of_indices(expr: sp.Expr) -> sp.Expr:
    """``Heaviside(a, h0)`` of an index expression ``a`` (a mask such as ``Heaviside(s - t, 1)``)
    as the conditions it stands for."""

    def rewrite(node: sp.Heaviside) -> sp.Expr:
        a = node.args[0]
        h0 = node.args[1] if len(node.args) > 1 else sp.S.Half
        if reads_float(a):
            return node
        if h0 == 1:
            return indicator(a >= 0)
        if h0 == 0:
            return indicator(a > 0)
        return sp.Piecewise((sp.S.One, a > 0), (h0, sp.Eq(a, 0)), (sp.S.Zero, True))

    return expr.replace(lambda e: isinstance(e, sp.Heaviside), rewrite)  # type: ignore[arg-type]


# -- intervals of index expressions --------------------------------------------------------


def linear_coefficient(expr: sp.Expr, var: sp.Symbol) -> tuple[sp.Expr, sp.Expr] | None:
    """``(a, r)`` with ``expr = a·var + r``, ``a`` a nonzero number and ``r`` free of ``var``;
    None when ``expr`` is not of that form."""
    expanded = sp.expand(expr)
    a = expanded.coeff(var, 1)
    r = sp.expand(expanded - a * var)
    if a == 0 or not a.is_Number or var in r.free_symbols:
        return None
    return a, r


def interval(expr: sp.Expr, known: Mapping[sp.Symbol, Range], depth: int = 0) -> Range | None:
    """Bounds ``(low, high)`` of an index expression linear in the indices of ``known``.

    Dims and other symbols stay symbolic; an index whose bound is itself an index
    (``t`` in ``0..s``) is bounded through that index's range, a few levels deep.
    """
    expr = sp.expand(expr)
    if isinstance(expr, (sp.Max, sp.Min)):
        parts = [interval(a, known, depth) for a in expr.args]
        if any(p is None for p in parts):
            return None
        lows, highs = [p[0] for p in parts if p], [p[1] for p in parts if p]
        return (sp.Max(*lows), sp.Max(*highs)) if isinstance(expr, sp.Max) else (
            sp.Min(*lows),
            sp.Min(*highs),
        )
    low = high = sp.S.Zero
    for term in sp.Add.make_args(expr):
        syms = [s for s in term.free_symbols if s in known]
        if not syms:
            low, high = low + term, high + term
            continue
        if len(syms) != 1:
            return None
        (s,) = syms
        found = linear_coefficient(term, s)
        if found is None or found[1] != 0:
            return None
        a = found[0]
        lo, hi = known[s]
        if depth < 4:
            lo_iv, hi_iv = interval(lo, known, depth + 1), interval(hi, known, depth + 1)
            lo = lo_iv[0] if lo_iv is not None else lo
            hi = hi_iv[1] if hi_iv is not None else hi
        if a > 0:
            low, high = low + a * lo, high + a * hi
        else:
            low, high = low + a * hi, high + a * lo
    return low, high


def provably_le(a: sp.Expr, b: sp.Expr, known: Mapping[sp.Symbol, Range]) -> bool:
    """Whether ``a ≤ b`` for every value of the indices in ``known`` (dims are positive)."""
    diff = sp.expand(b - a)
    if diff.is_nonnegative:
        return True
    iv = interval(diff, known)
    return iv is not None and bool(sp.expand(iv[0]).is_nonnegative)


def lower_max(a: sp.Expr, b: sp.Expr, known: Mapping[sp.Symbol, Range]) -> sp.Expr:
    """``max(a, b)``, one of them when provably the larger."""
    if provably_le(a, b, known):
        return b
    if provably_le(b, a, known):
        return a
    return sp.Max(a, b)


def upper_min(a: sp.Expr, b: sp.Expr, known: Mapping[sp.Symbol, Range]) -> sp.Expr:
    """``min(a, b)``, one of them when provably the smaller."""
    if provably_le(a, b, known):
        return a
    if provably_le(b, a, known):
        return b
    return sp.Min(a, b)


def range_conditions(value: sp.Expr, rng: Range, known: Mapping[sp.Symbol, Range]) -> list:
    """The conditions ``lo ≤ value ≤ hi`` that do not provably hold."""
    lo, hi = rng
    conds = []
    if not provably_le(lo, value, known):
        conds.append(sp.Le(lo, value))
    if not provably_le(value, hi, known):
        conds.append(sp.Le(value, hi))
    return conds


def bound_from_condition(cond: Boolean, var: sp.Symbol) -> tuple[str, sp.Expr] | None:
    """``("lo", e)`` for a condition meaning ``var ≥ e``, ``("hi", e)`` for ``var ≤ e``, or
    None when ``cond`` is not a linear inequality in ``var``."""
    if not isinstance(cond, _RELATIONS) or not is_index_condition(cond):
        return None
    # as ``expr ≥ 0`` (or > 0)
    if isinstance(cond, (sp.StrictGreaterThan, sp.GreaterThan)):
        expr, strict = cond.lhs - cond.rhs, isinstance(cond, sp.StrictGreaterThan)
    else:
        expr, strict = cond.rhs - cond.lhs, isinstance(cond, sp.StrictLessThan)
    found = linear_coefficient(expr, var)
    if found is None or not found[0].is_Integer or reads_float(found[1]):
        return None
    a, r = found
    # a·var + r ≥ 0 (> 0): var ≥ -r/a (>) for a > 0, var ≤ r/-a (<) for a < 0.  SymPy writes
    # ``2·i ≤ D - 1`` as ``i ≤ D/2 - 1/2``, so the bound need not be an integer: rounded to
    # the integers var takes (floor and ceiling vanish where the bound is an integer).
    if a > 0:
        edge = -r / a
        return "lo", sp.floor(edge) + 1 if strict else sp.ceiling(edge)
    edge = r / -a
    return "hi", sp.ceiling(edge) - 1 if strict else sp.floor(edge)


def settle(conds: list[Boolean], known: Mapping[sp.Symbol, Range]) -> list[Boolean] | None:
    """The conditions left once those that provably hold are dropped; None when one
    provably fails."""
    left = []
    for c in conds:
        verdict = _decide(c, known)
        if verdict is False:
            return None
        if verdict is None:
            left.append(c)
    return left


def _decide(c: Boolean, known: Mapping[sp.Symbol, Range]) -> bool | None:
    """True or False when an inequality of indices is decided by their ranges, else None."""
    if not isinstance(c, _RELATIONS) or not is_index_condition(c):
        return None
    if isinstance(c, (sp.StrictGreaterThan, sp.GreaterThan)):
        small, big, strict = c.rhs, c.lhs, isinstance(c, sp.StrictGreaterThan)
    else:
        small, big, strict = c.lhs, c.rhs, isinstance(c, sp.StrictLessThan)
    if provably_le(small + (1 if strict else 0), big, known):
        return True
    if provably_le(big + (0 if strict else 1), small, known):
        return False
    return None


def tighten(
    var: sp.Symbol, rng: Range, conds: list[Boolean], known: Mapping[sp.Symbol, Range]
) -> tuple[Range, list[Boolean]]:
    """Move the conditions on ``var`` that are linear inequalities into its range; return the
    new range and the conditions left."""
    lo, hi = rng
    left = []
    for c in conds:
        found = bound_from_condition(c, var) if var in c.free_symbols else None
        if found is None:
            left.append(c)
        elif found[0] == "lo":
            lo = lower_max(lo, found[1], known)
        else:
            hi = upper_min(hi, found[1], known)
    return (lo, hi), left


def count(rng: Range, known: Mapping[sp.Symbol, Range]) -> sp.Expr:
    """How many integers the range holds: ``hi - lo + 1``, or ``max(0, ...)`` when the range
    may be empty."""
    lo, hi = rng
    n = hi - lo + 1
    return n if provably_le(lo, hi + 1, known) else sp.Max(0, n)
