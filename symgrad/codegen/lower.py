"""Lower index expressions to loop nests and BLAS calls, and emit their Numba source.

An *assignment* ``target[free...] = expr`` becomes a loop nest over the free indices.  Inside
``expr``:

* a ``Sum`` over ``j`` of a product of two tensors whose other indices are all loop indices is a
  **contraction**: it is computed once, before the loops, as one BLAS product on strided
  views of the two tensors (:func:`symgrad.runtime.blas.gemm`: transposes as flags, a
  matrix-vector product when one side is a vector; a copy only where no leading dimension
  describes an operand) and read back by index;
* every other ``Sum`` / ``ReduceMax`` becomes an accumulator loop, **hoisted** to the outermost
  place where all the indices it depends on are bound — layer norm's mean and variance are
  computed once per row, not once per element, so it stays O(B·N);
* identical reductions (equal up to the name of their summation index) are computed once, and
  so are identical arrays of a reduction's values over enclosing reductions' indices (the
  stabilized VJP of softmax(Q·Kᵀ)·V repeats the row of scores, with new dummy indices, in
  every term: one array per row, read by all);
* a row's sum whose terms the output repeats (softmax: ``exp(x_t - m) / Σ_u exp(x_u - m)``)
  writes them into the output's row as it adds them, and the output reads them back
  (:meth:`_Lowerer._kept`): one ``exp`` per element;
* a sum over the rows (a bias's gradient, layer norm's weight gradient) adds chunks of
  consecutive rows, each chunk in row order into partial sums of its own, then the chunks'
  partial sums in chunk order (:meth:`_Lowerer._chunked`; the chunks depend on the number of
  rows alone: at least :data:`ROW_CHUNK` rows, at most :data:`MAX_CHUNKS` chunks);
* consecutive loop nests over the same rows (an op's gradients: layer norm's four) run as one
  loop (:func:`_fused`), each row read once for all of them.

**Dtypes.**  A function is lowered once and printed twice: for float64 data (``forward``,
``vjp``) and for float32 data (``forward_f32``, ``vjp_f32``), whose arithmetic is float32
throughout (float32 constants and helpers, see :class:`~symgrad.codegen.printer.NumbaPrinter`).
While lowering, every expression and every dtype-dependent piece of text is a placeholder
(:meth:`_Lowerer.piece`), filled in per dtype by :func:`_render`.  Sums accumulate in float64
for both dtypes (then rounded once to the data's dtype); a row max is taken in the data's
dtype, or, vectorised, in float64 (exact either way).

**Vectorised reductions.**  A sum or max whose body has no libm call once ``exp``, ``log``...
are the vectorisable helpers (softmax's ``Σ exp``, a row max, layer norm's sums) is computed in
blocks of :data:`BLOCK` elements: the block's values go to a buffer in one loop (which LLVM
vectorises; float64), then the buffer is folded in halves — its second half added onto its
first, element by element, until :data:`~symgrad.codegen.folds.LANES` values are left, which
are added in a fixed tree — and the blocks' results are added in order (the fold and the tree
are small helpers, :mod:`symgrad.codegen.folds`, that LLVM inlines).  Each fold is a loop without a
carried dependence, which LLVM vectorises under strict IEEE rules (Numba leaves LLVM's SLP
vectoriser off, so a loop over a few partial sums in registers is not: a row of 384 floats
summed 1.6x faster than into 8 lanes).  The order depends only on the range's length — never
on threads or load — so results are deterministic; it avoids the serial chain of one
accumulator (4 cycles per element) that a strict-IEEE loop cannot reassociate, and a pairwise
sum's rounding error grows with log n, not n.

**Threads.**  Every function is printed twice from one lowering: serial (``forward``) and
parallel (``forward_par``, ``parallel=True``), where there is something to share out.  In the
parallel variant the outermost loop of an assignment whose iterations write disjoint parts of
the target (a plain write indexed by that loop's index: rows) is a ``prange`` loop, and the
buffers of the reductions inside it are allocated inside it (each thread its own); a sum over
rows runs its chunks on the threads (the serial variant makes one pass over the rows, adding
each into its chunk's partial sums); a fused loop over rows runs in the same chunks on the
threads where each of its nests writes its own rows or sums them in chunks
(:func:`_in_chunks`); a batched GEMM's
outermost batch loop is a ``prange`` loop of single-threaded BLAS calls; a single product is
split into pieces fixed by its sizes (rows, columns or its sum:
:func:`symgrad.runtime.blas.gemm_blocks`, serially in the serial variant).
Every element is computed by the same operations in the same order in both variants, so they
give the same bits on any number of threads (:mod:`symgrad.runtime.threads` chooses one per
call by size).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy as sp

from .._version import __version__
from ..errors import CodegenError
from ..symbolic.bounds import is_zero
from ..symbolic.conditions import reads_float
from ..symbolic.index import ReduceMax, TensorDerivation, TensorSpec
from ..symbolic.residuals import normal
from . import names
from .dtypes import SUFFIXES
from .emit import KernelSource, _vectorisable, lower_primitives
from .folds import FOLD_SOURCE
from .gemm import MaterializedGemm, plan
from .jit import njit
from .printer import VECTOR_MATH_SOURCE, NumbaPrinter, index_code

_CANON = sp.Symbol("_canon", integer=True)
PARALLEL_DECORATOR = njit(parallel=True)
#: Elements per block of a vectorised reduction (its buffer's length; a multiple of
#: ``folds.LANES``).
BLOCK = 1024
#: A max over at most this many elements is taken in one serial pass, not folded.
SHORT_MAX = 128
#: A sum over rows (a bias's gradient) adds chunks of at least ROW_CHUNK consecutive rows
#: each into partial sums of its own, at most MAX_CHUNKS of them (``_Lowerer._chunked``); a
#: loop over rows without such sums runs in at most MAX_CHUNKS chunks of any length
#: (``_in_chunks``: its buffers allocated once per chunk).
ROW_CHUNK = 8
MAX_CHUNKS = 64
_PIECE = re.compile("\u27ea(\\d+)\u27eb")  # ⟪n⟫, a placeholder of _Lowerer.piece
# Marks in the lowered text, resolved per variant by _variant: a loop over rows that the
# parallel variant runs as ``prange``, a GEMM split into blocks (serially, or over the
# threads), and lines of one variant only (a reduction's buffers: once per function in the
# serial variant, once per row in the parallel one, where each thread needs its own).
_RANGE = "\u27e6range\u27e7"
_GEMM = "\u27e6gemm\u27e7"
_SERIAL_ONLY = "\u27e6serial\u27e7"
_PARALLEL_ONLY = "\u27e6parallel\u27e7"
# The outermost loop of an assignment's nest (what _fused merges with the next nest's).
_OUTER = "\u27e6outer\u27e7"


class _IndexPrinter(NumbaPrinter):
    """Prints subscripts and loop bounds as integers (the base printer writes ``2`` as ``2.0``).

    ``wide`` names float64 accumulator arrays: a float32 function reads them rounded to
    float32, so that they do not turn its arithmetic into float64."""

    def __init__(self, vector_math: bool, dtype: str, wide: frozenset[str]) -> None:
        super().__init__(vector_math, dtype)
        self._wide = wide

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        idx = ", ".join(_int(i) for i in expr.indices)
        read = f"{expr.base.label}[{idx}]"
        wide = self._single and str(expr.base.label) in self._wide
        return f"np.float32({read})" if wide else read

    def _print_Infinity(self, expr: sp.Expr) -> str:
        return "np.inf"

    def _print_NegativeInfinity(self, expr: sp.Expr) -> str:
        return "-np.inf"


def _int(expr: sp.Expr) -> str:
    return index_code(expr)


def _print(expr: sp.Expr, op: str, vector: bool, dtype: str, wide: frozenset[str]) -> str:
    try:
        return _IndexPrinter(vector, dtype, wide).doprint(expr)
    except Exception as err:
        raise CodegenError(f"op {op!r}: cannot generate code for {expr}: {err}") from err


def _render(lines: list[str], pieces: list[sp.Expr | tuple[str, str]], dtype: str, op: str,
            wide: frozenset[str]) -> list[str]:
    """``lines`` with every placeholder of :meth:`_Lowerer.piece` printed for ``dtype``: an
    expression with the vectorisable helpers when its scalar form calls no libm function
    that keeps a loop from vectorising, else as it is."""
    printed: dict[int, str] = {}

    def fill(match: re.Match[str]) -> str:
        k = int(match.group(1))
        if k not in printed:
            piece = pieces[k]
            if isinstance(piece, tuple):
                printed[k] = piece[0] if dtype == "float64" else piece[1]
            else:
                scalar = _print(piece, op, False, "float64", wide)
                printed[k] = _print(piece, op, _vectorisable(scalar), dtype, wide)
        return printed[k]

    return [_PIECE.sub(fill, line) for line in lines]


def _variant(lines: list[str], parallel: bool, outer: bool = False) -> list[str]:
    """The serial or the parallel variant of lowered ``lines`` (see the module doc); ``outer``:
    with the marks of the assignments' outermost loops left in."""
    drop, keep = (_SERIAL_ONLY, _PARALLEL_ONLY) if parallel else (_PARALLEL_ONLY, _SERIAL_ONLY)
    loop, gemm = ("prange", "_gemm_blocks_par") if parallel else ("range", "_gemm_blocks")
    resolved = [
        line.replace(keep, "").replace(_RANGE, loop).replace(_GEMM, gemm)
        for line in lines
        if drop not in line
    ]
    return resolved if outer else [line.replace(_OUTER, "") for line in resolved]


@dataclass
class _Nest:
    """An assignment's lowered lines, cut around its outermost loop (serial variant)."""

    target: str
    rows: bool  # the loop runs over the target's rows, each iteration writing its own row
    #: a sum over the rows into partial sums per chunk of rows (_Lowerer._chunked): the name
    #: of its partial sums' array (its chunks are ``<name>_size`` rows, ``<name>_n`` of them)
    chunked: str | None
    lines: list[str]  # as lowered, marks unresolved
    pre: list[str]
    header: str  # "for <var> in range(lo, hi):"
    var: str
    body: list[str]
    post: list[str]


def _nest(a: _Assignment, lines: list[str], indent: int, chunked: dict[str, str]) -> _Nest | None:
    """The lines lowered from ``a``, cut around its one outermost loop; None without one."""
    serial = _variant(lines, False, outer=True)
    pad = " " * indent
    heads = [n for n, line in enumerate(serial) if _OUTER in line and re.match(rf"{pad}\S", line)]
    if len(heads) != 1:
        return None
    start = heads[0]
    header = serial[start].replace(_OUTER, "")
    found = re.match(rf"{pad}for (\w+) in range\(", header)
    if found is None:
        return None
    end = start + 1
    while end < len(serial) and not re.match(rf"{pad}\S", serial[end]):
        end += 1
    strip = [line.replace(_OUTER, "") for line in serial]
    # a plain write of the target indexed by the loops, the outermost one its rows (not a sum
    # over rows into the target, nor a scatter-add)
    rows = not a.accumulate and a.index is None and bool(a.loops) and str(a.loops[0][0]) == found[1]
    return _Nest(a.target, rows, chunked.get(a.target), lines, strip[:start], header, found[1],
                 strip[start + 1 : end], strip[end:])


def _fusable(group: list[_Nest], later: _Nest, text: Callable[[list[str]], str]) -> bool:
    """Whether ``later`` can run inside the loop of ``group`` (the same rows, one pass): its
    loop runs over the same range; it reads what the group writes only in the same row, and
    only where that is final inside the loop; nothing before its loop reads it; the group
    reads nothing it writes.  ``text`` gives lines with their expressions printed."""
    first = group[0]
    if later.header.replace(later.var, first.var, 1) != first.header:
        return False
    if re.search(rf"\b{first.var}\b", text(later.pre + later.body + later.post)):
        return False
    for nest in group:
        if re.search(rf"\b{later.target}\b", text(nest.pre + nest.body + nest.post)):
            return False
        if re.search(rf"\b{nest.target}\b", text(later.pre)):
            return False
        rows = re.findall(rf"\b{nest.target}\[([^,\]]+)", text(later.body + later.post))
        if rows and not (nest.rows and all(r.strip() == later.var for r in rows)):
            return False
    return True


def _split_args(text: str) -> list[str]:
    """The comma-separated arguments of a call's ``text`` (between its parentheses)."""
    args, depth, start = [], 0, 0
    for n, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            args.append(text[start:n].strip())
            start = n + 1
    return [*args, text[start:].strip()]


def _in_chunks(
    group: list[_Nest], body: list[str], indent: int, allocations: list[str],
    text: Callable[[list[str]], str], name: str,
) -> list[str] | None:
    """The parallel variant of a fused ``group`` (see :func:`_fused`): its loop over the rows
    cut into chunks — those of its sums over rows (:meth:`_Lowerer._chunked`) if it has any,
    else chunks of any length (at most MAX_CHUNKS) — the chunks on the threads, each running
    the group's bodies row by row as the serial variant does — when every nest writes its own
    rows or adds a row into its chunk's partial sums (then no two chunks write the same
    element).  The scratch buffers the bodies use are allocated per chunk (per thread), not
    per row (a layer norm's forward allocated six per row: 12,288 small allocations a call
    for 2,048 rows); so is a single loop over rows that uses any."""
    if not all(n.rows or n.chunked for n in group):
        return None
    first = group[0]
    found = re.fullmatch(rf"\s*for {first.var} in range\((.*)\):", first.header)
    if found is None:
        return None
    lo, end = _split_args(found[1])
    used = text(body)
    scratch = [
        line.replace(_SERIAL_ONLY, "")
        for line in allocations
        if re.search(rf"\b{re.escape(line.replace(_SERIAL_ONLY, '').split(' = ')[0])}\b", used)
    ]
    if len(group) == 1 and not scratch:
        return None  # one loop over rows, nothing allocated per row: prange as it is
    pad = " " * indent
    pre = [line for n in group for line in n.pre]
    q = f"{name}_q"
    sums = [n.chunked for n in group if n.chunked]
    if sums:  # the sums' chunks, computed in their ``pre`` (all of the same rows: one header)
        size, count = f"{sums[0]}_size", f"{sums[0]}_n"
    else:  # any chunks: a batch of 32 rows (a masked softmax's (b, h, s) loops) in 32, not 1
        size, count = f"{name}_size", f"{name}_n"
        pre.append(f"{pad}{size}, {count} = _sg_chunk_rows({end} - ({lo}), 1)")
    start = f"{lo} + {q}*{size}"
    return [
        *pre,
        f"{pad}for {q} in {_RANGE}(0, {count}):",
        *(f"{pad}    {line}" for line in scratch),
        f"{pad}    for {first.var} in range({start}, min({end}, {start} + {size})):",
        *("    " + line for line in body),
        *(line for n in group for line in n.post),
    ]


_FOR = re.compile(r"for (\w+) in range\((.*)\):$")
_NAMES = re.compile(r"([\w, ]+?) = ")
_ASSIGNS = re.compile(r"([\w, ]+?) (?:\+|-|\*|/|//|%|\*\*)?= ")
_WRITE = re.compile(r"\s*(\w+)\[(.*)\] (\+?=) ")


def _subscripts(text: str, name: str) -> list[str]:
    """The subscripts of every read or write of the array ``name`` in ``text``."""
    found = []
    for match in re.finditer(rf"\b{name}\[", text):
        depth, start = 1, match.end()
        n = start
        while depth:
            depth += (text[n] == "[") - (text[n] == "]")
            n += 1
        found.append(text[start : n - 1])
    return found


@dataclass(eq=False)
class _Item:
    """A statement of a loop body, with the lines nested under it."""

    lines: list[str]
    loop: re.Match[str] | None = None  # a ``for`` over a range
    names: tuple[str, ...] = ()  # a one-line assignment of plain names: the names

    @property
    def simple(self) -> bool:
        return bool(self.names) and len(self.lines) == 1


def _items(lines: list[str], indent: int) -> list[_Item]:
    pad = " " * indent
    items: list[_Item] = []
    for line in lines:
        if not items or not line.startswith(pad + " "):  # a statement, not a nested line
            head = line[indent:]
            assigned = _NAMES.match(head)
            names = tuple(n.strip() for n in assigned[1].split(",")) if assigned else ()
            items.append(_Item([line], _FOR.match(head), names))
        else:
            items[-1].lines.append(line)
    return items


_CALL = re.compile(r"\b(_sg_fold_\w+|_gemm\w*)\(")  # helpers that write arrays


def _writes(text: str, same: Callable[[str], str]) -> dict[str, set[tuple[str, str]]]:
    """The arrays ``text`` writes: name → (subscript as ``same`` writes it, ``=`` or ``+=``);
    an array passed to a helper (which may write it anywhere) with subscript ``*``."""
    found: dict[str, set[tuple[str, str]]] = {}
    for line in text.splitlines():
        write = _WRITE.match(line)
        if write:
            found.setdefault(write[1], set()).add((same(write[2]), write[3]))
    for call in _CALL.finditer(text):
        depth, end = 1, call.end()
        while depth:  # to the call's closing parenthesis
            depth += (text[end] in "([") - (text[end] in ")]")
            end += 1
        for arg in _split_args(text[call.end() : end - 1]):
            if re.fullmatch(r"[A-Za-z_]\w*", arg):
                found.setdefault(arg, set()).add(("*", "="))
    return found


def _assigned(lines: list[str]) -> set[str]:
    """Names assigned anywhere in ``lines``, ``+=`` included (plain names; array writes are
    not counted)."""
    found: set[str] = set()
    for line in lines:
        assigned = _ASSIGNS.match(line.strip())
        if assigned:
            found |= {n.strip() for n in assigned[1].split(",")}
        loop = _FOR.match(line.strip())
        if loop:
            found.add(loop[1])
    return found


def _fused_columns(body: list[str], indent: int, text: Callable[[list[str]], str]) -> list[str]:
    """``body`` (statements at ``indent``) with consecutive loops over the same range merged
    into one: the loops of a fused row loop over the row's columns (layer norm's gradients of
    ``X``, ``R``, the weight and the bias: one pass over the row, not four).

    A later loop joins an earlier one when the one-line assignments between them (its row
    index, per-row factors) can run before the earlier loop — they read nothing it writes or
    assigns, and it reads nothing they assign —, it reads what the earlier loop writes only
    at the element that iteration writes, it reads no name the earlier loop assigns, and the
    earlier loop reads nothing the later one writes or assigns.  Every element is then
    computed by the same operations in the same order: the same bits."""
    out: list[_Item] = []
    loop: _Item | None = None  # the loop later ones may join: out's last loop
    between: list[_Item] = []  # the one-line assignments after it
    # names that stand for another (a nest's row index is the fused loop's): names are
    # assigned once in a function's body, so one map serves all of it
    alias: dict[str, str] = {}
    for line in body:
        copy = re.fullmatch(r"\s*(\w+) = ([A-Za-z_]\w*)", line)
        if copy:
            alias[copy[1]] = alias.get(copy[2], copy[2])

    def same(sub: str) -> str:
        return ", ".join(alias.get(p.strip(), p.strip()) for p in _split_args(sub))

    def joins(first: _Item, later: _Item) -> bool:
        assert first.loop is not None and later.loop is not None
        var = first.loop[1]
        if later.loop[2] != first.loop[2]:
            return False
        mine, theirs = text(first.lines), text(later.lines[1:])
        moved = text([line for item in between for line in item.lines])
        names = {n for item in between for n in item.names}
        written = _writes(text(first.lines[1:]), same)
        later_writes = set(_writes(theirs, same))
        if _CALL.search(moved):  # a helper may write an array the loops read
            return False
        if any(re.search(rf"\b{n}\b", mine) for n in names | later_writes | _assigned(later.lines)):
            return False
        if any(re.search(rf"\b{n}\b", moved) for n in {*written, *_assigned(first.lines)}):
            return False
        if any(re.search(rf"\b{n}\b", theirs) for n in {*_assigned(first.lines[1:]), var}):
            return False
        if any(  # an element written at the same place every iteration: the last one counts
            op == "=" and var not in _split_args(sub)
            for writes in written.values()
            for sub, op in writes
        ):
            return False
        before = alias.get(later.loop[1])
        alias[later.loop[1]] = var  # as it will be, joined
        for name, writes in written.items():
            if name in later_writes or any(
                writes != {(same(sub), "=")} for sub in _subscripts(theirs, name)
            ):
                if before is None:
                    del alias[later.loop[1]]
                else:
                    alias[later.loop[1]] = before
                return False
        return True

    for item in _items(body, indent):
        if item.loop is not None and loop is not None and joins(loop, item):
            at = out.index(loop)
            out[at:at] = between
            del out[len(out) - len(between) :]
            pad = " " * (indent + 4)
            loop.lines += [f"{pad}{item.loop[1]} = {loop.loop[1]}", *item.lines[1:]]  # type: ignore[index]
            between = []
            continue
        out.append(item)
        if item.loop is not None:
            loop, between = item, []
        elif item.simple and loop is not None:
            between.append(item)
        else:
            loop, between = None, []
    return [line for item in out for line in item.lines]


def _fused(
    nests: list[tuple[_Assignment, list[str]]],
    indent: int,
    pieces: list[sp.Expr | tuple[str, str]],
    allocations: list[str],
    chunked: dict[str, str],
) -> list[str]:
    """The lowered nests of one function, consecutive nests over the same rows merged into
    one loop (layer norm's gradients: the rows of ``X``, ``R`` and the output's gradient are
    read once, from cache, for all of them, not once per gradient), and inside it their
    loops over the same columns merged too (:func:`_fused_columns`).

    Each element is computed by the same operations in the same order as in its own nest, and
    every sum over the rows adds them in the same chunks, each in row order: the same bits.
    The parallel variant runs the merged loop in chunks of rows on the threads
    (:func:`_in_chunks`) where every nest writes its own rows or sums into per-chunk partial
    sums; otherwise it keeps the nests apart (each nest's rows on the threads, one nest after
    another).  ``allocations``: the function's scratch buffers; ``chunked``: the targets of
    the sums over rows made by :meth:`_Lowerer._chunked`."""
    out: list[str] = []
    group: list[_Nest] = []

    def text(lines: list[str]) -> str:
        def fill(match: re.Match[str]) -> str:
            piece = pieces[int(match.group(1))]
            return piece[0] if isinstance(piece, tuple) else str(piece)

        return _PIECE.sub(fill, "\n".join(lines))

    def flush() -> None:
        together, body = None, []
        if len(group) > 1 or (group and group[0].rows):
            body = _fused_columns([line for n in group for line in n.body], indent + 4, text)
            together = _in_chunks(group, body, indent, allocations, text, f"_g{len(out)}")
        if len(group) > 1 or together is not None:
            merged = [line for n in group for line in n.pre]
            merged.append(group[0].header)
            merged += body
            merged += [line for n in group for line in n.post]
            out.extend(_SERIAL_ONLY + line for line in merged)
            if together is None:
                together = [line for n in group for line in n.lines]
            out.extend(_PARALLEL_ONLY + line for line in together)
        else:
            out.extend(line for n in group for line in n.lines)
        group.clear()

    for a, lines in nests:
        nest = _nest(a, lines, indent, chunked)
        if nest is None:
            flush()
            out.extend(lines)
            continue
        if group and not _fusable(group, nest, text):
            flush()
        if group:  # the nest's loop variable is the group's
            nest.body.insert(0, f"{' ' * (indent + 4)}{nest.var} = {group[0].var}")
        group.append(nest)
    flush()
    return out


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
    #: (target, indices before the summed one): each term is also written to ``target`` at
    #: (indices..., var), where the output loop reads it back (see ``_Lowerer._kept``)
    keep: tuple[str, tuple[sp.Symbol, ...]] | None = None


@dataclass
class _Fill:
    """An array of a reduction's values over enclosing reductions' indices (``_materialize``)."""

    name: str
    r: _Reduction
    ranges: dict[sp.Symbol, tuple[sp.Expr, sp.Expr]]
    read: sp.Indexed  # the array read at the reduction's indices


@dataclass
class _Assignment:
    target: str
    loops: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...]  # (index, lo, hi)
    expr: sp.Expr
    accumulate: bool = False
    index: tuple[sp.Symbol, ...] | None = None  # the target's subscript; default: all loops
    #: an accumulation whose outermost loop's iterations add into their own parts of the
    #: target (a row chunk's partial sums, ``_Lowerer._chunked``): that loop may run in parallel
    own_parts: bool = False


def _stride(shape: tuple[sp.Expr, ...], axis: int) -> sp.Expr:
    """Elements between neighbours along ``axis`` of a C-contiguous array of ``shape``."""
    return sp.Mul(*shape[axis + 1 :])


def _is_run(axes: tuple[int, ...]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(axes))


@dataclass(frozen=True)
class _View:
    """Matrices inside a C-contiguous array, one per value of the batch axes: rows are the
    flattened ``rows`` axes, columns the flattened ``cols`` axes.  Stored as is (``trans``
    false: the columns are adjacent in memory, a row ``ld`` elements after the previous one)
    or transposed."""

    array: str
    shape: tuple[sp.Expr, ...]
    batch: tuple[int, ...]  # the array's axes fixed per product, in the GEMM's batch order
    trans: bool
    ld: sp.Expr

    def offset(self, indices: tuple[str, ...]) -> sp.Expr:
        """The flat offset of the matrix for the batch loop variables ``indices``."""
        return sp.Add(
            *[
                sp.Symbol(i, integer=True) * _stride(self.shape, axis)
                for i, axis in zip(indices, self.batch, strict=True)
            ]
        )


def _matrix_view(
    array: str,
    shape: tuple[sp.Expr, ...],
    batch: tuple[int, ...],
    rows: tuple[int, ...],
    cols: tuple[int, ...],
) -> _View | None:
    """The BLAS view of the matrices ``(rows, cols)`` of ``array``, or None when no leading
    dimension describes them (their axes interleave, or neither group ends at the last axis).

    One group must be a run of axes ending at the array's last axis (unit stride), the other a
    run before it; axes fixed per product may sit anywhere else (attention's head axis between
    the rows and the columns of ``Q[b, s, h, e]``).
    """
    last = len(shape) - 1

    def fits(outer: tuple[int, ...], inner: tuple[int, ...]) -> sp.Expr | None:
        if not (_is_run(outer) and _is_run(inner)):
            return None
        if inner and inner[-1] != last:
            return None
        if outer and inner and outer[-1] >= inner[0]:
            return None
        if outer:
            return _stride(shape, outer[-1])
        return sp.Mul(*[shape[k] for k in inner])

    ld = fits(rows, cols)
    if ld is not None:
        return _View(array, shape, batch, False, ld)
    ld = fits(cols, rows)
    if ld is not None:
        return _View(array, shape, batch, True, ld)
    return None


@dataclass(frozen=True)
class _Store:
    """``target[the first depth loop indices] = expr``, written inside another loop nest."""

    target: str
    depth: int
    expr: sp.Expr


@dataclass
class _Gemm:
    """One contraction computed by BLAS (:func:`symgrad.runtime.blas.gemm`), read back by index.

    ``C[batch, P, Q] = alpha · Σ_J A[batch, P, J]·B[batch, J, Q]``: every operand is a
    :class:`_View` into a kernel argument (no copy, a transpose is a flag) or, where no view
    describes it, into a contiguous copy made first.  Batch indices (shared by both operands
    and not summed: the batch and head of attention's ``Σ_e Q[b, s, h, e]·K[b, t, h, e]``)
    become loops around the call.  ``C`` is a temporary of shape ``dims``, or the target array
    itself (``into``), possibly with permuted axes.
    """

    name: str
    a: _View
    b: _View
    m: sp.Expr  # P
    n: sp.Expr  # Q
    k: sp.Expr  # J
    dims: tuple[sp.Expr, ...]  # the result's shape: batch axes, then the free axes of a and b
    batch: tuple[sp.Expr, ...]  # the batch dims
    n_rows: int  # how many free axes are a's (the rows of C)
    copies: tuple[str, ...] = ()  # statements making the contiguous operand copies
    uses: int = 1
    into: _View | None = None  # written straight into this view of a target array
    alpha: sp.Expr = sp.S.One

    @property
    def out(self) -> _View:
        if self.into is not None:
            return self.into
        nb = len(self.batch)
        return _View(self.name, self.dims, tuple(range(nb)), False, self.n)

    def statement(self) -> list[str]:
        lines = list(self.copies)
        if self.into is None:
            shape = ", ".join(_int(d) for d in self.dims) or "1"
            lines.append(f"{self.name} = np.empty(({shape},), {self.a.array}.dtype)")
        indices = tuple(f"{self.name}_b{n}" for n in range(len(self.batch)))
        pad = ""
        for n, (index, dim) in enumerate(zip(indices, self.batch, strict=True)):
            # each (batch, head) writes its own block of C: the outermost loop is parallel
            loop = _RANGE if n == 0 else "range"
            lines.append(f"{pad}for {index} in {loop}({_int(dim)}):")
            pad += "    "
        c = self.out
        if c.trans:  # C stored transposed: compute C' = op(B)' op(A)'
            first, second, m, n = self.b, self.a, self.n, self.m
            flags = (not self.b.trans, not self.a.trans)
        else:
            first, second, m, n = self.a, self.b, self.m, self.n
            flags = (self.a.trans, self.b.trans)
        args = [
            str(flags[0]),
            str(flags[1]),
            _int(m),
            _int(n),
            _int(self.k),
            _print_scalar(self.alpha),
            first.array,
            _int(first.offset(indices)),
            _int(first.ld),
            second.array,
            _int(second.offset(indices)),
            _int(second.ld),
            "0.0",
            c.array,
            _int(c.offset(indices)),
            _int(c.ld),
        ]
        call = "_gemm" if self.batch else _GEMM  # one product: split into pieces (blas.py)
        lines.append(f"{pad}{call}({', '.join(args)})")
        return lines


def _print_scalar(expr: sp.Expr) -> str:
    """A GEMM's scale, in float64 for either dtype (the call rounds it to the data's)."""
    return _print(sp.sympify(expr), "gemm", False, "float64", frozenset())


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
        self.dims = {
            s for shape in shapes.values() for d in shape for s in sp.sympify(d).free_symbols
        }
        self.gemms: list[_Gemm | MaterializedGemm] = []  # computed before every loop
        self._loops: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...] = ()
        self.n_acc = 0
        self.n_hoist = 0
        self.n_red = 0
        self.n_mat = 0
        self._all: list[_Reduction] = []
        #: expressions and (float64 text, float32 text) pairs, printed per dtype by _render
        self.pieces: list[sp.Expr | tuple[str, str]] = []
        #: arrays allocated once at the top of the function (reduction buffers and lanes)
        self.allocations: list[str] = []
        #: float64 accumulator arrays (read rounded to float32 in a float32 function)
        self.wide: set[str] = set()
        #: target → partial sums' array of each sum over rows made in chunks (_chunked)
        self.chunked: dict[str, str] = {}

    def piece(self, value: sp.Expr | tuple[str, str]) -> str:
        """A placeholder for an expression (printed per dtype, with the vectorisable helpers
        where they apply) or for a ``(float64 text, float32 text)`` pair."""
        if not isinstance(value, tuple):
            value = lower_primitives(value)
        self.pieces.append(value)
        return f"\u27ea{len(self.pieces) - 1}\u27eb"

    def _dtype(self) -> str:
        return self.piece(("np.float64", "np.float32"))

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
            if not (is_zero(lo) and is_zero(hi - (da - 1)) and is_zero(da - db)):
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
        """A read of the GEMM computing ``node``, if it is a contraction of two tensors."""
        found = self._contraction(node, loop_order)
        if found is None:  # the contraction of computed factors (a convolution's shifted reads)
            return self._materialized_gemm(node, loop_order)
        if found.batch and not found.free_a and not found.free_b:
            return None  # one dot product per batch element: a loop beats a BLAS call each
        a, b = found.a, found.b

        def axes(f: sp.Indexed, names: tuple[sp.Symbol, ...]) -> tuple[int, ...]:
            return tuple(list(f.indices).index(v) for v in names)

        def dims(f: sp.Indexed, names: tuple[sp.Symbol, ...]) -> list[sp.Expr]:
            shape = self.shapes[str(f.base.label)]
            return [shape[k] for k in axes(f, names)]

        copies: list[str] = []
        n_gemm = len(self.gemms)

        def view(f: sp.Indexed, rows: tuple[sp.Symbol, ...], cols: tuple[sp.Symbol, ...]) -> _View:
            label = str(f.base.label)
            shape = self.shapes[label]
            batch = axes(f, found.batch)
            found_view = _matrix_view(label, shape, batch, axes(f, rows), axes(f, cols))
            if found_view is not None:
                return found_view
            # no leading dimension describes it: a contiguous copy, axes (batch, rows, cols)
            perm = batch + axes(f, rows) + axes(f, cols)
            copy = f"_c{n_gemm}_{len(copies)}"
            copies.append(f"{copy} = np.ascontiguousarray(np.transpose({label}, {perm}))")
            nb, nr = len(batch), len(rows)
            result = _matrix_view(
                copy,
                tuple(shape[k] for k in perm),
                tuple(range(nb)),
                tuple(range(nb, nb + nr)),
                tuple(range(nb + nr, len(perm))),
            )
            assert result is not None
            return result

        left = view(a, found.free_a, found.summed)
        right = view(b, found.summed, found.free_b)
        gemm = next(
            (
                g
                for g in self.gemms
                if isinstance(g, _Gemm) and (g.a, g.b) == (left, right) and g.into is None
            ),
            None,
        )
        if gemm is None:  # the same product twice (layer norm's Σ_i w_i g_i) is computed once
            gemm = _Gemm(
                f"_c{n_gemm}",
                left,
                right,
                sp.Mul(*dims(a, found.free_a)),
                sp.Mul(*dims(b, found.free_b)),
                sp.Mul(*dims(a, found.summed)),
                tuple(dims(a, found.batch + found.free_a) + dims(b, found.free_b)),
                tuple(dims(a, found.batch)),
                len(found.free_a),
                tuple(copies),
            )
            self.gemms.append(gemm)
        else:
            gemm.uses += 1
        free = found.batch + found.free_a + found.free_b
        return sp.IndexedBase(gemm.name)[free] if free else sp.IndexedBase(gemm.name)[0]

    def _dims(self) -> set[sp.Symbol]:
        return {s for shape in self.shapes.values() for d in shape for s in d.free_symbols}

    def _materialized_gemm(self, node: sp.Sum, loop_order: list[sp.Symbol]) -> sp.Expr | None:
        loops = tuple(lim for lim in self._loops if lim[0] in loop_order)
        found = plan(node, loops, self._dims(), f"_c{len(self.gemms)}", self.piece, _int)
        if found is None:
            return None
        for g in self.gemms:
            if isinstance(g, MaterializedGemm) and g.key == found.key and g.into is None:
                g.uses += 1
                return g.read()
        self.gemms.append(found)
        return found.read()

    def _write_gemm_into(self, a: _Assignment, expr: sp.Expr) -> sp.Expr:
        """Let a GEMM read once, at this target's element, write into the target.

        ``grad_X[k0, k1] = _c0[k0, k1]`` then needs no temporary and no copy loop, a read with
        permuted indices (``grad_Q[b, s, h, e] = _c0[b, h, s, e]``) writes through a strided
        view, a loop-invariant factor becomes the GEMM's ``alpha`` (attention's ``1/√M``), and
        ``out[b, i] = _c0[b, i] + c[i]`` adds the bias in place.
        """
        if a.accumulate or a.index is not None or not a.loops:
            return expr
        loop_vars = [v for v, _, _ in a.loops]
        ranges = {v: (lo, hi) for v, lo, hi in a.loops}
        position = {v: n for n, v in enumerate(loop_vars)}
        shape = tuple(hi - lo + 1 for _, lo, hi in a.loops)
        for gemm in self.gemms:
            if not isinstance(gemm, _Gemm) or gemm.uses != 1 or gemm.into is not None:
                continue
            reads = [r for r in expr.atoms(sp.Indexed) if str(r.base.label) == gemm.name]
            if len(reads) != 1:
                continue
            (read,) = reads
            idx = list(read.indices)
            if set(idx) != set(loop_vars) or len(idx) != len(loop_vars):
                continue
            if not all(
                ranges[v][0] == 0 and is_zero(ranges[v][1] + 1 - d)
                for v, d in zip(idx, gemm.dims, strict=True)
            ):
                continue
            nb, nr = len(gemm.batch), gemm.n_rows
            target = _matrix_view(
                a.target,
                shape,
                tuple(position[v] for v in idx[:nb]),
                tuple(position[v] for v in idx[nb : nb + nr]),
                tuple(position[v] for v in idx[nb + nr :]),
            )
            if target is None:
                continue
            scale, rest = _split_factor(expr, read, self.dims)
            gemm.into, gemm.alpha = target, scale
            return rest.xreplace({read: sp.IndexedBase(a.target)[tuple(loop_vars)]})
        return expr

    def _write_materialized_into(self, a: _Assignment, expr: sp.Expr) -> sp.Expr:
        """Let a :class:`MaterializedGemm` read once, at this target's element and in its
        layout, write into the target (a convolution's ``out[b, o, p, v] = _c0[b, o, p, v] +
        c[o]``): no temporary as large as the output, no copy; the rest of ``expr`` (the
        bias) is then applied to the target in place, element by element."""
        if a.accumulate or a.index is not None or not a.loops:
            return expr
        loop_vars = tuple(v for v, _, _ in a.loops)
        for gemm in self.gemms:
            if not isinstance(gemm, MaterializedGemm) or gemm.uses != 1 or gemm.into is not None:
                continue
            reads = [r for r in expr.atoms(sp.Indexed) if str(r.base.label) == gemm.name]
            if len(reads) != 1 or tuple(reads[0].indices) != loop_vars:
                continue
            if tuple(gemm.read().indices) != loop_vars:
                continue  # stored in another layout (a fold's s leading)
            if not all(is_zero(lo) for _, lo, _ in a.loops):
                continue
            gemm.into = a.target
            return expr.xreplace({reads[0]: sp.IndexedBase(a.target)[loop_vars]})
        return expr

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
                v: sp.Symbol(f"_{v}_{self.n_red}_{n}", integer=True)
                for n, (v, _, _) in enumerate(node.limits)
            }
            limits = [
                (fresh[v], lo.xreplace(fresh), hi.xreplace(fresh))
                for v, lo, hi in _memory_order(node)
            ]
            body = visit(node.function.xreplace(fresh))
            # A guard protects the reads of the terms; one naming an index the terms do not
            # read at (the causal softmax's key index t in `t <= s`, around a sum over u <= s)
            # cannot change them, and would make the reduction depend on that index: a row's
            # sum recomputed for every element of the row.
            reads = body.free_symbols | self.dims
            kept = [g for g in guards if g.free_symbols <= reads]
            if kept:
                empty = sp.S.Zero if isinstance(node, sp.Sum) else -sp.oo
                body = sp.Piecewise((body, sp.And(*kept)), (empty, True))
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

    def assignment(self, a: _Assignment, indent: int, stores: tuple[_Store, ...] = ()) -> list[str]:
        """The loop nest of ``a``; each of ``stores`` is written at its depth inside it, its
        reductions shared with ``a``'s (a forward saving its row statistics computes them
        once)."""
        if not stores:
            scatter = self._scatter(a, indent)
            if scatter is not None:
                return scatter
        if a.expr.has(sp.KroneckerDelta):  # δ(k, ids[b, t]) outside the scatter form
            a = _Assignment(a.target, a.loops, _guard(a.expr), a.accumulate, a.index)
        if not stores:
            batch = self._batch_sum(a, indent)
            if batch is not None:
                return batch
        self._loops = a.loops
        loop_vars = [v for v, _, _ in a.loops]
        reds: list[_Reduction] = []
        seen: dict[tuple, sp.Symbol] = {}
        expr = self.extract(a.expr, loop_vars, reds, seen)
        stored = [self.extract(st.expr, loop_vars[: st.depth], reds, seen) for st in stores]
        expr = self._write_gemm_into(a, expr)
        expr = self._write_materialized_into(a, expr)
        self._all = reds
        # Place each reduction: inside the reduction loop of the innermost enclosing reduction
        # it depends on, else at the output loop level of its deepest dependency.
        level = {v: n + 1 for n, (v, _, _) in enumerate(a.loops)}
        by_var = {r.var: r for r in reds}
        placed: dict[int, list[_Reduction | _Fill]] = {n: [] for n in range(len(a.loops) + 1)}
        # What is computed where, by structure: a reduction equal to one placed before at the
        # same level up to the names of its loop variables (the derivation writes the same sum
        # with new dummy indices in every term that needs it) is read from that one.
        known: dict[tuple, sp.Expr] = {}

        def replace(temp: sp.Symbol, value: sp.Expr) -> None:
            nonlocal expr, stored
            for other in reds:
                other.body = other.body.xreplace({temp: value})
            expr = expr.xreplace({temp: value})
            stored = [s.xreplace({temp: value}) for s in stored]

        for r in reds:  # post-order: dependencies come first
            inner = sorted((by_var[v] for v in r.deps if v in by_var), key=reds.index)
            at = max((level[v] for v in r.deps if v in level), default=0)
            if inner and at < len(a.loops) and self._bounded_by(inner, level, at):
                # Depends on enclosing reductions' indices and not on the innermost output
                # index (a row's max and sum inside a sum over rows): compute it once for every
                # value of them, at the loop level of its last output index, instead of once
                # per output element — the sum over rows stays linear in the row length.
                hosts = [h.var for h in inner]
                ranges = self._host_ranges(hosts)
                key = (at, *_structure(r, hosts, list(ranges.values())))
                if key in known:
                    # the same array, read at this reduction's indices
                    first = known[key]
                    assert isinstance(first, sp.Indexed)
                    replace(r.temp, first.base[tuple(v - lo for v, (lo, _) in ranges.items())])
                    continue
                fill = self._materialize(r, ranges)
                known[key] = fill.read
                replace(r.temp, fill.read)
                placed[at].append(fill)
            elif inner:
                # the enclosing reduction whose loop variable this one depends on
                inner[0].children.append(r)
            else:
                key = (at, *_structure(r, [], []))
                if key in known:
                    replace(r.temp, known[key])
                    continue
                known[key] = r.temp
                placed[at].append(r)

        index = a.index if a.index is not None else tuple(loop_vars)
        expr = self._kept(a, expr, placed, index)
        pad = " " * indent

        def emit(items: list[_Reduction | _Fill]) -> list[str]:
            # lowered here, not when placed: the buffers of the reductions inside a loop that
            # runs in parallel are allocated in that loop (per_row), one per thread
            out: list[str] = []
            for item in items:
                if isinstance(item, _Reduction):
                    out += self._reduction(item, pad)
                else:
                    out += [pad + line for line in self._fill(item)]
            return out

        wrote = not a.accumulate and index and expr == sp.IndexedBase(a.target)[index]
        if wrote and not stores:
            return emit(placed[0])  # a GEMM wrote the target
        red_level = {
            r.temp: n for n, rs in placed.items() for r in rs if isinstance(r, _Reduction)
        }
        expr, hoisted = self._hoist(expr, a.loops, red_level)
        lines: list[str] = []
        # Rows of the target written by different iterations of the outermost loop are
        # different rows: that loop may run in parallel, each iteration on its own buffers.
        parallel = (not a.accumulate or a.own_parts) and bool(a.loops) and a.loops[0][0] in index
        first_allocation = len(self.allocations)
        row_start = -1

        def per_row(lines: list[str]) -> list[str]:
            """The buffers of the reductions inside the parallel loop: allocated in it (per
            thread) in the parallel variant, once at the top in the serial one."""
            mine = self.allocations[first_allocation:]
            if row_start < 0 or not mine:
                return lines
            self.allocations[first_allocation:] = [_SERIAL_ONLY + x for x in mine]
            inner = pad_row + _PARALLEL_ONLY
            return [*lines[:row_start], *(inner + x for x in mine), *lines[row_start:]]

        pad_row = ""
        for n in range(len(a.loops) + 1):
            lines += emit(placed[n])
            for temp, value in hoisted.get(n, []):
                lines.append(f"{pad}{temp} = {self.piece(value)}")
            for st, value in zip(stores, stored, strict=True):
                if st.depth == n:
                    idx = ", ".join(_int(v) for v in loop_vars[:n])
                    lines.append(f"{pad}{st.target}[{idx}] = {self.piece(value)}")
            if wrote and n == max(st.depth for st in stores):
                return per_row(lines)
            if n < len(a.loops):
                var, lo, hi = a.loops[n]
                loop = _RANGE if n == 0 and parallel else "range"
                mark = _OUTER if n == 0 else ""
                lines.append(f"{pad}for {var} in {loop}({_int(lo)}, {_int(hi + 1)}):{mark}")
                pad += "    "
                if loop == _RANGE:
                    row_start, pad_row = len(lines), pad
                    first_allocation = len(self.allocations)
        idx = ", ".join(_int(v) for v in index) or "0"
        op = "+=" if a.accumulate else "="
        lines.append(f"{pad}{a.target}[{idx}] {op} {self.piece(expr)}")
        return per_row(lines)

    def _kept(
        self,
        a: _Assignment,
        expr: sp.Expr,
        placed: dict[int, list[_Reduction | _Fill]],
        index: tuple[sp.Symbol, ...],
    ) -> sp.Expr:
        """``expr`` reading back from the target the terms of a row's sum that it repeats.

        Softmax's output ``exp(x_t - m)/Σ_u exp(x_u - m)`` computes each term of the row's sum
        again; when a sum placed just outside the innermost loop, over that loop's range, has a
        term with a function call that ``expr`` contains at the innermost index, the sum writes
        its terms into the target's row as it adds them (the row is the output's, written
        right after) and ``expr`` reads them there: one ``exp`` per element instead of two.
        The same operations on the same values: the same bits.  Only for a plain write of
        every element of the target that reads nothing of the target.
        """
        loop_vars = tuple(v for v, _, _ in a.loops)
        if a.accumulate or not loop_vars or index != loop_vars:
            return expr
        reads = {str(x.base.label) for x in expr.atoms(sp.Indexed)}
        for red in self._all:
            reads |= {str(x.base.label) for x in red.body.atoms(sp.Indexed)}
        if a.target in reads:
            return expr
        var, lo, hi = a.loops[-1]
        for r in placed[len(a.loops) - 1]:
            if not isinstance(r, _Reduction) or r.kind != "sum" or r.children:
                continue
            if (r.lo, r.hi) != (lo, hi) or not r.body.atoms(sp.Function):
                continue
            term = r.body.xreplace({r.var: var})
            if not expr.has(term):
                continue
            r.keep = (a.target, loop_vars[:-1])
            return expr.xreplace({term: sp.IndexedBase(a.target)[loop_vars]})
        return expr

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
        accumulated into float64 partial sums, one row of them per chunk of rows
        (:meth:`_chunked`), or per element of a batch axis before the summed one.  Done only
        when that reads rows in order and no reduction inside depends on ``k`` (it would be
        recomputed for every ``b``).
        """
        found = _one_sum(a)
        if found is None:
            return None
        total, coeff = found
        loop_vars = [v for v, _, _ in a.loops]
        outer = set(loop_vars)
        if coeff.has(sp.Sum, ReduceMax):
            return None
        pair = self._contraction(total, loop_vars)
        if pair is not None and (pair.free_a or pair.free_b or not pair.batch):
            return None  # a GEMM (one dot product per column, Σ_b g·x, is summed here)
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
        self.wide.add(acc)  # accumulated in float64 for float32 data too
        sum_loops = tuple(reversed(_memory_order(total)))  # outermost first, rows in order
        # loops over axes before the summed one stay outside it (a batch axis: b, s, then t)
        n_out = _leading_loops(body, {v for v, _, _ in total.limits}, loop_vars)
        if n_out:  # each iteration of the batch loop sums into its own elements
            loops = a.loops[:n_out] + sum_loops + a.loops[n_out:]
            whole = _Assignment(acc, loops, body, accumulate=True, index=index, own_parts=True)
            lines = [f"{' ' * indent}{acc} = np.zeros(({shape},))"]
            lines += self.assignment(whole, indent)
            read = sp.IndexedBase(acc)[index]
        else:
            lines = self._chunked(acc, shape, sum_loops + a.loops, body, index, indent)
            self.chunked[a.target] = acc
            read = sp.IndexedBase(acc)[(0, *index)]
        # the target from the sums: one row, serially too (threads started for it cost more)
        finish = _Assignment(a.target, a.loops, coeff * read)
        lines += [
            line.replace(_OUTER, "").replace(_RANGE, "range")
            for line in self.assignment(finish, indent)
        ]
        return lines

    def _chunked(
        self,
        acc: str,
        shape: str,
        loops: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...],
        body: sp.Expr,
        index: tuple[sp.Expr, ...],
        indent: int,
    ) -> list[str]:
        """``acc[0, index] = Σ body`` over ``loops[0]`` (the rows, outermost) and the other
        summation loops, in chunks of consecutive rows: each chunk's rows are added in row
        order into the chunk's own partial sums ``acc[q, index]``, then the chunks' partial
        sums into ``acc[0, index]`` in chunk order.  The chunks (``_sg_chunk_rows``) depend
        on the number of rows alone.  Serial variant: one pass over the rows (which
        :func:`_fused` can merge with the op's other row loops); parallel variant: the chunks
        on the threads.  The same additions in the same order, so the same bits."""
        (row, lo, hi), rest = loops[0], loops[1:]
        pad = " " * indent
        size, count = f"{acc}_size", f"{acc}_n"
        q = sp.Symbol(f"{acc}_q", integer=True)
        lines = [
            f"{pad}{size}, {count} = _sg_chunk_rows({_int(hi - lo + 1)}, {ROW_CHUNK})",
            f"{pad}{acc} = np.zeros(({count}, {shape}))",
        ]
        chunk = sp.Symbol(f"{acc}_c", integer=True)  # the row's chunk, once per row
        serial = _Assignment(acc, loops, body, accumulate=True, index=(chunk, *index))
        by_row = self.assignment(serial, indent)
        head = next(n for n, line in enumerate(by_row) if _OUTER in line)  # the rows' loop
        by_row.insert(head + 1, f"{pad}    {chunk} = ({_int(row - lo)}) // {size}")
        start = lo + q * sp.Symbol(size)
        chunks = ((q, sp.S.Zero, sp.Symbol(count) - 1),
                  (row, start, sp.Min(hi, start + sp.Symbol(size) - 1)))
        parallel = _Assignment(acc, chunks + rest, body, accumulate=True, index=(q, *index),
                               own_parts=True)
        lines += [_SERIAL_ONLY + line for line in by_row]
        lines += [_PARALLEL_ONLY + line for line in self.assignment(parallel, indent)]
        flat, e = f"{acc}_f", f"{acc}_e"
        return [
            *lines,
            f"{pad}{flat} = {acc}.reshape(({count}, -1))",
            f"{pad}for {q} in range(1, {count}):",
            f"{pad}    for {e} in range({flat}.shape[1]):",
            f"{pad}        {flat}[0, {e}] += {flat}[{q}, {e}]",
        ]

    def _bounded_by(
        self, hosts: list[_Reduction], level: dict[sp.Symbol, int], at: int
    ) -> bool:
        """Whether the ranges of ``hosts`` are known at loop level ``at`` and do not depend on
        each other: then an array over them can be filled there."""
        reduction_vars = {r.var for r in self._all}
        bounds = {s for h in hosts for s in h.lo.free_symbols | h.hi.free_symbols}
        return not bounds & reduction_vars and all(level.get(s, 0) <= at for s in bounds)

    def _host_ranges(self, hosts: list[sp.Symbol]) -> dict[sp.Symbol, tuple[sp.Expr, sp.Expr]]:
        """The range of each of ``hosts``, loop variables of enclosing reductions."""
        ranges = {}
        for v in hosts:
            for other in self._all:
                if other.var == v:
                    ranges[v] = (other.lo, other.hi)
        return ranges

    def _materialize(
        self, r: _Reduction, ranges: dict[sp.Symbol, tuple[sp.Expr, sp.Expr]]
    ) -> _Fill:
        """An array of ``r``'s values for every value of the loop variables ``ranges`` gives
        (filled where it is placed, :meth:`_fill`) and its read."""
        name = f"_m{self.n_mat}"
        self.n_mat += 1
        idx = tuple(v - lo for v, (lo, _) in ranges.items())
        return _Fill(name, r, ranges, sp.IndexedBase(name)[idx])

    def _fill(self, fill: _Fill) -> list[str]:
        """The loops filling ``fill``'s array."""
        shape = ", ".join(_int(hi - lo + 1) for lo, hi in fill.ranges.values())
        lines = [f"{fill.name} = np.empty(({shape},), {self._dtype()})"]
        pad = ""
        for v, (lo, hi) in fill.ranges.items():
            lines.append(f"{pad}for {v} in range({_int(lo)}, {_int(hi + 1)}):")
            pad += "    "
        lines += self._reduction(fill.r, pad)
        index = ", ".join(_int(i) for i in fill.read.indices)
        lines.append(f"{pad}{fill.name}[{index}] = {fill.r.temp}")
        return lines

    def _reduction(self, r: _Reduction, pad: str) -> list[str]:
        """Lines computing ``r.temp``: blocked and vectorised when its body allows (see the
        module doc), else one loop; a sum accumulates in float64, then is rounded once."""
        wide = f"{r.temp}_s"  # the float64 total, rounded once to the data's dtype
        cast = f"{r.temp} = {self.piece(('', 'np.float32'))}({wide})"
        body = self.piece(r.body)
        if not r.children and _vectorisable(self._scalar_text(r.body)):
            # in float64 (a float32 max too: exact, and twice the elements per vector loop
            # makes the fold's loops too short to vectorise on rows of 64), then rounded
            return [*self._blocked(r, pad, wide, body), f"{pad}{cast}"]
        total = wide if r.kind == "sum" else str(r.temp)
        init = "0.0" if r.kind == "sum" else self._lowest()
        lines = [
            f"{pad}{total} = {init}",
            f"{pad}for {r.var} in range({_int(r.lo)}, {_int(r.hi + 1)}):",
        ]
        for child in r.children:
            lines += self._reduction(child, pad + "    ")
        if r.kind == "sum" and r.keep is not None:
            kept = _kept_at(r, str(r.var))
            lines += [f"{pad}    {kept} = {body}", f"{pad}    {total} += {kept}", f"{pad}{cast}"]
        elif r.kind == "sum":
            lines += [f"{pad}    {total} += {body}", f"{pad}{cast}"]
        else:
            lines.append(f"{pad}    {total} = max({total}, {body})")
        return lines

    def _scalar_text(self, expr: sp.Expr) -> str:
        return _print(lower_primitives(expr), self.op, False, "float64", frozenset())

    def _lowest(self) -> str:
        """``-inf`` in the data's dtype: where a max in that dtype starts."""
        return self.piece(("-math.inf", "np.float32(-math.inf)"))

    def _blocked(self, r: _Reduction, pad: str, total: str, body: str) -> list[str]:
        """``r`` over blocks of BLOCK elements: values to a float64 buffer, each block folded to
        one value (by the folds of :data:`HELPER_SOURCE`), the blocks' values joined in order
        into the float64 ``total``."""
        n = str(r.temp)
        buf, q, m = (f"{n}_{x}" for x in ("buf", "q", "m"))
        self.allocations.append(f"{buf} = np.empty({BLOCK}, np.float64)")
        write = [f"{buf}[{r.var} - {q}] = {body}"]
        if r.keep is not None:  # the values go to the target's row (``_kept``), then to the buffer
            kept = _kept_at(r, str(r.var))
            write = [f"{kept} = {body}", f"{buf}[{r.var} - {q}] = {kept}"]
        lo, end = _int(r.lo), _int(r.hi + 1)
        if r.kind == "sum":
            init = "0.0"
            fold, join = f"_sg_fold_sum({buf}, {m})", f"{total} + _sg_fold_sum({buf}, {m})"
        else:
            init = "-math.inf"
            fold = f"_sg_fold_max({buf}, {m}, {init})"
            join = f"max({total}, _sg_fold_max({buf}, {m}, {init}))"
        short = []
        if r.kind == "max" and r.keep is None:
            # a short row's max in one pass, serially (a softmax's rows of 64: the fold's loops
            # are too short to vectorise; a max is exact in any order, so the value is the same)
            x = f"{n}_x"
            short = [
                f"{pad}if {m} <= {SHORT_MAX}:",
                f"{pad}    {x} = {self._lowest()}",
                f"{pad}    for {r.var} in range({lo}, {lo} + {m}):",
                f"{pad}        {x} = max({x}, {body})",
                f"{pad}    {total} = {x}",
            ]
        # A range of at most one block (every row of a transformer's softmax or layer norm)
        # skips the block loop: LLVM vectorises a straight pass 3-4x better than the same pass
        # inside a loop whose trip count it cannot see (a masked softmax's forward over a BERT
        # layer's scores: 9.5 -> 2.7 ms).  The blocks, and so the order of the additions, are
        # the same either way: the same bits.
        return [
            f"{pad}{m} = max({end} - {lo}, 0)",
            *short,
            f"{pad}{'elif' if short else 'if'} {m} <= {BLOCK}:",
            f"{pad}    {q} = {lo}",
            f"{pad}    for {r.var} in range({q}, {q} + {m}):",
            *(f"{pad}        {line}" for line in write),
            f"{pad}    {total} = {fold}",
            f"{pad}else:",
            f"{pad}    {total} = {init}",
            f"{pad}    for {q} in range({lo}, {end}, {BLOCK}):",
            f"{pad}        {m} = min({BLOCK}, {end} - {q})",
            f"{pad}        for {r.var} in range({q}, {q} + {m}):",
            *(f"{pad}            {line}" for line in write),
            f"{pad}        {total} = {join}",
        ]


def _kept_at(r: _Reduction, last: str) -> str:
    """The element (or, ``last`` a slice, the row) of the target that ``r`` keeps its terms in."""
    assert r.keep is not None
    target, outer = r.keep
    return f"{target}[{', '.join([*(_int(v) for v in outer), last])}]"


#: Numba source of the helpers a tensor kernel may call besides the vectorised math: a blocked
#: reduction's folds (:mod:`symgrad.codegen.folds`: a block's buffer folded to its sum or its
#: maximum) and the chunks of a sum over rows (``_sg_chunk_rows``: rows per chunk and chunks,
#: from the number of rows alone).  Small functions that LLVM inlines into each kernel; as
#: calls they keep Numba's own passes (whose time grows faster than a function's length) from
#: seeing these loops once for every reduction of a kernel — the textbook attention's VJP
#: compiled 2.5× faster.
HELPER_SOURCE: dict[str, str] = {
    "_sg_chunk_rows": f"""\
{njit()}
def _sg_chunk_rows(rows, least):
    size = max(least, (rows + {MAX_CHUNKS - 1}) // {MAX_CHUNKS})
    return size, max(1, (rows + size - 1) // size)
""",
    **FOLD_SOURCE,
}


def _structure(
    r: _Reduction, hosts: list[sp.Symbol], ranges: list[tuple[sp.Expr, sp.Expr]]
) -> tuple[tuple[sp.Basic, ...], ...]:
    """``r`` (with the reductions nested in it) as a function of ``hosts`` over ``ranges``, up
    to the names of its own loop variables and temporaries: reductions of equal structure
    compute equal values at equal values of their hosts and of every other free symbol."""
    names: dict[sp.Basic, sp.Basic] = {
        h: sp.Symbol(f"_host{n}", integer=True) for n, h in enumerate(hosts)
    }
    parts: list[tuple[sp.Basic, ...]] = [
        (lo.xreplace(names), hi.xreplace(names)) for lo, hi in ranges
    ]

    def walk(red: _Reduction) -> None:
        names[red.var] = sp.Symbol(f"_var{len(names)}", integer=True)
        for child in red.children:  # computed inside red's loop, before its body
            walk(child)
        parts.append(
            (sp.Symbol(red.kind), red.lo.xreplace(names), red.hi.xreplace(names),
             red.body.xreplace(names))
        )
        names[red.temp] = sp.Symbol(f"_temp{len(names)}", real=True)

    walk(r)
    return tuple(parts)


def _split_factor(
    expr: sp.Expr, read: sp.Indexed, constant: set[sp.Symbol]
) -> tuple[sp.Expr, sp.Expr]:
    """``(c, rest)`` with ``expr = rest`` where ``read`` stands for ``c·read``: ``c`` the
    factor of a product ``c·read`` made of numbers and the ``constant`` symbols only (the dims:
    it can scale the GEMM writing ``read``), else 1."""
    if isinstance(expr, sp.Mul) and read in expr.args:
        fixed = [
            f
            for f in expr.args
            if f is not read and f.free_symbols <= constant and not f.has(sp.Indexed)
        ]
        if len(fixed) == len(expr.args) - 1:
            return sp.Mul(*fixed), read
    return sp.S.One, expr


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


def _dim_sources(spec: TensorSpec) -> tuple[tuple[str, int, int] | None, ...]:
    """For every dim argument of the kernels, ``(name, input, axis)``: the input axis whose
    length it is (a compiled step passes ``input.shape[axis]``), or None where no input has it
    as a whole axis."""
    found: list[tuple[str, int, int] | None] = []
    for dim in spec.dims:
        source = None
        for n, base in enumerate(spec.inputs):
            shape = [sp.sympify(d) for d in base.shape]
            if dim in shape:
                source = (str(dim), n, shape.index(dim))
                break
        found.append(source)
    return tuple(found)


def emit_tensor(derivation: TensorDerivation, key: str) -> KernelSource:
    """Numba source of a tensor op: ``forward(inputs..., dims..., out)`` and
    ``vjp(inputs..., dims..., grad_out, grad_<input>...)``, and their float32 twins
    ``forward_f32`` and ``vjp_f32``, user names mangled (:mod:`symgrad.codegen.names`).

    When its VJPs can read saved residuals (:mod:`symgrad.symbolic.residuals`), also
    ``forward_saved(inputs..., dims..., out, res...)``, which writes them, and
    ``vjp_saved(inputs..., dims..., out, res..., grad_out, grad_<input>...)``, which reads them
    (and their float32 twins); the module constants ``RESIDUALS`` (each residual's axes, as
    positions among the output's) and ``READS_OUTPUT`` tell the runtime what to allocate and
    keep.  ``DIMS`` says which input axis each dim argument is the length of
    (:func:`_dim_sources`).
    """
    spec = derivation.spec
    op = spec.name
    mangled = names.tensor_names(derivation)  # every user name mangled (codegen/names.py)
    shapes = dict(mangled.shapes)
    shapes["out"] = shapes["grad_out"]
    decorator = njit()
    uses_blas = False

    def function(
        name: str,
        params: list[str],
        assignments: list[_Assignment],
        stores: tuple[_Store, ...] = (),
    ) -> list[str]:
        """The function lowered once, printed for float64 (``name``) and float32 data;
        ``stores`` are written from inside the last assignment."""
        nonlocal uses_blas
        lowerer = _Lowerer(op, shapes)
        nests = [
            (a, lowerer.assignment(a, 4, stores if n == len(assignments) - 1 else ()))
            for n, a in enumerate(assignments)
        ]
        body = _fused(nests, 4, lowerer.pieces, lowerer.allocations, lowerer.chunked)
        prelude = ["    " + line for g in lowerer.gemms for line in g.statement()]
        prelude += ["    " + line for line in lowerer.allocations]
        uses_blas = uses_blas or bool(lowerer.gemms)
        wide = frozenset(lowerer.wide)
        lines = [*prelude, *body]
        # the parallel variant (``name_par``), where there is something to run in parallel
        parallel = any(_RANGE in line or _GEMM in line for line in lines)
        out: list[str] = []
        for variant in (False, True) if parallel else (False,):
            text = _variant(lines, variant)
            for dtype, suffix in SUFFIXES.items():
                out += [
                    PARALLEL_DECORATOR if variant else decorator,
                    f"def {name}{'_par' if variant else ''}{suffix}({', '.join(params)}):",
                    *_render(text, lowerer.pieces, dtype, op, wide),
                    "    return None",
                    "",
                    "",
                ]
        return out

    def gradients(finals: list[sp.Expr]) -> list[_Assignment]:
        """One assignment per gradient; a gradient equal to an earlier one (layer norm of a
        residual sum: ``X`` and ``R`` enter alike) copies it instead of computing it again."""
        found: list[_Assignment] = []
        seen: dict[tuple, str] = {}
        for (target, loops, _), final in zip(mangled.gradients, finals, strict=True):
            indices = tuple(k for k, _, _ in loops)
            canon = {k: sp.Symbol(f"_k{n}", integer=True) for n, k in enumerate(indices)}
            key = (tuple(hi for _, _, hi in loops), normal(final.xreplace(canon)))
            if key in seen:
                final = sp.IndexedBase(seen[key])[indices] if indices else sp.Symbol(seen[key])
            else:
                seen[key] = target
            found.append(_Assignment(target, loops, final))
        return found

    params = [*mangled.labels, *mangled.dims]
    src = function(
        "forward", [*params, "out"], [_Assignment("out", mangled.out_loops, mangled.forward)]
    )
    grads = gradients([value for _, _, value in mangled.gradients])
    grad_names = [g.target for g in grads]
    src += function("vjp", [*params, "grad_out", *grad_names], grads)
    saved = derivation.saved
    constants = [f"DIMS = {_dim_sources(spec)!r}", ""]
    if saved is not None and saved.saves:
        res_names = [r.name for r in saved.residuals]
        for r in saved.residuals:
            shapes[r.name] = tuple(mangled.apply(d) for d in r.shape)
        loop_of = {i: loop for i, loop in zip(spec.out, mangled.out_loops, strict=True)}
        # A residual over the leading output indices (a row statistic) is stored from inside
        # the forward's own loops, where the forward computes it anyway; any other is computed
        # in a loop nest of its own first.
        writes, stores = [], []
        for r in saved.residuals:
            if r.indices == spec.out[: len(r.indices)]:
                stores.append(_Store(r.name, len(r.indices), mangled.apply(r.node)))
            else:
                loops = tuple(loop_of[i] for i in r.indices)
                writes.append(_Assignment(r.name, loops, mangled.apply(r.value)))
        forward = mangled.apply(saved.forward) if writes else mangled.forward
        src += function(
            "forward_saved",
            [*params, "out", *res_names],
            [*writes, _Assignment("out", mangled.out_loops, forward)],
            tuple(stores),
        )
        reads = [
            mangled.apply(e) if e is not None else value
            for (_, _, value), e in zip(mangled.gradients, saved.partials, strict=True)
        ]
        src += function(
            "vjp_saved", [*params, "out", *res_names, "grad_out", *grad_names], gradients(reads)
        )
        layout = tuple(tuple(spec.out.index(i) for i in r.indices) for r in saved.residuals)
        constants += [f"RESIDUALS = {layout!r}", f"READS_OUTPUT = {saved.reads_output!r}", ""]
    text = "\n".join(src)
    sources = {**VECTOR_MATH_SOURCE, **HELPER_SOURCE}
    helpers = [sources[h] + "\n" for h in sorted(sources) if re.search(rf"\b{h}\(", text)]
    imports = ["import math", "", "import numpy as np", "from numba import njit, prange"]
    if uses_blas:
        imports.append(
            "from symgrad.runtime.blas import gemm as _gemm, gemm_blocks as _gemm_blocks, "
            "gemm_blocks_par as _gemm_blocks_par"
        )
    body_text = "\n".join([*imports, "", "", *constants, "", *helpers, *src]).rstrip() + "\n"
    body_hash = hashlib.sha256(body_text.encode()).hexdigest()
    header = (
        f"# symgrad generated kernels for tensor op {op!r}\n"
        f"# symgrad {__version__}; spec {key}\n"
        f"# body-sha256 {body_hash}\n"
    )
    return KernelSource(op, key, header + body_text, body_hash, False, False)
