"""Index notation beyond plain contractions, symbolic stage and lowering (no numba, no torch).

Kinks inside sums, conditions on indices, triangular sums, shifted indices (convolution,
GLU), zero padding, sums factored out of per-element work.  Each derived VJP is checked
against brute force: with the dims set to small integers, ``Sum.doit()`` expands every sum and
every ``KroneckerDelta`` of two integers evaluates, so the chain rule *before* contraction is
plain arithmetic, compared at random tensor values with what contraction, stabilization and
the condition-to-bounds moves made of it.  The lowering is read as source text
(:func:`~symgrad.codegen.lower.emit_tensor` imports no numba).
"""

from __future__ import annotations

import ast
import itertools
import re

import numpy as np
import pytest
import sympy as sp

from symgrad.codegen.lower import _fused_columns, emit_tensor
from symgrad.errors import DefinitionError
from symgrad.symbolic.conditions import bound_from_condition, interval, provably_le, tighten
from symgrad.symbolic.index import ReduceMax, contract, derive_tensor, tensor_spec

b, c, h, i, j, k, o, q, s, t, u, d, p = sp.symbols("b c h i j k o q s t u d p", integer=True)
B, C, H, K, L, M, N, F, S, D = sp.symbols("B C H K L M N F S D", integer=True, positive=True)
f = sp.Function("f")


def _expand(node: sp.Basic) -> sp.Basic:
    """Every ``Sum`` as the sum of its terms and every ``ReduceMax`` as the ``Max`` of them
    (an empty one is -oo), outermost index first, so that bounds reading an outer index are
    numbers by the time they are used.  (``Sum.doit`` folds a ``Piecewise`` body symbolically
    and gets the max shift's conditions wrong; plain expansion is plain arithmetic.)"""
    if isinstance(node, (sp.Sum, ReduceMax)):
        *inner, (var, lo, hi) = node.limits
        rest = type(node)(node.function, *inner) if inner else node.function
        terms = [_expand(rest.xreplace({var: sp.Integer(n)})) for n in range(int(lo), int(hi) + 1)]
        if isinstance(node, sp.Sum):
            return sp.Add(*terms)
        return sp.Max(*terms) if terms else -sp.oo
    if not node.args or isinstance(node, (sp.Symbol, sp.IndexedBase)):
        return node
    return node.func(*[_expand(a) for a in node.args])


def _value(expr: sp.Expr, values: dict, rng) -> float:
    """``expr`` with every sum expanded, at random tensor values (drawn once per element)."""
    expr = _expand(expr)
    for access in expr.atoms(sp.Indexed):
        if access not in values:
            values[access] = sp.Float(rng.normal(), 30)
    return float(expr.xreplace(values).evalf(30))


def _check_brute_force(derivation, dims: dict, values: dict | None = None, rng=None):
    """Every partial's contracted and compiled forms equal the chain rule before contraction,
    at every element, with the dims set to ``dims``."""
    rng = rng or np.random.default_rng(3)
    values = {} if values is None else values
    dims = {sp.Symbol(str(k), integer=True, positive=True): sp.Integer(v) for k, v in dims.items()}
    for p in derivation.partials:
        shape = [int(sp.sympify(n).xreplace(dims)) for n in p.wrt.shape]
        for at in itertools.product(*[range(n) for n in shape]):
            point = {**dims, **dict(zip(p.indices, map(sp.Integer, at), strict=True))}
            want = _value(p.raw.xreplace(point), values, rng)
            for form in (p.contracted, p.final):
                got = _value(form.xreplace(point), values, rng)
                assert got == pytest.approx(want, rel=1e-20, abs=1e-25), (p.wrt, at, form)


def _index_symbols(expr: sp.Expr) -> set[sp.Symbol]:
    labels = {base.label for base in expr.atoms(sp.IndexedBase)}
    return {x for x in expr.free_symbols - labels if isinstance(x, sp.Symbol) and x.is_integer}


def _no_escaped_index(derivation) -> None:
    """Every free index of a VJP is one of its own indices or a dim: no summation index escapes
    its sum (the bug that made the generated code fail with ``NameError``)."""
    for p in derivation.partials:
        allowed = set(p.indices) | set(derivation.spec.dims)
        for form in (p.contracted, p.final):
            assert _index_symbols(form) <= allowed, (p.wrt, _index_symbols(form) - allowed)


# -- kinks inside sums ----------------------------------------------------------------------


def test_relu_inside_a_contraction_keeps_its_index():
    X, W = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("W", shape=(M, N))
    spec = tensor_spec(sp.Sum(W[i, j] * sp.Max(0, X[b, j]), (j, 0, N - 1)), (b, i), [X, W], "lr")
    der = derive_tensor(spec)
    _no_escaped_index(der)
    grad_x = der.partials[0].final
    # grad_X[k0, k1] = [X[k0, k1] > 0]·Σ_i W[i, k1] g[k0, i]: the kink tests the element itself
    (pw,) = grad_x.atoms(sp.Piecewise)
    assert pw.args[0].cond == (der.spec.inputs[0][der.partials[0].indices] > 0)
    _check_brute_force(der, {"B": 2, "N": 3, "M": 2})


def test_multi_margin_loss_with_an_integer_label():
    # Σ_{j ≠ y[b]} max(0, 1 - X[b, y[b]] + X[b, j]): a kink, a gathered element, an index test
    X, y = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("y", shape=(B,), integer=True)
    body = sp.Piecewise((sp.Max(0, 1 - X[b, y[b]] + X[b, j]), sp.Ne(j, y[b])), (0, True))
    der = derive_tensor(tensor_spec(sp.Sum(body, (j, 0, N - 1)) / N, (b,), [X, y], "margin"))
    _no_escaped_index(der)
    labels = sp.IndexedBase("y", shape=(B,), integer=True)
    values = {labels[0]: sp.Integer(2), labels[1]: sp.Integer(0)}
    _check_brute_force(der, {"B": 2, "N": 3}, values)


def test_abs_of_a_tensor_entry_differentiates_on_the_real_line():
    X = sp.IndexedBase("X", shape=(B, N))  # declared without real=True: tensors are real
    der = derive_tensor(tensor_spec(sp.Sum(sp.Abs(X[b, j]), (j, 0, N - 1)), (b,), [X], "l1"))
    (p,) = der.partials
    assert p.final.has(sp.sign) and not p.final.has(sp.re, sp.im, sp.Derivative)
    _check_brute_force(der, {"B": 2, "N": 3})


# -- conditions on indices ------------------------------------------------------------------


def _causal_softmax():
    X = sp.IndexedBase("X", shape=(B, S, S))
    num = sp.Piecewise((sp.exp(X[b, s, t]), t <= s), (0, True))
    den = sp.Sum(sp.Piecewise((sp.exp(X[b, s, u]), u <= s), (0, True)), (u, 0, S - 1))
    return derive_tensor(tensor_spec(num / den, (b, s, t), [X], "causal"))


def test_an_index_condition_on_a_summation_index_becomes_its_bound():
    der = _causal_softmax()
    _no_escaped_index(der)
    # the row max and the row sum run over u = 0..s: the masked scores are not visited
    (m,) = der.stable_forward.atoms(ReduceMax)
    assert m.limits[0][1:] == (0, s)
    sums = der.stable_forward.atoms(sp.Sum)
    assert sums and all(x.limits[0][1:] == (0, s) for x in sums)
    _check_brute_force(der, {"B": 1, "S": 3})


def test_the_max_shift_ignores_masked_scores():
    """A masked-out score of 1000 sets neither the forward's nor the VJP's shift: evaluated
    exactly, the causal softmax row [0.5, 1000, 0.2] at s = 0 is [1, 0, 0]."""
    der = _causal_softmax()
    dims = {B: sp.Integer(1), S: sp.Integer(3)}
    X, g = der.spec.inputs[0].xreplace(dims), der.grad_output.xreplace(dims)
    scores = [[0.5, 1000.0, 0.2], [3.0, -1.0, 1000.0], [0.1, 0.2, 0.3]]
    values = {X[0, r, col]: sp.Float(v, 30) for r in range(3) for col, v in enumerate(scores[r])}
    for r, col in itertools.product(range(3), repeat=2):
        values[g[0, r, col]] = sp.Float(0.1 * (r + col), 30)
    forward = der.stable_forward.xreplace(dims)
    for row in range(3):
        probs = np.exp(np.array(scores[row][: row + 1]) - max(scores[row][: row + 1]))
        probs /= probs.sum()
        for col in range(3):
            point = {b: 0, s: row, t: col}
            got = float(_expand(forward.xreplace(point)).xreplace(values))
            assert got == pytest.approx(probs[col] if col <= row else 0.0, rel=1e-14, abs=1e-300)
    # and the gradient reads no exp of an unshifted score: every exp's argument is ≤ 0 here
    (vjp,) = der.partials
    point = {**dims, **dict(zip(vjp.indices, (0, 0, 1), strict=True))}
    final = _expand(vjp.final.xreplace(point))
    for e in final.atoms(sp.exp):
        assert float(e.args[0].xreplace(values)) <= 1e-12


def test_heaviside_of_indices_is_a_condition():
    X = sp.IndexedBase("X", shape=(B, S, S))
    body = sp.Heaviside(s - u, 1) * sp.exp(X[b, s, u])
    der = derive_tensor(
        tensor_spec(sp.log(sp.Sum(body, (u, 0, S - 1))), (b, s), [X], "causal_lse")
    )
    (m,) = der.stable_forward.atoms(ReduceMax)
    assert m.limits[0][1:] == (0, s)
    _no_escaped_index(der)
    _check_brute_force(der, {"B": 1, "S": 3})


def test_a_condition_on_tensor_values_masks_the_max():
    # max over the kept terms only: a condition that cannot become a bound guards the max
    X, A = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("A", shape=(B, N))
    body = sp.Piecewise((sp.exp(X[b, j]), A[b, j] > 0), (0, True))
    der = derive_tensor(tensor_spec(sp.log(sp.Sum(body, (j, 0, N - 1))), (b,), [X, A], "m"))
    (m,) = der.stable_forward.atoms(ReduceMax)
    assert isinstance(m.function, sp.Piecewise) and m.function.args[1].expr == -sp.oo
    _no_escaped_index(der)


# -- triangular sums ------------------------------------------------------------------------


def _triangular():
    P, V = sp.IndexedBase("P", shape=(B, S, S)), sp.IndexedBase("V", shape=(B, S, D))
    spec = tensor_spec(sp.Sum(P[b, s, t] * V[b, t, d], (t, 0, s)), (b, s, d), [P, V], "tri")
    return derive_tensor(spec)


def test_a_sum_bounded_by_another_index():
    der = _triangular()
    _no_escaped_index(der)
    grad_p, grad_v = der.partials
    # grad_V[k0, k1, k2] = Σ_{s=k1}^{S-1} P[k0, s, k1]·g[k0, s, k2]: the triangle, transposed
    (total,) = grad_v.final.atoms(sp.Sum)
    assert total.limits[0][1:] == (grad_v.indices[1], S - 1)
    # grad_P is zero above the diagonal
    assert grad_p.final.has(sp.Piecewise)
    _check_brute_force(der, {"B": 1, "S": 3, "D": 2})


def test_triangular_sums_are_lowered_to_triangular_loops():
    source = emit_tensor(_triangular(), "k").text
    # user names are mangled (s → s_s) and reductions run in blocks of 256: the block loop of
    # the sum over t stops at s, the one of the gradient's sum over s starts at V's row
    assert re.search(r"in range\(0, s_s \+ 1\b", source), source
    assert re.search(r"in range\(s_k1_V, s_S\b", source), source


# -- shifted indices: convolution, GLU, padding ---------------------------------------------


def _conv1d(**kw):
    X, W = sp.IndexedBase("X", shape=(B, C, L)), sp.IndexedBase("W", shape=(F, C, K))
    body = sp.Sum(W[o, c, q] * X[b, c, p + q], (c, 0, C - 1), (q, 0, K - 1))
    return tensor_spec(body, (b, o, p), [X, W], "conv1d_sym", **kw)


def test_output_range_inferred_from_a_shifted_read():
    spec = _conv1d()
    assert dict(spec.ranges)[p] == (0, L - K)  # a valid convolution: L - K + 1 outputs


def test_convolution_vjps_are_the_transposed_convolution():
    der = derive_tensor(_conv1d())
    _no_escaped_index(der)
    grad_x = der.partials[0]
    # grad_X[k0, k1, k2] = Σ_o Σ_p W[o, k1, k2 - p]·g[k0, o, p] over the p with 0 ≤ k2 - p < K
    assert not grad_x.final.has(sp.KroneckerDelta)
    k2 = grad_x.indices[2]
    reads = grad_x.final.atoms(sp.Indexed)
    shifted = [a for a in reads if a.indices[2] - k2 not in (0, a.indices[2])]
    assert shifted, grad_x.final
    _check_brute_force(der, {"B": 1, "C": 2, "L": 4, "F": 1, "K": 2})


def test_zero_padding_from_a_declared_output_shape():
    X, W = sp.IndexedBase("X", shape=(B, C, L)), sp.IndexedBase("W", shape=(F, C, K))
    body = sp.Sum(W[o, c, q] * X[b, c, p + q - 1], (c, 0, C - 1), (q, 0, K - 1))
    spec = tensor_spec(body, (b, o, p), [X, W], "conv_pad", out_shape=(B, F, L - K + 3))
    assert spec.expr.has(sp.Piecewise)  # reads outside X are guarded: they are 0
    der = derive_tensor(spec)
    _no_escaped_index(der)
    _check_brute_force(der, {"B": 1, "C": 1, "L": 3, "F": 1, "K": 2})


def test_glu_dims_given_by_an_expression():
    X = sp.IndexedBase("X", shape=(B, 2 * N))
    spec = tensor_spec(X[b, i] / (1 + sp.exp(-X[b, i + N])), (b, i), [X], "glu_sym")
    assert dict(spec.ranges)[i] == (0, N - 1)
    der = derive_tensor(spec)
    _no_escaped_index(der)
    _check_brute_force(der, {"B": 1, "N": 2})


def test_out_shape_must_match_out():
    X = sp.IndexedBase("X", shape=(B, N))
    with pytest.raises(DefinitionError, match="out_shape"):
        tensor_spec(X[b, i], (b, i), [X], "bad", out_shape=(B,))


# -- sums factored out of per-element work --------------------------------------------------


def _loop_depth_of_reductions(source: str, function: str) -> list[int]:
    """Depth (in loops) at which each reduction of ``function`` is finished: its result
    ``_rN = ...`` (its own blocked loops sit inside that level)."""
    body = source.split(f"def {function}(")[1].split("\n\n\n")[0]
    depths = []
    for line in body.splitlines():
        if re.match(r"\s*_r\d+ = ", line):
            depths.append((len(line) - len(line.lstrip())) // 4 - 1)
    return depths


def test_normalize_vjp_is_linear_in_the_row_length():
    # y = x / |x|: grad_x = g/|x| - x Σ_i g_i x_i / |x|³; Σ_i g_i x_i once per row, not per element
    X = sp.IndexedBase("X", shape=(B, N))
    spec = tensor_spec(X[b, i] / sp.sqrt(sp.Sum(X[b, j] ** 2, (j, 0, N - 1))), (b, i), [X], "nz")
    source = emit_tensor(derive_tensor(spec), spec.key).text
    # every reduction is finished directly in the row loop (depth 1), once per row
    assert _loop_depth_of_reductions(source, "vjp") and max(
        _loop_depth_of_reductions(source, "vjp")
    ) <= 1, source


def test_row_statistics_inside_a_sum_over_rows_are_filled_once():
    # Σ_s over rows of the softmax of X[b, s, :] in the gradient of a column: the row max and
    # row sum depend on s, not on the output element, and are computed once per (b, s)
    X = sp.IndexedBase("X", shape=(B, S, N))
    expr = sp.Sum(sp.exp(X[b, s, i]) / sp.Sum(sp.exp(X[b, s, j]), (j, 0, N - 1)), (s, 0, S - 1))
    spec = tensor_spec(expr, (b, i), [X], "colsum_softmax")
    der = derive_tensor(spec)
    source = emit_tensor(der, spec.key).text
    assert "_m0 = np.empty((s_S,), np.float64)" in source, source  # one per row s
    _check_brute_force(der, {"B": 1, "S": 2, "N": 3})


def _filled_arrays(source: str, function: str) -> list[list[str]]:
    """The loops filling each ``_mN`` array of ``function``, one list per statement of the
    function or per gradient in a loop shared by several (a gradient's loop nest), every
    generated name (loop variables, temporaries, arrays) replaced by its order of first
    appearance."""
    body = source.split(f"def {function}(")[1].split("\n\n\n")[0].splitlines()[1:]
    nests: list[list[str]] = []
    for n, line in enumerate(body):
        if re.match(r"    \S|        s_\w+ = s_\w+$", line):  # a nest, or a gradient joining one
            nests.append([])
        found = re.match(r"(\s*)(_m\d+) = np\.empty", line)
        if not found:
            continue
        indent, name = found.groups()
        block = [line.strip()]
        for later in body[n + 1 :]:
            block.append(later[len(indent) :])
            if re.match(rf"\s*{name}\[.*\] = ", later):
                break
        nests[-1].append(_renumbered("\n".join(block)))
    return nests


def _renumbered(text: str) -> str:
    """``text`` with every generated name replaced by its order of first appearance."""
    seen: dict[str, str] = {}
    return re.sub(
        r"\b_(?:s_\w+|[rmh]\d+\w*)\b", lambda m: seen.setdefault(m[0], f"_n{len(seen)}"), text
    )


def test_a_row_statistic_the_gradient_needs_in_several_terms_is_filled_once():
    # softmax(Q·Kᵀ/√D)·V as a textbook writes it: the stabilized derivation repeats the row of
    # scores (in its max and in its sum of exponentials) with new dummy indices in every term
    # of each gradient; the lowering fills one array per distinct row and reads it everywhere
    Q, K_, V = (sp.IndexedBase(n, shape=(B, S, D)) for n in ("Q", "K", "V"))
    e = sp.Symbol("e", integer=True)

    def weight(tt: sp.Symbol) -> sp.Expr:
        return sp.exp(sp.Sum(Q[b, s, e] * K_[b, tt, e], (e, 0, D - 1)) / sp.sqrt(D))

    expr = sp.Sum(weight(t) * V[b, t, i], (t, 0, S - 1)) / sp.Sum(weight(u), (u, 0, S - 1))
    spec = tensor_spec(expr, (b, s, i), [Q, K_, V], "attention_filled_once")
    source = emit_tensor(derive_tensor(spec), spec.key).text
    for function in ("forward", "vjp"):
        nests = _filled_arrays(source, function)
        assert any(nests), source
        for blocks in nests:  # one gradient's loop nest: each array it fills is different
            assert len(set(blocks)) == len(blocks), "\n\n".join(blocks)
    # in the parallel variants every thread fills its arrays with buffers of its own: each
    # buffer a loop run by prange uses is allocated inside that loop (was: the arrays' sums
    # shared one buffer across the threads)
    for function in ("forward_par", "vjp_par"):
        tree = ast.parse(source.split(f"def {function}(")[1].split("\n\n\n")[0].join(
            ["def f(", "\n"]))
        loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)
                 and ast.unparse(n.iter).startswith("prange(")]
        assert loops, function
        for loop in loops:
            used = {n.id for n in ast.walk(loop) if isinstance(n, ast.Name)
                    and re.fullmatch(r"_r\d+_(buf|acc)", n.id)}
            mine = {t.id for n in ast.walk(loop) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name) and t.id in used}
            assert used <= mine, (function, sorted(used - mine))


def _body(source: str, function: str) -> str:
    return source.split(f"def {function}(")[1].split("\n\n\n")[0]


def test_a_row_sum_whose_terms_the_output_repeats_keeps_them_in_the_output_row():
    # softmax: each output element is a term of its row's sum over 1/the sum: the forward
    # writes the terms into the output row while summing them and scales them there, one exp
    # per element; a causal softmax's sum (u ≤ s) does not cover the row and computes its own
    X = sp.IndexedBase("X", shape=(B, S, S))

    def softmax(keep: sp.Basic, name: str) -> str:
        def term(v: sp.Symbol) -> sp.Expr:
            return sp.Piecewise((sp.exp(X[b, s, v]), keep.subs(t, v)), (0, True))

        expr = term(t) / sp.Sum(term(u), (u, 0, S - 1))
        spec = tensor_spec(expr, (b, s, t), [X], name)
        return emit_tensor(derive_tensor(spec), spec.key).text

    # (a blocked sum is printed twice: one pass for a row of at most one block, a block loop
    # for longer rows; each computes every term once)
    source = softmax(sp.true, "softmax_kept")
    for function in ("forward", "forward_f32", "forward_par"):
        body = _body(source, function)
        assert len(re.findall(r"\b_sg_exp(_f32)?\(", body)) == 2, body
        # the term goes to the output, and from there to the sum's buffer
        assert len(re.findall(r"\w+_buf\[\w+ - \w+\] = out\[s_b, s_s, \w+\]", body)) == 2, body
    causal = _body(softmax(t <= s, "causal_softmax_kept"), "forward")
    assert len(re.findall(r"\b_sg_exp\(", causal)) == 3, causal  # and one for the output
    assert not re.search(r"_buf\[\w+ - \w+\] = out\[", causal), causal


def test_a_sum_over_rows_runs_over_whole_rows_in_chunks_in_both_variants():
    # the scale's gradient Σ_b g[b, i]·X[b, i]: rows in order, whole (blocks of columns, each
    # walking every row, were 8x slower on one thread and slower on two than one), each into
    # its chunk's partial sums: one pass serially, the chunks on the threads in parallel
    X, c = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("c", shape=(N,))
    spec = tensor_spec(X[b, i] * c[i], (b, i), [X, c], "bias_sum_rows")
    source = emit_tensor(derive_tensor(spec), spec.key).text
    serial, parallel = _body(source, "vjp"), _body(source, "vjp_par")
    assert "prange" not in serial and "_kb" not in serial, serial  # (one loop with X's gradient)
    # X's gradient and the sum's partial sums in one loop over the row's columns
    column = (r"for (\w+) in range\(0, s_N\):\n\s+grad_t_X\[.*\n\s+(\w+) = \1\n"
              r"\s+_a\d+\[_a\d+_c, \2\] \+=")
    assert re.search(column, serial), serial
    chunks = (r"for (\w+) in prange\(0, \w+_n\):\n\s+for \w+ in range\(0 \+ \1\*\w+_size, "
              r"min\(s_B, .*\):\n")
    assert "_kb" not in parallel and re.search(chunks, parallel), parallel
    assert "prange(0, s_B)" not in parallel, parallel  # X's gradient runs in the same chunks


def test_the_gradients_of_one_op_over_the_same_rows_run_in_one_loop():
    # centring and scaling, (X[b, i] - mean_b(X))·w[i]: the gradient of X is written row by
    # row, that of w sums over the rows; the VJP reads each row once for both: one loop over b
    # serially, one loop over chunks of rows (each running its rows) in parallel
    X, w = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("w", shape=(N,))
    centred = X[b, i] - sp.Sum(X[b, j], (j, 0, N - 1)) / N
    spec = tensor_spec(centred * w[i], (b, i), [X, w], "centre_scale_fused")
    source = emit_tensor(derive_tensor(spec), spec.key).text
    serial, parallel = _body(source, "vjp"), _body(source, "vjp_par")
    rows = re.findall(r"^    for (\w+) in range\(0, s_B\):", serial, re.M)
    assert len(rows) == 1, serial
    assert re.search(rf"^        \w+ = {rows[0]}$", serial, re.M), serial  # w's sum joins it
    assert len(re.findall(r"^    for \w+ in prange\(", parallel, re.M)) == 1, parallel
    assert re.search(r"^        for (\w+) in range\(.*\n(.*\n)*^            \w+ = \1$",
                     parallel, re.M), parallel  # the same loop body, inside the chunk loop


def _columns(body: str) -> str:
    return "\n".join(_fused_columns(body.strip("\n").split("\n"), 8, "\n".join))


def test_loops_over_the_same_columns_run_as_one_when_nothing_forbids_it():
    # layer norm's gradients: X's, R's (a copy of X's), the weight's and the bias's sums
    body = """
        for i in range(0, s_N):
            gx[b, i] = g[b, i]*w[i]
        r = b
        h = 2*m[r]
        for k in range(0, s_N):
            gr[r, k] = gx[r, k]
            a0[c, k] += h*g[r, k]
"""
    fused = _columns(body)
    assert fused.count("for ") == 1, fused
    assert fused.index("h = 2*m[r]") < fused.index("for i in"), fused  # moved before the loop
    assert "            k = i\n            gr[r, k] = gx[r, k]" in fused, fused


@pytest.mark.parametrize(
    ("first", "between", "later"),
    [
        # the later loop reads the first one's output at another element
        ("gx[b, i] = g[b, i]", "", "y[b, k] = gx[b, k - 1]"),
        # ... or what it adds up (not final inside the loop)
        ("a[i] += g[b, i]", "", "y[b, k] = a[k]"),
        # the first loop reads what the later one writes
        ("gx[b, i] = y[b, i]", "", "y[b, k] = g[b, k]"),
        # a statement between them reads a sum the first loop carries (a second derivative's
        # nested sums: joined, it read the sum before it was complete)
        ("s += g[b, i]", "t = s", "y[b, k] = g[b, k]*t"),
        # ... or a helper that writes a buffer runs between them
        ("buf[i] = g[b, i]", "t = _sg_fold_sum(buf, n)", "y[b, k] = t"),
        # the later loop reads a value the first one assigns per column
        ("v = g[b, i]\n            x[b, i] = v", "", "y[b, k] = v"),
        # ... or an element the first one writes at the same place in every column (its last
        # value), or the first one's column index
        ("t[b] = g[b, i]", "", "y[b, k] = t[b]"),
        ("x[b, i] = g[b, i]", "", "y[b, k] = g[b, i]"),
    ],
)
def test_loops_over_the_same_columns_stay_apart_when_joining_would_change_a_value(
    first, between, later
):
    body = f"""
        for i in range(0, s_N):
            {first}
        {between or "z = 1"}
        for k in range(0, s_N):
            {later}
"""
    assert _columns(body) == body.strip("\n"), _columns(body)


# -- the condition helpers ------------------------------------------------------------------


def test_bounds_from_conditions():
    assert bound_from_condition(u <= s, u) == ("hi", s)
    assert bound_from_condition(u < s, u) == ("hi", s - 1)
    assert bound_from_condition(s - u >= 0, u) == ("hi", s)
    assert bound_from_condition(u + q >= 1, u) == ("lo", 1 - q)
    assert bound_from_condition(2 * u <= s, u) == ("hi", sp.floor(s / 2))
    X = sp.IndexedBase("X", shape=(N,))
    assert bound_from_condition(X[u] > 0, u) is None  # a condition on values, not indices


def test_intervals_and_proofs():
    known = {k: (0, N - 1), t: (0, s), s: (0, S - 1)}
    assert interval(k + 1, known) == (1, N)
    assert interval(t, known) == (0, S - 1)  # through s's range
    assert provably_le(0, k, known) and not provably_le(k, N - 2, known)
    (lo, hi), left = tighten(u, (0, S - 1), [u <= s, sp.Ne(u, k)], known)
    assert (lo, hi) == (0, s) and left == [sp.Ne(u, k)]


def test_empty_ranges_count_zero():
    # Σ_{j=0}^{N-1} [j ≥ N] = 0; Σ_j [j ≤ k]·1 = k + 1 for 0 ≤ k < N
    ind = sp.Piecewise((1, j <= k), (0, True))
    assert contract(sp.Sum(ind, (j, 0, N - 1)), {k: (0, N - 1)}) == k + 1
    assert contract(sp.Sum(sp.Piecewise((1, j >= N), (0, True)), (j, 0, N - 1)), {}) == 0


# -- lowering to GEMMs ----------------------------------------------------------------------


def _gemms(text: str) -> int:
    """GEMM calls: BLAS on strided views (``_gemm``, or ``_gemm_blocks`` split into blocks of
    rows) or ``np.dot`` on materialized columns."""
    return text.count("np.dot(") + len(re.findall(r"\b_gemm(_blocks)?\(", text))


def _functions(source: str) -> dict[str, str]:
    return {
        name: source.split(f"def {name}(")[1].split("\n\n\n")[0] for name in ("forward", "vjp")
    }


def test_convolution_and_its_vjps_are_gemms_on_materialized_columns():
    """Forward, input gradient and weight gradient each run GEMMs on a buffer filled from the
    (zero-padded) reads, or on the tensors themselves: no scalar loop multiplies a weight by
    an input.  The shifted read
    ``X[b, c, p + q - 1]`` is filled once over ``p + q`` (a ``C × (L + 2)`` buffer, not
    im2col's ``C·K × (L - K + 3)``), one GEMM per kernel offset ``q`` reading it ``q`` further;
    the input gradient reads ``grad_out[b, o, k - q + 1]`` the same way."""
    X, W = sp.IndexedBase("X", shape=(B, C, L)), sp.IndexedBase("W", shape=(F, C, K))
    body = sp.Sum(W[o, c, q] * X[b, c, p + q - 1], (c, 0, C - 1), (q, 0, K - 1))
    spec = tensor_spec(body, (b, o, p), [X, W], "conv_gemm", out_shape=(B, F, L - K + 3))
    source = emit_tensor(derive_tensor(spec), spec.key).text
    functions = _functions(source)
    # the forward and the input gradient: the fold, or the product first (then the shifted
    # sum), chosen when the kernel runs by which of the channel counts is larger
    assert _gemms(functions["forward"]) == 2 and "if (s_C) > (s_F):" in functions["forward"]
    assert _gemms(functions["vjp"]) == 3 and "if (s_F) > (s_C):" in functions["vjp"]
    assert "_c0_b = np.zeros((s_C, s_L + 2,)" in functions["forward"]  # no K axis: folded
    assert "_c0_b = np.zeros((s_F, s_K + s_L - 1,)" in functions["vjp"]
    assert "_c1_b = np.zeros((s_C, s_L + 2,)" in functions["vjp"]
    assert "_c0_T = np.empty((s_F, s_K, s_L,)" in functions["forward"]  # W·X, then shifted
    assert "_c0_T = np.empty((s_C, s_K, -s_K + s_L + 3,)" in functions["vjp"]
    # the shifted copies and sums run along row views from 0 (vectorised): no loop over a
    # shifted index is left innermost
    assert "for _c0_b_i in range(_c0_b_n):" in functions["forward"]
    assert "for _c0_T_i in range(_c0_T_n):" in functions["vjp"]
    assert not re.search(r"for s_p in .*\n\s+\S+\[.*s_p \+ s_q", functions["forward"])
    assert not re.search(r"_r\d+ \+= .*W\[.*X\[|_r\d+ \+= .*X\[.*W\[", source), source
    assert not re.search(r"_r\d+ \+= .*W\[.*grad_out\[|_r\d+ \+= .*grad_out\[.*W\[", source)


def test_a_kink_under_a_contraction_is_still_a_gemm():
    X, W = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("W", shape=(M, N))
    spec = tensor_spec(sp.Sum(W[i, j] * sp.Max(0, X[b, j]), (j, 0, N - 1)), (b, i), [X, W], "kg")
    functions = _functions(emit_tensor(derive_tensor(spec), spec.key).text)
    assert _gemms(functions["forward"]) == 1  # relu(X) filled, then one GEMM
    assert _gemms(functions["vjp"]) == 2
