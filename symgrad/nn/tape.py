"""Reverse mode over a recorded graph of ops: the derived VJPs, composed.

A network that is not a chain (a transformer layer: residual branches, attention's three
projections of one input) records every op it applies on a :class:`Tape`; ``backward`` walks the
record in reverse, hands each op the cotangent of its output, and adds the gradients its VJP
returns into the cotangents of its inputs — or into ``Parameter.grad``.  Nothing here
differentiates: every gradient comes from an op's derived VJP kernel.

An op whose output a gradient may flow through — it reads a trainable parameter, an input
marked with :meth:`Tape.watch`, or such an op's output — runs its ``forward_saved`` kernel:
the forward keeps what the derived VJP reads (softmax's output, layer norm's row statistics,
GELU's local derivative), and the backward pass reads it instead of recomputing it.

Array operations between ops — ``reshape``, ``transpose``, ``getitem``, ``concatenate``,
``stack`` — are recorded as ops too (index formulas with derived VJPs, :mod:`symgrad.nn.views`);
an op given a NumPy view of an array a gradient flows through is an ``ArgumentError``.

>>> import numpy as np, symgrad as sg
>>> from symgrad.nn import Parameter, Tape
>>> w = Parameter(np.array([2.0]))
>>> tape = Tape()
>>> y = tape.apply(sg.builtin("mse"), w, np.array([0.5]))
>>> _ = tape.backward(y, np.array([1.0]))
>>> w.grad  # ∂(w - 0.5)²/∂w = 2(w - 0.5)
array([3.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ArgumentError, ShapeError
from ..runtime.output_pool import empty
from .modules import Parameter


@dataclass
class _Record:
    op: Any  # an ElementwiseOp or TensorOp
    args: tuple[Any, ...]  # Parameters or arrays, as given
    arrays: tuple[np.ndarray, ...]  # what the op was called with
    output: np.ndarray
    saved: Any = None  # what op.forward_saved kept for the VJP, if it ran
    full: Any = None  # the op as applied, when ``op`` is its variant without unread gradients


class Tape:
    """The ops applied since it was created, for one reverse pass."""

    def __init__(self, execute: bool = True) -> None:
        #: False: ``apply`` checks its arguments and returns an empty array of the output's
        #: shape, computing nothing (the step compiler traces a model's forward this way).
        self.execute = execute
        self._records: list[_Record] = []
        self._produced: set[int] = set()  # ids of the outputs recorded here
        self._tracked: set[int] = set()  # ids of the arrays a gradient may flow through
        self._watched: list[np.ndarray] = []  # keeps the watched arrays (and their ids) alive
        #: ids of the memory owners of tracked arrays: a NumPy view of one (a reshape, a
        #: transpose, a slice) shares its owner, and a gradient cannot flow through it
        self._tracked_memory: set[int] = set()

    def watch(self, *arrays: np.ndarray) -> None:
        """Mark input arrays whose gradient ``backward(..., wrt=...)`` will be asked for: the
        ops reading them keep what their VJPs need (parameters are tracked already)."""
        for a in arrays:
            self._watched.append(a)
            self._tracked.add(id(a))
            self._tracked_memory.add(id(_owner(a)))

    def apply(self, op: Any, *args: Any) -> np.ndarray:
        """``op(*args)``, recorded.  ``args`` are arrays (inputs, or earlier outputs of this
        tape) and :class:`Parameter`\\ s, whose ``data`` the op reads."""
        arrays = tuple(a.data if isinstance(a, Parameter) else a for a in args)
        for k, a in enumerate(args):
            if (
                isinstance(a, np.ndarray)
                and id(a) not in self._tracked
                and id(_owner(a)) in self._tracked_memory
            ):
                raise ArgumentError(
                    f"{op.name}: argument {k} is a view of an array a gradient flows through "
                    "(a NumPy reshape, transpose, slice or index of a recorded output), made "
                    "off the tape: its gradient would be lost. Record the view instead "
                    "(tape.reshape, tape.transpose, tape.getitem, tape.concatenate, "
                    "tape.stack), or give the op the recorded array itself — tensor ops take "
                    "any leading batch axes (see symgrad.tensor_op's batch)"
                )
        needs = [
            a.requires_grad if isinstance(a, Parameter) else id(a) in self._tracked for a in args
        ]
        tracked = any(needs)
        full, saved = op, None
        if tracked and self.execute:
            from ..api import for_gradients

            op = for_gradients(op, arrays, needs)  # without large gradients nothing reads
        if not self.execute:
            shape, dtype = op.output_shape(*arrays)
            output = np.empty(shape, dtype=dtype)
        elif tracked and hasattr(op, "forward_saved"):
            output, saved = op.forward_saved(*arrays)
        else:
            output = op(*arrays)
        if tracked:
            self._tracked.add(id(output))
            self._tracked_memory.add(id(_owner(output)))
        self._records.append(_Record(op, args, arrays, output, saved, full))
        self._produced.add(id(output))
        return output

    # -- array operations, recorded (their VJPs derived: see symgrad.nn.views) -----------------

    def reshape(self, x: np.ndarray, shape: Any) -> np.ndarray:
        """``x.reshape(shape)`` (C order, one ``-1`` allowed), recorded.  ``x`` (here and in
        the other array operations) is an array or a :class:`Parameter` (a tied weight's
        transpose)."""
        from . import views

        new = views.reshape_args(tuple(x.shape), shape)
        return self.apply(views.reshape_op(views.reshape_groups(tuple(x.shape), new)), x)

    def transpose(self, x: np.ndarray, axes: Any = None) -> np.ndarray:
        """``x.transpose(axes)`` (reversed axes by default), recorded."""
        from . import views

        return self.apply(views.transpose_op(views.transpose_args(len(x.shape), axes)), x)

    def getitem(self, x: np.ndarray, index: Any) -> np.ndarray:
        """``x[index]`` for a basic index — integers, slices (any step), one ``...`` —
        recorded; an integer drops its axis, as in NumPy."""
        from . import views

        picks = views.index_args(tuple(x.shape), index)
        return self.apply(views.index_op(len(x.shape), picks), x)

    def concatenate(self, arrays: Any, axis: int = 0) -> np.ndarray:
        """``np.concatenate(arrays, axis)``, recorded (arrays of one rank and dtype)."""
        from . import views

        arrays = list(arrays)
        axis = _axis(arrays, axis, "concatenate", new=False)
        for a in arrays[1:]:
            if (
                a.shape[:axis] + a.shape[axis + 1 :]
                != arrays[0].shape[:axis] + arrays[0].shape[axis + 1 :]
            ):
                raise ShapeError(
                    f"Tape.concatenate: shapes {[a.shape for a in arrays]} differ outside axis "
                    f"{axis}"
                )
        return self.apply(views.concatenate_op(len(arrays[0].shape), axis, len(arrays)), *arrays)

    def stack(self, arrays: Any, axis: int = 0) -> np.ndarray:
        """``np.stack(arrays, axis)``, recorded (arrays of one shape and dtype)."""
        from . import views

        arrays = list(arrays)
        axis = _axis(arrays, axis, "stack", new=True)
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ShapeError(
                f"Tape.stack: the arrays must have one shape, got {[a.shape for a in arrays]}"
            )
        return self.apply(views.stack_op(len(arrays[0].shape), axis, len(arrays)), *arrays)

    def __len__(self) -> int:
        return len(self._records)

    def _needed(self, wanted: set[int]) -> set[int]:
        """Ids of the recorded outputs whose cotangent reaches a trainable parameter or one of
        the ``wanted`` inputs."""
        needed = set(wanted)
        for r in self._records:
            if any(
                (isinstance(a, Parameter) and a.requires_grad) or id(a) in needed for a in r.args
            ):
                needed.add(id(r.output))
        return needed

    def backward(
        self, output: np.ndarray, grad_output: np.ndarray, wrt: tuple[np.ndarray, ...] = ()
    ) -> tuple[np.ndarray | None, ...]:
        """Accumulate ``Parameter.grad`` for the cotangent ``grad_output`` of ``output``;
        return the cotangents of the input arrays ``wrt`` (None where none reaches them)."""
        if id(output) not in self._produced:
            raise ArgumentError("Tape.backward: the output was not produced by this tape")
        grad = np.asarray(grad_output)
        if grad.shape != output.shape:
            raise ArgumentError(
                f"Tape.backward: grad_output has shape {grad.shape}, the output {output.shape}"
            )
        wanted = {id(a) for a in wrt}
        needed = self._needed(wanted)
        cotangents: dict[int, np.ndarray] = {id(output): grad}
        for r in reversed(self._records):
            g = cotangents.pop(id(r.output), None)
            if g is None:
                continue
            targets = [
                a.requires_grad if isinstance(a, Parameter) else id(a) in needed for a in r.args
            ]
            if not any(targets):
                continue
            op = r.op
            if r.full is not op and any(
                take and k not in op._wrt for k, take in enumerate(targets)
            ):  # a gradient asked for (wrt, unwatched) that the forward's variant leaves out
                op, r.saved = r.full, None
            grads = op.vjp(*r.arrays, g, saved=r.saved) if r.saved else op.vjp(*r.arrays, g)
            for a, ga, take in zip(r.args, grads, targets, strict=True):
                if not take or ga is None:
                    continue
                if isinstance(a, Parameter):
                    a.accumulate(ga)
                elif id(a) in cotangents:
                    cotangents[id(a)] = _add(cotangents[id(a)], ga)
                else:
                    cotangents[id(a)] = ga
        return tuple(cotangents.get(id(a)) for a in wrt)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` into memory from the op outputs' pool (:mod:`symgrad.runtime.output_pool`)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return a + b
    return np.add(a, b, out=empty(a.shape, a.dtype))


def _axis(arrays: list[Any], axis: int, what: str, new: bool) -> int:
    """``axis`` of ``np.<what>(arrays, axis)``, normalised; errors for no arrays, 0-d or
    mixed ranks, an axis out of range."""
    if len(arrays) < 2:
        raise ArgumentError(f"Tape.{what}: give at least two arrays, got {len(arrays)}")
    ranks = {len(a.shape) for a in arrays}
    if len(ranks) != 1 or 0 in ranks:
        raise ShapeError(
            f"Tape.{what}: the arrays must have one rank ≥ 1, got shapes "
            f"{[tuple(a.shape) for a in arrays]}"
        )
    limit = ranks.pop() + (1 if new else 0)
    if not -limit <= axis < limit:
        raise ShapeError(f"Tape.{what}: axis {axis} is out of range for {limit} axes")
    return axis % limit


def _owner(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (``a`` itself unless it is a view)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
