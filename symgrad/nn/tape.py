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

from ..errors import ArgumentError
from .modules import Parameter


@dataclass
class _Record:
    op: Any  # an ElementwiseOp or TensorOp
    args: tuple[Any, ...]  # Parameters or arrays, as given
    arrays: tuple[np.ndarray, ...]  # what the op was called with
    output: np.ndarray
    saved: Any = None  # what op.forward_saved kept for the VJP, if it ran


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
                    "off the tape: its gradient would be lost. Give the op the recorded array "
                    "itself — tensor ops take any leading batch axes (see symgrad.tensor_op's "
                    "batch) — or write the view as an op of its own (index notation, e.g. "
                    "Y[i, j] = X[j, i])"
                )
        tracked = any(
            a.requires_grad if isinstance(a, Parameter) else id(a) in self._tracked for a in args
        )
        saved = None
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
        self._records.append(_Record(op, args, arrays, output, saved))
        self._produced.add(id(output))
        return output

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
            grads = r.op.vjp(*r.arrays, g, saved=r.saved) if r.saved else r.op.vjp(*r.arrays, g)
            for a, ga, take in zip(r.args, grads, targets, strict=True):
                if not take or ga is None:
                    continue
                if isinstance(a, Parameter):
                    a.accumulate(ga)
                elif id(a) in cotangents:
                    cotangents[id(a)] = cotangents[id(a)] + ga
                else:
                    cotangents[id(a)] = ga
        return tuple(cotangents.get(id(a)) for a in wrt)


def _owner(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (``a`` itself unless it is a view)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a

