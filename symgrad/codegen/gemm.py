"""Contractions of computed operands as GEMMs: convolutions (im2col) and kinks under a sum.

A sum ``Σ_J a(..)·b(..)`` whose two factors are not plain tensor reads — a read through a
shifted index ``X[b, c, y + p, x + r]`` (a convolution), a guarded read (zero padding), a
``Piecewise`` of a read (a relu under a linear layer) — is still one matrix product once each
factor is *materialized*: written, for every value of its indices, into a contiguous array
laid out as a matrix.  For a convolution that array is im2col's column matrix.  The indices
of the assignment are split, in loop order, into

* ``outer`` — iterated around the GEMM (the batch of images: one column matrix at a time, so
  the materialized array stays one image large),
* ``rows`` — the left factor's own indices, ``cols`` — the right factor's own indices,

and ``np.dot(left, right)`` fills the ``rows × cols`` block of the result for each outer value.
A sum whose bounds were tightened by a condition (``p`` from ``max(0, 1 - y)``) runs over its
full range with the condition moved onto the factor it guards (the read is 0 outside).

A factor that reads two of its indices only as ``f ± s`` (a convolution's ``p + q``) is not
copied once per ``(f, s)`` pair: it is *folded* (:class:`_Fold`), filled once over ``f ± s``,
and each of one GEMM per ``s`` reads it from ``s`` steps on — BLAS views on one buffer,
``KH`` times smaller than im2col's.  When ``s`` is summed there is a second lowering
(:class:`_ProductFirst`): the product with the other factor first, then the sum of its
shifted reads (col2im); the kernel picks one of the two by the sizes it is called with.  The
derivatives are untouched: the input gradient of a convolution is still the derived
transposed convolution, only lowered one of these two ways.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from ..symbolic.conditions import conjuncts, indicator_condition, reads_float, tighten
from ..symbolic.index import ReduceMax

Limit = tuple[sp.Symbol, sp.Expr, sp.Expr]


@dataclass
class _Factor:
    """One side of the product: ``expr`` (0 where a condition of ``conds`` fails), and the
    ranges of the loop and summation indices it may read."""

    expr: sp.Expr
    conds: list[sp.Basic]
    ranges: dict[sp.Symbol, tuple[sp.Expr, sp.Expr]]

    @property
    def indices(self) -> set[sp.Symbol]:
        found = self.expr.free_symbols | {s for c in self.conds for s in c.free_symbols}
        return found & set(self.ranges)

    def plain(self) -> sp.Indexed | None:
        """The read itself when the factor is one tensor read, at distinct plain indices, each
        running over its whole axis: then the tensor is the matrix, no copy needed."""
        e = self.expr
        if self.conds or not isinstance(e, sp.Indexed) or len(set(e.indices)) != len(e.indices):
            return None
        for i, dim in zip(e.indices, e.base.shape, strict=True):
            if not isinstance(i, sp.Symbol) or i not in self.ranges:
                return None
            lo, hi = self.ranges[i]
            if lo != 0 or sp.simplify(hi + 1 - dim) != 0:
                return None
        return e


@dataclass
class MaterializedGemm:
    """``name[outer..., rows..., cols...] = coeff·Σ_summed left·right`` (see module doc)."""

    name: str
    outer: tuple[Limit, ...]
    rows: tuple[Limit, ...]
    cols: tuple[Limit, ...]
    summed: tuple[Limit, ...]
    left: _Factor
    right: _Factor
    dtype: str  # an input array whose dtype the temporaries take
    acc: tuple[Limit, ...]  # summed indices iterated around the GEMM, the products added up
    printer: Callable[[sp.Expr], str]
    integer: Callable[[sp.Expr], str]
    uses: int = 1
    into: str | None = None
    batch: str | None = None  # never batched the way _Gemm is: _write_gemm_into checks it
    fold: _Fold | None = None  # a shifted read folded into one buffer (see _Fold)
    product_first: _ProductFirst | None = None  # or shifted after the product (see there)

    @property
    def dims(self) -> tuple[sp.Expr, ...]:
        return tuple(hi - lo + 1 for _, lo, hi in (*self.outer, *self.rows, *self.cols))

    @property
    def key(self) -> tuple:
        return (self.left.expr, tuple(self.left.conds), self.right.expr, tuple(self.right.conds),
                self.outer, self.rows, self.cols, self.summed, self.acc)

    def read(self) -> sp.Expr:
        idx = tuple(v for v, _, _ in (*self.outer, *self.rows, *self.cols))
        if self.fold is not None and self.fold.s[0] in idx:  # stored with s leading
            s = self.fold.s[0]
            idx = (s, *(v for v in idx if v != s))
        return sp.IndexedBase(self.name)[idx] if idx else sp.Symbol(f"{self.name}[0]")

    def _size(self, limits: tuple[Limit, ...]) -> str:
        return "*".join(f"({self.integer(hi - lo + 1)})" for _, lo, hi in limits) or "1"

    def _loops(self, limits: tuple[Limit, ...], pad: str) -> tuple[list[str], str]:
        lines = []
        for v, lo, hi in limits:
            lines.append(f"{pad}for {v} in range({self.integer(lo)}, {self.integer(hi + 1)}):")
            pad += "    "
        return lines, pad

    def _operand(self, side: str, f: _Factor, first: tuple[Limit, ...],
                 second: tuple[Limit, ...]) -> tuple[list[str], list[str], str]:
        """(lines before the loops around the GEMM, lines inside them, the 2-D source of the
        factor: ``first × second``)."""
        var = f"{self.name}_{side}"
        iterated = (*self.outer, *self.acc)
        here = [(v, lo, hi) for v, lo, hi in iterated if v in f.indices]
        read = f.plain()
        if read is not None:
            axes = [*here, *first, *second]
            perm = [list(read.indices).index(v) for v, _, _ in axes]
            label = str(read.base.label)
            sizes = [self.integer(hi - lo + 1) for _, lo, hi in here]
            target = f"({', '.join([*sizes, self._size(first), self._size(second)])})"
            if perm == list(range(len(perm))):
                source = f"{label}.reshape({target})"
            else:
                moved = f"np.ascontiguousarray(np.transpose({label}, {tuple(perm)}))"
                source = f"{moved}.reshape({target})"
            at = "".join(f"[{v} - ({self.integer(lo)})]" for v, lo, _ in here)
            return [f"{var}_all = {source}"], [], f"{var}_all{at}"
        # materialized: filled for each value of the iterated indices it reads; its conditions
        # bound the fill loops (zeros elsewhere), so the innermost loop has no branch.  It is
        # stored as second × first (and read transposed) when that fills along memory.
        flip = _fill_transposed(f, first, second)
        axes = [*second, *first] if flip else [*first, *second]
        dims = ", ".join(self.integer(hi - lo + 1) for _, lo, hi in axes) or "1"
        alloc = "np.zeros" if f.conds else "np.empty"
        allocate = [f"{var} = {alloc}(({dims},), {self.dtype}.dtype)"]
        bounded, left = _fill_bounds(tuple(axes), f.conds, f.ranges)
        loops, pad = self._loops(bounded, "")
        value = f.expr if not left else sp.Piecewise((f.expr, sp.And(*left)), (0, True))
        at = ", ".join(self.integer(v - lo) for v, lo, _ in axes) or "0"
        fill = [*loops, f"{pad}{var}[{at}] = {self.printer(value)}"]
        if flip:
            source = f"{var}.reshape(({self._size(second)}, {self._size(first)})).T"
        else:
            source = f"{var}.reshape(({self._size(first)}, {self._size(second)}))"
        if not here:
            return [*allocate, *fill], [], source
        # refilled for each image; the zeros its conditions leave are the same every time, so
        # it is allocated (and zeroed) once
        moving = {v for v, _, _ in here}
        same_zeros = not any(c.free_symbols & moving for c in f.conds)
        return (allocate, fill, source) if same_zeros else ([], [*allocate, *fill], source)

    def statement(self) -> list[str]:
        if self.fold is not None:
            return self._folded_statement()
        pre_l, in_l, left = self._operand("a", self.left, self.rows, self.summed)
        pre_r, in_r, right = self._operand("b", self.right, self.summed, self.cols)
        dest = self.into or self.name
        shape = ", ".join(self.integer(d) for d in self.dims) or "1"
        lines = [] if self.into else [f"{self.name} = np.empty(({shape},), {self.dtype}.dtype)"]
        if self.acc:  # summed image by image: the sum of the blocks' products
            lines.append(f"{dest}[...] = 0.0")
            block_shape = f"({self._size(self.rows)}, {self._size(self.cols)})"
            lines.append(f"{self.name}_t = np.empty({block_shape}, {self.dtype}.dtype)")
        lines += pre_l + pre_r
        loops, pad = self._loops((*self.outer, *self.acc), "")
        lines += loops
        lines += [pad + line for line in in_l + in_r]
        at = "".join(f"[{v} - ({self.integer(lo)})]" for v, lo, _ in self.outer)
        block = f"{dest}{at}.reshape(({self._size(self.rows)}, {self._size(self.cols)}))"
        if self.acc:
            lines.append(f"{pad}np.dot({left}, {right}, {self.name}_t)")
            lines.append(f"{pad}{self.name}_v = {block}")
            lines.append(f"{pad}{self.name}_v += {self.name}_t")
        else:
            lines.append(f"{pad}np.dot({left}, {right}, {block})")
        return lines

    # -- a shifted read folded into one buffer: one GEMM per value of s (see _Fold) --------

    def _folded_statement(self) -> list[str]:
        """Like :meth:`statement`, with the factor read through ``f ± s`` filled once over
        ``t = f ± s`` and each GEMM reading it ``s`` rows further: a loop over ``s`` around
        the GEMMs, adding up (``s`` summed) or writing its own block (``s`` a result index,
        stored leading).  The GEMMs are :func:`symgrad.runtime.blas.gemm` calls on views."""
        fold = self.fold
        assert fold is not None
        s, s_lo, s_hi = fold.s

        def drop(limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
            return tuple(lim for lim in limits if lim[0] != s)

        rows, cols, summed = drop(self.rows), drop(self.cols), drop(self.summed)
        s_free = len(rows) + len(cols) < len(self.rows) + len(self.cols)
        lines: list[str] = []
        inner: list[str] = []
        views = []
        for side, f, first, second in (
            ("a", self.left, self.rows, self.summed),
            ("b", self.right, self.summed, self.cols),
        ):
            if side == fold.side:
                pre, fill, view = self._folded_operand(side, f, first, second)
            else:
                pre, fill, view = self._sliced_operand(side, f, drop(first), drop(second))
            lines += pre
            inner += fill
            views.append(view)
        result = ((fold.s,) if s_free else ()) + self.outer + rows + cols
        dest = self.into or self.name
        iterated = (*self.outer, *self.acc)
        empty_s = not sp.simplify(s_hi - s_lo + 1).is_positive
        if self.acc or (empty_s and not s_free):  # added up over the images (or nothing)
            lines.append(f"{dest}[...] = 0.0")
        loops, pad = self._loops(iterated, "")
        lines += loops + [pad + line for line in inner]
        lines.append(f"{pad}for {s} in range({self.integer(s_lo)}, {self.integer(s_hi + 1)}):")
        pad += "    "
        if self.acc:
            beta = "1.0"
        elif s_free:
            beta = "0.0"
        else:
            beta = f"0.0 if {s} == {self.integer(s_lo)} else 1.0"
        c_offset = _offset(result, [v for v, _, _ in (*((fold.s,) if s_free else ()),
                                                       *self.outer)])
        (a, ao, lda, ta), (b, bo, ldb, tb) = views
        args = [
            str(ta), str(tb), self._size(rows), self._size(cols), self._size(summed), "1.0",
            a, self.integer(ao), self.integer(lda), b, self.integer(bo), self.integer(ldb),
            beta, dest, self.integer(c_offset), self._size(cols),
        ]
        lines.append(f"{pad}_gemm({', '.join(args)})")
        alloc = []
        if not self.into:
            shape = ", ".join(self.integer(hi - lo + 1) for _, lo, hi in result) or "1"
            alloc = [f"{self.name} = np.empty(({shape},), {self.dtype}.dtype)"]
        other = self.product_first
        if other is None:
            return alloc + lines
        # which of the two is cheaper depends on the sizes, known when the kernel runs
        return [
            *alloc,
            f"if {self._size(other.plain)} > {self._size(rows)}:",
            *("    " + line for line in self._product_first_lines(dest)),
            "else:",
            *("    " + line for line in lines),
        ]

    def _product_first_lines(self, dest: str) -> list[str]:
        """See :class:`_ProductFirst`: per value of the outer indices, one GEMM into ``T``,
        then the result as the sum of ``T``'s shifted reads (bounded by the conditions)."""
        pf = self.product_first
        assert pf is not None
        here = tuple(lim for lim in self.outer if lim[0] in self.left.indices)
        left, lines = self._permuted(f"{self.name}_a", pf.left, (*here, *self.rows,
                                                                 *pf.shifted, *pf.plain))
        x_here = tuple(lim for lim in self.outer if lim[0] in pf.read.indices)
        x_axes = (*x_here, *pf.plain, *pf.axes)
        right, copy = self._permuted(f"{self.name}_b", pf.read, x_axes)
        lines += copy
        t_axes = (*self.rows, *pf.shifted, *pf.axes)
        t_name = f"{self.name}_T"
        dims = ", ".join(self.integer(hi - lo + 1) for _, lo, hi in t_axes)
        lines.append(f"{t_name} = np.empty(({dims},), {self.dtype}.dtype)")
        loops, pad = self._loops(self.outer, "")
        lines += loops
        m = f"{self._size(self.rows)}*{self._size(pf.shifted)}"
        args = [
            "False", "False", m, self._size(pf.axes), self._size(pf.plain), "1.0",
            left, self.integer(_offset((*here, *self.rows, *pf.shifted, *pf.plain),
                                       [v for v, _, _ in here])),
            self._size(pf.plain),
            right, self.integer(_offset(x_axes, [v for v, _, _ in x_here])),
            self._size(pf.axes), "0.0", t_name, "0", self._size(pf.axes),
        ]
        lines.append(f"{pad}_gemm({', '.join(args)})")
        at = "".join(f"[{self.integer(v - lo)}]" for v, lo, _ in self.outer)
        lines.append(f"{pad}{dest}{at or '[...]'} = 0.0")
        order = (*self.rows, *pf.shifted, *self.cols)
        bounded, left_conds = _fill_bounds(order, list(self.right.conds), self.right.ranges)
        out_at = tuple(v - lo for v, lo, _ in (*self.outer, *self.rows, *self.cols))
        t_read = sp.IndexedBase(t_name)[
            (*(v - lo for v, lo, _ in (*self.rows, *pf.shifted)), *pf.shifts)]
        rows = None if left_conds else self._row_views(bounded, dest, out_at, t_read, "+=",
                                                         f"{self.name}_T", pad)
        if rows is not None:
            return lines + rows
        inner, pad = self._loops(bounded, pad)
        lines += inner
        if left_conds:
            lines.append(f"{pad}if {self.printer(sp.And(*left_conds))}:")
            pad += "    "
        at = ", ".join(self.integer(i) for i in out_at)
        t_at = ", ".join(self.integer(i) for i in t_read.indices)
        lines.append(f"{pad}{dest}[{at}] {'+='} {t_name}[{t_at}]")
        return lines

    def _row_views(self, limits: tuple[Limit, ...], target: str, index: tuple[sp.Expr, ...],
                   source: sp.Expr, op: str, tag: str, pad: str = "") -> list[str] | None:
        """Loops over ``limits`` doing ``target[index] op source``, the innermost one over
        views of the two rows from 0: an index that is provably ≥ 0 needs no wraparound test,
        and without it LLVM vectorises the copy (an index ``x - r + 1`` keeps it scalar,
        about 3× slower).  None unless ``source`` is one tensor read and the innermost index
        is, in both, the last index plus a constant."""
        if not limits or not isinstance(source, sp.Indexed) or source.base.is_integer:
            return None
        *around, (v, lo, hi) = limits
        offsets = []
        for idx in (tuple(index), tuple(source.indices)):
            if not idx or any(v in i.free_symbols for i in idx[:-1]):
                return None
            shift = sp.expand(idx[-1] - v)
            if v in shift.free_symbols:
                return None
            offsets.append(shift)
        loops, pad = self._loops(tuple(around), pad)
        n, start, i = f"{tag}_n", f"{tag}_lo", f"{tag}_i"

        def view(array: str, idx: tuple[sp.Expr, ...], shift: sp.Expr) -> str:
            first = start if shift == 0 else f"{start} + ({self.integer(shift)})"
            return f"{array}[{''.join(self.integer(e) + ', ' for e in idx[:-1])}" \
                   f"{first}:{first} + {n}]"

        return [
            *loops,
            f"{pad}{start} = {self.integer(lo)}",
            f"{pad}{n} = {self.integer(hi)} + 1 - {start}",
            f"{pad}{tag}_d = {view(target, tuple(index), offsets[0])}",
            f"{pad}{tag}_s = {view(str(source.base.label), tuple(source.indices), offsets[1])}",
            f"{pad}for {i} in range({n}):",
            f"{pad}    {tag}_d[{i}] {op} {tag}_s[{i}]",
        ]

    def _permuted(self, var: str, read: sp.Indexed,
                  axes: tuple[Limit, ...]) -> tuple[str, list[str]]:
        """``read``'s tensor with its axes in the order of ``axes`` (one index each): the
        tensor itself, or a permuted copy made once."""
        index = [i for i in read.indices]
        perm = tuple(index.index(v) for v, _, _ in axes)
        label = str(read.base.label)
        if perm == tuple(range(len(perm))):
            return label, []
        return var, [f"{var} = np.ascontiguousarray(np.transpose({label}, {perm}))"]

    def _fill(self, var: str, f: _Factor, axes: tuple[Limit, ...], expr: sp.Expr,
              conds: list[sp.Basic], ranges: dict) -> tuple[list[str], list[str]]:
        """(allocation, fill loops) of ``var[axes] = expr``, 0 where ``conds`` fail."""
        dims = ", ".join(self.integer(hi - lo + 1) for _, lo, hi in axes) or "1"
        alloc = "np.zeros" if conds else "np.empty"
        allocate = [f"{var} = {alloc}(({dims},), {self.dtype}.dtype)"]
        bounded, left = _fill_bounds(axes, conds, ranges)
        target = tuple(v - lo for v, lo, _ in axes)
        rows = None if left else self._row_views(bounded, var, target, expr, "=", var)
        if rows is not None:
            fill = rows
        else:
            loops, pad = self._loops(bounded, "")
            value = expr if not left else sp.Piecewise((expr, sp.And(*left)), (0, True))
            at = ", ".join(self.integer(i) for i in target) or "0"
            fill = [*loops, f"{pad}{var}[{at}] = {self.printer(value)}"]
        here = {v for v, _, _ in (*self.outer, *self.acc)} & (f.indices | set(ranges))
        here &= expr.free_symbols | {x for c in conds for x in c.free_symbols}
        if not here:
            return [*allocate, *fill], []
        # refilled for each image; allocated (and zeroed) once when its zeros stay put
        same_zeros = not any(c.free_symbols & here for c in conds)
        return (allocate, fill) if same_zeros else ([], [*allocate, *fill])

    def _folded_operand(self, side: str, f: _Factor, first: tuple[Limit, ...],
                        second: tuple[Limit, ...]) -> tuple[list[str], list[str], tuple]:
        """The folded factor: filled over ``t`` in place of ``f`` (and without ``s``); the
        matrix for one ``s`` starts ``±s`` steps of ``t`` into the buffer."""
        fold = self.fold
        assert fold is not None
        s, fv = fold.s[0], fold.f

        def merged(limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
            return tuple((fold.t, *fold.t_range) if lim[0] == fv[0] else lim
                         for lim in limits if lim[0] != s)

        m_first, m_second = merged(first), merged(second)
        flip = _fill_transposed(f, first, second)
        axes = (*m_second, *m_first) if flip else (*m_first, *m_second)
        ranges = {**f.ranges, fold.t: fold.t_range}
        var = f"{self.name}_{side}"
        pre, fill = self._fill(var, f, axes, fold.expr, list(fold.conds), ranges)
        at = [v for v, _, _ in axes].index(fold.t)
        stride = sp.Mul(*(hi - lo + 1 for _, lo, hi in axes[at + 1:]))
        offset = (fold.sign * s + fv[1] - fold.t_range[0]) * stride
        ld = sp.Mul(*(hi - lo + 1 for _, lo, hi in (m_first if flip else m_second)))
        return pre, fill, (var, offset, ld, flip)

    def _sliced_operand(self, side: str, f: _Factor, first: tuple[Limit, ...],
                        second: tuple[Limit, ...]) -> tuple[list[str], list[str], tuple]:
        """The other factor as ``first × second`` matrices, one per value of the iterated
        indices and of ``s`` where it reads them: a plain read as it is or as a permuted
        copy (made once), else filled (it does not read ``s``: see :func:`_find_fold`)."""
        fold = self.fold
        assert fold is not None
        iterated = (*self.outer, *self.acc, fold.s)
        here = tuple(lim for lim in iterated if lim[0] in f.indices)
        read = f.plain()
        if read is None:
            var = f"{self.name}_{side}"
            flip = _fill_transposed(f, first, second)
            axes = (*second, *first) if flip else (*first, *second)
            pre, fill = self._fill(var, f, axes, f.expr, f.conds, f.ranges)
            ld = sp.Mul(*(hi - lo + 1 for _, lo, hi in (first if flip else second)))
            return pre, fill, (var, sp.S.Zero, ld, flip)
        axes = (*here, *first, *second)
        perm = tuple(list(read.indices).index(v) for v, _, _ in axes)
        label = str(read.base.label)
        pre = []
        if perm != tuple(range(len(perm))):
            pre = [f"{self.name}_{side}_all = np.ascontiguousarray(np.transpose({label}, {perm}))"]
            label = f"{self.name}_{side}_all"
        offset = _offset(axes, [v for v, _, _ in here])
        ld = sp.Mul(*(hi - lo + 1 for _, lo, hi in second))
        return pre, [], (label, offset, ld, False)


@dataclass(frozen=True)
class _Fold:
    """A factor that reads its indices ``f`` and ``s`` only as ``t = f + sign·s`` (a
    convolution's ``X[b, c, p + q - 1, ...]``: ``f = p``, ``s = q``), ``f`` leading its group
    of the factor's matrix axes and ``s`` in the other group.  Filled over ``t`` (``P + Q - 1``
    values, not ``P·Q``), the factor's matrix for one value of ``s`` is the buffer read from
    ``sign·s`` steps of ``t`` on, with the same leading dimension; so one GEMM per ``s``
    replaces one GEMM over a ``Q`` times larger copy.  ``expr`` and ``conds`` are the factor's
    value and conditions in ``t``."""

    side: str  # "a": the left factor, "b": the right
    s: Limit
    f: Limit
    sign: int
    t: sp.Symbol
    t_range: tuple[sp.Expr, sp.Expr]
    expr: sp.Expr
    conds: tuple[sp.Basic, ...]


@dataclass(frozen=True)
class _ProductFirst:
    """The other order for a fold whose ``s`` is summed (a convolution's input gradient,
    ``Σ_{o,q,r} W[o, c, q, r]·G[b, o, y - q + 1, x - r + 1]``): the folded factor is one
    tensor read whose every index is an outer index, a summed index (``plain``: ``o``) or a
    shifted index expression (``shifts``, over the tensor's whole ``axes``); the product
    with the other factor over ``plain`` comes first, as one GEMM per outer value into
    ``T[rows, shifted, axes]`` (``shifted``: the other summed indices, ``q, r``), and the
    result is ``Σ_shifted T[rows, shifted, shifts]`` (col2im).  Its GEMM has ``rows·shifted``
    rows, where the fold's have ``rows``: it wins when ``rows`` is small against ``plain``."""

    read: sp.Indexed  # the tensor read, the shifted index expressions replaced by axes' indices
    left: sp.Indexed
    plain: tuple[Limit, ...]
    shifted: tuple[Limit, ...]
    shifts: tuple[sp.Expr, ...]
    axes: tuple[Limit, ...]


def _product_first(g: MaterializedGemm) -> _ProductFirst | None:
    """The :class:`_ProductFirst` plan of ``g``, or None when its shape is not that."""
    fold = g.fold
    if fold is None or fold.side != "b" or g.acc or g.into is not None:
        return None
    summed = {v: (v, lo, hi) for v, lo, hi in g.summed}
    if fold.s[0] not in summed or g.left.plain() is None:
        return None
    read, left = g.right.expr, g.left.plain()
    if not isinstance(read, sp.Indexed) or read.base.is_integer or left is None:
        return None
    outer = {v for v, _, _ in g.outer}
    cols = {v for v, _, _ in g.cols}
    plain, shifts, axes = [], [], []
    for n, i in enumerate(read.indices):
        if i in outer:
            continue
        if i in summed:
            plain.append(summed[i])
        elif i.free_symbols & cols and not i.free_symbols - cols - set(summed):
            u = sp.Symbol(f"{g.name}_u{n}", integer=True)
            shifts.append(i)
            axes.append((u, sp.S.Zero, read.base.shape[n] - 1))
        else:
            return None
    used = {v for v, _, _ in plain}
    shifted = [lim for lim in g.summed if lim[0] not in used]
    in_shifts = set().union(*(e.free_symbols for e in shifts)) if shifts else set()
    if not shifted or any(v in in_shifts for v in used) or len(set(read.indices)) != len(
            read.indices) or not {v for v, _, _ in shifted} <= in_shifts:
        return None
    if set(left.indices) - outer - {v for v, _, _ in (*g.rows, *g.summed)}:
        return None
    at_u = iter(u for u, _, _ in axes)
    flat = read.base[tuple(next(at_u) if i in shifts else i for i in read.indices)]
    return _ProductFirst(flat, left, tuple(plain), tuple(shifted), tuple(shifts), tuple(axes))


def _offset(axes: tuple[Limit, ...], fixed: list[sp.Symbol]) -> sp.Expr:
    """The flat offset, in a C-contiguous array over ``axes``, of the block where the
    indices ``fixed`` (leading axes) take their current values."""
    total = sp.S.Zero
    for n, (v, lo, _) in enumerate(axes):
        if v in fixed:
            total += (v - lo) * sp.Mul(*(h - lw + 1 for _, lw, h in axes[n + 1:]))
    return total


def _find_fold(g: MaterializedGemm) -> _Fold | None:
    """The first fold of :class:`_Fold` that ``g`` admits (factors in order right, left;
    ``s`` summed then ``s`` a result index; sign + then −), or None."""
    for side, f, other in (("b", g.right, g.left), ("a", g.left, g.right)):
        if f.plain() is not None:
            continue
        free = g.cols if side == "b" else g.rows
        pairs = [(s, free[0]) for s in g.summed if free]
        pairs += [(s, g.summed[0]) for s in free if g.summed]
        for (s, f_lim), sign in itertools.product(pairs, (1, -1)):
            if s[0] in other.indices and other.plain() is None:
                continue  # the other factor would need a copy per s
            fold = _fold(g.name, side, f, s, f_lim, sign)
            if fold is not None:
                return fold
    return None


def _fold(name: str, side: str, f: _Factor, s: Limit, fl: Limit, sign: int) -> _Fold | None:
    t = sp.Symbol(f"{name}_{side}_t", integer=True)
    to_t = {fl[0]: t - sign * s[0]}
    expr = sp.expand(f.expr.xreplace(to_t)) if f.expr.is_Add else f.expr.xreplace(to_t)
    expr = expr.replace(lambda e: isinstance(e, sp.Indexed),
                        lambda e: e.func(e.base, *(sp.expand(i) for i in e.indices)))
    conds = []
    for c in f.conds:
        if not isinstance(c, sp.core.relational.Relational):
            return None
        c = c.func(sp.expand((c.lhs - c.rhs).xreplace(to_t)), 0)
        if c is sp.false:
            return None
        if c is not sp.true:
            conds.append(c)
    if s[0] in expr.free_symbols or any(s[0] in c.free_symbols for c in conds):
        return None
    if fl[0] in expr.free_symbols or t not in expr.free_symbols:
        return None
    lo = fl[1] + s[1] if sign > 0 else fl[1] - s[2]
    hi = fl[2] + s[2] if sign > 0 else fl[2] - s[1]
    return _Fold(side, s, fl, sign, t, (lo, hi), expr, tuple(conds))


def _fill_transposed(f: _Factor, first: tuple[Limit, ...], second: tuple[Limit, ...]) -> bool:
    """Whether to fill a materialized factor as ``second × first``: when the index that runs
    along the last axis of the tensor it reads, over that axis's length (``x`` in
    ``X[b, c, y + p, x + r]``, not the kernel's ``r``), is in ``first`` — so that the
    innermost fill loop walks memory."""
    reads = sorted(f.expr.atoms(sp.Indexed), key=sp.default_sort_key)
    for read in reads:
        last, dim = read.indices[-1], sp.expand(read.base.shape[-1])
        # the axis's own length: the dims that lengthen it (L in L - K + 1, not K)
        lengths = {d for d in dim.free_symbols if dim.coeff(d).is_positive}
        for v, _, hi in (*first, *second):
            if v in last.free_symbols and lengths & hi.free_symbols:
                return any(v == w for w, _, _ in first) and bool(second)
    return False


def _fill_bounds(
    axes: tuple[Limit, ...], conds: list[sp.Basic], ranges: dict[sp.Symbol, tuple]
) -> tuple[tuple[Limit, ...], list[sp.Basic]]:
    """The fill loops' bounds: each condition bounds the innermost loop index it reads (the
    others are fixed there); the conditions that are no linear bound stay tests."""
    order = [v for v, _, _ in axes]
    bounds = {v: (lo, hi) for v, lo, hi in axes}
    left = []
    for c in conds:
        inside = [v for v in order if v in c.free_symbols]
        if not inside:
            left.append(c)
            continue
        var = inside[-1]
        (lo, hi), rest = tighten(var, bounds[var], [c], ranges)
        bounds[var] = (lo, hi)
        left += rest
    return tuple((v, *bounds[v]) for v in order), left


def _untighten(
    limits: list[Limit], inner: set[sp.Symbol]
) -> tuple[list[Limit], list[sp.Basic]] | None:
    """Bounds ``max(lo, e)`` / ``min(hi, e)`` whose ``e`` reads an index of ``inner`` as the
    full range ``lo..hi`` and the conditions ``var ≥ e`` / ``var ≤ e``; None when a bound reads
    such an index otherwise."""
    out, conds = [], []
    for var, lo, hi in limits:
        new = []
        for bound, kind in ((lo, sp.Max), (hi, sp.Min)):
            if not bound.free_symbols & inner:
                new.append(bound)
                continue
            if not isinstance(bound, kind):
                return None
            fixed = [a for a in bound.args if not a.free_symbols & inner]
            moving = [a for a in bound.args if a.free_symbols & inner]
            if not fixed:
                return None
            new.append(kind(*fixed))
            conds += [(var >= a) if kind is sp.Max else (var <= a) for a in moving]
        out.append((var, new[0], new[1]))
    return out, conds


def _flatten(node: sp.Sum) -> tuple[sp.Expr, list[Limit]]:
    """``Σ_a Σ_b f`` as ``f`` and the limits ``[b, a]`` (innermost first)."""
    body, limits = node.function, list(node.limits)
    while isinstance(body, sp.Sum):
        limits = list(body.limits) + limits
        body = body.function
    return body, limits


def _factors(body: sp.Expr) -> tuple[sp.Expr, list[sp.Expr], list[sp.Basic]] | None:
    """``(coefficient, factors, conditions)`` of a sum's body."""
    conds: list[sp.Basic] = []
    if isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1] == (0, True):
        conds += conjuncts(body.args[0].cond)
        body = body.args[0].expr
    coeff, factors = [], []
    for f in sp.Mul.make_args(body):
        c = indicator_condition(f)
        if c is not None:
            conds += conjuncts(c)
        elif f.atoms(sp.Indexed):
            factors.append(f)
        else:
            coeff.append(f)
    if any(f.has(sp.Sum, ReduceMax, sp.KroneckerDelta) for f in factors):
        return None  # a factor holding a reduction is no elementwise array
    return sp.Mul(*coeff), factors, conds


def plan(
    node: sp.Sum,
    loops: tuple[Limit, ...],
    dims: set[sp.Symbol],
    name: str,
    printer: Callable[[sp.Expr], str],
    integer: Callable[[sp.Expr], str],
) -> MaterializedGemm | None:
    """A :class:`MaterializedGemm` for ``node`` inside ``loops``, or None when it is not a
    contraction of two factors over full ranges."""
    body, limits = _flatten(node)
    loop_vars = [v for v, _, _ in loops]
    summed = {v for v, _, _ in limits}
    found = _untighten(limits, set(loop_vars) | summed)
    split = _factors(body)
    if found is None or split is None or len(split[1]) != 2:
        return None
    limits, moved = found
    coeff, (fa, fb), conds = split
    if coeff.free_symbols & (set(loop_vars) | summed):
        return None
    ranges = {v: (lo, hi) for v, lo, hi in (*loops, *limits)}
    a, b = _Factor(fa, [], ranges), _Factor(fb, [], ranges)
    other = {x for x in node.free_symbols if isinstance(x, sp.Symbol) and x.is_integer}
    if other - dims - set(loop_vars):
        return None  # reads an index of an enclosing reduction: not computable up front
    for c in [*conds, *moved]:
        if reads_float(c):
            return None
        owner = [f for f in (b, a) if c.free_symbols & set(ranges) <= f.indices]
        if not owner:
            return None
        # the factor read through a shifted index guards itself (a zero-padded read)
        owner.sort(key=lambda f: f.plain() is not None)
        owner[0].conds.append(c)
    if not summed <= a.indices & b.indices:
        return None
    if coeff != 1:  # folded into a factor that is copied anyway
        movable = [f for f in (b, a) if f.plain() is None]
        if not movable:
            return None
        movable[0].expr = coeff * movable[0].expr
    indices = a.indices | b.indices
    present = [v for v in loop_vars if v in indices]
    split_at = _partition(present, a.indices, b.indices)
    if split_at is None:
        return None
    outer, rows, cols, swapped = split_at
    if not rows and not cols:
        return None  # a dot product per element: the loop is as good, with no copy
    left, right = (b, a) if swapped else (a, b)
    sum_order = sorted(limits, key=lambda lim: _axis_order(lim[0], left, right))
    acc = _accumulated(sum_order, (a, b))
    sum_order = [lim for lim in sum_order if lim not in acc]
    dtype = str(sorted(
        (x for x in (fa * fb).atoms(sp.Indexed) if not x.base.is_integer),
        key=sp.default_sort_key,
    )[0].base.label)

    def lim(vs: list[sp.Symbol]) -> tuple[Limit, ...]:
        return tuple((v, *ranges[v]) for v in vs)

    gemm = MaterializedGemm(
        name, lim(outer), lim(rows), lim(cols), tuple(sum_order), left, right, dtype,
        tuple(acc), printer, integer,
    )
    gemm.fold = _find_fold(gemm)
    gemm.product_first = _product_first(gemm)
    return gemm


def _accumulated(limits: list[Limit], factors: tuple[_Factor, _Factor]) -> list[Limit]:
    """A summed index that leads every tensor read of both factors (the batch of images in a
    convolution's weight gradient): summed image by image around the GEMM, so a factor to
    materialize stays one image large and a plain one is sliced, not transposed."""
    if not any(f.plain() is None for f in factors):
        return []  # two plain reads: one GEMM over everything
    reads = [r for f in factors for r in f.expr.atoms(sp.Indexed) if not r.base.is_integer]
    for lim in limits:
        if len(limits) > 1 and all(r.indices and r.indices[0] == lim[0] for r in reads):
            return [lim]  # and the rest of the sum is still a GEMM
    return []


def _axis_order(var: sp.Symbol, left: _Factor, right: _Factor) -> tuple[int, str]:
    """Summed indices in the order the right factor's tensor read lays them out (the row of
    the right operand is read along memory), then by name."""
    for f in (right, left):
        for read in sorted(f.expr.atoms(sp.Indexed), key=sp.default_sort_key):
            for n, i in enumerate(read.indices):
                if var in i.free_symbols:
                    return (n, str(var))
    return (99, str(var))


def _partition(
    order: list[sp.Symbol], in_a: set[sp.Symbol], in_b: set[sp.Symbol]
) -> tuple[list[sp.Symbol], list[sp.Symbol], list[sp.Symbol], bool] | None:
    """Split the loop indices (in loop order) into ``outer | rows | cols``: rows read by one
    factor only, cols by the other only; as few outer indices as possible."""
    only_a, only_b = in_a - in_b, in_b - in_a
    for p, r in itertools.product(range(len(order) + 1), range(len(order) + 1)):
        if r < p:
            continue
        outer, rows, cols = order[:p], order[p:r], order[r:]
        if all(v in only_a for v in rows) and all(v in only_b for v in cols):
            return outer, rows, cols, False
        if all(v in only_b for v in rows) and all(v in only_a for v in cols):
            return outer, rows, cols, True
    return None
