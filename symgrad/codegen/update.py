"""Emit an optimizer's update rule as Numba loops: in a kernel of its own, or inside a step.

:func:`update_lines` turns an :class:`~symgrad.symbolic.update.UpdateRule` into the lines that
update one parameter (and its states) in place: the per-step scalars first, then one element
loop per combination of the states that are active (``if momentum != 0.0:`` — a hyperparameter
is an input, so the branch is taken at run time), each loop evaluating the rule's updates in
order.  :func:`emit_update` wraps those lines in a module with one function,
``update(param, grad, *states, *scalars)`` over flat arrays: the eager optimizer's kernel.  The
fused training step calls :func:`update_lines` for each parameter it trains.  The element loop is
codegen's one loop generator (:func:`symgrad.codegen.loops.elementwise_loop`); an update runs
forward only, so nothing is derived and no VJP is emitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import sympy as sp

from .._version import __version__
from ..errors import DefinitionError
from ..symbolic.update import UpdateRule
from .emit import KernelSource
from .jit import njit
from .loops import Loops, elementwise_loop
from .printer import VECTOR_MATH_SOURCE, print_expr

_PAD = "    "


def _by_name(expr: sp.Expr, values: Mapping[str, sp.Expr]) -> sp.Expr:
    """``expr`` with every free symbol named in ``values`` replaced (simultaneously)."""
    return sp.sympify(expr).xreplace(
        {s: values[s.name] for s in expr.free_symbols if s.name in values}  # type: ignore[attr-defined]
    )


def _real(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def update_lines(
    plan: Loops,
    rule: UpdateRule,
    arrays: Mapping[str, str],
    values: Mapping[str, str],
    indent: str,
    tag: str = "",
    grad: sp.Expr | None = None,
) -> list[str]:
    """The lines updating one parameter in place by ``rule``.

    Args:
        arrays: each of ``rule.array_inputs`` (parameter, gradient, states) → the flat array
            holding it in the generated code; an inactive state's array is never read.
        values: each of ``rule.scalar_inputs`` (hyperparameters, counter, fresh flags) → the
            name of the variable holding it.
        tag: appended to the names of the per-step scalars (unique names within a step).
        grad: the gradient to use, as an expression of the rule's gradient symbol and of
            symbols named as variables of the generated code (``clip_coef*grad``).
    """
    formulas = rule.formulas()
    names: dict[str, sp.Expr] = {n: _real(values[n]) for n in rule.scalar_inputs}
    lines = []
    for target, expr in formulas.scalars:
        local = f"{target.name}{tag}"
        lines.append(f"{indent}{local} = {print_expr(_by_name(expr, names), rule.name)}")
        names[target.name] = _real(local)
    switches = list(dict.fromkeys(s.active_if for s in rule.states if s.active_if is not None))

    def loop(on: frozenset[str], pad: str) -> list[str]:
        active = [s.name for s in rule.states if s.active_if is None or s.active_if in on]
        inactive = {s.name for s in rule.states} - set(active)
        current = dict(names)
        for h in switches:  # known nonzero in this branch (Eq(h, 0) is False), or zero
            current[h] = sp.Symbol(values[h], real=True, nonzero=True) if h in on else sp.S.Zero
        stages: list[list[tuple[str, sp.Expr]]] = []
        stored: list[str] = []  # the parameter and states assigned, in order
        if grad is not None:
            stages.append([("_c_grad", grad)])
            current[rule.grad] = _real("_c_grad")
        for target, expr in formulas.updates:
            if target.name in inactive:
                continue
            value = _by_name(expr, current)
            read = sorted(s.name for s in value.free_symbols if s.name in inactive)
            if read:
                off = ", ".join(f"{h} = 0" for h in switches if h not in on)
                raise DefinitionError(
                    f"update rule {rule.name!r}: with {off} the update of {target} still reads "
                    f"the inactive state(s) {read}"
                )
            if target.name == rule.param or target.name in active:
                local = f"_n_{target.name}"  # a new value, stored after the last update
                stored.append(target.name)
            else:
                local = f"_u_{target.name}"
            stages.append([(local, value)])
            current[target.name] = _real(local)
        stores = [(f"{arrays[n]}[i]", current[n]) for n in stored]
        loads = {_real(n): arrays[n] for n in [rule.param, rule.grad, *active]}
        return elementwise_loop(
            plan, rule.name, f"{arrays[rule.param]}.size", loads, [*stages, stores], pad
        )

    def branch(k: int, on: frozenset[str], pad: str) -> list[str]:
        if k == len(switches):
            return loop(on, pad)
        h = switches[k]
        return [
            f"{pad}if {values[h]} != 0.0:",
            *branch(k + 1, on | {h}, pad + _PAD),
            f"{pad}else:",
            *branch(k + 1, on, pad + _PAD),
        ]

    return lines + branch(0, frozenset(), indent)


def emit_update(rule: UpdateRule, key: str, single: bool) -> KernelSource:
    """The module of ``rule``'s eager kernel: ``update(param, grad, *states, *scalars)``, every
    array flat and contiguous, the parameter and states updated in place.  ``single``: the
    arrays are float32 (helpers with a float32 twin call it)."""
    plan = Loops(f"update_{rule.name}", single=single)
    arrays = {n: n for n in rule.array_inputs}
    values = {n: n for n in rule.scalar_inputs}
    body = update_lines(plan, rule, arrays, values, _PAD)
    params = [*rule.array_inputs, *rule.scalar_inputs]
    helpers = [VECTOR_MATH_SOURCE[name] + "\n\n" for name in sorted(plan.helpers)]
    lines = [
        njit(),
        f"def update({', '.join(params)}):",
        *body,
        f"{_PAD}return None",
    ]
    text = "\n".join(
        ["import math", "", "import numpy as np", "from numba import njit", "", "", *helpers,
         *lines]
    ) + "\n"
    body_hash = hashlib.sha256(text.encode()).hexdigest()
    header = (
        f"# symgrad generated update kernel of optimizer rule {rule.name!r} "
        f"({', '.join(params)})\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(plan.name, key, header + text, body_hash, False, False)
