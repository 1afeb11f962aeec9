"""Emit Numba source for an elementwise op from its :class:`Derivation`.

Each op becomes one Python module with four ``@njit`` functions over flat (1-D, contiguous)
arrays, all sharing the same per-element code path — each twice: for float64 data (the names
below) and for float32 data (``forward_f32``..., see :mod:`symgrad.codegen.dtypes`), whose
arithmetic is float32 throughout: float32 constants, the float32 helpers.

``forward(x, ..., out)``
    ``out[i] = f(x[i], ...)``
``vjp(x, ..., g, g_step, grad_x, ...)``
    ``grad_x[i] = g_i * ∂f/∂x`` with ``g_i = g[i]`` if ``g_step`` is 1, ``g[0]`` if it is 0 (a
    scalar cotangent, broadcast)
``value_and_vjp(x, ..., g, g_step, out, grad_x, ...)``
    both in one pass over memory
``value_and_vjp_sum(x, ..., g_scale, grad_x, ...) -> float``
    returns ``Σ f`` and writes ``g_scale * ∂f/∂x`` (a loss and its gradient in one sweep)

Before CSE the stable primitives are *lowered* to branch forms that share ``e = exp(-|a|)``:
``σ(a) = 1/(1+e)`` if ``a ≥ 0`` else ``e/(1+e)``, ``softplus(a) = max(a, 0) + log1p(e)`` — so a
loss and its gradient cost one ``exp`` and one ``log1p`` per element.

**Vectorisation.** Without SVML a call of libm's ``exp``/``log1p``/``tanh`` keeps LLVM from
vectorising the element loop, and those calls are most of a kernel's time.  When every function a
kernel uses has a branch-free implementation (:data:`~symgrad.codegen.printer.VECTOR_FUNCTIONS`),
the kernel calls those instead (emitted into the module, within one ulp of libm) and its loop
vectorises; a kernel that still needs a libm call (``sin``, ``pow``...) keeps ``math.*``
throughout, since a scalar loop is faster with libm.  ``Σ f`` does not block vectorisation
either: values go to a small buffer, block by block, which is folded to its sum
(:mod:`symgrad.codegen.folds`: pairwise, in an order fixed by the block's length — a serial
accumulator cannot be reassociated under IEEE rules and cost an addition's latency per element,
13 % of a 10M-element loss with its gradient on one thread), and the blocks' sums are added in
order (a kernel without the vectorisable helpers accumulates in element order).  The sum is over
fixed chunks of :data:`CHUNK` elements, added in chunk order, so that it does not depend on the
number of threads.

**Threads.**  Every kernel also exists as a parallel variant (``forward_par``, ``vjp_par_f32``...):
its element loop (or its loop over chunks) is a ``prange`` loop, each element computed as in the
serial kernel, so both give the same bits; the runtime runs it for arrays large enough to share
out (:mod:`symgrad.runtime.threads`).  ``parallel=True`` makes the plain kernels parallel too.
``Σ f`` is accumulated in float64 for float32 data too (a loss over many elements).

Why one module holds both dtypes' kernels rather than one module per dtype: the cache keeps one
verified file per op, written at definition time with both variants, so a warm start of either
dtype imports it without deriving anything (no SymPy); Numba compiles a function only when it is
first called, so the variant a program does not use costs nothing but its text.

The text is deterministic: same derivation and flags, same bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .._version import __version__
from ..symbolic.bounds import check_size
from ..symbolic.derive import Derivation
from ..symbolic.functions import logcosh, sigmoid, softplus, xlogy
from . import names
from .dtypes import SUFFIXES
from .folds import FOLD_SOURCE
from .jit import njit
from .printer import (
    NUMBA_FUNCTIONS,
    SINGLE_PRECISION,
    VECTOR_FUNCTIONS,
    VECTOR_MATH_SOURCE,
    print_expr,
    with_helper_arguments,
)

KERNELS = ("forward", "vjp", "value_and_vjp", "value_and_vjp_sum")

#: Elements per block of a reducing kernel: their values are buffered, then folded to their sum
#: (:mod:`symgrad.codegen.folds`), and the blocks' sums added in order.
BLOCK = 512
#: Elements per chunk of a parallel reducing kernel; fixed, so the sum is the same on any
#: number of threads.
CHUNK = 65536
#: ``math`` names that do not stop a loop from vectorising (LLVM intrinsics and constants).
_VECTOR_SAFE_MATH = frozenset({"sqrt", "copysign", "fabs", "inf", "nan", "pi", "e", "tau"})
_MATH_NAME = re.compile(r"\bmath\.(\w+)")


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
    """Replace ``sigmoid``/``softplus``/``logcosh`` by their evaluate-by-sign forms (see module
    doc; ``logcosh(a)`` is ``log1p(expm1(|a|)²·exp(−|a|)/2)`` below ``|a| = 20``, else
    ``|a| − log 2 + log1p(exp(−|a|)²)``), and
    ``xlogy(x, y)`` by ``0 if x == 0 else x·log(y)``."""

    def lower(node: sp.Expr) -> sp.Expr:
        if isinstance(node, xlogy):
            x, y = node.args
            return sp.Piecewise((sp.S.Zero, sp.Eq(x, 0)), (x * sp.log(y), True))
        a = node.args[0]
        e = sp.exp(-sp.Abs(a))
        if isinstance(node, sigmoid):
            return sp.Piecewise((1 / (1 + e), a >= 0), (e / (1 + e), True))
        if isinstance(node, logcosh):  # cosh(a) - 1 = expm1(|a|)²·exp(-|a|)/2 near 0
            near = log1p(expm1(sp.Abs(a)) ** 2 * e / 2)
            far = sp.Abs(a) - sp.log(2) + log1p(e**2)
            return sp.Piecewise((near, sp.Abs(a) < 20), (far, True))
        return sp.Max(a, 0) + log1p(e)

    return expr.replace(
        lambda n: isinstance(n, (sigmoid, softplus, logcosh, xlogy)),
        lower,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class _Body:
    """One kernel's per-element code: CSE assignments and printed results, without indent."""

    lines: list[str]
    results: list[str]
    vector: bool  # printed with the vectorisable helpers

    def helpers(self) -> set[str]:
        text = "\n".join(self.lines + self.results)
        names = {*VECTOR_FUNCTIONS.values(), *SINGLE_PRECISION.values()}
        return {h for h in names if re.search(rf"\b{h}\(", text)}


def _vectorisable(text: str) -> bool:
    """Whether ``text`` calls only what LLVM vectorises once exp, log, tanh... are helpers."""
    names = set(_MATH_NAME.findall(text)) - _VECTOR_SAFE_MATH - set(VECTOR_FUNCTIONS)
    return not names and "**" not in text


def _cse_body(exprs: list[sp.Expr], op: str, dtype: str = "float64") -> _Body:
    """CSE over ``exprs`` with temporaries ``_t0, _t1...``, printed for the fastest loop over
    ``dtype`` data.

    With the vectorisable helpers, ``tanh`` and ``erf`` take their exponential as an argument
    (:func:`~symgrad.codegen.printer.with_helper_arguments`) before CSE, so that it is shared
    with an equal ``exp`` of the formula (GELU's value and derivative: one ``exp``)."""
    lowered = [lower_primitives(e) for e in exprs]
    check_size(sp.Tuple(*lowered), op, "the kernel's expressions (before CSE)")

    def render(vector: bool) -> _Body:
        forms = [with_helper_arguments(e) for e in lowered] if vector else lowered
        replacements, reduced = sp.cse(forms, symbols=sp.numbered_symbols("_t"))
        lines = [f"{sym} = {print_expr(v, op, vector, dtype)}" for sym, v in replacements]
        return _Body(lines, [print_expr(r, op, vector, dtype) for r in reduced], vector)

    scalar = render(False)
    if _vectorisable("\n".join(scalar.lines + scalar.results)):
        return render(True)
    return scalar


def calls_math(exprs: list[sp.Expr]) -> bool:
    """Whether evaluating ``exprs`` calls a math function (``exp``, ``erf``, a root...), not
    just arithmetic and comparisons: then a forward that keeps an op's local derivatives spares
    its VJP that work (``SAVE_PARTIALS`` in the module)."""
    return any(
        type(node).__name__ in NUMBA_FUNCTIONS
        or isinstance(node, (sigmoid, softplus))
        or (isinstance(node, sp.Pow) and not node.exp.is_Integer)
        for e in exprs
        for node in sp.preorder_traversal(e)
    )


def _indent(lines: list[str], depth: int) -> list[str]:
    return [" " * (4 * depth) + line for line in lines]


def emit_elementwise(
    derivation: Derivation, key: str, fastmath: bool, parallel: bool
) -> KernelSource:
    """Generate the module source of an elementwise op's four kernels."""
    op = derivation.name
    # Every user name is mangled (codegen/names.py): input x is the value s_x, read from the
    # array t_x; its gradient array is grad_t_x.
    subs = {s: names.scalar(s) for s in derivation.inputs}
    locals_ = [subs[s].name for s in derivation.inputs]
    value = derivation.stable_forward.xreplace(subs)
    partials = [d.xreplace(subs) for d in derivation.gradients]
    arrays = [names.mangle(s.name, "t") for s in derivation.inputs]
    grads = [names.gradient(p.wrt.name) for p in derivation.partials]  # the wrt inputs only
    loads = [f"{n} = {a}[i]" for n, a in zip(locals_, arrays, strict=True)]
    helpers: set[str] = set()

    def element(body: _Body, stores: list[str], first: tuple[str, ...] = ()) -> list[str]:
        """Loads, shared temporaries and stores of one element (``i`` bound), unindented."""
        out = [*loads, *first, *body.lines]
        out += [f"{store}({result})" for store, result in zip(stores, body.results, strict=True)]
        return out

    def elementwise_kernel(
        kname: str,
        params: list[str],
        outputs: list[sp.Expr],
        stores: list[str],
        cotangent: bool,
        dtype: str,
    ) -> list[str]:
        body = _cse_body(outputs, op, dtype)
        helpers.update(body.helpers())
        first = ("_g = g[i] if g_step != 0 else g[0]",) if cotangent else ()
        lines = [decorator, f"def {kname}({', '.join(params)}):", f"    n = {arrays[0]}.shape[0]"]
        lines.append(f"    for i in {loop}(n):")
        lines += _indent(element(body, stores, first), 2)
        return [*lines, "    return None", "", ""]

    def sum_kernel(
        kname: str, params: list[str], outputs: list[sp.Expr], stores: list[str], dtype: str
    ) -> list[str]:
        body = _cse_body(outputs, op, dtype)
        helpers.update(body.helpers())
        head = [
            decorator,
            f"def {kname}({', '.join(params)}):",
            f"    n = {arrays[0]}.shape[0]",
        ]

        def blocked(lo: str, hi: str, acc: str, buf: str) -> list[str]:
            # Values of a block to a buffer (the loop vectorises), then folded to their sum
            # (codegen.folds: pairwise, in an order fixed by the block's length).
            # ``i`` is unsigned: Numba then drops its negative-index wraparound, which LLVM
            # cannot prove dead here (``i`` is not a plain range index) and which would turn
            # every load and store of the vector loop into scalar ones.
            span, start = (hi, "") if lo == "0" else (f"{hi} - {lo}", f"{lo} + ")
            return [
                f"for _b in range(({span} + {BLOCK - 1}) // {BLOCK}):",
                f"    _start = {start}_b * {BLOCK}",
                f"    _m = min({BLOCK}, {hi} - _start)",
                "    for _j in range(_m):",
                "        i = np.uint64(_start + _j)",
                *_indent(element(body, [f"{buf}[_j] = ", *stores]), 2),
                f"    {acc} += _sg_fold_sum({buf}, _m)",
            ]

        def plain(lo: str, hi: str, acc: str) -> list[str]:
            return [
                f"for i in range({lo}, {hi}):" if lo != "0" else f"for i in range({hi}):",
                *_indent(element(body, [f"{acc} += ", *stores]), 1),
            ]

        # Chunks of CHUNK elements, added in chunk order: the same sum serially (one chunk
        # after another) as over any number of threads.
        lines = [
            f"_nc = (n + {CHUNK - 1}) // {CHUNK}",
            "_part = np.empty(_nc, dtype=np.float64)",
        ]
        if body.vector:
            lines.append(f"_bufs = np.empty((_nc, {BLOCK}), dtype=np.float64)")
        chunk = [f"_lo = _c * {CHUNK}", f"_hi = min(_lo + {CHUNK}, n)", "_s = 0.0"]
        if body.vector:
            helpers.add("_sg_fold_sum")
            chunk += ["_buf = _bufs[_c]", *blocked("_lo", "_hi", "_s", "_buf")]
        else:
            chunk += plain("_lo", "_hi", "_s")
        lines += [
            f"for _c in {loop}(_nc):",
            *_indent([*chunk, "_part[_c] = _s"], 1),
            "total = 0.0",
            "for _c in range(_nc):",
            "    total += _part[_c]",
        ]
        return [*head, *_indent(lines, 1), "    return total", "", ""]

    src: list[str] = []
    # the kernels as the spec asks (``parallel``), then their parallel variants (``forward_par``)
    variants = [("", parallel), ("_par", True)]
    for (tag, threaded), (dtype, dsuffix) in itertools.product(variants, SUFFIXES.items()):
        loop = "prange" if threaded else "range"
        decorator = njit(fastmath=fastmath, parallel=threaded)
        suffix = tag + dsuffix  # forward (float64 data), forward_f32, forward_par, ...
        src += elementwise_kernel(
            f"forward{suffix}", [*arrays, "out"], [value], ["out[i] = "], False, dtype
        )
        src += elementwise_kernel(
            f"vjp{suffix}",
            [*arrays, "g", "g_step", *grads],
            partials,
            [f"{gr}[i] = _g * " for gr in grads],
            True,
            dtype,
        )
        src += elementwise_kernel(
            f"value_and_vjp{suffix}",
            [*arrays, "g", "g_step", "out", *grads],
            [value, *partials],
            ["out[i] = ", *(f"{gr}[i] = _g * " for gr in grads)],
            True,
            dtype,
        )
        src += sum_kernel(
            f"value_and_vjp_sum{suffix}",
            [*arrays, "g_scale", *grads],
            [value, *partials],
            [f"{gr}[i] = g_scale * " for gr in grads],
            dtype,
        )
    prelude = [
        "import math",
        "",
        "import numpy as np",
        "from numba import njit, prange  # noqa: F401",
        "",
        f"SAVE_PARTIALS = {calls_math(partials)!r}",
        "",
        "",
    ]
    sources = {**VECTOR_MATH_SOURCE, **FOLD_SOURCE}
    for name in sorted(helpers):
        prelude += [sources[name], ""]
    body = "\n".join([*prelude, *src]).rstrip() + "\n"
    body_hash = hashlib.sha256(body.encode()).hexdigest()
    header = (
        f"# symgrad generated kernels for op {op!r}, inputs "
        f"{', '.join(repr(s.name) for s in derivation.inputs)}\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(op, key, header + body, body_hash, fastmath, parallel)
