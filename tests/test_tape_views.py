"""Array operations recorded on a Tape (reshape, transpose, slicing and integer indexing,
concatenation, stacking): each one's gradient, derived from its index formula, against torch
autograd in float64 — a parameter read through the view trains as torch trains it."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import symgrad as sg
from symgrad import nn, optim
from symgrad.compile import compile_step
from symgrad.errors import ArgumentError, ShapeError
from symgrad.nn import Parameter, Tape

torch = pytest.importorskip("torch")

_a, _b = sp.symbols("a b", real=True)
MUL = sg.elementwise(_a * _b, inputs=[_a, _b], name="test_views_mul")

# (name, shapes of the inputs, symgrad's recorded view, torch's)
CASES = [
    ("reshape merge", [(2, 3, 4)],
     lambda t, x: t.reshape(x, (6, 4)), lambda x: x.reshape(6, 4)),
    ("reshape split", [(2, 12)],
     lambda t, x: t.reshape(x, (2, 3, -1)), lambda x: x.reshape(2, 3, 4)),
    ("reshape across", [(4, 6)],
     lambda t, x: t.reshape(x, (3, 8)), lambda x: x.reshape(3, 8)),
    ("transpose", [(2, 3, 4)],
     lambda t, x: t.transpose(x, (2, 0, 1)), lambda x: x.permute(2, 0, 1)),
    ("slice", [(3, 7)],
     lambda t, x: t.getitem(x, (slice(1, 3), slice(5, None, -2))),
     lambda x: x[1:3].flip(1)[:, 1::2]),  # columns 5, 3, 1
    ("strided slice from 0", [(3, 7)],  # the last row of the gradient's bound is D/2 - 1/2
     lambda t, x: t.getitem(x, (slice(None), slice(None, None, 2))), lambda x: x[:, ::2]),
    ("strided slice, 1-D", [(8,)],
     lambda t, x: t.getitem(x, slice(0, None, 3)), lambda x: x[::3]),
    ("step 3 at length 7", [(2, 7)],  # floor((7 - 1)/3) in floats is 1, not 2
     lambda t, x: t.getitem(x, (slice(None), slice(None, None, 3))), lambda x: x[:, ::3]),
    ("step -3 from the end", [(2, 7)],
     lambda t, x: t.getitem(x, (slice(None), slice(6, None, -3))),
     lambda x: x.flip(1)[:, ::3]),
    ("step 6 at length 13", [(13,)],
     lambda t, x: t.getitem(x, slice(0, None, 6)), lambda x: x[::6]),
    ("integer index", [(3, 4, 2)],
     lambda t, x: t.getitem(x, (..., -2, 1)), lambda x: x[..., -2, 1]),
    ("concatenate", [(2, 3), (2, 1), (2, 2)],
     lambda t, *xs: t.concatenate(xs, axis=-1), lambda *xs: torch.cat(xs, -1)),
    ("stack", [(2, 3), (2, 3)],
     lambda t, *xs: t.stack(xs, axis=1), lambda *xs: torch.stack(xs, 1)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_recorded_view_trains_the_parameter_as_torch(case):
    """``y = tanh(view(W₀ ∘ X₀, ...))``: the gradient reaches every parameter through the view
    (a tanh after it, so the cotangent the view's VJP receives is not the seed itself)."""
    _, shapes, ours, theirs = case
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=s) for s in shapes]
    ws = [Parameter(rng.normal(size=s)) for s in shapes]
    tape = Tape()
    tape.watch(*xs)
    products = [tape.apply(MUL, x, w) for x, w in zip(xs, ws, strict=True)]
    y = tape.apply(sg.builtin("tanh"), ours(tape, *products))
    seed = rng.normal(size=y.shape)
    grads_x = tape.backward(y, seed, wrt=tuple(xs))

    txs = [torch.tensor(x, requires_grad=True) for x in xs]
    tws = [torch.tensor(w.data, requires_grad=True) for w in ws]
    ty = torch.tanh(theirs(*[x * w for x, w in zip(txs, tws, strict=True)]))
    ty.backward(torch.tensor(seed))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-14, atol=0)
    for w, tw in zip(ws, tws, strict=True):
        np.testing.assert_allclose(w.grad, tw.grad.numpy(), rtol=1e-13, atol=1e-15)
    for g, tx in zip(grads_x, txs, strict=True):
        np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-13, atol=1e-15)


def test_views_in_a_compiled_step_equal_the_tape():
    """A model that splits its hidden units into heads (reshape), swaps axes and slices: the
    compiled step traces the recorded views like any op and trains as the tape does."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 8, dtype=np.float64, rng=np.random.default_rng(2))

        def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
            (x,) = self._inputs(inputs, 1)
            h = self.lin.record(tape, x)  # (B, 8)
            heads = tape.transpose(tape.reshape(h, (-1, 2, 4)), (0, 2, 1))  # (B, 4, 2)
            first = tape.getitem(heads, (slice(None), slice(None), 0))  # (B, 4)
            both = tape.concatenate([first, tape.getitem(heads, (..., 1))], axis=1)
            return tape.apply(sg.builtin("tanh"), both)

    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(5, 6)), rng.normal(size=(5, 8))) for _ in range(3)]
    a, b = Heads(), Heads()
    step = compile_step(a, nn.MSELoss(), optim.SGD(a.parameters(), lr=0.1))
    opt, mse = optim.SGD(b.parameters(), lr=0.1), nn.MSELoss()
    for x, y in batches:
        got = step(x, y)
        opt.zero_grad()
        tape = Tape()
        out = b.record(tape, x)
        want, grad = mse.value_and_grad(out, y)
        tape.backward(out, grad)
        opt.step()
        assert got == pytest.approx(want, rel=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_allclose(pa.data, pb.data, rtol=1e-12, atol=1e-14)


def test_what_the_tape_does_not_record_is_named():
    tape = Tape()
    x = np.zeros((2, 3))
    with pytest.raises(ShapeError, match=r"cannot reshape an array of shape \(2, 3\).*\(4, -1\)"):
        tape.reshape(x, (4, -1))
    with pytest.raises(ArgumentError, match="advanced indexing"):
        tape.getitem(x, np.array([0, 1]))
    with pytest.raises(ArgumentError, match=r"np\.newaxis"):
        tape.getitem(x, (None, 0))
    with pytest.raises(ShapeError, match=r"out of range for axis 1 of size 3"):
        tape.getitem(x, (0, 3))
    with pytest.raises(ShapeError, match="is empty"):
        tape.getitem(x, slice(2, 2))
    with pytest.raises(ShapeError, match="not a permutation"):
        tape.transpose(x, (0, 0))
    with pytest.raises(ShapeError, match="differ outside axis 0"):
        tape.concatenate([x, np.zeros((2, 4))])
    with pytest.raises(ShapeError, match="one shape"):
        tape.stack([x, np.zeros((3, 2))])
    with pytest.raises(ArgumentError, match="at least two arrays"):
        tape.stack([x])


def test_a_parameter_is_viewed_directly():
    """A tied weight's transpose: the view reads the Parameter itself, whose grad it fills."""
    rng = np.random.default_rng(4)
    w = Parameter(rng.normal(size=(2, 3)))
    seed = rng.normal(size=(3, 2))
    tape = Tape()
    y = tape.apply(sg.builtin("tanh"), tape.transpose(w))
    tape.backward(y, seed)
    tw = torch.tensor(w.data, requires_grad=True)
    torch.tanh(tw.T).backward(torch.tensor(seed))
    np.testing.assert_allclose(w.grad, tw.grad.numpy(), rtol=1e-13, atol=1e-15)


def test_one_merge_serves_every_batch_size():
    """Merging axes, (B, T, N) → (B·T, N), is one op for every B and T (its sizes symbolic);
    a split's sizes are part of its op."""
    tape = Tape()
    rng = np.random.default_rng(5)
    for shape in [(2, 3, 4), (5, 2, 4)]:
        x = rng.normal(size=shape)
        np.testing.assert_array_equal(tape.reshape(x, (-1, 4)), x.reshape(-1, 4))
    first, second = (r.op for r in tape._records)
    assert first is second
