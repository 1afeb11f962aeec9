"""Modules: parameters, layers and containers whose every gradient was derived symbolically.

A module's ``forward(x)`` returns its output and a context; ``backward(ctx, grad_y)``
accumulates the gradients of its parameters (those with ``requires_grad``) and returns the
gradient of its input.  Every VJP is a compiled op from :mod:`symgrad.builtins` or a user
formula — nothing here differentiates by hand.  Weights use torch's layout and names
(``weight`` is ``(out_features, in_features)``; a ``Sequential``'s children are ``0``, ``1``, ...)
so state dicts copy across.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ArgumentError, DTypeError, ShapeError, SymgradError, UnsupportedStepError
from ..runtime.elementwise import ElementwiseOp

if TYPE_CHECKING:
    from .tape import Tape

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


#: The modules compiled steps traced, by id (an entry goes with its module), and how many times
#: one of them has been edited since the process started: see :func:`watch`.
_WATCHED: weakref.WeakValueDictionary[int, Module] = weakref.WeakValueDictionary()
_EDITS = [0]


def watch(model: Module) -> None:
    """Count the edits of ``model`` and of every module in it from now on (:func:`edit_count`):
    an attribute set (a layer or parameter replaced, a setting changed, ``train()`` /
    ``eval()``) or a ``Sequential`` item replaced.  A compiled step watches the model it
    traced and traces it again after an edit (changes made in place inside an attribute, such
    as a custom module's own list of layers, are not seen)."""
    for module in model.modules():
        _WATCHED[id(module)] = module


def edit_count() -> int:
    """How many times a watched module has been edited in this process (see :func:`watch`)."""
    return _EDITS[0]


def _edited(module: Module) -> None:
    if id(module) in _WATCHED:
        _EDITS[0] += 1


#: The attribute under which :func:`symgrad.train.fit` keeps a model's compiled steps between
#: calls (left out of copies and pickles).
STEP_CACHE = "_fit_steps"


class UnsupportedModuleError(UnsupportedStepError):
    """A module that cannot record its forward on a :class:`~symgrad.nn.Tape` (so neither the
    tape's reverse mode nor the step compiler can take it)."""


def _builtin(name: str, **params: Any) -> Any:
    """The built-in op ``name``.  Imported here, not at module level: modules build their ops
    on first use, so a process that runs a fused step from a warm cache never loads SymPy."""
    from ..api import builtin

    return builtin(name, **params)


def _layer_vjp(op: Any, need_input_grad: bool, *arrays_and_grad: Any) -> tuple[Any, ...]:
    """``op``'s VJP at a layer's input, its parameters and the output's gradient; without the
    input's gradient when ``need_input_grad`` is false and the input is large
    (:func:`symgrad.api.for_gradients`: a network's first layer)."""
    from ..api import for_gradients

    arrays = arrays_and_grad[:-1]
    needed = [need_input_grad] + [True] * (len(arrays) - 1)
    return tuple(for_gradients(op, arrays, needed).vjp(*arrays_and_grad))


class _LazyBuiltin:
    """Mixin of a layer or loss backed by the built-in elementwise op ``op_name`` with the
    parameters ``_params``: the op is built on first use, and its structure (a key part of the
    fused step's manifest) needs no SymPy."""

    op_name = ""
    _params: dict[str, float]  # set by the subclass's __init__

    def _build(self) -> ElementwiseOp:
        options: dict[str, Any] = dict(self._params)  # torch's parameters, never ``wrt``
        op = _builtin(self.op_name, **options)
        assert isinstance(op, ElementwiseOp)
        return op

    def structure(self) -> str:
        return f"builtin:{self.op_name}:{sorted(self._params.items())}"


class StateDictError(SymgradError, KeyError):
    """A state dict does not match a module's parameters (names or shapes)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _FLOATS:
        raise DTypeError(f"modules compute in float32 or float64, got dtype {dt}")
    return dt


def check_integer(what: str, value: object) -> int:
    """``value`` as an ``int`` if it is an integer (Python's or NumPy's; a bool is not one);
    else an :class:`ArgumentError` naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


class Parameter:
    """A trainable array with its gradient: ``data``, ``grad`` (or None), ``requires_grad``."""

    def __init__(self, data: np.ndarray, requires_grad: bool = True) -> None:
        self.data = np.ascontiguousarray(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = requires_grad
        self._hooks: dict[int, Callable[[Parameter], None]] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def accumulate(self, grad: np.ndarray) -> None:
        """Add ``grad`` to ``self.grad`` (gradients accumulate until ``zero_grad``)."""
        if not self.requires_grad:
            return
        if self.grad is None:
            self.grad = np.array(grad, dtype=self.data.dtype, copy=True)
        else:
            self.grad += grad
        for hook in tuple(self._hooks.values()):
            hook(self)

    def register_post_accumulate_grad_hook(self, hook: Callable[[Parameter], None]) -> HookHandle:
        """Call ``hook(parameter)`` after every gradient added to ``grad`` (torch's
        ``register_post_accumulate_grad_hook``); ``handle.remove()`` unregisters it.  A
        data-parallel reducer sends a gradient as soon as it is complete this way
        (:mod:`symgrad.distributed`)."""
        key = max(self._hooks, default=-1) + 1
        self._hooks[key] = hook
        return HookHandle(self._hooks, key)

    def __repr__(self) -> str:
        flag = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype}{flag})"


class HookHandle:
    """What registering a hook returns: ``remove()`` unregisters it (again: a no-op)."""

    def __init__(self, hooks: dict[int, Any], key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


class Module:
    """Base class: parameters and child modules found by attribute, torch-style naming."""

    def __init__(self) -> None:
        self.training = True

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        _edited(self)

    def __getstate__(self) -> dict[str, Any]:
        """The module's attributes without the compiled steps ``fit`` keeps for it (a copy or
        a pickle of a module compiles its own)."""
        state = self.__dict__.copy()
        state.pop(STEP_CACHE, None)
        return state

    # -- structure -------------------------------------------------------------------------

    def modules(self) -> Iterator[Module]:
        """This module and every module in it, each once, parents first (as in torch)."""
        seen: set[int] = set()
        stack: list[Module] = [self]
        while stack:
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield module
            stack.extend(reversed([child for _, child in module.children()]))

    def children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.data.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, flag: bool = True) -> Module:
        """Freeze (``False``) or unfreeze every parameter of this module."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, named as torch names them."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load parameters by name; arrays (or torch tensors) are cast to each parameter's dtype.

        Every name and shape is checked before anything is written.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise StateDictError(
                f"state dict does not match the module: missing {missing}, unexpected {unexpected}"
            )
        arrays = {}
        for name, p in params.items():
            value = state[name]
            array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
            if array.shape != p.shape:
                raise StateDictError(
                    f"state dict entry {name!r} has shape {array.shape}, the parameter has "
                    f"shape {p.shape}"
                )
            arrays[name] = array
        for name, p in params.items():
            p.data = np.ascontiguousarray(arrays[name], dtype=p.data.dtype)

    # -- computation -----------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def backward(
        self, ctx: Any, grad_y: np.ndarray, need_input_grad: bool = True
    ) -> np.ndarray | None:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        """The forward, every op recorded on ``tape`` (see :class:`~symgrad.nn.Tape`): what the
        step compiler traces (:func:`symgrad.compile.compile_step`).

        Every array the output depends on must come from ``inputs``, a parameter, or a
        recorded op; an array computed otherwise (NumPy on an input) would be a constant of a
        compiled step.
        """
        raise UnsupportedModuleError(
            f"{type(self).__name__} does not record its forward on a tape (no record method); "
            "train it with symgrad.train.fit(..., compiled=False)"
        )

    def _inputs(self, inputs: tuple[np.ndarray, ...], count: int) -> tuple[np.ndarray, ...]:
        """``inputs`` if there are ``count`` of them, else a ShapeError naming the module."""
        if len(inputs) != count:
            raise ShapeError(
                f"{type(self).__name__} takes {count} input array(s), got {len(inputs)} "
                "(a training step takes the model's inputs, then the target)"
            )
        return inputs

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        kids = list(self.children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not kids:
            return head + ")"
        lines = [head]
        for name, child in kids:
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        return "\n".join(lines) + "\n)"


def _uniform(
    rng: np.random.Generator, bound: float, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Linear(Module):
    """``y = x Wᵀ + b``; ``x: (batch, in_features)`` → ``y: (batch, out_features)``.

    Initialised as torch does: ``W, b ~ U(-1/√in, 1/√in)`` (kaiming-uniform with a = √5).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: Any = np.float32,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        in_features = check_integer("Linear's in_features", in_features)
        out_features = check_integer("Linear's out_features", out_features)
        if in_features < 1 or out_features < 1:
            raise ShapeError(f"Linear needs positive sizes, got ({in_features}, {out_features})")
        dt = _check_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / np.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features), dt))
        self.bias = Parameter(_uniform(rng, bound, (out_features,), dt)) if bias else None
        self._op_name = "linear" if bias else "linear_nobias"
        self._built: Any = None

    @property
    def _op(self) -> Any:
        """The layer's op (``linear``, or ``linear_nobias``), built on first use."""
        if self._built is None:
            self._built = _builtin(self._op_name)
        return self._built

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ShapeError(
                f"Linear({self.in_features}, {self.out_features}) expects input of shape "
                f"(batch, {self.in_features}), got {x.shape}"
            )
        if x.dtype != self.weight.data.dtype:
            raise DTypeError(
                f"Linear has {self.weight.data.dtype} weights but the input is {x.dtype}; "
                f"cast the input with x.astype(np.{self.weight.data.dtype})"
            )
        return x

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        x = self._check(x)
        if self.bias is not None:
            return self._op(x, self.weight.data, self.bias.data), x
        return self._op(x, self.weight.data), x

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        (x,) = self._inputs(inputs, 1)
        x = self._check(x)
        if self.bias is not None:
            return tape.apply(self._op, x, self.weight, self.bias)
        return tape.apply(self._op, x, self.weight)

    def backward(
        self, ctx: Any, grad_y: np.ndarray, need_input_grad: bool = True
    ) -> np.ndarray | None:
        x = ctx
        if self.bias is not None:
            gx, gw, gb = _layer_vjp(
                self._op, need_input_grad, x, self.weight.data, self.bias.data, grad_y
            )
            self.bias.accumulate(gb)
        else:
            gx, gw = _layer_vjp(self._op, need_input_grad, x, self.weight.data, grad_y)
        self.weight.accumulate(gw)
        return gx if need_input_grad else None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class Elementwise(Module):
    """Any one-input elementwise op (built-in or from :func:`symgrad.elementwise`) as a layer."""

    def __init__(self, op: ElementwiseOp) -> None:
        super().__init__()
        if not isinstance(op, ElementwiseOp) or len(op.input_names) != 1:
            raise SymgradError(
                f"Elementwise wraps a one-input elementwise op, got {op!r}; build one with "
                "symgrad.elementwise(expr, inputs=[x], name=...)"
            )
        self._op: ElementwiseOp | None = op

    @property
    def op(self) -> ElementwiseOp:
        """The elementwise op (a built-in activation's is built on first use)."""
        if self._op is None:
            self._op = self._build()
        return self._op

    def _build(self) -> ElementwiseOp:
        raise NotImplementedError  # pragma: no cover - only built-in activations are lazy

    def structure(self) -> str:
        """What determines this layer's generated code (a key part; no SymPy when built in)."""
        return f"op:{self.op.key}"

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        return self.op(x), x

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        (x,) = self._inputs(inputs, 1)
        return tape.apply(self.op, x)

    def backward(
        self, ctx: Any, grad_y: np.ndarray, need_input_grad: bool = True
    ) -> np.ndarray | None:
        return self.op.vjp(ctx, grad_y)[0] if need_input_grad else None

    def extra_repr(self) -> str:
        consts = ", ".join(f"{k}={v!r}" for k, v in self.op.spec.constants)
        return (
            consts
            if type(self) is not Elementwise
            else self.op.name + (", " + consts if consts else "")
        )


class _BuiltinActivation(_LazyBuiltin, Elementwise):
    """An activation module backed by the built-in op ``op_name`` (parameters as in torch)."""

    def __init__(self, *args: float, **params: float) -> None:
        Module.__init__(self)
        if args:  # positional, in torch's order: LeakyReLU(0.2), Softplus(2.0, 10.0)
            from ..builtins import get_builtin  # SymPy: the op is built right below anyway

            names = list(get_builtin(self.op_name).params)
            if len(args) > len(names):
                raise ArgumentError(
                    f"{type(self).__name__} takes at most {len(names)} positional "
                    f"parameter(s) ({', '.join(names) or 'none'}), got {len(args)}: {args!r}"
                )
            for name, value in zip(names, args, strict=False):
                if name in params:
                    raise ArgumentError(
                        f"{type(self).__name__} got parameter {name!r} twice (positionally "
                        "and by keyword)"
                    )
                params[name] = value
        self._params = dict(params)
        self._op = None
        if params:  # checked now (and built): a misspelt parameter is an error here
            self._op = self._build()


class Tanh(_BuiltinActivation):
    """tanh, elementwise."""

    op_name = "tanh"


class Sigmoid(_BuiltinActivation):
    """The logistic sigmoid, elementwise."""

    op_name = "sigmoid"


class ReLU(_BuiltinActivation):
    """max(x, 0), elementwise; gradient 0 at 0 as in torch."""

    op_name = "relu"


class LeakyReLU(_BuiltinActivation):
    """Leaky ReLU (``negative_slope=0.01``)."""

    op_name = "leaky_relu"


class ELU(_BuiltinActivation):
    """ELU (``alpha=1.0``)."""

    op_name = "elu"


class GELU(_BuiltinActivation):
    """GELU, exact erf form."""

    op_name = "gelu"


class SiLU(_BuiltinActivation):
    """x·σ(x)."""

    op_name = "silu"


class Softplus(_BuiltinActivation):
    """Softplus (``beta=1, threshold=20``), as torch."""

    op_name = "softplus"


class Softsign(_BuiltinActivation):
    """x / (1 + |x|)."""

    op_name = "softsign"


class Hardtanh(_BuiltinActivation):
    """clip(x, min_val, max_val) (default -1, 1)."""

    op_name = "hardtanh"


class LayerNorm(Module):
    """Layer norm over the last axis with affine weight and bias, as ``torch.nn.LayerNorm``."""

    def __init__(
        self, normalized_shape: int, eps: float = 1e-5, *, dtype: Any = np.float32
    ) -> None:
        super().__init__()
        dt = _check_dtype(dtype)
        self.normalized_shape = check_integer("LayerNorm's normalized_shape", normalized_shape)
        if self.normalized_shape < 1:
            raise ShapeError(f"LayerNorm needs a positive size, got {self.normalized_shape}")
        self.eps = eps
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=dt))
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype=dt))
        self._op = _builtin("layer_norm", eps=eps)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.normalized_shape:
            raise ShapeError(
                f"LayerNorm({self.normalized_shape}) expects a last axis of "
                f"{self.normalized_shape}, got input of shape {x.shape}"
            )
        flat = x.reshape(-1, self.normalized_shape)
        return self._op(flat, self.weight.data, self.bias.data).reshape(x.shape), flat

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        (x,) = self._inputs(inputs, 1)
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.normalized_shape:
            raise UnsupportedModuleError(
                f"LayerNorm({self.normalized_shape}) records (batch, {self.normalized_shape}) "
                f"inputs on a tape, got {x.shape}"
            )
        return tape.apply(self._op, x, self.weight, self.bias)

    def backward(
        self, ctx: Any, grad_y: np.ndarray, need_input_grad: bool = True
    ) -> np.ndarray | None:
        flat = ctx
        gx, gw, gb = _layer_vjp(
            self._op, need_input_grad, flat, self.weight.data, self.bias.data,
            grad_y.reshape(flat.shape),
        )  # fmt: skip
        self.weight.accumulate(gw)
        self.bias.accumulate(gb)
        return gx.reshape(grad_y.shape) if need_input_grad else None

    def extra_repr(self) -> str:
        return f"({self.normalized_shape},), eps={self.eps}"


class Sequential(Module):
    """Modules applied in order; children are named ``0``, ``1``, ... as in torch."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for module in modules:
            if not isinstance(module, Module):
                raise SymgradError(f"Sequential takes modules, got {module!r}")
        self._modules = list(modules)

    def children(self) -> Iterator[tuple[str, Module]]:
        for k, module in enumerate(self._modules):
            yield str(k), module

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return Sequential(*self._modules[index])
        return self._modules[index]

    def __setitem__(self, index: int, module: Module) -> None:
        if not isinstance(module, Module):
            raise SymgradError(f"Sequential takes modules, got {module!r}")
        self._modules[index] = module
        _edited(self)

    def __len__(self) -> int:
        return len(self._modules)

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        (x,) = self._inputs(inputs, 1)
        for module in self._modules:
            x = module.record(tape, x)
        return x

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        ctxs = []
        for module in self._modules:
            x, ctx = module.forward(x)
            ctxs.append(ctx)
        return x, ctxs

    def backward(
        self, ctx: Any, grad_y: np.ndarray, need_input_grad: bool = True
    ) -> np.ndarray | None:
        # Stop at the first module below which nothing is trainable: a frozen body costs no
        # backward pass at all.
        trainable = [any(p.requires_grad for p in m.parameters()) for m in self._modules]
        lowest = next((k for k, t in enumerate(trainable) if t), len(self._modules))
        stop = 0 if need_input_grad else lowest
        grad: np.ndarray | None = grad_y
        for k in range(len(self._modules) - 1, stop - 1, -1):
            assert grad is not None
            grad = self._modules[k].backward(
                ctx[k], grad, need_input_grad=k > stop or need_input_grad
            )
        return grad if need_input_grad else None
