"""Every elementwise built-in against torch.autograd (and mpmath where torch is not exact).

The registry ``symgrad.BUILTINS`` drives everything: each entry's ``torch_ref`` is replayed in
torch on the same inputs, drawn from the entry's declared ``domain``; its ``edges`` are the
extreme values of the first input.  A new built-in joins every test here automatically.

Tolerances (per element, ``|got - want| <= rtol·|want| + atol``):

* float64: ``rtol = 1e-10`` and ``atol = 1e-12 × max|want|`` (a value that cancels to far below
  the array's scale — ``1 - tanh(x)²`` at ``|x| = 30`` — is only accurate in absolute terms, in
  torch's formula as in any other);
* float32: ``rtol = 1e-5``, ``atol = 1e-6 × max|want|`` against torch in float64 on the same
  (float32) inputs: float32's unit roundoff is 6e-8, and a kernel's few dozen roundings — plus
  the storing of float64 intermediates — stay well inside 1e-5;
* mpmath at the edges: ``rtol = 1e-10``, ``atol = 1e-14 × max(1, |inputs|)``: a float64 formula
  that subtracts terms of size ``|x|`` keeps only ``eps·|x|`` absolute accuracy (torch's too).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch

import symgrad as sg
from symgrad.builtins import Builtin
from symgrad.runtime.elementwise import ElementwiseOp

NAMES = sorted(sg.BUILTINS)
NON_DEFAULT = [
    ("leaky_relu", {"negative_slope": 0.2}),
    ("elu", {"alpha": 0.5}),
    ("softplus", {"beta": 2.0, "threshold": 5.0}),
    ("huber", {"delta": 0.5}),
    ("hardtanh", {"min_val": -2.0, "max_val": 3.0}),
]
CASES = [(name, {}) for name in NAMES] + NON_DEFAULT
CASE_IDS = [name + "".join(f"-{k}={v:g}" for k, v in params.items()) for name, params in CASES]
TWO_INPUT = [n for n in NAMES if len(sg.BUILTINS[n].inputs) == 2]
ONE_INPUT = [n for n in NAMES if len(sg.BUILTINS[n].inputs) == 1]
#: two-input built-ins that are not losses (reduced by .sum()/.mean() of their output)
NOT_LOSSES = {"add"}
LOSSES = {
    "mse": lambda t, a, b, r: t.nn.functional.mse_loss(a, b, reduction=r),
    "l1": lambda t, a, b, r: t.nn.functional.l1_loss(a, b, reduction=r),
    "huber": lambda t, a, b, r, delta: t.nn.functional.huber_loss(a, b, reduction=r, delta=delta),
    "bce": lambda t, a, b, r: t.nn.functional.binary_cross_entropy(a, b, reduction=r),
    "bce_with_logits": lambda t, a, b, r: t.nn.functional.binary_cross_entropy_with_logits(
        a, b, reduction=r
    ),
}

F64 = {"rtol": 1e-10, "atol_scale": 1e-12}
F32 = {"rtol": 1e-5, "atol_scale": 1e-6}
#: Values of the second input (targets) the edges are combined with.
TARGET_EDGES = (0.0, 0.3, 1.0)


def _kinks(name: str, params: dict[str, float], y: float) -> list[float]:
    """Points of the first input where the formula switches branch (besides the edges)."""
    if name == "hardtanh":
        return [params["min_val"], params["max_val"]]
    if name == "softplus":
        return [params["threshold"] / params["beta"]]
    if name == "l1":
        return [y]
    if name == "huber":
        return [y, y - params["delta"], y + params["delta"]]
    return []


def test_tables_in_this_file_match_the_registry():
    """The kink table reads the registry's parameter names, and every two-input built-in has
    its torch loss (for the reduced-loss test) unless it is listed as not a loss: a renamed or
    new entry fails here first."""
    assert set(sg.BUILTINS["hardtanh"].params) == {"min_val", "max_val"}
    assert set(sg.BUILTINS["softplus"].params) == {"beta", "threshold"}
    assert set(sg.BUILTINS["huber"].params) == {"delta"}
    assert set(LOSSES) == set(TWO_INPUT) - NOT_LOSSES


# -- helpers ---------------------------------------------------------------------------------


_OPS: dict[tuple[str, tuple[tuple[str, float], ...]], ElementwiseOp] = {}


def get_op(name: str, params: dict[str, float]) -> ElementwiseOp:
    key = (name, tuple(sorted(params.items())))
    if key not in _OPS:
        op = sg.builtin(name, **params)
        assert isinstance(op, ElementwiseOp)
        _OPS[key] = op
    return _OPS[key]


def all_params(entry: Builtin, params: dict[str, float]) -> dict[str, float]:
    return {**entry.params, **params}


def sample(entry: Builtin, shape: tuple[int, ...], rng: np.random.Generator,
           margin: float = 0.0) -> list[np.ndarray]:
    """Inputs drawn from the entry's domains (uniform domains shrunk by ``margin``)."""
    arrays = []
    for d in entry.domain:
        if d.kind == "uniform":
            arrays.append(rng.uniform(d.low + margin, d.high - margin, shape))
        else:
            arrays.append(rng.normal(size=shape) * d.scale)
    return arrays


def torch_forward(entry: Builtin, params: dict[str, float],
                  arrays: list[np.ndarray]) -> torch.Tensor:
    """torch's float64 forward (inputs broadcast), without autograd."""
    tensors = torch.broadcast_tensors(
        *(torch.tensor(np.array(a, order="C"), dtype=torch.float64) for a in arrays)
    )
    with torch.no_grad():
        return entry.torch_ref(torch, *tensors, **all_params(entry, params))


def torch_value_and_grads(
    entry: Builtin, params: dict[str, float], arrays: list[np.ndarray], grad_output: object
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """torch's forward and VJP (None for inputs torch cannot differentiate).

    Inputs are broadcast in torch, so autograd sums each gradient back to its input's shape.
    """
    leaves = [
        torch.tensor(np.array(a, order="C"), dtype=torch.float64, requires_grad=flag)
        for a, flag in zip(arrays, entry.torch_grads, strict=True)
    ]
    out = entry.torch_ref(torch, *torch.broadcast_tensors(*leaves), **all_params(entry, params))
    g = torch.tensor(np.array(grad_output, order="C"), dtype=torch.float64).expand(out.shape)
    out.backward(g)
    grads = [leaf.grad.numpy() if flag else None
             for leaf, flag in zip(leaves, entry.torch_grads, strict=True)]
    return out.detach().numpy(), grads


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, atol_scale: float,
                 what: str) -> None:
    """``|got - want| <= rtol·|want| + atol_scale·max|want|`` elementwise, shapes equal."""
    got, want = np.asarray(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    scale = float(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol_scale * scale,
                               err_msg=what)


def fd_gradient(f: Callable[[np.ndarray], np.ndarray], v: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Fourth-order central difference of an elementwise ``f`` (error O(h⁴) + O(eps·f/h))."""
    return (f(v - 2 * h) - 8 * f(v - h) + 8 * f(v + h) - f(v + 2 * h)) / (12 * h)


def check_against_torch(name: str, params: dict[str, float], arrays: list[np.ndarray],
                        grad_output: np.ndarray, tol: dict[str, float], what: str,
                        dtype: type = np.float64) -> None:
    """Forward and VJP at ``arrays`` (cast to ``dtype``) vs torch in float64 on the same values."""
    entry, op = sg.BUILTINS[name], get_op(name, params)
    cast = [np.asarray(a, dtype=dtype) for a in arrays]
    g = np.asarray(grad_output, dtype=dtype)
    ref_value, ref_grads = torch_value_and_grads(entry, params, cast, g)
    value = op(*cast)
    grads = op.vjp(*cast, g)
    assert value.dtype == dtype
    assert_close(value, ref_value, what=f"{what}: forward", **tol)
    assert len(grads) == len(cast)
    for k, (ours, ref, a) in enumerate(zip(grads, ref_grads, cast, strict=True)):
        assert ours.dtype == dtype and ours.shape == a.shape, (what, k, ours.dtype, ours.shape)
        if ref is not None:
            assert_close(ours, ref, what=f"{what}: gradient of input {k}", **tol)


# -- float64, random inputs -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_float64_random_inputs_match_torch(name, params):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    entry = sg.BUILTINS[name]
    arrays = sample(entry, (40, 50), rng)
    check_against_torch(name, params, arrays, rng.normal(size=(40, 50)), F64, name)


FD_CASES = [c for c in CASES if not all(sg.BUILTINS[c[0]].torch_grads)]


@pytest.mark.parametrize(("name", "params"), FD_CASES, ids=[c[0] for c in FD_CASES])
def test_gradients_torch_cannot_take_match_finite_differences(name, params):
    """torch has no gradient for bce's target: a 4th-order central difference of torch's forward.

    With ``h = 1e-3`` the truncation error is ~1e-12·f⁽⁵⁾ and the rounding error ~1e-13·|f|,
    hence ``rtol = 1e-8``.
    """
    entry = sg.BUILTINS[name]
    missing = [k for k, flag in enumerate(entry.torch_grads) if not flag]
    rng = np.random.default_rng(7)
    h = 1e-3
    arrays = sample(entry, (200,), rng, margin=2 * h)
    g = rng.normal(size=200)
    grads = get_op(name, params).vjp(*arrays, g)
    for k in missing:
        def f(v, k=k):
            moved = [v if j == k else a for j, a in enumerate(arrays)]
            return torch_forward(entry, params, moved).numpy()

        want = g * fd_gradient(f, arrays[k], np.full_like(arrays[k], h))
        assert_close(grads[k], want, rtol=1e-8, atol_scale=1e-8, what=f"{name} input {k}")


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_value_and_vjp_equals_forward_and_vjp(name, params):
    """The fused kernel computes what the separate ones do (up to a few ulp of CSE order)."""
    rng = np.random.default_rng(3)
    entry, op = sg.BUILTINS[name], get_op(name, params)
    arrays = sample(entry, (300,), rng)
    g = rng.normal(size=300)
    value, grads = op.value_and_vjp(*arrays, grad_output=g)
    np.testing.assert_allclose(value, op(*arrays), rtol=1e-14, atol=1e-300)
    for ours, separate in zip(grads, op.vjp(*arrays, g), strict=True):
        np.testing.assert_allclose(ours, separate, rtol=1e-14, atol=1e-300)
    # the default cotangent is 1
    _, ones = op.value_and_vjp(*arrays)
    for ours, separate in zip(ones, op.vjp(*arrays, np.ones(300)), strict=True):
        np.testing.assert_allclose(ours, separate, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_reduced_value_and_vjp_matches_torch(name, params, reduction):
    """``reduction='sum'/'mean'``: the reduced value and the gradient of ``0.75 × it``.

    The reference is torch's own reduced loss for the losses, ``.sum()``/``.mean()`` of the
    elementwise output otherwise.  A sum of terms of both signs is accurate to ``eps·Σ|terms|``,
    which sets the value's absolute tolerance.
    """
    rng = np.random.default_rng(11)
    entry, op = sg.BUILTINS[name], get_op(name, params)
    for dtype, tol in ((np.float64, F64), (np.float32, F32)):
        arrays = [a.astype(dtype) for a in sample(entry, (30, 17), rng)]
        value, grads = op.value_and_vjp(*arrays, grad_output=0.75, reduction=reduction)
        assert value.shape == () and value.dtype == dtype
        leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=flag)
                  for a, flag in zip(arrays, entry.torch_grads, strict=True)]
        p = all_params(entry, params)
        if name in LOSSES:
            reduced = LOSSES[name](torch, *leaves, reduction, **p)
        else:
            out = entry.torch_ref(torch, *leaves, **p)
            reduced = out.sum() if reduction == "sum" else out.mean()
        (0.75 * reduced).backward()
        terms = torch_forward(entry, params, arrays).abs().sum().item()
        if reduction == "mean":
            terms /= arrays[0].size
        np.testing.assert_allclose(float(value), reduced.item(), rtol=tol["rtol"],
                                   atol=tol["atol_scale"] * terms)
        # gradients: torch's where it has them, the unreduced VJP of 0.75 (or 0.75/N) elsewhere
        scale = 0.75 / arrays[0].size if reduction == "mean" else 0.75
        unreduced = op.vjp(*arrays, np.full(arrays[0].shape, scale, dtype=dtype))
        for ours, leaf, plain in zip(grads, leaves, unreduced, strict=True):
            assert ours.dtype == dtype
            want = plain if leaf.grad is None else leaf.grad.numpy()
            assert_close(ours, want, what=f"{name} {reduction} {dtype.__name__}", **tol)


# -- edges ----------------------------------------------------------------------------------


def edge_grid(name: str, params: dict[str, float], dtype: type) -> list[np.ndarray]:
    """The entry's edges (±1e3 clipped to ±1e2 in float32) and kinks, with target edges."""
    entry = sg.BUILTINS[name]
    limit = 1e3 if dtype == np.float64 else 1e2
    p = all_params(entry, params)
    if len(entry.inputs) == 1:
        xs = sorted({*entry.edges, *_kinks(name, p, 0.0)})
        return [np.clip(np.array(xs), -limit, limit).astype(dtype)]
    xs, ys = [], []
    for y in TARGET_EDGES:
        for x in sorted({*entry.edges, *_kinks(name, p, y)}):
            xs.append(x)
            ys.append(y)
    return [np.clip(np.array(v), -limit, limit).astype(dtype) for v in (xs, ys)]


def torch_exact_mask(name: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Where torch's backward is the exact gradient of the formula.

    torch's bce backward is ``(p - y) / max(p(1-p), 1e-12)``: not the derivative of the clamped
    logs where ``p(1-p) <= 1e-12`` or a log is clamped (README, "Differences from torch").
    """
    if name != "bce":
        return np.ones(arrays[0].shape, dtype=bool)
    p = arrays[0].astype(np.float64)
    with np.errstate(divide="ignore"):
        unclamped = (np.log(p) > -100) & (np.log1p(-p) > -100)
    return unclamped & (p * (1 - p) > 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_edges_finite_and_match_torch(name, params, dtype):
    """At the edges and kinks: no NaN or inf, and torch's value and gradients where exact."""
    entry, op = sg.BUILTINS[name], get_op(name, params)
    arrays = edge_grid(name, params, dtype)
    g = np.ones(arrays[0].shape, dtype=dtype)
    value = op(*arrays)
    grads = op.vjp(*arrays, g)
    fused, fused_grads = op.value_and_vjp(*arrays, grad_output=g)
    # finite everywhere (stronger than "where torch is finite": torch is not always)
    for what, ours in [("forward", value), ("fused forward", fused),
                       *((f"grad {k}", gr) for k, gr in enumerate(grads)),
                       *((f"fused grad {k}", gr) for k, gr in enumerate(fused_grads))]:
        finite = np.isfinite(ours)
        assert finite.all(), f"{name} {what} not finite at {[a[~finite] for a in arrays]}"
    tol = F64 if dtype == np.float64 else F32
    ref_value, ref_grads = torch_value_and_grads(entry, params, arrays, g)
    assert_close(value, ref_value, what=f"{name} forward at the edges", **tol)
    exact = torch_exact_mask(name, arrays)
    for k, (ours, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        if ref is not None:
            assert_close(ours[exact], ref[exact], what=f"{name} gradient {k} at the edges", **tol)


def test_bce_edges_include_points_where_torch_differs():
    """The bce edge test above does exclude points (else the README's caveat is untested)."""
    arrays = edge_grid("bce", {}, np.float64)
    mask = torch_exact_mask("bce", arrays)
    assert mask.any() and not mask.all()


def _mp_function(entry: Builtin, params: dict[str, float]) -> Callable[..., mpmath.mpf]:
    """The entry's formula as written (no symgrad rewriting), evaluated by mpmath."""
    formula, constants = entry.expr(**params)
    symbols = list(constants)
    f = sp.lambdify([*entry.inputs, *symbols], formula, "mpmath")
    values = [mpmath.mpf(float(constants[s])) for s in symbols]
    return lambda *args: f(*args, *values)


def _mp_reference(f: Callable[..., mpmath.mpf], point: list[float]
                  ) -> tuple[mpmath.mpf | None, list[mpmath.mpf | None]]:
    """Value and partial derivatives at ``point`` (None: kink, or outside the domain).

    The working precision grows with |x| so that ``1 - 1/(1+exp(-x))`` and ``1 + erf(x)`` keep
    their digits; derivatives are central differences at that precision with a step of a third
    of its digits, and a point whose one-sided derivatives differ is a kink (not compared).
    """
    size = max(abs(v) for v in point)
    with mpmath.workdps(60 + int(min(size * size / 4, 1000))):
        args = [mpmath.mpf(v) for v in point]

        def real(v: object) -> mpmath.mpf | None:
            """A finite real number (a Piecewise branch may be a plain int), else None."""
            if isinstance(v, bool) or not isinstance(v, (int, float, mpmath.mpf)):
                return None
            return mpmath.mpf(v) if mpmath.isfinite(v) else None

        try:
            value = real(f(*args))
        except (TypeError, ValueError, ZeroDivisionError):
            return None, [None] * len(args)
        partials: list[mpmath.mpf | None] = []
        for k, v in enumerate(args):
            def along(t, k=k):
                return f(*args[:k], t, *args[k + 1:])

            h = mpmath.mpf(10) ** (-(mpmath.mp.dps // 3)) * (abs(v) if v != 0 else 1)
            try:
                left = real(mpmath.diff(along, v, h=h, direction=-1))
                right = real(mpmath.diff(along, v, h=h, direction=1))
                central = real(mpmath.diff(along, v, h=h))
            except (TypeError, ValueError, ZeroDivisionError):
                partials.append(None)
                continue
            if left is None or right is None or central is None:
                partials.append(None)
            elif abs(left - right) > 1e-15 * max(1, abs(left), abs(right)):
                partials.append(None)  # a kink: the derivative there is a convention (torch's)
            else:
                partials.append(central)
        return value, partials


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_edges_float64_match_mpmath(name, params):
    """float64 edges against the formula evaluated in high precision (where torch rounds:
    its sigmoid backward at x = 30 is ``(1 - y)·y`` and keeps 3 digits; ours keeps all)."""
    entry, op = sg.BUILTINS[name], get_op(name, params)
    arrays = edge_grid(name, params, np.float64)
    value = op(*arrays)
    grads = op.vjp(*arrays, np.ones(arrays[0].shape))
    f = _mp_function(entry, params)
    values = 0
    for i in range(arrays[0].size):
        point = [float(a[i]) for a in arrays]
        ref, partials = _mp_reference(f, point)
        atol = 1e-14 * max(1.0, *map(abs, point))
        for what, ours, want in [("value", value[i], ref),
                                 *((f"d/d{s}", grads[k][i], partials[k])
                                   for k, s in enumerate(entry.inputs))]:
            if want is None:
                continue
            values += what == "value"
            err = abs(mpmath.mpf(float(ours)) - want)
            assert err <= 1e-10 * abs(want) + atol, (
                f"{name} {what} at {point}: {float(ours)!r}, mpmath {mpmath.nstr(want, 20)}"
            )
    assert values == arrays[0].size  # every value was checked (derivatives: off kinks)


@pytest.mark.parametrize(("name", "x"), [("sigmoid", 30.0), ("sigmoid", -30.0),
                                         ("softplus", -30.0), ("silu", -30.0),
                                         ("bce_with_logits", -30.0), ("elu", -30.0)])
def test_stable_gradients_keep_relative_accuracy_where_torch_loses_it(name, x):
    """Derivatives of size ~1e-13 that torch computes as a difference of two rounded numbers
    come out of symgrad's stabilized form with full relative accuracy."""
    entry, op = sg.BUILTINS[name], get_op(name, {})
    point = [x, 0.0] if len(entry.inputs) == 2 else [x]
    _, partials = _mp_reference(_mp_function(entry, {}), point)
    ours = op.vjp(*(np.array([v]) for v in point), np.ones(1))[0][0]
    assert abs(partials[0]) < 1e-10  # the regime where absolute tolerances would hide errors
    assert abs(mpmath.mpf(float(ours)) - partials[0]) <= 1e-12 * abs(partials[0])


_t = sp.Symbol("t", real=True)
TEXTBOOK_FORMS = {
    "tanh_by_exp": (sp.exp(2 * _t) - 1) / (sp.exp(2 * _t) + 1),
    "tanh_by_sinh_cosh": (sp.exp(_t) - sp.exp(-_t)) / (sp.exp(_t) + sp.exp(-_t)),
    "log_cosh": sp.log(sp.cosh(_t)),
}


@pytest.mark.parametrize("name", TEXTBOOK_FORMS)
def test_textbook_forms_that_overflow_as_written_are_exact_everywhere(name):
    """A user's formula written as in a textbook, whose exps overflow (inf/inf, log of inf)
    as written: values within 1e-12 of 60-digit mpmath from 1e-9 to ±800, and
    derivatives within 1e-12 or 1e-16 (1 − tanh² is 0 where it is below 1e-16, as torch's);
    float32 close to float64."""
    formula = TEXTBOOK_FORMS[name]
    op = sg.elementwise(formula, inputs=[_t], name=f"textbook_{name}")
    f = sp.lambdify(_t, formula, "mpmath")
    df = sp.lambdify(_t, sp.diff(formula, _t), "mpmath")
    xs = np.array([-800.0, -90.0, -20.0, -1.5, -1e-9, 0.0, 1e-9, 0.3, 5.0, 90.0, 800.0])
    value, (grad,) = op(xs), op.vjp(xs, np.ones_like(xs))
    with mpmath.workdps(60):
        for x, v, g in zip(xs, value, grad, strict=True):
            point = mpmath.mpf(x)
            for what, ours, want, atol in [("value", v, f(point), 1e-300),
                                           ("d/dt", g, df(point), 1e-16)]:
                assert abs(mpmath.mpf(float(ours)) - want) <= 1e-12 * abs(want) + atol, (
                    f"{name} {what} at {x}: {ours!r}, mpmath {mpmath.nstr(want, 20)}"
                )
    low = op(xs.astype(np.float32)), op.vjp(xs.astype(np.float32), np.ones(xs.size, np.float32))[0]
    for ours, want in zip(low, (value, grad), strict=True):
        np.testing.assert_allclose(ours, want, rtol=2e-6, atol=1e-6)  # 1 - tanh² in float32


def test_bce_with_logits_small_loss_keeps_relative_accuracy():
    """At x = 30, y = 1 the loss is log1p(e^-30) ≈ 9.4e-14: the printer adds max(0, x) - x·y
    (which cancel exactly) before the log1p term, so it keeps every digit."""
    entry, op = sg.BUILTINS["bce_with_logits"], get_op("bce_with_logits", {})
    ref, _ = _mp_reference(_mp_function(entry, {}), [30.0, 1.0])
    ours = op(np.array([30.0]), np.array([1.0]))[0]
    assert abs(mpmath.mpf(float(ours)) - ref) <= 1e-10 * abs(ref)


# -- float32 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_float32_random_inputs_match_torch(name, params):
    rng = np.random.default_rng(5)
    entry = sg.BUILTINS[name]
    arrays = sample(entry, (1000,), rng)
    check_against_torch(name, params, arrays, rng.normal(size=1000), F32, f"{name} float32",
                        dtype=np.float32)


# -- shapes ---------------------------------------------------------------------------------


SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_shapes(name, shape):
    rng = np.random.default_rng(1)
    entry = sg.BUILTINS[name]
    arrays = sample(entry, shape, rng)
    g = np.asarray(rng.normal(size=shape))
    check_against_torch(name, {}, arrays, g, F64, f"{name} shape {shape}")
    value, grads = get_op(name, {}).value_and_vjp(*arrays, grad_output=g)
    assert value.shape == shape and all(gr.shape == shape for gr in grads)


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name):
    """Strided views and transposes are read correctly (the wrapper copies them)."""
    rng = np.random.default_rng(2)
    entry = sg.BUILTINS[name]
    base = sample(entry, (6, 10), rng)
    views = [a[:, ::2] if k == 0 else a.T.copy().T[:, 1::2] for k, a in enumerate(base)]
    assert not views[0].flags.c_contiguous
    g = rng.normal(size=(6, 5))[::-1]
    check_against_torch(name, {}, views, g, F64, f"{name} strided")
    transposed = [a.T for a in base]
    check_against_torch(name, {}, transposed, rng.normal(size=(10, 6)), F64, f"{name} .T")


@pytest.mark.parametrize(
    "shapes", [((4, 1, 3), (5, 3)), ((), (2, 3)), ((2, 3), (1,)), ((2, 1), (1, 3))], ids=str
)
@pytest.mark.parametrize("name", TWO_INPUT)
def test_broadcasting_sums_gradients_back(name, shapes):
    """Inputs broadcast like NumPy; each gradient is summed back to its input's shape."""
    rng = np.random.default_rng(4)
    entry = sg.BUILTINS[name]
    arrays = [sample(entry, shape, rng)[k] for k, shape in enumerate(shapes)]
    out_shape = np.broadcast_shapes(*shapes)
    check_against_torch(name, {}, arrays, rng.normal(size=out_shape), F64, f"{name} {shapes}")
    _, grads = get_op(name, {}).value_and_vjp(*arrays, grad_output=1.0, reduction="sum")
    assert [gr.shape for gr in grads] == [tuple(s) for s in shapes]
    assert all(isinstance(gr, np.ndarray) for gr in grads)  # 0-d too, not a NumPy scalar


@pytest.mark.parametrize("name", NAMES)
def test_scalar_grad_output_broadcasts(name):
    rng = np.random.default_rng(6)
    entry, op = sg.BUILTINS[name], get_op(name, {})
    arrays = sample(entry, (4, 5), rng)
    for ours, full in zip(op.vjp(*arrays, 0.5), op.vjp(*arrays, np.full((4, 5), 0.5)),
                          strict=True):
        np.testing.assert_array_equal(ours, full)


def test_python_scalars_and_lists_take_the_arrays_dtype():
    op = get_op("mse", {})
    x = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    value = op(x, 1)
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, (x - np.float32(1)) ** 2)
    a, b = [1, 2], [0.5, 0.0]
    np.testing.assert_array_equal(op(a, b), (np.array(a, dtype=np.float64) - b) ** 2)
    assert op(3.0, 1.0).shape == () and float(op(3.0, 1.0)) == (3.0 - 1.0) ** 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_scalars_keep_their_dtype(dtype):
    """``np.float32(2.0)`` is a float32 input: float32 in, float32 out (values and gradients)."""
    op = get_op("sigmoid", {})
    value = op(dtype(2.0))
    (grad,) = op.vjp(dtype(2.0), 1.0)
    assert value.shape == () and value.dtype == dtype and grad.dtype == dtype
    assert value == op(np.array([2.0], dtype=dtype))[0]
