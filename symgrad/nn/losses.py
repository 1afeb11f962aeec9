"""Loss modules (mean reduction, as torch) and the symbolic fusion of activation + loss.

``loss.value_and_grad(input, target)`` returns the scalar loss and its gradient with respect to
``input``, from one fused kernel where the loss is elementwise.  :func:`fuse` composes a final
elementwise activation into an elementwise loss *before* differentiating — ``Sigmoid`` then
``BCELoss`` becomes one op whose derived gradient is ``σ(z) − y`` (stable for any ``z``), the
result of §4.2 of the article the project grew from — derived, not hand-coded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DTypeError, ShapeError, SymgradError
from ..runtime.elementwise import ElementwiseOp, mean
from .modules import _FLOATS, Elementwise, Module, Sequential, _builtin, _LazyBuiltin

if TYPE_CHECKING:
    from .tape import Tape


class Loss:
    """Base class of losses: ``value_and_grad(input, target) -> (loss, grad_input)``."""

    name = "loss"

    def value_and_grad(self, input: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        raise NotImplementedError

    def __call__(self, input: np.ndarray, target: np.ndarray) -> float:
        return self.value_and_grad(input, target)[0]

    def check(self, input: np.ndarray, target: np.ndarray) -> None:
        """Raise what ``value_and_grad(input, target)`` would raise, computing no more than
        needed (``fit`` checks every target before the first step).  By default it computes
        the loss; a loss that can tell its errors from the arrays' shapes and values
        overrides it."""
        self.value_and_grad(input, target)

    def structure(self) -> str:
        """What determines this loss's generated code (a key part; no SymPy when built in)."""
        raise NotImplementedError

    def record(self, tape: Tape, input: np.ndarray, target: np.ndarray) -> np.ndarray:
        """The loss of every example (or element), recorded on ``tape``; the loss is their
        mean."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ElementwiseLoss(Loss):
    """The mean over elements of a two-input elementwise op ``loss(input, target)``."""

    def __init__(self, op: ElementwiseOp) -> None:
        if not isinstance(op, ElementwiseOp) or len(op.input_names) != 2:
            raise SymgradError(f"an elementwise loss takes (input, target), got op {op!r}")
        self._op: ElementwiseOp | None = op
        self.name = op.name

    @property
    def op(self) -> ElementwiseOp:
        """The loss's elementwise op (a built-in or fused loss's is built on first use)."""
        if self._op is None:
            self._op = self._build()
        return self._op

    def _build(self) -> ElementwiseOp:
        raise NotImplementedError  # pragma: no cover - only built-in and fused losses are lazy

    def structure(self) -> str:
        return f"op:{self.op.key}"

    def _check(self, input: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        input, target = np.asarray(input), np.asarray(target)
        if input.shape != target.shape:
            raise ShapeError(
                f"{self._label()}: input has shape {input.shape} but target has shape "
                f"{target.shape}; they must match"
            )
        if target.dtype != input.dtype:
            if target.dtype.kind not in "iufb":
                raise DTypeError(f"{self._label()}: target has dtype {target.dtype}")
            target = target.astype(input.dtype)
        return input, target

    def _label(self) -> str:
        return type(self).__name__

    def value_and_grad(self, input: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        input, target = self._check(input, target)
        value, (grad, _) = self.op.value_and_vjp(input, target, reduction="mean")
        return float(value), grad

    def record(self, tape: Tape, input: np.ndarray, target: np.ndarray) -> np.ndarray:
        input, target = self._check(input, target)
        return tape.apply(self.op, input, target)

    def fused_with(self, activation: Elementwise) -> ElementwiseLoss:
        """This loss applied to ``activation(z)``, composed symbolically, then differentiated
        (on first use of the fused op)."""
        return _FusedLoss(activation, self)


class _FusedLoss(ElementwiseLoss):
    """``loss(activation(z), y)`` as one formula, differentiated as one."""

    def __init__(self, activation: Elementwise, loss: ElementwiseLoss) -> None:
        self.activation, self.loss = activation, loss
        self._op = None
        self.name = f"{getattr(activation, 'op_name', '') or activation.op.name}_{loss.name}"

    def _build(self) -> ElementwiseOp:
        import sympy as sp

        from ..api import elementwise

        z = sp.Symbol("z", real=True)
        (a,) = self.activation.op.spec.inputs
        p, y = self.loss.op.spec.inputs
        inner = self.activation.op.spec.expr.xreplace({a: z})
        fused = self.loss.op.spec.expr.xreplace({p: inner})
        name = f"{self.activation.op.name}_{self.loss.op.name}"
        return elementwise(fused, inputs=[z, y], name=name)

    def structure(self) -> str:
        return f"fused:{self.activation.structure()}:{self.loss.structure()}"

    def _label(self) -> str:
        return f"{self.loss._label()} (after {type(self.activation).__name__})"


class _BuiltinLoss(_LazyBuiltin, ElementwiseLoss):
    """An elementwise loss backed by the built-in op ``op_name``, built on first use."""

    def __init__(self) -> None:
        self._op = None
        self._params = {}
        self.name = self.op_name


class MSELoss(_BuiltinLoss):
    """Mean squared error, ``mean((input - target)²)``."""

    op_name = "mse"


class BCELoss(_BuiltinLoss):
    """Binary cross-entropy on probabilities (logs clamped at -100, as torch)."""

    op_name = "bce"

    def value_and_grad(self, input: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        arr = np.asarray(input)  # probabilities, as torch demands
        if arr.size and not (np.all(arr >= 0) and np.all(arr <= 1)):
            raise SymgradError(
                "BCELoss: every input must be a probability in [0, 1] (found values outside); "
                "use BCEWithLogitsLoss on logits"
            )
        return super().value_and_grad(input, target)


class BCEWithLogitsLoss(_BuiltinLoss):
    """Binary cross-entropy on logits: ``softplus(z) − y·z``, stable for any z."""

    op_name = "bce_with_logits"


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy of logits ``(batch, classes)`` against integer labels ``(batch,)``.

    Mean over the batch, as torch.  The labels become one-hot rows of the index formula
    ``L[b] = -Σ_i T[b,i] log softmax(X)[b,i]``, whose derived gradient is ``softmax − onehot``.
    """

    name = "cross_entropy"

    def __init__(self) -> None:
        self._op: Any = None

    @property
    def op(self) -> Any:
        """The ``softmax_cross_entropy`` tensor op, built on first use."""
        if self._op is None:
            self._op = _builtin("softmax_cross_entropy")
        return self._op

    def structure(self) -> str:
        return "cross_entropy"

    def record(self, tape: Tape, input: np.ndarray, target: np.ndarray) -> np.ndarray:
        logits, labels = self._check(input, target)
        return tape.apply(_builtin("cross_entropy"), logits, labels)

    def _check(self, input: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = np.asarray(input)
        labels = np.asarray(target)
        if logits.ndim != 2:
            raise ShapeError(
                f"CrossEntropyLoss expects logits (batch, classes), got {logits.shape}"
            )
        if labels.shape != (logits.shape[0],):
            raise ShapeError(
                f"CrossEntropyLoss expects labels of shape ({logits.shape[0]},), got {labels.shape}"
            )
        if labels.dtype.kind not in "iu":
            raise DTypeError(
                f"CrossEntropyLoss expects integer class labels, got dtype {labels.dtype}"
            )
        classes = logits.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            bad = labels[(labels < 0) | (labels >= classes)]
            raise SymgradError(
                f"CrossEntropyLoss: labels must lie in [0, {classes}), "
                f"found {sorted(set(bad.tolist()))[:5]}"
            )
        return logits, labels

    def check(self, input: np.ndarray, target: np.ndarray) -> None:
        """The shapes and every label's range checked; logits of a dtype the op does not
        compute in get the op's own error (from one row)."""
        logits, labels = self._check(input, target)
        if logits.dtype not in _FLOATS:
            self.value_and_grad(logits[:1], labels[:1])

    def value_and_grad(self, input: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        logits, labels = self._check(input, target)
        onehot = np.zeros_like(logits)
        onehot[np.arange(labels.size), labels] = 1
        losses = self.op(logits, onehot)
        grad_out = np.full(labels.size, mean(1.0, labels.size), dtype=logits.dtype)
        grad, _ = self.op.vjp(logits, onehot, grad_out)
        return mean(float(losses.sum(dtype=np.float64)), labels.size), grad


def fuse(model: Module, loss: Loss) -> tuple[Module, Loss]:
    """Fold a trailing elementwise activation of ``model`` into an elementwise ``loss``.

    Returns ``(body, loss)`` to train with: ``loss(body(x), y)`` equals ``loss(model(x), y)``,
    but the activation and the loss are differentiated as one formula.
    """
    if (
        isinstance(model, Sequential)
        and len(model) > 0
        and isinstance(model[-1], Elementwise)
        and isinstance(loss, ElementwiseLoss)
    ):
        return model[: len(model) - 1], loss.fused_with(model[-1])
    return model, loss
