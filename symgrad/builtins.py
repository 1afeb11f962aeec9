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
    domain: tuple[str, ...] = ("normal",)
    torch_grads: tuple[bool, ...] | None = None
    doc: str = ""
    wrt: tuple[str, ...] | None = None

    def build(
        self, **params: float
    ) -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...], dict[sp.Symbol, float]]:
        """``(expr, out, inputs, constants)`` with torch's default parameters."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise DefinitionError(
                f"built-in op {self.name!r} has no parameter(s) {unknown}; its parameters are "
                f"{sorted(self.params) or 'none'}"
            )
        symbols = {k: sp.Symbol(k, positive=True) for k in self.params}
        expr, out, inputs = self.formula(**symbols)
        values = {**self.params, **params}
        return expr, out, inputs, {symbols[k]: v for k, v in values.items()}


def _linear() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, W, c = _tensor("X", _B, _N), _tensor("W", _M, _N), _tensor("c", _M)
    return sp.Sum(W[_i, _j] * X[_b, _j], (_j, 0, _N - 1)) + c[_i], (_b, _i), (X, W, c)


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


def _softmax() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return sp.exp(X[_b, _i]) / sp.Sum(sp.exp(X[_b, _j]), (_j, 0, _N - 1)), (_b, _i), (X,)


def _log_softmax() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return X[_b, _i] - _lse(X), (_b, _i), (X,)


def _logsumexp() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X = _tensor("X", _B, _N)
    return _lse(X), (_b,), (X,)


def _cross_entropy() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, T = _tensor("X", _B, _N), _tensor("T", _B, _N)
    return -sp.Sum(T[_b, _i] * (X[_b, _i] - _lse(X)), (_i, 0, _N - 1)), (_b,), (X, T)


def _layer_norm(
    eps: sp.Symbol,
) -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, w, beta = _tensor("X", _B, _N), _tensor("w", _N), _tensor("beta", _N)
    mean = sp.Sum(X[_b, _j], (_j, 0, _N - 1)) / _N
    var = sp.Sum((X[_b, _j] - mean) ** 2, (_j, 0, _N - 1)) / _N  # biased, as torch
    return (X[_b, _i] - mean) / sp.sqrt(var + eps) * w[_i] + beta[_i], (_b, _i), (X, w, beta)


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


def _seq_linear() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, W, c = _tensor("X", _B, _S, _N), _tensor("W", _M, _N), _tensor("c", _M)
    return sp.Sum(X[_b, _s, _j] * W[_i, _j], (_j, 0, _N - 1)) + c[_i], (_b, _s, _i), (X, W, c)


def _head_projection() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, W, c = _tensor("X", _B, _S, _N), _tensor("W", _H, _M, _N), _tensor("c", _H, _M)
    body = sp.Sum(X[_b, _s, _j] * W[_h, _e, _j], (_j, 0, _N - 1)) + c[_h, _e]
    return body, (_b, _s, _h, _e), (X, W, c)


def _attention_scores() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    Q, K = _tensor("Q", _B, _S, _H, _M), _tensor("K", _B, _S, _H, _M)
    body = sp.Sum(Q[_b, _s, _h, _e] * K[_b, _t, _h, _e], (_e, 0, _M - 1)) / sp.sqrt(_M)
    return body, (_b, _h, _s, _t), (Q, K)


def _masked_softmax() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, A = _tensor("X", _B, _H, _S, _S), _tensor("A", _B, _S)
    total = sp.Sum(sp.exp(X[_b, _h, _s, _u] + A[_b, _u]), (_u, 0, _S - 1))
    return sp.exp(X[_b, _h, _s, _t] + A[_b, _t]) / total, (_b, _h, _s, _t), (X, A)


def _attention_context() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    P, V = _tensor("P", _B, _H, _S, _S), _tensor("V", _B, _S, _H, _M)
    body = sp.Sum(P[_b, _h, _s, _t] * V[_b, _t, _h, _e], (_t, 0, _S - 1))
    return body, (_b, _s, _h, _e), (P, V)


def _head_merge() -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    C, W, c = _tensor("C", _B, _S, _H, _M), _tensor("W", _N, _H, _M), _tensor("c", _N)
    body = sp.Sum(C[_b, _s, _h, _e] * W[_i, _h, _e], (_h, 0, _H - 1), (_e, 0, _M - 1)) + c[_i]
    return body, (_b, _s, _i), (C, W, c)


def _add_layer_norm(
    eps: sp.Symbol,
) -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.IndexedBase, ...]]:
    X, R = _tensor("X", _B, _S, _N), _tensor("R", _B, _S, _N)
    w, beta = _tensor("w", _N), _tensor("beta", _N)

    def z(j: sp.Symbol) -> sp.Expr:
        return X[_b, _s, j] + R[_b, _s, j]

    mean = sp.Sum(z(_j), (_j, 0, _N - 1)) / _N
    var = sp.Sum((z(_j) - mean) ** 2, (_j, 0, _N - 1)) / _N
    return (z(_i) - mean) / sp.sqrt(var + eps) * w[_i] + beta[_i], (_b, _s, _i), (X, R, w, beta)


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
        doc="Y = X Wᵀ + c (torch layout)",
    ),
    TensorBuiltin("matmul", _matmul, lambda t, a, b: a @ b, domain=("normal", "normal")),
    TensorBuiltin(
        "bilinear",
        _bilinear,
        lambda t, x1, x2, w, c: t.nn.functional.bilinear(x1, x2, w, c),
        domain=("normal",) * 4,
    ),
    TensorBuiltin("softmax", _softmax, lambda t, x: t.softmax(x, -1)),
    TensorBuiltin("log_softmax", _log_softmax, lambda t, x: t.log_softmax(x, -1)),
    TensorBuiltin("logsumexp", _logsumexp, lambda t, x: t.logsumexp(x, -1)),
    TensorBuiltin(
        "softmax_cross_entropy",
        _cross_entropy,
        lambda t, x, p: t.nn.functional.cross_entropy(x, p, reduction="none"),
        domain=("normal", "simplex"),
        doc="cross-entropy of logits X against class probabilities T, per row",
    ),
    TensorBuiltin(
        "layer_norm",
        _layer_norm,
        lambda t, x, w, b, eps: t.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps),
        params={"eps": 1e-5},
        domain=("normal",) * 3,
        doc="over the last axis, biased variance, affine weight and bias, as torch",
    ),
    TensorBuiltin("l2_penalty", _l2_penalty, lambda t, w: (w**2).sum()),
    TensorBuiltin("sum", _sum, lambda t, x: x.sum()),
    TensorBuiltin("mean", _mean, lambda t, x: x.mean()),
    TensorBuiltin("mean_last", _mean_last, lambda t, x: x.mean(-1)),
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
        _seq_linear,
        lambda t, x, w, c: t.nn.functional.linear(x, w, c),
        domain=("normal",) * 3,
        doc="linear over the last axis of a [B, S, N] sequence (torch layout)",
    ),
    TensorBuiltin(
        "head_projection",
        _head_projection,
        lambda t, x, w, c: t.nn.functional.linear(x, w.flatten(0, 1), c.flatten()).unflatten(
            -1, w.shape[:2]
        ),
        domain=("normal",) * 3,
        doc="a linear layer into H heads of M features: the query, key and value projections",
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
        "attention_context",
        _attention_context,
        _context_ref,
        domain=("normal", "normal"),
        doc="C[b, s, h] = Σ_t P[b, h, s, t]·V[b, t, h]: the attention-weighted values",
    ),
    TensorBuiltin(
        "head_merge",
        _head_merge,
        lambda t, x, w, c: t.nn.functional.linear(x.flatten(2), w.flatten(1), c),
        domain=("normal",) * 3,
        doc="the attention output projection, from H heads of M features back to N",
    ),
    TensorBuiltin(
        "add_layer_norm",
        _add_layer_norm,
        lambda t, x, r, w, b, eps: t.nn.functional.layer_norm(x + r, x.shape[-1:], w, b, eps),
        params={"eps": 1e-5},
        domain=("normal",) * 4,
        doc="layer norm of a residual sum X + R over the last axis (torch's eps; BERT's is 1e-12)",
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
