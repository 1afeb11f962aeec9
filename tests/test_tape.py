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
    _, ctx = layer.forward(x)
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


def _user_ops():
    """A same-padded convolution (``out_shape``) and an RMS norm over any leading axes
    (``batch``): options a variant without the data's gradient must keep."""
    import sympy as sp

    b, o, c, p, q, i, j = sp.symbols("b o c p q i j", integer=True)
    B, C, F, L, K, N = sp.symbols("B C F L K N", integer=True, positive=True)
    X, W = sp.IndexedBase("X", shape=(B, C, L)), sp.IndexedBase("W", shape=(F, C, K))
    conv = sg.tensor_op(
        sp.Sum(W[o, c, q] * X[b, c, p + q - 1], (c, 0, C - 1), (q, 0, K - 1)),
        out=(b, o, p), inputs=[X, W], name="tape_same_conv", out_shape=(B, F, L - K + 3),
    )  # fmt: skip
    H, G = sp.IndexedBase("H", shape=(B, N)), sp.IndexedBase("G", shape=(N,))
    rms = sp.sqrt(sp.Sum(H[b, j] ** 2, (j, 0, N - 1)) / N + sp.Rational(1, 10**6))
    norm = sg.tensor_op(H[b, i] / rms * G[i], out=(b, i), inputs=[H, G], name="tape_rms", batch=B)
    return conv, norm


def _torch_conv_rms(x, w, g, seed):
    import torch

    tx, tw, tg = (torch.tensor(a, requires_grad=True) for a in (x, w, g))
    h = torch.nn.functional.conv1d(tx, tw, padding=1).transpose(1, 2)  # (B, L, O)
    y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * tg
    y.backward(torch.tensor(seed))
    return y.detach().numpy(), tw.grad.numpy(), tg.grad.numpy()


def test_a_variant_without_the_datas_gradient_keeps_the_ops_options(monkeypatch):
    """The op derived again without a gradient keeps everything else the user gave it: a
    same-padded convolution keeps its output shape, an RMS norm its batch axes; on the tape
    and in a compiled step, which train as torch and as the ops applied whole."""
    from symgrad import api, optim
    from symgrad.compile import compile_step

    conv, norm = _user_ops()
    rng = np.random.default_rng(5)
    x, w, g = rng.normal(size=(2, 3, 10)), rng.normal(size=(4, 3, 3)), rng.normal(size=4)
    seed = rng.normal(size=(2, 10, 4))
    want_y, want_w, want_g = _torch_conv_rms(x, w, g, seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.g = Parameter(w.copy()), Parameter(g.copy())

        def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
            (data,) = self._inputs(inputs, 1)
            h = tape.transpose(tape.apply(conv, data, self.w), (0, 2, 1))
            return tape.apply(norm, h, self.g)

    monkeypatch.setattr(api, "SKIP_GRADIENT_MIN", 1)  # the data counts as large
    net, tape = Net(), Tape()
    y = net.record(tape, x)
    assert 0 not in tape._records[0].op._wrt  # the conv's variant: no gradient for X
    tape.backward(y, seed)
    np.testing.assert_allclose(y, want_y, rtol=1e-12)
    np.testing.assert_allclose(net.w.grad, want_w, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(net.g.grad, want_g, rtol=1e-11, atol=1e-13)

    batches = [(rng.normal(size=(2, 3, 10)), rng.normal(size=(2, 10, 4))) for _ in range(3)]
    compiled, taped = Net(), Net()  # the compiled step's variants; the ops whole on the tape
    step = compile_step(compiled, nn.MSELoss(), optim.SGD(compiled.parameters(), lr=0.1))
    monkeypatch.setattr(api, "SKIP_GRADIENT_MIN", 10**9)
    opt, mse = optim.SGD(taped.parameters(), lr=0.1), nn.MSELoss()
    for xb, yb in batches:
        got = step(xb, yb)
        opt.zero_grad()
        tape = Tape()
        out = taped.record(tape, xb)
        assert tape._records[0].op is tape._records[0].full
        want, grad = mse.value_and_grad(out, yb)
        tape.backward(out, grad)
        opt.step()
        assert got == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(compiled.w.data, taped.w.data, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(compiled.g.data, taped.g.data, rtol=1e-12, atol=1e-14)
