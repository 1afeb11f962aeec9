"""The tape's reverse mode: a gradient that cannot reach a parameter never vanishes quietly."""

from __future__ import annotations

import numpy as np
import pytest

import symgrad as sg
from symgrad import nn
from symgrad.errors import ArgumentError
from symgrad.nn import Parameter, Tape


def _layer_norm_on_3d(tape: Tape, x: np.ndarray, ln: nn.LayerNorm) -> np.ndarray:
    """The user's workaround of a 2-D layer norm: reshape around it with NumPy."""
    h = tape.apply(sg.builtin("gelu"), x)
    flat = h.reshape(-1, h.shape[-1])  # a NumPy view, not recorded
    return tape.apply(sg.builtin("layer_norm"), flat, ln.weight, ln.bias)


@pytest.mark.parametrize("view", [
    lambda h: h.reshape(-1, h.shape[-1]),
    lambda h: h.T,
    lambda h: h[1:],
    lambda h: h[..., ::2],
])
def test_a_view_of_a_tracked_output_is_refused(view):
    rng = np.random.default_rng(0)
    w = Parameter(rng.normal(size=(4, 4)))
    tape = Tape()
    h = tape.apply(sg.builtin("matmul"), rng.normal(size=(4, 4)), w)
    with pytest.raises(ArgumentError, match="view of an array a gradient flows through"):
        tape.apply(sg.builtin("tanh"), view(h))
    tape.apply(sg.builtin("tanh"), h)  # the recorded array itself is fine


def test_the_silent_loss_of_issue_21_now_raises():
    """Reshaping (B, T, N) to (B·T, N) around a layer norm used to give its weight no
    gradient, silently; now the reshape is refused, and the batch-axes form trains it."""
    rng = np.random.default_rng(1)
    ln = nn.LayerNorm(6, dtype=np.float64)
    x = rng.normal(size=(2, 3, 6))
    tape = Tape()
    tape.watch(x)
    with pytest.raises(ArgumentError, match="gradient would be lost"):
        _layer_norm_on_3d(tape, x, ln)
    tape = Tape()
    tape.watch(x)
    h = tape.apply(sg.builtin("gelu"), x)
    y = tape.apply(sg.builtin("layer_norm"), h, ln.weight, ln.bias)  # any leading axes
    tape.backward(y, np.ones_like(y))
    assert ln.weight.grad is not None and np.any(ln.weight.grad != 0)


def test_views_of_untracked_arrays_are_fine():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(3, 4))
    tape = Tape()
    out = tape.apply(sg.builtin("tanh"), data[:, :2])  # an input's view: no gradient wanted
    frozen = tape.apply(sg.builtin("tanh"), out.T)  # nothing trained below: no gradient lost
    assert frozen.shape == (2, 3)


def _torch_linear_grads(x, w, b, g):
    import torch

    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    (tx @ tw.T + tb).backward(torch.tensor(g))
    return tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def test_a_large_gradient_nobody_reads_is_left_out(monkeypatch):
    """A network's first layer reads data: its VJP leaves the data's gradient out (the op
    derived without it, for large data), on the tape and on the layer path, and the
    parameters' gradients are torch's; asked for anyway (``backward(wrt=...)`` on an input
    never watched), that gradient comes from the full op."""
    from symgrad import api

    monkeypatch.setattr(api, "SKIP_GRADIENT_MIN", 64)  # the test's data counts as large
    rng = np.random.default_rng(3)
    layer = nn.Linear(8, 5, dtype=np.float64)
    x, g = rng.normal(size=(16, 8)), rng.normal(size=(16, 5))
    want_x, want_w, want_b = _torch_linear_grads(x, layer.weight.data, layer.bias.data, g)

    tape = Tape()
    y = layer.record(tape, x)
    (record,) = tape._records
    assert record.op is not record.full and 0 not in record.op._wrt  # X's gradient left out
    tape.backward(y, g)
    np.testing.assert_allclose(layer.weight.grad, want_w, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, want_b, rtol=1e-12)

    layer.zero_grad()
    out, ctx = layer.forward(x)
    assert layer.backward(ctx, g, need_input_grad=False) is None
    np.testing.assert_allclose(layer.weight.grad, want_w, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, want_b, rtol=1e-12)

    layer.zero_grad()
    tape = Tape()
    y = layer.record(tape, x)
    (gx,) = tape.backward(y, g, wrt=(x,))  # x was not watched: the full op gives it
    np.testing.assert_allclose(gx, want_x, rtol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, want_w, rtol=1e-12)

    monkeypatch.setattr(api, "SKIP_GRADIENT_MIN", 10**9)  # small data: the op as it is
    tape = Tape()
    layer.record(tape, x)
    assert tape._records[0].op is tape._records[0].full
