"""A GPT-2-style causal self-attention block, written with the public API, against torch.

Pre-LN: ``y = x + W_o·attention(LN(x))`` with per-head query/key/value projections, the
attention core written by hand in index notation — the causal mask both ways a user would
write it:

* an **index condition**: ``Piecewise((exp(score), t <= s), (0, True))`` in the numerator and
  in the sum over keys (the max shift respects it: only unmasked scores set it);
* a **triangular sum**: ``Sum(..., (t, 0, s))`` (the loops run over the triangle).

The loss ``Σ y·G`` and the gradient of every parameter and of the input are compared with a
float64 torch twin (``scaled_dot_product_attention(is_causal=True)``) to 1e-10; the core is
finite, and agrees with torch, with a masked-out score of ±1e3 (float64) and ±1e2 (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch

import symgrad as sg
from symgrad.nn import Parameter, Tape

b, s, t, u, h, e, d = sp.symbols("b s t u h e d", integer=True)
B, S, H, M = sp.symbols("B S H M", integer=True, positive=True)
Q, K, V = (sp.IndexedBase(n, shape=(B, S, H, M)) for n in "QKV")


def _score(key: sp.Symbol) -> sp.Expr:
    return sp.Sum(Q[b, s, h, d] * K[b, key, h, d], (d, 0, M - 1)) / sp.sqrt(M)


def _by_condition() -> sp.Expr:
    def w(key: sp.Symbol) -> sp.Expr:
        return sp.Piecewise((sp.exp(_score(key)), key <= s), (0, True))

    return sp.Sum(w(t) * V[b, t, h, e], (t, 0, S - 1)) / sp.Sum(w(u), (u, 0, S - 1))


def _by_triangle() -> sp.Expr:
    num = sp.Sum(sp.exp(_score(t)) * V[b, t, h, e], (t, 0, s))
    return num / sp.Sum(sp.exp(_score(u)), (u, 0, s))


FORMS = {"condition": _by_condition, "triangle": _by_triangle}
_CORES: dict[str, sg.TensorOp] = {}


def core(form: str) -> sg.TensorOp:
    if form not in _CORES:
        _CORES[form] = sg.tensor_op(
            FORMS[form](), out=(b, s, h, e), inputs=[Q, K, V], name=f"causal_core_{form}"
        )
    return _CORES[form]


def _torch_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, S, H, M) in, (B, S, H, M) out: torch's causal attention per head."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return out.transpose(1, 2)


# -- the block ------------------------------------------------------------------------------

N_, H_, M_, B_, S_ = 8, 2, 4, 2, 5


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def w(*shape: int) -> np.ndarray:
        return rng.normal(size=shape) / np.sqrt(shape[-1])

    return {
        "ln_w": 1 + 0.1 * rng.normal(size=N_),
        "ln_b": 0.1 * rng.normal(size=N_),
        **{f"W{n}": w(H_, M_, N_) for n in "qkv"},
        **{f"c{n}": 0.1 * rng.normal(size=(H_, M_)) for n in "qkv"},
        "Wo": w(N_, H_, M_),
        "co": 0.1 * rng.normal(size=N_),
    }


def _symgrad_block(form: str, x: np.ndarray, params: dict, grad_y: np.ndarray):
    """Loss Σ y·G and the gradients (parameters, then the input) by the Tape."""
    p = {k: Parameter(v.copy()) for k, v in params.items()}
    tape = Tape()
    a = tape.apply(sg.builtin("layer_norm"), x, p["ln_w"], p["ln_b"])
    proj = sg.builtin("head_projection")
    q, k, v = (tape.apply(proj, a, p[f"W{n}"], p[f"c{n}"]) for n in "qkv")
    ctx = tape.apply(core(form), q, k, v)
    attended = tape.apply(sg.builtin("head_merge"), ctx, p["Wo"], p["co"])
    y = tape.apply(sg.builtin("add"), x, attended)
    (grad_x,) = tape.backward(y, grad_y, wrt=(x,))
    return float(np.sum(y * grad_y)), {k: v.grad for k, v in p.items()}, grad_x


def _torch_block(x: np.ndarray, params: dict, grad_y: np.ndarray):
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    a = torch.nn.functional.layer_norm(tx, (N_,), p["ln_w"], p["ln_b"])

    def project(n: str) -> torch.Tensor:
        w = p[f"W{n}"]
        return torch.nn.functional.linear(a, w.flatten(0, 1), p[f"c{n}"].flatten()).unflatten(
            -1, (H_, M_)
        )

    ctx = _torch_core(project("q"), project("k"), project("v"))
    y = tx + torch.nn.functional.linear(ctx.flatten(-2), p["Wo"].flatten(1), p["co"])
    loss = (y * torch.tensor(grad_y)).sum()
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() for k, v in p.items()}, tx.grad.numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_block_loss_and_every_gradient_match_torch(form):
    rng = np.random.default_rng(0)
    params = _params(rng)
    x = rng.normal(size=(B_, S_, N_))
    grad_y = rng.normal(size=(B_, S_, N_))
    loss, grads, grad_x = _symgrad_block(form, x, params, grad_y)
    t_loss, t_grads, t_grad_x = _torch_block(x, params, grad_y)
    assert loss == pytest.approx(t_loss, rel=1e-12)
    # the key bias's gradient is exactly 0 (a softmax does not change when every score of a
    # row moves by the same q·c_k): both sides return rounding noise of the block's scale
    noise = 1e-12 * max(np.max(np.abs(g)) for g in [*t_grads.values(), t_grad_x])
    for name in params:
        err = np.max(np.abs(grads[name] - t_grads[name]))
        assert err <= max(1e-10 * np.max(np.abs(t_grads[name])), noise), name
    assert _rel(grad_x, t_grad_x) < 1e-10


def _masked_out_extreme(dtype: type, big: float):
    """Q, K, V whose score of query 0 on key 1 (masked: a future key) is ``big``, and of query
    2 on key 0 (allowed) is ``-big``: one head, one batch element."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 3, 1, 2))
    k = rng.normal(size=(1, 3, 1, 2))
    v = rng.normal(size=(1, 3, 1, 2))
    k[0, 1, 0] = [0.0, 1.0]
    q[0, 0, 0] = [0.0, big * np.sqrt(2)]  # score(0, 1) = big / √M · √M = big
    k[0, 0, 0] = [1.0, 0.0]
    q[0, 2, 0] = [-big * np.sqrt(2), 0.0]  # score(2, 0) = -big
    return [a.astype(dtype) for a in (q, k, v)]


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize(
    ("dtype", "big", "rtol"), [(np.float64, 1e3, 1e-10), (np.float32, 1e2, 1e-3)]
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_core_is_finite_with_an_extreme_masked_out_score(form, dtype, big, rtol, sign):
    """Finite and right at a score of ±1e3 (float64) or ±1e2 (float32).  In float32 the
    derived K gradient of this user-written form is within 2e-4 of the float64 result where
    torch's float32 SDPA is within 2e-7: its quotient-rule form (exp(s)·Σ…/Σ² − …) cancels
    where torch's p·(dp − Σ p·dp) does not — a known loss of digits, not a wrong result."""
    q, k, v = _masked_out_extreme(dtype, sign * big)
    op = core(form)
    y = op(q, k, v)
    g = np.random.default_rng(4).normal(size=y.shape).astype(dtype)
    grads = op.vjp(q, k, v, g)
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (q, k, v)]
    ref = _torch_core(*leaves)
    ref.backward(torch.tensor(g.astype(np.float64)))
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(gr)) for gr in grads)
    assert _rel(y, ref.detach().numpy()) < rtol
    for got, leaf in zip(grads, leaves, strict=True):
        assert _rel(got, leaf.grad.numpy()) < rtol
    # query 0 sees key 0 only: its weights are [1, 0, 0] whatever the masked score
    np.testing.assert_allclose(y[0, 0, 0], v[0, 0, 0], rtol=rtol)


def test_triangular_form_loops_over_the_triangle():
    source = core("triangle").source
    assert "range(0, s_s + 1)" in source  # the key loop of query s (user names mangled)


@pytest.mark.parametrize("name", ["causal_softmax", "causal_masked_softmax"])
def test_causal_builtins_ignore_a_masked_out_score_of_1e3(name):
    scores = np.array([[0.5, 1e3, -1e3], [1e3, -1e3, 1e3], [0.0, 1.0, 2.0]])
    if name == "causal_softmax":  # any leading axes
        args = [np.broadcast_to(scores, (2, 2, 3, 3)).copy()]
    else:  # (B, H, S, S) scores and a (B, S) additive padding mask
        args = [np.broadcast_to(scores, (2, 2, 3, 3)).copy(), np.zeros((2, 3))]
    op = sg.builtin(name)
    y = op(*args)
    want = torch.softmax(
        torch.tensor(args[0]).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -np.inf), -1
    ).numpy()
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(y[0, 0, 0], [1.0, 0.0, 0.0])
    grads = op.vjp(*args, np.ones_like(y))
    assert np.all(np.isfinite(grads[0]))
