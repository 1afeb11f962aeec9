"""Tensor ops in index notation: validation, Kronecker-delta contraction, VJP derivation.

A tensor op's output element is a SymPy expression over ``IndexedBase`` tensors, the free
output indices and explicit ``Sum``s over declared dims::

    Y[b, i] = Sum(W[i, j] * X[b, j], (j, 0, N - 1)) + c[i]

The VJP of input ``X`` (indices ``k``) is ``grad_X[k] = Σ_out grad_Y[out] · ∂Y[out]/∂X[k]``.
``sympy.diff`` of the body with respect to ``X[k]`` gives ``KroneckerDelta``s; :func:`contract`
removes them — ``Σ_j δ(j, k) f(j) → f(k)`` when ``k`` ranges over the same values as ``j`` —
after distributing sums over the terms of their bodies and pulling out factors that do not
depend on the summation index.  ``Sum.doit()`` is never used: it crashes on layer norm and
leaves ``Piecewise`` range guards.

Beyond plain contractions (see :mod:`.conditions` for the index conditions):

* kinks inside sums — the chain rule is applied node by node (:func:`differentiate`) and a
  ``Piecewise`` under a sum splits into indicator terms, so its condition keeps its index;
* shifted indices — ``Σ_j δ(j + q, k)·f(j) = [0 ≤ k - q < N]·f(k - q)``: a convolution's VJP is
  the transposed convolution, by contraction; a read outside a tensor is 0 (zero padding);
* conditions on indices and triangular sums — a condition on a summation index becomes its
  bound once every delta is gone, so loops run over the triangle and the max shift of
  ``Σ exp`` sees only the kept terms;
* stable VJPs — the forward is stabilized first and differentiated with the max shift held
  fixed (the value does not depend on it), so every gradient reads shifted exponentials only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits, _process_limits
from sympy.printing.precedence import PRECEDENCE_TRADITIONAL

from ..errors import ComplexityError, DefinitionError, NonDifferentiableError, UnboundSymbolError
from . import conditions as cond
from .bounds import MAX_TERMS, check_derivatives, check_size, is_zero
from .conditions import indicator, refold_indicators, split_indicators
from .derive import Printouts
from .parse import as_expression
from .spec import bind_constants, check_name, check_piecewise, fresh_name
from .stabilize import Rewrite, stabilize

Range = tuple[sp.Expr, sp.Expr]  # inclusive (low, high)


def _unfolded(cls: type, function: object, symbols: tuple[object, ...]) -> sp.Expr:
    """A reduction built without SymPy's ``piecewise_fold``, which pulls a ``Piecewise`` out
    of an inner ``Sum`` even when its condition reads that sum's index (the index escapes)."""
    function = sp.sympify(function)
    assert isinstance(function, sp.Expr)
    limits, orientation = _process_limits(*symbols, discrete=True)
    if any(len(limit) != 3 for limit in limits):
        raise ValueError(f"{cls.__name__} requires values for lower and upper bounds")
    obj = sp.Expr.__new__(cls)
    obj._args = (orientation * function, *limits)
    obj.is_commutative = function.is_commutative
    return obj


class IndexSum(sp.Sum):
    """A ``Sum`` in index notation: prints and evaluates as ``Sum``; keeps a ``Piecewise`` in
    its body where it is (see :func:`_unfolded`)."""

    def __new__(cls, function: object, *symbols: object, **assumptions: object) -> sp.Expr:
        return _unfolded(cls, function, symbols)


# Printers look precedences up by class name: an IndexSum is parenthesized as a Sum is (its
# square prints as (Σ ...)², not Σ ...²).
PRECEDENCE_TRADITIONAL.setdefault("IndexSum", PRECEDENCE_TRADITIONAL["Sum"])


class ReduceMax(ExprWithLimits):
    """``max`` of ``body`` over an index range: ``ReduceMax(f(j), (j, lo, hi))``.

    Introduced only by stabilization (the max shift of log-sum-exp), never differentiated.
    """

    def __new__(cls, function: object, *symbols: object, **assumptions: object) -> sp.Expr:
        return _unfolded(cls, function, symbols)

    def _eval_is_real(self) -> bool | None:
        return self.function.is_real


def index_sums(expr: sp.Expr) -> sp.Expr:
    """Every ``Sum`` of ``expr`` as an :class:`IndexSum`."""
    return expr.replace(
        lambda e: type(e) is sp.Sum,
        lambda e: IndexSum(e.function, *e.limits),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class TensorSpec:
    """A validated tensor op (see the module docstring).

    ``out`` are the output's index symbols, ``ranges`` the inclusive range of every free index,
    ``dims`` the dim symbols, bound from the arrays' shapes at call time.
    """

    name: str
    expr: sp.Expr
    out: tuple[sp.Symbol, ...]
    inputs: tuple[sp.IndexedBase, ...]
    dims: tuple[sp.Symbol, ...]
    ranges: tuple[tuple[sp.Symbol, Range], ...]
    constants: tuple[tuple[str, float], ...]
    wrt: tuple[sp.IndexedBase, ...] = ()  # the inputs that get a gradient
    #: a dim that stands for any number of leading axes (flattened into one at call time)
    batch: sp.Symbol | None = None

    @property
    def index_inputs(self) -> tuple[sp.IndexedBase, ...]:
        """Integer tensors (``IndexedBase(..., integer=True)``): token ids, labels — subscripts
        of other tensors, read as integers, never differentiated."""
        return tuple(b for b in self.inputs if b.is_integer)

    @property
    def out_shape(self) -> tuple[sp.Expr, ...]:
        r = dict(self.ranges)
        return tuple(r[i][1] - r[i][0] + 1 for i in self.out)

    @property
    def key(self) -> str:
        text = "|".join(
            [
                "tensor",
                self.name,
                sp.srepr(self.expr),
                sp.srepr(self.out),
                sp.srepr(self.ranges),
                sp.srepr(tuple((b.label, b.shape, bool(b.is_integer)) for b in self.inputs)),
                repr(self.constants),
                repr([str(b.label) for b in self.wrt]),
                f"batch={self.batch}",
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()


def index_sum(body: sp.Expr, *indices: sp.Symbol) -> sp.Expr:
    """``Sum`` over ``indices`` with bounds inferred from where they index a declared tensor.

    >>> import sympy as sp
    >>> j, b = sp.symbols("j b", integer=True)
    >>> N, B = sp.symbols("N B", integer=True, positive=True)
    >>> X = sp.IndexedBase("X", shape=(B, N))
    >>> index_sum(X[b, j], j)
    Sum(X[b, j], (j, 0, N - 1))
    """
    ranges = _infer_ranges(body, "index_sum")
    limits = []
    for index in indices:
        if index not in ranges:
            raise DefinitionError(
                f"index_sum: index {index} does not index any tensor of shape-declared "
                f"IndexedBase in {body}; give explicit bounds with "
                f"sympy.Sum(body, ({index}, 0, n - 1))"
            )
        lo, hi = ranges[index]
        limits.append((index, lo, hi))
    return sp.Sum(body, *limits)


def _infer_ranges(expr: sp.Expr, op: str) -> dict[sp.Symbol, Range]:
    """The range of every index symbol used directly as a tensor subscript."""
    ranges: dict[sp.Symbol, Range] = {}
    seen_in: dict[sp.Symbol, sp.Indexed] = {}
    for access in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
        shape = access.base.shape
        if shape is None:
            raise DefinitionError(
                f"op {op!r}: tensor {access.base} has no declared shape; declare it with "
                f"sympy.IndexedBase({str(access.base.label)!r}, shape=(B, N))"
            )
        if len(shape) != len(access.indices):
            raise DefinitionError(
                f"op {op!r}: {access} uses {len(access.indices)} indices but "
                f"{access.base} has {len(shape)} dims {tuple(shape)}"
            )
        for index, dim in zip(access.indices, shape, strict=True):
            fractional = any(r.q != 1 for r in index.atoms(sp.Rational))
            if (
                index.is_integer is False
                or index.atoms(sp.Float)
                or (fractional and index.is_integer is not True)
            ):
                raise DefinitionError(
                    f"op {op!r}: {access} reads position {index} of {access.base}, which is not "
                    "an integer; subscripts are integers (integer index symbols and constants)"
                )
            if isinstance(index, sp.Symbol):
                new = (sp.S.Zero, dim - 1)
                if index in ranges and not is_zero(ranges[index][1] - new[1]):
                    raise DefinitionError(
                        f"op {op!r}: index {index} runs over dim {ranges[index][1] + 1} in "
                        f"{seen_in[index]} but over dim {dim} in {access}; use separate indices"
                    )
                ranges.setdefault(index, new)
                seen_in.setdefault(index, access)
    return ranges


def _check_names(
    op: str,
    formula: sp.Expr,
    inputs: tuple[sp.IndexedBase, ...],
    out: tuple[sp.Symbol, ...],
    dims: list[sp.Symbol],
) -> None:
    """One name, one symbol: two different symbols (say ``j`` declared integer and ``j``
    declared real) spelled alike would be one variable in the kernels and in printouts.

    Any name is usable otherwise: the generated code mangles every user name
    (:mod:`symgrad.codegen.names`), so ``range``, ``out``, ``np`` or ``x`` beside ``x_a`` are fine.
    """
    labels = {b.label for b in inputs}
    symbols = {s for s in formula.atoms(sp.Symbol) if s not in labels} | set(out) | set(dims)
    by_name: dict[str, sp.Symbol] = {}
    for s in sorted(symbols, key=sp.default_sort_key):
        other = by_name.setdefault(s.name, s)
        if other != s:
            raise DefinitionError(
                f"op {op!r}: the name {s.name!r} belongs to two different symbols "
                f"({other!r} with {_assumptions(other)}, {s!r} with {_assumptions(s)}); "
                "use one symbol, or rename one of them"
            )


def _assumptions(s: sp.Symbol) -> str:
    shown = {k: v for k, v in s.assumptions0.items() if k in ("integer", "positive", "real")}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "no assumptions"


def _fresh_indices(base: sp.IndexedBase, taken: set[str]) -> tuple[sp.Symbol, ...]:
    """Summation-free indices ``k0_X, k1_X...`` over ``base``'s axes, renamed (``k0_X_1``...)
    when the formula already uses the name."""
    indices = []
    for n in range(len(base.shape)):
        name = f"k{n}_{base.label}"
        suffix = 0
        while name in taken:
            suffix += 1
            name = f"k{n}_{base.label}_{suffix}"
        taken.add(name)
        indices.append(sp.Symbol(name, integer=True))
    return tuple(indices)


def _real(base: sp.IndexedBase) -> sp.IndexedBase:
    """A float tensor's base declared real (its elements are real numbers, as the inputs of an
    elementwise op are), so ``Abs``, ``sign`` and ``Max`` of an element differentiate on the
    real line."""
    if base.is_integer or base.is_real:
        return base
    return sp.IndexedBase(str(base.label), shape=base.shape, real=True)


def tensor_spec(
    expr: object,
    out: Iterable[sp.Symbol],
    inputs: Iterable[sp.IndexedBase],
    name: str,
    constants: Mapping[sp.Symbol | str, object] | None = None,
    wrt: Iterable[sp.IndexedBase | str] | None = None,
    out_shape: Iterable[object] | None = None,
    batch: sp.Symbol | None = None,
) -> TensorSpec:
    """Validate a tensor-op definition and return its :class:`TensorSpec`.

    ``wrt`` names the inputs that get a gradient (default: every non-integer input).
    ``out_shape`` declares the output's shape (dims or expressions of dims); without it each
    output index runs over every value at which all the tensor reads it appears in are in
    range (``l`` in ``X[b, c, l + q]`` up to ``L - K``).  A read outside its tensor (a declared
    shape larger than that: zero padding) is 0.  ``batch`` names a dim that stands for any
    number of leading axes: written once as ``X[b, j]`` over ``(B, N)``, the op takes arrays
    ``(..., N)`` (see :class:`~symgrad.runtime.tensor.TensorOp`).
    """
    name = check_name(name)
    formula = as_expression(expr, f"op {name!r}: the formula", strings=False)
    if not isinstance(formula, sp.Expr):
        raise DefinitionError(
            f"op {name!r}: the formula must be a SymPy expression, got {formula!r}"
        )
    out = tuple(out)
    inputs = tuple(inputs)
    if not inputs:
        raise DefinitionError(f"op {name!r}: give at least one input tensor in inputs=[...]")
    for base in inputs:
        if not isinstance(base, sp.IndexedBase):
            raise DefinitionError(
                f"op {name!r}: input {base!r} is not a sympy.IndexedBase; declare tensors with "
                "sympy.IndexedBase('X', shape=(B, N))"
            )
        if base.shape is None:
            raise DefinitionError(
                f"op {name!r}: input tensor {base} has no shape; declare it with "
                f"sympy.IndexedBase({str(base.label)!r}, shape=(B, N))"
            )
    if all(b.is_integer for b in inputs):
        raise DefinitionError(
            f"op {name!r}: every input is an integer tensor; give at least one float tensor "
            "(its dtype is the output's)"
        )
    labels = [str(b.label) for b in inputs]
    if len(set(labels)) != len(labels):
        raise DefinitionError(f"op {name!r}: input tensor names repeat: {labels}")
    for index in out:
        if not isinstance(index, sp.Symbol):
            raise DefinitionError(f"op {name!r}: output index {index!r} is not a Symbol")
    if len(set(out)) != len(out):
        raise DefinitionError(f"op {name!r}: output indices repeat: {out}")
    used = {str(a.base.label) for a in formula.atoms(sp.Indexed)}
    unknown = sorted(used - set(labels))
    if unknown:
        raise UnboundSymbolError(
            f"op {name!r}: tensor(s) {unknown} are used but not declared in inputs=[...] ({labels})"
        )

    dims = sorted({s for b in inputs for d in b.shape for s in sp.sympify(d).free_symbols}, key=str)
    formula, bound = bind_constants(
        formula, constants, reserved=[*labels, *(str(i) for i in out), *(str(d) for d in dims)]
    )
    _check_names(name, formula, inputs, out, dims)
    check_piecewise(name, formula)
    real = {b: _real(b) for b in inputs}
    formula = formula.xreplace(real)
    inputs = tuple(real[b] for b in inputs)
    _infer_ranges(formula, name)  # every read well-formed; a plain index over one dim
    ranges = _out_ranges(name, formula, out, dims, out_shape)
    formula = guard_reads(name, formula, ranges)
    free = {s for s in formula.free_symbols if not isinstance(s, sp.Indexed)}
    free -= {b.label for b in inputs}
    free -= set(dims)
    loose = sorted(str(s) for s in free - set(out))
    if loose:
        raise UnboundSymbolError(
            f"op {name!r}: symbol(s) {loose} are free in the formula but are neither output "
            f"indices ({[str(i) for i in out]}), dims ({[str(d) for d in dims]}) nor bound "
            "constants; sum over them, add them to out=(...), or bind them with constants={...}"
        )
    return TensorSpec(
        name,
        formula,
        out,
        inputs,
        tuple(dims),
        tuple((i, ranges[i]) for i in out),
        bound,
        _check_wrt(name, inputs, wrt),
        _check_batch(name, batch, inputs, out, ranges),
    )


def _check_batch(
    op: str,
    batch: sp.Symbol | None,
    inputs: tuple[sp.IndexedBase, ...],
    out: tuple[sp.Symbol, ...],
    ranges: Mapping[sp.Symbol, Range],
) -> sp.Symbol | None:
    """The batch dim: the first axis, and only that, of the tensors that have it; the range of
    the output's first index when the output has it."""
    if batch is None:
        return None
    hint = (
        f"op {op!r}: batch={batch} stands for any number of leading axes, so it must be the "
        "first axis of every tensor that has it, used nowhere else"
    )
    if not isinstance(batch, sp.Symbol):
        raise DefinitionError(f"{hint}; give the dim symbol itself, got {batch!r}")
    carriers = 0
    for base in inputs:
        shape = [sp.sympify(d) for d in base.shape]
        if any(batch in d.free_symbols for d in shape[1:]) or (
            shape and batch in shape[0].free_symbols and shape[0] != batch
        ):
            raise DefinitionError(f"{hint}; {base} has shape {tuple(shape)}")
        carriers += bool(shape) and shape[0] == batch
    if not carriers:
        raise DefinitionError(f"{hint}; no input has it")
    for n, index in enumerate(out):
        lo, hi = ranges[index]
        if batch in hi.free_symbols and (n != 0 or (lo, hi) != (0, batch - 1)):
            raise DefinitionError(f"{hint}; the output's indices {out} must start with it")
    return batch


def _out_ranges(
    op: str,
    formula: sp.Expr,
    out: tuple[sp.Symbol, ...],
    dims: list[sp.Symbol],
    out_shape: Iterable[object] | None,
) -> dict[sp.Symbol, Range]:
    """The range of every output index: from the declared ``out_shape``, else inferred."""
    if out_shape is not None:
        shape = tuple(sp.sympify(d) for d in out_shape)
        if len(shape) != len(out):
            raise DefinitionError(
                f"op {op!r}: out_shape {shape} has {len(shape)} dims but out has "
                f"{len(out)} indices {out}"
            )
        for d in shape:
            if not isinstance(d, sp.Expr) or not d.free_symbols <= set(dims) or not d.is_integer:
                raise DefinitionError(
                    f"op {op!r}: out_shape entry {d} must be an integer expression of the "
                    f"inputs' dims {[str(x) for x in dims]}"
                )
        return {i: (sp.S.Zero, d - 1) for i, d in zip(out, shape, strict=True)}
    ranges: dict[sp.Symbol, Range] = {}
    for index in out:
        highs = _index_upper_bounds(formula, index, {}, frozenset(dims))
        if not highs:
            raise DefinitionError(
                f"op {op!r}: output index {index} does not index any input tensor, so its "
                "range is unknown; index a tensor with it or declare out_shape=(...)"
            )
        hi = sp.Min(*highs)
        if isinstance(hi, sp.Min):
            raise DefinitionError(
                f"op {op!r}: output index {index} reads tensors up to "
                f"{' and '.join(map(str, highs))}, which do not compare; use separate indices "
                "or declare out_shape=(...)"
            )
        ranges[index] = (sp.S.Zero, hi)
    return ranges


def _index_upper_bounds(
    expr: sp.Basic, index: sp.Symbol, known: dict[sp.Symbol, Range], dims: frozenset[sp.Symbol]
) -> list[sp.Expr]:
    """The largest value of ``index`` at which each read ``X[..., a·index + r, ...]`` stays
    within its axis, ``r`` ranging over the summation indices around the read."""
    if isinstance(expr, (sp.Sum, ReduceMax)):
        inner = {**known, **{v: (lo, hi) for v, lo, hi in expr.limits}}
        return _index_upper_bounds(expr.function, index, inner, dims)
    if isinstance(expr, sp.Indexed):
        highs = []
        for position, dim in zip(expr.indices, expr.base.shape, strict=True):
            highs += _index_upper_bounds(position, index, known, dims)
            found = cond.linear_coefficient(position, index)
            if found is None or not found[0].is_Integer or found[0] < 0:
                continue
            a, r = found
            iv = cond.interval(r, known)
            if iv is None or not iv[1].free_symbols <= dims:
                continue  # r depends on another free index: no bound of this one alone
            hi = (dim - 1 - iv[1]) if a == 1 else sp.floor((dim - 1 - iv[1]) / a)
            highs.append(sp.expand(hi))
        return highs
    bounds: list[sp.Expr] = []
    for arg in expr.args:
        bounds += _index_upper_bounds(arg, index, known, dims)
    return bounds


def guard_reads(op: str, expr: sp.Expr, out_ranges: Mapping[sp.Symbol, Range]) -> sp.Expr:
    """A float tensor read whose position may fall outside its axis reads 0 there: it becomes
    ``X[..]·[0 ≤ position ≤ dim - 1]`` (zero padding)."""

    def visit(node: sp.Basic, known: dict[sp.Symbol, Range]) -> sp.Basic:
        if isinstance(node, (sp.Sum, ReduceMax)):
            inner = {**known, **{v: (lo, hi) for v, lo, hi in node.limits}}
            return type(node)(visit(node.function, inner), *node.limits)
        if isinstance(node, sp.Indexed):
            conds = []
            for position, dim in zip(node.indices, node.base.shape, strict=True):
                if not reads_integer_tensor(position):
                    conds += cond.range_conditions(position, (sp.S.Zero, dim - 1), known)
            if conds and node.base.is_integer:
                raise DefinitionError(
                    f"op {op!r}: the integer tensor read {node} may fall outside its shape "
                    f"{tuple(node.base.shape)}; read integer tensors within their axes"
                )
            return node * sp.Mul(*[indicator(c) for c in conds]) if conds else node
        if not node.args or isinstance(node, sp.IndexedBase):
            return node
        args = [visit(a, known) for a in node.args]
        return node.func(*args) if args != list(node.args) else node

    return visit(expr, dict(out_ranges))


def _check_wrt(
    op: str, inputs: tuple[sp.IndexedBase, ...], wrt: Iterable[sp.IndexedBase | str] | None
) -> tuple[sp.IndexedBase, ...]:
    floats = [b for b in inputs if not b.is_integer]
    if wrt is None:
        return tuple(floats)
    chosen = list(wrt)
    labels = {str(b.label): b for b in inputs}
    for w in chosen:
        label = str(getattr(w, "label", w))
        if label not in labels:
            raise DefinitionError(
                f"op {op!r}: wrt names {w!r}, which is not an input ({sorted(labels)})"
            )
        if labels[label].is_integer:
            raise DefinitionError(
                f"op {op!r}: wrt names the integer tensor {label!r}; integer tensors (indices, "
                "labels) have no gradient"
            )
    names = {str(getattr(w, "label", w)) for w in chosen}
    if len(names) != len(chosen):
        raise DefinitionError(f"op {op!r}: wrt repeats an input: {chosen}")
    return tuple(b for b in floats if str(b.label) in names)


# -- contraction ---------------------------------------------------------------------------


def _delta_solution(delta: sp.KroneckerDelta, var: sp.Symbol) -> sp.Expr | None:
    """The value of ``var`` at which ``delta`` is 1 — ``k`` for ``δ(var, k)``, ``k - q`` for
    ``δ(k, var + q)`` — or None when ``delta`` does not pin ``var`` to one value."""
    a, b = delta.args
    if var not in (a - b).free_symbols:
        return None
    if any(var in x.free_symbols for x in (a - b).atoms(sp.Indexed)):
        return None  # δ(k, ids[var]): a scatter, not a contraction over var
    found = cond.linear_coefficient(a - b, var)
    if found is None or abs(found[0]) != 1:
        return None
    coeff, rest = found
    return -rest / coeff


def _contract_term(
    term: sp.Expr,
    var: sp.Symbol,
    rng: Range,
    ranges: dict[sp.Symbol, Range],
    defer: frozenset[sp.Symbol] = frozenset(),
    tighten: bool = False,
) -> sp.Expr:
    """``Σ_var term`` for one product ``term``: contract a delta, or pull out what is constant.

    ``Σ_{var=lo}^{hi} δ(var, k)·f(var) = [lo ≤ k ≤ hi]·f(k)``; the range test is left out
    where ``k``'s range provably lies within ``lo..hi`` (see :mod:`.conditions`).  With
    ``tighten``, the indicator conditions on ``var`` that are linear inequalities become its
    bounds (only once every delta is gone: a bound that reads another summation index would
    stop the interchange of sums below).

    A delta that another index of ``defer`` (a summation index further out) could remove as
    well is left for that index: ``Σ_p g[p]·Σ_q W[q]·δ(k, p + q)`` becomes
    ``Σ_q W[q]·g[k - q]``, the convolution's own offsets kept and the output positions
    eliminated — the transposed
    convolution as a sum over the kernel.  Reaching into an inner sum's body for it is the
    interchange ``Σ_p Σ_q = Σ_q Σ_p``.
    """
    factors = sp.Mul.make_args(term)
    for f in factors:
        if not isinstance(f, sp.KroneckerDelta):
            continue
        value = _delta_solution(f, var)
        if value is None or _left_for_later(f, value, defer):
            continue
        # Σ_k f(k)·δ(k, ids[b]) = f(ids[b]): an integer tensor's values are checked, at
        # call time, to lie within the axis they index
        tests = [] if reads_integer_tensor(value) else cond.range_conditions(value, rng, ranges)
        rest = sp.Mul(*[g for g in factors if g is not f])
        return rest.xreplace({var: value}) * sp.Mul(*[indicator(c) for c in tests])
    for f in factors:
        if isinstance(f, sp.Sum) and _holds_delta_for(f, var, defer):
            rest = sp.Mul(*[g for g in factors if g is not f])
            inner = sp.Add(
                *[_contract_term(t, var, rng, ranges, defer) for t in _terms(rest * f.function)]
            )
            return _sum_terms(inner, f.limits, ranges, defer)
    conds, rest = split_indicators(term)
    if tighten:
        settled = cond.settle(conds, ranges)
        if settled is None:
            return sp.S.Zero  # a condition that never holds
        rng, conds = cond.tighten(var, rng, settled, ranges)
        if cond.provably_le(rng[1] + 1, rng[0], ranges):
            return sp.S.Zero  # an empty range
    factors = (*sp.Mul.make_args(rest), *[indicator(c) for c in conds])
    inside = [f for f in factors if var in f.free_symbols]
    outside = [f for f in factors if var not in f.free_symbols]
    if not inside:
        return sp.Mul(*outside) * cond.count(rng, ranges)
    return sp.Mul(*outside) * IndexSum(sp.Mul(*inside), (var, rng[0], rng[1]))


def _holds_delta_for(total: sp.Sum, var: sp.Symbol, defer: frozenset[sp.Symbol]) -> bool:
    """Whether ``total``'s body has a delta that fixes ``var`` and whose bounds let the sums be
    interchanged (they do not read ``var``)."""
    if any(var in lo.free_symbols | hi.free_symbols for _, lo, hi in total.limits):
        return False
    return any(
        (value := _delta_solution(d, var)) is not None and not _left_for_later(d, value, defer)
        for d in total.function.atoms(sp.KroneckerDelta)
    )


def _left_for_later(
    delta: sp.KroneckerDelta, value: sp.Expr, defer: frozenset[sp.Symbol]
) -> bool:
    """Whether an index further out (in ``defer``) can remove ``delta`` too: it is left to it."""
    return any(_delta_solution(delta, w) is not None for w in value.free_symbols & defer)


def _sum_terms(
    body: sp.Expr,
    limits: tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...],
    ranges: dict[sp.Symbol, Range],
    defer: frozenset[sp.Symbol] = frozenset(),
    tighten: bool = False,
) -> sp.Expr:
    """``Σ_limits body``, contracted limit by limit, innermost first (see :func:`contract`)."""
    for n, (var, lo, hi) in enumerate(limits):
        later = defer | {v for v, _, _ in limits[n + 1 :]}
        body = sp.Add(
            *[_contract_term(t, var, (lo, hi), ranges, later, tighten) for t in _terms(body)]
        )
    return body


def tighten_bounds(expr: sp.Expr, ranges: Mapping[sp.Symbol, Range]) -> sp.Expr:
    """Conditions on summation indices as bounds: ``Σ_{u=0}^{S-1} [u ≤ s]·f(u)`` →
    ``Σ_{u=0}^{s} f(u)`` (a triangle), the same for a ``ReduceMax`` over the kept terms;
    conditions that provably hold are dropped, products under one that never holds are 0."""
    known = dict(ranges)

    def visit(node: sp.Basic) -> sp.Basic:
        if isinstance(node, (sp.Sum, ReduceMax)):
            for var, lo, hi in node.limits:
                known[var] = (lo, hi)
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        if isinstance(node, sp.Sum):
            return _sum_terms(node.function, node.limits, known, tighten=True)
        if isinstance(node, ReduceMax) and len(node.limits) == 1:
            return _tighten_max(node, known)
        if isinstance(node, sp.Mul):
            conds, rest = split_indicators(node)
            settled = cond.settle(conds, known) if conds else conds
            if settled is None:
                return sp.S.Zero
            return rest * sp.Mul(*[indicator(c) for c in settled]) if conds else node
        return node

    return visit(expr)


def merge_nested(expr: sp.Expr) -> sp.Expr:
    """``Σ_a (Σ_b f)`` as one sum over ``b, a``: the lowering orders the loops of one sum by
    memory (contraction leaves one nested sum per index it could not remove)."""

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        if isinstance(node, sp.Sum) and isinstance(node.function, sp.Sum):
            inner = node.function
            return IndexSum(inner.function, *inner.limits, *node.limits)
        return node

    return visit(expr)


def join_sums(expr: sp.Expr) -> sp.Expr:
    """``c·Σ_j f + d·Σ_j g`` (the same limits, numbers ``c``, ``d``) as ``Σ_j (c·f + d·g)``.

    :func:`tighten_bounds` contracts a sum term by term, so ``Σ_j (X + R)`` comes out as
    ``Σ_j X + Σ_j R``: two reductions, each a pass over the row (a residual layer norm's mean).
    Sums whose ranges came out the same are added back into one.  A sum that a BLAS call may
    take (its body a product of two or more tensors read along the summation indices) is left
    on its own: joined, it would be a loop.
    """

    def contraction(total: sp.Sum) -> bool:
        along = {v for v, _, _ in total.limits}
        reads = [
            f
            for f in sp.Mul.make_args(total.function)
            if f.as_base_exp()[0].has(sp.Indexed) and f.free_symbols & along
        ]
        return len(reads) > 1

    def joined(node: sp.Add) -> sp.Expr:
        groups: dict[tuple, list[tuple[sp.Expr, sp.Sum]]] = {}
        rest = []
        for term in node.args:
            coeff, total = term.as_coeff_Mul()
            own = [v for v, _, _ in total.limits] if type(total) in (sp.Sum, IndexSum) else []
            bounds = {s for _, lo, hi in getattr(total, "limits", ()) for s in (lo, hi)}
            if own and not contraction(total) and not set(own) & sp.Tuple(*bounds).free_symbols:
                ranges = tuple((lo, hi) for _, lo, hi in total.limits)
                groups.setdefault(ranges, []).append((coeff, total))
            else:
                rest.append(term)
        for group in groups.values():
            first = group[0][1]
            names = [v for v, _, _ in first.limits]
            kept, body = [], []
            for coeff, total in group:
                own = [v for v, _, _ in total.limits]
                inner = total.function.atoms(sp.Sum, ReduceMax)
                bound = {v for nested in inner for v, _, _ in nested.limits}
                if set(names) & ((total.function.free_symbols - set(own)) | bound):
                    rest.append(coeff * total)  # a name of the first sum's taken inside
                    continue
                kept.append(coeff * total)
                body.append(coeff * total.function.xreplace(dict(zip(own, names, strict=True))))
            rest += [IndexSum(sp.Add(*body), *first.limits)] if len(body) > 1 else kept
        return sp.Add(*rest)

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        return joined(node) if isinstance(node, sp.Add) else node

    return visit(expr)


def _tighten_max(node: ReduceMax, known: dict[sp.Symbol, Range]) -> sp.Expr:
    """``max_u`` of ``Piecewise((f, c), (-oo, True))``: the conditions of ``c`` on ``u`` as
    its bounds."""
    ((var, lo, hi),) = node.limits
    body = node.function
    if not (isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1].expr == -sp.oo):
        return node
    f, c = body.args[0]
    (lo, hi), left = cond.tighten(var, (lo, hi), cond.conjuncts(c), known)
    kept = sp.Piecewise((f, sp.And(*left)), (-sp.oo, True)) if left else f
    return ReduceMax(kept, (var, lo, hi))


def _splits(f: sp.Expr) -> bool:
    """Whether a factor must be multiplied out for contraction: a sum holding a delta, or a
    ``Piecewise`` holding a delta or deciding on indices (its branches become indicator terms,
    so the delta can be contracted and the index condition can become a bound)."""
    if isinstance(f, sp.Add):
        return f.has(sp.KroneckerDelta)
    if isinstance(f, sp.Piecewise) and cond.indicator_condition(f) is None:
        return f.has(sp.KroneckerDelta) or any(
            c != sp.true and not cond.reads_float(c) for _, c in f.args
        )
    return False


def _terms(expr: sp.Expr, op: str = "", limit: int = MAX_TERMS) -> list[sp.Expr]:
    """Additive terms of ``expr``, distributing products over the factors that hold a delta.

    Only a factor with a ``KroneckerDelta`` in it (or a ``Piecewise`` on indices, see
    :func:`_splits`) is multiplied out: the delta must stand alone in a product to be
    contracted.  Every other factor keeps its form — expanding ``g·w·(X - mean)`` into
    ``g·w·X - g·w·mean`` would turn layer norm's centered sums into differences of large sums,
    which cancel catastrophically when the mean is large.

    A product of sums multiplies out into exponentially many terms: more than ``limit`` is a
    :class:`~symgrad.errors.ComplexityError`.
    """
    terms: list[sp.Expr] = []
    pending = list(reversed(sp.Add.make_args(expr)))
    while pending:  # depth-first, in the order of the terms
        term = pending.pop()
        factors = sp.Mul.make_args(term)
        for n, f in enumerate(factors):
            if _splits(f):
                rest = sp.Mul(*factors[:n], *factors[n + 1 :])
                parts = sp.Add.make_args(f if isinstance(f, sp.Add) else cond.as_indicator_terms(f))
                pending.extend(
                    reversed([t for part in parts for t in sp.Add.make_args(rest * part)])
                )
                break
        else:
            terms.append(term)
        if len(terms) + len(pending) > limit:
            raise ComplexityError(
                f"op {op!r}: the Kronecker-delta contraction multiplies a gradient out into more "
                f"than {limit:,} terms (symgrad.symbolic.bounds.MAX_TERMS); split the formula "
                "into smaller ops"
            )
    return terms


def rename_bound(expr: sp.Expr) -> sp.Expr:
    """Give every ``Sum``/``ReduceMax`` its own summation symbols (``j`` → ``j_1``, ``j_2``...).

    SymPy lets nested sums reuse a name (layer norm's variance sums over ``j`` around a mean
    that also sums over ``j``); contraction substitutes indices, so names must not collide.
    """
    counter = [0]
    taken = {s.name for s in expr.atoms(sp.Symbol)}  # a free ``j_1`` must not be captured

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        if isinstance(node, (sp.Sum, ReduceMax)):
            body = args[0]
            limits: list[tuple[sp.Expr, sp.Expr, sp.Expr]] = []
            for var, lo, hi in node.limits:
                stem = str(var).split("_")[0] or str(var)
                while True:
                    counter[0] += 1
                    name = f"{stem}_{counter[0]}"
                    if name not in taken:
                        break
                taken.add(name)
                fresh = sp.Symbol(name, integer=True)
                body = body.xreplace({var: fresh})
                # a later limit's bounds may use this index (Σ_{j} Σ_{i=0}^{j})
                to_fresh = {var: fresh}
                limits = [(v, a.xreplace(to_fresh), z.xreplace(to_fresh)) for v, a, z in limits]
                limits.append((fresh, lo, hi))
            return type(node)(body, *limits)
        return node.func(*args) if args != list(node.args) else node

    return visit(expr)


def contract(
    expr: sp.Expr, ranges: Mapping[sp.Symbol, Range], tighten: bool = True, op: str = ""
) -> sp.Expr:
    """Remove Kronecker deltas from ``expr`` by contracting the sums that bind them.

    ``ranges`` gives the range of every free index; a delta ``δ(j, k)`` (or ``δ(j + q, k)``)
    under ``Σ_j`` is contracted, leaving the test that ``k`` (``k - q``) lies in ``j``'s range
    where that range does not provably hold it.  Sums are distributed over the terms of their
    bodies, constant factors pulled out, sums of constants become counts; at the end (with
    ``tighten``) conditions on a summation index become its bounds (:func:`tighten_bounds`).
    """
    known = dict(ranges)
    expr = rename_bound(expr)
    enclosing: list[sp.Symbol] = []  # the indices of the sums around the node visited

    def visit(node: sp.Basic) -> sp.Basic:
        if isinstance(node, sp.Sum):
            # Every bound name is unique (rename_bound), so the ranges of this sum's indices
            # can be known before its body is visited: a delta between an inner and an outer
            # summation index (Σ_i Σ_j δ(i, j) f(i, j)) contracts too.
            own = [var for var, _, _ in node.limits]
            for var, lo, hi in node.limits:
                known[var] = (lo, hi)
            outer = frozenset(enclosing)
            enclosing.extend(own)
            body = visit(node.function)
            del enclosing[len(enclosing) - len(own) :]
            return _sum_terms(body, node.limits, known, outer)
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase)):
            return node
        new_args = [visit(a) for a in node.args]
        return node.func(*new_args) if new_args != list(node.args) else node

    previous = None
    result = expr
    # Contracting can expose a delta to an outer sum, so it repeats — at most a number of
    # rounds fixed by the expression (its sums and deltas; the built-ins need two or three).
    # Every round is an identity: stopping at the cap would leave deltas for guard_deltas
    # (index tests in the kernel), never a wrong result.
    rounds = len(expr.atoms(sp.Sum)) + len(expr.atoms(sp.KroneckerDelta)) + 2
    while result != previous and rounds > 0:
        previous, result = result, visit(result)
        rounds -= 1
        check_size(result, op, "the Kronecker-delta contraction")
    if tighten:
        result = tighten_bounds(result, known)
    return unify_bound(result)


def unify_bound(expr: sp.Expr) -> sp.Expr:
    """Write reductions that are equal up to the names of their indices as one expression.

    Contraction copies a sum into several terms under different index names; made equal,
    ``Σ_j1 X[b, j1] - Σ_j2 X[b, j2]`` cancels to 0 and printouts show each sum once.
    """
    seen: dict[sp.Basic, sp.Basic] = {}

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        if isinstance(node, (sp.Sum, ReduceMax)):
            return seen.setdefault(_alpha_canonical(node), node)
        return node

    return visit(expr)


_BOUND: dict[tuple[int, int], sp.Dummy] = {}


def _bound(depth: int, n: int) -> sp.Dummy:
    """The placeholder of the ``n``-th index of a reduction at ``depth`` (a Dummy: no user
    symbol, whatever its name, is ever taken for it)."""
    if (depth, n) not in _BOUND:
        _BOUND[depth, n] = sp.Dummy(f"bound{depth}_{n}", integer=True)
    return _BOUND[depth, n]


def _alpha_canonical(node: sp.Basic, depth: int = 0) -> sp.Basic:
    """``node`` with every bound index named by its binder's depth (:func:`_bound`): equal for
    reductions equal up to index names, nested ones included.  Sibling reductions share names;
    their scopes do not overlap."""
    if isinstance(node, (sp.Sum, ReduceMax)):
        names = {v: _bound(depth, n) for n, (v, *_) in enumerate(node.limits)}
        body = _alpha_canonical(node.function.xreplace(names), depth + 1)
        limits = [(names[v], lo.xreplace(names), hi.xreplace(names)) for v, lo, hi in node.limits]
        return type(node)(body, *limits)
    if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
        return node
    args = [_alpha_canonical(a, depth) for a in node.args]
    return node.func(*args) if args != list(node.args) else node


def reads_integer_tensor(expr: sp.Basic) -> bool:
    """Whether ``expr`` reads an integer tensor (``ids[b, t]``)."""
    return any(a.base.is_integer for a in expr.atoms(sp.Indexed))


def is_scatter_delta(delta: sp.KroneckerDelta) -> bool:
    """``δ(k, ids[b, t])``: a gradient index equal to a gathered position.  It stays a delta:
    the lowering turns ``Σ_{b,t} f·δ(k, ids[b, t])`` into a scatter-add over ``b, t``."""
    return any(reads_integer_tensor(a) for a in delta.args)


def guard_deltas(expr: sp.Expr) -> tuple[sp.Expr, tuple[Rewrite, ...]]:
    """Deltas that :func:`contract` must keep become ``Piecewise((1, Eq(a, b)), (0, True))``.

    What is left is a delta between two free indices (``Y[i] = A[i, i]`` gives
    ``grad_A[k0, k1] = δ(k0, k1)·grad_Y[k0]``) or one whose ranges differ; the compiled code
    tests the indices for equality.
    """
    deltas = sorted(
        (d for d in expr.atoms(sp.KroneckerDelta) if not is_scatter_delta(d)),
        key=sp.default_sort_key,
    )
    if not deltas:
        return expr, ()
    guards = {d: sp.Piecewise((sp.S.One, sp.Eq(*d.args)), (sp.S.Zero, True)) for d in deltas}
    return expr.xreplace(guards), tuple(
        Rewrite("delta_guard", "a delta that cannot be contracted is an index test", d, g)
        for d, g in guards.items()
    )


# -- derivation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorPartial:
    """The VJP of one input: ``grad_<input>[indices] = expr``."""

    wrt: sp.IndexedBase
    indices: tuple[sp.Symbol, ...]
    raw: sp.Expr  # Σ_out grad_out[out] · ∂Y/∂X[k], before contraction
    contracted: sp.Expr
    final: sp.Expr
    rewrites: tuple[Rewrite, ...]


@dataclass(frozen=True)
class TensorDerivation(Printouts):
    """Everything symgrad derived for a tensor op."""

    name: str
    spec: TensorSpec
    grad_output: sp.Expr  # grad_out[out...], or a scalar symbol for a 0-d output
    stable_forward: sp.Expr
    forward_rewrites: tuple[Rewrite, ...]
    partials: tuple[TensorPartial, ...]
    saved: Any = None  # a SavedForm (symbolic.residuals imports this module)

    def __str__(self) -> str:
        return self.to_text()


def _shift_logsumexp(expr: sp.Expr) -> tuple[sp.Expr, list[Rewrite]]:
    """``Σ_j exp(f)`` → ``exp(M)·Σ_j exp(f - M)`` with ``M = max_j f``; logs and ratios follow.

    The max runs over the terms the sum keeps: over its bounds, and only where the conditions
    of its indicators hold (a masked-out score never sets the shift).  A sum whose exponent is
    already shifted is left alone.
    """
    log: list[Rewrite] = []
    taken = set(expr.atoms(sp.Symbol))

    def shift(node: sp.Sum) -> sp.Expr:
        if len(node.limits) != 1:
            return node
        body = sp.powsimp(node.function, combine="exp")
        if isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1] == (0, True):
            body = body.args[0].expr * indicator(body.args[0].cond)  # Piecewise((e, c), (0, True))
        conds, body = split_indicators(body)
        exps = [f for f in sp.Mul.make_args(body) if isinstance(f, sp.exp)]
        if len(exps) != 1 or exps[0].has(ReduceMax):
            return node
        (e,) = exps
        rest = sp.Mul(*[f for f in sp.Mul.make_args(body) if f is not e])
        rest *= sp.Mul(*[indicator(c) for c in conds])
        var, lo, hi = node.limits[0]
        kept = sp.Piecewise((e.args[0], sp.And(*conds)), (-sp.oo, True)) if conds else e.args[0]
        # the max gets an index of its own: it sits inside the sum, whose index it must not
        # shadow (SymPy's substitution does not respect the nested binding)
        own = sp.Symbol(f"{var}_max", integer=True)
        while own in taken:
            own = sp.Symbol(f"{own.name}_", integer=True)
        taken.add(own)
        m = ReduceMax(kept.xreplace({var: own}), (own, lo, hi))
        new = sp.exp(m) * IndexSum(sp.exp(e.args[0] - m) * rest, (var, lo, hi))
        log.append(
            Rewrite(
                "logsumexp_shift",
                "Σ exp(f)·h overflows for large f: shift by the max of f",
                node,
                new,
            )
        )
        return new

    shifted = expr.replace(lambda e: isinstance(e, sp.Sum), shift)  # type: ignore[arg-type]
    # one name per max, so exp(f + M1 - 2·M2) with M1 = M2 combines to exp(f - M)
    shifted = sp.powsimp(unify_bound(shifted), combine="exp")

    def log_of_product(node: sp.log) -> sp.Expr:
        factors = sp.Mul.make_args(node.args[0])
        exps = [f for f in factors if isinstance(f, sp.exp)]
        if not exps:
            return node
        rest = sp.Mul(*[f for f in factors if not isinstance(f, sp.exp)])
        return sp.Add(*[e.args[0] for e in exps]) + sp.log(rest)

    shifted = shifted.replace(lambda e: isinstance(e, sp.log), log_of_product)  # type: ignore[arg-type]
    return shifted, log


def stabilize_tensor(expr: sp.Expr) -> tuple[sp.Expr, tuple[Rewrite, ...]]:
    """The max shift for log-sum-exp, then the elementwise stabilization rules."""
    shifted, log = _shift_logsumexp(expr)
    result = stabilize(shifted)
    return result.expr, tuple(log) + result.rewrites


def _check_numeric(spec: TensorSpec, what: str, expr: sp.Expr) -> None:
    bad = sorted({type(a).__name__ for a in expr.atoms(sp.DiracDelta, sp.Derivative, sp.Subs)})
    if bad:
        raise NonDifferentiableError(
            f"op {spec.name!r}: {what} contains {', '.join(bad)}, which has no numeric value; "
            "write kinks with Piecewise((a, cond), (b, True))"
        )


def differentiate(expr: sp.Expr, base: sp.IndexedBase, indices: tuple[sp.Symbol, ...]) -> sp.Expr:
    """``∂expr/∂base[indices]`` by the chain rule, node by node.

    A read ``base[p]`` gives ``Π δ(p_n, k_n)``; a ``Sum`` keeps its bounds and a ``Piecewise``
    its conditions (a condition is locally constant); a ``ReduceMax`` is constant — it is only
    ever the max shift of a ``Σ exp``, whose value does not depend on it.  Functions go by their
    ``fdiff``.  (``sympy.diff`` pulls a ``Piecewise`` out of the ``Sum`` that binds its
    condition's index, which lets the index escape its sum.)
    """
    if not indices:
        return sp.diff(expr, base)
    memo: dict[sp.Basic, sp.Expr] = {}

    def depends(node: sp.Basic) -> bool:
        return any(a.base == base for a in node.atoms(sp.Indexed))

    def d(node: sp.Basic) -> sp.Expr:
        if node in memo:
            return memo[node]
        if not isinstance(node, sp.Expr) or not depends(node) or isinstance(node, ReduceMax):
            result: sp.Expr = sp.S.Zero
        elif isinstance(node, sp.Indexed):
            pairs = zip(node.indices, indices, strict=True)
            on_base = node.base == base
            result = sp.Mul(*[sp.KroneckerDelta(p, k) for p, k in pairs]) if on_base else sp.S.Zero
        elif isinstance(node, sp.Sum):
            body = d(node.function)
            result = IndexSum(body, *node.limits) if body != 0 else sp.S.Zero
        elif isinstance(node, sp.Piecewise):
            branches = [(d(e), c) for e, c in node.args]
            result = (
                sp.S.Zero if all(e == 0 for e, _ in branches) else sp.Piecewise(*branches)
            )
        elif isinstance(node, sp.Add):
            result = sp.Add(*[d(a) for a in node.args])
        elif isinstance(node, sp.Mul):
            args = node.args
            result = sp.Add(
                *[
                    sp.Mul(*args[:n], d(a), *args[n + 1 :])
                    for n, a in enumerate(args)
                    if depends(a)
                ]
            )
        elif isinstance(node, sp.Pow):
            b, e = node.args
            if not depends(e):
                result = e * b ** (e - 1) * d(b)
            else:
                result = node * (d(e) * sp.log(b) + e * d(b) / b)
        elif isinstance(node, sp.Function):
            result = sp.Add(
                *[node.fdiff(n + 1) * d(a) for n, a in enumerate(node.args) if depends(a)]
            )
        else:
            result = sp.diff(node, base[indices])
        memo[node] = result
        return result

    return d(expr)


def prepare_tensor(spec: TensorSpec) -> sp.Expr:
    """The forward as the derivation reads it: kinks with a constant (``Max(0, x)``) as
    ``Piecewise``, ``Heaviside`` of indices as conditions, a ``Piecewise`` on indices split
    into indicator terms (contraction of a formula without deltas).  Conditions stay
    indicators over full ranges here: they become bounds after differentiation
    (:func:`tighten_bounds`), where bounds that read other indices no longer stop sums from
    being interchanged."""
    from .derive import prepare

    forward = prepare(cond.heaviside_of_indices(index_sums(spec.expr)))
    # a Piecewise on indices outside every sum splits too: its exp meets the max shift's
    return sp.Add(*_terms(contract(forward, dict(spec.ranges), tighten=False)))


def derive_tensor(spec: TensorSpec) -> TensorDerivation:
    """Derive the VJP of every input of a tensor op by the symbolic chain rule.

    The forward is stabilized first (the max shift of every ``Σ exp``) and the VJPs are the
    derivatives of that stable form, so they read only shifted exponentials: finite at any
    logit, masked scores included.
    """
    forward, forward_rewrites = stabilize_tensor(
        check_size(prepare_tensor(spec), spec.name, "the formula")
    )
    out_ranges = dict(spec.ranges)
    taken = {s.name for s in forward.atoms(sp.Symbol)} | {str(d) for d in spec.dims}
    cotangent = fresh_name("grad_out", taken)  # grad_out, unless the formula uses the name
    grad_output: sp.Expr = (
        sp.IndexedBase(cotangent, shape=spec.out_shape)
        if spec.out
        else sp.Symbol(cotangent, real=True)
    )
    targets = {}
    for base in spec.wrt:
        indices = _fresh_indices(base, taken)
        targets[base] = (indices, base[indices] if indices else base)
    check_derivatives(forward, [target for _, target in targets.values()], spec.name)
    partials = []
    for base, (indices, _) in targets.items():
        ranges = {
            **out_ranges,
            **{k: (sp.S.Zero, d - 1) for k, d in zip(indices, base.shape, strict=True)},
        }
        what = f"the derivative with respect to {base}"
        local = check_size(differentiate(forward, base, indices), spec.name, what)
        chain = (grad_output[spec.out] if spec.out else grad_output) * local
        raw = IndexSum(chain, *[(i, *out_ranges[i]) for i in spec.out]) if spec.out else chain
        _check_numeric(spec, what, raw)
        contracted = contract(raw, ranges, op=spec.name)
        final, rewrites = stabilize_tensor(contracted)
        check_size(final, spec.name, f"the gradient of {base}, stabilized")
        final, guards = guard_deltas(tighten_bounds(final, ranges))
        rewrites += guards
        final = join_sums(merge_nested(refold_indicators(final)))
        partials.append(TensorPartial(base, indices, raw, contracted, final, rewrites))
    stable_forward = refold_indicators(unify_bound(tighten_bounds(forward, out_ranges)))
    stable_forward = join_sums(merge_nested(stable_forward))
    from .residuals import save_residuals

    saved = save_residuals(
        stable_forward, spec.out, out_ranges, spec.out_shape, [p.final for p in partials]
    )
    return TensorDerivation(
        spec.name, spec, grad_output, stable_forward, forward_rewrites, tuple(partials), saved
    )
