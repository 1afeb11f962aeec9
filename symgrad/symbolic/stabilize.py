"""The stabilization pass: rewrite overflow-prone forms onto stable primitives.

Applied to forward formulas *and* to derived expressions, bottom-up, to a fixed point.  Each
rule is a function ``(node) -> node | None`` in :data:`RULES`, with a one-line reason; every
application is recorded as a :class:`Rewrite` so derivation printouts can show it.

Rules (``σ`` is :class:`~symgrad.symbolic.functions.sigmoid`):

* ``(1 + exp(a))**-n``, paired with ``exp(a)`` factors → ``σ(a)`` / ``σ(-a)`` powers
  (``exp(a)/(1+exp(a))`` and ``1/(1+exp(-a))`` overflow for large ``|a|``);
* ``log(1 + exp(a))`` → ``softplus(a)``;
* ``log(σ(a))`` → ``-softplus(-a)`` (``log`` of an underflowed sigmoid is ``-inf``);
* ``1 - σ(a)`` → ``σ(-a)`` (cancellation loses all digits when σ(a) ≈ 1);
* ``c·softplus(a) - c·a`` → ``c·softplus(-a)`` (the same cancellation, one level up);
* ``exp(a) - 1`` → ``expm1(a)`` and ``log(1 + u)`` → ``log1p(u)`` (accuracy near 0);
* ``u·log(u)`` → ``xlogy(u, u)``, 0 at ``u = 0`` (an entropy's or KL divergence's term);
* ``(exp(b) − 1)/(exp(b) + 1)`` → ``tanh(b/2)`` and ``sinh(a)/cosh(a)`` → ``tanh(a)`` (inf/inf
  for large ``|a|``);
* ``log(cosh(a))`` → ``logcosh(a)``.

Not rewritten: ``2σ(a) − 1`` (as ``tanh(a/2)`` its value keeps its digits near 0, but its
derivative ``(1 − tanh²)/2`` loses them for large ``a``, where ``2σ(a)σ(−a)`` keeps them) and
``log(exp(a) + exp(b))`` (``b + softplus(a − b)`` cancels when ``b`` is very negative, and is
NaN at ``b = −inf``: a log-sum-exp needs a max and infinities handled, as torch's
``logaddexp``).

:func:`canonicalize` goes the other way (``σ(-a)`` → ``1 - σ(a)``, ``softplus(-a)`` →
``softplus(a) - a``) so that simplification can cancel terms; the derivation stage
canonicalizes, simplifies, then stabilizes again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .bounds import may_expand
from .functions import logcosh, sigmoid, softplus, xlogy


@dataclass(frozen=True)
class Rewrite:
    """One application of a stabilization rule."""

    rule: str
    why: str
    before: sp.Expr
    after: sp.Expr


@dataclass(frozen=True)
class Stabilized:
    """The result of :func:`stabilize`: the rewritten expression and what was applied."""

    expr: sp.Expr
    rewrites: tuple[Rewrite, ...]


def _one_plus_exp_arg(base: sp.Expr) -> sp.Expr | None:
    """``a`` if ``base`` is ``1 + exp(a)``, else None."""
    if isinstance(base, sp.Add) and len(base.args) == 2 and sp.S.One in base.args:
        other = base.args[0] if base.args[1] == sp.S.One else base.args[1]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def _sigmoid_from_ratio(node: sp.Expr) -> sp.Expr | None:
    """``exp(a)**k * (1 + exp(a))**-n`` → ``σ(a)**k * σ(-a)**(n-k)``."""
    factors = list(sp.Mul.make_args(node)) if isinstance(node, sp.Mul) else [node]
    for idx, factor in enumerate(factors):
        if not (isinstance(factor, sp.Pow) and factor.exp.is_Integer and factor.exp < 0):
            continue
        a = _one_plus_exp_arg(factor.base)
        if a is None:
            continue
        n = int(-factor.exp)
        rest = factors[:idx] + factors[idx + 1 :]
        paired = 0
        for j, other in enumerate(rest):
            if isinstance(other, sp.exp) and paired < n:
                k = _ratio(other.args[0], a)
                if k is not None and k.is_Integer and 0 < k <= n:
                    paired = int(k)
                    rest = rest[:j] + rest[j + 1 :]
                    break
        return sp.Mul(*rest) * sigmoid(a) ** paired * sigmoid(-a) ** (n - paired)
    return None


def _ratio(u: sp.Expr, a: sp.Expr) -> sp.Expr | None:
    """``u / a`` in lowest terms, or None when cancelling would expand too far."""
    ratio = u / a
    if ratio.is_Number:
        return ratio
    return sp.cancel(ratio) if may_expand(ratio) else None


def _softplus_from_log(node: sp.Expr) -> sp.Expr | None:
    if isinstance(node, sp.log):
        a = _one_plus_exp_arg(node.args[0])
        if a is not None:
            return softplus(a)
    return None


def _log_sigmoid(node: sp.Expr) -> sp.Expr | None:
    if isinstance(node, sp.log) and isinstance(node.args[0], sigmoid):
        return -softplus(-node.args[0].args[0])
    return None


def _one_minus_sigmoid(node: sp.Expr) -> sp.Expr | None:
    """``±(1 - σ(a))`` inside a sum → ``±σ(-a)``."""
    if not isinstance(node, sp.Add):
        return None
    for one in (sp.S.One, sp.S.NegativeOne):
        if one not in node.args:
            continue
        for term in node.args:
            coeff, rest = term.as_coeff_Mul()
            if coeff == -one and isinstance(rest, sigmoid):
                others = [t for t in node.args if t is not term and t != one]
                return sp.Add(one * sigmoid(-rest.args[0]), *others)
    return None


def _softplus_minus_argument(node: sp.Expr) -> sp.Expr | None:
    if not isinstance(node, sp.Add):
        return None
    for term in node.args:
        coeff, rest = term.as_coeff_Mul()
        if not isinstance(rest, softplus):
            continue
        a = rest.args[0]
        others = sp.Add(*[t for t in node.args if t is not term])
        if not may_expand(others + coeff * a):
            continue  # expanding would not end in reasonable time; the form is kept
        merged = sp.expand(others + coeff * a)
        if len(sp.Add.make_args(merged)) < len(sp.Add.make_args(others)) or (
            merged == 0 and others != 0
        ):
            return coeff * softplus(-a) + merged
    return None


def _expm1(node: sp.Expr) -> sp.Expr | None:
    """``c·exp(a) − c`` → ``c·expm1(a)`` (``c`` a number: bound constants are floats)."""
    if not isinstance(node, sp.Add):
        return None
    for term in node.args:
        coeff, rest = term.as_coeff_Mul()
        if not isinstance(rest, sp.exp):
            continue
        for other in node.args:
            if other.is_Number and other != 0 and float(other) == -float(coeff):
                others = [t for t in node.args if t is not term and t is not other]
                return sp.Add(coeff * expm1(rest.args[0]), *others)
    return None


def _log1p(node: sp.Expr) -> sp.Expr | None:
    if isinstance(node, sp.log) and isinstance(node.args[0], sp.Add):
        inner = node.args[0]
        if sp.S.One in inner.args and _one_plus_exp_arg(inner) is None:
            return log1p(inner - 1)
    return None


def _xlogy(node: sp.Expr) -> sp.Expr | None:
    """``u·log(u)·c`` → ``xlogy(u, u)·c``; ``u·(log(u) + r)`` → ``xlogy(u, u) + u·r``."""
    if not isinstance(node, sp.Mul):
        return None
    factors = list(node.args)
    for n, u in enumerate(factors):
        others = factors[:n] + factors[n + 1 :]
        for m, f in enumerate(others):
            rest = sp.Mul(*others[:m], *others[m + 1 :])
            if isinstance(f, sp.log) and f.args[0] == u:
                return rest * xlogy(u, u)
            if isinstance(f, sp.Add) and sp.log(u) in f.args:
                r = sp.Add(*[t for t in f.args if t != sp.log(u)])
                return rest * (xlogy(u, u) + u * r)
    return None


def _tanh_from_ratio(node: sp.Expr) -> sp.Expr | None:
    """``expm1(b)·σ(-b)`` (``(exp(b) − 1)/(exp(b) + 1)``, once the sigmoid and expm1 rules
    have run) → ``tanh(b/2)``; ``sinh(a)·cosh(a)**-n`` → ``tanh(a)·cosh(a)**(1-n)``."""
    if not isinstance(node, sp.Mul):
        return None
    factors = list(node.args)
    for n, f in enumerate(factors):
        rest = factors[:n] + factors[n + 1 :]
        if isinstance(f, expm1):
            b = f.args[0]
            for m, g in enumerate(rest):
                base, power = g.as_base_exp()
                if isinstance(base, sigmoid) and base.args[0] == -b and power.is_positive:
                    others = [*rest[:m], *rest[m + 1 :]]
                    return sp.Mul(*others) * sp.tanh(b / 2) * base ** (power - 1)
        if isinstance(f, sp.sinh):
            a = f.args[0]
            for m, g in enumerate(rest):
                base, power = g.as_base_exp()
                if base == sp.cosh(a) and power.is_Integer and power < 0:
                    others = [*rest[:m], *rest[m + 1 :]]
                    return sp.Mul(*others) * sp.tanh(a) * base ** (power + 1)
    return None


def _log_cosh(node: sp.Expr) -> sp.Expr | None:
    if isinstance(node, sp.log) and isinstance(node.args[0], sp.cosh):
        return logcosh(node.args[0].args[0])
    return None


Rule = Callable[[sp.Expr], "sp.Expr | None"]

RULES: tuple[tuple[str, str, Rule], ...] = (
    (
        "sigmoid",
        "exp(a)/(1+exp(a)) overflows for large |a|: evaluate σ by sign",
        _sigmoid_from_ratio,
    ),
    (
        "softplus",
        "log(1+exp(a)) overflows for large a: max(a,0) + log1p(exp(-|a|))",
        _softplus_from_log,
    ),
    ("log_sigmoid", "log(σ(a)) is -inf once σ(a) underflows: -softplus(-a)", _log_sigmoid),
    ("one_minus_sigmoid", "1 - σ(a) cancels all digits when σ(a) ≈ 1: σ(-a)", _one_minus_sigmoid),
    (
        "softplus_shift",
        "softplus(a) - a cancels for large a: softplus(-a)",
        _softplus_minus_argument,
    ),
    ("expm1", "exp(a) - 1 loses digits near a = 0: expm1(a)", _expm1),
    ("log1p", "log(1 + u) loses digits near u = 0: log1p(u)", _log1p),
    ("xlogy", "u·log(u) is NaN at u = 0, where its limit is 0: xlogy(u, u)", _xlogy),
    (
        "tanh",
        "(exp(b) - 1)/(exp(b) + 1) and sinh(a)/cosh(a) are inf/inf for large |a|: tanh",
        _tanh_from_ratio,
    ),
    ("log_cosh", "cosh(a) overflows past |a| ≈ 710: logcosh(a)", _log_cosh),
)


def stabilize(expr: sp.Expr) -> Stabilized:
    """Rewrite ``expr`` bottom-up with :data:`RULES` until no rule applies."""
    log: list[Rewrite] = []
    memo: dict[sp.Basic, sp.Basic] = {}

    def apply_rules(node: sp.Basic, rules: tuple[tuple[str, str, Rule], ...]) -> sp.Basic:
        for _ in range(50):  # a rule's output is itself revisited; 50 is far beyond any chain
            for name, why, rule in rules:
                out = rule(node) if isinstance(node, sp.Expr) else None
                if out is not None and out != node:
                    log.append(Rewrite(name, why, node, out))
                    node = out
                    break
            else:
                return node
        return node

    def visit(node: sp.Basic) -> sp.Basic:
        if node in memo:
            return memo[node]
        # Pre-order first, so a ratio ``exp(a)/(1+exp(a))`` is seen whole before its
        # denominator alone is rewritten.
        result = apply_rules(node, RULES[:1])
        if result.args:
            new_args = tuple(visit(arg) for arg in result.args)
            if new_args != result.args:
                result = result.func(*new_args)
        result = apply_rules(result, RULES)
        if result != node and result not in memo:
            result = visit(result)
        memo[node] = result
        return result

    return Stabilized(visit(expr), tuple(log))


def canonicalize(expr: sp.Expr) -> sp.Expr:
    """Write ``σ(-a)`` as ``1 - σ(a)`` and ``softplus(-a)`` as ``softplus(a) - a``.

    A canonical sign lets simplification cancel terms (``y·softplus(-z) + (1-y)·softplus(z)``
    becomes ``softplus(z) - y·z``); :func:`stabilize` undoes it where it would lose digits.
    """

    def flip(node: sp.Expr) -> sp.Expr:
        a = node.args[0]
        if not a.could_extract_minus_sign():
            return node
        if isinstance(node, sigmoid):
            return 1 - sigmoid(-a)
        return softplus(-a) + a

    return expr.replace(
        lambda e: isinstance(e, (sigmoid, softplus)),
        flip,  # type: ignore[arg-type]
    )
