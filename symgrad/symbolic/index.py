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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits

from ..errors import ComplexityError, DefinitionError, NonDifferentiableError, UnboundSymbolError
from .bounds import MAX_TERMS, check_derivatives, check_size, is_zero
from .derive import Printouts
from .parse import as_expression
from .spec import bind_constants, check_name, fresh_name
from .stabilize import Rewrite, stabilize

Range = tuple[sp.Expr, sp.Expr]  # inclusive (low, high)


class ReduceMax(ExprWithLimits):
    """``max`` of ``body`` over an index range: ``ReduceMax(f(j), (j, lo, hi))``.

    Introduced only by stabilization (the max shift of log-sum-exp), never differentiated.
    """

    def _eval_is_real(self) -> bool | None:
        return self.function.is_real


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
                sp.srepr(tuple((b.label, b.shape, bool(b.is_integer)) for b in self.inputs)),
                repr(self.constants),
                repr([str(b.label) for b in self.wrt]),
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


def tensor_spec(
    expr: object,
    out: Iterable[sp.Symbol],
    inputs: Iterable[sp.IndexedBase],
    name: str,
    constants: Mapping[sp.Symbol | str, object] | None = None,
    wrt: Iterable[sp.IndexedBase | str] | None = None,
) -> TensorSpec:
    """Validate a tensor-op definition and return its :class:`TensorSpec`.

    ``wrt`` names the inputs that get a gradient (default: every non-integer input).
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
    ranges = _infer_ranges(formula, name)
    for index in out:
        if index not in ranges:
            raise DefinitionError(
                f"op {name!r}: output index {index} does not index any input tensor, so its "
                "range is unknown"
            )
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
    )


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


def _same_range(a: Range, b: Range) -> bool:
    return is_zero(a[0] - b[0]) and is_zero(a[1] - b[1])


def _contract_term(
    term: sp.Expr, var: sp.Symbol, rng: Range, ranges: dict[sp.Symbol, Range]
) -> sp.Expr:
    """``Σ_var term`` for one product ``term``: contract a delta, or pull out what is constant."""
    factors = sp.Mul.make_args(term)
    for f in factors:
        if isinstance(f, sp.KroneckerDelta) and var in f.args:
            other = f.args[1] if f.args[0] == var else f.args[0]
            if var in other.free_symbols:
                continue
            other_range = ranges.get(other) if isinstance(other, sp.Symbol) else None
            # Σ_k f(k)·δ(k, ids[b]) = f(ids[b]): an integer tensor's values are checked, at
            # call time, to lie within the axis they index
            gathered = reads_integer_tensor(other) and not other.free_symbols & {var}
            if gathered or (other_range is not None and _same_range(other_range, rng)):
                rest = sp.Mul(*[g for g in factors if g is not f])
                return rest.xreplace({var: other})
    inside = [f for f in factors if var in f.free_symbols]
    outside = [f for f in factors if var not in f.free_symbols]
    count = rng[1] - rng[0] + 1
    if not inside:
        return sp.Mul(*outside) * count
    return sp.Mul(*outside) * sp.Sum(sp.Mul(*inside), (var, rng[0], rng[1]))


def _terms(expr: sp.Expr, op: str = "", limit: int = MAX_TERMS) -> list[sp.Expr]:
    """Additive terms of ``expr``, distributing products over the sums that hold a delta.

    Only a factor with a ``KroneckerDelta`` in it is multiplied out: the delta must stand
    alone in a product to be contracted.  Every other factor keeps its form — expanding
    ``g·w·(X - mean)`` into ``g·w·X - g·w·mean`` would turn layer norm's centered sums into
    differences of large sums, which cancel catastrophically when the mean is large.

    A product of sums multiplies out into exponentially many terms: more than ``limit`` is a
    :class:`~symgrad.errors.ComplexityError`.
    """
    terms: list[sp.Expr] = []
    pending = list(reversed(sp.Add.make_args(expr)))
    while pending:  # depth-first, in the order of the terms
        term = pending.pop()
        factors = sp.Mul.make_args(term)
        for n, f in enumerate(factors):
            if isinstance(f, sp.Add) and f.has(sp.KroneckerDelta):
                rest = sp.Mul(*factors[:n], *factors[n + 1 :])
                pending.extend(
                    reversed([t for part in f.args for t in sp.Add.make_args(rest * part)])
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
            limits = []
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
                limits.append((fresh, lo, hi))
            return type(node)(body, *limits)
        return node.func(*args) if args != list(node.args) else node

    return visit(expr)


def contract(expr: sp.Expr, ranges: Mapping[sp.Symbol, Range], op: str = "") -> sp.Expr:
    """Remove Kronecker deltas from ``expr`` by contracting the sums that bind them.

    ``ranges`` gives the range of every free index; a delta ``δ(j, k)`` under ``Σ_j`` is
    contracted only when ``k``'s range equals ``j``'s.  Sums are distributed over the terms of
    their bodies, constant factors pulled out, sums of constants become counts.
    """
    known = dict(ranges)
    expr = rename_bound(expr)

    def visit(node: sp.Basic) -> sp.Basic:
        if isinstance(node, sp.Sum):
            # Every bound name is unique (rename_bound), so the ranges of this sum's indices
            # can be known before its body is visited: a delta between an inner and an outer
            # summation index (Σ_i Σ_j δ(i, j) f(i, j)) contracts too.
            for var, lo, hi in node.limits:
                known[var] = (lo, hi)
            body = visit(node.function)
            for var, lo, hi in node.limits:  # innermost first
                body = sp.Add(
                    *[_contract_term(t, var, (lo, hi), known) for t in _terms(body, op)]
                )
            return body
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
    return unify_bound(result)


def unify_bound(expr: sp.Expr) -> sp.Expr:
    """Write reductions that are equal up to the names of their indices as one expression.

    Contraction copies a sum into several terms under different index names; made equal,
    ``Σ_j1 X[b, j1] - Σ_j2 X[b, j2]`` cancels to 0 and printouts show each sum once.
    """
    seen: dict[sp.Basic, sp.Basic] = {}
    placeholders: list[sp.Dummy] = []  # the n-th summation index of any sum, by position

    def placeholder(n: int) -> sp.Dummy:
        while len(placeholders) <= n:
            placeholders.append(sp.Dummy(f"bound{len(placeholders)}", integer=True))
        return placeholders[n]

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        if isinstance(node, (sp.Sum, ReduceMax)):
            canon = {v: placeholder(n) for n, (v, *_) in enumerate(node.limits)}
            return seen.setdefault(node.xreplace(canon), node)
        return node

    return visit(expr)


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
    """Everything symgrad derived for a tensor op.

    ``saved`` (:class:`~symgrad.symbolic.residuals.SavedForm`) holds the residuals the forward
    can save and the VJPs that read them instead of recomputing.
    """

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
    """``Σ_j exp(f)`` → ``exp(M)·Σ_j exp(f - M)`` with ``M = max_j f``; logs and ratios follow."""
    log: list[Rewrite] = []

    def shift(node: sp.Sum) -> sp.Expr:
        if len(node.limits) != 1:
            return node
        body = sp.powsimp(node.function, combine="exp")
        exps = [f for f in sp.Mul.make_args(body) if isinstance(f, sp.exp)]
        if len(exps) != 1:
            return node
        (e,) = exps
        rest = sp.Mul(*[f for f in sp.Mul.make_args(body) if f is not e])
        var, lo, hi = node.limits[0]
        m = ReduceMax(e.args[0], (var, lo, hi))
        new = sp.exp(m) * sp.Sum(sp.exp(e.args[0] - m) * rest, (var, lo, hi))
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
    shifted = sp.powsimp(shifted, combine="exp")

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


def derive_tensor(spec: TensorSpec) -> TensorDerivation:
    """Derive the VJP of every input of a tensor op by the symbolic chain rule."""
    from .derive import prepare

    forward = check_size(prepare(spec.expr), spec.name, "the formula")
    out_ranges = dict(spec.ranges)
    taken = {s.name for s in spec.expr.atoms(sp.Symbol)} | {str(d) for d in spec.dims}
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
    for base, (indices, target) in targets.items():
        ranges = {
            **out_ranges,
            **{k: (sp.S.Zero, d - 1) for k, d in zip(indices, base.shape, strict=True)},
        }
        what = f"the derivative with respect to {base}"
        local = check_size(sp.diff(forward, target), spec.name, what)
        chain = (grad_output[spec.out] if spec.out else grad_output) * local
        raw = sp.Sum(chain, *[(i, *out_ranges[i]) for i in spec.out]) if spec.out else chain
        _check_numeric(spec, what, raw)
        contracted = contract(raw, ranges, spec.name)
        final, rewrites = stabilize_tensor(contracted)
        check_size(final, spec.name, f"the gradient of {base}, stabilized")
        final, guards = guard_deltas(final)
        rewrites += guards
        partials.append(TensorPartial(base, indices, raw, contracted, final, rewrites))
    stable_forward, forward_rewrites = stabilize_tensor(forward)
    from .residuals import save_residuals

    saved = save_residuals(
        stable_forward, spec.out, out_ranges, spec.out_shape, [p.final for p in partials]
    )
    return TensorDerivation(
        spec.name, spec, grad_output, stable_forward, forward_rewrites, tuple(partials), saved
    )
