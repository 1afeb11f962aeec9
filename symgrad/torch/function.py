"""symgrad ops inside torch's autograd: ``function(op)`` and ``Module(op, **params)``.

``function(op)`` is a ``torch.autograd.Function`` whose forward and backward run the op's
compiled kernels on CPU tensors (float32 or float64; non-contiguous tensors are copied to
contiguous ones).  Its backward is differentiable too: when torch asks for a graph of the
backward (``create_graph=True``, ``gradgradcheck``, a Hessian), the backward runs through a
second Function whose own backward is the VJP of the op's *derived VJP*, derived symbolically
again (:func:`symgrad.functional.vjp_op`) — and so on, one derived op per order.  No finite
differences, no hand-written derivative.

>>> import torch, symgrad.torch as sgt, sympy as sp, symgrad as sg
>>> x = sp.Symbol("x", real=True)
>>> softsign = sgt.function(sg.elementwise(x / (1 + sp.Abs(x)), inputs=[x], name="softsign"))
>>> a = torch.tensor([-3.0, 1.0], dtype=torch.float64, requires_grad=True)
>>> y = softsign.apply(a)
>>> y.sum().backward()
>>> a.grad.tolist()
[0.0625, 0.25]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..api import builtin
from ..errors import ArgumentError, DeviceError, DTypeError
from ..functional import Op, _check_op, vjp_op

_FLOAT_DTYPES = (torch.float32, torch.float64)

_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}
_VJP_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def _array(t: object, op: Op, what: str) -> np.ndarray:
    """A NumPy view (or contiguous copy) of a CPU float tensor, after checking it."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(
            f"op {op.name!r}: {what} is {type(t).__name__}, not a torch.Tensor; wrap it with "
            "torch.as_tensor(value, dtype=torch.float64)"
        )
    if t.device.type != "cpu":
        raise DeviceError(
            f"op {op.name!r}: {what} is on device {t.device}; symgrad's kernels run on the CPU: "
            "move it with tensor.cpu()"
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise DTypeError(
            f"op {op.name!r}: {what} has dtype {t.dtype}; symgrad computes in torch.float32 or "
            "torch.float64: convert it, e.g. tensor.double()"
        )
    return t.detach().resolve_conj().resolve_neg().contiguous().numpy()


def _integer_inputs(op: Op) -> frozenset[str]:
    """The op's integer tensors (token ids, labels): read as integers, never differentiated."""
    spec = op.spec
    return frozenset(str(b.label) for b in getattr(spec, "index_inputs", ()))


def _differentiable(op: Op) -> tuple[bool, ...]:
    """Per input: whether the op's VJP computes its gradient (its ``wrt``)."""
    names = {str(getattr(b, "label", b)) for b in op.spec.wrt}  # IndexedBase or Symbol
    return tuple(n in names for n in op.input_names)


def _index_array(t: object, op: Op, what: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return _array(t, op, what)  # the same errors as for a float input
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DTypeError(
            f"op {op.name!r}: {what} is an integer tensor (ids, labels) but has dtype "
            f"{t.dtype}; give torch.long"
        )
    return t.detach().contiguous().numpy().astype(np.int64, copy=False)


def _arrays(op: Op, tensors: Sequence[object], names: Sequence[str]) -> list[np.ndarray]:
    if len(tensors) != len(names):
        raise ArgumentError(
            f"op {op.name!r} takes {len(names)} tensor(s) ({', '.join(names)}), "
            f"got {len(tensors)}"
        )
    integer = _integer_inputs(op)
    return [
        _index_array(t, op, f"input {n!r}") if n in integer else _array(t, op, f"input {n!r}")
        for t, n in zip(tensors, names, strict=True)
    ]


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    # not np.ascontiguousarray: it turns a 0-d array (a scalar output) into shape (1,)
    # (and np.asarray: an elementwise op returns a 0-d input's gradient as a NumPy scalar)
    if a is None:  # an integer input, or one outside the op's wrt
        return None
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.c_contiguous else a.copy())


def _check_needed(op: Op, needed: Sequence[bool]) -> None:
    """torch asks for the gradient of an input the op does not differentiate: an error, not a
    silent zero."""
    for name, need, has in zip(op.input_names, needed, _differentiable(op), strict=True):
        if need and not has:
            raise ArgumentError(
                f"op {op.name!r} computes no gradient for input {name!r} (it is not in the op's "
                f"wrt); pass it detached (tensor.detach()) or define the op with wrt including it"
            )


def _vjp(op: Op, inputs: Sequence[torch.Tensor], grad_y: torch.Tensor) -> tuple[Any, ...]:
    """One gradient per input; differentiable (through the derived VJP) when torch records."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, grad_y)):
        grads = _vjp_function(op).apply(*inputs, grad_y)
        return tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
    arrays = _arrays(op, inputs, op.input_names)
    g = _array(grad_y, op, "grad_output")
    return tuple(_tensor(a) for a in op.vjp(*arrays, g))


def _masked(grads: Sequence[torch.Tensor], needed: Sequence[bool]) -> tuple[Any, ...]:
    return tuple(g if need else None for g, need in zip(grads, needed, strict=True))


def function(op: Op | str) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running ``op``'s compiled kernels (one class per op).

    ``function(op).apply(*tensors)`` takes one tensor per input of the op, in call order: for
    an elementwise op any shapes that broadcast, for a tensor op the shapes its dims allow.
    Tensors are on the CPU, all float32 or all float64; the output has their dtype.  Backward
    returns one gradient per input (summed over broadcast axes) and supports double backward.
    ``op`` may be a built-in op's name.

    Raises ``DeviceError`` for a tensor off the CPU, ``DTypeError`` for another dtype,
    ``ArgumentError`` for a wrong number of inputs or a non-tensor, ``ShapeError`` for shapes
    the op does not accept.
    """
    op = _check_op(builtin(op) if isinstance(op, str) else op, "symgrad.torch.function")
    key = op.spec.key
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = _make_function(op)
    return _FUNCTIONS[key]


def _make_function(op: Op) -> type[torch.autograd.Function]:
    def forward(*inputs: torch.Tensor) -> torch.Tensor | None:
        return _tensor(op(*_arrays(op, inputs, op.input_names)))

    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        _check_needed(op, ctx.needs_input_grad)
        return _masked(_vjp(op, ctx.saved_tensors, grad_y), ctx.needs_input_grad)

    doc = f"torch.autograd.Function of the symgrad op {op!r}: ``apply(*tensors)``."
    return type(op.name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "__doc__": doc,
        "__module__": __name__,
    })


def _vjp_function(op: Op) -> type[torch.autograd.Function]:
    """``apply(*inputs, grad_y)`` → the op's VJP, one tensor per input; its backward is the
    VJP of that VJP, from the derived op :func:`symgrad.functional.vjp_op`."""
    key = op.spec.key
    if key in _VJP_FUNCTIONS:
        return _VJP_FUNCTIONS[key]
    n = len(op.input_names)

    def forward(*args: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        *inputs, grad_y = args
        arrays = _arrays(op, inputs, op.input_names)
        return tuple(_tensor(a) for a in op.vjp(*arrays, _array(grad_y, op, "grad_output")))

    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx: Any, *v: torch.Tensor) -> tuple[Any, ...]:
        *inputs, grad_y = ctx.saved_tensors
        derived = vjp_op(op)
        g = grad_y.reshape(1) if derived.scalar_output else grad_y
        one = torch.ones((), dtype=grad_y.dtype)
        # one cotangent per gradient the op computes (integer inputs and inputs outside its
        # wrt have none)
        v_wrt = [
            vk if vk is not None else torch.zeros_like(x)
            for vk, x, has in zip(v, inputs, _differentiable(op), strict=True)
            if has
        ]
        grads = _vjp(derived.op, (*inputs, g, *v_wrt), one)
        return _masked((*grads[:n], grads[n].reshape(grad_y.shape)), ctx.needs_input_grad)

    _VJP_FUNCTIONS[key] = type(f"{op.name}_vjp", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "__doc__": f"The VJP of the symgrad op {op!r}, differentiable again.",
        "__module__": __name__,
    })
    return _VJP_FUNCTIONS[key]


class Module(torch.nn.Module):
    """A symgrad op as a torch layer: some of its inputs are trainable parameters.

    ``Module(op, **params)`` holds one ``torch.nn.Parameter`` per keyword, named after the op
    input it feeds (an ``nn.Parameter`` is used as given; any other value is copied into a new
    one); ``forward(*tensors)`` takes the remaining inputs, in the op's call order.

    >>> import torch, symgrad as sg, symgrad.torch as sgt
    >>> layer = sgt.Module(sg.builtin("linear"), W=torch.zeros(2, 3, dtype=torch.float64),
    ...                    c=torch.ones(2, dtype=torch.float64))
    >>> layer(torch.ones(4, 3, dtype=torch.float64)).shape
    torch.Size([4, 2])
    >>> sorted(name for name, _ in layer.named_parameters())
    ['W', 'c']
    """

    def __init__(self, op: Op | str, **params: Any) -> None:
        super().__init__()
        op = _check_op(builtin(op) if isinstance(op, str) else op, "symgrad.torch.Module")
        unknown = sorted(set(params) - set(op.input_names))
        if unknown:
            raise ArgumentError(
                f"op {op.name!r} has no input(s) {unknown}; its inputs are {list(op.input_names)}"
            )
        self._symgrad_op = op
        self._symgrad_function = function(op)
        for name in op.input_names:
            if name not in params:
                continue
            value = params[name]
            param = (
                value if isinstance(value, torch.nn.Parameter)
                else torch.nn.Parameter(torch.as_tensor(value).clone())
            )
            try:
                self.register_parameter(name, param)
            except KeyError as err:
                raise ArgumentError(
                    f"op {op.name!r}: input {name!r} cannot be a parameter name of a torch "
                    f"module ({err.args[0]}); rename the op's input"
                ) from None
        self.input_names = tuple(n for n in op.input_names if n not in params)

    @property
    def op(self) -> Op:
        """The symgrad op this layer runs."""
        return self._symgrad_op

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ArgumentError(
                f"{type(self).__name__} of op {self.op.name!r} takes {len(self.input_names)} "
                f"tensor(s) ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        given = dict(zip(self.input_names, inputs, strict=True))
        args = [given[n] if n in given else getattr(self, n) for n in self.op.input_names]
        return self._symgrad_function.apply(*args)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        params = [n for n in self.op.input_names if n not in self.input_names]
        text = f"{self.op.name}({', '.join(self.op.input_names)})"
        return text + (f", parameters={params}" if params else "")
