"""The registry of built-in ops: each is its forward formula, written once.

An entry holds the formula (a function of its parameters returning the SymPy expression and its
input symbols), the parameters' torch defaults and the values each may take
(:class:`Allowed`, checked in one place, :func:`check_params`, when the op is defined), the
torch reference the test suite checks it against (a function of the ``torch`` module passed
in, so this module imports no torch), and the domain its inputs are drawn from in tests.
Derivation, codegen, printouts and the gradient tests all read this one table: a new op is
one new entry.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy as sp

from .errors import DefinitionError, did_you_mean

x, y = sp.symbols("x y", real=True)


@dataclass(frozen=True)
class Domain:
    """Where test inputs of one argument come from: ``uniform(low, high)`` or ``normal·scale``."""

    kind: str = "normal"  # "normal" or "uniform"
    low: float = 0.0
    high: float = 1.0
    scale: float = 3.0


@dataclass(frozen=True)
class Allowed:
    """The values a built-in's parameter may take: a finite real number in an interval
    (``low < value``, or ``low <= value`` with ``closed_low``; likewise ``high``)."""

    low: float = -math.inf
    high: float = math.inf
    closed_low: bool = False
    closed_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.closed_low else value > self.low
        below = value <= self.high if self.closed_high else value < self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite real number"
        parts = []
        if self.low != -math.inf:
            parts.append(f"{'≥' if self.closed_low else '>'} {self.low:g}")
        if self.high != math.inf:
            parts.append(f"{'≤' if self.closed_high else '<'} {self.high:g}")
        return "a finite real number " + " and ".join(parts)


ANY = Allowed()
POSITIVE = Allowed(low=0.0)

#: A relation between parameters: a description (``"min_val < max_val"``) and its test.
Relation = tuple[str, Callable[[Mapping[str, float]], bool]]


def check_params(
    op: str,
    defaults: Mapping[str, float],
    given: Mapping[str, object],
    allowed: Mapping[str, Allowed],
    relations: tuple[Relation, ...] = (),
    otherwise: Allowed = ANY,
) -> dict[str, float]:
    """The parameters of built-in ``op``: its ``defaults`` updated with ``given``, each checked
    against ``allowed`` (``otherwise`` for a parameter not in it) and the ``relations``.

    Raises DefinitionError naming the op, the parameter, the value and what it may be.
    """
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DefinitionError(
            f"built-in op {op!r} has no parameter(s) {unknown}; its parameters are "
            f"{sorted(defaults) or 'none'}"
        )
    values: dict[str, float] = {}
    for name, default in defaults.items():
        value = given.get(name, default)
        domain = allowed.get(name, otherwise)
        number = (
            float(value)
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
            else math.nan
        )
        if not (math.isfinite(number) and number in domain):
            raise DefinitionError(
                f"built-in op {op!r}: parameter {name}={value!r} is not allowed; {name} is "
                f"{domain}"
            )
        values[name] = value  # type: ignore[assignment]  # a real number, checked above
    for text, holds in relations:
        if not holds(values):
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise DefinitionError(f"built-in op {op!r}: need {text}, got {shown}")
    return values


@dataclass(frozen=True)
class Builtin:
    """One built-in op (see the module docstring)."""

    name: str
    formula: Callable[..., sp.Expr]
    inputs: tuple[sp.Symbol, ...]
    torch_ref: Callable[..., Any]
    params: dict[str, float] = field(default_factory=dict)
    #: the values each parameter may take (default: any finite real), and relations between them
    allowed: dict[str, Allowed] = field(default_factory=dict)
    relations: tuple[Relation, ...] = ()
    domain: tuple[Domain, ...] = (Domain(),)
    #: which inputs torch can differentiate (its BCE has no gradient for the target)
    torch_grads: tuple[bool, ...] = (True,)
    #: extreme values the first input is tested at (float64; float32 uses them clipped to ±1e2)
    edges: tuple[float, ...] = (0.0, -1e3, 1e3, -30.0, 30.0)
    doc: str = ""

    def expr(self, **params: float) -> tuple[sp.Expr, dict[sp.Symbol, float]]:
        """The formula with symbolic parameters, and the constants binding them."""
        values = check_params(self.name, self.params, params, self.allowed, self.relations)
        symbols = {k: sp.Symbol(k, real=True) for k in self.params}
        formula = self.formula(**symbols)
        return formula, {
            symbols[k]: v for k, v in values.items() if symbols[k] in formula.free_symbols
        }


def _sigmoid(a: sp.Expr) -> sp.Expr:
    return 1 / (1 + sp.exp(-a))


_LOSS_DOMAIN = (Domain(), Domain())
_PROB = Domain("uniform", 0.02, 0.98)

_ENTRIES = [
    Builtin(
        "sigmoid", lambda: _sigmoid(x), (x,), lambda t, a: t.sigmoid(a), doc="σ(x) = 1/(1+exp(-x))"
    ),
    Builtin("tanh", lambda: sp.tanh(x), (x,), lambda t, a: t.tanh(a)),
    Builtin("relu", lambda: sp.Max(x, 0), (x,), lambda t, a: t.relu(a)),
    Builtin(
        "leaky_relu",
        lambda negative_slope: sp.Piecewise((x, x > 0), (negative_slope * x, True)),
        (x,),
        lambda t, a, negative_slope: t.nn.functional.leaky_relu(a, negative_slope),
        params={"negative_slope": 0.01},
    ),
    Builtin(
        "elu",
        lambda alpha: sp.Piecewise((x, x > 0), (alpha * (sp.exp(x) - 1), True)),
        (x,),
        lambda t, a, alpha: t.nn.functional.elu(a, alpha),
        params={"alpha": 1.0},
    ),
    Builtin(
        "gelu",
        lambda: x / 2 * (1 + sp.erf(x / sp.sqrt(2))),
        (x,),
        lambda t, a: t.nn.functional.gelu(a),
        doc="exact (erf) form",
    ),
    Builtin(
        "gelu_tanh",
        lambda: x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3))),
        (x,),
        lambda t, a: t.nn.functional.gelu(a, approximate="tanh"),
        doc="tanh approximation",
    ),
    Builtin("silu", lambda: x * _sigmoid(x), (x,), lambda t, a: t.nn.functional.silu(a)),
    Builtin(
        "softplus",
        lambda beta, threshold: sp.Piecewise(
            (x, beta * x > threshold), (sp.log(1 + sp.exp(beta * x)) / beta, True)
        ),
        (x,),
        lambda t, a, beta, threshold: t.nn.functional.softplus(a, beta, threshold),
        params={"beta": 1.0, "threshold": 20.0},
        allowed={"beta": POSITIVE},
    ),
    Builtin(
        "softsign", lambda: x / (1 + sp.Abs(x)), (x,), lambda t, a: t.nn.functional.softsign(a)
    ),
    Builtin(
        "hardtanh",
        lambda min_val, max_val: sp.Piecewise(
            (min_val, x <= min_val), (max_val, x >= max_val), (x, True)
        ),
        (x,),
        lambda t, a, min_val, max_val: t.nn.functional.hardtanh(a, min_val, max_val),
        params={"min_val": -1.0, "max_val": 1.0},
        relations=(("min_val < max_val", lambda p: p["min_val"] < p["max_val"]),),
    ),
    Builtin(
        "add",
        lambda: x + y,
        (x, y),
        lambda t, a, b: a + b,
        domain=_LOSS_DOMAIN,
        torch_grads=(True, True),
        doc="x + y (a residual or embedding sum), per element",
    ),
    Builtin(
        "additive_mask",
        lambda fill: (1 - x) * fill,
        (x,),
        lambda t, a, fill: (1 - a) * fill,
        params={"fill": -1e4},
        domain=(Domain("uniform", 0.0, 1.0),),
        edges=(0.0, 1.0),
        doc="(1 - m)·fill: an attention mask of 1s (tokens) and 0s (padding) as the additive "
        "mask of the scores (0 at tokens, fill at padding; BERT's fill is the dtype's most "
        "negative number)",
    ),
    Builtin(
        "mse",
        lambda: (x - y) ** 2,
        (x, y),
        lambda t, a, b: t.nn.functional.mse_loss(a, b, reduction="none"),
        domain=_LOSS_DOMAIN,
        torch_grads=(True, True),
        doc="(x - y)², per element",
    ),
    Builtin(
        "l1",
        lambda: sp.Abs(x - y),
        (x, y),
        lambda t, a, b: t.nn.functional.l1_loss(a, b, reduction="none"),
        domain=_LOSS_DOMAIN,
        torch_grads=(True, True),
    ),
    Builtin(
        "huber",
        lambda delta: sp.Piecewise(
            ((x - y) ** 2 / 2, sp.Abs(x - y) < delta), (delta * (sp.Abs(x - y) - delta / 2), True)
        ),
        (x, y),
        lambda t, a, b, delta: t.nn.functional.huber_loss(a, b, reduction="none", delta=delta),
        params={"delta": 1.0},
        allowed={"delta": POSITIVE},
        domain=_LOSS_DOMAIN,
        torch_grads=(True, True),
    ),
    Builtin(
        "bce",
        lambda: -(y * sp.Max(sp.log(x), -100) + (1 - y) * sp.Max(sp.log(1 - x), -100)),
        (x, y),
        lambda t, a, b: t.nn.functional.binary_cross_entropy(a, b, reduction="none"),
        domain=(_PROB, Domain("uniform", 0.0, 1.0)),
        torch_grads=(True, False),
        edges=(0.0, 1.0, 1e-30, 1 - 1e-16, 0.5),
        doc="binary cross-entropy on probabilities, logs clamped at -100 as in torch",
    ),
    Builtin(
        "bce_with_logits",
        lambda: -(y * sp.log(_sigmoid(x)) + (1 - y) * sp.log(1 - _sigmoid(x))),
        (x, y),
        lambda t, a, b: t.nn.functional.binary_cross_entropy_with_logits(a, b, reduction="none"),
        domain=(Domain(), Domain("uniform", 0.0, 1.0)),
        torch_grads=(True, True),
        doc="binary cross-entropy on logits, written naively; stabilized to softplus(x) - x·y",
    ),
]

BUILTINS: dict[str, Builtin] = {entry.name: entry for entry in _ENTRIES}


# -- tensor ops in index notation ----------------------------------------------------------

_b, _i, _j, _o, _s, _h = sp.symbols("b i j o s h", integer=True)
_B, _N, _M, _S, _H = sp.symbols("B N M S H", integer=True, positive=True)


def _tensor(name: str, *shape: sp.Symbol) -> sp.IndexedBase:
    return sp.IndexedBase(name, shape=shape)


@dataclass(frozen=True)
class TensorBuiltin:
    """One built-in tensor op: its index formula, torch reference and test-input domains.

    ``formula(**params)`` returns ``(expr, out, inputs)``; ``domain`` names how each input is
    drawn in tests: ``"normal"``, ``"simplex"`` (rows summing to 1: class probabilities),
    ``"mask"`` (0/1 rows with at least one 1), ``"additive_mask"`` (0 or -1e4 by position,
    at least one 0 per row) or ``"ids:N"`` (integers in ``[0, N)``).  ``wrt`` lists the
    inputs that get a gradient (default: every float input).
    """

    name: str
    formula: Callable[..., tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]]
    torch_ref: Callable[..., Any]
    params: dict[str, float] = field(default_factory=dict)
    #: the values each parameter may take (default: POSITIVE — the formula's parameter
    #: symbols are declared positive)
    allowed: dict[str, Allowed] = field(default_factory=dict)
    domain: tuple[str, ...] = ("normal",)
    torch_grads: tuple[bool, ...] | None = None
    doc: str = ""
    wrt: tuple[str, ...] | None = None
    #: the dim standing for any number of leading axes (see ``batch`` in ``symgrad.tensor_op``)
    batch: sp.Symbol | None = None
    #: parameters that shape the formula itself (a convolution's stride and padding): whole
    #: numbers written into it, not constants bound at call time
    ints: tuple[str, ...] = ()
    #: the output's shape as a function of the ``ints`` (None: inferred from the reads)
    shape: Callable[..., tuple[sp.Expr, ...]] | None = None

    def _values(self, params: dict[str, float]) -> dict[str, Any]:
        """The parameters, checked (:func:`check_params`); the ``ints`` as whole numbers."""
        values: dict[str, Any] = check_params(
            self.name, self.params, params, self.allowed, otherwise=POSITIVE
        )
        for k in self.ints:
            v = values[k]
            if int(v) != v:  # its range is checked above, with the others
                raise DefinitionError(
                    f"built-in op {self.name!r}: {k} must be a whole number, got {v!r}"
                )
            values[k] = int(v)
        return values

    def build(
        self, **params: float
    ) -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...], dict[sp.Symbol, float]]:
        """``(expr, out, inputs, constants)`` with torch's default parameters."""
        values = self._values(params)
        symbols = {k: sp.Symbol(k, positive=True) for k in self.params if k not in self.ints}
        expr, out, inputs = self.formula(**symbols, **{k: values[k] for k in self.ints})
        return expr, out, inputs, {symbols[k]: v for k, v in values.items() if k in symbols}

    def out_shape(self, **params: float) -> tuple[sp.Expr, ...] | None:
        """The declared output shape for these parameters (None: inferred)."""
        if self.shape is None:
            return None
        values = self._values(params)
        return self.shape(**{k: values[k] for k in self.ints})


Formula = tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]


def _affine(
    outs: tuple[tuple[sp.Symbol, sp.Symbol], ...], ins: tuple[tuple[sp.Symbol, sp.Symbol], ...]
) -> Formula:
    """``Y[b, o...] = Σ_{i...} X[b, i...]·W[o..., i...] + c[o...]``: a linear layer (torch's
    weight layout) from the feature axes ``ins`` to ``outs`` (``(index, dim)`` pairs), over any
    leading batch axes ``b``.

    One formula for the linear layer (one axis to one), attention's per-head projections (to
    ``(H, M)``: weights ``(H, M, N)``) and the merge of the heads (from ``(H, M)``: weights
    ``(N, H, M)``).
    """
    in_idx, in_dims = zip(*ins, strict=True)
    out_idx, out_dims = zip(*outs, strict=True)
    X, W, c = _tensor("X", _B, *in_dims), _tensor("W", *out_dims, *in_dims), _tensor("c", *out_dims)
    body = X[(_b, *in_idx)] * W[(*out_idx, *in_idx)]
    total = sp.Sum(body, *[(v, 0, d - 1) for v, d in ins])
    return total + c[out_idx], (_b, *out_idx), (X, W, c)


def _linear() -> Formula:
    return _affine(((_i, _M),), ((_j, _N),))


def _linear_nobias() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, W = _tensor("X", _B, _N), _tensor("W", _M, _N)
    return sp.Sum(W[_i, _j] * X[_b, _j], (_j, 0, _N - 1)), (_b, _i), (X, W)


def _matmul() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    A, Bm = _tensor("A", _B, _N), _tensor("Bm", _N, _M)
    return sp.Sum(A[_b, _j] * Bm[_j, _i], (_j, 0, _N - 1)), (_b, _i), (A, Bm)


def _bilinear() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X1, X2 = _tensor("X1", _B, _N), _tensor("X2", _B, _M)
    W, c = _tensor("W", _H, _N, _M), _tensor("c", _H)
    body = X1[_b, _i] * W[_o, _i, _j] * X2[_b, _j]
    return sp.Sum(body, (_i, 0, _N - 1), (_j, 0, _M - 1)) + c[_o], (_b, _o), (X1, X2, W, c)


def _lse(X: sp.IndexedBase) -> sp.Expr:
    return sp.log(sp.Sum(sp.exp(X[_b, _j]), (_j, 0, _N - 1)))


def _softmax() -> Formula:
    X = _tensor("X", _B, _N)
    return _softmax_over(lambda t: X[_b, t], lambda t: True, _N), (_b, _t), (X,)


def _log_softmax() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return X[_b, _i] - _lse(X), (_b, _i), (X,)


def _logsumexp() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return _lse(X), (_b,), (X,)


def _cross_entropy() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, T = _tensor("X", _B, _N), _tensor("T", _B, _N)
    return -sp.Sum(T[_b, _i] * (X[_b, _i] - _lse(X)), (_i, 0, _N - 1)), (_b,), (X, T)


def _cross_entropy_labels() -> Formula:
    X = _tensor("X", _B, _N)
    labels = sp.IndexedBase("labels", shape=(_B,), integer=True)
    return -X[_b, labels[_b]] + _lse(X), (_b,), (X, labels)


def _normalized(z: Callable[[sp.Symbol], sp.Expr], eps: sp.Symbol) -> sp.Expr:
    """Layer norm of the row ``z(j)``, ``j < N``, at element ``i``: ``(z_i - mean) / √(var + ε)``
    with the biased variance, as torch."""
    mean = sp.Sum(z(_j), (_j, 0, _N - 1)) / _N
    var = sp.Sum((z(_j) - mean) ** 2, (_j, 0, _N - 1)) / _N
    return (z(_i) - mean) / sp.sqrt(var + eps)


def _layer_norm(eps: sp.Symbol) -> Formula:
    X, w, beta = _tensor("X", _B, _N), _tensor("w", _N), _tensor("beta", _N)
    return _normalized(lambda j: X[_b, j], eps) * w[_i] + beta[_i], (_b, _i), (X, w, beta)


def _rms_norm(eps: sp.Symbol) -> Formula:
    X, w = _tensor("X", _B, _N), _tensor("w", _N)
    mean_square = sp.Sum(X[_b, _j] ** 2, (_j, 0, _N - 1)) / _N
    return X[_b, _i] / sp.sqrt(mean_square + eps) * w[_i], (_b, _i), (X, w)


def _l2_penalty() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    W = _tensor("W", _M, _N)
    return sp.Sum(W[_i, _j] ** 2, (_i, 0, _M - 1), (_j, 0, _N - 1)), (), (W,)


def _sum() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return sp.Sum(X[_b, _i], (_b, 0, _B - 1), (_i, 0, _N - 1)), (), (X,)


def _mean() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return sp.Sum(X[_b, _i], (_b, 0, _B - 1), (_i, 0, _N - 1)) / (_B * _N), (), (X,)


def _mean_last() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return sp.Sum(X[_b, _j], (_j, 0, _N - 1)) / _N, (_b,), (X,)


def _masked_mean_pool() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, mask = _tensor("X", _B, _S, _H), _tensor("mask", _B, _S)
    pooled = sp.Sum(mask[_b, _s] * X[_b, _s, _h], (_s, 0, _S - 1))
    return pooled / sp.Sum(mask[_b, _s], (_s, 0, _S - 1)), (_b, _h), (X, mask)


# -- the transformer's ops (BERT): [batch b, position s/t, head h, head feature e] -----------
#
# Sequence tensors are 3-D ``[B, S, N]``; attention works per head on 4-D tensors, with the
# projection weights stored per head (``(H, M, N)``: torch's ``(H·M, N)`` weight, reshaped), so
# no activation is ever reshaped and every gradient is the formula's own.

_e, _t, _u = sp.symbols("e t u", integer=True)


def _embedding() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    ids = sp.IndexedBase("ids", shape=(_B, _S), integer=True)
    W = _tensor("W", _N, _H)
    return W[ids[_b, _s], _h], (_b, _s, _h), (ids, W)


def _head_projection() -> Formula:
    return _affine(((_h, _H), (_e, _M)), ((_j, _N),))


def _attention_scores() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    Q, K = _tensor("Q", _B, _S, _H, _M), _tensor("K", _B, _S, _H, _M)
    body = sp.Sum(Q[_b, _s, _h, _e] * K[_b, _t, _h, _e], (_e, 0, _M - 1)) / sp.sqrt(_M)
    return body, (_b, _h, _s, _t), (Q, K)


def _softmax_over(
    score: Callable[[sp.Symbol], sp.Expr], keep: Callable[[sp.Symbol], object], keys: sp.Symbol
) -> sp.Expr:
    """``exp(score(t)) / Σ_u exp(score(u))`` over the keys ``u < keys`` where ``keep(u)`` holds
    (0 at the others): the causal mask is the condition ``u ≤ s``, an index condition.  One
    formula for softmax, the attention's masked softmax and their causal forms."""

    def term(u: sp.Symbol) -> sp.Expr:
        cond = keep(u)
        if cond is True:
            return sp.exp(score(u))
        return sp.Piecewise((sp.exp(score(u)), cond), (0, True))

    return term(_t) / sp.Sum(term(_u), (_u, 0, keys - 1))


def _masked_softmax() -> Formula:
    X, A = _tensor("X", _B, _H, _S, _S), _tensor("A", _B, _S)
    body = _softmax_over(lambda t: X[_b, _h, _s, t] + A[_b, t], lambda t: True, _S)
    return body, (_b, _h, _s, _t), (X, A)


def _causal_masked_softmax() -> Formula:
    X, A = _tensor("X", _B, _H, _S, _S), _tensor("A", _B, _S)
    body = _softmax_over(lambda t: X[_b, _h, _s, t] + A[_b, t], lambda t: t <= _s, _S)
    return body, (_b, _h, _s, _t), (X, A)


def _causal_softmax() -> Formula:
    X = _tensor("X", _B, _S, _S)
    return _softmax_over(lambda t: X[_b, _s, t], lambda t: t <= _s, _S), (_b, _s, _t), (X,)


def _attention_context() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    P, V = _tensor("P", _B, _H, _S, _S), _tensor("V", _B, _S, _H, _M)
    body = sp.Sum(P[_b, _h, _s, _t] * V[_b, _t, _h, _e], (_t, 0, _S - 1))
    return body, (_b, _s, _h, _e), (P, V)


def _head_merge() -> Formula:
    return _affine(((_i, _N),), ((_h, _H), (_e, _M)))


def _add_layer_norm(eps: sp.Symbol) -> Formula:
    X, R = _tensor("X", _B, _N), _tensor("R", _B, _N)
    w, beta = _tensor("w", _N), _tensor("beta", _N)
    normalized = _normalized(lambda j: X[_b, j] + R[_b, j], eps)
    return normalized * w[_i] + beta[_i], (_b, _i), (X, R, w, beta)


# -- convolutions: shifted reads; their VJPs (the transposed convolutions) are derived --------

_C, _O, _L, _K = sp.symbols("C O L K", integer=True, positive=True)
_Hi, _Wi, _KH, _KW = sp.symbols("Hi Wi KH KW", integer=True, positive=True)
_c, _p, _q, _r, _v = sp.symbols("c p q r v", integer=True)


#: a convolution's stride is ≥ 1, its zero padding ≥ 0 (both whole numbers)
_CONV_ALLOWED = {
    "stride": Allowed(low=1.0, closed_low=True),
    "padding": Allowed(low=0.0, closed_low=True),
}


def _conv1d(stride: int, padding: int) -> Formula:
    X, W, bias = _tensor("X", _B, _C, _L), _tensor("W", _O, _C, _K), _tensor("c", _O)
    read = X[_b, _c, stride * _p + _q - padding]
    body = sp.Sum(W[_o, _c, _q] * read, (_c, 0, _C - 1), (_q, 0, _K - 1))
    return body + bias[_o], (_b, _o, _p), (X, W, bias)


def _conv2d(stride: int, padding: int) -> Formula:
    X, W = _tensor("X", _B, _C, _Hi, _Wi), _tensor("W", _O, _C, _KH, _KW)
    bias = _tensor("c", _O)
    read = X[_b, _c, stride * _p + _q - padding, stride * _v + _r - padding]
    body = sp.Sum(W[_o, _c, _q, _r] * read, (_c, 0, _C - 1), (_q, 0, _KH - 1), (_r, 0, _KW - 1))
    return body + bias[_o], (_b, _o, _p, _v), (X, W, bias)


def _conv_length(n: sp.Expr, k: sp.Expr, stride: int, padding: int) -> sp.Expr:
    return sp.floor((n + 2 * padding - k) / stride) + 1


def _scores_ref(t: Any, q: Any, k: Any) -> Any:
    return q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / q.shape[-1] ** 0.5


def _context_ref(t: Any, p: Any, v: Any) -> Any:
    return (p @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def _pool_ref(t: Any, x: Any, m: Any) -> Any:
    return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)


_TENSOR_ENTRIES = [
    TensorBuiltin(
        "linear",
        _linear,
        lambda t, x, w, c: t.nn.functional.linear(x, w, c),
        domain=("normal", "normal", "normal"),
        doc="Y = X Wᵀ + c (torch layout), over any leading batch axes of X",
        batch=_B,
    ),
    TensorBuiltin(
        "linear_nobias",
        _linear_nobias,
        lambda t, x, w: t.nn.functional.linear(x, w),
        domain=("normal", "normal"),
        doc="Y = X Wᵀ (torch layout): a linear layer without a bias",
    ),
    TensorBuiltin("matmul", _matmul, lambda t, a, b: a @ b, domain=("normal", "normal")),
    TensorBuiltin(
        "bilinear",
        _bilinear,
        lambda t, x1, x2, w, c: t.nn.functional.bilinear(x1, x2, w, c),
        domain=("normal",) * 4,
    ),
    TensorBuiltin("softmax", _softmax, lambda t, x: t.softmax(x, -1), batch=_B),
    TensorBuiltin("log_softmax", _log_softmax, lambda t, x: t.log_softmax(x, -1), batch=_B),
    TensorBuiltin("logsumexp", _logsumexp, lambda t, x: t.logsumexp(x, -1), batch=_B),
    TensorBuiltin(
        "softmax_cross_entropy",
        _cross_entropy,
        lambda t, x, p: t.nn.functional.cross_entropy(x, p, reduction="none"),
        domain=("normal", "simplex"),
        doc="cross-entropy of logits X against class probabilities T, per row",
        batch=_B,
    ),
    TensorBuiltin(
        "cross_entropy",
        _cross_entropy_labels,
        lambda t, x, labels: t.nn.functional.cross_entropy(x, labels, reduction="none"),
        domain=("normal", "ids:N"),
        doc="cross-entropy of logits X against integer class labels, per row (torch's "
        "F.cross_entropy with class indices); its gradient, derived, is softmax − one-hot",
    ),
    TensorBuiltin(
        "layer_norm",
        _layer_norm,
        lambda t, x, w, b, eps: t.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps),
        params={"eps": 1e-5},
        allowed={"eps": POSITIVE},
        domain=("normal",) * 3,
        doc="over the last axis of any rank, biased variance, affine weight and bias, as torch",
        batch=_B,
    ),
    TensorBuiltin(
        "rms_norm",
        _rms_norm,
        lambda t, x, w, eps: t.nn.functional.rms_norm(x, x.shape[-1:], w, eps),
        params={"eps": 1e-6},
        domain=("normal",) * 2,
        doc="RMSNorm over the last axis of any rank: X / √(mean(X²) + ε) · w",
        batch=_B,
    ),
    TensorBuiltin("l2_penalty", _l2_penalty, lambda t, w: (w**2).sum()),
    TensorBuiltin("sum", _sum, lambda t, x: x.sum()),
    TensorBuiltin("mean", _mean, lambda t, x: x.mean()),
    TensorBuiltin("mean_last", _mean_last, lambda t, x: x.mean(-1), batch=_B),
    TensorBuiltin(
        "masked_mean_pool",
        _masked_mean_pool,
        _pool_ref,
        domain=("normal", "mask"),
        doc="mean over the sequence axis of the positions where mask is 1",
    ),
]

_TENSOR_ENTRIES += [
    TensorBuiltin(
        "embedding",
        _embedding,
        lambda t, ids, w: t.nn.functional.embedding(ids, w),
        domain=("ids:N", "normal"),
        doc="Y[b, s] = W[ids[b, s]]: a gather; its gradient, derived, is a scatter-add",
    ),
    TensorBuiltin(
        "seq_linear",
        _linear,
        lambda t, x, w, c: t.nn.functional.linear(x, w, c),
        domain=("normal",) * 3,
        doc="linear over the last axis of a [B, S, N] sequence: the linear formula, by name",
        batch=_B,
    ),
    TensorBuiltin(
        "head_projection",
        _head_projection,
        lambda t, x, w, c: t.nn.functional.linear(x, w.flatten(0, 1), c.flatten()).unflatten(
            -1, w.shape[:2]
        ),
        domain=("normal",) * 3,
        doc="a linear layer into H heads of M features: the query, key and value projections",
        batch=_B,
    ),
    TensorBuiltin(
        "attention_scores",
        _attention_scores,
        _scores_ref,
        domain=("normal", "normal"),
        doc="S[b, h, s, t] = Q[b, s, h]·K[b, t, h] / √M, scaled dot products per head",
    ),
    TensorBuiltin(
        "masked_softmax",
        _masked_softmax,
        lambda t, x, a: t.softmax(x + a[:, None, None, :], -1),
        domain=("normal", "additive_mask"),
        wrt=("X",),
        doc="softmax over the last axis of scores plus an additive padding mask A[b, t]",
    ),
    TensorBuiltin(
        "causal_masked_softmax",
        _causal_masked_softmax,
        lambda t, x, a: t.softmax(
            (x + a[:, None, None, :]).masked_fill(
                t.ones(x.shape[-2:], dtype=t.bool).triu(1), float("-inf")
            ),
            -1,
        ),
        domain=("normal", "additive_mask"),
        wrt=("X",),
        doc="the masked softmax of a decoder: key t only for queries s ≥ t (an index condition)",
    ),
    TensorBuiltin(
        "causal_softmax",
        _causal_softmax,
        lambda t, x: t.softmax(
            x.masked_fill(t.ones(x.shape[-2:], dtype=t.bool).triu(1), float("-inf")), -1
        ),
        doc="softmax over keys t ≤ s of (..., S, S) scores: causal attention weights",
        batch=_B,
    ),
    TensorBuiltin(
        "attention_context",
        _attention_context,
        _context_ref,
        domain=("normal", "normal"),
        doc="C[b, s, h] = Σ_t P[b, h, s, t]·V[b, t, h]: the attention-weighted values",
    ),
    TensorBuiltin(
        "head_merge",
        _head_merge,
        lambda t, x, w, c: t.nn.functional.linear(x.flatten(-2), w.flatten(1), c),
        domain=("normal",) * 3,
        doc="the attention output projection, from H heads of M features back to N",
        batch=_B,
    ),
    TensorBuiltin(
        "add_layer_norm",
        _add_layer_norm,
        lambda t, x, r, w, b, eps: t.nn.functional.layer_norm(x + r, x.shape[-1:], w, b, eps),
        params={"eps": 1e-5},
        allowed={"eps": POSITIVE},
        domain=("normal",) * 4,
        doc="layer norm of a residual sum X + R over the last axis (torch's eps; BERT's is 1e-12)",
        batch=_B,
    ),
]

_TENSOR_ENTRIES += [
    TensorBuiltin(
        "conv1d",
        _conv1d,
        lambda t, x, w, c, stride, padding: t.nn.functional.conv1d(x, w, c, stride, padding),
        params={"stride": 1, "padding": 0},
        domain=("normal",) * 3,
        doc="Y[b, o, p] = Σ_{c,q} W[o, c, q]·X[b, c, stride·p + q - padding] + c[o] (zeros "
        "outside X); lowered to one GEMM per image (im2col)",
        ints=("stride", "padding"),
        allowed=_CONV_ALLOWED,
        shape=lambda stride, padding: (_B, _O, _conv_length(_L, _K, stride, padding)),
    ),
    TensorBuiltin(
        "conv2d",
        _conv2d,
        lambda t, x, w, c, stride, padding: t.nn.functional.conv2d(x, w, c, stride, padding),
        params={"stride": 1, "padding": 0},
        domain=("normal",) * 3,
        doc="2-D convolution, torch's layout (B, C, H, W) and (O, C, KH, KW); stride, zero "
        "padding; one GEMM per image",
        ints=("stride", "padding"),
        allowed=_CONV_ALLOWED,
        shape=lambda stride, padding: (
            _B,
            _O,
            _conv_length(_Hi, _KH, stride, padding),
            _conv_length(_Wi, _KW, stride, padding),
        ),
    ),
]

TENSOR_BUILTINS: dict[str, TensorBuiltin] = {e.name: e for e in _TENSOR_ENTRIES}


def get_builtin(name: str) -> Builtin | TensorBuiltin:
    """The registry entry of a built-in op; a clear error listing the names otherwise."""
    entry = BUILTINS.get(name) or TENSOR_BUILTINS.get(name)
    if entry is None:
        names = sorted([*BUILTINS, *TENSOR_BUILTINS])
        raise DefinitionError(
            f"there is no built-in op {name!r}{did_you_mean(name, names)}; built-ins are "
            f"{', '.join(names)}"
        )
    return entry
