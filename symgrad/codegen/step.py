"""Emit one Numba function for a whole training step: forward, backward and update.

The step of a ``Sequential`` of linear layers and elementwise activations, a loss and an
optimizer becomes one ``@njit`` function with every buffer passed in preallocated:

* linear layers call their op's compiled ``forward``/``vjp`` kernels (GEMMs lowered from the
  layer's index formula) — calls between jitted functions, no Python in between;
* each activation is one loop that computes the value *and* its derived partial derivative
  (sharing subexpressions: tanh is evaluated once per element, not again in the backward
  pass); the backward pass multiplies the stored partial by the incoming gradient;
* an elementwise loss is one loop computing the loss and its derived gradient; softmax
  cross-entropy calls its op's kernels;
* every parameter's update is one loop evaluating the optimizer's update formulas in order.

The step returns ``(loss, -1)``, or ``(nan, row)`` from its prologue when the label of ``row``
is outside the classes (nothing written then).  Every expression printed here comes from a
derivation (``op.derivation()``): nothing is
differentiated by hand.  The plan is described by :class:`StepPlan`; the source is deterministic.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import sympy as sp

from .._version import __version__
from .emit import KernelSource, _cse_body
from .printer import VECTOR_MATH_SOURCE

_PAD = "    "


@dataclass(frozen=True)
class KernelCall:
    """A call of a compiled op kernel: ``alias`` imports ``function`` from ``module``."""

    module: str
    function: str
    alias: str


@dataclass
class StepPlan:
    """What the step function does, in order; filled by the runtime from a model."""

    name: str
    params: list[str] = field(default_factory=list)  # argument names, in call order
    imports: list[KernelCall] = field(default_factory=list)
    prologue: list[str] = field(default_factory=list)  # checks and target set-up, first
    forward: list[str] = field(default_factory=list)
    loss: list[str] = field(default_factory=list)
    backward: list[str] = field(default_factory=list)
    update: list[str] = field(default_factory=list)
    helpers: set[str] = field(default_factory=set)  # vectorisable math helpers the loops call
    single: bool = False  # float32 data: loops print float32 constants and helpers


def elementwise_loop(
    plan: StepPlan,
    op_name: str,
    n: str,
    loads: dict[sp.Symbol, str],
    stages: list[list[tuple[str, sp.Expr]]],
    indent: str,
    accumulate: dict[str, str] | None = None,
    rows: str | None = None,
) -> list[str]:
    """A loop over ``range(n)``: load ``loads`` (symbol → array), then evaluate ``stages``.

    Each stage is a list of ``(target, expr)`` sharing common subexpressions.  A target
    ``"a[i]"`` is stored; a plain name becomes a local that later stages may use as a symbol of
    that name (so an update ``b' = μb + g; p' = p − lr·b'`` runs in exactly that order); a
    target that is a key of ``accumulate`` is added to that accumulator.  With ``rows`` the
    loop is ``for r in range(rows): for i in range(n):`` over 2-D arrays, and each load is an
    expression in ``r`` and ``i`` (e.g. a GEMM's output plus its bias, ``h[r, i] + c[i]``).
    """
    names = {s: sp.Symbol(f"_v{k}", real=True) for k, s in enumerate(loads)}
    lines = [] if rows is None else [f"{indent}for r in range({rows}):"]
    indent = indent if rows is None else indent + _PAD
    lines.append(f"{indent}for i in range({n}):")
    inner = indent + _PAD
    for s, array in loads.items():
        lines.append(f"{inner}{names[s]} = {array}" + ("" if rows else "[i]"))
    dtype = "float32" if plan.single else "float64"
    for stage in stages:
        body = _cse_body([e.xreplace(names) for _, e in stage], op_name, dtype)
        body_lines, results = body.lines, body.results
        text = "\n".join(body_lines + results)
        plan.helpers |= {h for h in VECTOR_MATH_SOURCE if re.search(rf"\b{h}\(", text)}
        lines += [inner + line for line in body_lines]
        for (target, _), result in zip(stage, results, strict=True):
            if accumulate and target in accumulate:
                lines.append(f"{inner}{accumulate[target]} += {result}")
            else:
                lines.append(f"{inner}{target} = {result}")
    return lines


def emit_step(plan: StepPlan, key: str) -> KernelSource:
    """The module source of the fused step ``plan``."""
    header_imports = ["import math", "", "import numpy as np", "from numba import njit"]
    for call in plan.imports:
        header_imports.append(f"from {call.module} import {call.function} as {call.alias}")
    lines = [
        "@njit(cache=True, error_model='numpy')",
        f"def step({', '.join(plan.params)}):",
        *plan.prologue,
        f"{_PAD}# forward",
        *plan.forward,
        f"{_PAD}# loss and its gradient",
        *plan.loss,
        f"{_PAD}# backward",
        *plan.backward,
        f"{_PAD}# update",
        *plan.update,
        f"{_PAD}return loss, -1",
    ]
    helpers = [VECTOR_MATH_SOURCE[name] + "\n\n" for name in sorted(plan.helpers)]
    body = "\n".join([*header_imports, "", "", *helpers, *lines]) + "\n"
    body_hash = hashlib.sha256(body.encode()).hexdigest()
    header = (
        f"# symgrad generated fused training step {plan.name!r}\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(plan.name, key, header + body, body_hash, False, False)
