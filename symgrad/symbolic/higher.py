"""Higher derivatives as formulas: the derived VJP contracted with a cotangent, and the JVP.

An op's VJP is linear in its cotangent ``grad_y``.  Contracted with cotangents ``v_k`` of its
own outputs (``v_k`` has the shape of input ``x_k``) it is one formula,

    H(x, grad_y, v) = Σ_k ⟨v_k, grad_x_k(x, grad_y)⟩,

per element for an elementwise op (``grad_y · Σ_k v_k ∂f/∂x_k``) and a scalar for a tensor op.
The gradient of ``H`` with respect to ``(x, grad_y)`` is the VJP of the VJP with cotangents
``v`` — second-order reverse mode — and with ``grad_y = 1`` its gradient with respect to ``x``
is the Hessian of ``Σ y`` times ``v``.  ``H`` is built from the VJP symgrad *derived* (an
elementwise op's compiled partials; a tensor op's VJP after delta contraction and before the
log-sum-exp max shift, whose ``ReduceMax`` is not differentiable) and then goes through the
pipeline like any formula: differentiating it is the ordinary derivation, nothing new.

The JVP ``Σ_k ∂y/∂x_k · t_k`` (forward mode) is derived directly: every input ``x`` becomes
``x + ε·t`` and the formula is differentiated with respect to ``ε`` at 0, so a tensor op's JVP
has no Kronecker delta to contract.

Kinks: ``sign`` and ``Heaviside`` (what ``Abs`` and ``Max`` differentiate to) are written as
``Piecewise`` before a formula is differentiated again, so that their derivative is 0 away from
the kink, as in torch, rather than a ``DiracDelta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..errors import NonDifferentiableError
from .derive import Derivation, prepare
from .index import IndexSum, TensorDerivation, TensorSpec
from .spec import OpSpec, fresh_name
from .stabilize import stabilize


@dataclass(frozen=True)
class ElementwiseFormula:
    """A scalar formula and its input symbols, in call order: the makings of an elementwise op."""

    expr: sp.Expr
    inputs: tuple[sp.Symbol, ...]


@dataclass(frozen=True)
class TensorFormula:
    """An index formula, its output indices and input tensors: the makings of a tensor op."""

    expr: sp.Expr
    out: tuple[sp.Symbol, ...]
    inputs: tuple[sp.IndexedBase, ...]


def without_kinks(expr: sp.Expr) -> sp.Expr:
    """``sign(u)`` and ``Heaviside(u)`` as ``Piecewise`` (same values, derivative 0 off the kink).

    ``sympy.diff(sign(u))`` is ``2·DiracDelta(u)``, which has no numeric value; torch takes the
    derivative of ``sign`` (and of a step) to be 0, and so does the ``Piecewise`` form.
    """

    def sign(u: sp.Expr) -> sp.Expr:
        return sp.Piecewise((1, u > 0), (-1, u < 0), (0, True))

    def step(u: sp.Expr, *at_zero: sp.Expr) -> sp.Expr:
        middle = at_zero[0] if at_zero else sp.S.Half  # SymPy's Heaviside(0) is 1/2
        return sp.Piecewise((1, u > 0), (0, u < 0), (middle, True))

    return expr.replace(sp.sign, sign).replace(sp.Heaviside, step)  # type: ignore[arg-type]


def _check_numeric(op: str, what: str, expr: sp.Expr) -> None:
    bad = sorted({type(a).__name__ for a in expr.atoms(sp.DiracDelta, sp.Derivative, sp.Subs)})
    if bad:
        raise NonDifferentiableError(
            f"op {op!r}: {what} contains {', '.join(bad)}, which has no numeric value "
            f"({sp.sstr(expr)[:200]}); write kinks with Piecewise((a, cond), (b, True))"
        )


# -- the VJP contracted with a cotangent ---------------------------------------------------


def elementwise_vjp_dot(derivation: Derivation) -> ElementwiseFormula:
    """``H(x..., grad_y, v_x...) = grad_y · Σ_k v_k · ∂f/∂x_k`` from the derived partials.

    Inputs, in call order: the op's inputs, ``grad_y``, then one ``v_<input>`` per input that
    has a gradient (names made unique against the op's own).
    """
    names = [s.name for s in derivation.inputs]
    grad_y = sp.Symbol(fresh_name("grad_y", names), real=True)
    taken = [*names, grad_y.name]
    cotangents = []  # one per input that has a gradient (the op's wrt)
    for name in (p.wrt.name for p in derivation.partials):
        cotangents.append(sp.Symbol(fresh_name(f"v_{name}", taken), real=True))
        taken.append(cotangents[-1].name)
    body = sp.Add(
        *[v * without_kinks(p.final) for v, p in zip(cotangents, derivation.partials, strict=True)]
    )
    return ElementwiseFormula(grad_y * body, (*derivation.inputs, grad_y, *cotangents))


def tensor_vjp_dot(derivation: TensorDerivation) -> TensorFormula:
    """``H(X..., grad_y, V...) = Σ_k Σ_idx V_k[idx] · grad_X_k[idx]``, a scalar (``out = ()``).

    ``grad_X_k`` is the *contracted* VJP (before the max shift).  Inputs, in call order: the
    op's tensors, ``grad_y`` (the output's shape; shape ``(1,)`` when the output is a scalar),
    then one ``v_<label>`` per input, of that input's shape.
    """
    spec = derivation.spec
    labels = [str(b.label) for b in spec.inputs]
    grad_out = derivation.grad_output
    # not the name of an input's gradient array (``grad_<input>``) either
    taken = [*labels, *(f"grad_{label}" for label in labels)]
    grad_y = sp.IndexedBase(fresh_name("grad_y", taken), shape=spec.out_shape or (1,))
    taken.append(str(grad_y.label))
    if isinstance(grad_out, sp.IndexedBase):
        to_grad_y: dict[sp.Basic, sp.Basic] = {grad_out: grad_y}
    else:  # a scalar output's cotangent is a symbol; it becomes grad_y[0]
        to_grad_y = {grad_out: grad_y[0]}
    terms: list[sp.Expr] = []
    inputs: list[sp.IndexedBase] = [*spec.inputs, grad_y]
    for p in derivation.partials:
        label = str(p.wrt.label)
        v = sp.IndexedBase(fresh_name(f"v_{label}", taken), shape=p.wrt.shape)
        taken.append(str(v.label))
        inputs.append(v)
        # Own names for the summed indices: the derivation of H names its VJP indices
        # ``k<n>_<label>`` too, and a bound index must not share a name with a free one.
        idx = tuple(sp.Symbol(f"u{n}_{label}", integer=True) for n in range(len(p.indices)))
        body = without_kinks(p.contracted).xreplace(
            {**to_grad_y, **dict(zip(p.indices, idx, strict=True))}
        )
        if idx:
            limits = [(i, 0, d - 1) for i, d in zip(idx, p.wrt.shape, strict=True)]
            terms.append(IndexSum(v[idx] * body, *limits))  # no piecewise_fold: see IndexSum
        else:
            terms.append(v[0] * body)
    return TensorFormula(sp.Add(*terms), (), tuple(inputs))


# -- the JVP -------------------------------------------------------------------------------


def elementwise_jvp(spec: OpSpec) -> ElementwiseFormula:
    """``J(x..., t_x...) = Σ_k t_k · ∂f/∂x_k``, derived as ``d/dε f(x + ε·t)`` at ``ε = 0``."""
    names = [s.name for s in spec.inputs]
    taken = list(names)
    tangents = []
    for name in names:
        tangents.append(sp.Symbol(fresh_name(f"t_{name}", taken), real=True))
        taken.append(tangents[-1].name)
    eps = sp.Dummy("eps", real=True)
    forward = without_kinks(stabilize(prepare(spec.expr)).expr)
    moved = forward.xreplace({x: x + eps * t for x, t in zip(spec.inputs, tangents, strict=True)})
    jvp = sp.diff(moved, eps).xreplace({eps: sp.S.Zero})
    _check_numeric(spec.name, "the JVP", jvp)
    return ElementwiseFormula(jvp, (*spec.inputs, *tangents))


def tensor_jvp(spec: TensorSpec) -> TensorFormula:
    """``J[out] = Σ_k Σ_idx ∂Y[out]/∂X_k[idx] · T_k[idx]``, as ``d/dε Y(X + ε·T)`` at 0.

    Inputs, in call order: the op's tensors, then one ``t_<label>`` per input, of its shape.
    """
    labels = [str(b.label) for b in spec.inputs]
    taken = list(labels)
    tangents: dict[sp.IndexedBase, sp.IndexedBase] = {}
    for base, label in zip(spec.inputs, labels, strict=True):
        tangents[base] = sp.IndexedBase(fresh_name(f"t_{label}", taken), shape=base.shape)
        taken.append(str(tangents[base].label))
    eps = sp.Dummy("eps", real=True)

    def move(access: sp.Indexed) -> sp.Expr:
        return access + eps * tangents[access.base][access.indices]

    forward = without_kinks(prepare(spec.expr))
    moved = forward.replace(
        lambda e: isinstance(e, sp.Indexed) and e.base in tangents,
        move,  # type: ignore[arg-type]
    )
    jvp = sp.diff(moved, eps).xreplace({eps: sp.S.Zero})
    _check_numeric(spec.name, "the JVP", jvp)
    return TensorFormula(jvp, spec.out, (*spec.inputs, *tangents.values()))
