"""Plan a training step from a traced :class:`~symgrad.compile.graph.Graph` and write its source.

What the step does, decided from the graph alone:

* **forward only** — a node none of whose arguments leads back to a trained parameter runs its
  plain forward kernel; the backward pass stops there;
* **saved values** — a node in the backward pass runs its ``forward_saved`` kernel, which writes
  what its derived VJP reads (a tensor op's residuals, an elementwise op's local partials), and
  the backward pass runs ``vjp_saved`` (or multiplies by the partials);
* **only the gradients needed** — each node's VJP is the op derived with ``wrt`` = the
  arguments a gradient must reach (the lowest trained layer computes no input gradient);
* **cotangents** — the first VJP reaching a value writes its cotangent, later ones write a
  scratch buffer that is added to it; parameter gradients land in buffers the step returns;
* **the loss** — the mean of the traced output, its cotangent ``1/n`` everywhere.

The generated function depends on the graph's structure, not its shapes: every size is read
from an array (``X.shape[1]``, ``X.size``), so one compiled step serves every batch shape, and
the buffers are sized per binding (:class:`Buffer` shapes follow the traced shapes), as views of
one :class:`BufferPool` that every shape's binding shares.  The source
is plain text assembled here — no SymPy: the kernels' own modules say what their arguments are
(``DIMS``, ``RESIDUALS``, ``SAVE_PARTIALS``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..codegen.dtypes import kernel_name
from ..codegen.jit import njit
from ..runtime.tensor import TensorOp
from ..symbolic.update import UpdateRule
from .graph import Graph, Ref, UnsupportedStepError

_PAD = "    "
_NJIT = njit()
_NJIT_PARALLEL = njit(parallel=True)

#: A step of at most this many ops is one compiled function (no Python between its kernels);
#: a larger one is a Python function calling the compiled kernels in order — LLVM's work on one
#: function grows faster than its length (a 6-layer BERT's step took minutes to compile as one
#: function), while the calls cost microseconds against a step of milliseconds.
WHOLE_STEP_OPS = 16

def _both_variants(signature: str, body: list[str]) -> list[str]:
    """An elementwise function of the step (``name(args)``, ``body`` its element loops) and its
    parallel variant ``name_par``: the same loops over elements as ``prange`` loops."""
    threaded = [line.replace("for i in range(", "for i in prange(") for line in body]
    name, args = signature.split("(", 1)
    return [
        _NJIT, f"def {signature}:", *body, f"{_PAD}return None", "", "",
        _NJIT_PARALLEL, f"def {name}_par({args}:", *threaded, f"{_PAD}return None", "", "",
    ]  # fmt: skip


#: The loops of a step besides its ops' kernels, each a small compiled function.
_STEP_HELPERS = "\n".join([
    _NJIT,
    "def _sg_mean(x):",
    f"{_PAD}total = 0.0",
    f"{_PAD}for i in range(x.size):",
    f"{_PAD}{_PAD}total += x[i]",
    f"{_PAD}return total / x.size",
    "",
    "",
    _NJIT,
    "def _sg_fill_reciprocal_size(g):",
    f"{_PAD}for i in range(g.size):",
    f"{_PAD}{_PAD}g[i] = 1.0 / g.size",
    "",
    "",
    *_both_variants("_sg_multiply(out, g, partial)", [
        f"{_PAD}for i in range(g.size):", f"{_PAD}{_PAD}out[i] = g[i] * partial[i]"]),
    *_both_variants("_sg_add_into(total, part)", [
        f"{_PAD}for i in range(total.size):", f"{_PAD}{_PAD}total[i] += part[i]"]),
])  # fmt: skip
#: The step's own functions with a parallel variant (``<name>_par``, elementwise: the same
#: results); the step's parallel variant calls those.
_THREADED_HELPERS = ("_sg_multiply", "_sg_add_into", "_update_param", "_clip_apply")


@dataclass(frozen=True)
class Buffer:
    """An array the step reads or writes, allocated by the caller: ``shape`` for the traced
    shapes; ``first``/``last`` the positions (in the step's sequence of operations) where it is
    written first and read last, so buffers whose lives do not overlap may share memory."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    role: str  # "value", "residual", "partial", "cotangent", "scratch", "grad", "ones"
    first: int
    last: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass
class StepPlan:
    """The step of one graph: arguments in call order, kernels imported, code, buffers."""

    args: list[tuple[str, str, int | str]] = field(default_factory=list)  # (name, kind, index)
    imports: list[tuple[str, str, str]] = field(default_factory=list)  # (module, fn, alias)
    #: the aliases of kernels that have a parallel variant (imported as ``<alias>_par``)
    parallel: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)
    buffers: dict[str, Buffer] = field(default_factory=dict)
    grads: dict[int, str] = field(default_factory=dict)  # trained param index → its buffer
    #: the updated parameters, in the rows of the ``scalars`` argument: (param index, the
    #: names of its state arguments)
    updates: list[tuple[int, list[str]]] = field(default_factory=list)
    forward_only: list[int] = field(default_factory=list)  # nodes without a backward pass
    saving: list[int] = field(default_factory=list)  # nodes that save values for their VJP
    whole: bool = True  # one compiled function (at most WHOLE_STEP_OPS ops), else a driver
    _layout: Layout | None = field(default=None, repr=False, compare=False)

    def source(self, key: str, rule: UpdateRule | None, clip: str | None) -> str:
        """The module text: ``forward_backward(*args) -> loss`` (the loss and every trained
        parameter's gradient), ``update(*args)`` (the optimizer's rule on every trained
        parameter, after clipping) and ``step(*args)``, both in one call; and
        ``forward_backward_par`` and ``step_par``, the same calling the kernels' parallel
        variants (the same results on any number of threads, :mod:`symgrad.runtime.threads`).

        The update's loops are generated from the rule's formulas (SymPy): only when the
        module is not in the cache yet.
        """
        update: list[str] = []
        helpers: set[str] = set()
        one: list[str] = []
        if rule is not None:
            update, one, helpers = _update_lines(self, rule, clip)
        head = ["import math", "", "import numpy as np", "from numba import njit, prange"]
        head += [f"from {m} import {fn} as {alias}" for m, fn, alias in self.imports]
        from ..codegen.printer import VECTOR_MATH_SOURCE

        params = ", ".join(name for name, _, _ in self.args)
        decorator = _NJIT if self.whole else "# a driver: Python calling the compiled kernels"
        # the same step calling the kernels' parallel variants (the same results)
        names = "|".join([*sorted(self.parallel), *_THREADED_HELPERS])
        threaded = re.compile(rf"\b({names})\(")

        def par(lines: list[str]) -> list[str]:
            return [threaded.sub(r"\1_par(", line) for line in lines]
        body = [
            "",
            "",
            *[VECTOR_MATH_SOURCE[h] + "\n" for h in sorted(helpers)],
            _STEP_HELPERS,
            *one,
            decorator,
            f"def forward_backward({params}):",
            *self.lines,
            f"{_PAD}return loss",
            "",
            "",
            decorator,
            f"def update({params}):",
            *(update or [f"{_PAD}pass"]),
            f"{_PAD}return None",
            "",
            "",
            decorator,
            f"def step({params}):",
            f"{_PAD}loss = forward_backward({params})",
            f"{_PAD}update({params})",
            f"{_PAD}return loss",
            "",
            "",
            decorator,
            f"def forward_backward_par({params}):",
            *par(self.lines),
            f"{_PAD}return loss",
            "",
            "",
            decorator,
            f"def update_par({params}):",
            *par(update or [f"{_PAD}pass"]),
            f"{_PAD}return None",
            "",
            "",
            decorator,
            f"def step_par({params}):",
            f"{_PAD}loss = forward_backward_par({params})",
            f"{_PAD}update_par({params})",
            f"{_PAD}return loss",
        ]
        text = "\n".join([*head, *body]) + "\n"
        digest = hashlib.sha256(text.encode()).hexdigest()
        return (
            f"# symgrad generated training step\n# symgrad {__version__}; spec {key}\n"
            f"# body-sha256 {digest}\n{text}"
        )

    def total_bytes(self) -> int:
        """The bytes of all buffers, were none to share memory."""
        return sum(b.nbytes for b in self.buffers.values())

    def layout(self) -> Layout:
        """Where the buffers live (computed once per plan).

        Buffers whose lives do not overlap share memory (each a contiguous view at the start of
        a shared block; the smallest fitting free block, else a new one).  The ``ones`` buffer
        is constant across calls and shares with nothing.  Neither do the trained parameters'
        gradients: they are consecutive views of one flat buffer per dtype, the last
        parameter's first (reverse layer order: the order in which a data-parallel all-reduce
        sends them, in buckets that are slices of the flat buffer, without copies)."""
        if self._layout is not None:
            return self._layout
        places: dict[str, tuple[str, int, int]] = {}
        flats: list[tuple[np.dtype, int]] = []
        order = [self.buffers[self.grads[n]] for n in sorted(self.grads, reverse=True)]
        for dtype in dict.fromkeys(b.dtype for b in order):
            offset = 0
            for buf in (b for b in order if b.dtype == dtype):
                places[buf.name] = ("flat", len(flats), offset)
                offset += _size(buf)
            flats.append((dtype, offset))
        blocks: list[list[Any]] = []  # [dtype, elements, free from this operation on]
        ones = 0
        for buf in sorted(self.buffers.values(), key=lambda b: (b.first, b.name)):
            if buf.name in places:  # a gradient, in its flat buffer
                continue
            if buf.role == "ones":
                places[buf.name] = ("ones", 0, 0)
                ones += buf.nbytes
                continue
            size = max(1, _size(buf))
            free = [
                k for k, b in enumerate(blocks)
                if b[2] < buf.first and b[0] == buf.dtype and b[1] >= size
            ]  # fmt: skip
            if free:
                k = min(free, key=lambda k: blocks[k][1])
            else:
                k = len(blocks)
                blocks.append([buf.dtype, size, 0])
            blocks[k][2] = buf.last
            places[buf.name] = ("block", k, 0)
        self._layout = Layout(tuple((d, n) for d, n, _ in blocks), tuple(flats), places, ones)
        return self._layout

    def allocate(
        self, pool: BufferPool | None = None
    ) -> tuple[dict[str, np.ndarray], int, list[np.ndarray]]:
        """Arrays for the buffers (views of ``pool``'s memory; without one, of memory of their
        own), the bytes they take, and the flat gradient buffers.  The bytes count every block
        of :meth:`layout`, the flat buffers and ``ones``."""
        layout = self.layout()
        blocks, flats = (pool or BufferPool()).take(layout)
        arrays: dict[str, np.ndarray] = {}
        for name, (where, k, offset) in layout.places.items():
            buf = self.buffers[name]
            if where == "ones":
                arrays[name] = np.ones(buf.shape, buf.dtype)
                continue
            storage = blocks[k] if where == "block" else flats[k]
            arrays[name] = storage[offset : offset + _size(buf)].reshape(buf.shape)
        return arrays, layout.nbytes, flats


@dataclass(frozen=True)
class Layout:
    """Where a plan's buffers live: ``blocks`` the shared blocks and ``flats`` the gradients'
    flat buffers (each a dtype and a number of elements); ``places`` each buffer's home,
    ``("block", k, 0)``, ``("flat", k, offset)`` or ``("ones", 0, 0)``; ``ones`` the bytes of
    the ``ones`` buffers."""

    blocks: tuple[tuple[np.dtype, int], ...]
    flats: tuple[tuple[np.dtype, int], ...]
    places: dict[str, tuple[str, int, int]]
    ones: int

    @property
    def nbytes(self) -> int:
        parts = [*self.blocks, *self.flats]
        return sum(n * np.dtype(d).itemsize for d, n in parts) + self.ones


class BufferPool:
    """The memory behind the buffers of steps that never run at once: the bindings of one
    compiled step, one per input shape.  No buffer's content outlives its step (each is
    written before it is read), so every shape's blocks can be views of the same arrays.

    :meth:`take` pairs a layout's blocks with the pool's arrays of their dtype by rank (the
    largest block with the largest array, ...) and replaces an array that is too small: the
    pool holds, per rank, the largest block any shape has needed — for shapes of one
    structure, about the largest shape's bytes, however many shapes there are.  ``generation``
    counts the replacements: views taken before one may hold memory the pool let go.
    """

    def __init__(self) -> None:
        self._blocks: dict[np.dtype, list[np.ndarray]] = {}  # per dtype, largest first
        self._flats: dict[np.dtype, np.ndarray] = {}
        self.generation = 0

    @property
    def nbytes(self) -> int:
        arrays = [*self._flats.values(), *(a for v in self._blocks.values() for a in v)]
        return sum(a.nbytes for a in arrays)

    def _ranked(self, layout: Layout) -> dict[np.dtype, list[int]]:
        """Per dtype, the layout's blocks largest first (ties in order)."""
        ranked: dict[np.dtype, list[int]] = {}
        for k, (dtype, _) in enumerate(layout.blocks):
            ranked.setdefault(dtype, []).append(k)
        for ks in ranked.values():
            ks.sort(key=lambda k: -layout.blocks[k][1])
        return ranked

    def fits(self, layout: Layout) -> bool:
        """Whether :meth:`take` would find room for ``layout`` without replacing an array."""
        for dtype, n in layout.flats:
            if dtype not in self._flats or self._flats[dtype].size < n:
                return False
        for dtype, ks in self._ranked(layout).items():
            have = self._blocks.get(dtype, [])
            if len(have) < len(ks):
                return False
            if any(have[rank].size < layout.blocks[k][1] for rank, k in enumerate(ks)):
                return False
        return True

    def take(self, layout: Layout) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Storage for ``layout``: an array of at least each block's size (the same array for
        no two of its blocks), and each flat buffer (exactly its size, a view)."""
        blocks: list[np.ndarray] = [np.empty(0)] * len(layout.blocks)
        for dtype, ks in self._ranked(layout).items():
            have = self._blocks.setdefault(dtype, [])
            for rank, k in enumerate(ks):
                need = layout.blocks[k][1]
                if rank == len(have):
                    have.append(np.zeros(need, dtype))
                    self.generation += 1
                elif have[rank].size < need:  # stays largest first: need ≤ the rank before's
                    have[rank] = np.zeros(need, dtype)
                    self.generation += 1
                blocks[k] = have[rank]
        flats = []
        for dtype, n in layout.flats:
            if dtype not in self._flats or self._flats[dtype].size < n:
                self._flats[dtype] = np.zeros(n, dtype)
                self.generation += 1
            flats.append(self._flats[dtype][:n])
        return blocks, flats


def _size(buf: Buffer) -> int:
    return int(np.prod(buf.shape, dtype=np.int64))


def _flat(name: str) -> str:
    return f"{name}.reshape({name}.size)"


def plan_step(
    graph: Graph,
    trained: set[int],
    variants: Mapping[int, Any],
    rule: UpdateRule | None = None,
    clip: str | None = None,
    keep: tuple[Ref, ...] = (),
) -> StepPlan:
    """The plan of ``graph``'s step.

    ``trained`` are the indices of the parameters that get a gradient; ``variants[n]`` is the op
    node ``n`` runs when it is in the backward pass: its op derived with ``wrt`` = the float
    arguments a gradient must reach (:func:`wanted`).  ``rule`` is the optimizer's update
    (None: the step only computes gradients), ``clip`` ``"norm"``, ``"value"`` or None.
    ``keep`` are node values read after the step (the model's output): their buffers live to
    its end.
    """
    plan = StepPlan()
    nodes = graph.nodes
    plan.whole = len(nodes) <= WHOLE_STEP_OPS
    needs = _needs_grad(graph, trained)
    live = _reaching_output(graph)
    backward = [n for n in range(len(nodes)) if live[n] and needs[Ref("node", n)]]
    clock = [0]  # the operation being planned: buffers it reads or writes live through it

    def operation() -> None:
        clock[0] += 1

    names: dict[Ref, str] = {}
    for n in range(len(graph.inputs)):
        names[Ref("input", n)] = f"in{n}"
        plan.args.append((f"in{n}", "input", n))
    for n, _ in enumerate(graph.params):
        names[Ref("param", n)] = f"p{n}"
        plan.args.append((f"p{n}", "param", n))
    for n, _ in enumerate(graph.consts):
        names[Ref("const", n)] = f"c{n}"
        plan.args.append((f"c{n}", "const", n))
    for n, _ in enumerate(nodes):
        names[Ref("node", n)] = f"v{n}"

    buffers: dict[str, list[Any]] = {}  # name → [shape, dtype, role, first, last]

    def buffer(name: str, shape: tuple[int, ...], dtype: np.dtype, role: str) -> str:
        if name not in buffers:
            buffers[name] = [shape if shape else (1,), np.dtype(dtype), role, clock[0], clock[0]]
            plan.args.append((name, "buffer", name))
        return use(name)

    def use(name: str) -> str:
        if name in buffers:
            buffers[name][4] = clock[0]
        return name

    def shape_of(ref: Ref) -> tuple[int, ...]:
        if ref.kind == "input":
            return tuple(graph.inputs[ref.index].shape)
        if ref.kind == "param":
            return tuple(graph.params[ref.index].data.shape)
        if ref.kind == "const":
            return tuple(graph.consts[ref.index].shape)
        return tuple(nodes[ref.index].shape)

    def alias(n: int, op: Any, fn: str) -> str:
        name = f"k{n}_{fn}"
        plan.imports.append((op.module.__name__, kernel_name(fn, nodes[n].dtype), name))
        threaded = kernel_name(fn + "_par", nodes[n].dtype)
        if hasattr(op.module, threaded):
            plan.imports.append((op.module.__name__, threaded, name + "_par"))
            plan.parallel.add(name)
        return name

    lines = plan.lines
    ones = None
    # -- forward -------------------------------------------------------------------------
    lines.append(f"{_PAD}# forward")
    for n, node in enumerate(nodes):
        operation()
        args = [use(names[a]) for a in node.args]
        for a in node.args:
            if a.kind == "node" and nodes[a.index].shape == () and a != graph.output:
                raise UnsupportedStepError(
                    f"node {n} ({node.op.name}) reads the 0-d output of node {a.index}; the step "
                    "compiler keeps 0-d values only as the loss"
                )
        out = buffer(f"v{n}", node.shape, node.dtype, "value")
        in_backward = n in backward
        op = variants[n] if in_backward else node.op
        if _is_tensor(op):
            shapes = [shape_of(a) for a in node.args]
            views, args, flat_out, kernel_shape = _kernel_args(
                op, n, args, shapes, out, tuple(node.shape)
            )
            lines += views
            dims = _dims(op, args, n)
            layout = getattr(op.module, "RESIDUALS", None) if in_backward else None
            if layout is not None:
                res = [
                    buffer(
                        f"r{n}_{k}", tuple(kernel_shape[a] for a in axes), node.dtype, "residual"
                    )
                    for k, axes in enumerate(layout)
                ]
                fn = alias(n, op, "forward_saved")
                lines.append(f"{_PAD}{fn}({', '.join([*args, *dims, flat_out, *res])})")
                plan.saving.append(n)
            else:
                fn = alias(n, op, "forward")
                lines.append(f"{_PAD}{fn}({', '.join([*args, *dims, flat_out])})")
        else:
            for a in node.args:
                if shape_of(a) != tuple(node.shape):
                    raise UnsupportedStepError(
                        f"node {n} ({op.name}): an elementwise op whose inputs broadcast "
                        f"({shape_of(a)} to {node.shape}) is not compiled yet"
                    )
            flat = [_flat(a) for a in args]
            if in_backward and getattr(op.module, "SAVE_PARTIALS", False):
                if ones is None:
                    ones = buffer("one", (1,), node.dtype, "ones")
                parts = [
                    buffer(f"d{n}_{k}", node.shape, node.dtype, "partial")
                    for k in range(len(wanted(graph, n, needs)))
                ]
                fn = alias(n, op, "value_and_vjp")
                call = [*flat, use(ones), "0", _flat(out), *(_flat(d) for d in parts)]
                lines.append(f"{_PAD}{fn}({', '.join(call)})")
                plan.saving.append(n)
            else:
                fn = alias(n, op, "forward")
                lines.append(f"{_PAD}{fn}({', '.join([*flat, _flat(out)])})")
        if not in_backward:
            plan.forward_only.append(n)
    # -- the loss: the mean of the output, and its cotangent 1/n ----------------------------
    operation()
    last = graph.output.index
    out = use(f"v{last}")
    lines += [f"{_PAD}# loss: the mean of v{last}", f"{_PAD}loss = _sg_mean({_flat(out)})"]
    cotangent: dict[int, str] = {}
    if backward and backward[-1] == last:
        g = buffer(f"g{last}", nodes[last].shape, nodes[last].dtype, "cotangent")
        lines.append(f"{_PAD}_sg_fill_reciprocal_size({_flat(g)})")
        cotangent[last] = g
    # -- backward --------------------------------------------------------------------------
    lines.append(f"{_PAD}# backward")
    written: set[str] = set()
    for n in reversed(backward):
        operation()
        node = nodes[n]
        reached = cotangent.get(n)
        if reached is None:  # nothing reached it (an output not used by the loss): no gradient
            continue
        g = reached
        op = variants[n]
        want = wanted(graph, n, needs)
        dsts: list[str] = []
        adds: list[tuple[str, str]] = []
        for k in want:
            ref = node.args[k]
            if ref.kind == "node":
                known = cotangent.get(ref.index)
                target = known if known is not None else buffer(
                    f"g{ref.index}", shape_of(ref), nodes[ref.index].dtype, "cotangent"
                )
                cotangent[ref.index] = target
            else:
                target = buffer(
                    f"gp{ref.index}", shape_of(ref), graph.params[ref.index].data.dtype, "grad"
                )
                plan.grads[ref.index] = target
            if target in written:  # a later contribution: into scratch, then added
                scratch = buffer(f"t{n}_{k}", shape_of(ref), node.dtype, "scratch")
                dsts.append(scratch)
                adds.append((target, scratch))
            else:
                dsts.append(target)
                written.add(target)
        args = [use(names[a]) for a in node.args]
        g = use(g)
        if _is_tensor(op):
            shapes = [shape_of(a) for a in node.args]
            views, args, flat_out, _ = _kernel_args(
                op, n, args, shapes, f"v{n}", tuple(node.shape)
            )
            lines += views
            dims = _dims(op, args, n)
            binding = op._plan
            if binding.out_batch:  # the cotangent flattened as the output is
                first = binding.batch[0]
                lead = len(shapes[first]) - (len(binding.shape_text[first]) - 1)
                g = _flattened(g, len(node.shape) - lead, len(node.shape))
            dsts = [  # the gradients of batch inputs flattened as the inputs are
                _flattened(dst, len(binding.shape_text[k]) - 1, len(shapes[k]))
                if k in binding.batch
                else dst
                for k, dst in zip(want, dsts, strict=True)
            ]
            g_arg = f"{g}[0]" if node.shape == () else g
            if n in plan.saving:
                kept = [flat_out]
                kept += [use(f"r{n}_{k}") for k in range(len(op.module.RESIDUALS))]
                fn = alias(n, op, "vjp_saved")
                lines.append(f"{_PAD}{fn}({', '.join([*args, *dims, *kept, g_arg, *dsts])})")
            else:
                fn = alias(n, op, "vjp")
                lines.append(f"{_PAD}{fn}({', '.join([*args, *dims, g_arg, *dsts])})")
        elif n in plan.saving:  # the chain rule: the cotangent times each saved partial
            for k, dst in enumerate(dsts):
                part = _flat(use(f"d{n}_{k}"))
                lines.append(f"{_PAD}_sg_multiply({_flat(dst)}, {_flat(g)}, {part})")
        else:
            fn = alias(n, op, "vjp")
            flat = [_flat(a) for a in args]
            lines.append(f"{_PAD}{fn}({', '.join([*flat, _flat(g), '1', *map(_flat, dsts)])})")
        for target, scratch in adds:
            operation()
            lines.append(f"{_PAD}_sg_add_into({_flat(use(target))}, {_flat(use(scratch))})")
    operation()  # the gradients and kept values are read after the step: they live to its end
    for name in plan.grads.values():
        use(name)
    for ref in keep:
        use(names[ref])
    plan.buffers = {
        name: Buffer(name, tuple(shape), dtype, role, first, last_use)
        for name, (shape, dtype, role, first, last_use) in buffers.items()
    }
    if rule is not None:
        # the update's arguments: each parameter's states, a table of scalars (one row per
        # parameter: its group's hyperparameters, counter, fresh flags), the clipping limits
        for n in sorted(plan.grads):
            states = [f"{st.name}__p{n}" for st in rule.states]
            plan.args += [(name, "state", f"{n}:{k}") for k, name in enumerate(states)]
            plan.updates.append((n, states))
        plan.args.append(("scalars", "scalars", 0))
        if clip == "norm":
            plan.args += [("max_norm", "max_norm", 0), ("grad_norm", "grad_norm", 0)]
        elif clip == "value":
            plan.args.append(("clip_value", "clip_value", 0))
    return plan


def _update_lines(
    plan: StepPlan, rule: UpdateRule, clip: str | None
) -> tuple[list[str], list[str], set[str]]:
    """The body of ``update`` (clip the gradients in place, as ``clip_grad_norm_`` and
    ``clip_grad_value_`` do, then call ``_update_param`` on every trained parameter), the
    function ``_update_param`` (``rule``'s update of one parameter: one small function for
    every parameter, so a model of hundreds of tensors compiles as fast as one of two), and
    the math helpers they call.  SymPy: the code generation of a cold start."""
    import sympy as sp

    from ..codegen.loops import Loops, elementwise_loop
    from ..codegen.printer import print_expr
    from ..codegen.update import update_lines

    dtypes = {plan.buffers[g].dtype for g in plan.grads.values()}
    loops = Loops("update", single=dtypes == {np.dtype(np.float32)})
    lines: list[str] = []
    one: list[str] = []  # the module-level functions update calls
    g = sp.Symbol("g", real=True)
    clipped: sp.Expr | None = None
    if clip == "norm":
        # the global 2-norm: each gradient's norm, then the norm of those (as torch)
        one += [_NJIT, "def _clip_sq(_gf):", f"{_PAD}clip_sq = 0.0"]
        one += elementwise_loop(
            loops, "clip_grad_norm", "_gf.size", {g: "_gf"}, [[("sq", g**2)]], _PAD,
            accumulate={"sq": "clip_sq"},
        )  # fmt: skip
        one += [f"{_PAD}return clip_sq", "", ""]
        lines.append(f"{_PAD}clip_total = 0.0")
        for n, _ in plan.updates:
            lines += [  # each gradient's norm, rounded, as torch adds them up
                f"{_PAD}clip_norm = math.sqrt(_clip_sq({_flat(plan.grads[n])}))",
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
        limit = "clip_coef"
        clipped = sp.Symbol(limit, real=True) * g
    elif clip == "value":
        limit = "clip_value"
        c = sp.Symbol(limit, real=True)
        clipped = sp.Min(sp.Max(g, -c), c)  # torch.clamp(g, -c, c)
    if clipped is not None:  # in place, as clip_grad_norm_ and clip_grad_value_ do
        apply = elementwise_loop(loops, f"clip_grad_{clip}", "_gf.size", {g: "_gf"},
                                 [[("_gf[i]", clipped)]], _PAD)  # fmt: skip
        one += _both_variants(f"_clip_apply(_gf, {limit})", apply)
    for j, (n, states) in enumerate(plan.updates):
        grad = _flat(plan.grads[n])
        if clipped is not None:
            lines.append(f"{_PAD}_clip_apply({grad}, {limit})")
        arrays = [_flat(f"p{n}"), grad, *(_flat(name) for name in states)]
        values = [f"scalars[{j}, {c}]" for c in range(len(rule.scalar_inputs))]
        lines.append(f"{_PAD}_update_param({', '.join([*arrays, *values])})")
    arguments = [*rule.array_inputs, *rule.scalar_inputs]
    names = {a: f"a_{a}" for a in arguments}  # never a name of the generated code's own
    body = update_lines(
        loops, rule, {a: names[a] for a in rule.array_inputs},
        {a: names[a] for a in rule.scalar_inputs}, _PAD,
    )  # fmt: skip
    one += _both_variants(f"_update_param({', '.join(names[a] for a in arguments)})", body)
    return lines, one, set(loops.helpers)


def _flattened(name: str, keep: int, rank: int) -> str:
    """``name`` (an array of ``rank`` axes) with all but its last ``keep`` axes in one."""
    parts = ["-1", *(f"{name}.shape[{a}]" for a in range(rank - keep, rank))]
    return f"{name}.reshape(({', '.join(parts)},))"


def _kernel_args(
    op: Any,
    n: int,
    args: list[str],
    arg_shapes: list[tuple[int, ...]],
    out: str,
    out_shape: tuple[int, ...],
) -> tuple[list[str], list[str], str, tuple[int, ...]]:
    """A tensor op's kernel arguments: a batch op (one formula over any leading axes) takes
    its batch inputs and output with those axes flattened into one, as
    :meth:`~symgrad.runtime.tensor.TensorOp._flatten_batch` does.  Returns the lines binding
    the flattened views (``_b<n>_<k>``, ``_o<n>``), the arguments, the output and the shape
    the kernel sees.  Ranks are part of the graph's structure, so the text is too."""
    plan = op._plan
    if not plan.batch:
        return [], args, out, out_shape
    lines, flat = [], list(args)
    for k in plan.batch:
        keep = len(plan.shape_text[k]) - 1
        flat[k] = f"_b{n}_{k}"
        lines.append(f"{_PAD}{flat[k]} = {_flattened(args[k], keep, len(arg_shapes[k]))}")
    if not plan.out_batch:
        return lines, flat, out, out_shape
    k = plan.batch[0]
    lead = len(arg_shapes[k]) - (len(plan.shape_text[k]) - 1)
    lines.append(f"{_PAD}_o{n} = {_flattened(out, len(out_shape) - lead, len(out_shape))}")
    shape = (int(np.prod(out_shape[:lead], dtype=np.int64)), *out_shape[lead:])
    return lines, flat, f"_o{n}", shape


def _is_tensor(op: Any) -> bool:
    return isinstance(op, TensorOp)


def _dims(op: Any, args: list[str], n: int) -> list[str]:
    """The dim arguments of a tensor op's kernels, read from its arguments' shapes."""
    found = []
    for source in op.module.DIMS:
        if source is None:
            raise UnsupportedStepError(
                f"node {n} ({op.name}): a dim of the op is no whole axis of any input, so the "
                "step cannot read it from an array's shape"
            )
        _, k, axis = source
        found.append(f"{args[k]}.shape[{axis}]")
    return found


def _needs_grad(graph: Graph, trained: set[int]) -> dict[Ref, bool]:
    needs: dict[Ref, bool] = {}
    for n in range(len(graph.inputs)):
        needs[Ref("input", n)] = False
    for n in range(len(graph.consts)):
        needs[Ref("const", n)] = False
    for n in range(len(graph.params)):
        needs[Ref("param", n)] = n in trained
    for n, node in enumerate(graph.nodes):
        needs[Ref("node", n)] = any(needs[a] for a in node.args)
    return needs


def _reaching_output(graph: Graph) -> list[bool]:
    """Which nodes the output depends on."""
    live = [False] * len(graph.nodes)
    live[graph.output.index] = True
    for n in range(len(graph.nodes) - 1, -1, -1):
        if live[n]:
            for a in graph.nodes[n].args:
                if a.kind == "node":
                    live[a.index] = True
    return live


def wanted(graph: Graph, n: int, needs: Mapping[Ref, bool]) -> list[int]:
    """The argument positions of node ``n`` a gradient must reach (arguments that lead back
    to a trained parameter)."""
    return [k for k, a in enumerate(graph.nodes[n].args) if needs[a]]


def needs_grad(graph: Graph, trained: set[int]) -> dict[Ref, bool]:
    """Which values a gradient must reach (public form of the planner's analysis)."""
    return _needs_grad(graph, trained)


def backward_nodes(graph: Graph, trained: set[int]) -> list[int]:
    """The nodes whose VJP the step runs."""
    needs = _needs_grad(graph, trained)
    live = _reaching_output(graph)
    return [n for n in range(len(graph.nodes)) if live[n] and needs[Ref("node", n)]]
