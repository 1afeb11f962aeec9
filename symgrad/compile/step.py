"""CompiledStep: a model's whole training step — forward, loss, backward — as one function.

``compile_step(model, loss, optimizer)`` returns ``step(*inputs, target) -> loss``.  On a call
with input shapes it has not seen, the model's forward is traced (:func:`~symgrad.compile.graph.
trace`, nothing computed), planned (:func:`~symgrad.compile.plan.plan_step`) and — the first
time for a structure — emitted as one ``@njit`` function calling the ops' kernels, written to
the kernel cache under a name hashing its source.  Every later shape of the same structure
reuses that function with buffers of its own; the buffers of a shape are allocated once.

After the compiled function has written every trained parameter's gradient, the optimizer's
update runs (``optimizer.step()``), exactly as in the tape's reverse mode: the two paths give
the same parameters.  Models the tracer cannot take (a module without ``record``, an
elementwise op that broadcasts) raise :class:`UnsupportedStepError`; ``fit`` then trains
through the tape instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..nn.losses import Loss
from ..nn.modules import Module
from ..runtime.cache import ensure_imported, module_path, verified_text, write_source
from .graph import Graph, Ref, UnsupportedStepError, trace
from .plan import StepPlan, needs_grad, plan_step, wanted


@dataclass
class _Binding:
    """One input-shape signature: the traced graph, its plan, and the argument list."""

    graph: Graph
    plan: StepPlan
    args: list[Any]
    slots: list[tuple[int, str, int | str]]  # (position, kind, index) of per-call arguments
    held: int  # bytes of the step's buffers (shared where their lives do not overlap)


class CompiledStep:
    """A compiled training step; ``step(*inputs, target)`` → the batch's mean loss.

    ``memory()`` reports, for the last shape run, the bytes its buffers hold and the bytes they
    would without sharing.
    """

    def __init__(self, model: Module, loss: Loss, optimizer: Any) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self._fn: Any = None
        self._source: str | None = None
        self._variants: dict[str, Any] = {}  # op key + wanted inputs → the op derived so
        self._bindings: dict[tuple, _Binding] = {}
        self._flags: tuple[bool, ...] = ()
        self._last: _Binding | None = None

    # -- tracing and planning ----------------------------------------------------------------

    def _forward(self, tape: Any, *arrays: np.ndarray) -> np.ndarray:
        *inputs, target = arrays
        return self.loss.record(tape, self.model.record(tape, *inputs), target)

    def _trained(self, graph: Graph) -> set[int]:
        owned = {id(p) for group in _groups(self.optimizer) for p in group}
        return {n for n, p in enumerate(graph.params) if p.requires_grad and id(p) in owned}

    def _variant(self, graph: Graph, n: int, want: list[int]) -> Any:
        """Node ``n``'s op derived with gradients for the arguments ``want`` only."""
        from ..api import with_wrt

        op = graph.nodes[n].op
        names = [op.input_names[k] for k in want]
        current = [op.input_names[k] for k in op._wrt]
        if names == current:
            return op
        key = f"{op.key}:{','.join(names)}"
        if key not in self._variants:
            self._variants[key] = with_wrt(op, names)
        return self._variants[key]

    def _bind(self, arrays: tuple[np.ndarray, ...]) -> _Binding:
        graph = trace(self._forward, arrays)
        trained = self._trained(graph)
        if not trained:
            raise UnsupportedStepError("the model has no parameter the optimizer trains")
        needs = needs_grad(graph, trained)
        variants = {
            n: self._variant(graph, n, wanted(graph, n, needs))
            for n, node in enumerate(graph.nodes)
            if needs[Ref("node", n)]
        }
        plan = plan_step(graph, trained, variants)
        key = f"{graph.structure()}:{sorted(trained)}"
        source = plan.source(key)
        if source != self._source:
            self._fn = self._load(plan, source, key)
            self._source = source
        buffers, held = plan.allocate()
        args: list[Any] = []
        slots = []
        for position, (_, kind, index) in enumerate(plan.args):
            if kind == "buffer":
                args.append(buffers[str(index)])
            elif kind == "const":
                args.append(graph.consts[int(index)])
            else:
                args.append(None)
                slots.append((position, kind, index))
        return _Binding(graph, plan, args, slots, held)

    @staticmethod
    def _load(plan: StepPlan, source: str, key: str) -> Any:
        # the kernels' modules the step imports by name were imported while planning
        path = module_path("training_step", key)
        if verified_text(path) != source:
            write_source(path, source)
        return ensure_imported(path).step

    def memory(self) -> dict[str, int]:
        """``{"held": bytes, "unshared": bytes}`` of the buffers of the last shape run."""
        if self._last is None:
            return {"held": 0, "unshared": 0}
        return {"held": self._last.held, "unshared": self._last.plan.total_bytes()}

    # -- running -----------------------------------------------------------------------------

    def __call__(self, *arrays: Any) -> float:
        """One training step on a batch: ``step(*inputs, target)`` → its mean loss; every
        trained parameter's ``grad`` is set and the optimizer's update applied."""
        if len(arrays) < 2:
            raise UnsupportedStepError("a step takes the model's inputs and then the target")
        given = tuple(np.ascontiguousarray(a) for a in arrays)
        flags = tuple(p.requires_grad for p in self.model.parameters())
        if flags != self._flags:  # freezing or unfreezing changes what the step computes
            self._bindings.clear()
            self._flags = flags
        signature = tuple((a.shape, a.dtype.str) for a in given)
        binding = self._bindings.get(signature)
        if binding is None:
            binding = self._bindings[signature] = self._bind(given)
        self._last = binding
        graph, args = binding.graph, binding.args
        for position, kind, index in binding.slots:
            if kind == "input":
                args[position] = given[int(index)]
            elif kind == "param":
                args[position] = graph.params[int(index)].data
        loss = float(self._fn(*args))
        buffers = dict(zip((name for name, _, _ in binding.plan.args), args, strict=True))
        for n, name in binding.plan.grads.items():
            graph.params[n].grad = buffers[name]
        self.optimizer.step()
        return loss


def _groups(optimizer: Any) -> list[list[Any]]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is not None:
        return [list(g["params"]) for g in groups]
    return [list(optimizer.params)]


def compile_step(model: Module, loss: Loss, optimizer: Any) -> CompiledStep:
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
    return CompiledStep(model, loss, optimizer)
