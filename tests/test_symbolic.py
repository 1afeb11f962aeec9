"""The symbolic stages alone: spec, stabilization rules, primitives, derivation, simplification.

Nothing here compiles a kernel, and this module imports neither numba nor torch (the symbolic
stages must not either: see ``test_symbolic_stages_import_neither_numba_nor_torch``).  Two
expressions are "equal" when their difference, written with ``exp``/``log`` only, vanishes at
several points to 40 digits (mpmath, 60-digit working precision).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import mpmath
import pytest
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from symgrad.builtins import BUILTINS
from symgrad.symbolic import simplify as simplify_module
from symgrad.symbolic.derive import derive_elementwise, prepare
from symgrad.symbolic.functions import logcosh, sigmoid, softplus, xlogy
from symgrad.symbolic.simplify import bounded_simplify
from symgrad.symbolic.spec import elementwise_spec
from symgrad.symbolic.stabilize import RULES, canonicalize, stabilize

a, b, x, y, z = sp.symbols("a b x y z", real=True)
POINTS = [-37.5, -3.25, -0.5, 0.0, 0.125, 1.75, 12.0, 41.0]


def elementary(expr: sp.Expr) -> sp.Expr:
    """``expr`` with symgrad's primitives and log1p/expm1 replaced by their definitions."""
    return (
        expr.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u)))
        .replace(softplus, lambda u: sp.log(1 + sp.exp(u)))
        .replace(logcosh, lambda u: sp.log(sp.cosh(u)))
        .replace(log1p, lambda u: sp.log(1 + u))
        .replace(expm1, lambda u: sp.exp(u) - 1)
        .replace(xlogy, lambda u, v: sp.Piecewise((0, sp.Eq(u, 0)), (u * sp.log(v), True)))
    )


def assert_equal_everywhere(lhs: sp.Expr, rhs: sp.Expr, points=POINTS, symbols=(a, b)) -> None:
    """``lhs == rhs`` at every combination of ``points`` (40 digits; 1/x-type poles skipped,
    and points where ``lhs`` itself is undefined: ``0·log(0)``, which xlogy defines as 0)."""
    f = sp.lambdify(symbols, elementary(lhs) - elementary(rhs), "mpmath")
    g = sp.lambdify(symbols, elementary(rhs), "mpmath")
    h = sp.lambdify(symbols, elementary(lhs), "mpmath")
    checked = 0
    with mpmath.workdps(60):
        for p in points:
            for q in points if len(symbols) > 1 else [None]:
                args = [mpmath.mpf(p)] + ([mpmath.mpf(q)] if q is not None else [])
                try:
                    diff, scale = f(*args), g(*args)
                    if mpmath.isnan(h(*args)):
                        continue
                except ZeroDivisionError:
                    continue
                assert abs(diff) <= mpmath.mpf(10) ** -40 * max(1, abs(scale)), (lhs, rhs, args)
                checked += 1
    assert checked >= len(points)


def test_symbolic_stages_import_neither_numba_nor_torch():
    code = textwrap.dedent(
        """
        import sys
        import symgrad.builtins, symgrad.symbolic.derive, symgrad.symbolic.functions
        import symgrad.symbolic.simplify, symgrad.symbolic.spec, symgrad.symbolic.stabilize
        from symgrad.symbolic.derive import derive_elementwise
        from symgrad.symbolic.spec import elementwise_spec
        entry = symgrad.builtins.BUILTINS["bce_with_logits"]
        formula, constants = entry.expr()
        derive_elementwise(elementwise_spec(formula, entry.inputs, "probe", constants))
        print(sorted(m for m in ("numba", "torch", "llvmlite") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # nor does this test module (it runs in the same process as the rest of the suite, so
    # only its own imports are checked)
    assert "torch" not in globals() and "numba" not in globals()


# -- stabilization rules ---------------------------------------------------------------------

#: For every rule of RULES: (before, the form the rule must produce).
RULE_CASES = {
    "sigmoid": [
        (sp.exp(a) / (1 + sp.exp(a)), sigmoid(a)),
        (1 / (1 + sp.exp(-a)), sigmoid(a)),
        (1 / (1 + sp.exp(a)), sigmoid(-a)),
        (sp.exp(2 * a) / (1 + sp.exp(a)) ** 2, sigmoid(a) ** 2),
        (b * sp.exp(a) / (1 + sp.exp(a)) ** 3, b * sigmoid(a) * sigmoid(-a) ** 2),
    ],
    "softplus": [
        (sp.log(1 + sp.exp(a)), softplus(a)),
        (sp.log(1 + sp.exp(2 * a + b)), softplus(2 * a + b)),
    ],
    "log_sigmoid": [
        (sp.log(sigmoid(a)), -softplus(-a)),
        (sp.log(sigmoid(-a)), -softplus(a)),
    ],
    "one_minus_sigmoid": [
        (1 - sigmoid(a), sigmoid(-a)),
        (sigmoid(a) - 1, -sigmoid(-a)),
        (1 - sigmoid(a) + b, sigmoid(-a) + b),
    ],
    "softplus_shift": [
        (softplus(a) - a, softplus(-a)),
        (3 * softplus(a) - 3 * a + b, 3 * softplus(-a) + b),
        (softplus(2 * a) - 2 * a, softplus(-2 * a)),
    ],
    "expm1": [
        (sp.exp(a) - 1, expm1(a)),
        (sp.Float(0.5) * sp.exp(a) - sp.Float(0.5), sp.Float(0.5) * expm1(a)),
        (2 * sp.exp(a) - 2 + b, 2 * expm1(a) + b),
    ],
    "log1p": [
        (sp.log(1 + a), log1p(a)),
        (sp.log(1 - a), log1p(-a)),
        (sp.log(1 + a**2), log1p(a**2)),
    ],
    "xlogy": [
        (a * sp.log(a), xlogy(a, a)),
        (b * a * sp.log(a), b * xlogy(a, a)),
        (a * (sp.log(a) - b), xlogy(a, a) - a * b),
    ],
    "tanh": [
        (expm1(2 * a) * sigmoid(-2 * a), sp.tanh(a)),
        (b * expm1(a) * sigmoid(-a) ** 2, b * sp.tanh(a / 2) * sigmoid(-a)),
        (sp.sinh(a) / sp.cosh(a), sp.tanh(a)),
        (b * sp.sinh(a) / sp.cosh(a) ** 3, b * sp.tanh(a) / sp.cosh(a) ** 2),
    ],
    "log_cosh": [
        (sp.log(sp.cosh(a)), logcosh(a)),
        (sp.log(sp.cosh(2 * a - b)), logcosh(2 * a - b)),
    ],
}

#: Forms a rule must leave alone (None): they are not instances of it.
RULE_NON_CASES = {
    "sigmoid": [sp.exp(a) / (2 + sp.exp(a)), sp.exp(a) * (1 + sp.exp(a))],
    "softplus": [sp.log(2 + sp.exp(a)), sp.log(1 + sp.exp(a) + b)],
    "log_sigmoid": [sp.log(softplus(a)), sp.log(a)],
    "one_minus_sigmoid": [1 - 2 * sigmoid(a), sigmoid(a) + 1],
    "softplus_shift": [softplus(a) + a, softplus(a) - 2 * a],
    "expm1": [sp.exp(a) - 2, 2 * sp.exp(a) - 1],
    "log1p": [sp.log(2 + a), sp.log(1 + sp.exp(a))],
    "xlogy": [a * sp.log(b), a * sp.log(2 * a)],
    "tanh": [expm1(a) * sigmoid(a), expm1(a) * sigmoid(-2 * a), sp.sinh(a) * sp.cosh(a)],
    "log_cosh": [sp.log(sp.sinh(a)), sp.log(1 + sp.cosh(a))],
}

RULE_FUNCTIONS = {name: rule for name, _, rule in RULES}


def test_every_rule_has_cases():
    assert set(RULE_CASES) == set(RULE_FUNCTIONS) == set(RULE_NON_CASES)
    assert all(why for _, why, _ in RULES)  # each rule carries its one-line reason


@pytest.mark.parametrize(
    ("rule", "before", "after"),
    [(rule, before, after) for rule, cases in RULE_CASES.items() for before, after in cases],
    ids=lambda v: str(v),
)
def test_rule_rewrites_and_preserves_value(rule, before, after):
    out = RULE_FUNCTIONS[rule](before)
    assert out is not None, f"{rule} did not apply to {before}"
    assert sp.expand(out - after) == 0, f"{rule}: {before} → {out}, expected {after}"
    assert_equal_everywhere(before, out)
    # and the whole pass reaches the same stable form (recording the rule it used)
    result = stabilize(before)
    assert sp.expand(result.expr - after) == 0
    assert rule in {rw.rule for rw in result.rewrites}
    for rw in result.rewrites:
        assert_equal_everywhere(rw.before, rw.after)


@pytest.mark.parametrize(
    ("rule", "expr"),
    [(rule, e) for rule, cases in RULE_NON_CASES.items() for e in cases],
    ids=lambda v: str(v),
)
def test_rule_leaves_other_forms_alone(rule, expr):
    assert RULE_FUNCTIONS[rule](expr) is None


def test_stabilize_reaches_a_fixed_point_inside_larger_expressions():
    naive = b * sp.log(1 / (1 + sp.exp(-a))) + (1 - b) * sp.log(1 - 1 / (1 + sp.exp(-a)))
    result = stabilize(naive)
    assert not result.expr.has(sp.exp), result.expr  # every overflow-prone exp is gone
    assert stabilize(result.expr).expr == result.expr
    assert_equal_everywhere(naive, result.expr)


# -- primitives -------------------------------------------------------------------------------


def test_sigmoid_derivative_is_the_derivative_of_its_definition():
    derived = sp.diff(sigmoid(a), a)
    assert not derived.has(sp.exp), derived  # written through σ itself, never exp
    assert derived.has(sigmoid)
    assert_equal_everywhere(derived, sp.diff(1 / (1 + sp.exp(-a)), a), symbols=(a,))


def test_softplus_derivative_is_sigmoid():
    assert sp.diff(softplus(a), a) == sigmoid(a)
    assert_equal_everywhere(sp.diff(softplus(a), a), sp.diff(sp.log(1 + sp.exp(a)), a),
                            symbols=(a,))


def test_primitives_chain_rule_and_values():
    assert_equal_everywhere(sp.diff(softplus(a * b), a), sp.diff(sp.log(1 + sp.exp(a * b)), a))
    assert_equal_everywhere(sp.diff(sigmoid(a**2 - b), b), sp.diff(1 / (1 + sp.exp(b - a**2)), b))
    assert sigmoid(0) == sp.Rational(1, 2) and softplus(0) == sp.log(2)
    assert sigmoid(a).rewrite(sp.exp) == 1 / (1 + sp.exp(-a))
    assert sigmoid(a).is_positive and softplus(a).is_positive and sigmoid(a).is_real


# -- derivation -------------------------------------------------------------------------------


def unclamp(expr: sp.Expr) -> sp.Expr:
    """bce's ``Max(log(p), -100)`` → ``log(p)``."""
    return expr.replace(sp.Max, lambda *args: next(u for u in args if u.has(sp.log)))


def _derive(expr, inputs, name="t", constants=None):
    return derive_elementwise(elementwise_spec(expr, inputs, name, constants))


def test_bce_on_logits_derives_to_sigmoid_minus_target():
    naive = -(y * sp.log(1 / (1 + sp.exp(-z))) + (1 - y) * sp.log(1 - 1 / (1 + sp.exp(-z))))
    d = _derive(naive, [z, y], "bce_logits")
    grad_z, grad_y = d.gradients
    assert sp.expand(grad_z - (sigmoid(z) - y)) == 0, grad_z
    assert sp.expand(grad_y + z) == 0, grad_y
    assert_equal_everywhere(naive, d.stable_forward, symbols=(z, y))
    assert not d.stable_forward.has(sp.exp, sp.log), d.stable_forward  # softplus only


def test_builtin_bce_with_logits_derives_to_sigmoid_minus_target():
    formula, constants = BUILTINS["bce_with_logits"].expr()
    d = _derive(formula, BUILTINS["bce_with_logits"].inputs, "bce_with_logits", constants)
    xs, ys = d.inputs
    assert sp.expand(d.gradients[0] - (sigmoid(xs) - ys)) == 0


def test_bce_of_sigmoid_composed_derives_to_sigmoid_minus_target():
    """The fusion of DESIGN.md: bce(σ(z), y) — the two built-ins' formulas composed."""
    bce, _ = BUILTINS["bce"].expr()
    sig, _ = BUILTINS["sigmoid"].expr()
    bx, by = BUILTINS["bce"].inputs
    (sx,) = BUILTINS["sigmoid"].inputs
    # without the clamp (σ(z) never reaches 0 or 1 exactly in exact arithmetic)
    unclamped = unclamp(bce)
    composed = unclamped.subs({bx: sig.subs(sx, z), by: y})
    d = _derive(composed, [z, y], "bce_sigmoid")
    assert sp.expand(d.gradients[0] - (sigmoid(z) - y)) == 0, d.gradients[0]


def test_relu_derivative_at_zero_is_zero_like_torch():
    relu = sp.Max(x, 0)
    assert sp.diff(relu, x).subs(x, 0) == sp.Rational(1, 2)  # why symgrad prepares Max
    prepared = prepare(relu)
    assert isinstance(prepared, sp.Piecewise)
    (grad,) = _derive(relu, [x], "relu").gradients
    assert not grad.has(sp.Heaviside, sp.DiracDelta)
    assert [grad.subs(x, v) for v in (-1, 0, 1)] == [0, 0, 1]
    (grad_min,) = _derive(sp.Min(x, 0), [x], "relu_min").gradients
    assert [grad_min.subs(x, v) for v in (-1, 0, 1)] == [1, 0, 0]


def test_prepare_leaves_other_max_alone():
    two_symbols = sp.Max(x, y)
    assert prepare(two_symbols) == two_symbols
    assert prepare(x + 1) == x + 1


def test_piecewise_is_differentiated_per_branch():
    f = sp.Piecewise((x**2, x > 1), (sp.sin(x), True))
    (grad,) = _derive(f, [x], "pw").gradients
    for v in (-2, 0, 0.5, 1, 1.5, 3):
        expected = sp.diff(x**2, x) if v > 1 else sp.diff(sp.sin(x), x)
        assert abs(float(grad.subs(x, v)) - float(expected.subs(x, v))) < 1e-15


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_derivations_are_derivatives_of_the_formula(name):
    """Every built-in's compiled partials equal sympy.diff of the formula as written, at
    points off its kinks (checked in 40 digits)."""
    entry = BUILTINS[name]
    formula, constants = entry.expr()
    d = _derive(formula, entry.inputs, name, constants)
    bound = formula.subs(constants)
    symbols = d.inputs
    rename = dict(zip(entry.inputs, symbols, strict=True))
    bound = bound.xreplace(rename)
    points = [0.3125, 0.71875, 2.5, -1.375, -4.25] if name != "bce" else [0.3125, 0.71875, 0.125]
    for wrt, partial in zip(symbols, d.gradients, strict=True):
        reference = sp.diff(bound, wrt)
        if name == "bce":  # derivative of the unclamped logs (no point here is clamped)
            reference = sp.diff(unclamp(bound), wrt)
        assert_equal_everywhere(partial, reference, points=points, symbols=symbols)
    assert_equal_everywhere(d.stable_forward, bound, points=points, symbols=symbols)


# -- simplification ---------------------------------------------------------------------------

GELU_TANH_SECOND = sp.diff(
    x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3))), x, 2
)


@pytest.mark.parametrize(
    "expr",
    [
        GELU_TANH_SECOND,
        (x**2 - 1) / (x - 1),
        sp.sin(x) ** 2 + sp.cos(x) ** 2 + x,
        sp.exp(x) * sp.exp(-x) * x + sigmoid(x) * (1 - sigmoid(x)),
        sp.Piecewise((x, 1.0 * x > 20.0), (1.0 * softplus(1.0 * x), True)),
    ],
    ids=["gelu_tanh''", "rational", "trig", "primitives", "unit floats"],
)
def test_bounded_simplify_preserves_value_and_never_grows(expr):
    out = bounded_simplify(expr)
    assert sp.count_ops(out) <= sp.count_ops(expr)
    assert_equal_everywhere(out, expr, points=[-2.5, -0.75, 0.5, 1.5, 3.0, 25.0], symbols=(x,))


def test_bounded_simplify_ladder_results():
    """What the ladder is for: cancellation, and the exact clean-up of 1.0 factors that
    torch's default parameters leave (softplus with beta=1.0)."""
    assert bounded_simplify((x**2 - 1) / (x - 1)) == x + 1
    assert bounded_simplify(y * (softplus(z) - z) + (1 - y) * softplus(z)) == softplus(z) - y * z
    assert bounded_simplify(
        sp.Piecewise((x, 1.0 * x > 20.0), (1.0 * softplus(1.0 * x), True))
    ) == sp.Piecewise((x, x > 20.0), (softplus(x), True))


def test_bounded_simplify_skips_expansions_that_would_not_end():
    """``(x+y+z+w+1)**64`` expands to 814,385 terms (minutes): the expanding rungs are skipped
    by a count made from the expression's shape, and the result is the expression itself."""
    w = sp.Symbol("w", real=True)
    expr = (x + y + z + w + 1) ** 64
    start = time.perf_counter()
    assert bounded_simplify(expr) == expr
    assert time.perf_counter() - start < 5  # generous: the decision itself takes microseconds


def test_bounded_simplify_leaves_a_large_expression_alone(monkeypatch):
    """Past MAX_SIMPLIFY_NODES no rung runs at all (a rung that ran would fail the test)."""
    monkeypatch.setattr(simplify_module, "MAX_SIMPLIFY_NODES", 10)

    def forbidden(expr):
        raise AssertionError("a rung ran on an expression above the size limit")

    monkeypatch.setattr(simplify_module, "LADDER", (simplify_module.Rung("x", forbidden),))
    expr = sum(sp.sin(k * x) for k in range(1, 6))
    assert bounded_simplify(expr) == expr


def test_bounded_simplify_is_the_same_in_any_thread():
    """No timer, no signal: a worker thread simplifies exactly as the main thread does (the
    old SIGALRM budget skipped sympy.simplify off the main thread)."""
    import threading

    exprs = [GELU_TANH_SECOND, sp.Piecewise((x, 1.0 * x > 20.0), (1.0 * softplus(1.0 * x), True))]
    main = [sp.srepr(bounded_simplify(e)) for e in exprs]
    found: list[str] = []
    worker = threading.Thread(target=lambda: found.extend(
        sp.srepr(bounded_simplify(e)) for e in exprs
    ))
    worker.start()
    worker.join()
    assert found == main


def test_simplification_leaves_a_users_timer_alone():
    """A program's own interval timer keeps running through a derivation and fires into its
    own handler (the old time budget reset it to 0)."""
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 6.0)
        bounded_simplify(GELU_TANH_SECOND)
        derive_elementwise(elementwise_spec(sp.tanh(x) * sp.exp(-x), [x], "timer_user"))
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 6.0
        assert signal.getsignal(signal.SIGALRM) is not previous
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- canonicalize -----------------------------------------------------------------------------


def test_canonicalize_flips_negative_arguments():
    assert canonicalize(sigmoid(-a)) == 1 - sigmoid(a)
    assert canonicalize(softplus(-a)) == softplus(a) - a
    assert canonicalize(sigmoid(a)) == sigmoid(a) and canonicalize(softplus(a)) == softplus(a)
    for e in (sigmoid(-a) * b + softplus(-2 * a), softplus(b - a) / (1 + sigmoid(-a - b))):
        assert_equal_everywhere(canonicalize(e), e)


def test_canonicalize_then_stabilize_round_trips():
    for e in (sigmoid(-a), softplus(-a), 3 * softplus(-a) + b):
        assert sp.expand(stabilize(canonicalize(e)).expr - e) == 0


def test_canonical_form_lets_terms_cancel():
    """``y·softplus(-z) + (1-y)·softplus(z)`` = ``softplus(z) - y·z`` once canonical."""
    e = y * softplus(-z) + (1 - y) * softplus(z)
    assert sp.expand(canonicalize(e)) == sp.expand(softplus(z) - y * z)
    assert_equal_everywhere(e, softplus(z) - y * z, symbols=(z, y))


# -- spec -------------------------------------------------------------------------------------


def test_spec_key_is_deterministic_and_depends_on_everything():
    alpha = sp.Symbol("alpha")
    base = elementwise_spec(alpha * x, [x], "k", {alpha: 0.5})
    assert base.key == elementwise_spec(alpha * x, [x], "k", {"alpha": 0.5}).key
    others = [
        elementwise_spec(alpha * x, [x], "k", {alpha: 0.25}),
        elementwise_spec(alpha * x, [x], "k2", {alpha: 0.5}),
        elementwise_spec(alpha * x, [x], "k", {alpha: 0.5}, fastmath=True),
        elementwise_spec(alpha * x, [x], "k", {alpha: 0.5}, parallel=True),
        elementwise_spec(alpha * x + 1, [x], "k", {alpha: 0.5}),
    ]
    assert len({base.key, *(s.key for s in others)}) == 1 + len(others)


def test_spec_makes_inputs_real_and_binds_constants():
    u = sp.Symbol("u")  # declared without assumptions
    alpha = sp.Symbol("alpha")
    spec = elementwise_spec(sp.Abs(u) * alpha, [u], "absu", {alpha: 2})
    (real_u,) = spec.inputs
    assert real_u.is_real and spec.expr == 2 * sp.Abs(real_u)
    assert spec.constants == (("alpha", 2.0),)
    assert sp.diff(spec.expr, real_u) == 2 * sp.sign(real_u)
