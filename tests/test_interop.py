"""Model exchange: torch nn.Sequential → symgrad Sequential → torch, weights copied."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import sympy as sp
import torch

import symgrad as sg
from symgrad import nn
from symgrad import torch as sgt
from symgrad.errors import DTypeError, SymgradError

pytestmark = pytest.mark.usefixtures("torch_state")


def grad_of(t: torch.Tensor) -> np.ndarray:
    """``t.grad`` as an array (asserting backward reached ``t``)."""
    assert t.grad is not None
    return t.grad.numpy()


def torch_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.LayerNorm(6, eps=1e-3),
        torch.nn.GELU(),
        torch.nn.Linear(6, 6),
        torch.nn.LeakyReLU(0.2),
        torch.nn.ELU(0.5),
        torch.nn.Softplus(beta=2.0, threshold=10.0),
        torch.nn.Hardtanh(-0.5, 0.7),
        torch.nn.SiLU(),
        torch.nn.Tanh(),
        torch.nn.GELU(approximate="tanh"),
        torch.nn.Softsign(),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 3, bias=False),
        torch.nn.Sigmoid(),
    ).double()


def test_from_torch_copies_layers_and_weights_and_computes_the_same() -> None:
    twin = torch_model()
    twin[0].weight.requires_grad_(False)
    model = sgt.from_torch(twin)
    assert len(model) == len(twin)
    assert list(model.state_dict()) == list(twin.state_dict())
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v.numpy())
    assert model.state_dict()["0.weight"].dtype == np.float64
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in twin.parameters()
    ]
    x = np.random.default_rng(0).normal(size=(5, 4))
    y, ctx = model.forward(x)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = twin(tx)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-14)

    grad_y = np.random.default_rng(1).normal(size=y.shape)
    gx = model.backward(ctx, grad_y)
    ty.backward(torch.from_numpy(grad_y))
    assert gx is not None
    np.testing.assert_allclose(gx, grad_of(tx), rtol=1e-10, atol=1e-13)
    for (name, p), (_, tp) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if tp.requires_grad:
            assert p.grad is not None
            np.testing.assert_allclose(p.grad, grad_of(tp), rtol=1e-10, atol=1e-13, err_msg=name)
        else:
            assert p.grad is None


def test_round_trip_back_to_torch() -> None:
    twin = torch_model()
    back = sgt.to_torch(sgt.from_torch(twin))
    assert [type(m) for m in back] == [type(m) for m in twin]
    assert back[10].approximate == "tanh" and back[6].beta == 2.0 and back[4].negative_slope == 0.2
    for (k, v), (k2, v2) in zip(twin.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(back(x), twin(x), rtol=0, atol=0)


def test_float32_and_named_children() -> None:
    torch.manual_seed(1)
    twin = torch.nn.Sequential(
        OrderedDict(fc=torch.nn.Linear(3, 2, dtype=torch.float32), act=torch.nn.Tanh())
    )  # float32, children named
    model = sgt.from_torch(twin)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    assert model.state_dict()["0.weight"].dtype == np.float32
    x = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_allclose(model(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)


def test_custom_elementwise_layer_goes_to_torch_as_symgrad_function_and_back() -> None:
    x = sp.Symbol("x", real=True)
    op = sg.elementwise(x / (1 + x**2), inputs=[x], name="user_bump")
    rng = np.random.default_rng(2)
    model = nn.Sequential(nn.Linear(3, 2, dtype=np.float64, rng=rng), nn.Elementwise(op))
    twin = sgt.to_torch(model)
    assert isinstance(twin[1], sgt.Module) and twin[1].op is op
    a = rng.normal(size=(4, 3))
    ours, ref = model(a), twin(torch.from_numpy(a)).detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)  # two GEMMs: last-bit rounding
    back = sgt.from_torch(twin)
    assert type(back[1]) is nn.Elementwise and back[1].op is op


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(SymgradError, match=r"layer 1 \(Dropout\) is not supported"):
        sgt.from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()))
    with pytest.raises(SymgradError, match=r"layer conv \(Conv1d\)"):
        sgt.from_torch(torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv1d(1, 1, 1))))
    with pytest.raises(SymgradError, match="elementwise_affine=False"):
        sgt.from_torch(torch.nn.Sequential(torch.nn.LayerNorm(3, elementwise_affine=False)))
    with pytest.raises(SymgradError, match=r"takes a torch\.nn\.Sequential"):
        sgt.from_torch(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match="float16"):
        sgt.from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2).half()))
    with pytest.raises(SymgradError, match=r"layer 0 \(Flatten\) has no torch twin"):

        class Flatten(nn.Module):
            pass

        sgt.to_torch(nn.Sequential(Flatten()))
