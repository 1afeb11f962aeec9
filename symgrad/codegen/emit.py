"""Emit Numba source for an elementwise op from its :class:`Derivation`.

Each op becomes one Python module with four ``@njit`` functions over flat (1-D, contiguous)
arrays, all sharing the same per-element code path:

``forward(x, ..., out)``
    ``out[i] = f(x[i], ...)``
``vjp(x, ..., g, g_step, grad_x, ...)``
    ``grad_x[i] = g[i*g_step] * ∂f/∂x`` (``g_step`` 0 broadcasts a scalar cotangent)
``value_and_vjp(x, ..., g, g_step, out, grad_x, ...)``
    both in one pass over memory
``value_and_vjp_sum(x, ..., g_scale, grad_x, ...) -> float``
    returns ``Σ f`` and writes ``g_scale * ∂f/∂x`` (a loss and its gradient in one sweep)

Before CSE the stable primitives are *lowered* to branch forms that share ``e = exp(-|a|)``:
``σ(a) = 1/(1+e)`` if ``a ≥ 0`` else ``e/(1+e)``, ``softplus(a) = max(a, 0) + log1p(e)`` — so a
loss and its gradient cost one ``exp`` and one ``log1p`` per element.  The text is
deterministic: same derivation, same bytes.
"""

from __future__ import annotations

import hashlib
import keyword
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import log1p

from .._version import __version__
from ..symbolic.derive import Derivation
from ..symbolic.functions import sigmoid, softplus
from .printer import print_expr

KERNELS = ("forward", "vjp", "value_and_vjp", "value_and_vjp_sum")
_RESERVED = {"math", "np", "njit", "prange", "i", "n", "out", "g", "g_step", "g_scale", "total"}


@dataclass(frozen=True)
class KernelSource:
    """Generated source of one op's kernels.

    ``text`` is the whole module; ``key`` the spec's content hash; ``body_hash`` the sha256 of
    everything after the header, recorded in the header so a corrupt file is detected.
    """

    name: str
    key: str
    text: str
    body_hash: str
    fastmath: bool
    parallel: bool


def lower_primitives(expr: sp.Expr) -> sp.Expr:
    """Replace ``sigmoid``/``softplus`` by their evaluate-by-sign forms (see module doc)."""

    def lower(node: sp.Expr) -> sp.Expr:
        a = node.args[0]
        e = sp.exp(-sp.Abs(a))
        if isinstance(node, sigmoid):
            return sp.Piecewise((1 / (1 + e), a >= 0), (e / (1 + e), True))
        return sp.Max(a, 0) + log1p(e)

    return expr.replace(
        lambda n: isinstance(n, (sigmoid, softplus)), lower  # type: ignore[arg-type]
    )


def _local_names(inputs: tuple[sp.Symbol, ...]) -> list[str]:
    names = [s.name for s in inputs]
    ok = all(
        n.isidentifier()
        and not keyword.iskeyword(n)
        and n not in _RESERVED
        and not n.startswith("_")
        and not n.startswith("grad_")
        for n in names
    )
    return names if ok else [f"v{k}" for k in range(len(names))]


def _cse_block(exprs: list[sp.Expr], op: str, indent: str) -> tuple[list[str], list[str]]:
    """CSE over ``exprs``: (assignment lines, printed results) with temporaries ``_t0, _t1...``."""
    temps = sp.numbered_symbols("_t")
    replacements, reduced = sp.cse([lower_primitives(e) for e in exprs], symbols=temps)
    lines = [f"{indent}{sym} = {print_expr(value, op)}" for sym, value in replacements]
    return lines, [print_expr(r, op) for r in reduced]


def emit_elementwise(derivation: Derivation, key: str, fastmath: bool, parallel: bool) -> KernelSource:
    """Generate the module source of an elementwise op's four kernels."""
    op = derivation.name
    locals_ = _local_names(derivation.inputs)
    subs = {s: sp.Symbol(n, real=True) for s, n in zip(derivation.inputs, locals_, strict=True)}
    value = derivation.stable_forward.xreplace(subs)
    partials = [d.xreplace(subs) for d in derivation.gradients]
    arrays = [f"{n}_a" for n in locals_]
    grads = [f"grad_{n}" for n in locals_]
    loop = "prange" if parallel else "range"
    decorator = f"@njit(cache=True, error_model='numpy', fastmath={fastmath}, parallel={parallel})"
    loads = [f"        {n} = {a}[i]" for n, a in zip(locals_, arrays, strict=True)]

    def kernel(kname: str, params: list[str], outputs: list[sp.Expr], stores: list[str],
               reduce: bool = False) -> list[str]:
        body, results = _cse_block(outputs, op, " " * 8)
        head = [decorator, f"def {kname}({', '.join(params)}):", f"    n = {arrays[0]}.shape[0]"]
        if reduce:
            head.append("    total = 0.0")
        lines = head + [f"    for i in {loop}(n):"] + loads + body
        for store, result in zip(stores, results, strict=True):
            lines.append(f"        {store}({result})")
        lines.append("    return total" if reduce else "    return None")
        return lines + ["", ""]

    g = "g[i * g_step]"
    src: list[str] = []
    src += kernel("forward", arrays + ["out"], [value], ["out[i] = "])
    src += kernel("vjp", arrays + ["g", "g_step"] + grads, partials,
                  [f"{gr}[i] = {g} * " for gr in grads])
    src += kernel("value_and_vjp", arrays + ["g", "g_step", "out"] + grads, [value, *partials],
                  ["out[i] = "] + [f"{gr}[i] = {g} * " for gr in grads])
    src += kernel("value_and_vjp_sum", arrays + ["g_scale"] + grads, [value, *partials],
                  ["total += "] + [f"{gr}[i] = g_scale * " for gr in grads], reduce=True)
    body = "\n".join(
        ["import math", "", "from numba import njit, prange  # noqa: F401", "", ""] + src
    ).rstrip() + "\n"
    body_hash = hashlib.sha256(body.encode()).hexdigest()
    header = (
        f"# symgrad generated kernels for op {op!r} ({', '.join(s.name for s in derivation.inputs)})\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(op, key, header + body, body_hash, fastmath, parallel)
