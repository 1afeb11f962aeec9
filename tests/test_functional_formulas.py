"""torch.nn.functional, written from the textbook formulas with the public API.

Each case is an op as a user would write it — ``sg.elementwise`` for a formula of scalars,
``sg.tensor_op`` for index notation (kinks inside sums, integer labels, shifted indices,
conditions on indices, batch axes) — beside the ``torch.nn.functional`` call it stands for.
Every case is checked, values and the gradient of every input torch differentiates:

* float64 at random inputs: relative error ≤ 1e-10 of the largest reference magnitude;
* float64 at extreme inputs (logits scaled to ±1e3): symgrad is finite wherever torch is, and
  agrees there to 1e-9 (relative to the largest magnitude of the finite reference entries, or
  within rounding noise of the whole check's largest value: see ``NOISE``);
* float32 (inputs scaled to ±1e2 for the extreme form): relative 1e-4.

Ops are built once per module (``_OPS``): each compiles once and is shared by the three checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch

import symgrad as sg

F = torch.nn.functional
x, y, z = sp.symbols("x y z", real=True)
b, c, e, h, i, j, k, o, p, q, r, s, t, u, v = sp.symbols(
    "b c e h i j k o p q r s t u v", integer=True
)
B, C, D, H, K, L, M, N, S, Wd, Co = sp.symbols(
    "B C D H K L M N S Wd Co", integer=True, positive=True
)


def T(name: str, *shape: sp.Expr, **kw: Any) -> sp.IndexedBase:
    return sp.IndexedBase(name, shape=shape, **kw)


def _sigmoid(a: sp.Expr) -> sp.Expr:
    return 1 / (1 + sp.exp(-a))


def _norm(X: sp.IndexedBase, idx: Callable[[sp.Symbol], tuple], dim: sp.Symbol) -> sp.Expr:
    return sp.sqrt(sp.Sum(X[idx(j)] ** 2, (j, 0, dim - 1)))


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``make()`` builds the op; ``sample(rng)`` its inputs (float64; labels int64);
    ``ref(*tensors)`` the torch call; ``scaled`` the inputs multiplied by the extreme scale;
    ``grads`` which inputs torch differentiates."""

    name: str
    make: Callable[[], Any]
    sample: Callable[[np.random.Generator], list[np.ndarray]]
    ref: Callable[..., torch.Tensor]
    scaled: tuple[int, ...] = (0,)
    grads: tuple[bool, ...] | None = None
    extreme: bool = True
    rtol64: float = 1e-10
    rtol32: float = 1e-4
    notes: dict = field(default_factory=dict)


def normal(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.normal(size=shape)


def inputs(*makers: Callable[[np.random.Generator], np.ndarray]):
    return lambda rng: [m(rng) for m in makers]


def uniform(lo: float, hi: float, *shape: int):
    return lambda rng: rng.uniform(lo, hi, size=shape)


def signs(*shape: int):
    return lambda rng: rng.choice([-1.0, 1.0], size=shape)


def labels(n: int, *shape: int):
    return lambda rng: rng.integers(0, n, size=shape)


def simplex(*shape: int):
    return lambda rng: rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def ew(name: str, formula: sp.Expr, args: tuple[sp.Symbol, ...] = (x,)) -> Callable[[], Any]:
    return lambda: sg.elementwise(formula, inputs=list(args), name=f"fx_{name}")


def tensor(name: str, build: Callable[[], tuple], **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        expr, out, ins = build()
        return sg.tensor_op(expr, out=out, inputs=list(ins), name=f"fx_{name}", **kw)

    return make


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
LAMBDA = sp.Rational(1, 2)
SHAPE = (4, 5)
X2 = normal(*SHAPE)
WIDE = lambda g: 4 * g.normal(size=SHAPE)  # noqa: E731 - past the kinks at ±3 and 6

ACTIVATIONS = [
    Case("relu", ew("relu", sp.Max(x, 0)), inputs(X2), F.relu),
    Case("relu6", ew("relu6", sp.Min(sp.Max(x, 0), 6)), inputs(WIDE), F.relu6),
    Case(
        "leaky_relu",
        ew("leaky_relu", sp.Piecewise((x, x > 0), (sp.Rational(1, 100) * x, True))),
        inputs(X2),
        F.leaky_relu,
    ),
    Case("elu", ew("elu", sp.Piecewise((x, x > 0), (sp.exp(x) - 1, True))), inputs(X2), F.elu),
    Case(
        "selu",
        ew("selu", SELU_SCALE * sp.Piecewise((x, x > 0), (SELU_ALPHA * (sp.exp(x) - 1), True))),
        inputs(X2),
        F.selu,
    ),
    Case("celu", ew("celu", sp.Max(0, x) + sp.Min(0, sp.exp(x) - 1)), inputs(X2), F.celu),
    Case("gelu", ew("gelu", x / 2 * (1 + sp.erf(x / sp.sqrt(2)))), inputs(X2), F.gelu),
    Case(
        "gelu_tanh",
        ew(
            "gelu_tanh",
            x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3))),
        ),
        inputs(X2),
        lambda a: F.gelu(a, approximate="tanh"),
    ),
    Case("silu", ew("silu", x * _sigmoid(x)), inputs(X2), F.silu),
    Case("mish", ew("mish", x * sp.tanh(sp.log(1 + sp.exp(x)))), inputs(X2), F.mish),
    Case("softplus", ew("softplus", sp.log(1 + sp.exp(x))), inputs(X2), F.softplus),
    Case("softsign", ew("softsign", x / (1 + sp.Abs(x))), inputs(X2), F.softsign),
    Case(
        "hardsigmoid",
        ew("hardsigmoid", sp.Piecewise((0, x <= -3), (1, x >= 3), (x / 6 + LAMBDA, True))),
        inputs(WIDE),
        F.hardsigmoid,
        rtol64=1e-7,  # torch's backward multiplies by 1/6 rounded to float32, in float64 too
    ),
    Case(
        "hardswish",
        ew("hardswish", sp.Piecewise((0, x <= -3), (x, x >= 3), (x * (x + 3) / 6, True))),
        inputs(WIDE),
        F.hardswish,
    ),
    Case("logsigmoid", ew("logsigmoid", sp.log(_sigmoid(x))), inputs(X2), F.logsigmoid),
    Case("tanhshrink", ew("tanhshrink", x - sp.tanh(x)), inputs(X2), F.tanhshrink),
    Case(
        "softshrink",
        ew(
            "softshrink",
            sp.Piecewise((x - LAMBDA, x > LAMBDA), (x + LAMBDA, x < -LAMBDA), (0, True)),
        ),
        inputs(X2),
        F.softshrink,
    ),
    Case(
        "hardshrink",
        ew("hardshrink", sp.Piecewise((x, sp.Abs(x) > LAMBDA), (0, True))),
        inputs(X2),
        F.hardshrink,
    ),
    Case("sigmoid", ew("sigmoid", _sigmoid(x)), inputs(X2), torch.sigmoid),
    Case("tanh", ew("tanh", sp.tanh(x)), inputs(X2), torch.tanh),
]

POSITIVE = uniform(0.05, 0.95, *SHAPE)
LOSSES = [
    Case("mse", ew("mse", (x - y) ** 2, (x, y)), inputs(X2, X2),
         lambda a, t: F.mse_loss(a, t, reduction="none"), scaled=(0, 1)),
    Case("l1", ew("l1", sp.Abs(x - y), (x, y)), inputs(X2, X2),
         lambda a, t: F.l1_loss(a, t, reduction="none"), scaled=(0, 1)),
    Case(
        "smooth_l1",
        ew(
            "smooth_l1",
            sp.Piecewise(((x - y) ** 2 / 2, sp.Abs(x - y) < 1), (sp.Abs(x - y) - LAMBDA, True)),
            (x, y),
        ),
        inputs(X2, X2),
        lambda a, t: F.smooth_l1_loss(a, t, reduction="none"),
        scaled=(0, 1),
    ),
    Case(
        "huber",
        ew(
            "huber",
            sp.Piecewise(((x - y) ** 2 / 2, sp.Abs(x - y) < 2), (2 * (sp.Abs(x - y) - 1), True)),
            (x, y),
        ),
        inputs(X2, X2),
        lambda a, t: F.huber_loss(a, t, reduction="none", delta=2.0),
        scaled=(0, 1),
    ),
    Case(
        "bce",
        ew("bce", -(y * sp.Max(sp.log(x), -100) + (1 - y) * sp.Max(sp.log(1 - x), -100)), (x, y)),
        inputs(POSITIVE, uniform(0, 1, *SHAPE)),
        lambda a, t: F.binary_cross_entropy(a, t, reduction="none"),
        grads=(True, False),
        extreme=False,
    ),
    Case(
        "bce_with_logits",
        ew(
            "bce_with_logits",
            -(y * sp.log(_sigmoid(x)) + (1 - y) * sp.log(1 - _sigmoid(x))),
            (x, y),
        ),
        inputs(X2, uniform(0, 1, *SHAPE)),
        lambda a, t: F.binary_cross_entropy_with_logits(a, t, reduction="none"),
    ),
    Case(
        "kl_div",
        ew("kl_div", y * (sp.log(y) - x), (x, y)),
        inputs(X2, lambda g: np.where(g.uniform(size=SHAPE) < 0.3, 0.0, g.uniform(size=SHAPE))),
        lambda a, t: F.kl_div(a, t, reduction="none"),
    ),
    Case(
        "poisson_nll",
        ew("poisson_nll", sp.exp(x) - y * x, (x, y)),
        inputs(X2, uniform(0, 3, *SHAPE)),
        lambda a, t: F.poisson_nll_loss(a, t, reduction="none"),
        extreme=False,  # exp(1e3) overflows in both
    ),
    Case(
        "soft_margin",
        ew("soft_margin", sp.log(1 + sp.exp(-y * x)), (x, y)),
        inputs(X2, signs(*SHAPE)),
        lambda a, t: F.soft_margin_loss(a, t, reduction="none"),
        grads=(True, False),
    ),
    Case(
        "gaussian_nll",
        ew("gaussian_nll", (sp.log(z) + (x - y) ** 2 / z) / 2, (x, y, z)),
        inputs(X2, X2, uniform(0.1, 2.0, *SHAPE)),
        lambda a, t, var: F.gaussian_nll_loss(a, t, var, reduction="none"),
        scaled=(0, 1),
    ),
    Case(
        "hinge_embedding",
        ew("hinge_embedding", sp.Piecewise((x, y > 0), (sp.Max(0, 1 - x), True)), (x, y)),
        inputs(X2, signs(*SHAPE)),
        lambda a, t: F.hinge_embedding_loss(a, t, reduction="none"),
        grads=(True, False),
    ),
    Case(
        "margin_ranking",
        ew("margin_ranking", sp.Max(0, -z * (x - y) + LAMBDA), (x, y, z)),
        inputs(X2, X2, signs(*SHAPE)),
        lambda a, a2, t: F.margin_ranking_loss(a, a2, t, margin=0.5, reduction="none"),
        scaled=(0, 1),
        grads=(True, True, False),
    ),
]


def _softmax():
    X = T("X", B, N)
    return sp.exp(X[b, i]) / sp.Sum(sp.exp(X[b, j]), (j, 0, N - 1)), (b, i), (X,)


def _log_softmax():
    X = T("X", B, N)
    return X[b, i] - sp.log(sp.Sum(sp.exp(X[b, j]), (j, 0, N - 1))), (b, i), (X,)


def _logsumexp():
    X = T("X", B, N)
    return sp.log(sp.Sum(sp.exp(X[b, j]), (j, 0, N - 1))), (b,), (X,)


def _cross_entropy_labels():
    X, y_ = T("X", B, N), T("y", B, integer=True)
    return -X[b, y_[b]] + sp.log(sp.Sum(sp.exp(X[b, j]), (j, 0, N - 1))), (b,), (X, y_)


def _cross_entropy_soft():
    X, P = T("X", B, N), T("P", B, N)
    lse = sp.log(sp.Sum(sp.exp(X[b, j]), (j, 0, N - 1)))
    return -sp.Sum(P[b, i] * (X[b, i] - lse), (i, 0, N - 1)), (b,), (X, P)


def _nll():
    X, y_ = T("X", B, N), T("y", B, integer=True)
    return -X[b, y_[b]], (b,), (X, y_)


def _layer_norm():
    X, w, beta = T("X", B, N), T("w", N), T("beta", N)
    mean = sp.Sum(X[b, j], (j, 0, N - 1)) / N
    var = sp.Sum((X[b, j] - mean) ** 2, (j, 0, N - 1)) / N
    return (X[b, i] - mean) / sp.sqrt(var + 1e-5) * w[i] + beta[i], (b, i), (X, w, beta)


def _rms_norm():
    X, w = T("X", B, N), T("w", N)
    return X[b, i] / sp.sqrt(sp.Sum(X[b, j] ** 2, (j, 0, N - 1)) / N + 1e-6) * w[i], (b, i), (X, w)


def _instance_norm():  # over L, for every (batch, channel): the layer-norm formula, batch axes
    X = T("X", B, L)
    mean = sp.Sum(X[b, j], (j, 0, L - 1)) / L
    var = sp.Sum((X[b, j] - mean) ** 2, (j, 0, L - 1)) / L
    return (X[b, i] - mean) / sp.sqrt(var + 1e-5), (b, i), (X,)


def _normalize():
    X = T("X", B, N)
    return X[b, i] / sp.Max(_norm(X, lambda j: (b, j), N), 1e-12), (b, i), (X,)


def _cosine_similarity():
    X1, X2_ = T("X1", B, N), T("X2", B, N)
    dot = sp.Sum(X1[b, j] * X2_[b, j], (j, 0, N - 1))
    n1 = sp.Max(_norm(X1, lambda j: (b, j), N), 1e-8)
    n2 = sp.Max(_norm(X2_, lambda j: (b, j), N), 1e-8)
    return dot / (n1 * n2), (b,), (X1, X2_)


def _distance(A, P_, eps=1e-6):
    return sp.sqrt(sp.Sum((A[b, j] - P_[b, j] + eps) ** 2, (j, 0, N - 1)))


def _pairwise_distance():
    X1, X2_ = T("X1", B, N), T("X2", B, N)
    return _distance(X1, X2_), (b,), (X1, X2_)


def _triplet():
    A, P_, Ng = T("A", B, N), T("P", B, N), T("Ng", B, N)
    return sp.Max(_distance(A, P_) - _distance(A, Ng) + 1, 0), (b,), (A, P_, Ng)


def _cosine_embedding():
    X1, X2_, Y = T("X1", B, N), T("X2", B, N), T("Y", B)
    dot = sp.Sum(X1[b, j] * X2_[b, j], (j, 0, N - 1))
    eps = 1e-12
    sq1 = sp.Sum(X1[b, j] ** 2, (j, 0, N - 1)) + eps
    sq2 = sp.Sum(X2_[b, j] ** 2, (j, 0, N - 1)) + eps
    cos = dot / sp.sqrt(sq1 * sq2)
    return sp.Piecewise((1 - cos, Y[b] > 0), (sp.Max(0, cos), True)), (b,), (X1, X2_, Y)


def _multi_margin():
    X, y_ = T("X", B, N), T("y", B, integer=True)
    body = sp.Piecewise((sp.Max(0, 1 - X[b, y_[b]] + X[b, j]), sp.Ne(j, y_[b])), (0, True))
    return sp.Sum(body, (j, 0, N - 1)) / N, (b,), (X, y_)


def _multilabel_soft_margin():
    X, Y = T("X", B, N), T("Y", B, N)
    body = Y[b, j] * sp.log(_sigmoid(X[b, j])) + (1 - Y[b, j]) * sp.log(_sigmoid(-X[b, j]))
    return -sp.Sum(body, (j, 0, N - 1)) / N, (b,), (X, Y)


def _glu():
    X = T("X", B, 2 * N)
    return X[b, i] * _sigmoid(X[b, i + N]), (b, i), (X,)


def _conv1d():
    X, W = T("X", B, C, L), T("W", Co, C, K)
    body = sp.Sum(W[o, c, q] * X[b, c, p + q], (c, 0, C - 1), (q, 0, K - 1))
    return body, (b, o, p), (X, W)


def _conv1d_padded():
    X, W, bias = T("X", B, C, L), T("W", Co, C, K), T("bias", Co)
    body = sp.Sum(W[o, c, q] * X[b, c, p + q - 1], (c, 0, C - 1), (q, 0, K - 1)) + bias[o]
    return body, (b, o, p), (X, W, bias)


def _conv2d():
    X, W, bias = T("X", B, C, H, Wd), T("W", Co, C, K, K), T("bias", Co)
    read = X[b, c, u + p - 1, v + q - 1]
    body = sp.Sum(W[o, c, p, q] * read, (c, 0, C - 1), (p, 0, K - 1), (q, 0, K - 1))
    return body + bias[o], (b, o, u, v), (X, W, bias)


def _attention(causal: bool):
    def build():
        Q, Kt, V = T("Q", B, S, D), T("K", B, S, D), T("V", B, S, D)

        def score(tt):
            return sp.Sum(Q[b, s, e] * Kt[b, tt, e], (e, 0, D - 1)) / sp.sqrt(D)

        def weight(tt):
            if not causal:
                return sp.exp(score(tt))
            return sp.Piecewise((sp.exp(score(tt)), tt <= s), (0, True))

        body = sp.Sum(weight(t) * V[b, t, i], (t, 0, S - 1)) / sp.Sum(weight(u), (u, 0, S - 1))
        return body, (b, s, i), (Q, Kt, V)

    return build


def _linear_relu():
    X, W, cb = T("X", B, N), T("W", M, N), T("c", M)
    return sp.Sum(W[i, j] * sp.Max(0, X[b, j]), (j, 0, N - 1)) + cb[i], (b, i), (X, W, cb)


def _embedding():
    ids, W = T("ids", B, S, integer=True), T("W", N, D)
    return W[ids[b, s], i], (b, s, i), (ids, W)


BN = (3, 6)
TENSORS = [
    Case("softmax", tensor("softmax", _softmax), inputs(normal(*BN)), lambda a: F.softmax(a, -1)),
    Case("log_softmax", tensor("log_softmax", _log_softmax), inputs(normal(*BN)),
         lambda a: F.log_softmax(a, -1)),
    Case("logsumexp", tensor("logsumexp", _logsumexp), inputs(normal(*BN)),
         lambda a: torch.logsumexp(a, -1)),
    Case("cross_entropy", tensor("cross_entropy", _cross_entropy_labels),
         inputs(normal(*BN), labels(6, 3)), lambda a, t: F.cross_entropy(a, t, reduction="none"),
         grads=(True, False)),
    Case("cross_entropy_soft", tensor("cross_entropy_soft", _cross_entropy_soft),
         inputs(normal(*BN), simplex(*BN)), lambda a, t: F.cross_entropy(a, t, reduction="none")),
    Case("nll_loss", tensor("nll_loss", _nll), inputs(normal(*BN), labels(6, 3)),
         lambda a, t: F.nll_loss(a, t, reduction="none"), grads=(True, False)),
    Case("layer_norm", tensor("layer_norm", _layer_norm, batch=B),
         inputs(normal(2, 3, 6), normal(6), normal(6)),
         lambda a, w, bb: F.layer_norm(a, (6,), w, bb)),
    Case("rms_norm", tensor("rms_norm", _rms_norm, batch=B), inputs(normal(2, 3, 6), normal(6)),
         lambda a, w: F.rms_norm(a, (6,), w, 1e-6)),
    Case("instance_norm", tensor("instance_norm", _instance_norm, batch=B),
         inputs(normal(2, 3, 7)), lambda a: F.instance_norm(a)),
    Case("normalize", tensor("normalize", _normalize), inputs(normal(*BN)),
         lambda a: F.normalize(a, dim=-1)),
    Case("cosine_similarity", tensor("cosine_similarity", _cosine_similarity),
         inputs(normal(*BN), normal(*BN)), lambda a, a2: F.cosine_similarity(a, a2, dim=-1),
         scaled=(0, 1)),
    Case("pairwise_distance", tensor("pairwise_distance", _pairwise_distance),
         inputs(normal(*BN), normal(*BN)), F.pairwise_distance, scaled=(0, 1)),
    Case("triplet_margin", tensor("triplet_margin", _triplet),
         inputs(normal(*BN), normal(*BN), normal(*BN)),
         lambda a, pp, nn: F.triplet_margin_loss(a, pp, nn, reduction="none"), scaled=(0, 1, 2)),
    Case("cosine_embedding", tensor("cosine_embedding", _cosine_embedding),
         inputs(normal(*BN), normal(*BN), signs(3)),
         lambda a, a2, yy: F.cosine_embedding_loss(a, a2, yy, reduction="none"),
         scaled=(0, 1), grads=(True, True, False)),
    Case("multi_margin", tensor("multi_margin", _multi_margin), inputs(normal(*BN), labels(6, 3)),
         lambda a, t: F.multi_margin_loss(a, t, reduction="none"), grads=(True, False)),
    Case("multilabel_soft_margin", tensor("multilabel_soft_margin", _multilabel_soft_margin),
         inputs(normal(*BN), lambda g: (g.uniform(size=BN) > 0.5).astype(float)),
         lambda a, t: F.multilabel_soft_margin_loss(a, t, reduction="none")),
    Case("glu", tensor("glu", _glu), inputs(normal(3, 8)), lambda a: F.glu(a, -1)),
    Case("conv1d", tensor("conv1d", _conv1d), inputs(normal(2, 3, 7), normal(4, 3, 3)),
         F.conv1d, scaled=(0,)),
    Case("conv1d_padded", tensor("conv1d_padded", _conv1d_padded, out_shape=(B, Co, L - K + 3)),
         inputs(normal(2, 3, 7), normal(4, 3, 3), normal(4)),
         lambda a, w, bb: F.conv1d(a, w, bb, padding=1)),
    Case("conv2d", tensor("conv2d", _conv2d, out_shape=(B, Co, H - K + 3, Wd - K + 3)),
         inputs(normal(2, 3, 5, 6), normal(4, 3, 3, 3), normal(4)),
         lambda a, w, bb: F.conv2d(a, w, bb, padding=1)),
    Case("attention", tensor("attention", _attention(False)),
         inputs(normal(2, 4, 3), normal(2, 4, 3), normal(2, 4, 3)),
         F.scaled_dot_product_attention),
    Case("causal_attention", tensor("causal_attention", _attention(True)),
         inputs(normal(2, 4, 3), normal(2, 4, 3), normal(2, 4, 3)),
         lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)),
    Case("linear_relu", tensor("linear_relu", _linear_relu),
         inputs(normal(3, 5), normal(4, 5), normal(4)),
         lambda a, w, bb: F.linear(F.relu(a), w, bb)),
    Case("embedding", tensor("embedding", _embedding), inputs(labels(5, 2, 3), normal(5, 4)),
         F.embedding, scaled=(1,), grads=(False, True)),
]

CASES = {case.name: case for case in ACTIVATIONS + LOSSES + TENSORS}
_OPS: dict[str, Any] = {}


def _op(name: str) -> Any:
    if name not in _OPS:
        _OPS[name] = CASES[name].make()
    return _OPS[name]


def test_at_least_forty_functional_ops():
    assert len(CASES) >= 40


# -- the checks ----------------------------------------------------------------------------


def _arrays(case: Case, dtype: type, scale: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n, a in enumerate(case.sample(rng)):
        a = np.asarray(a)
        if a.dtype.kind in "iu":
            out.append(a)
            continue
        if n in case.scaled:
            a = a * scale
        out.append(a.astype(dtype))
    return out


def _mask(case: Case, arrays: list[np.ndarray]) -> tuple[bool, ...]:
    """Which inputs torch differentiates: the case's list, else every float input."""
    return case.grads or tuple(a.dtype.kind not in "iu" for a in arrays)


def _torch(case: Case, arrays: list[np.ndarray], grad_output: np.ndarray):
    leaves = [
        torch.tensor(a.astype(np.float64) if a.dtype.kind == "f" else a, requires_grad=grad)
        for a, grad in zip(arrays, _mask(case, arrays), strict=True)
    ]
    out = case.ref(*leaves)
    out.backward(torch.tensor(grad_output, dtype=torch.float64))
    grads = [None if leaf.grad is None else leaf.grad.numpy() for leaf in leaves]
    return out.detach().numpy(), grads


#: An error below NOISE × the largest value of the whole check (output and every gradient) is
#: rounding: a gradient that is itself ~0 (a saturated softmax's at a logit of 1e3, the exact
#: value 1e-40) comes out as the rounding noise of the terms it cancels, in torch as here.
NOISE = {np.float64: 1e-12, np.float32: 1e-5}


def _largest(*arrays: np.ndarray | None) -> float:
    finite = [np.abs(a[np.isfinite(a)]) for a in arrays if a is not None]
    return max((float(np.max(a)) for a in finite if a.size), default=0.0)


def _compare(got: np.ndarray, want: np.ndarray, rtol: float, what: str, noise: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    assert np.all(np.isfinite(got[finite])), f"{what}: not finite where torch is: {got}"
    if not finite.any():
        return
    scale = float(np.max(np.abs(want[finite])))
    err = float(np.max(np.abs(got[finite] - want[finite])))
    bound = max(rtol * scale, noise)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (scale {scale:.3g})\n{got}\n{want}"


def _check(name: str, dtype: type, scale: float, rtol: float) -> None:
    case = CASES[name]
    op = _op(name)
    arrays = _arrays(case, dtype, scale)
    value = op(*arrays)
    g = np.random.default_rng(1).normal(size=np.shape(value)).astype(dtype)
    grads = op.vjp(*arrays, g)
    want, want_grads = _torch(case, arrays, g.astype(np.float64))
    assert np.asarray(value).dtype == dtype
    noise = NOISE[dtype] * _largest(want, *want_grads)
    _compare(value, want, rtol, f"{name} value", noise)
    mask = _mask(case, arrays)
    for n, (got_g, want_g, differentiated) in enumerate(zip(grads, want_grads, mask, strict=True)):
        if differentiated and want_g is not None:
            assert got_g is not None, f"{name}: no gradient for input {n}"
            _compare(got_g, want_g, rtol, f"{name} gradient {n}", noise)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_matches_torch(name):
    _check(name, np.float64, 1.0, CASES[name].rtol64)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.extreme))
def test_float64_extreme_inputs(name):
    _check(name, np.float64, 1e3, max(1e-9, CASES[name].rtol64))


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_matches_torch(name):
    _check(name, np.float32, 1.0, CASES[name].rtol32)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.extreme))
def test_float32_extreme_inputs(name):
    _check(name, np.float32, 1e2, CASES[name].rtol32)
