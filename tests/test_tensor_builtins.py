"""Every tensor built-in against torch.autograd: forward and every gradient torch computes.

The table ``symgrad.TENSOR_BUILTINS`` drives everything: each entry's ``torch_ref`` is replayed
in float64 torch on the same inputs, drawn from the entry's declared domains.  Tolerances:
float64 relative 1e-10 (of the largest reference magnitude); float32 relative 2e-5 — its unit
roundoff is 6e-8 and the kernels' row sums and GEMMs accumulate a few dozen roundings.
"""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

import symgrad as sg

torch.set_default_dtype(torch.float64)

NAMES = sorted(sg.TENSOR_BUILTINS)
RTOL = {np.float64: 1e-10, np.float32: 2e-5}
#: A gradient that is exactly 0 (layer norm over one feature: the output is the constant bias)
#: comes back from torch as the rounding noise of the terms it cancels; relative to itself any
#: difference is 100%.  Such a reference — at most NOISE times the largest value of the whole
#: VJP — is compared absolutely, at NOISE times that largest value.
NOISE = {np.float64: 1e-12, np.float32: 1e-5}


#: the convolutions' dims (channels, lengths, kernels), the same at every size of the others
CONV_DIMS = {"C": 3, "O": 4, "L": 7, "K": 3, "Hi": 5, "Wi": 6, "KH": 3, "KW": 2}


def _shape(base: sp.IndexedBase, sizes: dict[str, int]) -> tuple[int, ...]:
    sizes = {**CONV_DIMS, **sizes}
    return tuple(
        int(sp.sympify(d).subs({s: sizes[str(s)] for s in sp.sympify(d).free_symbols}))
        for d in base.shape
    )


def _sample(
    kind: str, shape: tuple[int, ...], rng: np.random.Generator, sizes: dict[str, int]
) -> np.ndarray:
    if kind.startswith("ids:"):  # token ids: integers below the size of the dim named
        return rng.integers(0, sizes[kind[4:]], size=shape)
    if kind == "additive_mask":  # 0 at tokens, -1e4 at padding; every row keeps a token
        mask = np.where(rng.uniform(size=shape) > 0.4, 0.0, -1e4)
        mask[..., 0] = 0.0
        return mask
    if kind == "simplex":  # class probabilities: rows sum to 1
        return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    if kind == "mask":  # 0/1 rows with at least one 1
        mask = (rng.uniform(size=shape) > 0.4).astype(np.float64)
        mask[..., 0] = 1.0
        return mask
    return rng.normal(size=shape)


def _inputs(name: str, sizes: dict[str, int], rng: np.random.Generator) -> list[np.ndarray]:
    entry, op = sg.TENSOR_BUILTINS[name], sg.builtin(name)
    return [
        _sample(kind, _shape(base, sizes), rng, sizes)
        for kind, base in zip(entry.domain, op.spec.inputs, strict=True)
    ]


def _torch(name: str, arrays: list[np.ndarray], grad_output: np.ndarray):
    """torch's forward and gradients (None where torch has none) in float64."""
    entry = sg.TENSOR_BUILTINS[name]
    leaves = [
        torch.tensor(a) if a.dtype.kind in "iu" else torch.tensor(a, requires_grad=True)
        for a in arrays
    ]
    out = entry.torch_ref(torch, *leaves, **entry.params)
    out.backward(torch.tensor(grad_output, dtype=torch.float64))
    grads = [None if t.grad is None else t.grad.numpy() for t in leaves]  # None: integer
    return out.detach().numpy(), grads


def _magnitude(a: np.ndarray) -> float:
    return float(np.max(np.abs(a), initial=0.0))


def _assert_close(
    got: np.ndarray, want: np.ndarray, rtol: float, what: str, noise: float = 0.0
) -> None:
    """``max|got - want| <= rtol * max|want|``, or ``<= noise``: a gradient that is itself
    the small difference of large terms (RMSNorm over one feature: ``g·w·ε/(x² + ε)^{3/2}``,
    computed as ``g·w/r - x·(g·w·x)/r³``) carries their rounding, in torch as here."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{what}: not finite: {got}"
    scale = _magnitude(want)
    err = _magnitude(got - want)
    bound = max(noise, rtol * scale)
    assert err <= bound, f"{what}: max error {err:.3g}, reference magnitude {scale:.3g}"


def check_against_torch(
    name: str, arrays: list[np.ndarray], dtype=np.float64, rng: np.random.Generator | None = None
) -> None:
    """Forward and all VJPs of built-in ``name`` at ``arrays`` (cast to ``dtype``) vs torch."""
    rng = rng or np.random.default_rng(0)
    op = sg.builtin(name)
    cast = [a if a.dtype.kind in "iu" else np.asarray(a, dtype=dtype) for a in arrays]
    y = op(*cast)
    assert y.dtype == dtype
    grad_output = rng.normal(size=y.shape).astype(dtype)
    # torch sees the same (rounded) numbers, in float64: the reference is the exact math
    want_y, want_grads = _torch(
        name,
        [a if a.dtype.kind in "iu" else a.astype(np.float64) for a in cast],
        grad_output.astype(np.float64),
    )
    rtol = RTOL[dtype]
    largest = max(_magnitude(w) for w in [want_y, *want_grads] if w is not None)
    noise = NOISE[dtype] * largest
    _assert_close(y, want_y, rtol, f"{name} forward", noise)
    # the plain VJP (recomputing), and the VJP reading what forward_saved kept, if anything
    y_saved, saved = op.forward_saved(*cast)
    _assert_close(y_saved, want_y, rtol, f"{name} forward_saved", noise)
    runs = [("", op.vjp(*cast, grad_output))]
    if saved is not None:
        runs.append((" (saved)", op.vjp(*cast, grad_output, saved=saved)))
    for how, grads in runs:
        assert len(grads) == len(cast)
        compared = 0
        for base, a, g, want in zip(op.spec.inputs, cast, grads, want_grads, strict=True):
            if base not in op.spec.wrt:  # an integer tensor, or a mask the op does not train
                assert g is None, f"{name}: a gradient for {base.label}, which is not in wrt"
                continue
            assert g.shape == a.shape and g.dtype == dtype
            if want is not None:
                _assert_close(g, want, rtol, f"{name} grad_{base.label}{how}", noise)
                compared += 1
        assert compared >= 1


SHAPES = [
    {"B": 3, "N": 7, "M": 4, "S": 5, "H": 2},
    {"B": 1, "N": 1, "M": 1, "S": 1, "H": 1},
    {"B": 1, "N": 6, "M": 3, "S": 4, "H": 3},
    {"B": 5, "N": 1, "M": 2, "S": 1, "H": 1},
    {"B": 2, "N": 3, "M": 1, "S": 3, "H": 4},
]


@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("name", NAMES)
def test_builtin_matches_torch_float64(name, sizes):
    rng = np.random.default_rng([NAMES.index(name), SHAPES.index(sizes)])
    check_against_torch(name, _inputs(name, sizes, rng), np.float64, rng)


@pytest.mark.parametrize("name", NAMES)
def test_builtin_matches_torch_float32(name):
    rng = np.random.default_rng(3)
    sizes = {"B": 4, "N": 9, "M": 5, "S": 6, "H": 3}
    check_against_torch(name, _inputs(name, sizes, rng), np.float32, rng)


@given(
    name=st.sampled_from(NAMES),
    dims=st.fixed_dictionaries({k: st.integers(1, 6) for k in ("B", "N", "M", "S", "H")}),
    seed=st.integers(0, 2**32 - 1),
)
def test_builtin_matches_torch_over_dims(name, dims, seed):
    rng = np.random.default_rng(seed)
    check_against_torch(name, _inputs(name, dims, rng), np.float64, rng)


#: row lengths about the vectorised reductions' branches (codegen/lower.py): the fold's levels
#: (8 values and more, halves of whole vectors), a max's serial pass (at most SHORT_MAX = 128),
#: one block (BLOCK = 1024) and several
ROW_LENGTHS = [9, 17, 100, 128, 129, 384, 1024, 1025, 2500]


@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("name", ["softmax", "logsumexp", "layer_norm", "softmax_cross_entropy"])
def test_row_reductions_match_torch_on_long_rows(name, n):
    rng = np.random.default_rng(n)
    sizes = {"B": 2, "N": n, "M": 3, "S": 3, "H": 2}
    check_against_torch(name, _inputs(name, sizes, rng), np.float64, rng)
    if n in (129, 1025):
        check_against_torch(name, _inputs(name, sizes, rng), np.float32, rng)


# -- edges ----------------------------------------------------------------------------------

SOFTMAX_FAMILY = ["softmax", "log_softmax", "logsumexp", "softmax_cross_entropy"]


def _extreme_logits(big: float) -> np.ndarray:
    return np.array(
        [
            [big, big, big, big, big],  # all huge: exp overflows without the max shift
            [-big, -big, -big, -big, -big],  # all tiny: the sum underflows to 0
            [big, -big, big, -big, 0.0],
            [-big, -big, -big, -big, big],  # one dominant class
            [big, big - 1.0, big - 2.0, -big, 0.5],
        ]
    )


@pytest.mark.parametrize("dtype, big", [(np.float64, 1e3), (np.float32, 1e2)])
@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_softmax_family_at_extreme_logits(name, dtype, big):
    """No NaN or inf at |logit| = 1e3 (float64) / 1e2 (float32), and agreement with torch."""
    rng = np.random.default_rng(11)
    logits = _extreme_logits(big)
    arrays = [logits]
    if name == "softmax_cross_entropy":
        target = rng.dirichlet(np.ones(5), size=5)
        target[3] = np.eye(5)[0]  # one-hot on a class with probability e^-2000
        arrays.append(target)
    check_against_torch(name, arrays, dtype, rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_norm_on_a_constant_row(dtype):
    """Variance 0: 1/sqrt(eps) is large but finite, as in torch."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6))
    x[0] = 2.5
    x[2] = 0.0
    w, b = rng.normal(size=6), rng.normal(size=6)
    check_against_torch("layer_norm", [x, w, b], dtype, rng)


@pytest.mark.parametrize("dtype, offset", [(np.float64, 1e5), (np.float32, 1e3)])
def test_layer_norm_on_rows_with_a_large_mean(dtype, offset):
    """The gradients keep ``x - mean`` together: expanding Σ g·(x − mean) into Σ g·x − mean·Σ g
    cancels catastrophically (the weight gradient was 1% off in float32 at offset 1e3)."""
    rng = np.random.default_rng(6)
    x = offset + rng.normal(size=(8, 16))
    w, b = rng.normal(size=16), rng.normal(size=16)
    check_against_torch("layer_norm", [x, w, b], dtype, rng)


def test_builtin_parameters_reach_the_kernel():
    """layer_norm(eps=0.5) differs from the default and matches torch with eps=0.5."""
    rng = np.random.default_rng(8)
    x, w, b = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=4)
    y = sg.builtin("layer_norm", eps=0.5)(x, w, b)
    want = torch.nn.functional.layer_norm(
        torch.tensor(x), (4,), torch.tensor(w), torch.tensor(b), 0.5
    ).numpy()
    _assert_close(y, want, 1e-10, "layer_norm eps=0.5")
    assert np.max(np.abs(y - sg.builtin("layer_norm")(x, w, b))) > 1e-3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    ("name", "stride", "padding", "x_shape", "w_shape"),
    [
        ("conv1d", 2, 1, (2, 3, 9), (4, 3, 3)),
        ("conv1d", 1, 2, (2, 3, 5), (4, 3, 3)),
        ("conv2d", 2, 1, (2, 3, 7, 6), (4, 3, 3, 2)),
        ("conv2d", 1, 1, (2, 3, 5, 6), (4, 3, 3, 3)),
        # more input than output channels: the other of the two lowerings of the forward
        # and of the input gradient (the product first, then the shifted sum; see gemm.py)
        ("conv1d", 1, 2, (2, 5, 5), (3, 5, 3)),
        ("conv2d", 1, 1, (2, 5, 5, 6), (3, 5, 3, 3)),
        ("conv2d", 1, 0, (2, 5, 6, 5), (3, 5, 3, 2)),
        ("conv2d", 1, 0, (2, 3, 6, 5), (4, 3, 2, 3)),
    ],
)
def test_convolutions_with_stride_and_padding(name, stride, padding, x_shape, w_shape, dtype):
    """Values and the three gradients against torch (stride and zero padding are written into
    the formula; the VJPs — the transposed convolutions — are derived)."""
    rng = np.random.default_rng(12)
    op = sg.builtin(name, stride=stride, padding=padding)
    arrays = [rng.normal(size=x_shape), rng.normal(size=w_shape), rng.normal(size=w_shape[0])]
    cast = [a.astype(dtype) for a in arrays]
    y = op(*cast)
    g = rng.normal(size=y.shape).astype(dtype)
    grads = op.vjp(*cast, g)
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in cast]
    fn = getattr(torch.nn.functional, name)
    want = fn(*leaves, stride=stride, padding=padding)
    want.backward(torch.tensor(g.astype(np.float64)))
    _assert_close(y, want.detach().numpy(), RTOL[dtype], f"{name} forward")
    for got, leaf in zip(grads, leaves, strict=True):
        _assert_close(got, leaf.grad.numpy(), RTOL[dtype], f"{name} gradient")


@pytest.mark.parametrize(("stride", "padding"), [(3, 0), (3, 1), (6, 0)])
def test_strided_convolutions_at_every_length(stride, padding):
    """Output lengths ``floor((L + 2p - K) / s) + 1`` and the loop bounds of the gradients are
    integer arithmetic: in floats ``(1/3)·7 − 1/3`` is 1.9999999999999998 and a floor of it
    lost the last output position (L = 7, K = 1, stride 3 gave 2 outputs, torch 3)."""
    rng = np.random.default_rng(13)
    op = sg.builtin("conv1d", stride=stride, padding=padding)
    for length in range(4, 26):
        for k in range(1, 5):
            if length + 2 * padding < k:
                continue
            x, w = rng.normal(size=(1, 2, length)), rng.normal(size=(2, 2, k))
            c = rng.normal(size=2)
            y = op(x, w, c)
            leaves = [torch.tensor(a, requires_grad=True) for a in (x, w, c)]
            want = torch.nn.functional.conv1d(*leaves, stride=stride, padding=padding)
            assert y.shape == tuple(want.shape), (length, k)
            g = rng.normal(size=y.shape)
            want.backward(torch.tensor(g))
            _assert_close(y, want.detach().numpy(), RTOL[np.float64], f"L={length} K={k}")
            for got, leaf in zip(op.vjp(x, w, c, g), leaves, strict=True):
                _assert_close(got, leaf.grad.numpy(), RTOL[np.float64], f"L={length} K={k}")


@pytest.mark.parametrize(("channels", "filters"), [(3, 5), (5, 3)])
def test_a_channels_last_convolution_written_by_hand(channels, filters):
    """The shifted read on the other side of the product (the output's position index before
    its channel index): the same lowerings from the left factor, checked against torch."""
    b, o, p, c, q = sp.symbols("b o p c q", integer=True)
    B, C, L, F, K = sp.symbols("B C L F K", integer=True, positive=True)
    X, W = sp.IndexedBase("X", shape=(B, L, C)), sp.IndexedBase("W", shape=(F, C, K))
    body = sp.Sum(W[o, c, q] * X[b, p + q - 1, c], (c, 0, C - 1), (q, 0, K - 1))
    op = sg.tensor_op(body, out=(b, p, o), inputs=[X, W], name="conv_channels_last",
                      out_shape=(B, L - K + 3, F))
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=(2, 7, channels)), rng.normal(size=(filters, channels, 3))
    y = op(x, w)
    g = rng.normal(size=y.shape)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    want = torch.nn.functional.conv1d(tx.permute(0, 2, 1), tw, padding=1).permute(0, 2, 1)
    want.backward(torch.tensor(g))
    _assert_close(y, want.detach().numpy(), 1e-10, "channels-last forward")
    grad_x, grad_w = op.vjp(x, w, g)
    _assert_close(grad_x, tx.grad.numpy(), 1e-10, "channels-last grad_X")
    _assert_close(grad_w, tw.grad.numpy(), 1e-10, "channels-last grad_W")


def test_convolution_parameters_are_whole_numbers():
    with pytest.raises(sg.errors.DefinitionError, match="stride must be a whole number"):
        sg.builtin("conv1d", stride=1.5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_add_layer_norm_with_berts_eps(dtype):
    """BERT's eps = 1e-12 on hidden-size rows, as the MiniLM encoder calls it."""
    rng = np.random.default_rng(9)
    x, r = rng.normal(size=(2, 5, 48)), rng.normal(size=(2, 5, 48))
    w, b = rng.normal(size=48), rng.normal(size=48)
    op = sg.builtin("add_layer_norm", eps=1e-12)
    cast = [a.astype(dtype) for a in (x, r, w, b)]
    g = rng.normal(size=(2, 5, 48)).astype(dtype)
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in cast]
    ref = torch.nn.functional.layer_norm(leaves[0] + leaves[1], (48,), leaves[2], leaves[3], 1e-12)
    ref.backward(torch.tensor(g.astype(np.float64)))
    _assert_close(op(*cast), ref.detach().numpy(), RTOL[dtype], "add_layer_norm eps=1e-12")
    for got, leaf, label in zip(op.vjp(*cast, g), leaves, "XRwb", strict=True):
        _assert_close(got, leaf.grad.numpy(), RTOL[dtype], f"add_layer_norm grad_{label}")


@pytest.mark.parametrize("name", NAMES)
def test_parallel_variants_give_each_thread_its_own_buffers(name):
    """A loop the parallel variant runs with prange reads and writes only the reduction
    buffers it allocates itself: one shared across the threads (an array filled per row whose
    sums' buffers were allocated once, outside the loop: masked_mean_pool's VJP) is a race."""
    tree = ast.parse(sg.builtin(name).source)
    for function in tree.body:
        if not (isinstance(function, ast.FunctionDef) and "_par" in function.name):
            continue
        for loop in ast.walk(function):
            if not (isinstance(loop, ast.For) and ast.unparse(loop.iter).startswith("prange(")):
                continue
            used = {n.id for n in ast.walk(loop)
                    if isinstance(n, ast.Name) and re.fullmatch(r"_r\d+_(buf|acc)", n.id)}
            mine = {t.id for n in ast.walk(loop) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
            assert used <= mine, (function.name, sorted(used - mine))
