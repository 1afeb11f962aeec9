"""The names of user symbols in generated code: one mangling, applied where code is printed.

A user may call a symbol ``x`` and another ``x_a``, an input ``range``, ``min`` or ``np``, a tensor
``out`` or ``i``: generated kernels must not confuse any of them with each other or with their
own names (loop counters, temporaries, modules, built-ins).  Every user name is therefore
printed with a prefix saying its role, and the generator's own names never carry one:

* ``s_<name>`` — a scalar symbol: an elementwise op's input value, an index, a dim;
* ``t_<name>`` — an array: an elementwise op's input array, a tensor op's input tensor;
* ``grad_t_<name>`` — the gradient array of input ``<name>``.

The generator's names are ``out``, ``grad_out``, ``g``, ``i``, ``n``, ``math``, ``np`` and
names starting with ``_`` — none of them begins with ``s_``, ``t_`` or ``grad_t_``.  A name that
is not a plain ASCII identifier (``Symbol("x y")``, ``"α"``) is spelled by its UTF-8 bytes in hex
(``sh_...``, ``th_...``), so the mapping is one-to-one and the result always an identifier.
Derivation printouts keep the user's own names; only generated source is mangled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy as sp

from ..symbolic.index import TensorDerivation

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def mangle(name: str, role: str) -> str:
    """The generated-code spelling of user name ``name`` in ``role`` (``"s"`` or ``"t"``).

    >>> mangle("x", "s"), mangle("range", "t"), mangle("α", "s")
    ('s_x', 't_range', 'sh_ceb1')
    """
    if _PLAIN.fullmatch(name):
        return f"{role}_{name}"
    return f"{role}h_{name.encode('utf-8').hex()}"


def gradient(name: str) -> str:
    """The generated name of the gradient array of input ``name``."""
    return f"grad_{mangle(name, 't')}"


def scalar(symbol: sp.Symbol) -> sp.Symbol:
    """``symbol`` renamed for generated code, its assumptions kept."""
    return sp.Symbol(mangle(symbol.name, "s"), **symbol.assumptions0)


def tensor(base: sp.IndexedBase, shape: tuple[sp.Expr, ...] | None = None) -> sp.IndexedBase:
    """``base`` renamed for generated code (``shape``: its shape with dims renamed)."""
    label = mangle(str(base.label), "t")
    if base.is_integer:
        return sp.IndexedBase(label, shape=shape, integer=True)
    return sp.IndexedBase(label, shape=shape)


Loop = tuple[sp.Symbol, sp.Expr, sp.Expr]  # (index, low, high), inclusive


@dataclass(frozen=True)
class TensorNames:
    """A tensor op's derivation with every user name mangled, as the lowering prints it.

    ``labels``/``dims`` are the kernels' parameters (inputs' tensors, then dims), ``shapes``
    each tensor's shape by mangled label (``grad_out`` included), ``out_loops`` the forward's
    loops and ``forward`` its value; ``gradients`` holds ``(target, loops, value)`` for each
    input's gradient.  The cotangent is ``grad_out`` whatever the derivation called it.
    """

    labels: list[str]
    dims: list[str]
    shapes: dict[str, tuple[sp.Expr, ...]]
    out_loops: tuple[Loop, ...]
    forward: sp.Expr
    gradients: list[tuple[str, tuple[Loop, ...], sp.Expr]]
    renames: dict[sp.Basic, sp.Basic]  # user symbol or tensor → its generated spelling

    def apply(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` (of the same derivation: a saved residual's, a VJP reading one) with the
        same names mangled."""
        return sp.sympify(expr).xreplace(self.renames)


def tensor_names(derivation: TensorDerivation) -> TensorNames:
    """:class:`TensorNames` of ``derivation``: its tensors renamed ``t_<label>``, every
    symbol (indices, dims, summation indices) ``s_<name>``, by substitution, so the
    lowering never meets a user's name."""
    spec = derivation.spec
    exprs = [derivation.stable_forward, *(p.final for p in derivation.partials)]
    symbols: set[sp.Symbol] = set(spec.dims) | set(spec.out)
    saved = getattr(derivation, "saved", None)
    if saved is not None:
        exprs += [saved.forward, *(e for e in saved.partials if e is not None)]
        exprs += [r.node for r in saved.residuals] + [r.value for r in saved.residuals]
    for expr in exprs:
        symbols |= expr.atoms(sp.Symbol)
        # a tensor's label is renamed with its tensor (below); the generated arrays a saved
        # form reads (``out``, ``res0``...) keep theirs
        symbols -= {a.base.label for a in expr.atoms(sp.Indexed)}
    for p in derivation.partials:
        symbols |= set(p.indices)
    rename: dict[sp.Basic, sp.Basic] = {s: scalar(s) for s in symbols}

    def shape_of(base: sp.IndexedBase) -> tuple[sp.Expr, ...]:
        return tuple(sp.sympify(d).xreplace(rename) for d in base.shape)

    cotangent = derivation.grad_output
    out_shape = tuple(sp.sympify(d).xreplace(rename) for d in spec.out_shape)
    if isinstance(cotangent, sp.IndexedBase):
        rename[cotangent] = sp.IndexedBase("grad_out", shape=out_shape)
    else:
        rename[cotangent] = sp.Symbol("grad_out", real=True)
    bases = {b: tensor(b, shape_of(b)) for b in spec.inputs}
    rename.update(bases)
    ranges = dict(spec.ranges)
    gradients = []
    for p in derivation.partials:
        loops = tuple(
            (rename[k], sp.S.Zero, d - 1) for k, d in zip(p.indices, shape_of(p.wrt), strict=True)
        )
        gradients.append((gradient(str(p.wrt.label)), loops, p.final.xreplace(rename)))
    return TensorNames(
        labels=[str(bases[b].label) for b in spec.inputs],
        dims=[str(rename[d]) for d in spec.dims],
        shapes={**{str(t.label): shape_of(b) for b, t in bases.items()}, "grad_out": out_shape},
        out_loops=tuple(
            (rename[i], ranges[i][0].xreplace(rename), ranges[i][1].xreplace(rename))
            for i in spec.out
        ),
        forward=derivation.stable_forward.xreplace(rename),
        gradients=gradients,
        renames=rename,
    )
