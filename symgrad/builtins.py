"""The registry of built-in ops: each is its forward formula, written once.

An entry holds the formula (a function of its parameters returning the SymPy expression and its
input symbols), the parameters' torch defaults, the torch reference the test suite checks it
against (a function of the ``torch`` module passed in, so this module imports no torch), and the
domain its inputs are drawn from in tests.  Derivation, codegen, printouts and the gradient
tests all read this one table: a new op is one new entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy as sp

from .errors import DefinitionError

x, y = sp.symbols("x y", real=True)


@dataclass(frozen=True)
class Domain:
    """Where test inputs of one argument come from: ``uniform(low, high)`` or ``normal·scale``."""

    kind: str = "normal"  # "normal" or "uniform"
    low: float = 0.0
    high: float = 1.0
    scale: float = 3.0


@dataclass(frozen=True)
class Builtin:
    """One built-in op (see the module docstring)."""

    name: str
    formula: Callable[..., sp.Expr]
    inputs: tuple[sp.Symbol, ...]
    torch_ref: Callable[..., Any]
    params: dict[str, float] = field(default_factory=dict)
    domain: tuple[Domain, ...] = (Domain(),)
    #: which inputs torch can differentiate (its BCE has no gradient for the target)
    torch_grads: tuple[bool, ...] = (True,)
    #: extreme values the first input is tested at (float64; float32 uses them clipped to ±1e2)
    edges: tuple[float, ...] = (0.0, -1e3, 1e3, -30.0, 30.0)
    doc: str = ""

    def expr(self, **params: float) -> tuple[sp.Expr, dict[sp.Symbol, float]]:
        """The formula with symbolic parameters, and the constants binding them."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise DefinitionError(
                f"built-in op {self.name!r} has no parameter(s) {unknown}; its parameters are "
                f"{sorted(self.params) or 'none'}"
            )
        values = {**self.params, **params}
        symbols = {k: sp.Symbol(k, real=True) for k in self.params}
        formula = self.formula(**symbols)
        return formula, {symbols[k]: v for k, v in values.items() if symbols[k] in formula.free_symbols}


def _sigmoid(a: sp.Expr) -> sp.Expr:
    return 1 / (1 + sp.exp(-a))


_LOSS_DOMAIN = (Domain(), Domain())
_PROB = Domain("uniform", 0.02, 0.98)

_ENTRIES = [
    Builtin("sigmoid", lambda: _sigmoid(x), (x,), lambda t, a: t.sigmoid(a),
            doc="σ(x) = 1/(1+exp(-x))"),
    Builtin("tanh", lambda: sp.tanh(x), (x,), lambda t, a: t.tanh(a)),
    Builtin("relu", lambda: sp.Max(x, 0), (x,), lambda t, a: t.relu(a)),
    Builtin("leaky_relu",
            lambda negative_slope: sp.Piecewise((x, x > 0), (negative_slope * x, True)),
            (x,), lambda t, a, negative_slope: t.nn.functional.leaky_relu(a, negative_slope),
            params={"negative_slope": 0.01}),
    Builtin("elu", lambda alpha: sp.Piecewise((x, x > 0), (alpha * (sp.exp(x) - 1), True)),
            (x,), lambda t, a, alpha: t.nn.functional.elu(a, alpha), params={"alpha": 1.0}),
    Builtin("gelu", lambda: x / 2 * (1 + sp.erf(x / sp.sqrt(2))), (x,),
            lambda t, a: t.nn.functional.gelu(a), doc="exact (erf) form"),
    Builtin("gelu_tanh",
            lambda: x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3))),
            (x,), lambda t, a: t.nn.functional.gelu(a, approximate="tanh"),
            doc="tanh approximation"),
    Builtin("silu", lambda: x * _sigmoid(x), (x,), lambda t, a: t.nn.functional.silu(a)),
    Builtin("softplus",
            lambda beta, threshold: sp.Piecewise(
                (x, beta * x > threshold), (sp.log(1 + sp.exp(beta * x)) / beta, True)),
            (x,), lambda t, a, beta, threshold: t.nn.functional.softplus(a, beta, threshold),
            params={"beta": 1.0, "threshold": 20.0}),
    Builtin("softsign", lambda: x / (1 + sp.Abs(x)), (x,),
            lambda t, a: t.nn.functional.softsign(a)),
    Builtin("hardtanh",
            lambda min_val, max_val: sp.Piecewise(
                (min_val, x <= min_val), (max_val, x >= max_val), (x, True)),
            (x,), lambda t, a, min_val, max_val: t.nn.functional.hardtanh(a, min_val, max_val),
            params={"min_val": -1.0, "max_val": 1.0}),
    Builtin("mse", lambda: (x - y) ** 2, (x, y),
            lambda t, a, b: t.nn.functional.mse_loss(a, b, reduction="none"),
            domain=_LOSS_DOMAIN, torch_grads=(True, True), doc="(x - y)², per element"),
    Builtin("l1", lambda: sp.Abs(x - y), (x, y),
            lambda t, a, b: t.nn.functional.l1_loss(a, b, reduction="none"),
            domain=_LOSS_DOMAIN, torch_grads=(True, True)),
    Builtin("huber",
            lambda delta: sp.Piecewise(
                ((x - y) ** 2 / 2, sp.Abs(x - y) < delta),
                (delta * (sp.Abs(x - y) - delta / 2), True)),
            (x, y), lambda t, a, b, delta: t.nn.functional.huber_loss(a, b, reduction="none", delta=delta),
            params={"delta": 1.0}, domain=_LOSS_DOMAIN, torch_grads=(True, True)),
    Builtin("bce",
            lambda: -(y * sp.Max(sp.log(x), -100) + (1 - y) * sp.Max(sp.log(1 - x), -100)),
            (x, y), lambda t, a, b: t.nn.functional.binary_cross_entropy(a, b, reduction="none"),
            domain=(_PROB, Domain("uniform", 0.0, 1.0)), torch_grads=(True, False),
            edges=(0.0, 1.0, 1e-30, 1 - 1e-16, 0.5),
            doc="binary cross-entropy on probabilities, logs clamped at -100 as in torch"),
    Builtin("bce_with_logits",
            lambda: -(y * sp.log(_sigmoid(x)) + (1 - y) * sp.log(1 - _sigmoid(x))),
            (x, y), lambda t, a, b: t.nn.functional.binary_cross_entropy_with_logits(a, b, reduction="none"),
            domain=(Domain(), Domain("uniform", 0.0, 1.0)), torch_grads=(True, True),
            doc="binary cross-entropy on logits, written naively; stabilized to softplus(x) - x·y"),
]

BUILTINS: dict[str, Builtin] = {entry.name: entry for entry in _ENTRIES}


def get_builtin(name: str) -> Builtin:
    """The registry entry of a built-in op; a clear error listing the names otherwise."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise DefinitionError(
            f"there is no built-in op {name!r}; built-ins are {', '.join(sorted(BUILTINS))}"
        ) from None
