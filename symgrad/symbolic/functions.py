"""Stable primitive functions of the symbolic stage.

Three transcendental building blocks overflow when evaluated as written: the logistic sigmoid
``1/(1+exp(-a))``, softplus ``log(1+exp(a))`` and ``log(cosh(a))``.  symgrad gives them names
(SymPy function classes) so that the stabilization pass can map overflow-prone forms onto them,
the chain rule can pass through them, and the code generator can evaluate them by sign, sharing one
``exp(-|a|)`` between every use of the same argument.

Their derivatives are *derived* from their defining formulas, never written out: ``fdiff``
differentiates the definition with :func:`sympy.diff` and re-expresses the result in terms of
the primitives themselves (see :func:`_derive_primitive`).
"""

from __future__ import annotations

import sympy as sp

_A = sp.Dummy("a", real=True)  # the argument of a primitive's defining formula
_S = sp.Dummy("s", positive=True)  # stands for the primitive's own value while solving


class StablePrimitive(sp.Function):
    """A function with a defining formula whose naive evaluation can overflow."""

    nargs = 1

    @classmethod
    def definition(cls, a: sp.Expr) -> sp.Expr:
        """The mathematical definition, the formula the derivative is derived from."""
        raise NotImplementedError

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        if argindex != 1:
            raise sp.ArgumentIndexError(self, argindex)
        return _derived_derivative(type(self)).subs(_A, self.args[0])

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _eval_rewrite_as_exp(self, a: sp.Expr, **kwargs: object) -> sp.Expr:
        return self.definition(a)


class sigmoid(StablePrimitive):  # noqa: N801 - named like the SymPy functions it sits beside
    """The logistic function ``σ(a) = 1 / (1 + exp(-a))``, in (0, 1)."""

    @classmethod
    def definition(cls, a: sp.Expr) -> sp.Expr:
        return 1 / (1 + sp.exp(-a))

    @classmethod
    def eval(cls, a: sp.Expr) -> sp.Expr | None:
        if a.is_zero:
            return sp.Rational(1, 2)
        return None

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class softplus(StablePrimitive):  # noqa: N801
    """``softplus(a) = log(1 + exp(a))``, evaluated as ``max(a, 0) + log1p(exp(-|a|))``."""

    @classmethod
    def definition(cls, a: sp.Expr) -> sp.Expr:
        return sp.log(1 + sp.exp(a))

    @classmethod
    def eval(cls, a: sp.Expr) -> sp.Expr | None:
        if a.is_zero:
            return sp.log(2)
        return None

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class logcosh(StablePrimitive):  # noqa: N801
    """``logcosh(a) = log(cosh(a))``, evaluated as ``|a| − log 2 + log1p(exp(−2|a|))`` (``cosh``
    overflows past ``|a| ≈ 710``); its derivative, derived, is ``tanh(a)``."""

    @classmethod
    def definition(cls, a: sp.Expr) -> sp.Expr:
        return sp.log(sp.cosh(a))

    @classmethod
    def eval(cls, a: sp.Expr) -> sp.Expr | None:
        if a.is_zero:
            return sp.S.Zero
        return None

    def _eval_is_nonnegative(self) -> bool | None:
        return True if self.args[0].is_real else None


PRIMITIVES: tuple[type[StablePrimitive], ...] = (sigmoid, softplus, logcosh)


class xlogy(sp.Function):  # noqa: N801
    """``x·log(y)``, and 0 where ``x = 0`` (torch's ``xlogy``): the ``y·log(y)`` of an entropy
    or a KL divergence is 0 at ``y = 0``, where ``0·log(0)`` would be NaN.

    Its partial derivatives are derived from the definition ``x·log(y)``.
    """

    nargs = 2

    @classmethod
    def definition(cls, x: sp.Expr, y: sp.Expr) -> sp.Expr:
        return x * sp.log(y)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        if argindex not in (1, 2):
            raise sp.ArgumentIndexError(self, argindex)
        x, y = sp.Dummy("x", real=True), sp.Dummy("y", positive=True)
        partial = sp.diff(self.definition(x, y), (x, y)[argindex - 1])
        return partial.xreplace({x: self.args[0], y: self.args[1]})

    def _eval_is_real(self) -> bool | None:
        x, y = self.args
        return True if x.is_real and y.is_nonnegative else None


_DERIVATIVES: dict[str, sp.Expr] = {}


def _derived_derivative(fn: type[StablePrimitive]) -> sp.Expr:
    """d fn(a)/da, derived once per primitive and remembered (see :func:`_derive_primitive`)."""
    if fn.__name__ not in _DERIVATIVES:
        _DERIVATIVES[fn.__name__] = _derive_primitive(fn)
    return _DERIVATIVES[fn.__name__]


def _derive_primitive(fn: type[StablePrimitive]) -> sp.Expr:
    """d fn(a)/da, derived from ``fn.definition`` and written with stable primitives.

    The raw derivative of the definition (e.g. ``exp(-a)/(1+exp(-a))**2`` for the sigmoid) is
    first passed through the stabilization rules, which recognise other primitives in it
    (softplus' = ``exp(a)/(1+exp(a))`` = sigmoid).  If an exponential is still left, it is
    eliminated by solving ``s = definition(a)`` for it and substituting, which expresses the
    derivative through the function's own value (sigmoid' = ``s (1 - s)``).
    """
    from .stabilize import stabilize  # the rules know the primitives; import late

    raw = sp.diff(fn.definition(_A), _A)
    rewritten = stabilize(raw).expr
    if not rewritten.has(sp.exp):
        return rewritten
    u = sp.Dummy("u", positive=True)
    for power in (sp.exp(-_A), sp.exp(_A)):
        in_u = sp.expand(fn.definition(_A)).subs(power, u)
        if in_u.has(_A):
            continue
        solutions = sp.solve(sp.Eq(in_u, _S), u)
        if len(solutions) != 1:
            continue
        in_self = sp.simplify(raw.subs(power, u).subs(u, solutions[0]))
        if not in_self.has(_A):
            return sp.factor(in_self).subs(_S, fn(_A))
    raise AssertionError(f"cannot express the derivative of {fn.__name__} stably: {raw}")
