"""Elementwise loops for generated code: one loop evaluating derived formulas in order.

:func:`elementwise_loop` prints a loop over flat (or row-by-row) arrays that loads its inputs,
evaluates stages of ``(target, expr)`` with common subexpressions shared, and stores or
accumulates the results.  The optimizers' update kernels (:mod:`symgrad.codegen.update`) and
the compiled training step's update and gradient clipping (:mod:`symgrad.compile.plan`) are
printed with it.  Every expression it prints comes from a derivation or an update rule's
formulas: nothing is differentiated by hand.  The source is deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy as sp

from .emit import _cse_body
from .printer import VECTOR_MATH_SOURCE

_PAD = "    "


@dataclass
class Loops:
    """What loops printed together share: a name (for messages), the vectorisable math
    helpers they call (filled as they are printed) and the data's precision."""

    name: str
    helpers: set[str] = field(default_factory=set)
    single: bool = False  # float32 data: loops print float32 constants and helpers


def elementwise_loop(
    plan: Loops,
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
