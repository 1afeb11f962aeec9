"""Lower index expressions to loop nests and BLAS calls, and emit their Numba source.

An *assignment* ``target[free...] = expr`` becomes a loop nest over the free indices.  Inside
``expr``:

* a ``Sum`` over ``j`` of a product of two tensors whose other indices are all loop indices is a
  **contraction**: it is computed once, before the loops, as one GEMM (``np.dot`` of the two
  tensors transposed/reshaped to ``(P, J)`` and ``(J, Q)``) and read back by index;
* every other ``Sum`` / ``ReduceMax`` becomes an accumulator loop, **hoisted** to the outermost
  place where all the indices it depends on are bound — layer norm's mean and variance are
  computed once per row, not once per element, so it stays O(B·N);
* identical reductions (equal up to the name of their summation index) are computed once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sympy as sp

from .._version import __version__
from ..errors import CodegenError
from ..symbolic.index import ReduceMax, TensorDerivation
from .emit import KernelSource, lower_primitives
from .printer import NumbaPrinter

_CANON = sp.Symbol("_canon", integer=True)


class _IndexPrinter(NumbaPrinter):
    """Prints subscripts and loop bounds as integers (the base printer writes ``2`` as ``2.0``)."""

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        idx = ", ".join(_int(i) for i in expr.indices)
        return f"{expr.base.label}[{idx}]"


def _int(expr: sp.Expr) -> str:
    return sp.pycode(sp.sympify(expr), fully_qualified_modules=True)


def _print(expr: sp.Expr, op: str) -> str:
    try:
        return _IndexPrinter().doprint(lower_primitives(expr))
    except Exception as err:  # noqa: BLE001 - reported with the op name and expression
        raise CodegenError(f"op {op!r}: cannot generate code for {expr}: {err}") from err


@dataclass
class _Reduction:
    temp: sp.Symbol
    kind: str  # "sum" or "max"
    var: sp.Symbol
    lo: sp.Expr
    hi: sp.Expr
    body: sp.Expr
    deps: frozenset[sp.Symbol]
    children: list[_Reduction] = field(default_factory=list)


@dataclass
class _Assignment:
    target: str
    loops: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...]  # (index, lo, hi)
    expr: sp.Expr
    accumulate: bool = False


class _Lowerer:
    def __init__(self, op: str, shapes: dict[str, tuple[sp.Expr, ...]]) -> None:
        self.op = op
        self.shapes = shapes  # tensor label → shape
        self.prelude: list[str] = []  # statements before every loop (GEMMs)
        self.n_gemm = 0
        self.n_red = 0
        self.n_mat = 0
        self._all: list[_Reduction] = []

    # -- contractions ----------------------------------------------------------------------

    def _gemm(self, node: sp.Sum, loop_order: list[sp.Symbol]) -> sp.Expr | None:
        loop_vars = set(loop_order)
        if len(node.limits) != 1:
            return None
        var, lo, hi = node.limits[0]
        factors = sp.Mul.make_args(node.function)
        if len(factors) != 2 or not all(isinstance(f, sp.Indexed) for f in factors):
            return None
        a, b = factors
        free_a = [i for i in a.indices if i != var]
        free_b = [i for i in b.indices if i != var]
        if (
            list(a.indices).count(var) != 1
            or list(b.indices).count(var) != 1
            or not all(isinstance(i, sp.Symbol) and i in loop_vars for i in free_a + free_b)
            or len(set(free_a + free_b)) != len(free_a + free_b)
        ):
            return None
        order = {v: n for n, v in enumerate(loop_order)}
        if free_a and free_b and order[free_b[0]] < order[free_a[0]]:
            a, b, free_a, free_b = b, a, free_b, free_a  # so the result is read in loop order
        ja, jb = list(a.indices).index(var), list(b.indices).index(var)
        shape_a = self.shapes[str(a.base.label)]
        shape_b = self.shapes[str(b.base.label)]
        full = (sp.S.Zero, shape_a[ja] - 1)
        if sp.simplify(lo - full[0]) != 0 or sp.simplify(hi - full[1]) != 0:
            return None
        if sp.simplify(shape_b[jb] - shape_a[ja]) != 0:
            return None
        name = f"_c{self.n_gemm}"
        self.n_gemm += 1
        left = self._matrix(str(a.base.label), shape_a, ja, last=True)
        right = self._matrix(str(b.base.label), shape_b, jb, last=False)
        dims = [shape_a[k] for k in range(len(shape_a)) if k != ja] + [
            shape_b[k] for k in range(len(shape_b)) if k != jb
        ]
        shape = ", ".join(_int(d) for d in dims) + ("," if len(dims) == 1 else "") if dims else "1,"
        self.prelude.append(f"{name} = np.dot({left}, {right}).reshape(({shape}))")
        return sp.IndexedBase(name)[tuple(free_a + free_b)] if free_a + free_b else sp.Symbol(
            f"{name}[0]"
        )

    def _matrix(self, label: str, shape: tuple[sp.Expr, ...], axis: int, last: bool) -> str:
        """Source for ``label`` as a 2-D matrix with the contracted axis last (or first)."""
        others = [k for k in range(len(shape)) if k != axis]
        rows = "*".join(_int(shape[k]) for k in others) or "1"
        j = _int(shape[axis])
        if len(shape) == 2:
            if (axis == 1) == last:
                return label
            return f"{label}.T"
        perm = (*others, axis) if last else (axis, *others)
        target = f"({rows}, {j})" if last else f"({j}, {rows})"
        if perm == tuple(range(len(shape))):
            return f"{label}.reshape({target})"
        return f"np.ascontiguousarray(np.transpose({label}, {perm})).reshape({target})"

    # -- reductions ------------------------------------------------------------------------

    def extract(self, expr: sp.Expr, loop_vars: list[sp.Symbol], out: list[_Reduction],
                seen: dict[tuple, sp.Symbol]) -> sp.Expr:
        """Replace reductions in ``expr`` by temporaries (post-order), collecting them."""

        def visit(node: sp.Basic) -> sp.Basic:
            if isinstance(node, sp.Sum):
                gemm = self._gemm(node, loop_vars)
                if gemm is not None:
                    return gemm
            if isinstance(node, (sp.Sum, ReduceMax)):
                # A fresh loop variable per reduction: terms split off one sum share its name.
                fresh = {v: sp.Symbol(f"{v}_{self.n_red}_{n}", integer=True)
                         for n, (v, _, _) in enumerate(node.limits)}
                limits = [(fresh[v], lo, hi) for v, lo, hi in node.limits]
                body = visit(node.function.xreplace(fresh))
                # innermost limit first; Sum(f, (i..), (j..)) = Σ_j Σ_i f
                for var, lo, hi in limits:
                    kind = "sum" if isinstance(node, sp.Sum) else "max"
                    key = (kind, body.xreplace({var: _CANON}), lo, hi)
                    if key in seen:
                        body = seen[key]
                        continue
                    temp = sp.Symbol(f"_r{self.n_red}", real=True)
                    self.n_red += 1
                    deps = frozenset(
                        s for s in body.free_symbols | lo.free_symbols | hi.free_symbols
                        if s != var and s.is_integer and not isinstance(s, sp.Indexed)
                    ) | self._temp_deps(body, out)
                    out.append(_Reduction(temp, kind, var, lo, hi, body, deps - {var}))
                    seen[key] = temp
                    body = temp
                return body
            if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase)):
                return node
            args = [visit(a) for a in node.args]
            return node.func(*args) if args != list(node.args) else node

        return visit(expr)

    @staticmethod
    def _temp_deps(body: sp.Expr, reds: list[_Reduction]) -> frozenset[sp.Symbol]:
        temps = {r.temp: r for r in reds}
        deps: set[sp.Symbol] = set()
        for s in body.free_symbols:
            if s in temps:
                deps |= temps[s].deps
        return frozenset(deps)

    # -- emission --------------------------------------------------------------------------

    def assignment(self, a: _Assignment, indent: int) -> list[str]:
        loop_vars = [v for v, _, _ in a.loops]
        reds: list[_Reduction] = []
        expr = self.extract(a.expr, loop_vars, reds, {})
        self._all = reds
        # Place each reduction: inside the reduction loop of the innermost enclosing reduction
        # it depends on, else at the output loop level of its deepest dependency.
        level = {v: n + 1 for n, (v, _, _) in enumerate(a.loops)}
        by_var = {r.var: r for r in reds}
        placed: dict[int, list[_Reduction]] = {n: [] for n in range(len(a.loops) + 1)}
        materialized: list[str] = []
        for r in reds:  # post-order: dependencies come first
            inner = [by_var[v] for v in r.deps if v in by_var]
            if inner and a.loops and not any(v in level for v in r.deps):
                # Depends only on enclosing reductions' indices (a row mean inside a sum over
                # rows): compute it once for every value of them, before the output loops,
                # instead of once per output element.
                array = self._materialize(r, [h.var for h in inner], materialized)
                for other in reds:
                    other.body = other.body.xreplace({r.temp: array})
                expr = expr.xreplace({r.temp: array})
            elif inner:
                # the enclosing reduction whose loop variable this one depends on
                host = min(inner, key=lambda h: reds.index(h))
                host.children.append(r)
            else:
                placed[max((level[v] for v in r.deps if v in level), default=0)].append(r)

        pad = " " * indent
        lines: list[str] = [pad + line for line in materialized]
        for n in range(len(a.loops) + 1):
            for r in placed[n]:
                lines += self._reduction(r, pad)
            if n < len(a.loops):
                var, lo, hi = a.loops[n]
                lines.append(f"{pad}for {var} in range({_int(lo)}, {_int(hi + 1)}):")
                pad += "    "
        idx = ", ".join(str(v) for v, _, _ in a.loops) or "0"
        op = "+=" if a.accumulate else "="
        lines.append(f"{pad}{a.target}[{idx}] {op} {_print(expr, self.op)}")
        return lines

    def _materialize(self, r: _Reduction, hosts: list[sp.Symbol], lines: list[str]) -> sp.Expr:
        """Emit loops computing ``r`` for every value of ``hosts`` into an array; return a read."""
        ranges = {}
        for v in hosts:
            for other in self._all:
                if other.var == v:
                    ranges[v] = (other.lo, other.hi)
        name = f"_m{self.n_mat}"
        self.n_mat += 1
        shape = ", ".join(_int(hi - lo + 1) for lo, hi in ranges.values())
        lines.append(f"{name} = np.empty(({shape},))")
        pad = ""
        for v, (lo, hi) in ranges.items():
            lines.append(f"{pad}for {v} in range({_int(lo)}, {_int(hi + 1)}):")
            pad += "    "
        lines += self._reduction(r, pad)
        idx = tuple(v - lo for v, (lo, _) in ranges.items())
        lines.append(f"{pad}{name}[{', '.join(_int(i) for i in idx)}] = {r.temp}")
        return sp.IndexedBase(name)[idx]

    def _reduction(self, r: _Reduction, pad: str) -> list[str]:
        init = "0.0" if r.kind == "sum" else "-np.inf"
        lines = [f"{pad}{r.temp} = {init}",
                 f"{pad}for {r.var} in range({_int(r.lo)}, {_int(r.hi + 1)}):"]
        for child in r.children:
            lines += self._reduction(child, pad + "    ")
        body = _print(r.body, self.op)
        if r.kind == "sum":
            lines.append(f"{pad}    {r.temp} += {body}")
        else:
            lines.append(f"{pad}    {r.temp} = max({r.temp}, {body})")
        return lines


def emit_tensor(derivation: TensorDerivation, key: str) -> KernelSource:
    """Numba source of a tensor op: ``forward(inputs..., dims..., out)`` and
    ``vjp(inputs..., dims..., grad_out, grad_<input>...)``."""
    spec = derivation.spec
    op = spec.name
    labels = [str(b.label) for b in spec.inputs]
    dims = [str(d) for d in spec.dims]
    shapes = {str(b.label): tuple(sp.sympify(d) for d in b.shape) for b in spec.inputs}
    ranges = dict(spec.ranges)
    out_loops = tuple((i, *ranges[i]) for i in spec.out)
    decorator = "@njit(cache=True, error_model='numpy')"

    def function(name: str, params: list[str], assignments: list[_Assignment]) -> list[str]:
        lowerer = _Lowerer(op, {**shapes, "grad_out": spec.out_shape})
        body: list[str] = []
        for a in assignments:
            body += lowerer.assignment(a, 4)
        prelude = ["    " + s for s in lowerer.prelude]
        return [decorator, f"def {name}({', '.join(params)}):", *prelude, *body,
                "    return None", "", ""]

    src = function("forward", [*labels, *dims, "out"],
                   [_Assignment("out", out_loops, derivation.stable_forward)])
    grads = []
    for p in derivation.partials:
        loops = tuple((k, sp.S.Zero, d - 1) for k, d in zip(p.indices, p.wrt.shape, strict=True))
        grads.append(_Assignment(f"grad_{p.wrt.label}", loops, p.final))
    src += function("vjp", [*labels, *dims, "grad_out", *[g.target for g in grads]], grads)
    body_text = "\n".join(
        ["import math", "", "import numpy as np", "from numba import njit", "", ""] + src
    ).rstrip() + "\n"
    body_hash = hashlib.sha256(body_text.encode()).hexdigest()
    header = (
        f"# symgrad generated kernels for tensor op {op!r}\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(op, key, header + body_text, body_hash, False, False)
