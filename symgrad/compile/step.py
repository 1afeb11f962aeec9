"""CompiledStep: a model's whole training step — forward, loss, backward, update — as one
function.

``compile_step(model, loss, optimizer)`` returns ``step(*inputs, target) -> loss``.  On a call
with input shapes it has not seen, the model's forward is traced (:func:`~symgrad.compile.graph.
trace`, nothing computed) and planned (:func:`~symgrad.compile.plan.plan_step`); the step's
module is looked up in the kernel cache by a key hashing the graph's structure, which
parameters train, the optimizer's update rule and the kind of clipping — and generated (the one
time SymPy is needed) only when it is not there.  Every later shape of the same structure reuses
that module, and the same memory: every shape's buffers are views of one
:class:`~symgrad.compile.plan.BufferPool` (only one step runs at a time, and no buffer's content
outlives its step), which grows to the largest shape seen — a run over batches padded to many
lengths holds about one step's buffers, not one set per length.  The traced graphs and plans of
the last :data:`SHAPES_KEPT` shapes are kept (an older shape is traced again when it returns).
The step watches the model (:func:`symgrad.nn.modules.watch`): after an edit — a module's
attribute set, a ``Sequential`` item replaced, ``train()``/``eval()`` — or when a parameter's
array changed shape or dtype or the optimizer's parameters changed, a shape is traced again
before it runs, and planned again only if the graph differs.

The optimizer's hyperparameters are arguments, read from its parameter groups on every call
(a scheduler never recompiles the step), and its state lives in ``optimizer.state`` as in the
eager path, so the two can be mixed and checkpoints work.  ``clip_grad_norm=max_norm`` or
``clip_grad_value=c`` clip inside the step (``step.grad_norm`` is the norm before clipping);
``grad_hook(grads)`` runs between the backward pass and the update, on the gradient arrays
(in the order of the traced trained parameters: the model's layer order; views of the step's
buffers, changeable in place: data-parallel training averages them); they
are consecutive views of one flat buffer per dtype, the last parameter's first
(:meth:`CompiledStep.flat_gradients`), so that an all-reduce sends them in buckets without
copies (:mod:`symgrad.distributed`).

Models the tracer cannot take (a module without ``record``, an elementwise op that broadcasts)
raise :class:`~symgrad.errors.UnsupportedStepError`; ``fit`` then trains through the tape.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ShapeError, SymgradError, UnsupportedStepError
from ..nn.losses import Loss, fuse
from ..nn.modules import STEP_CACHE, Module, Parameter, edit_count, watch
from ..runtime.cache import ensure_imported, module_path, verified_text, write_source
from ..runtime.tensor import TensorOp
from ..runtime.threads import use_parallel
from ..symbolic.update import UpdateRule
from .graph import Graph, Ref, trace
from .plan import BufferPool, StepPlan, needs_grad, plan_step, wanted

#: How many input shapes a compiled step keeps the traced graph and plan of (least recently
#: used dropped first).  Their buffers share one pool whatever the number: this bounds only
#: the bookkeeping (and a shape seen again after more than this many others is traced again).
SHAPES_KEPT = 64


@dataclass
class _Binding:
    """One input-shape signature: the traced graph, its plan, and the argument list.  The
    buffers (``args`` at the positions of ``buffers``, ``grads``, ``flats``) are views of the
    step's pool, placed before a call when the pool changed since (``generation``)."""

    graph: Graph
    plan: StepPlan
    trained: set[int]  # the graph's parameters the step updates
    owned: frozenset[int]  # ids of the optimizer's parameters when bound
    edits: int  # the model's edit count when the graph was traced or found unchanged
    args: list[Any]
    slots: list[tuple[int, str, int | str]]  # (position, kind, index) of per-call arguments
    buffers: list[tuple[int, str]]  # (position, buffer name) of the buffer arguments
    held: int  # bytes of the step's buffers (shared where their lives do not overlap)
    gathers: list[tuple[TensorOp, list[int]]]  # ops reading integer inputs: their arg slots
    output: int | None  # the argument holding the model's output (the loss's input)
    work: int  # elements of the largest buffer: whether the step runs its parallel variant
    grads: list[tuple[Parameter, np.ndarray]] = field(default_factory=list)  # param, gradient
    flats: list[np.ndarray] = field(default_factory=list)  # the gradients' flat buffers
    generation: int = -1  # the pool's generation the views were taken in (-1: none held)
    #: (position, kind, name) of the arguments ``_prepare`` fills (found on its first call)
    prepared: list[tuple[int, str, str]] | None = None

    def release(self) -> None:
        """Drop the views of the pool (so that memory the pool replaced can be freed)."""
        for position, _ in self.buffers:
            self.args[position] = None
        self.grads, self.flats, self.generation = [], [], -1


class CompiledStep:
    """A compiled training step; ``step(*inputs, target)`` → the batch's mean loss.

    ``memory()`` reports, for the last shape run, the bytes its buffers take and the bytes
    they would without sharing, and the bytes of the pool every shape's buffers are views of.
    """

    def __init__(
        self,
        model: Module,
        loss: Loss,
        optimizer: Any,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        grad_hook: Callable[[list[np.ndarray]], None] | None = None,
        fuse_loss: bool = True,
    ) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self._fuse_loss = fuse_loss
        self._refresh()
        rule = getattr(optimizer, "rule", None)
        if rule is None or not hasattr(optimizer, "prepare_update"):
            raise UnsupportedStepError(
                f"the step compiler updates parameters by an optimizer's UpdateRule; "
                f"{type(optimizer).__name__} has none (symgrad.optim's optimizers do)"
            )
        self.rule: UpdateRule = rule
        self._width = max(len(rule.scalar_inputs), 1)  # columns of the update's scalar table
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self._clip = _clip_kind(clip_grad_norm, clip_grad_value)
        self.grad_hook = grad_hook
        self._module: Any = None
        self._key: str | None = None
        self._bindings: OrderedDict[tuple, _Binding] = OrderedDict()  # least recent first
        self._pool = BufferPool()
        self._flags: tuple[bool, ...] = ()
        self._last: _Binding | None = None
        self._grad_norm = np.full(1, np.nan)

    # -- tracing and planning ----------------------------------------------------------------

    def _refresh(self) -> None:
        """Take the model as it is now: its modules watched (an edit of one is counted), the
        loss fused again, the parameters listed again.  Run at first and after an edit."""
        watch(self.model)
        # a trailing activation joins an elementwise loss: one formula, differentiated as one
        # (Sigmoid + BCELoss is computed as BCE on the logits, finite at any logit)
        model, loss = self.model, self.loss
        self._body, self._objective = fuse(model, loss) if self._fuse_loss else (model, loss)
        self._params = model.parameters()  # their requires_grad flags are read on every call
        self._seen = edit_count()

    def _adopt_loss(self, loss: Loss, retrace: bool) -> None:
        """Compute ``loss`` from now on: with ``retrace``, every shape is traced again (and
        kept if nothing changed), as after an edit of the model."""
        self.loss = loss
        self._refresh()
        if retrace:
            for binding in self._bindings.values():
                binding.edits = -1

    def _owners(self) -> dict[int, int]:
        """``{id(parameter): its group's index}`` over the optimizer's parameter groups."""
        return {id(p): k for k, g in enumerate(self.optimizer.param_groups) for p in g["params"]}

    def _stale(self, binding: _Binding, owners: dict[int, int]) -> bool:
        """Whether ``binding`` may no longer be the model's step: a module was edited since it
        was traced, the optimizer's parameters changed, or a parameter's array changed shape
        or dtype."""
        if binding.edits != self._seen or owners.keys() != binding.owned:
            return True
        graph = binding.graph
        return any(
            p.data.shape != shape or p.data.dtype != dtype
            for p, (shape, dtype) in zip(graph.params, graph.forms, strict=True)
        )

    def _trace(self, given: tuple[np.ndarray, ...]) -> Graph:
        """The graph of the model's forward on ``given``.  What the forward set on its own
        modules meanwhile (ops built on first use) is not an edit; modules it built are
        watched from now on."""
        graph = trace(self._forward, given)
        watch(self.model)
        self._seen = edit_count()
        return graph

    def _retrace(
        self, binding: _Binding, given: tuple[np.ndarray, ...], owners: dict[int, int]
    ) -> _Binding:
        """``binding`` again if the model, traced as it is now, does what it did; else the
        step of the model as it is now (every other shape's binding dropped: traced again
        when it returns)."""
        graph = self._trace(given)
        if graph.same_as(binding.graph) and self._trained(graph, owners) == binding.trained:
            binding.edits, binding.owned = self._seen, frozenset(owners)
            return binding
        for other in self._bindings.values():
            other.release()
        self._bindings.clear()
        self._last = None  # its arguments went with it
        return self._bind(given, owners, graph)

    def _forward(self, tape: Any, *arrays: np.ndarray) -> np.ndarray:
        *inputs, target = arrays
        return self._objective.record(tape, self._body.record(tape, *inputs), target)

    def _trained(self, graph: Graph, owners: dict[int, int]) -> set[int]:
        """The graph's parameters the step updates: the optimizer's (``owners``, see
        :meth:`_owners`) that require a gradient."""
        return {n for n, p in enumerate(graph.params) if p.requires_grad and id(p) in owners}

    def _variant(self, graph: Graph, n: int, want: list[int]) -> Any:
        """Node ``n``'s op derived with gradients for the arguments ``want`` only."""
        from ..api import with_wrt

        op = graph.nodes[n].op
        return with_wrt(op, [op.input_names[k] for k in want])

    def _bind(
        self, arrays: tuple[np.ndarray, ...], owners: dict[int, int], graph: Graph | None = None
    ) -> _Binding:
        if graph is None:
            graph = self._trace(arrays)
        trained = self._trained(graph, owners)
        if not trained:
            raise UnsupportedStepError("the model has no parameter the optimizer trains")
        needs = needs_grad(graph, trained)
        variants = {
            n: self._variant(graph, n, wanted(graph, n, needs))
            for n in range(len(graph.nodes))
            if needs[Ref("node", n)]
        }
        loss_node = graph.nodes[graph.output.index]
        keep = tuple(a for a in loss_node.args[:1] if a.kind == "node")  # the model's output
        plan = plan_step(graph, trained, variants, self.rule, self._clip, keep)
        parts = [graph.structure(), str(sorted(trained)), self.rule.name]
        parts += [self.rule.fingerprint(), str(self._clip), f"whole={plan.whole}"]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()
        if key != self._key:
            self._module = self._load(plan, key)
            self._key = key
        args: list[Any] = []
        slots = []
        buffers = []
        for position, (_, kind, index) in enumerate(plan.args):
            if kind == "const":
                args.append(graph.consts[int(index)])
                continue
            args.append(None)
            if kind == "buffer":
                buffers.append((position, str(index)))
            else:
                slots.append((position, kind, index))
        where = {name: k for k, (name, _, _) in enumerate(plan.args)}
        gathers = [
            (node.op, [where[_arg_name(a)] for a in node.args])
            for node in graph.nodes
            if isinstance(node.op, TensorOp) and any(node.op._plan.integer)
        ]
        output = where[_arg_name(keep[0])] if keep else None
        work = max((b.nbytes // b.dtype.itemsize for b in plan.buffers.values()), default=0)
        held = plan.layout().nbytes
        return _Binding(
            graph, plan, trained, frozenset(owners), self._seen, args, slots, buffers, held,
            gathers, output, work,
        )  # fmt: skip

    def _place(self, binding: _Binding) -> None:
        """Point ``binding``'s buffer arguments at the pool's memory.  Were the pool to grow,
        every other binding first lets go of its views: the arrays replaced are freed at once
        (a step over ever longer batches holds one pool, not one per length)."""
        layout = binding.plan.layout()
        if not self._pool.fits(layout):
            for other in self._bindings.values():
                other.release()
        arrays, _, flats = binding.plan.allocate(self._pool)
        for position, name in binding.buffers:
            binding.args[position] = arrays[name]
        graph, plan = binding.graph, binding.plan
        binding.grads = [(graph.params[n], arrays[name]) for n, name in sorted(plan.grads.items())]
        binding.flats = flats
        binding.generation = self._pool.generation

    def _load(self, plan: StepPlan, key: str) -> Any:
        """The step's module: from the cache, else generated (with SymPy) and cached.  The
        kernels' modules it imports by name were imported while planning."""
        path = module_path("training_step", key)
        text = verified_text(path, key)
        if text is None:  # missing, damaged, or another structure's under this name
            text = plan.source(key, self.rule, self._clip)
            write_source(path, text)
        return ensure_imported(path, text)

    # -- running -----------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """``{"held": bytes, "unshared": bytes, "pool": bytes}``: the bytes the buffers of the
        last shape run take (shared where their lives do not overlap) and would take without
        sharing, and the bytes of the pool that every shape's buffers are views of (what the
        step holds: about the largest shape's ``held``, however many shapes it has run)."""
        pool = self._pool.nbytes
        if self._last is None:
            return {"held": 0, "unshared": 0, "pool": pool}
        return {"held": self._last.held, "unshared": self._last.plan.total_bytes(), "pool": pool}

    @property
    def output(self) -> np.ndarray | None:
        """A copy of the model's output in the last step (the loss's input: the logits before
        ``CrossEntropyLoss``; with a trailing activation fused into the loss, the activation's
        input), computed in the step's forward pass; None before the first step."""
        last = self._last
        if last is None or last.output is None:
            return None
        return np.array(last.args[last.output])

    @property
    def grad_norm(self) -> float:
        """The global gradient norm of the last step, before clipping (with
        ``clip_grad_norm``; NaN otherwise)."""
        return float(self._grad_norm[0])

    def _binding(self, given: tuple[np.ndarray, ...]) -> tuple[_Binding, dict[int, int]]:
        """The binding of ``given``'s shapes (traced and planned if new, traced again if the
        model may have changed since), and ``{id(parameter): group}`` of the optimizer."""
        if edit_count() != self._seen:  # a module of the model was edited
            self._refresh()
        flags = tuple(p.requires_grad for p in self._params)
        if flags != self._flags:  # freezing or unfreezing changes what the step computes
            for p, trained in zip(self._params, self._flags, strict=False):  # () at first
                if trained and not p.requires_grad and p.grad is not None:
                    p.grad = p.grad.copy()  # its place in the pool goes to other gradients
            self._bindings.clear()
            self._flags = flags
        signature = tuple((a.shape, a.dtype.str) for a in given)
        binding = self._bindings.get(signature)
        owners = self._owners()
        if binding is not None and self._stale(binding, owners):
            binding = self._bindings[signature] = self._retrace(binding, given, owners)
        elif binding is None:
            binding = self._bindings[signature] = self._bind(given, owners)
            while len(self._bindings) > SHAPES_KEPT:
                self._bindings.popitem(last=False)[1].release()
        else:
            self._bindings.move_to_end(signature)
        return binding, owners

    def output_form(self, *arrays: Any) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of the model's output (the loss's input) in a step on
        ``arrays``, found by tracing: nothing is computed and no parameter changes, but the
        errors the step would raise for the arrays' shapes and dtypes are raised.  The step
        of these shapes is ready afterwards."""
        binding, _ = self._binding(_batch(arrays))
        graph = binding.graph
        out = graph.nodes[graph.output.index].args[0]  # the model's output, or a step input
        if out.kind == "node":
            return graph.nodes[out.index].shape, graph.nodes[out.index].dtype
        return graph.inputs[out.index].shape, graph.inputs[out.index].dtype

    def __call__(self, *arrays: Any) -> float:
        """One training step on a batch: ``step(*inputs, target)`` → its mean loss; every
        trained parameter's ``grad`` is set and the optimizer's update applied."""
        given = _batch(arrays)
        binding, owners = self._binding(given)
        if binding.generation != self._pool.generation:  # views of memory the pool replaced
            self._place(binding)
        graph, args = binding.graph, binding.args
        for position, kind, index in binding.slots:
            if kind == "input":
                args[position] = given[int(index)]
            elif kind == "param":
                p = graph.params[int(index)]
                if not (p.data.flags.c_contiguous and p.data.flags.writeable):
                    p.data = np.array(p.data, order="C")  # updated in place from here on
                args[position] = p.data
        for op, positions in binding.gathers:  # an index out of range stops the step here
            found = op._plan.fast(tuple(args[k] for k in positions))
            if found is not None and found[3]:
                op._check_index_ranges(tuple(args[k] for k in positions), found[3])
        undo = self._prepare(binding, owners)
        module = self._module
        threaded = use_parallel(binding.work)
        previous, self._last = self._last, binding  # grad_hook's flat_gradients() reads it
        try:
            if self.grad_hook is None:
                loss = float((module.step_par if threaded else module.step)(*args))
            else:
                backward = module.forward_backward_par if threaded else module.forward_backward
                loss = float(backward(*args))
                self.grad_hook([g for _, g in binding.grads])
                (module.update_par if threaded else module.update)(*args)
        except BaseException:
            self._last = previous  # output and memory() report only a step that ran
            for step_undo in undo:
                self.optimizer.undo_prepare(step_undo)
            raise
        for p, g in binding.grads:
            p.grad = g
        return loss

    def _prepare(self, binding: _Binding, where: dict[int, int]) -> list[Any]:
        """Fill the optimizer's arguments: every group checked, each trained parameter's state
        created or advanced (as the eager step does), its row of scalars written.  Run before
        every step: a small model's step is tens of µs, so the table is built as one list and
        converted once, and the per-call arguments it fills are found once per binding."""
        opt = self.optimizer
        groups = opt.param_groups
        hyper = []
        for index, group in enumerate(groups):
            opt.check_group(group, index)
            hyper.append(opt.hyperparameters(group))
        graph, plan, args = binding.graph, binding.plan, binding.args
        width = self._width
        rows: list[list[float]] = []
        states: dict[str, np.ndarray] = {}
        undo = []
        inactive: dict[tuple[int, np.dtype], np.ndarray] = {}  # zero-size, read by no one
        for n, names in plan.updates:
            p = graph.params[n]
            values = hyper[where[id(p)]]
            rank_dtype = (p.data.ndim, p.data.dtype)
            if rank_dtype not in inactive:
                inactive[rank_dtype] = np.empty((0,) * p.data.ndim, p.data.dtype)
            arrays, extra, step_undo = opt.prepare_update(p, values, inactive[rank_dtype])
            row = [*values, *extra]
            if len(row) > width:  # pragma: no cover - the rule's scalar_inputs say otherwise
                raise AssertionError(f"{len(row)} scalars for an update of {width}")
            rows.append(row + [0.0] * (width - len(row)))
            states.update(zip(names, arrays, strict=True))
            undo.append(step_undo)
        table = np.array(rows, dtype=np.float64) if rows else np.zeros((1, width))
        if binding.prepared is None:
            binding.prepared = [
                (position, kind, plan.args[position][0])
                for position, kind, _ in binding.slots
                if kind in ("state", "scalars", "max_norm", "clip_value", "grad_norm")
            ]
        for position, kind, name in binding.prepared:
            if kind == "state":
                args[position] = states[name]
            elif kind == "scalars":
                args[position] = table
            elif kind == "max_norm":
                args[position] = float(self.clip_grad_norm)  # type: ignore[arg-type]
            elif kind == "clip_value":
                args[position] = float(self.clip_grad_value)  # type: ignore[arg-type]
            else:
                args[position] = self._grad_norm
        return undo

    def flat_gradients(self) -> list[np.ndarray]:
        """The flat 1-D buffers (one per dtype) that the last shape run's gradients are
        consecutive views of, the last trained parameter's gradient first; empty before the
        first step.  Changed in ``grad_hook``, they are what the update sees."""
        return [] if self._last is None else list(self._last.flats)


def _batch(arrays: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    """A step's arguments as contiguous arrays; fewer than two, or an empty one, refused."""
    if len(arrays) < 2:
        raise UnsupportedStepError("a step takes the model's inputs and then the target")
    given = tuple(np.ascontiguousarray(a) for a in arrays)
    for k, a in enumerate(given):
        if a.size == 0:
            raise ShapeError(
                f"argument {k} of the step is empty (shape {a.shape}): a training step "
                "needs at least one example"
            )
    return given


def _arg_name(ref: Ref) -> str:
    prefix = {"input": "in", "param": "p", "const": "c", "node": "v"}[ref.kind]
    return f"{prefix}{ref.index}"


def _clip_kind(norm: float | None, value: float | None) -> str | None:
    """``"norm"``, ``"value"`` or None; a bad limit is an error."""
    if norm is not None and value is not None:
        raise SymgradError(
            "give clip_grad_norm or clip_grad_value, not both: which one comes first changes "
            "the result"
        )
    for name, limit in (("clip_grad_norm", norm), ("clip_grad_value", value)):
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float, np.floating, np.integer))
            or np.isnan(limit)
            or limit < 0
        ):
            raise SymgradError(f"{name} must be a real number ≥ 0 or None, got {limit!r}")
    if norm is not None:
        return "norm"
    return "value" if value is not None else None


def compile_step(
    model: Module,
    loss: Loss,
    optimizer: Any,
    *,
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
    grad_hook: Callable[[list[np.ndarray]], None] | None = None,
    fuse_loss: bool = True,
) -> CompiledStep:
    """One compiled function per training step of ``model`` + ``loss`` + ``optimizer``.

    >>> import numpy as np
    >>> from symgrad import nn, optim
    >>> from symgrad.compile import compile_step
    >>> rng = np.random.default_rng(0)
    >>> model = nn.Sequential(nn.Linear(4, 8, dtype=np.float64, rng=rng), nn.Tanh(),
    ...                       nn.Linear(8, 3, dtype=np.float64, rng=rng))
    >>> step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    >>> x, y = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)
    >>> first, second = step(x, y), step(x, y)
    >>> second < first
    True
    """
    return CompiledStep(
        model,
        loss,
        optimizer,
        clip_grad_norm=clip_grad_norm,
        clip_grad_value=clip_grad_value,
        grad_hook=grad_hook,
        fuse_loss=fuse_loss,
    )


def fit_step(
    model: Module,
    loss: Loss,
    optimizer: Any,
    *,
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
    fuse_loss: bool = True,
) -> CompiledStep:
    """The compiled step :func:`symgrad.train.fit` trains ``model`` through: the one the
    model's last ``fit`` used when it had the same optimizer, the same kind of clipping and
    the same ``fuse_loss`` — its traced shapes and their plans reused, no tracing or planning
    per call (the model and the loss traced again only if the model was edited since, or the
    loss is another than a built-in one of the same structure) — else a new one, kept in
    its place."""
    clip = _clip_kind(clip_grad_norm, clip_grad_value)
    kept = getattr(model, "__dict__", {}).get(STEP_CACHE)
    if (
        isinstance(kept, CompiledStep)
        and kept.optimizer is optimizer
        and kept._clip == clip
        and kept._fuse_loss == fuse_loss
        and kept.grad_hook is None
    ):
        kept.clip_grad_norm, kept.clip_grad_value = clip_grad_norm, clip_grad_value
        if loss is not kept.loss:
            kept._adopt_loss(loss, retrace=not _interchangeable(kept.loss, loss))
        return kept
    step = compile_step(
        model, loss, optimizer, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
        fuse_loss=fuse_loss,
    )  # fmt: skip
    if hasattr(model, "__dict__"):
        model.__dict__[STEP_CACHE] = step  # not setattr: keeping a step is not an edit
    return step


def _interchangeable(kept: Loss, loss: Loss) -> bool:
    """Whether two losses record the same ops with the same constants: built-in losses (whose
    ``structure()`` says all they do) of the same structure.  Of any other two, the model and
    the new loss are traced again."""
    return (
        type(kept) is type(loss)
        and type(loss).__module__ == Loss.__module__
        and kept.structure() == loss.structure()
    )
