"""FusedStep: a whole training step (forward, backward, update) as one compiled function.

``compile_step(model, loss, optimizer)`` plans the step of a ``Sequential`` of ``Linear``
layers and one-input elementwise activations, a loss (``CrossEntropyLoss`` or an elementwise
loss, after fusing a trailing activation into it) and an optimizer (any symgrad optimizer: its
:class:`~symgrad.symbolic.update.UpdateRule` is compiled into the step's update loops by
:mod:`symgrad.codegen.update`), generates it with :mod:`symgrad.codegen.step`, and returns a
callable ``step(x, y) -> loss`` that updates the parameters in place.  Buffers are preallocated
and reused; the optimizer's state lives in ``optimizer.state`` exactly as in the layer-by-layer
path, so the two paths can be mixed and checkpoints work.  Parameter ``.grad`` is not filled.

Every hyperparameter of every parameter group (``lr``, ``momentum``, ``betas``...) is an
argument of the step, read on each call: a scheduler, or a rate changed by hand, takes effect
without compiling anything.  With ``clip_grad_norm=max_norm`` the step computes the global norm
of the gradients after the backward pass and scales them by ``min(max_norm/(norm + 1e-6), 1)``
in the update loops (``step.grad_norm`` holds the norm before clipping, as torch's
``clip_grad_norm_`` returns it); with ``clip_grad_value=c`` it clamps them into ``[-c, c]``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..codegen.dtypes import kernel_name
from ..errors import IndexRangeError, ShapeError, SymgradError
from ..nn.losses import CrossEntropyLoss, ElementwiseLoss, Loss, fuse
from ..nn.modules import Elementwise, Linear, Module, Sequential
from .cache import (
    atomic_write,
    cache_dir,
    ensure_imported,
    module_path,
    toolchain_fingerprint,
    verified_text,
    write_source,
)

# Planning and emitting a step derives and prints formulas (SymPy); running one from a warm
# cache does not, so those imports happen inside the cold path (see FusedStep._compile).
if TYPE_CHECKING:
    from ..codegen.step import StepPlan
    from ..optim.optimizer import Optimizer
    from .tensor import TensorOp

_PAD = "    "
_LINEAR_INPUTS = {True: ("X", "W", "c"), False: ("X", "W")}  # linear / linear_nobias inputs


class UnsupportedStepError(SymgradError, TypeError):
    """A model, loss or optimizer the fused step cannot compile (use ``fit`` instead)."""


@dataclass
class _Buffers:
    capacity: int
    dtype: np.dtype
    arrays: dict[str, np.ndarray]
    per_example: frozenset[str]  # buffers whose first axis is the batch


def _module_name(op: Any) -> str:
    return str(op.module.__name__)


def _dims(op: TensorOp, args: list[str]) -> list[str]:
    """Each dim of ``op`` as ``arg.shape[axis]`` of the first argument that carries it."""
    import sympy as sp

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

    def __init__(
        self,
        model: Module,
        loss: Loss,
        optimizer: Optimizer,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
    ) -> None:
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
        linear = [layer for layer in self.layers if isinstance(layer, Linear)]
        if not linear:
            raise UnsupportedStepError("the fused step needs at least one Linear layer")
        self._first: Linear = linear[0]
        if not isinstance(objective, (CrossEntropyLoss, ElementwiseLoss)):
            raise UnsupportedStepError(f"loss {objective!r} is not supported by the fused step")
        self.loss: CrossEntropyLoss | ElementwiseLoss = objective
        if not hasattr(optimizer, "rule") or not hasattr(optimizer, "param_groups"):
            raise UnsupportedStepError(
                f"optimizer {type(optimizer).__name__} is not a symgrad optimizer (one with an "
                "update rule and parameter groups)"
            )
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self._clip = self._clip_kind()
        self._optimized: set[int] = set()  # ids of the parameters the optimizer updates
        self._buffers: _Buffers | None = None
        self._views: dict[int, dict[str, np.ndarray]] = {}
        self._cached: tuple[tuple[int, ...], list[Any]] | None = None
        self._fn: Any = None
        self._args: list[str] = []
        self._ops: dict[int, TensorOp] = {}
        self._gemm_ops: dict[int, TensorOp] = {}  # layers whose bias joins the activation loop
        self._lowest = len(self.layers)
        self._dtype = np.dtype(np.float64)
        self._params = model.parameters()
        self._flags: tuple[bool, ...] = ()
        self._grad_norm = np.zeros(1)
        self._inactive: dict[int, np.ndarray] = {}  # a stand-in for a state that is off
        self._scalars = np.zeros((0, 0))
        self._group_shape: tuple[tuple[int, int], ...] = ()
        self._group_of: list[int] = []

    # -- planning --------------------------------------------------------------------------

    def _trainable(self, layer: Linear) -> list[tuple[str, Any]]:
        params = [("W", layer.weight)] + ([("b", layer.bias)] if layer.bias is not None else [])
        return [(n, p) for n, p in params if p.requires_grad and id(p) in self._optimized]

    def _select_ops(self) -> None:
        """Each linear layer's op, with only the gradients the step uses.

        The backward pass stops at the lowest layer with a parameter to train: layers below
        it run forward only, that layer's VJP computes no input gradient, and a frozen layer
        above it only its input's — kernels derived with ``wrt``, not the layer's full VJP.
        """
        from ..api import builtin
        from .tensor import TensorOp

        self._ops, self._gemm_ops = {}, {}
        for k, layer in enumerate(self.layers):
            if not isinstance(layer, Linear):
                continue
            names = _LINEAR_INPUTS[layer.bias is not None]
            wrt = [names[0]] if k > self._lowest else []
            wrt += [names[1 if p == "W" else 2] for p, _ in self._trainable(layer)]
            op = builtin(layer._op_name, wrt=wrt) if wrt else layer._op
            assert isinstance(op, TensorOp)
            self._ops[k] = op
            following = self.layers[k + 1] if k + 1 < len(self.layers) else None
            if layer.bias is not None and isinstance(following, Elementwise):
                # forward: the GEMM, then bias and activation in one loop
                gemm = builtin("linear_nobias")
                assert isinstance(gemm, TensorOp)
                self._gemm_ops[k] = gemm
        if isinstance(self.loss, CrossEntropyLoss):
            self._loss_op: Any = builtin("softmax_cross_entropy", wrt=["X"])
        else:
            self._loss_op = self.loss.op

    def _lowest_trained(self) -> int:
        """The index of the lowest linear layer with a parameter to train (else the depth)."""
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Linear) and self._trainable(layer):
                return k
        return len(self.layers)

    def _key(self) -> str:
        parts = [__name__, type(self.optimizer).__name__, self._dtype.name]
        parts += [f"gemm:{k}:{op.spec.key}" for k, op in self._gemm_ops.items()]
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                parts.append(f"linear:{self._ops[k].spec.key}:{layer.bias is not None}")
                parts.append(",".join(n for n, _ in self._trainable(layer)))
            else:
                parts.append(f"act:{layer.op.spec.key}:{k > self._lowest}")
        parts.append(f"loss:{self._loss_op.spec.key}")
        parts.append(f"opt:{self.optimizer.structure()}:clip={self._clip}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _grad_names(self, k: int, layer: Linear) -> list[str]:
        """The gradient buffers of layer ``k``'s trainable parameters, in its op's input order."""
        names = []
        for p, _ in self._trainable(layer):
            if p == "b":
                names.append(f"gb{k}")
            else:
                names.append(f"gW{k}")
        return names

    def _plan(self, with_code: bool) -> StepPlan:
        """Arguments (always) and code lines (``with_code``) of the step function."""
        from ..codegen.step import StepPlan

        plan = StepPlan("fused_step", single=self._dtype == np.float32)
        args = plan.params
        ce = isinstance(self.loss, CrossEntropyLoss)
        args += ["x", "labels", "target"] if ce else ["x", "target"]
        a = "x"  # the current activation buffer
        blocks: list[list[str]] = []  # each layer's backward lines, in forward order
        for k, layer in enumerate(self.layers):
            out = f"h{k}"
            plan.backward = []
            if isinstance(layer, Linear):
                args += [f"W{k}"] + ([f"b{k}"] if layer.bias is not None else [])
                grads = self._grad_names(k, layer)
                args += [out, f"g{k}", *grads]
                if with_code:
                    self._linear_code(plan, k, layer, a, out)
            else:
                args += [out, f"d{k}", f"g{k}"]
                if with_code:
                    self._activation_code(plan, k, layer, a, out)
            blocks.append(plan.backward)
            a = out
        plan.backward = [line for block in reversed(blocks) for line in block]
        if ce:
            args += ["losses", "grad_rows"]
        if with_code:
            self._loss_code(plan, a)
        self._update_args_and_code(plan, with_code)
        return plan

    def _linear_code(self, plan: StepPlan, k: int, layer: Linear, a: str, out: str) -> None:
        from ..codegen.step import KernelCall

        op = self._ops[k]
        module = _module_name(op)
        inputs = [a, f"W{k}", f"b{k}"] if layer.bias is not None else [a, f"W{k}"]
        dims = ", ".join(_dims(op, inputs))
        forward = kernel_name("forward", self._dtype)  # forward_f32 for float32 data
        if k in self._gemm_ops:  # the GEMM alone: its bias is added in the activation's loop
            gemm = self._gemm_ops[k]
            plan.imports.append(KernelCall(_module_name(gemm), forward, f"mm{k}_forward"))
            gemm_dims = ", ".join(_dims(gemm, [a, f"W{k}"]))
            plan.forward.append(f"{_PAD}mm{k}_forward({a}, W{k}, {gemm_dims}, {out})")
        else:
            plan.imports.append(KernelCall(module, forward, f"lin{k}_forward"))
            plan.forward.append(f"{_PAD}lin{k}_forward({', '.join(inputs)}, {dims}, {out})")
        if k < self._lowest:
            return
        plan.imports.append(KernelCall(module, kernel_name("vjp", self._dtype), f"lin{k}_vjp"))
        grads = ([f"g{k - 1}"] if k > self._lowest else []) + self._grad_names(k, layer)
        plan.backward.append(
            f"{_PAD}lin{k}_vjp({', '.join(inputs)}, {dims}, g{k}, {', '.join(grads)})"
        )

    def _activation_code(
        self, plan: StepPlan, k: int, layer: Elementwise, a: str, out: str
    ) -> None:
        from ..codegen.step import elementwise_loop

        derivation = layer.op.derivation()
        (x,) = layer.op.spec.inputs
        n = f"{a}.size"
        if k - 1 in self._gemm_ops:  # the linear layer below left its bias to this loop
            stores = [(f"{out}[r, i]", derivation.stable_forward)]
            if k > self._lowest:  # the local partial, for the backward pass
                stores.append((f"d{k}[r, i]", derivation.partials[0].final))
            plan.forward += elementwise_loop(
                plan, layer.op.name, f"{a}.shape[1]", {x: f"{a}[r, i] + b{k - 1}[i]"},
                [stores], _PAD, rows=f"{a}.shape[0]",
            )
        else:
            stores = [(f"{out}f[i]", derivation.stable_forward)]
            if k > self._lowest:
                stores.append((f"d{k}f[i]", derivation.partials[0].final))
            plan.forward += [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in (a, out, f"d{k}")]
            plan.forward += elementwise_loop(plan, layer.op.name, n, {x: f"{a}f"}, [stores], _PAD)
        if k < self._lowest:
            return
        g_in = f"g{k - 1}"
        plan.backward += [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in (g_in, f"g{k}", f"d{k}")]
        plan.backward += [
            f"{_PAD}for i in range({n}):",  # the chain rule: incoming gradient × local partial
            f"{_PAD}{_PAD}{g_in}f[i] = g{k}f[i] * d{k}f[i]",
        ]

    def _loss_code(self, plan: StepPlan, logits: str) -> None:
        import sympy as sp

        from ..codegen.step import KernelCall, elementwise_loop

        last = len(self.layers) - 1
        if isinstance(self.loss, CrossEntropyLoss):
            op = self._loss_op
            module = _module_name(op)
            plan.imports += [
                KernelCall(module, kernel_name("forward", self._dtype), "loss_forward"),
                KernelCall(module, kernel_name("vjp", self._dtype), "loss_vjp"),
            ]
            # One-hot targets and the mean's cotangent; a label outside the classes stops the
            # step before anything is written (its row is returned and reported).
            plan.prologue += [
                f"{_PAD}for r in range(labels.shape[0]):",
                f"{_PAD}{_PAD}if labels[r] < 0 or labels[r] >= target.shape[1]:",
                f"{_PAD}{_PAD}{_PAD}return math.nan, r",
                f"{_PAD}for r in range(target.shape[0]):",
                f"{_PAD}{_PAD}for j in range(target.shape[1]):",
                f"{_PAD}{_PAD}{_PAD}target[r, j] = 0.0",
                f"{_PAD}{_PAD}target[r, labels[r]] = 1.0",
                f"{_PAD}{_PAD}grad_rows[r] = 1.0 / target.shape[0]",
            ]
            dims = ", ".join(_dims(op, [logits, "target"]))
            plan.loss += [
                f"{_PAD}loss_forward({logits}, target, {dims}, losses)",
                f"{_PAD}loss = 0.0",
                f"{_PAD}for r in range(losses.shape[0]):",
                f"{_PAD}{_PAD}loss += losses[r]",
                f"{_PAD}loss = loss / losses.shape[0]",
                f"{_PAD}loss_vjp({logits}, target, {dims}, grad_rows, g{last})",
            ]
            return
        op = self._loss_op
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
        """The update of every trained parameter by the optimizer's rule, after clipping.

        Each parameter's state arrays are arguments named ``<state>__<parameter>``
        (``exp_avg__b2``); its scalar inputs (hyperparameters of its group, counter, fresh
        flags) are row ``j`` of the argument ``scalars`` (one row per trained parameter, columns
        in ``rule.scalar_inputs`` order), filled on every call: the generated code depends on
        the rule alone.
        """
        import sympy as sp

        from ..codegen.update import update_lines

        rule = self.optimizer.rule
        if self._clip == "norm":
            plan.params += ["max_norm", "grad_norm"]
            if with_code:
                self._norm_code(plan)
        elif self._clip == "value":
            plan.params.append("clip_value")
        grad = sp.Symbol(rule.grad, real=True)
        clipped: sp.Expr | None = None
        if self._clip == "norm":
            clipped = sp.Symbol("clip_coef", real=True) * grad
        elif self._clip == "value":
            c = sp.Symbol("clip_value", real=True)
            clipped = sp.Min(sp.Max(grad, -c), c)  # torch.clamp(g, -c, c)
        plan.params.append("scalars")
        for j, (k, name, _) in enumerate(self._trained):
            p, g = f"{name}{k}", f"g{name}{k}"
            tag = f"__{p}"
            states = {s.name: f"{s.name}{tag}" for s in rule.states}
            scalars = {n: f"{n}{tag}" for n in rule.scalar_inputs}
            plan.params += list(states.values())
            if with_code:
                flat = [p, g, *states.values()]
                plan.update += [f"{_PAD}{v}f = {v}.reshape({v}.size)" for v in flat]
                plan.update += [
                    f"{_PAD}{local} = scalars[{j}, {c}]"
                    for c, local in enumerate(scalars.values())
                ]
                arrays = {rule.param: f"{p}f", rule.grad: f"{g}f"}
                arrays.update({s: f"{v}f" for s, v in states.items()})
                plan.update += update_lines(plan, rule, arrays, scalars, _PAD, tag, clipped)

    def _norm_code(self, plan: StepPlan) -> None:
        """The global 2-norm of the gradients (each one's norm first, then the norm of those,
        as torch's ``clip_grad_norm_``) and the clipping factor, before the update loops."""
        import sympy as sp

        from ..codegen.printer import print_expr
        from ..codegen.step import elementwise_loop

        g = sp.Symbol("g", real=True)
        lines = [f"{_PAD}clip_total = 0.0"]
        for k, name, _ in self._trained:
            grad = f"g{name}{k}"
            lines += [f"{_PAD}{grad}f = {grad}.reshape({grad}.size)", f"{_PAD}clip_sq = 0.0"]
            lines += elementwise_loop(
                plan, "clip_grad_norm", f"{grad}.size", {g: f"{grad}f"}, [[("sq", g**2)]], _PAD,
                accumulate={"sq": "clip_sq"},
            )
            lines += [
                f"{_PAD}clip_norm = math.sqrt(clip_sq)",
                f"{_PAD}clip_total += clip_norm * clip_norm",
            ]
        total, max_norm = sp.symbols("clip_total max_norm", real=True)
        coef = max_norm / (total + sp.Float(1e-6))
        clamped = sp.Piecewise((sp.S.One, coef > 1), (coef, True))  # a NaN stays NaN
        lines += [
            f"{_PAD}clip_total = math.sqrt(clip_total)",
            f"{_PAD}grad_norm[0] = clip_total",
            f"{_PAD}clip_coef = {print_expr(clamped, 'clip_grad_norm')}",
        ]
        plan.update += lines

    def _clip_kind(self) -> str | None:
        """``"norm"``, ``"value"`` or None, from ``clip_grad_norm`` / ``clip_grad_value``."""
        if self.clip_grad_norm is not None and self.clip_grad_value is not None:
            raise SymgradError(
                "give clip_grad_norm or clip_grad_value, not both: which one comes first "
                "changes the result"
            )
        for name in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.floating, np.integer))
                or np.isnan(value)
                or value < 0
            ):
                raise SymgradError(f"{name} must be a real number ≥ 0 or None, got {value!r}")
        if self.clip_grad_norm is not None:
            return "norm"
        return "value" if self.clip_grad_value is not None else None

    @property
    def grad_norm(self) -> float:
        """The global gradient norm of the last step, before clipping (with
        ``clip_grad_norm``; NaN otherwise)."""
        return float(self._grad_norm[0]) if self._clip == "norm" else float("nan")

    # -- compile and run -------------------------------------------------------------------

    def _compile(self, dtype: np.dtype) -> None:
        """Load the step from the cache, or plan, derive and emit it (then cache it).

        A warm start reads a manifest keyed by the step's *structure* — layer kinds, built-in
        activation and loss names and parameters, which parameters train, the optimizer's
        update rule (not its hyperparameters: they are arguments), the kind of clipping, the
        dtype, the toolchain — and imports the modules it lists: no formula is built, so SymPy
        is never imported.  A missing or unverifiable manifest or
        module takes the cold path, which rewrites the manifest.
        """
        self._dtype = dtype  # float32 data gets float32 math where it has a helper for it
        self._buffers, self._views, self._cached = None, {}, None  # shaped by the old plan
        self._group_shape = ()
        self._lowest = self._lowest_trained()
        self._trained = [
            (k, name, p)
            for k, layer in enumerate(self.layers)
            if isinstance(layer, Linear)
            for name, p in self._trainable(layer)
        ]
        self._inactive = {
            id(p): np.empty((0,) * p.data.ndim, dtype) for _, _, p in self._trained
        }
        structure = self._structure_key()
        manifest = cache_dir() / f"fused_step_manifest_{structure[:24]}.json"
        if not self._load(manifest, structure):
            self._cold_compile(manifest, structure)
        rule = self.optimizer.rule
        self._scalars = np.zeros((len(self._trained), len(rule.scalar_inputs)))
        where = {name: k for k, name in enumerate(self._args)}
        self._clip_slot = where.get("max_norm", where.get("clip_value"))

    def _structure_key(self) -> str:
        parts = [
            "fused-step-manifest-1",
            toolchain_fingerprint(),
            self._dtype.name,
            self.optimizer.structure(),
            f"clip:{self._clip}",
            self.loss.structure(),
        ]
        for layer in self.layers:
            if isinstance(layer, Linear):
                trained = ",".join(n for n, _ in self._trainable(layer))
                parts.append(f"linear:{layer.bias is not None}:{trained}")
            else:
                parts.append(layer.structure())
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _load(self, manifest: Path, structure: str) -> bool:
        """Import the step a manifest lists; False when anything is missing or fails to verify,
        or when the manifest describes another structure (its file name holds only a prefix
        of the key: the whole key is stored inside and compared)."""
        try:
            entry = json.loads(manifest.read_text(encoding="utf-8"))
            paths = [manifest.parent / name for name in [*entry["imports"], entry["step"]]]
            args = [str(a) for a in entry["args"]]
            if entry["structure"] != structure:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if any(p.parent != manifest.parent for p in paths):
            return False
        texts = [verified_text(p) for p in paths]
        if any(text is None for text in texts):
            return False
        *imports, step = zip(paths, texts, strict=True)
        for path, text in imports:  # the step imports its kernels' modules by name: those first
            ensure_imported(path, text)
        self._fn = ensure_imported(*step).step
        self._args = args
        return True

    def _cold_compile(self, manifest: Path, structure: str) -> None:
        from .tensor import TensorOp

        self._select_ops()
        key = self._key()
        path = module_path("fused_step", key)
        text = verified_text(path, key)
        if text is None:
            from ..codegen.step import emit_step

            text = emit_step(self._plan(with_code=True), key).text
            write_source(path, text)
        ops = [*self._ops.values(), *self._gemm_ops.values(), self._loss_op]
        kernels = [op for op in ops if isinstance(op, TensorOp)]
        imports = list(dict.fromkeys(Path(op._path).name for op in kernels))
        for op in kernels:
            _module_name(op)
        self._args = self._plan(with_code=False).params
        self._fn = ensure_imported(path, text).step
        entry = {"structure": structure, "step": path.name, "imports": imports, "args": self._args}
        atomic_write(manifest, json.dumps(entry, indent=1) + "\n")

    def _allocate(self, batch: int, dtype: np.dtype) -> _Buffers:
        arrays: dict[str, np.ndarray] = {}
        width = self._first.in_features
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                width = layer.out_features
                for name in self._grad_names(k, layer):
                    param = layer.bias if name.startswith("gb") else layer.weight
                    assert param is not None
                    arrays[name] = np.zeros(param.shape, dtype)
            else:
                arrays[f"d{k}"] = np.zeros((batch, width), dtype)
            arrays[f"h{k}"] = np.zeros((batch, width), dtype)
            arrays[f"g{k}"] = np.zeros((batch, width), dtype)
        if isinstance(self.loss, CrossEntropyLoss):
            arrays["target"] = np.zeros((batch, width), dtype)
            arrays["losses"] = np.zeros(batch, dtype)
            arrays["grad_rows"] = np.zeros(batch, dtype)
        shared = {k for k in arrays if k.startswith(("gW", "gb"))}
        return _Buffers(batch, dtype, arrays, frozenset(set(arrays) - shared))

    def _batch_views(self, batch: int, dtype: np.dtype) -> dict[str, np.ndarray]:
        """The first ``batch`` rows of every per-example buffer (reallocated when too small)."""
        buffers = self._buffers
        if buffers is None or buffers.capacity < batch or buffers.dtype != dtype:
            buffers = self._buffers = self._allocate(batch, dtype)
            self._views = {}
        views = self._views[batch] = {
            k: v[:batch] if k in buffers.per_example else v for k, v in buffers.arrays.items()
        }
        return views

    def _targets(self, y: object, batch: int, dtype: np.dtype) -> np.ndarray:
        if isinstance(self.loss, CrossEntropyLoss):
            labels = np.asarray(y)
            if labels.shape != (batch,) or labels.dtype.kind not in "iu":
                raise ShapeError(
                    f"expected {batch} integer labels, got {labels.shape} {labels.dtype}"
                )
            return labels.astype(np.int64, copy=False)
        values = np.ascontiguousarray(y, dtype=dtype)
        shape = (batch, self._output_width())
        if values.shape != shape:
            raise ShapeError(f"targets of shape {shape} expected, got {values.shape}")
        return values

    def _output_width(self) -> int:
        """The model's output features: the last linear layer's (activations keep widths)."""
        return next(
            lay.out_features for lay in reversed(self.layers) if isinstance(lay, Linear)
        )

    def __call__(self, x: np.ndarray, y: np.ndarray) -> float:
        """One step on the batch ``(x, y)``: parameters and optimizer state updated in place."""
        first = self._first
        dtype = first.weight.data.dtype
        self._optimized = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        flags = tuple(p.requires_grad and id(p) in self._optimized for p in self._params)
        clip = self._clip_kind()
        if self._fn is None or dtype != self._dtype or flags != self._flags or clip != self._clip:
            self._flags = flags  # freezing a layer after a step compiles another step
            self._clip = clip
            self._compile(dtype)
        x = np.ascontiguousarray(x)
        if x.ndim != 2 or x.shape[1] != first.in_features or x.dtype != dtype:
            raise ShapeError(
                f"the fused step expects x of shape (batch, {first.in_features}) and dtype "
                f"{dtype}, got {x.shape} {x.dtype}"
            )
        batch = x.shape[0]
        targets = self._targets(y, batch, dtype)
        views = self._views.get(batch)  # emptied whenever the buffers are (re)allocated
        if views is None:
            views = self._batch_views(batch, dtype)
        args, undo = self._arguments(views)
        args[0] = x
        args[1] = targets
        loss, bad = self._fn(*args)
        if bad >= 0:
            for step in undo:  # no update happened: the optimizer's state is as it was
                self.optimizer.undo_prepare(step)
            classes = self._output_width()
            raise IndexRangeError(
                f"labels must lie in [0, {classes}): label {int(args[1][bad])} at row {bad}; "
                "nothing was updated"
            )
        return float(loss)

    def _arguments(self, views: dict[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
        """The step's arguments (the list is reused while the arrays stay the same objects),
        and how to undo the optimizer's preparation.

        Every group is checked; the optimizer creates or advances each trained parameter's
        state (as its eager step does); row ``j`` of the ``scalars`` table gets parameter
        ``j``'s hyperparameters, read from its group now, its counter and fresh flags.
        """
        opt = self.optimizer
        groups = opt.param_groups
        shape = tuple((id(g), len(g["params"])) for g in groups)
        if shape != self._group_shape:  # which group each trained parameter is in
            where = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
            self._group_of = [where[id(p)] for _, _, p in self._trained]
            self._group_shape = shape
        hyper = []
        for index, group in enumerate(groups):
            opt.check_group(group, index)
            hyper.append(opt.hyperparameters(group))
        table = self._scalars
        width = len(hyper[0]) if hyper else 0
        arrays, undo = [], []
        for j, (_, _, p) in enumerate(self._trained):
            values = hyper[self._group_of[j]]
            states, extra, step_undo = opt.prepare_update(p, values, self._inactive[id(p)])
            table[j, :width] = values
            table[j, width:] = extra
            arrays.append(states)
            undo.append(step_undo)
        key = (
            id(views),
            *(id(p.data) for p in self._params),
            *(id(a) for states in arrays for a in states),
        )
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._argument_list(views, arrays))
        args = self._cached[1]
        if self._clip_slot is not None:
            limit = self.clip_grad_norm if self._clip == "norm" else self.clip_grad_value
            args[self._clip_slot] = float(limit)  # type: ignore[arg-type]
        return args, undo

    def _argument_list(
        self, views: dict[str, np.ndarray], arrays: list[list[np.ndarray]]
    ) -> list[Any]:
        values: dict[str, Any] = dict(views)
        for k, layer in enumerate(self.layers):
            if isinstance(layer, Linear):
                values[f"W{k}"] = layer.weight.data
                if layer.bias is not None:
                    values[f"b{k}"] = layer.bias.data
        rule = self.optimizer.rule
        for (k, name, _), states in zip(self._trained, arrays, strict=True):
            for spec, array in zip(rule.states, states, strict=True):
                values[f"{spec.name}__{name}{k}"] = array
        values.setdefault("target", None)  # an elementwise loss's targets come with each call
        values.update(
            x=None, labels=None, max_norm=0.0, clip_value=0.0, grad_norm=self._grad_norm,
            scalars=self._scalars,
        )
        return [values[name] for name in self._args]


def compile_step(
    model: Module,
    loss: Loss,
    optimizer: Optimizer,
    *,
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
) -> FusedStep:
    """One compiled function per training step of ``model`` + ``loss`` + ``optimizer``.

    ``clip_grad_norm`` / ``clip_grad_value`` clip the gradients inside the step, as torch's
    ``clip_grad_norm_`` / ``clip_grad_value_`` between backward and ``optimizer.step()``; the
    limits (attributes of the step) and every hyperparameter are read on each call.

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
    return FusedStep(
        model, loss, optimizer, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value
    )
