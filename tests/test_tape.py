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
