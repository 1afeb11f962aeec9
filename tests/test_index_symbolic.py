"""Tensor ops, symbolic stage: Kronecker-delta contraction and derived VJPs (no numba, no torch).

The oracle here is brute force: with the dims set to small integers, ``Sum.doit()`` expands
every sum into its terms and every ``KroneckerDelta`` of two integers evaluates, so the
chain-rule expression *before* contraction can be evaluated directly and compared with what
:func:`~symgrad.symbolic.index.contract` made of it.  (``doit`` on symbolic dims is exactly what
symgrad avoids; on concrete dims it is plain arithmetic.)
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import numpy as np
import pytest
import sympy as sp

from symgrad.builtins import TENSOR_BUILTINS
from symgrad.errors import DefinitionError
from symgrad.symbolic.index import (
    ReduceMax,
    contract,
    derive_tensor,
    index_sum,
    is_scatter_delta,
    join_sums,
    rename_bound,
    tensor_spec,
)

b, i, j, k, m = sp.symbols("b i j k m", integer=True)
B, N, M = sp.symbols("B N M", integer=True, positive=True)
f, h = sp.Function("f"), sp.Function("h")
delta = sp.KroneckerDelta

#: small dims for the brute-force oracle (every built-in's dim symbols by name)
SMALL = {"B": 2, "N": 3, "M": 2, "S": 3, "H": 2, "C": 2, "O": 2, "L": 4, "K": 2}


def _concrete(expr: sp.Expr, n: int = 3, more: dict | None = None) -> sp.Expr:
    """``expr`` with N = n (and ``more``) and every sum expanded."""
    return expr.xreplace({N: sp.Integer(n), **(more or {})}).doit()


# -- contraction on small cases -------------------------------------------------------------


def test_delta_contracts_a_sum_to_the_free_index():
    ranges = {k: (0, N - 1)}
    assert contract(sp.Sum(delta(j, k) * f(j), (j, 0, N - 1)), ranges) == f(k)
    assert contract(sp.Sum(delta(k, j) * f(j), (j, 0, N - 1)), ranges) == f(k)


def test_product_of_deltas_contracts_both_sums():
    ranges = {k: (0, N - 1), m: (0, M - 1)}
    expr = sp.Sum(delta(i, k) * delta(j, m) * f(i, j), (i, 0, N - 1), (j, 0, M - 1))
    assert contract(expr, ranges) == f(k, m)


def test_delta_between_two_summation_indices():
    expr = sp.Sum(delta(i, j) * f(i, j), (i, 0, N - 1), (j, 0, N - 1))
    result = contract(expr, {})
    assert not result.has(sp.KroneckerDelta)
    assert isinstance(result, sp.Sum) and len(result.limits) == 1  # Σ_j f(j, j)
    assert _concrete(result) == f(0, 0) + f(1, 1) + f(2, 2) == _concrete(expr)


def test_chained_deltas_contract_to_one_term():
    ranges = {k: (0, N - 1)}
    expr = sp.Sum(delta(i, j) * delta(j, k) * f(i, j), (i, 0, N - 1), (j, 0, N - 1))
    assert contract(expr, ranges) == f(k, k)


@pytest.mark.parametrize(
    "limits, k_range",
    [
        ((j, 0, M - 1), (0, N - 1)),  # j < M, k < N: δ(j, k) is 0 when k ≥ M
        ((j, 1, N - 1), (0, N - 1)),  # j starts at 1: δ(j, 0) is always 0
        ((j, 0, N - 1), None),  # k's range is unknown
    ],
)
def test_delta_whose_ranges_differ_contracts_to_a_range_test(limits, k_range):
    # Σ_{j=lo}^{hi} δ(j, k) f(j) = [lo ≤ k ≤ hi] f(k): the delta goes, an index test stays
    expr = sp.Sum(delta(j, k) * f(j), limits)
    result = contract(expr, {k: k_range} if k_range else {})
    assert not result.has(sp.KroneckerDelta) and not result.has(sp.Sum), result
    assert result.has(sp.Piecewise), result
    # and what is left still means the same: compare term by term on concrete dims
    for n_value, m_value in [(3, 2), (4, 4)]:
        for k_value in range(n_value):
            dims = {M: sp.Integer(m_value), k: sp.Integer(k_value)}
            assert _concrete(result, n_value, dims) == _concrete(expr, n_value, dims)


def test_delta_with_a_shifted_index_contracts_with_its_range_test():
    # Σ_j δ(j, k + 1) f(j) = [k + 1 ≤ N - 1] f(k + 1); k + 1 ≥ 0 holds for every k ≥ 0
    expr = sp.Sum(delta(j, k + 1) * f(j), (j, 0, N - 1))
    result = contract(expr, {k: (0, N - 1)})
    assert not result.has(sp.KroneckerDelta)
    assert result == sp.Piecewise((1, k + 1 <= N - 1), (0, True)) * f(k + 1)
    for k_value in range(3):
        point = {k: sp.Integer(k_value)}
        assert _concrete(result.xreplace(point)) == _concrete(expr.xreplace(point))


def test_nested_sums_reusing_a_name():
    # Σ_j δ(j, k) f(j) · Σ_j h(j): the inner j is another index; only the outer one contracts.
    expr = sp.Sum(delta(j, k) * f(j) * sp.Sum(h(j), (j, 0, N - 1)), (j, 0, N - 1))
    result = contract(expr, {k: (0, N - 1)})
    assert not result.has(sp.KroneckerDelta)
    assert _concrete(result) == f(k) * (h(0) + h(1) + h(2))


def test_rename_bound_gives_every_sum_its_own_index_and_keeps_the_value():
    inner = sp.Sum(f(j), (j, 0, N - 1))
    expr = sp.Sum((f(j) - inner / N) ** 2, (j, 0, N - 1)) + inner  # layer norm's shape
    renamed = rename_bound(expr)
    bound = [v for s in renamed.atoms(sp.Sum) for v, *_ in s.limits]
    assert len(bound) == len(set(bound)) == 3
    assert j not in renamed.free_symbols
    assert sp.expand(_concrete(renamed) - _concrete(expr)) == 0


def test_constant_terms_become_counts():
    c = sp.Symbol("c", real=True)
    expr = sp.Sum(delta(j, k) + c, (j, 0, N - 1))
    assert contract(expr, {k: (0, N - 1)}) == 1 + N * c


def test_contraction_does_not_expand_centered_factors():
    # Σ_j g(j) (x(j) - mean) must stay one centered sum, not Σ g x - mean Σ g: the difference
    # of two large sums cancels catastrophically when the mean is large.
    mean = sp.Sum(f(i), (i, 0, N - 1)) / N
    expr = sp.Sum(delta(j, k) * h(j) * (f(j) - mean) + h(j) * (f(j) - mean), (j, 0, N - 1))
    result = contract(expr, {k: (0, N - 1)})
    (centered,) = [s for s in result.atoms(sp.Sum) if s.function.has(h)]
    assert centered.function.is_Mul and any(a.is_Add for a in centered.function.args)
    assert sp.expand(_concrete(result, 3, {k: 1}) - _concrete(expr, 3, {k: 1})) == 0


def test_join_sums_adds_sums_over_one_range_into_one():
    X, R = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("R", shape=(B, N))
    u = sp.Symbol("u", integer=True)
    expr = (sp.Sum(X[b, j], (j, 0, N - 1)) - 2 * sp.Sum(R[b, u], (u, 0, N - 1))) / N
    joined = join_sums(expr)
    (total,) = joined.atoms(sp.Sum)
    ((var, lo, hi),) = total.limits
    assert (lo, hi) == (0, N - 1) and var in (j, u)
    assert sp.expand(total.function - (X[b, var] - 2 * R[b, var])) == 0
    assert sp.expand(_concrete(joined, 3, {B: 1}) - _concrete(expr, 3, {B: 1})) == 0


def test_join_sums_keeps_the_value_when_the_first_sum_cannot_take_the_others():
    # the first sum binds its own index again inside: it stays apart, the second stays whole
    inner = sp.Sum(f(j) + sp.Sum(h(j), (j, 0, N - 1)), (j, 0, N - 1))
    other = sp.Sum(f(m) ** 2, (m, 0, N - 1))
    expr = sp.Add(inner, other, evaluate=False)  # in this order
    assert sp.expand(_concrete(join_sums(expr)) - _concrete(expr)) == 0


@pytest.mark.parametrize(
    "expr",
    [
        # other ranges
        sp.Sum(f(j), (j, 0, N - 1)) + sp.Sum(h(j), (j, 1, N - 1)),
        # a coefficient that is not a number (reads an index: joined, a sum per element)
        sp.Sum(f(j), (j, 0, N - 1)) + f(k) * sp.Sum(h(j), (j, 0, N - 1)),
        # a product of two tensors along the index: a GEMM's sum, left to BLAS
        sp.Sum(sp.IndexedBase("A")[k, j] * sp.IndexedBase("V")[j, m], (j, 0, N - 1))
        + sp.Sum(sp.IndexedBase("C")[k, j], (j, 0, N - 1)),
        # renamed to the other sum's index, u would be captured by the inner sum over j
        sp.Sum(f(j) ** 2, (j, 0, N - 1))
        + sp.Sum(sp.tanh(f(m) + sp.Sum(h(m + j), (j, 0, N - 1))), (m, 0, N - 1)),
        sp.Sum(sp.tanh(f(m) + sp.Sum(h(m + j), (j, 0, N - 1))), (m, 0, N - 1))
        + sp.Sum(f(j) ** 2, (j, 0, N - 1)),
    ],
)
def test_join_sums_leaves_sums_it_cannot_join(expr):
    assert join_sums(expr) == expr


# -- index_sum ------------------------------------------------------------------------------


def test_index_sum_infers_bounds_from_shapes():
    X = sp.IndexedBase("X", shape=(B, N))
    W = sp.IndexedBase("W", shape=(M, N))
    assert index_sum(X[b, j], j) == sp.Sum(X[b, j], (j, 0, N - 1))
    assert index_sum(W[i, j] * X[b, j], j) == sp.Sum(W[i, j] * X[b, j], (j, 0, N - 1))
    assert index_sum(X[b, j], b, j) == sp.Sum(X[b, j], (b, 0, B - 1), (j, 0, N - 1))


def test_index_sum_of_an_index_that_indexes_nothing():
    X = sp.IndexedBase("X", shape=(B, N))
    with pytest.raises(DefinitionError, match=r"index_sum: index i does not index"):
        index_sum(X[b, j], i)


# -- derived VJPs of the built-ins ----------------------------------------------------------


def _builtin_derivation(name: str):
    entry = TENSOR_BUILTINS[name]
    expr, out, inputs, constants = entry.build()
    return derive_tensor(tensor_spec(expr, out, inputs, name, constants))


@pytest.fixture(scope="module")
def derivations():
    """Every tensor built-in derived once (symbolic only)."""
    return {name: _builtin_derivation(name) for name in TENSOR_BUILTINS}


def _dims(derivation) -> dict[sp.Symbol, sp.Integer]:
    return {d: sp.Integer(SMALL[str(d)]) for d in derivation.spec.dims}


def _unroll_max(expr: sp.Expr) -> sp.Expr:
    """``ReduceMax`` over a concrete range as ``Max`` of its terms."""

    def expand(node):
        ((var, lo, hi),) = node.limits
        return sp.Max(*[node.function.xreplace({var: n}) for n in range(int(lo), int(hi) + 1)])

    return expr.replace(lambda e: isinstance(e, ReduceMax), expand)


def _evaluate(expr: sp.Expr, values: dict, rng, positive=()) -> complex:
    """``expr`` at random tensor values (drawn once per element; ``positive`` labels > 0)."""
    scalars = {s for s in expr.free_symbols if isinstance(s, sp.Symbol) and not s.is_integer}
    for access in expr.atoms(sp.Indexed) | scalars:  # tensor elements; a 0-d grad_out
        if access not in values:
            label = str(access.base.label) if isinstance(access, sp.Indexed) else str(access)
            v = rng.uniform(0.3, 1.5) if label in positive else rng.normal()
            values[access] = sp.Float(v, 30)
    return complex(expr.xreplace(values).evalf(25))


#: Brute force needs concrete values for every tensor element: not for the gather (its integer
#: ids subscript another tensor), and too slow for attention's 4-D tensors (sympy's Sum.doit
#: over S²·H·M terms per element) — those are checked numerically against torch in
#: test_tensor_builtins.py and by gradcheck in test_torch_function.py.
#: Conditions on indices (the causal softmax) and shifted reads (convolutions) are checked the
#: same way in test_index_conditions.py, where sums are expanded by hand: ``Sum.doit`` folds a
#: ``Piecewise`` body and cannot unroll a max whose bound is another index.
CONDITIONAL = {"causal_softmax", "causal_masked_softmax", "conv1d", "conv2d"}
BRUTE_FORCE = sorted(
    name
    for name, entry in TENSOR_BUILTINS.items()
    if name not in CONDITIONAL
    and not any(b.is_integer or len(b.shape) > 3 for b in entry.build()[2])
)


@pytest.mark.parametrize("name", BRUTE_FORCE)
def test_contracted_vjp_equals_the_chain_rule_before_contraction(name, derivations):
    """For every built-in and input: the contracted and the compiled (stabilized) VJP
    expressions equal Σ_out grad_out · ∂Y/∂X with every delta summed out by brute force."""
    d = derivations[name]
    dims = _dims(d)
    positive = {"mask"}  # masked pooling divides by Σ mask
    rng = np.random.default_rng(7)
    for p in d.partials:
        raw = p.raw.xreplace(dims).doit()
        contracted = p.contracted.xreplace(dims).doit()
        final = _unroll_max(p.final.xreplace(dims)).doit()
        values: dict = {}
        shape = [int(s.xreplace(dims)) for s in p.wrt.shape]
        for at in itertools.product(*[range(s) for s in shape]):
            point = dict(zip(p.indices, map(sp.Integer, at), strict=True))
            want = _evaluate(raw.xreplace(point), values, rng, positive)
            got_c = _evaluate(contracted.xreplace(point), values, rng, positive)
            got_f = _evaluate(final.xreplace(point), values, rng, positive)
            scale = max(abs(want), 1e-30)
            assert abs(got_c - want) <= 1e-20 * scale, (p.wrt, at, got_c, want)
            assert abs(got_f - want) <= 1e-20 * scale, (p.wrt, at, got_f, want)


def test_softmax_vjp_is_y_times_g_minus_sum_of_g_y(derivations):
    """grad_X[b, k] = y[b, k] (g[b, k] − Σ_i g[b, i] y[b, i]), symbolically at N = 3."""
    d = derivations["softmax"]
    (p,) = d.partials
    k0, k1 = p.indices
    n = {sp.Symbol("N", integer=True, positive=True): sp.Integer(3)}
    X, g = d.spec.inputs[0].xreplace(n), d.grad_output.xreplace(n)
    row = sp.Integer(1)
    y = [sp.exp(X[row, c]) / sum(sp.exp(X[row, a]) for a in range(3)) for c in range(3)]
    dot = sum(g[row, a] * y[a] for a in range(3))
    for expr in (p.contracted, p.final):
        concrete = _unroll_max(expr.xreplace({**n, k0: row})).doit()
        for c in range(3):
            expected = y[c] * (g[row, c] - dot)
            got = concrete.xreplace({k1: sp.Integer(c)})
            # the stabilized form carries exp(± max) factors: same value, different shape
            assert sp.simplify(got - expected) == 0, (c, got)


def test_softmax_vjp_is_stable_at_large_logits(derivations):
    """The compiled form evaluated exactly (30 digits) at logits ±1e3 matches y (g − Σ g y)."""
    d = derivations["softmax"]
    (p,) = d.partials
    k0, k1 = p.indices
    n = {sp.Symbol("N", integer=True, positive=True): sp.Integer(4)}
    X, g = d.spec.inputs[0].xreplace(n), d.grad_output.xreplace(n)
    logits = [1000.0, -1000.0, 999.0, 0.5]
    grads = [0.3, -1.2, 2.0, 0.7]
    values = {X[0, c]: sp.Float(v, 30) for c, v in enumerate(logits)}
    values.update({g[0, c]: sp.Float(v, 30) for c, v in enumerate(grads)})
    shifted = np.exp(np.array(logits) - max(logits))
    y = shifted / shifted.sum()
    concrete = _unroll_max(p.final.xreplace({**n, k0: sp.Integer(0)})).doit()
    for c in range(4):
        got = float(concrete.xreplace({k1: sp.Integer(c)}).xreplace(values).evalf(30))
        assert got == pytest.approx(y[c] * (grads[c] - float(np.dot(grads, y))), rel=1e-12)


def test_cross_entropy_vjp_is_softmax_times_sum_of_targets_minus_target(derivations):
    """grad_X[b, k] = g[b] (softmax(X)[b, k] · Σ_i T[b, i] − T[b, k]), with T not normalized."""
    d = derivations["softmax_cross_entropy"]
    p = d.partials[0]
    k0, k1 = p.indices
    n = {sp.Symbol("N", integer=True, positive=True): sp.Integer(3)}
    X, T = (base.xreplace(n) for base in d.spec.inputs)
    g = d.grad_output.xreplace(n)
    row = sp.Integer(0)
    softmax = [sp.exp(X[row, c]) / sum(sp.exp(X[row, a]) for a in range(3)) for c in range(3)]
    total = sum(T[row, a] for a in range(3))
    concrete = p.contracted.xreplace({**n, k0: row}).doit()
    for c in range(3):
        expected = g[row] * (softmax[c] * total - T[row, c])
        assert sp.simplify(concrete.xreplace({k1: sp.Integer(c)}) - expected) == 0


def test_no_kronecker_delta_left_in_any_builtin_vjp(derivations):
    """Every delta is contracted — except a gather's δ(k, ids[b, s]) (the embedding's, the
    labels' of cross-entropy), which stays for the lowering: a scatter-add, or an index test."""
    for name, d in derivations.items():
        gathers = any(b.is_integer for b in d.spec.inputs)
        for p in d.partials:
            for expr in (p.contracted, p.final):
                deltas = expr.atoms(sp.KroneckerDelta)
                assert all(is_scatter_delta(delta) for delta in deltas), (name, p.wrt, expr)
                assert not deltas or gathers, (name, p.wrt, expr)
                if name not in CONDITIONAL:  # a causal mask or zero padding is an index test
                    assert not expr.has(sp.Piecewise), (name, p.wrt, expr)  # no index guards


def test_layer_norm_derivation_finishes_and_stays_row_wise():
    start = time.perf_counter()
    d = _builtin_derivation("layer_norm")
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"layer norm took {elapsed:.1f}s to derive"
    grad_x = next(p for p in d.partials if str(p.wrt) == "X")
    # every sum in grad_X runs along one row of X: its free indices are the row index only
    k0 = grad_x.indices[0]
    for s in grad_x.final.atoms(sp.Sum):
        assert {v for v in s.free_symbols if isinstance(v, sp.Symbol) and v.is_integer} <= {
            k0,
            *d.spec.dims,
        }, s


def test_leftover_delta_between_free_indices_becomes_an_index_test():
    # Y[i] = A[i, i]²: grad_A[k0, k1] = δ(k0, k1) · 2 A[k0, k0] g[k0]; the delta cannot go.
    A = sp.IndexedBase("A", shape=(N, N))
    d = derive_tensor(tensor_spec(A[i, i] ** 2, out=(i,), inputs=[A], name="diag_square"))
    (p,) = d.partials
    assert not p.final.has(sp.KroneckerDelta) and p.final.has(sp.Piecewise)
    assert any(rw.rule == "delta_guard" for rw in p.rewrites)
    g, A = d.grad_output, d.spec.inputs[0]  # the tensor as the spec holds it: real
    for r, c in itertools.product(range(3), repeat=2):
        got = p.final.xreplace(dict(zip(p.indices, (sp.Integer(r), sp.Integer(c)), strict=True)))
        assert got == (2 * A[r, r] * g[r] if r == c else 0)


def test_symbolic_stage_imports_neither_numba_nor_torch():
    code = (
        "import sys\n"
        "from symgrad.builtins import TENSOR_BUILTINS\n"
        "from symgrad.symbolic.index import derive_tensor, tensor_spec\n"
        "for name in ('linear', 'softmax'):\n"
        "    e = TENSOR_BUILTINS[name]\n"
        "    expr, out, inputs, constants = e.build()\n"
        "    derive_tensor(tensor_spec(expr, out, inputs, name, constants))\n"
        "bad = sorted(m for m in ('numba', 'torch', 'llvmlite') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
