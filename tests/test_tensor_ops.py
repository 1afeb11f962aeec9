"""User-defined tensor ops: gradients against finite differences and torch; lowering structure.

Finite differences use the fourth-order central stencil
``(-f(x+2h) + 8 f(x+h) - 8 f(x-h) + f(x-2h)) / 12h`` with ``h = 1e-3``: truncation
``O(h⁴) ≈ 1e-12`` and rounding ``≈ 1e-16 / h = 1e-13``, so they are trusted to a relative
1e-8 (1e-10 would test the stencil, not symgrad).  Against torch the tolerance is the
suite's float64 1e-10.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import sympy as sp
import torch

import symgrad as sg

torch.set_default_dtype(torch.float64)

b, i, j, s, t, h = sp.symbols("b i j s t h", integer=True)
B, N, M, S, H = sp.symbols("B N M S H", integer=True, positive=True)
X = sp.IndexedBase("X", shape=(B, N))
Z = sp.IndexedBase("Z", shape=(B, N))
w = sp.IndexedBase("w", shape=(N,))
A = sp.IndexedBase("A", shape=(N, N))
Q = sp.IndexedBase("Q", shape=(B, S, H))
K = sp.IndexedBase("K", shape=(B, S, H))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def finite_difference_vjp(op, arrays, grad_output, step=1e-3):
    """Σ grad_output · ∂op/∂arrays[n][idx] for every element, by the 4th-order stencil."""

    def objective(values):
        return float(np.sum(grad_output * op(*values)))

    grads = []
    for n, a in enumerate(arrays):
        grad = np.empty_like(a)
        for idx in np.ndindex(a.shape):
            taps = []
            for shift in (2, 1, -1, -2):
                moved = [x.copy() for x in arrays]
                moved[n][idx] += shift * step
                taps.append(objective(moved))
            grad[idx] = (-taps[0] + 8 * taps[1] - 8 * taps[2] + taps[3]) / (12 * step)
        grads.append(grad)
    return grads


def _check(op, arrays, torch_fn=None, rng=None):
    rng = rng or np.random.default_rng(0)
    y = op(*arrays)
    g = rng.normal(size=y.shape)
    grads = op.vjp(*arrays, g if g.shape else float(g))
    for got, want in zip(grads, finite_difference_vjp(op, arrays, g), strict=True):
        assert _rel(got, want) < 1e-8
    if torch_fn is not None:
        leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
        ref = torch_fn(*leaves)
        ref.backward(torch.tensor(g))
        assert _rel(y, ref.detach().numpy()) < 1e-10
        for got, leaf in zip(grads, leaves, strict=True):
            assert _rel(got, leaf.grad.numpy()) < 1e-10


# -- ops that are not built-ins -------------------------------------------------------------


@pytest.fixture(scope="module")
def weighted_distance():
    """Y[b] = Σ_j w[j] (X[b, j] − Z[b, j])²."""
    return sg.tensor_op(
        sp.Sum(w[j] * (X[b, j] - Z[b, j]) ** 2, (j, 0, N - 1)),
        out=(b,),
        inputs=[X, Z, w],
        name="weighted_sq_distance",
    )


def test_weighted_squared_distance(weighted_distance):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.uniform(0.5, 2, size=5)]
    expected = np.sum(arrays[2] * (arrays[0] - arrays[1]) ** 2, axis=1)
    assert _rel(weighted_distance(*arrays), expected) < 1e-14
    _check(weighted_distance, arrays, lambda x, z, ww: (ww * (x - z) ** 2).sum(1), rng)


def test_row_wise_cosine_similarity_written_with_index_sum():
    cosine = sg.tensor_op(
        sg.index_sum(X[b, j] * Z[b, j], j)
        / sp.sqrt(sg.index_sum(X[b, j] ** 2, j) * sg.index_sum(Z[b, j] ** 2, j)),
        out=(b,),
        inputs=[X, Z],
        name="row_cosine",
    )
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=(4, 6)), rng.normal(size=(4, 6))]
    _check(
        cosine,
        arrays,
        lambda x, z: torch.nn.functional.cosine_similarity(x, z, dim=1, eps=0.0),
        rng,
    )


def test_gradients_sharing_one_loop_over_rows_match_torch():
    # a scaled lookup, out[b, s, j] = E[ids[b, s], j]·c[b, s] + X[b, s, j]: E's gradient is a
    # scatter-add over the rows (b, s), c's a sum along each row, X's the output's gradient
    # itself; the serial VJP runs them in one loop over b (and layer norm's four, with a copy
    # of one gradient read back in the same row) — each as in its own loop
    ids = sp.IndexedBase("ids", shape=(B, S), integer=True)
    E, c = sp.IndexedBase("E", shape=(M, N)), sp.IndexedBase("c", shape=(B, S))
    Xs = sp.IndexedBase("Xs", shape=(B, S, N))
    op = sg.tensor_op(
        E[ids[b, s], j] * c[b, s] + Xs[b, s, j], out=(b, s, j), inputs=[ids, E, c, Xs],
        name="scaled_lookup_fused",
    )
    vjp = op.source.split("def vjp(")[1].split("\n\n\n")[0]
    assert len(re.findall(r"^    for \w+ in range\(0, s_B\):", vjp, re.M)) == 1, vjp
    rng = np.random.default_rng(4)
    table = rng.normal(size=(5, 3))
    index = rng.integers(0, 5, size=(4, 2))
    scale, x = rng.normal(size=(4, 2)), rng.normal(size=(4, 2, 3))
    g = rng.normal(size=(4, 2, 3))
    grads = op.vjp(index, table, scale, x, g)
    leaves = [torch.tensor(a, requires_grad=True) for a in (table, scale, x)]
    out = leaves[0][torch.tensor(index)] * leaves[1][..., None] + leaves[2]
    out.backward(torch.tensor(g))
    assert _rel(op(index, table, scale, x), out.detach().numpy()) < 1e-14
    assert grads[0] is None
    for got, leaf in zip(grads[1:], leaves, strict=True):
        assert _rel(got, leaf.grad.numpy()) < 1e-13
    norm = sg.builtin("add_layer_norm", eps=1e-5)
    vjp = norm.source.split("def vjp_saved(")[1].split("\n\n\n")[0]
    assert len(re.findall(r"^    for \w+ in range\(0, s_B\):", vjp, re.M)) == 1, vjp
    arrays = [rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=5),
              rng.normal(size=5)]
    value, saved = norm.forward_saved(*arrays)
    g2 = rng.normal(size=(6, 5))
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    ref = torch.nn.functional.layer_norm(leaves[0] + leaves[1], (5,), leaves[2], leaves[3], 1e-5)
    ref.backward(torch.tensor(g2))
    assert _rel(value, ref.detach().numpy()) < 1e-12
    for got, leaf in zip(norm.vjp(*arrays, g2, saved=saved), leaves, strict=True):
        assert _rel(got, leaf.grad.numpy()) < 1e-12


def test_index_sum_is_the_explicit_sum():
    explicit = sg.tensor_op(
        sp.Sum(w[j] * X[b, j], (j, 0, N - 1)), out=(b,), inputs=[X, w], name="weighted_row_sum"
    )
    short = sg.tensor_op(
        sg.index_sum(w[j] * X[b, j], j), out=(b,), inputs=[X, w], name="weighted_row_sum"
    )
    assert short.spec.key == explicit.spec.key
    rng = np.random.default_rng(3)
    x, ww = rng.normal(size=(3, 4)), rng.normal(size=4)
    assert _rel(short(x, ww), x @ ww) < 1e-14


def test_diagonal_op_keeps_an_index_test_for_its_delta():
    # Y[i] = A[i, i]²: grad_A is zero off the diagonal — a delta between free indices
    diag = sg.tensor_op(A[i, i] ** 2, out=(i,), inputs=[A], name="diag_square")
    rng = np.random.default_rng(4)
    a = rng.normal(size=(4, 4))
    _check(diag, [a], lambda x: torch.diagonal(x) ** 2, rng)


def test_batched_attention_scores():
    """S[b, s, t] = Σ_h Q[b, s, h] K[b, t, h] / √H: a contraction with a batch index."""
    scores = sg.tensor_op(
        sp.Sum(Q[b, s, h] * K[b, t, h], (h, 0, H - 1)) / sp.sqrt(H),
        out=(b, s, t),
        inputs=[Q, K],
        name="attention_scores",
    )
    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))]
    _check(scores, arrays, lambda q, k: q @ k.transpose(1, 2) / 2.0, rng)


def test_user_indices_named_like_generated_ones_are_not_captured():
    """The VJP's own indices are ``k0_X, k1_X``; a user index of that name, and a free
    ``j_1`` next to a bound ``j`` (bound indices are renamed ``j_1, j_2...``), must not be
    confused with them."""
    k0_X, j_1 = sp.symbols("k0_X j_1", integer=True)
    rng = np.random.default_rng(7)
    matvec = sg.tensor_op(
        sp.Sum(X[b, k0_X] * w[k0_X], (k0_X, 0, N - 1)),
        out=(b,),
        inputs=[X, w],
        name="matvec_k0_X",
    )
    _check(matvec, [rng.normal(size=(3, 4)), rng.normal(size=(4,))], lambda x, v: x @ v, rng)
    trace_rows = sg.tensor_op(
        sp.Sum(A[j_1, j] * A[j, j_1], (j, 0, N - 1)),
        out=(j_1,),
        inputs=[A],
        name="row_trace_j_1",
    )
    _check(trace_rows, [rng.normal(size=(4, 4))], lambda a: torch.diagonal(a @ a), rng)


def test_constants_and_a_scalar_output():
    alpha = sp.Symbol("alpha", positive=True)
    penalty = sg.tensor_op(
        alpha * sp.Sum(X[b, j] ** 2, (b, 0, B - 1), (j, 0, N - 1)),
        out=(),
        inputs=[X],
        name="scaled_l2",
        constants={alpha: 0.25},
    )
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 2))
    y = penalty(x)
    assert y.shape == () and _rel(y, 0.25 * np.sum(x**2)) < 1e-14
    (g_float,) = penalty.vjp(x, 1.5)
    (g_array,) = penalty.vjp(x, np.array(1.5))
    assert np.array_equal(g_float, g_array)
    _check(penalty, [x], lambda v: 0.25 * (v**2).sum(), rng)


def test_non_contiguous_inputs_give_the_same_results(weighted_distance):
    rng = np.random.default_rng(7)
    x, z, ww = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=5)
    g = rng.normal(size=3)
    x_f = np.asfortranarray(x)
    z_strided = np.repeat(z, 2, axis=1)[:, ::2]
    assert not z_strided.flags.c_contiguous and not x_f.flags.c_contiguous
    assert np.array_equal(weighted_distance(x_f, z_strided, ww), weighted_distance(x, z, ww))
    for got, want in zip(
        weighted_distance.vjp(x_f, z_strided, ww, g),
        weighted_distance.vjp(x, z, ww, g),
        strict=True,
    ):
        assert np.array_equal(got, want)


# -- lowering: GEMMs, hoisting, determinism -------------------------------------------------


def _functions(source: str) -> dict[str, ast.FunctionDef]:
    return {f.name: f for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}


def _loop_depth(node: ast.AST) -> int:
    """The deepest nesting of ``for`` loops over a dim under ``node``.

    A vectorised reduction runs over its range in blocks (``for _r0_q in range(0, N, 256)``);
    the loop over a block's elements (``range(_r0_q, _r0_q + _r0_m)``) is bounded by a
    constant and does not count: the block loop and it together traverse the range once (the
    lanes are the helpers' loops, outside the kernel functions).  Likewise the loop over the
    rows of one chunk of rows (``range(_g0_q*_g0_size, ...)``, inside the loop over the
    chunks)."""
    inner = max((_loop_depth(c) for c in ast.iter_child_nodes(node)), default=0)
    if not isinstance(node, ast.For):
        return inner
    within_block = re.search(r"_r\d+_[qm]\b|_[ga]\d+_q\b", ast.unparse(node.iter))
    return inner if within_block else inner + 1


def _calls(node: ast.AST, name: str) -> int:
    return sum(isinstance(c, ast.Call) and ast.unparse(c.func) == name for c in ast.walk(node))


def _gemms(node: ast.AST) -> int:
    """BLAS products: one call, or one product split into blocks (serially or in parallel)."""
    return sum(_calls(node, name) for name in ("_gemm", "_gemm_blocks", "_gemm_blocks_par"))


def test_linear_lowers_to_gemms_not_triple_loops():
    functions = _functions(sg.builtin("linear").source)
    forward, vjp = functions["forward"], functions["vjp"]
    assert _gemms(forward) == 1
    assert _gemms(vjp) == 2  # grad_X = grad_Y·W and grad_W = grad_Yᵀ·X
    # the parallel variants split the same products over the threads
    assert _calls(functions["forward_par"], "_gemm_blocks_par") == 1
    assert _calls(functions["vjp_par"], "_gemm_blocks_par") == 2
    assert _loop_depth(forward) <= 2 and _loop_depth(vjp) <= 2
    # the bias gradient Σ_b grad_Y[b, i] runs over whole rows in order (the dim B, mangled),
    # into one partial sum per chunk of rows: serially one pass over the rows, in parallel the
    # chunks on the threads (the same additions in the same order: the same bits)
    (rows,) = [n for n in vjp.body if isinstance(n, ast.For) and "grad_out" in ast.unparse(n)]
    assert ast.unparse(rows.iter) == "range(0, s_B)"
    (chunks,) = [n for n in functions["vjp_par"].body
                 if isinstance(n, ast.For) and "grad_out" in ast.unparse(n)]
    assert re.fullmatch(r"prange\(0, _a\d+_n\)", ast.unparse(chunks.iter))
    (rows,) = [n for n in chunks.body if isinstance(n, ast.For)]
    assert re.match(r"range\(_a\d+_q \* _a\d+_size, min\(s_B", ast.unparse(rows.iter))


@pytest.mark.parametrize(
    "name",
    ["linear", "seq_linear", "head_projection", "head_merge", "attention_scores",
     "attention_context"],
)
def test_contractions_read_their_operands_in_place(name):
    """Every product of the transformer's contractions is one BLAS call on strided views of the
    arguments — transposes as flags, the heads of a (B, S, H, M) tensor as a leading dimension
    — writing into its destination: no operand is copied, no result copied back."""
    source = sg.builtin(name).source
    assert re.search(r"\b_gemm(_blocks)?\(", source)
    for copy in ("np.ascontiguousarray", "np.transpose", "np.dot", ".copy("):
        assert copy not in source, source
    for function in _functions(source).values():
        for node in ast.walk(function):  # no temporary result arrays either
            assert not (isinstance(node, ast.Call) and ast.unparse(node.func) == "np.empty")


@pytest.mark.parametrize("name", ["layer_norm", "softmax", "log_softmax", "softmax_cross_entropy"])
def test_row_reductions_are_hoisted(name):
    """Row sums are computed once per row: two nested loops at most, so O(B·N), not O(B·N²)."""
    for function in _functions(sg.builtin(name).source).values():
        assert _loop_depth(function) <= 2, ast.unparse(function)


def test_generated_source_is_deterministic():
    """The same op emits the same text in processes with different hash seeds."""
    code = (
        "from symgrad.builtins import TENSOR_BUILTINS\n"
        "from symgrad.codegen.lower import emit_tensor\n"
        "from symgrad.symbolic.index import derive_tensor, tensor_spec\n"
        "for name in ('layer_norm', 'bilinear'):\n"
        "    expr, out, inputs, constants = TENSOR_BUILTINS[name].build()\n"
        "    batch = TENSOR_BUILTINS[name].batch\n"
        "    spec = tensor_spec(expr, out, inputs, name, constants, batch=batch)\n"
        "    print(emit_tensor(derive_tensor(spec), spec.key).text)\n"
    )
    texts = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        texts.append(run.stdout)
    assert texts[0] == texts[1]
    here = sg.builtin("layer_norm").source
    assert here.strip() in texts[0]


def test_derivation_records_the_contraction():
    derivation = sg.builtin("linear").derivation()
    for p in derivation.partials:
        assert p.raw.has(sp.KroneckerDelta)  # the chain rule, as sympy.diff gives it
        assert not p.contracted.has(sp.KroneckerDelta)
    text = derivation.to_text()
    assert all(f"grad_{name}[" in text for name in ("X", "W", "c"))
    assert "contracted" in text
