"""FusedStep: a whole training step (forward, backward, update) as one compiled function.

``compile_step(model, loss, optimizer)`` plans the step of a ``Sequential`` of ``Linear``
layers and one-input elementwise activations, a loss (``CrossEntropyLoss`` or an elementwise
loss, after fusing a trailing activation into it) and an optimizer (``SGD``, ``Adam``,
``AdamW``), generates it with :mod:`symgrad.codegen.step`, and returns a callable
``step(x, y) -> loss`` that updates the parameters in place.  Buffers are preallocated and
reused; the optimizer's state lives in ``optimizer.state`` exactly as in the layer-by-layer
path, so the two paths can be mixed and checkpoints work.  Parameter ``.grad`` is not filled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy as sp

from ..codegen.step import KernelCall, StepPlan, elementwise_loop, emit_step
from ..errors import ShapeError, SymgradError
from ..nn.losses import CrossEntropyLoss, ElementwiseLoss, Loss, fuse
from ..nn.modules import Elementwise, Linear, Module, Sequential
from ..optim import SGD, Adam, Optimizer
from .cache import import_module, module_path, verified_text, write_source
from .tensor import TensorOp

_PAD = "    "


class UnsupportedStepError(SymgradError, TypeError):
    """A model, loss or optimizer the fused step cannot compile (use ``fit`` instead)."""


@dataclass
class _Buffers:
    capacity: int
    dtype: np.dtype
    arrays: dict[str, np.ndarray]
    per_example: frozenset[str]  # buffers whose first axis is the batch


def _module_name(op: Any) -> str:
    if op._module is None:
        op._module = import_module(op._path)
    return str(op._module.__name__)


def _dims(op: TensorOp, args: list[str]) -> list[str]:
    """Each dim of ``op`` as ``arg.shape[axis]`` of the first argument that carries it."""
    out = []
    for dim in op.spec.dims:
        for arg, base in zip(args, op.spec.inputs, strict=True):
            shape = [sp.sympify(d) for d in base.shape]
            if dim in shape:
                out.append(f"{arg}.shape[{shape.index(dim)}]")
                break
    return out


class FusedStep:
    """A compiled training step; call ``step(x, y)`` → the batch loss (a float)."""

    def __init__(self, model: Module, loss: Loss, optimizer: Optimizer) -> None:
        body, objective = fuse(model, loss)
        if not isinstance(body, Sequential):
            raise UnsupportedStepError("the fused step compiles a Sequential model")
        self.model, self.optimizer = model, optimizer
        self.layers = [body[k] for k in range(len(body))]
        for k, layer in enumerate(self.layers):
            if not isinstance(layer, (Linear, Elementwise)):
                raise UnsupportedStepError(
                    f"layer {k} ({type(layer).__name__}) is not supported by the fused step "
                    "(Linear and elementwise activations are); train with symgrad.train.fit"
                )
        if not any(isinstance(layer, Linear) for layer in self.layers):
            raise UnsupportedStepError("the fused step needs at least one Linear layer")
        if not isinstance(objective, (CrossEntropyLoss, ElementwiseLoss)):
            raise UnsupportedStepError(f"loss {objective!r} is not supported by the fused step")
        self.loss: CrossEntropyLoss | ElementwiseLoss = objective
        if not isinstance(optimizer, (SGD, Adam)):
            raise UnsupportedStepError(f"optimizer {type(optimizer).__name__} is not supported")
        owned = {id(p) for p in model.parameters()}
        self._opt_index = {id(p): k for k, p in enumerate(optimizer.params) if id(p) in owned}
        self._buffers: _Buffers | None = None
        self._views: dict[int, dict[str, np.ndarray]] = {}
        self._cached: tuple[tuple[int, ...], list[Any]] | None = None
        self._slots: dict[str, int] = {}
        self._fn: Any = None
        self._args: list[str] = []

    # -- planning --------------------------------------------------------------------------

    def _trainable(self, layer: Linear) -> list[tuple[str, Any]]:
        params = [("W", layer.weight)] + ([("b", layer.bias)] if layer.bias is not None else [])
        return [(n, p) for n, p in params if p.requires_grad and id(p) in self._opt_index]

    def _key(self) -> str:
        parts = [__name__, type(self.optimizer).__name__]
        for layer in self.layers:
            if isinstance(layer, Linear):
                parts.append(f"linear:{layer._op.spec.key}:{layer.bias is not None}")
                parts.append(",".join(n for n, _ in self._trainable(layer)))
            else:
                parts.append(f"act:{layer.op.spec.key}")
        parts.append(f"loss:{self.loss.op.spec.key}")
        for op in self._optimizer_ops():
            parts.append(f"opt:{op.spec.key}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _optimizer_ops(self) -> list[Any]:
        opt = self.optimizer
        if isinstance(opt, SGD):
            return [opt._decayed, opt._buffer, opt._step]
        assert isinstance(opt, Adam)
        return [opt._m, opt._v, opt._step]

    def _plan(self, with_code: bool) -> StepPlan:
        """Arguments (always) and code lines (``with_code``) of the step function."""
        plan = StepPlan("fused_step")
        args = plan.params
        args += ["x", "target"]
        a = "x"  # the current activation buffer
        blocks: list[list[str]] = []  # each layer's backward lines, in forward order
        for k, layer in enumerate(self.layers):
            out = f"h{k}"
            plan.backward = []
            if isinstance(layer, Linear):
                args += [f"W{k}"] + ([f"b{k}"] if layer.bias is not None else [])
                args += [f"gW{k}"] + ([f"gb{k}"] if layer.bias is not None else [])
                args += [out, f"g{k}"]
                if layer.bias is None:
                    args.append(f"gWT{k}")
                if with_code:
                    self._linear_code(plan, k, layer, a, out)
            else:
                args += [out, f"d{k}", f"g{k}"]
                if with_code:
                    self._activation_code(plan, k, layer, a, out)
            blocks.append(plan.backward)
            a = out
        plan.backward = [line for block in reversed(blocks) for line in block]
        args += ["g_in"]  # the gradient of the input (computed by the first layer's VJP)
        if isinstance(self.loss, CrossEntropyLoss):
            args += ["losses", "grad_rows", "grad_target"]
        if with_code:
            self._loss_code(plan, a)
        self._update_args_and_code(plan, with_code)
        return plan

    def _linear_code(self, plan: StepPlan, k: int, layer: Linear, a: str, out: str) -> None:
        op = layer._op
        assert isinstance(op, TensorOp)
        module = _module_name(op)
        plan.imports += [
            KernelCall(module, "forward", f"lin{k}_forward"),
            KernelCall(module, "vjp", f"lin{k}_vjp"),
        ]
        g_in = "g_in" if k == 0 else f"g{k - 1}"
        if layer.bias is not None:
            call_args = [a, f"W{k}", f"b{k}"]
            dims = ", ".join(_dims(op, call_args))
            plan.forward.append(f"{_PAD}lin{k}_forward({a}, W{k}, b{k}, {dims}, {out})")
            plan.backward.append(
                f"{_PAD}lin{k}_vjp({a}, W{k}, b{k}, {dims}, g{k}, {g_in}, gW{k}, gb{k})"
            )
        else:  # matmul with the transposed weight; its gradient is transposed back
            call_args = [a, f"W{k}.T"]
            dims = ", ".join(_dims(op, call_args))
            plan.forward.append(f"{_PAD}lin{k}_forward({a}, W{k}.T, {dims}, {out})")
            plan.backward.append(f"{_PAD}lin{k}_vjp({a}, W{k}.T, {dims}, g{k}, {g_in}, gWT{k})")
            plan.backward.append(f"{_PAD}gW{k}[:, :] = gWT{k}.T")

    def _activation_code(
        self, plan: StepPlan, k: int, layer: Elementwise, a: str, out: str
    ) -> None:
        derivation = layer.op.derivation()
        (x,) = layer.op.spec.inputs
        n = f"{a}.size"
        flat = [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in (a, out, f"d{k}")]
        plan.forward += flat
        plan.forward += elementwise_loop(
            plan,
            layer.op.name,
            n,
            {x: f"{a}f"},
            [
                [
                    (f"{out}f[i]", derivation.stable_forward),
                    (f"d{k}f[i]", derivation.partials[0].final),
                ]
            ],
            _PAD,
        )
        g_in = "g_in" if k == 0 else f"g{k - 1}"
        plan.backward += [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in (g_in, f"g{k}", f"d{k}")]
        plan.backward += [
            f"{_PAD}for i in range({n}):",  # the chain rule: incoming gradient × local partial
            f"{_PAD}{_PAD}{g_in}f[i] = g{k}f[i] * d{k}f[i]",
        ]

    def _loss_code(self, plan: StepPlan, logits: str) -> None:
        last = len(self.layers) - 1
        if isinstance(self.loss, CrossEntropyLoss):
            op = self.loss.op
            assert isinstance(op, TensorOp)
            module = _module_name(op)
            plan.imports += [
                KernelCall(module, "forward", "loss_forward"),
                KernelCall(module, "vjp", "loss_vjp"),
            ]
            dims = ", ".join(_dims(op, [logits, "target"]))
            plan.loss += [
                f"{_PAD}loss_forward({logits}, target, {dims}, losses)",
                f"{_PAD}loss = 0.0",
                f"{_PAD}for r in range(losses.shape[0]):",
                f"{_PAD}{_PAD}loss += losses[r]",
                f"{_PAD}loss = loss / losses.shape[0]",
                f"{_PAD}loss_vjp({logits}, target, {dims}, grad_rows, g{last}, grad_target)",
            ]
            return
        op = self.loss.op
        derivation = op.derivation()
        z, y = op.spec.inputs
        inv_n = sp.Symbol("inv_n", real=True)
        plan.loss += [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in (logits, "target", f"g{last}")]
        plan.loss += [f"{_PAD}inv_n = 1.0 / {logits}.size", f"{_PAD}loss = 0.0"]
        plan.loss += elementwise_loop(
            plan,
            op.name,
            f"{logits}.size",
            {z: f"{logits}f", y: "targetf"},
            [
                [
                    ("value", derivation.stable_forward),
                    (f"g{last}f[i]", derivation.partials[0].final * inv_n),
                ]
            ],
            _PAD,
            accumulate={"value": "loss"},
        )
        plan.loss.append(f"{_PAD}loss = loss * inv_n")

    def _update_args_and_code(self, plan: StepPlan, with_code: bool) -> None:
        opt = self.optimizer
        if isinstance(opt, SGD) and opt.momentum != 0:
            plan.params.append("first")
        if isinstance(opt, Adam):
            plan.params += ["adam_s", "adam_c"]
        for k, layer in enumerate(self.layers):
            if not isinstance(layer, Linear):
                continue
            for name, _ in self._trainable(layer):
                p, g = f"{name}{k}", f"g{name}{k}"
                state = self._state_names(p)
                plan.params += state
                if with_code:
                    plan.update += self._update_code(plan, p, g, state)

    def _state_names(self, p: str) -> list[str]:
        opt = self.optimizer
        if isinstance(opt, SGD):
            return [f"buf_{p}"] if opt.momentum != 0 else []
        return [f"m_{p}", f"v_{p}"]

    def _update_code(self, plan: StepPlan, p: str, g: str, state: list[str]) -> list[str]:
        opt = self.optimizer
        arrays = [p, g, *state]
        lines = [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in arrays]
        n = f"{p}.size"
        if isinstance(opt, SGD):
            step = opt._step.derivation().stable_forward
            p_, g_, b = (sp.Symbol(n_, real=True) for n_ in ("p", "g", "b"))
            if opt.momentum == 0:
                return lines + elementwise_loop(
                    plan, "sgd", n, {p_: f"{p}f", g_: f"{g}f"}, [[(f"{p}f[i]", step)]], _PAD
                )
            buf = state[0]
            first = opt._decayed.derivation().stable_forward
            later = opt._buffer.derivation().stable_forward
            loads = {p_: f"{p}f", g_: f"{g}f", b: f"{buf}f"}
            new_b = sp.Symbol("new_b", real=True)  # the new buffer, then the step that uses it
            out = []
            for branch, rule in (("if first:", first), ("else:", later)):
                out.append(f"{_PAD}{branch}")
                out += elementwise_loop(
                    plan,
                    "sgd",
                    n,
                    loads,
                    [
                        [("new_b", rule)],
                        [(f"{buf}f[i]", new_b), (f"{p}f[i]", step.xreplace({b: new_b}))],
                    ],
                    _PAD + _PAD,
                )
            return lines + out
        assert isinstance(opt, Adam)
        m_rule = opt._m.derivation().stable_forward
        v_rule = opt._v.derivation().stable_forward
        step = opt._step.derivation().stable_forward
        m, v, s, c = (sp.Symbol(n_, real=True) for n_ in ("m", "v", "s", "c"))
        new_m, new_v = sp.Symbol("new_m", real=True), sp.Symbol("new_v", real=True)
        scalars = {s: sp.Symbol("adam_s", real=True), c: sp.Symbol("adam_c", real=True)}
        update = step.xreplace({m: new_m, v: new_v, **scalars})
        loads = {
            sp.Symbol("p", real=True): f"{p}f",
            sp.Symbol("g", real=True): f"{g}f",
            m: f"{state[0]}f",
            v: f"{state[1]}f",
        }
        return lines + elementwise_loop(
            plan,
            "adam",
            n,
            loads,
            [
                [("new_m", m_rule)],
                [("new_v", v_rule)],
                [(f"{state[0]}f[i]", new_m), (f"{state[1]}f[i]", new_v), (f"{p}f[i]", update)],
            ],
            _PAD,
        )

    # -- compile and run -------------------------------------------------------------------

    def _compile(self) -> None:
        key = self._key()
        path = module_path("fused_step", key)
        if verified_text(path) is None:
            write_source(path, emit_step(self._plan(with_code=True), key).text)
            plan = self._plan(with_code=False)
        else:
            plan = self._plan(with_code=False)
            for layer in self.layers:  # the step imports the layers' kernel modules by name
                if isinstance(layer, Linear):
                    _module_name(layer._op)
            if isinstance(self.loss, CrossEntropyLoss):
                _module_name(self.loss.op)
        self._args = plan.params
        self._fn = import_module(path).step

    def _allocate(self, batch: int, dtype: np.dtype, in_features: int) -> _Buffers:
        arrays: dict[str, np.ndarray] = {}
        width = in_features
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                width = layer.out_features
                arrays[f"gW{k}"] = np.zeros(layer.weight.shape, dtype)
                if layer.bias is not None:
                    arrays[f"gb{k}"] = np.zeros(layer.bias.shape, dtype)
                else:
                    arrays[f"gWT{k}"] = np.zeros(layer.weight.shape[::-1], dtype)
            else:
                arrays[f"d{k}"] = np.zeros((batch, width), dtype)
            arrays[f"h{k}"] = np.zeros((batch, width), dtype)
            arrays[f"g{k}"] = np.zeros((batch, width), dtype)
        arrays["g_in"] = np.zeros((batch, in_features), dtype)
        arrays["target"] = np.zeros((batch, width), dtype)
        arrays["losses"] = np.zeros(batch, dtype)
        arrays["grad_rows"] = np.zeros(batch, dtype)
        arrays["grad_target"] = np.zeros((batch, width), dtype)
        shared = {k for k in arrays if k.startswith(("gW", "gb"))}
        return _Buffers(batch, dtype, arrays, frozenset(set(arrays) - shared))

    def _state(self, p: Any) -> dict[str, Any]:
        return self.optimizer.state[self._opt_index[id(p)]]

    def __call__(self, x: np.ndarray, y: np.ndarray) -> float:
        """One step on the batch ``(x, y)``: parameters and optimizer state updated in place."""
        if self._fn is None:
            self._compile()
        first = next(lay for lay in self.layers if isinstance(lay, Linear))
        x = np.ascontiguousarray(x)
        dtype = first.weight.data.dtype
        if x.ndim != 2 or x.shape[1] != first.in_features or x.dtype != dtype:
            raise ShapeError(
                f"the fused step expects x of shape (batch, {first.in_features}) and dtype "
                f"{dtype}, got {x.shape} {x.dtype}"
            )
        batch = x.shape[0]
        buffers = self._buffers
        if buffers is None or buffers.capacity < batch or buffers.dtype != dtype:
            buffers = self._buffers = self._allocate(batch, dtype, first.in_features)
            self._views = {}
        views = self._views.get(batch)
        if views is None:  # the first `batch` rows of every per-example buffer
            views = self._views[batch] = {
                k: v[:batch] if k in buffers.per_example else v for k, v in buffers.arrays.items()
            }
        target = views["target"]
        if isinstance(self.loss, CrossEntropyLoss):
            labels = np.asarray(y)
            if labels.shape != (batch,) or labels.dtype.kind not in "iu":
                raise ShapeError(
                    f"expected {batch} integer labels, got {labels.shape} {labels.dtype}"
                )
            classes = target.shape[1]
            if batch and (labels.min() < 0 or labels.max() >= classes):
                raise SymgradError(f"labels must lie in [0, {classes})")
            target.fill(0)
            target[np.arange(batch), labels] = 1
            views["grad_rows"].fill(1.0 / batch)
        else:
            values = np.asarray(y, dtype=dtype)
            if values.shape != target.shape:
                raise ShapeError(f"targets of shape {target.shape} expected, got {values.shape}")
            target[...] = values
        return float(self._fn(*self._arguments(views, x)))

    def _arguments(self, views: dict[str, np.ndarray], x: np.ndarray) -> list[Any]:
        """The step's arguments; the list is reused while the arrays stay the same objects."""
        opt = self.optimizer
        trainable = [
            (k, name, p)
            for k, layer in enumerate(self.layers)
            if isinstance(layer, Linear)
            for name, p in self._trainable(layer)
        ]
        states = [self._state(p) for _, _, p in trainable]
        first_step = any(
            ("momentum_buffer" if isinstance(opt, SGD) else "step") not in st for st in states
        )
        for (_, _, p), state in zip(trainable, states, strict=True):
            if isinstance(opt, SGD) and opt.momentum != 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = np.zeros_like(p.data)
            elif isinstance(opt, Adam):
                if "step" not in state:
                    state.update(
                        step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data)
                    )
                state["step"] += 1
        arrays = [lay.weight.data for lay in self.layers if isinstance(lay, Linear)]
        arrays += [
            lay.bias.data for lay in self.layers if isinstance(lay, Linear) and lay.bias is not None
        ]
        arrays += [a for st in states for a in st.values() if isinstance(a, np.ndarray)]
        key = (id(views), *map(id, arrays))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._argument_list(views, trainable, states))
        args = self._cached[1]
        slots = self._slots
        args[slots["x"]] = x
        if "first" in slots:
            args[slots["first"]] = first_step
        if isinstance(opt, Adam):
            t = states[0]["step"]
            beta1, beta2 = opt.betas
            args[slots["adam_s"]] = opt.lr / (1 - beta1**t)
            args[slots["adam_c"]] = (1 - beta2**t) ** 0.5
        return args

    def _argument_list(
        self,
        views: dict[str, np.ndarray],
        trainable: list[tuple[int, str, Any]],
        states: list[dict[str, Any]],
    ) -> list[Any]:
        values: dict[str, Any] = dict(views)
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                values[f"W{k}"] = layer.weight.data
                if layer.bias is not None:
                    values[f"b{k}"] = layer.bias.data
        for (k, name, _), state in zip(trainable, states, strict=True):
            if "momentum_buffer" in state:
                values[f"buf_{name}{k}"] = state["momentum_buffer"]
            if "exp_avg" in state:
                values[f"m_{name}{k}"] = state["exp_avg"]
                values[f"v_{name}{k}"] = state["exp_avg_sq"]
        values.update(x=None, first=False, adam_s=0.0, adam_c=1.0)
        self._slots = {
            n: self._args.index(n) for n in ("x", "first", "adam_s", "adam_c") if n in self._args
        }
        return [values[name] for name in self._args]


def compile_step(model: Module, loss: Loss, optimizer: Optimizer) -> FusedStep:
    """One compiled function per training step of ``model`` + ``loss`` + ``optimizer``.

    >>> import numpy as np
    >>> from symgrad import nn, optim
    >>> from symgrad.runtime.step import compile_step
    >>> rng = np.random.default_rng(0)
    >>> model = nn.Sequential(nn.Linear(4, 8, dtype=np.float64, rng=rng), nn.Tanh(),
    ...                       nn.Linear(8, 3, dtype=np.float64, rng=rng))
    >>> step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    >>> x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    >>> first, second = step(x, y), step(x, y)
    >>> second < first
    True
    """
    return FusedStep(model, loss, optimizer)
