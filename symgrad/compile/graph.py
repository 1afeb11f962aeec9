"""Trace: a model's forward, recorded on a tape without computing, becomes a :class:`Graph`.

The graph's nodes are op applications in the order the forward made them; every argument of a
node is a :class:`Ref` to a step input, a parameter, a constant or an earlier node's output.  A
*constant* is any other array the forward passed to an op: position ids, an all-zero token-type
array — values that may depend on the inputs' shapes but not on their contents (the trace is
redone for every new combination of input shapes, and the constants with it).

Nothing here computes: the tape runs in its checking mode (``Tape(execute=False)``), each op
checking its arguments and giving the shape of its output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UnsupportedStepError
from ..nn.modules import Parameter
from ..nn.tape import Tape


@dataclass(frozen=True)
class Ref:
    """An argument of a node: ``kind`` is ``"input"``, ``"param"``, ``"const"`` or ``"node"``,
    ``index`` its position among those."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind}{self.index}"


@dataclass(frozen=True)
class Node:
    """One op application: ``op(*args)`` with an output of ``shape`` and ``dtype``."""

    op: Any  # an ElementwiseOp or a TensorOp
    args: tuple[Ref, ...]
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class Graph:
    """What a traced forward did (see the module docstring); ``output`` is the value the step
    reduces to its loss."""

    nodes: list[Node]
    inputs: list[np.ndarray]
    params: list[Parameter]
    consts: list[np.ndarray]
    output: Ref
    #: each parameter's shape and dtype when traced (its ``data`` may be replaced later)
    forms: list[tuple[tuple[int, ...], np.dtype]] = field(default_factory=list)

    def structure(self) -> str:
        """A hash of everything the generated step depends on besides shapes: each node's op
        (its spec key), the kinds of its arguments, the dtypes and ranks of the inputs, the
        parameters and the constants."""
        parts = [f"out:{self.output}"]
        for a in self.inputs:
            parts.append(f"in:{a.dtype.str}:{a.ndim}")
        for shape, dtype in self.forms:
            parts.append(f"param:{dtype.str}:{len(shape)}")
        for c in self.consts:
            parts.append(f"const:{c.dtype.str}:{c.ndim}")
        for node in self.nodes:
            args = ",".join(str(a) for a in node.args)
            parts.append(f"node:{op_key(node.op)}:{args}:{node.dtype.str}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def same_as(self, other: Graph) -> bool:
        """Whether ``other`` (a trace of the same forward on inputs of the same shapes) did
        what this one did: the same ops on the same parameter objects of the same shapes,
        outputs of the same shapes, constants of equal values — so a step planned for one
        runs the other."""
        return (
            self.structure() == other.structure()
            and [a.shape for a in self.inputs] == [a.shape for a in other.inputs]
            and len(self.params) == len(other.params)
            and all(p is q for p, q in zip(self.params, other.params, strict=True))
            and self.forms == other.forms
            and [n.shape for n in self.nodes] == [n.shape for n in other.nodes]
            and all(
                a.shape == b.shape and np.array_equal(a, b)
                for a, b in zip(self.consts, other.consts, strict=True)
            )
        )

    def shapes(self) -> tuple:
        """The input shapes (the key of a traced graph's constants and buffer shapes)."""
        return tuple(a.shape for a in self.inputs)


def op_key(op: Any) -> str:
    """The spec key of an op (its formula, inputs, gradients and constants, hashed)."""
    return str(op.key)


def trace(fn: Callable[..., np.ndarray], inputs: Sequence[np.ndarray]) -> Graph:
    """The graph of ``fn(tape, *inputs)``, which must record every op on ``tape`` and return a
    recorded output (see the module docstring)."""
    tape = Tape(execute=False)
    output = fn(tape, *inputs)
    refs: dict[int, Ref] = {id(a): Ref("input", n) for n, a in enumerate(inputs)}
    params: list[Parameter] = []
    forms: list[tuple[tuple[int, ...], np.dtype]] = []
    consts: list[np.ndarray] = []
    nodes: list[Node] = []
    for record in tape._records:
        args = []
        for given, array in zip(record.args, record.arrays, strict=True):
            if isinstance(given, Parameter):
                ref = refs.get(id(given))
                if ref is None:
                    ref = refs[id(given)] = Ref("param", len(params))
                    params.append(given)
                    forms.append((given.data.shape, given.data.dtype))
            else:
                ref = refs.get(id(array))
                if ref is None:
                    ref = refs[id(array)] = Ref("const", len(consts))
                    consts.append(np.ascontiguousarray(array))
            args.append(ref)
        refs[id(record.output)] = Ref("node", len(nodes))
        nodes.append(Node(record.op, tuple(args), record.output.shape, record.output.dtype))
    found = refs.get(id(output))
    if found is None or found.kind != "node":
        raise UnsupportedStepError(
            "the traced forward must return the output of an op it recorded on the tape (the "
            "per-example losses), got an array computed outside the tape"
        )
    return Graph(nodes, list(inputs), params, consts, found, forms)
