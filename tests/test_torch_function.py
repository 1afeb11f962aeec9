"""symgrad.torch.function: symgrad ops inside torch autograd.

* ``gradcheck`` and ``gradgradcheck`` (float64, finite differences of our own forward against
  our derived first and second derivatives) for every built-in op and two user-defined ops;
* a third derivative against torch's own;
* dtype, device, contiguity and argument errors;
* a small torch model with a symgrad activation and a symgrad loss, trained side by side with
  the same model written in pure torch: gradients equal to ~1e-10 at every step.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import sympy as sp
import torch
from torch.autograd import gradcheck, gradgradcheck

import symgrad as sg
from symgrad import torch as sgt
from symgrad.builtins import BUILTINS, TENSOR_BUILTINS, Builtin, Domain, TensorBuiltin
from symgrad.errors import ArgumentError, DeviceError, DTypeError, ShapeError, SymgradError
from symgrad.runtime.elementwise import ElementwiseOp
from symgrad.runtime.tensor import TensorOp

DIMS = {"B": 2, "N": 3, "M": 2, "S": 3, "H": 2}
DIMS.update({"C": 2, "O": 2, "L": 5, "K": 2, "Hi": 4, "Wi": 3, "KH": 2, "KW": 2})  # convolutions
SHAPE = (2, 3)
KINK_MARGIN = 1e-2  # far beyond gradcheck's eps = 1e-6: no finite difference straddles a kink


pytestmark = pytest.mark.usefixtures("torch_state")


# -- inputs ---------------------------------------------------------------------------------


def _kinks(expr: sp.Expr) -> list[sp.Expr]:
    """Expressions that vanish where ``expr`` has a kink: Piecewise conditions, the arguments
    of Abs/sign/Heaviside, ties of Max/Min."""
    found = [r.lhs - r.rhs for r in expr.atoms(sp.core.relational.Relational)]
    found += [f.args[0] for f in expr.atoms(sp.Abs, sp.sign, sp.Heaviside)]
    for f in expr.atoms(sp.Max, sp.Min):
        found += [a - b for a, b in itertools.combinations(f.args, 2)]
    return found


def _draw(domain: Domain, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if domain.kind == "uniform":
        return rng.uniform(domain.low, domain.high, size=shape)
    return rng.normal(size=shape) * domain.scale


def elementwise_inputs(entry: Builtin, seed: int = 0) -> list[np.ndarray]:
    """One array per input from the entry's domain, every element away from every kink.

    The second input (if any) has shape ``SHAPE[1:]``: it broadcasts, so the gradient summed
    over the broadcast axis is checked too.
    """
    formula, constants = entry.expr()
    expr = formula.xreplace(constants)
    kinks = [sp.lambdify(entry.inputs, k, "numpy") for k in _kinks(expr)]
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        arrays = [
            _draw(d, rng, SHAPE if n == 0 else SHAPE[1:]) for n, d in enumerate(entry.domain)
        ]
        distance = min(
            (float(np.min(np.abs(np.broadcast_to(k(*arrays), SHAPE)))) for k in kinks),
            default=np.inf,
        )
        if distance > KINK_MARGIN:
            return arrays
    raise AssertionError(f"no inputs away from the kinks of {entry.name}")


def tensor_inputs(entry: TensorBuiltin, seed: int = 0) -> list[np.ndarray]:
    _, _, bases, _ = entry.build()
    rng = np.random.default_rng(seed)
    arrays = []
    for base, kind in zip(bases, entry.domain, strict=True):
        shape = tuple(int(sp.sympify(d).subs({s: DIMS[s.name] for s in sp.sympify(d).free_symbols}))
                      for d in base.shape)
        a = rng.normal(size=shape)
        if kind == "simplex":
            a = rng.uniform(0.1, 1.0, size=shape)
            a /= a.sum(-1, keepdims=True)
        elif kind == "mask":
            a = (rng.uniform(size=shape) > 0.5).astype(np.float64)
            a[..., 0] = 1.0
        elif kind == "additive_mask":
            a = np.where(rng.uniform(size=shape) > 0.5, 0.0, -1e4)
            a[..., 0] = 0.0
        elif kind.startswith("ids:"):
            a = rng.integers(0, DIMS[kind[4:]], size=shape)
        arrays.append(a)
    return arrays


def tensor_leaves(entry: TensorBuiltin, arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Float inputs the op differentiates require grad; integer ids and masks do not."""
    wrt = entry.wrt
    _, _, bases, _ = entry.build()
    return tuple(
        torch.tensor(a)
        if a.dtype.kind in "iu"
        else torch.tensor(a, requires_grad=wrt is None or str(base.label) in wrt)
        for base, a in zip(bases, arrays, strict=True)
    )


def grad_of(t: torch.Tensor) -> np.ndarray:
    """``t.grad`` as an array (asserting backward reached ``t``)."""
    assert t.grad is not None
    return t.grad.numpy()


def leaves(arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays)


# -- gradcheck / gradgradcheck --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_elementwise_builtin_gradcheck_and_gradgradcheck(name: str) -> None:
    fn = sgt.function(sg.builtin(name))
    inputs = leaves(elementwise_inputs(BUILTINS[name]))
    assert gradcheck(fn.apply, inputs)
    assert gradgradcheck(fn.apply, inputs)


@pytest.mark.parametrize("name", sorted(TENSOR_BUILTINS))
def test_tensor_builtin_gradcheck_and_gradgradcheck(name: str) -> None:
    fn = sgt.function(sg.builtin(name))
    inputs = tensor_leaves(TENSOR_BUILTINS[name], tensor_inputs(TENSOR_BUILTINS[name]))
    assert gradcheck(fn.apply, inputs)
    assert gradgradcheck(fn.apply, inputs)


x_, y_ = sp.symbols("x y", real=True)


def mish() -> ElementwiseOp:
    """A user activation: x·tanh(softplus(x)), written naively (log(1 + exp(x)))."""
    return sg.elementwise(x_ * sp.tanh(sp.log(1 + sp.exp(x_))), inputs=[x_], name="user_mish")


def logcosh() -> ElementwiseOp:
    """A user loss, per element: log(cosh(x - y))."""
    return sg.elementwise(sp.log(sp.cosh(x_ - y_)), inputs=[x_, y_], name="user_logcosh")


def tanh_layer() -> TensorOp:
    """A user tensor op: a bias-free tanh layer, Y[b, i] = tanh(Σ_j W[i, j] X[b, j])."""
    b, i, j = sp.symbols("b i j", integer=True)
    B, N, M = sp.symbols("B N M", integer=True, positive=True)
    X, W = sp.IndexedBase("X", shape=(B, N)), sp.IndexedBase("W", shape=(M, N))
    expr = sp.tanh(sp.Sum(W[i, j] * X[b, j], (j, 0, N - 1)))
    return sg.tensor_op(expr, out=(b, i), inputs=[X, W], name="user_tanh_layer")


def test_user_elementwise_op_gradcheck_and_gradgradcheck() -> None:
    fn = sgt.function(logcosh())
    rng = np.random.default_rng(1)
    inputs = leaves([rng.normal(size=(3, 4)), rng.normal(size=(4,))])
    assert gradcheck(fn.apply, inputs)
    assert gradgradcheck(fn.apply, inputs)


def test_user_tensor_op_gradcheck_and_gradgradcheck() -> None:
    fn = sgt.function(tanh_layer())
    rng = np.random.default_rng(2)
    inputs = leaves([rng.normal(size=(2, 3)), rng.normal(size=(4, 3))])
    assert gradcheck(fn.apply, inputs)
    assert gradgradcheck(fn.apply, inputs)


def test_third_derivative_equals_torch() -> None:
    """Three nested backward passes: each derived symbolically from the one before."""
    z = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64, requires_grad=True)

    def third(f: object) -> torch.Tensor:
        g = f(z).sum()  # type: ignore[operator]
        for _ in range(2):
            (g,) = torch.autograd.grad(g, z, create_graph=True)
            g = g.sum()
        (g,) = torch.autograd.grad(g, z)
        return g

    ours = third(sgt.function("tanh").apply)
    ref = third(torch.tanh)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


# -- shapes, dtypes, devices ----------------------------------------------------------------


def test_float32_and_noncontiguous_inputs() -> None:
    fn = sgt.function(mish())
    base = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    strided = base.t()  # not contiguous
    assert not strided.is_contiguous()
    leaf = strided.detach().requires_grad_(True)
    y = fn.apply(leaf)
    y.backward(torch.ones_like(y))
    dense = strided.contiguous().detach().requires_grad_(True)
    fn.apply(dense).backward(torch.ones(4, 5, dtype=torch.float64))
    np.testing.assert_array_equal(grad_of(leaf), grad_of(dense))

    single = strided.float().detach().requires_grad_(True)
    y32 = fn.apply(single)
    assert y32.dtype == torch.float32
    y32.sum().backward()
    assert grad_of(single).dtype == np.float32
    np.testing.assert_allclose(grad_of(single), grad_of(dense), rtol=1e-5, atol=1e-6)


def test_device_dtype_and_argument_errors() -> None:
    fn = sgt.function(mish())
    with pytest.raises(DeviceError, match="meta"):
        fn.apply(torch.empty(3, device="meta"))
    with pytest.raises(DTypeError, match="float16"):
        fn.apply(torch.ones(3, dtype=torch.float16))
    with pytest.raises(DTypeError, match="int64"):
        fn.apply(torch.arange(3))
    with pytest.raises(ArgumentError, match=r"not a torch\.Tensor"):
        fn.apply(np.ones(3))
    with pytest.raises(ArgumentError, match="takes 1 tensor"):
        fn.apply(torch.ones(3), torch.ones(3))
    with pytest.raises(DTypeError, match="different dtypes"):
        sgt.function(logcosh()).apply(
            torch.ones(3, dtype=torch.float32), torch.ones(3, dtype=torch.float64)
        )
    with pytest.raises(ShapeError, match="dim N"):
        sgt.function("linear").apply(torch.ones(2, 3), torch.ones(4, 5), torch.ones(4))
    assert isinstance(DeviceError("x"), SymgradError)


def test_module_holds_parameters_and_matches_torch_linear() -> None:
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 4).double()
    layer = sgt.Module(sg.builtin("linear"), W=ref.weight.detach(), c=ref.bias.detach())
    assert [n for n, _ in layer.named_parameters()] == ["W", "c"]
    x = torch.randn(5, 3, dtype=torch.float64)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    params = dict(layer.named_parameters())
    np.testing.assert_allclose(grad_of(params["W"]), grad_of(ref.weight), rtol=1e-12)
    np.testing.assert_allclose(grad_of(params["c"]), grad_of(ref.bias), rtol=1e-12)
    with pytest.raises(ArgumentError, match=r"no input\(s\) \['w'\]"):
        sgt.Module(sg.builtin("linear"), w=torch.ones(4, 3))
    with pytest.raises(ArgumentError, match=r"takes 1 tensor\(s\) \(X\)"):
        layer(x, x)
    assert "parameters=['W', 'c']" in repr(layer)


# -- a torch model with a symgrad activation and a symgrad loss -----------------------------


def test_torch_model_with_symgrad_activation_and_loss_trains_like_pure_torch() -> None:
    torch.manual_seed(0)
    ours = torch.nn.Sequential(
        torch.nn.Linear(4, 16), sgt.Module(mish()), torch.nn.Linear(16, 1)
    ).double()

    class Mish(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t * torch.tanh(torch.nn.functional.softplus(t))

    ref = torch.nn.Sequential(torch.nn.Linear(4, 16), Mish(), torch.nn.Linear(16, 1)).double()
    ref.load_state_dict(ours.state_dict())
    loss_fn = sgt.function(logcosh())

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(64, 4)))
    y = torch.from_numpy(np.tanh(x.numpy() @ np.array([[1.0], [-2.0], [0.5], [1.5]])))
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ref))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = loss_fn.apply(ours(x), y).mean()
        ref_loss = torch.log(torch.cosh(ref(x) - y)).mean()
        loss.backward()
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            scale = float(q.grad.abs().max())
            assert float((p.grad - q.grad).abs().max()) <= 1e-10 * scale
        opt.step()
        ref_opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_an_input_outside_wrt_that_requires_grad_is_an_error() -> None:
    """masked_softmax differentiates the scores only: asking torch for the mask's gradient
    raises instead of returning a silent zero."""
    entry = TENSOR_BUILTINS["masked_softmax"]
    x, a = (torch.tensor(v, requires_grad=True) for v in tensor_inputs(entry))
    y = sgt.function("masked_softmax").apply(x, a)
    with pytest.raises(ArgumentError, match=r"no gradient for input 'A'"):
        y.sum().backward()


def test_integer_inputs_take_long_tensors() -> None:
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 4], [4, 4]])
    y = sgt.function("embedding").apply(ids, w)
    y.sum().backward()
    assert torch.equal(y, torch.nn.functional.embedding(ids, w))
    assert torch.equal(w.grad[4], torch.full((3,), 3.0, dtype=torch.float64))
    with pytest.raises(DTypeError, match=r"give torch\.long"):
        sgt.function("embedding").apply(ids.double(), w)
