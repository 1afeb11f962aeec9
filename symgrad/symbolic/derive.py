"""Derivation of an elementwise op: stabilized forward and one derived partial per input.

The pipeline for an :class:`~symgrad.symbolic.spec.OpSpec`:

1. *prepare*: ``Max``/``Min`` with a constant argument become ``Piecewise`` with the tie on the
   constant's side, so ``Max(x, 0)`` differentiates like torch's relu (0 at the kink) instead of
   to ``Heaviside(x)`` (1/2 there);
2. *stabilize* the forward (overflow-prone forms → stable primitives), canonicalize and simplify
   it (a deterministic, size-bounded ladder of rewrites), stabilize again;
3. for every input, ``sympy.diff`` — ``Piecewise`` is differentiated branch by branch, the
   primitives by their derived rules — then the same canonicalize → simplify → stabilize.

Nothing here is written per op: every op goes through the same steps.  Every intermediate
result is measured (:mod:`symgrad.symbolic.bounds`): past a size limit the definition fails with a
:class:`~symgrad.errors.ComplexityError` naming the op and the step, instead of running for
minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..errors import NonDifferentiableError
from .bounds import check_derivatives, check_size
from .simplify import bounded_simplify
from .spec import OpSpec
from .stabilize import Rewrite, canonicalize, stabilize

_NON_NUMERIC = (sp.DiracDelta, sp.Derivative, sp.Subs, sp.Integral, sp.Order)


@dataclass(frozen=True)
class Partial:
    """The derivative of the output with respect to one input, step by step."""

    wrt: sp.Symbol
    raw: sp.Expr  # sympy.diff of the stable forward
    simplified: sp.Expr  # canonicalized and simplified
    final: sp.Expr  # stabilized again: what is compiled
    rewrites: tuple[Rewrite, ...]


class Printouts:
    """``to_text``, ``to_latex`` and ``to_markdown`` of a derivation, step by step (see
    :mod:`symgrad.explain`: the printouts are a later stage, imported on use)."""

    def to_text(self) -> str:
        """Unicode text, for terminals."""
        from ..explain import to_text

        return to_text(self)  # type: ignore[arg-type]

    def to_latex(self) -> str:
        """LaTeX (amsmath)."""
        from ..explain import to_latex

        return to_latex(self)  # type: ignore[arg-type]

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown, math in ``$$``."""
        from ..explain import to_markdown

        return to_markdown(self)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Derivation(Printouts):
    """Everything symgrad derived for an elementwise op, from formula to compiled expressions.

    ``forward`` is the formula as defined (constants bound), ``stable_forward`` what the forward
    kernel evaluates, ``partials`` one :class:`Partial` per input that gets a gradient (every
    input unless the op was defined with ``wrt``), in input order.  The VJP of input ``x`` is
    ``grad_x = grad_y * partial.final`` for the partial whose ``wrt`` is ``x``.
    """

    name: str
    inputs: tuple[sp.Symbol, ...]
    constants: tuple[tuple[str, float], ...]
    forward: sp.Expr
    stable_forward: sp.Expr
    forward_rewrites: tuple[Rewrite, ...]
    partials: tuple[Partial, ...]

    @property
    def gradients(self) -> tuple[sp.Expr, ...]:
        """The compiled partial derivatives, in input order (of the ``wrt`` inputs)."""
        return tuple(p.final for p in self.partials)

    def __str__(self) -> str:
        return self.to_text()


def prepare(expr: sp.Expr) -> sp.Expr:
    """Turn ``Max``/``Min`` with a numeric argument into ``Piecewise`` (tie → the constant)."""

    def as_piecewise(node: sp.Expr) -> sp.Expr:
        numbers = [a for a in node.args if a.is_number]
        others = [a for a in node.args if not a.is_number]
        if len(numbers) != 1 or len(others) != 1:
            return node
        (c,), (a,) = numbers, others
        wins = a > c if isinstance(node, sp.Max) else a < c
        return sp.Piecewise((a, wins), (c, True))

    return expr.replace(
        lambda e: isinstance(e, (sp.Max, sp.Min)),
        as_piecewise,  # type: ignore[arg-type]
    )


def _check_numeric(op: str, what: str, expr: sp.Expr) -> None:
    bad = sorted({type(a).__name__ for a in expr.atoms(*_NON_NUMERIC)})
    if bad:
        raise NonDifferentiableError(
            f"op {op!r}: {what} contains {', '.join(bad)}, which has no numeric value "
            f"({sp.sstr(expr)[:200]}). A kink written with Heaviside or Abs inside a product "
            "differentiates to a DiracDelta: write it with Piecewise((a, cond), (b, True))"
        )


def _clean(
    expr: sp.Expr, op: str = "", what: str = "the expression"
) -> tuple[sp.Expr, sp.Expr, tuple[Rewrite, ...]]:
    """canonicalize → bounded simplify → stabilize; returns (simplified, final, rewrites)."""
    simplified = bounded_simplify(canonicalize(expr))
    result = stabilize(simplified)
    check_size(result.expr, op, f"{what}, stabilized")
    return simplified, result.expr, result.rewrites


def derive_elementwise(spec: OpSpec) -> Derivation:
    """Derive the stable forward and every partial derivative of an elementwise op."""
    op = spec.name
    check_size(spec.expr, op, "the formula")
    _check_numeric(op, "the formula", spec.expr)
    first = stabilize(prepare(spec.expr))
    check_size(first.expr, op, "the stabilized formula")
    _, stable_forward, more = _clean(first.expr, op, "the forward formula")
    check_derivatives(stable_forward, spec.wrt, op)
    partials = []
    for x in spec.wrt:
        raw = check_size(
            sp.diff(stable_forward, x), op, f"the derivative with respect to {x}"
        )
        _check_numeric(op, f"the derivative with respect to {x}", raw)
        simplified, final, rewrites = _clean(raw, op, f"the derivative with respect to {x}")
        partials.append(Partial(x, raw, simplified, final, rewrites))
    return Derivation(
        name=spec.name,
        inputs=spec.inputs,
        constants=spec.constants,
        forward=spec.expr,
        stable_forward=stable_forward,
        forward_rewrites=first.rewrites + more,
        partials=tuple(partials),
    )
