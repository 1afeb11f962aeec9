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
from ..symbolic.conditions import reads_float
from ..symbolic.index import ReduceMax, TensorDerivation
from .emit import KernelSource, lower_primitives
from .gemm import MaterializedGemm, plan
from .printer import NumbaPrinter

_CANON = sp.Symbol("_canon", integer=True)


class _IndexPrinter(NumbaPrinter):
    """Prints subscripts and loop bounds as integers (the base printer writes ``2`` as ``2.0``)."""

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        idx = ", ".join(_int(i) for i in expr.indices)
        return f"{expr.base.label}[{idx}]"

    def _print_Infinity(self, expr: sp.Expr) -> str:
        return "np.inf"

    def _print_NegativeInfinity(self, expr: sp.Expr) -> str:
        return "-np.inf"


def _int(expr: sp.Expr) -> str:
    return sp.pycode(sp.sympify(expr), fully_qualified_modules=True)


def _print(expr: sp.Expr, op: str) -> str:
    try:
        return _IndexPrinter().doprint(lower_primitives(expr))
    except Exception as err:
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
    index: tuple[sp.Symbol, ...] | None = None  # the target's subscript; default: all loops


@dataclass
class _Gemm:
    """One contraction computed by BLAS: ``np.dot(left, right)``, read back by index.

    With batch indices (shared by both operands and not summed, as the batch and head of
    attention's ``Σ_e Q[b, s, h, e]·K[b, t, h, e]``) the operands are ``(nb, P, J)`` and
    ``(nb, J, Q)`` stacks and one ``np.dot`` runs per batch element.
    """

    name: str
    left: str  # (P, J) matrix source, or (nb, P, J)
    right: str  # (J, Q) matrix source, or (nb, J, Q)
    rows: str  # P
    cols: str  # Q
    dims: tuple[sp.Expr, ...]  # the result's shape: batch axes, then the free axes of a and b
    uses: int = 1
    into: str | None = None  # written straight into this target array instead of a temporary
    batch: str | None = None  # nb, the product of the batch dims

    def statement(self) -> list[str]:
        if self.batch is not None:
            shape = ", ".join(_int(d) for d in self.dims)
            stack = f"{self.name}_"
            return [
                f"{stack}a = {self.left}",
                f"{stack}b = {self.right}",
                f"{stack}c = np.empty(({self.batch}, {self.rows}, {self.cols}), {stack}a.dtype)",
                f"for {stack}n in range({self.batch}):",
                f"    np.dot({stack}a[{stack}n], {stack}b[{stack}n], {stack}c[{stack}n])",
                f"{self.name} = {stack}c.reshape(({shape},))",
            ]
        if self.into is not None:
            two_d = len(self.dims) == 2 and self.rows != "1" and self.cols != "1"
            out = self.into if two_d else f"{self.into}.reshape(({self.rows}, {self.cols}))"
            return [f"np.dot({self.left}, {self.right}, {out})"]
        shape = ", ".join(_int(d) for d in self.dims) + ("," if len(self.dims) == 1 else "")
        return [f"{self.name} = np.dot({self.left}, {self.right}).reshape(({shape or '1,'}))"]


@dataclass(frozen=True)
class _Contraction:
    """``Σ_{j...} a[...]·b[...]``: the summed, batch and free indices of both operands."""

    a: sp.Indexed
    b: sp.Indexed
    summed: tuple[sp.Symbol, ...]
    batch: tuple[sp.Symbol, ...]
    free_a: tuple[sp.Symbol, ...]
    free_b: tuple[sp.Symbol, ...]


class _Lowerer:
    def __init__(self, op: str, shapes: dict[str, tuple[sp.Expr, ...]]) -> None:
        self.op = op
        self.shapes = shapes  # tensor label → shape
        self.gemms: list[_Gemm | MaterializedGemm] = []  # computed before every loop
        self._loops: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...] = ()
        self.n_acc = 0
        self.n_hoist = 0
        self.n_red = 0
        self.n_mat = 0
        self._all: list[_Reduction] = []

    # -- contractions ----------------------------------------------------------------------

    def _contraction(self, node: sp.Sum, loop_order: list[sp.Symbol]) -> _Contraction | None:
        """The operands of ``node`` if it is ``Σ_{j...} a[..]·b[..]`` over full axes, every
        summed index once in each operand, every other index a loop index; else None."""
        loop_vars = set(loop_order)
        summed = [v for v, _, _ in node.limits]
        factors = sp.Mul.make_args(node.function)
        if len(factors) != 2 or not all(isinstance(f, sp.Indexed) for f in factors):
            return None
        a, b = factors
        for f in (a, b):
            indices = list(f.indices)
            if not all(isinstance(i, sp.Symbol) for i in indices):
                return None
            if len(set(indices)) != len(indices) or any(indices.count(v) != 1 for v in summed):
                return None
            if not all(i in loop_vars for i in indices if i not in summed):
                return None
        for v, lo, hi in node.limits:
            da = self.shapes[str(a.base.label)][list(a.indices).index(v)]
            db = self.shapes[str(b.base.label)][list(b.indices).index(v)]
            if sp.simplify(lo) != 0 or sp.simplify(hi - (da - 1)) != 0 or sp.simplify(da - db):
                return None
        order = {v: n for n, v in enumerate(loop_order)}
        free_a = [i for i in a.indices if i not in summed]
        free_b = [i for i in b.indices if i not in summed]
        batch = [i for i in free_a if i in free_b]
        free_a = [i for i in free_a if i not in batch]
        free_b = [i for i in free_b if i not in batch]
        if free_a and free_b and order[free_b[0]] < order[free_a[0]]:
            a, b, free_a, free_b = b, a, free_b, free_a  # so the result is read in loop order
        summed_in_a = sorted(summed, key=list(a.indices).index)
        return _Contraction(a, b, tuple(summed_in_a), tuple(batch), tuple(free_a), tuple(free_b))

    def _gemm(self, node: sp.Sum, loop_order: list[sp.Symbol]) -> sp.Expr | None:
        """A read of the GEMM computing ``node``, if it is a contraction of two tensors (or of
        two computed factors: a convolution's shifted reads, see :mod:`.gemm`)."""
        found = self._contraction(node, loop_order)
        if found is None:
            return self._materialized_gemm(node, loop_order)
        a, b = found.a, found.b
        shape_a = self.shapes[str(a.base.label)]
        shape_b = self.shapes[str(b.base.label)]

        def axes(f: sp.Indexed, names: tuple[sp.Symbol, ...]) -> list[int]:
            return [list(f.indices).index(v) for v in names]

        def dims(f: sp.Indexed, shape: tuple[sp.Expr, ...], names: tuple[sp.Symbol, ...]) -> str:
            return "*".join(_int(shape[k]) for k in axes(f, names)) or "1"

        rows, cols = dims(a, shape_a, found.free_a), dims(b, shape_b, found.free_b)
        j = dims(a, shape_a, found.summed)
        batch = dims(a, shape_a, found.batch) if found.batch else None
        left = self._operand(
            str(a.base.label),
            axes(a, found.batch) + axes(a, found.free_a) + axes(a, found.summed),
            ([batch] if batch else []) + [rows, j],
        )
        right = self._operand(
            str(b.base.label),
            axes(b, found.batch) + axes(b, found.summed) + axes(b, found.free_b),
            ([batch] if batch else []) + [j, cols],
        )
        result_dims = tuple(
            [shape_a[k] for k in axes(a, found.batch + found.free_a)]
            + [shape_b[k] for k in axes(b, found.free_b)]
        )
        gemm = next(
            (
                g
                for g in self.gemms
                if isinstance(g, _Gemm) and (g.left, g.right) == (left, right) and g.into is None
            ),
            None,
        )
        if gemm is None:  # the same product twice (layer norm's Σ_i w_i g_i) is computed once
            gemm = _Gemm(f"_c{len(self.gemms)}", left, right, rows, cols, result_dims, batch=batch)
            self.gemms.append(gemm)
        else:
            gemm.uses += 1
        free = found.batch + found.free_a + found.free_b
        return sp.IndexedBase(gemm.name)[free] if free else sp.Symbol(f"{gemm.name}[0]")

    def _dims(self) -> set[sp.Symbol]:
        return {s for shape in self.shapes.values() for d in shape for s in d.free_symbols}

    def _materialized_gemm(self, node: sp.Sum, loop_order: list[sp.Symbol]) -> sp.Expr | None:
        loops = tuple(lim for lim in self._loops if lim[0] in loop_order)
        found = plan(
            node, loops, self._dims(), f"_c{len(self.gemms)}", lambda e: _print(e, self.op), _int
        )
        if found is None:
            return None
        for g in self.gemms:
            if isinstance(g, MaterializedGemm) and g.key == found.key and g.into is None:
                g.uses += 1
                return g.read()
        self.gemms.append(found)
        return found.read()

    def _write_gemm_into(self, a: _Assignment, expr: sp.Expr) -> sp.Expr:
        """Let a GEMM read once, at exactly this target's element, write into the target.

        ``grad_X[k0, k1] = _c0[k0, k1]`` then needs no temporary and no copy loop, and
        ``out[b, i] = _c0[b, i] + c[i]`` adds the bias in place.
        """
        if a.accumulate or a.index is not None or not a.loops:
            return expr
        idx = tuple(v for v, _, _ in a.loops)
        for gemm in self.gemms:
            read = sp.IndexedBase(gemm.name)[idx]
            if gemm.uses != 1 or gemm.into is not None or gemm.batch or not expr.has(read):
                continue
            fits = len(gemm.dims) == len(a.loops) and all(
                lo == 0 and sp.simplify(hi + 1 - d) == 0
                for (_, lo, hi), d in zip(a.loops, gemm.dims, strict=True)
            )
            if fits:
                gemm.into = a.target
                return expr.xreplace({read: sp.IndexedBase(a.target)[idx]})
        return expr

    @staticmethod
    def _operand(label: str, perm: list[int], shape: list[str]) -> str:
        """Source for tensor ``label`` with its axes in the order ``perm``, reshaped to
        ``shape``: the matrix itself or its transpose when it is 2-D and each of its axes is
        one side of the product; else a reshaped view, or a transposed copy."""
        target = f"({', '.join(shape)})"
        matrix = len(perm) == len(shape) == 2 and "1" not in shape
        if perm == list(range(len(perm))):
            return label if matrix else f"{label}.reshape({target})"
        if perm == [1, 0] and matrix:
            return f"{label}.T"
        return f"np.ascontiguousarray(np.transpose({label}, {tuple(perm)})).reshape({target})"

    # -- reductions ------------------------------------------------------------------------

    def extract(
        self,
        expr: sp.Expr,
        loop_vars: list[sp.Symbol],
        out: list[_Reduction],
        seen: dict[tuple, sp.Symbol],
    ) -> sp.Expr:
        """Replace reductions in ``expr`` by temporaries (post-order), collecting them.

        A reduction inside a ``Piecewise`` branch taken only under a condition on indices is
        computed before the branch is chosen: its terms are guarded by that condition, so it
        never reads where the branch would not (``X[k + N]`` under ``k < N``).
        """
        guards: list[sp.Basic] = []
        done: dict[tuple[sp.Basic, ...], sp.Basic] = {}  # the same reduction twice: once

        def visit(node: sp.Basic) -> sp.Basic:
            if isinstance(node, (sp.Sum, ReduceMax)):
                key = (node, *guards)
                if key not in done:
                    done[key] = reduce(node)
                return done[key]
            if isinstance(node, sp.Piecewise):
                branches: list[tuple[sp.Basic, sp.Basic]] = []
                earlier: list[sp.Basic] = []
                for e, c in node.args:
                    mine = [] if c == sp.true else [c]
                    test = sp.And(*mine, *[sp.Not(p) for p in earlier])
                    guarded = test != sp.true and not reads_float(test)
                    guards.extend([test] if guarded else [])
                    value = visit(e)
                    del guards[len(guards) - guarded :]
                    branches.append((value, visit(c)))  # a sum in a condition: a row's norm
                    earlier.append(c)
                return sp.Piecewise(*branches)
            if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase)):
                return node
            args = [visit(a) for a in node.args]
            return node.func(*args) if args != list(node.args) else node

        def reduce(node: sp.Sum | ReduceMax) -> sp.Basic:
            if isinstance(node, sp.Sum):
                gemm = self._gemm(node, loop_vars)
                if gemm is not None:
                    return gemm
            # A fresh loop variable per reduction: terms split off one sum share its name.
            fresh = {
                v: sp.Symbol(f"{v}_{self.n_red}_{n}", integer=True)
                for n, (v, _, _) in enumerate(node.limits)
            }
            limits = [
                (fresh[v], lo.xreplace(fresh), hi.xreplace(fresh))
                for v, lo, hi in _memory_order(node)
            ]
            body = visit(node.function.xreplace(fresh))
            if guards:
                empty = sp.S.Zero if isinstance(node, sp.Sum) else -sp.oo
                body = sp.Piecewise((body, sp.And(*guards)), (empty, True))
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
                    s
                    for s in body.free_symbols | lo.free_symbols | hi.free_symbols
                    if s != var and s.is_integer and not isinstance(s, sp.Indexed)
                ) | self._temp_deps(body, out)
                out.append(_Reduction(temp, kind, var, lo, hi, body, deps - {var}))
                seen[key] = temp
                body = temp
            return body

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
        scatter = self._scatter(a, indent)
        if scatter is not None:
            return scatter
        if a.expr.has(sp.KroneckerDelta):  # δ(k, ids[b, t]) outside the scatter form
            a = _Assignment(a.target, a.loops, _guard(a.expr), a.accumulate, a.index)
        batch = self._batch_sum(a, indent)
        if batch is not None:
            return batch
        self._loops = a.loops
        loop_vars = [v for v, _, _ in a.loops]
        reds: list[_Reduction] = []
        expr = self.extract(a.expr, loop_vars, reds, {})
        expr = self._write_gemm_into(a, expr)
        self._all = reds
        # Place each reduction: inside the reduction loop of the innermost enclosing reduction
        # it depends on, else at the output loop level of its deepest dependency.
        level = {v: n + 1 for n, (v, _, _) in enumerate(a.loops)}
        by_var = {r.var: r for r in reds}
        placed: dict[int, list[_Reduction | list[str]]] = {n: [] for n in range(len(a.loops) + 1)}
        for r in reds:  # post-order: dependencies come first
            inner = sorted((by_var[v] for v in r.deps if v in by_var), key=reds.index)
            at = max((level[v] for v in r.deps if v in level), default=0)
            if inner and at < len(a.loops) and self._bounded_by(inner, level, at):
                # Depends on enclosing reductions' indices and not on the innermost output
                # index (a row's max and sum inside a sum over rows): compute it once for every
                # value of them, at the loop level of its last output index, instead of once
                # per output element — the sum over rows stays linear in the row length.
                lines: list[str] = []
                array = self._materialize(r, [h.var for h in inner], lines)
                for other in reds:
                    other.body = other.body.xreplace({r.temp: array})
                expr = expr.xreplace({r.temp: array})
                placed[at].append(lines)
            elif inner:
                # the enclosing reduction whose loop variable this one depends on
                inner[0].children.append(r)
            else:
                placed[at].append(r)

        index = a.index if a.index is not None else tuple(loop_vars)
        pad = " " * indent

        def emit(items: list[_Reduction | list[str]]) -> list[str]:
            out: list[str] = []
            for item in items:
                if isinstance(item, _Reduction):
                    out += self._reduction(item, pad)
                else:
                    out += [pad + line for line in item]
            return out

        if not a.accumulate and index and expr == sp.IndexedBase(a.target)[index]:
            return emit(placed[0])  # a GEMM wrote the target
        red_level = {
            r.temp: n for n, rs in placed.items() for r in rs if isinstance(r, _Reduction)
        }
        expr, hoisted = self._hoist(expr, a.loops, red_level)
        lines = []
        for n in range(len(a.loops) + 1):
            lines += emit(placed[n])
            for temp, value in hoisted.get(n, []):
                lines.append(f"{pad}{temp} = {_print(value, self.op)}")
            if n < len(a.loops):
                var, lo, hi = a.loops[n]
                lines.append(f"{pad}for {var} in range({_int(lo)}, {_int(hi + 1)}):")
                pad += "    "
        idx = ", ".join(_int(v) for v in index) or "0"
        op = "+=" if a.accumulate else "="
        lines.append(f"{pad}{a.target}[{idx}] {op} {_print(expr, self.op)}")
        return lines

    def _hoist(
        self,
        expr: sp.Expr,
        loops: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...],
        red_level: dict[sp.Symbol, int],
    ) -> tuple[sp.Expr, dict[int, list[tuple[sp.Symbol, sp.Expr]]]]:
        """Move the costly parts of ``expr`` that do not change in the innermost loop out of it.

        Layer norm's ``1/sqrt(var + eps)`` depends on the row only: it is computed once per
        row (at the loop level of its deepest index or reduction), not once per element.
        """
        inner = len(loops)
        level = {v: n + 1 for n, (v, _, _) in enumerate(loops)}
        hoisted: dict[int, list[tuple[sp.Symbol, sp.Expr]]] = {}
        temps: dict[sp.Expr, sp.Symbol] = {}

        def depth(node: sp.Basic) -> int:
            found = [level[x] for x in node.free_symbols if x in level]
            found += [red_level[x] for x in node.free_symbols if x in red_level]
            return max(found, default=0)

        def costly(node: sp.Basic) -> bool:
            return any(
                isinstance(n, sp.Function)
                or (isinstance(n, sp.Pow) and not (n.exp.is_Integer and n.exp > 0))
                for n in sp.preorder_traversal(node)
            )

        def temp(node: sp.Expr) -> sp.Symbol:
            if node not in temps:
                temps[node] = sp.Symbol(f"_h{self.n_hoist}", real=True)
                self.n_hoist += 1
                hoisted.setdefault(depth(node), []).append((temps[node], node))
            return temps[node]

        def visit(node: sp.Basic) -> sp.Basic:
            if node.is_Atom or isinstance(node, sp.Indexed):
                return node
            if depth(node) < inner and costly(node):
                return temp(node)
            if isinstance(node, sp.Piecewise):
                return node  # a branch's value may be invalid where the branch is not taken
            if isinstance(node, sp.Mul):
                fixed = [f for f in node.args if depth(f) < inner]
                moving = [f for f in node.args if depth(f) == inner]
                if fixed and costly(sp.Mul(*fixed)):
                    return sp.Mul(temp(sp.Mul(*fixed)), *[visit(f) for f in moving])
            args = [visit(x) for x in node.args]
            return node.func(*args) if args != list(node.args) else node

        if not loops:
            return expr, {}
        return visit(expr), hoisted

    def _scatter(self, a: _Assignment, indent: int) -> list[str] | None:
        """``grad_E[k, j] = c·Σ_{b,t} f(b, t, j)·δ(k, ids[b, t])`` as a scatter-add: zero the
        target, then ``grad_E[ids[b, t], j] += c·f(b, t, j)`` in one pass over ``b, t``.

        The gradient of a gather (an embedding lookup), as the index calculus derives it; a
        loop over every ``k`` testing ``k == ids[b, t]`` would cost a factor ``V`` more.
        """
        found = _one_sum(a)
        if found is None:
            return None
        total, coeff = found
        loop_vars = [v for v, _, _ in a.loops]
        sum_vars = {v for v, _, _ in total.limits}
        deltas = [f for f in sp.Mul.make_args(total.function) if isinstance(f, sp.KroneckerDelta)]
        if len(deltas) != 1 or coeff.has(sp.Sum, ReduceMax, sp.KroneckerDelta):
            return None
        (delta,) = deltas
        x, y = delta.args
        k, position = (x, y) if x in loop_vars else (y, x)
        if k not in loop_vars or not position.free_symbols & sum_vars:
            return None
        if any((lo.free_symbols | hi.free_symbols) & set(loop_vars) for _, lo, hi in total.limits):
            return None
        body = sp.Mul(*[f for f in sp.Mul.make_args(total.function) if f is not delta])
        body = (coeff * body).xreplace({k: position})  # δ makes k = ids[b, t]
        if body.has(sp.KroneckerDelta):
            return None
        others = tuple(loop for loop in a.loops if loop[0] != k)
        sum_loops = tuple(reversed(_memory_order(total)))  # outermost first
        index = tuple(position if v == k else v for v in loop_vars)
        lines = [f"{' ' * indent}{a.target}[...] = 0.0"]
        lines += self.assignment(
            _Assignment(a.target, sum_loops + others, body, accumulate=True, index=index),
            indent,
        )
        return lines

    def _batch_sum(self, a: _Assignment, indent: int) -> list[str] | None:
        """``target[k] = c(k)·Σ_b f(b, k)`` over a leading axis, as one pass over ``b``.

        The bias gradient ``Σ_b grad_out[b, k]`` read column by column strides through memory
        (one cache miss per element); with ``b`` outermost the rows are read in order and
        accumulated into a float64 array.  Done only when that reads rows in order and no
        reduction inside depends on ``k`` (it would be recomputed for every ``b``).
        """
        found = _one_sum(a)
        if found is None:
            return None
        total, coeff = found
        loop_vars = [v for v, _, _ in a.loops]
        outer = set(loop_vars)
        if coeff.has(sp.Sum, ReduceMax) or (self._contraction(total, loop_vars) is not None):
            return None
        if plan(total, a.loops, self._dims(), "_", str, str) is not None:
            return None  # a GEMM of computed factors (a kink's weight gradient)
        if any((lo.free_symbols | hi.free_symbols) & outer for _, lo, hi in total.limits):
            return None
        body = total.function
        if any(
            isinstance(node, (sp.Sum, ReduceMax)) and node.free_symbols & outer
            for node in sp.preorder_traversal(body)
        ):
            return None
        if not _reads_columns(body, {v for v, _, _ in total.limits}, outer):
            return None
        acc = f"_a{self.n_acc}"
        self.n_acc += 1
        shape = ", ".join(_int(hi - lo + 1) for _, lo, hi in a.loops)
        index = tuple(v - lo for v, lo, _ in a.loops)
        lines = [f"{' ' * indent}{acc} = np.zeros(({shape},))"]
        sum_loops = tuple((v, lo, hi) for v, lo, hi in reversed(total.limits))
        # loops over axes before the summed one stay outside it (a batch axis: b, s, then t)
        n_out = _leading_loops(body, {v for v, _, _ in total.limits}, loop_vars)
        loops = a.loops[:n_out] + sum_loops + a.loops[n_out:]
        lines += self.assignment(
            _Assignment(acc, loops, body, accumulate=True, index=index), indent
        )
        lines += self.assignment(
            _Assignment(a.target, a.loops, coeff * sp.IndexedBase(acc)[index]), indent
        )
        return lines

    def _bounded_by(
        self, hosts: list[_Reduction], level: dict[sp.Symbol, int], at: int
    ) -> bool:
        """Whether the ranges of ``hosts`` are known at loop level ``at`` and do not depend on
        each other: then an array over them can be filled there."""
        reduction_vars = {r.var for r in self._all}
        bounds = {s for h in hosts for s in h.lo.free_symbols | h.hi.free_symbols}
        return not bounds & reduction_vars and all(level.get(s, 0) <= at for s in bounds)

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
        lines = [
            f"{pad}{r.temp} = {init}",
            f"{pad}for {r.var} in range({_int(r.lo)}, {_int(r.hi + 1)}):",
        ]
        for child in r.children:
            lines += self._reduction(child, pad + "    ")
        body = _print(r.body, self.op)
        if r.kind == "sum":
            lines.append(f"{pad}    {r.temp} += {body}")
        else:
            lines.append(f"{pad}    {r.temp} = max({r.temp}, {body})")
        return lines


def _one_sum(a: _Assignment) -> tuple[sp.Sum, sp.Expr] | None:
    """``(Σ, c)`` when a plain assignment's value is ``c·Σ`` with exactly one ``Sum`` factor."""
    if a.accumulate or a.index is not None or not a.loops:
        return None
    sums = [f for f in sp.Mul.make_args(a.expr) if isinstance(f, sp.Sum)]
    if len(sums) != 1:
        return None
    (total,) = sums
    return total, sp.Mul(*[f for f in sp.Mul.make_args(a.expr) if f is not total])


def _guard(expr: sp.Expr) -> sp.Expr:
    """Every ``KroneckerDelta`` as an equality test (see :func:`guard_deltas`)."""
    return expr.replace(
        lambda n: isinstance(n, sp.KroneckerDelta),
        lambda n: sp.Piecewise((sp.S.One, sp.Eq(*n.args)), (sp.S.Zero, True)),  # type: ignore[arg-type]
    )


def _memory_order(node: sp.Sum | ReduceMax) -> list[tuple[sp.Symbol, sp.Expr, sp.Expr]]:
    """The limits of a reduction, innermost first, ordered so the innermost loop runs along
    the last axis of the tensors it reads (``Σ_{b,i} X[b, i]`` loops over ``i`` inside ``b``).

    Limits whose bounds depend on another limit's index keep their order."""
    limits = list(node.limits)
    names = {v for v, _, _ in limits}
    if len(limits) < 2 or any((lo.free_symbols | hi.free_symbols) & names for _, lo, hi in limits):
        return limits
    axis = dict.fromkeys(names, -1)
    for access in node.function.atoms(sp.Indexed):
        for n, i in enumerate(access.indices):
            if i in axis:
                axis[i] = max(axis[i], n)
    return sorted(limits, key=lambda limit: -axis[limit[0]])


def _leading_loops(body: sp.Expr, sum_vars: set[sp.Symbol], loop_vars: list[sp.Symbol]) -> int:
    """How many of ``loop_vars`` (in order) index an earlier axis than every summation index,
    wherever they appear together in ``body``."""
    accesses = [a for a in body.atoms(sp.Indexed) if sum_vars & set(a.indices)]
    count = 0
    for v in loop_vars:
        for a in accesses:
            pos = list(a.indices)
            first_sum = min(n for n, i in enumerate(pos) if i in sum_vars)
            if v in pos and pos.index(v) > first_sum:
                return count
        count += 1
    return count


def _reads_columns(body: sp.Expr, sum_vars: set[sp.Symbol], loop_vars: set[sp.Symbol]) -> bool:
    """Whether summing ``body`` over ``sum_vars`` inside loops over ``loop_vars`` walks
    tensors across rows (a summation index on an earlier axis than a loop index) and never
    along them.  Reads inside nested reductions do not count: they are hoisted."""
    across = along = 0
    stack = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, (sp.Sum, ReduceMax)):
            continue
        if isinstance(node, sp.Indexed):
            pos_sum = [n for n, i in enumerate(node.indices) if i in sum_vars]
            pos_loop = [n for n, i in enumerate(node.indices) if i in loop_vars]
            if pos_sum and pos_loop and max(pos_sum) < max(pos_loop):
                across += 1
            elif pos_sum and pos_loop:
                along += 1
            continue
        stack.extend(node.args)
    return across > 0 and along == 0


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
        prelude = ["    " + line for g in lowerer.gemms for line in g.statement()]
        return [
            decorator,
            f"def {name}({', '.join(params)}):",
            *prelude,
            *body,
            "    return None",
            "",
            "",
        ]

    src = function(
        "forward",
        [*labels, *dims, "out"],
        [_Assignment("out", out_loops, derivation.stable_forward)],
    )
    grads = []
    for p in derivation.partials:
        loops = tuple((k, sp.S.Zero, d - 1) for k, d in zip(p.indices, p.wrt.shape, strict=True))
        grads.append(_Assignment(f"grad_{p.wrt.label}", loops, p.final))
    src += function("vjp", [*labels, *dims, "grad_out", *[g.target for g in grads]], grads)
    body_text = (
        "\n".join(
            ["import math", "", "import numpy as np", "from numba import njit", "", "", *src]
        ).rstrip()
        + "\n"
    )
    body_hash = hashlib.sha256(body_text.encode()).hexdigest()
    header = (
        f"# symgrad generated kernels for tensor op {op!r}\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(op, key, header + body_text, body_hash, False, False)
