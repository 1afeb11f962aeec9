"""Saved residuals: the values a tensor op's forward computes that its derived VJPs read again.

A VJP derived by the chain rule recomputes what the forward already had: softmax's gradient
contains the row max and the sum of exponentials (and ``exp`` of every score), layer norm's its
row mean and variance.  Nothing here writes a gradient: the *derived* VJP is searched for the
forward's own subexpressions, which are then read from arrays the forward saved —

* **reductions**: every ``Sum``/``ReduceMax`` of the stable forward whose free indices are
  output indices (a per-row statistic: ``Σ_u exp(x_u - m)``, ``Σ_j z_j``, ``Σ_j (z_j - μ)²``)
  becomes a residual array over those indices.  A VJP reduction equal to it — up to the names of
  its indices and the way the contraction distributed sums over terms (``Σ_j (x_j + r_j)`` is
  ``Σ_j x_j + Σ_j r_j`` there) — is replaced by a read;
* **the output**: when the forward is a product of powers (softmax: ``exp(x_t - m) · s⁻¹``),
  every term of a VJP that contains that product, at any indices, reads ``out`` instead
  (``g_k·y_k - y_k·Σ_t g_t·y_t``: no ``exp`` left).  Factors constant along a sum are moved
  into it when that exposes the product.

Both replacements are identities, so a VJP that reads residuals equals the recomputing VJP;
``op.vjp`` without saved values keeps recomputing.  The symbols used: residual ``n`` is the
array ``res<n>`` (:data:`RESIDUAL_PREFIX`), the output ``out``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import sympy as sp

from .index import ReduceMax

RESIDUAL_PREFIX = "res"
_REDUCTIONS = (sp.Sum, ReduceMax)


@dataclass(frozen=True)
class Residual:
    """A reduction the forward saves: ``res<n>[indices] = value``.

    ``indices`` are output indices (in output order), ``value`` the reduction in the forward's
    index names, reading earlier residuals where it contains them (the variance reads the
    saved mean).
    """

    name: str
    indices: tuple[sp.Symbol, ...]
    value: sp.Expr
    shape: tuple[sp.Expr, ...]
    node: sp.Expr  # the reduction as the stable forward writes it (no residual reads)

    def read(self, indices: Sequence[sp.Expr] | None = None) -> sp.Expr:
        base = sp.IndexedBase(self.name, shape=self.shape)
        return base[tuple(self.indices if indices is None else indices)]


@dataclass(frozen=True)
class SavedForm:
    """What :func:`save_residuals` found: the residuals, the forward computing them, and each
    VJP reading them (``None`` where a VJP reads nothing saved)."""

    residuals: tuple[Residual, ...]
    forward: sp.Expr  # the stable forward, its residual reductions read back
    partials: tuple[sp.Expr | None, ...]
    reads_output: bool

    @property
    def saves(self) -> bool:
        return bool(self.residuals) or self.reads_output


# -- normal forms ------------------------------------------------------------------------


def _pull_constants(
    var: sp.Symbol, body: sp.Expr, limits: tuple, kind: type = sp.Sum
) -> sp.Expr:
    inside = [f for f in sp.Mul.make_args(body) if var in f.free_symbols]
    outside = [f for f in sp.Mul.make_args(body) if var not in f.free_symbols]
    if not inside:
        return sp.Mul(*outside) * (limits[2] - limits[1] + 1)
    return sp.Mul(*outside) * kind(sp.Mul(*inside), limits)


def normal(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every one-index ``Sum`` distributed over the terms of its body, constant
    factors pulled out, and bound indices renamed canonically — the form the contraction leaves
    sums in, so a forward reduction and its copy in a VJP compare equal."""

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        args = [visit(a) for a in node.args]
        node = node.func(*args) if args != list(node.args) else node
        if isinstance(node, sp.Sum) and len(node.limits) == 1:
            limits = node.limits[0]
            body = sp.expand_mul(node.function) if node.function.has(sp.Add) else node.function
            return sp.Add(*[_pull_constants(limits[0], t, limits) for t in sp.Add.make_args(body)])
        return node

    return _canonical_bound(visit(expr))


def _canonical_bound(expr: sp.Expr) -> sp.Expr:
    counter = itertools.count()

    def visit(node: sp.Basic) -> sp.Basic:
        if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
            return node
        if isinstance(node, _REDUCTIONS):
            body, limits = node.function, []
            for var, lo, hi in node.limits:
                fresh = sp.Symbol(f"_b{next(counter)}", integer=True)
                body = body.xreplace({var: fresh})
                limits.append((fresh, lo, hi))
            return type(node)(visit(body), *limits)
        args = [visit(a) for a in node.args]
        return node.func(*args) if args != list(node.args) else node

    return visit(expr)


# -- index substitutions ------------------------------------------------------------------


def _substitutions(
    pattern: sp.Expr, target: sp.Expr, free: Iterable[sp.Symbol]
) -> Iterable[dict[sp.Symbol, sp.Expr]]:
    """Candidate maps of the ``free`` indices of ``pattern`` onto index expressions of
    ``target``, read off tensor accesses of the same tensor (verified by the caller)."""
    free = set(free)
    accesses: dict[sp.Basic, list[sp.Indexed]] = {}
    for a in sorted(target.atoms(sp.Indexed), key=sp.default_sort_key):
        accesses.setdefault(a.base, []).append(a)
    options: list[list[dict[sp.Symbol, sp.Expr]]] = []
    for p in sorted(pattern.atoms(sp.Indexed), key=sp.default_sort_key):
        positions = [(n, i) for n, i in enumerate(p.indices) if i in free]
        if not positions:
            continue
        choices = []
        for t in accesses.get(p.base, []):
            choices.append({i: t.indices[n] for n, i in positions})
        if not choices:
            return
        options.append(choices)
    seen: set[tuple] = set()
    for combo in itertools.islice(itertools.product(*options), 64):
        merged: dict[sp.Symbol, sp.Expr] = {}
        if all(merged.setdefault(k, v) == v for part in combo for k, v in part.items()):
            key = tuple(sorted(merged.items(), key=str))
            if key not in seen and set(merged) == free & pattern.free_symbols:
                seen.add(key)
                yield merged


# -- reductions ----------------------------------------------------------------------------


def _reductions(expr: sp.Expr) -> list[sp.Expr]:
    """The ``Sum``/``ReduceMax`` nodes of ``expr``, innermost first, each once."""
    found: list[sp.Expr] = []
    for node in sp.postorder_traversal(expr):
        if isinstance(node, _REDUCTIONS) and node not in found:
            found.append(node)
    return found


class _Finder:
    """Replace the forward's reductions, wherever a VJP recomputes them, by residual reads."""

    def __init__(self, forward: sp.Expr, out: tuple[sp.Symbol, ...], ranges: Mapping) -> None:
        self.out = out
        self.ranges = dict(ranges)
        self.residuals: list[Residual] = []
        self._normal: list[sp.Expr] = []  # normal form of each residual's value
        done: dict[sp.Expr, sp.Expr] = {}
        for node in _reductions(forward):
            free = {s for s in node.free_symbols if s in out}
            if not free:
                continue
            indices = tuple(i for i in out if i in free)
            value = node.xreplace(done)
            shape = tuple(self.ranges[i][1] - self.ranges[i][0] + 1 for i in indices)
            name = f"{RESIDUAL_PREFIX}{len(self.residuals)}"
            residual = Residual(name, indices, value, shape, node)
            self.residuals.append(residual)
            self._normal.append(normal(value))
            done[node] = residual.read()
        self.forward = forward.xreplace(done)
        self.used: set[str] = set()

    def replace(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every node equal to a residual's value read from the residual."""

        def visit(node: sp.Basic) -> sp.Basic:
            if not node.args or isinstance(node, (sp.Indexed, sp.IndexedBase, sp.Symbol)):
                return node
            hit = self._match(node)
            if hit is not None:
                return hit
            args = [visit(a) for a in node.args]
            node = node.func(*args) if args != list(node.args) else node
            hit = self._match(node)  # its parts read residuals now: it may match one too
            return node if hit is None else hit

        previous = None
        while expr != previous:
            previous, expr = expr, visit(expr)
        return expr

    def _match(self, node: sp.Basic) -> sp.Expr | None:
        if not (
            isinstance(node, _REDUCTIONS) or (isinstance(node, sp.Add) and node.has(*_REDUCTIONS))
        ):
            return None
        if not isinstance(node, sp.Expr):
            return None
        shape = normal(node)
        for residual, value in zip(self.residuals, self._normal, strict=True):
            for sub in _substitutions(value, shape, residual.indices):
                if value.xreplace(sub) == shape:
                    self.used.add(residual.name)
                    return residual.read([sub[i] for i in residual.indices])
        return None


# -- the output ----------------------------------------------------------------------------


def _powers(expr: sp.Expr) -> dict[sp.Expr, sp.Expr]:
    """The factors of a product as base → exponent (``exp(a)`` is its own base)."""
    found: dict[sp.Expr, sp.Expr] = {}
    for f in sp.Mul.make_args(expr):
        base, exp = (f, sp.S.One) if isinstance(f, sp.exp) else f.as_base_exp()
        found[base] = found.get(base, sp.S.Zero) + exp
    return found


def _covers(have: sp.Expr, need: sp.Expr) -> bool:
    """Whether ``x**have`` contains ``x**need`` as a factor (same sign, at least as large)."""
    return have == need or bool(
        (have * need).is_positive and (abs(have) - abs(need)).is_nonnegative
    )


def _is_residual_read(expr: sp.Expr) -> bool:
    base = expr.as_base_exp()[0]
    return isinstance(base, sp.Indexed) and str(base.base.label).startswith(RESIDUAL_PREFIX)


def _outside(var: sp.Symbol, total: sp.Expr) -> sp.Expr:
    """``Σ_var body`` for ``total = Sum(body, (var, ...))``, distributed over the terms of the
    body, with the factors constant along ``var`` moved out of each."""
    (limits,) = total.limits
    return sp.Add(
        *[_pull_constants(var, t, limits, type(total)) for t in sp.Add.make_args(total.function)]
    )


class _OutputReads:
    """Divide VJP terms by the forward output, a product of powers, wherever it appears."""

    def __init__(self, forward: sp.Expr, out: tuple[sp.Symbol, ...], shape: tuple) -> None:
        self.out = out
        self.read = sp.IndexedBase("out", shape=shape)
        self.powers = _powers(forward)
        self.used = False
        # worth reading only if it saves a costly evaluation (exp, a division by a reduction)
        self.useful = bool(out) and isinstance(forward, sp.Mul) and forward.has(sp.Function)

    def _divide(self, term: sp.Expr) -> sp.Expr | None:
        """``term`` as ``out[...]·rest`` if it contains the output's factors at some indices."""
        have = _powers(term)
        for sub in _substitutions(sp.Mul(*self.powers), term, self.out):
            if set(sub) != set(self.out):
                continue
            need = {b.xreplace(sub): e for b, e in self.powers.items()}
            if all(b in have and _covers(have[b], e) for b, e in need.items()):
                rest = dict(have)
                for b, e in need.items():
                    rest[b] = rest[b] - e
                self.used = True
                return self.read[tuple(sub[i] for i in self.out)] * sp.Mul(
                    *[b**e for b, e in rest.items() if e != 0]
                )
        return None

    def apply(self, expr: sp.Expr) -> sp.Expr:
        if not self.useful:
            return expr
        return sp.Add(*[self._term(t) for t in sp.Add.make_args(expr)])

    def _term(self, term: sp.Expr) -> sp.Expr:
        while (divided := self._divide(term)) is not None:
            term = divided
        factors = list(sp.Mul.make_args(term))
        for n, f in enumerate(factors):
            if not (isinstance(f, sp.Sum) and len(f.limits) == 1):
                continue
            var = f.limits[0][0]
            # residual factors constant along the sum may complete the output inside it
            # (softmax's 1/s: Σ_t exp(x_t - m)·g_t / s² = Σ_t y_t·g_t / s)
            movable = [
                k
                for k, g in enumerate(factors)
                if k != n and var not in g.free_symbols and _is_residual_read(g)
            ]
            moved = sp.Mul(*[factors[k] for k in movable])
            inner = self.apply(sp.Add(*[moved * t for t in sp.Add.make_args(f.function)]))
            if not inner.has(self.read):
                continue
            rest = [g for k, g in enumerate(factors) if k != n and k not in movable]
            term = sp.Mul(*rest) * _outside(var, type(f)(inner, f.limits[0]))
            return divided if (divided := self._divide(term)) is not None else term
        return term


def save_residuals(
    forward: sp.Expr,
    out: tuple[sp.Symbol, ...],
    ranges: Mapping[sp.Symbol, tuple[sp.Expr, sp.Expr]],
    out_shape: tuple[sp.Expr, ...],
    partials: Sequence[sp.Expr],
) -> SavedForm:
    """The residuals of a tensor op (see the module docstring) and its VJPs reading them.

    ``forward`` is the stable forward, ``partials`` the final (stable) VJPs; only residuals some
    VJP reads are kept.
    """
    finder = _Finder(forward, out, ranges)
    outputs = _OutputReads(finder.forward, out, out_shape)
    saved: list[sp.Expr | None] = []
    for p in partials:
        new = outputs.apply(finder.replace(p))
        saved.append(None if new == p else new)
    read = {r.name for e in saved if e is not None for r in _read_residuals(e, finder.residuals)}
    # a kept residual's value may read an earlier one (the variance reads the mean): keep those
    needed = set(read)
    for residual in reversed(finder.residuals):
        if residual.name in needed:
            needed |= {r.name for r in _read_residuals(residual.value, finder.residuals)}
    kept = tuple(r for r in finder.residuals if r.name in needed)
    # the forward reads only the kept residuals; the others are computed in place again
    restore = {r.read(): r.value for r in reversed(finder.residuals) if r.name not in needed}
    saved_forward = finder.forward
    for _ in finder.residuals:
        saved_forward = saved_forward.xreplace(restore)
    if not any(e is not None for e in saved):
        return SavedForm((), forward, tuple(saved), False)
    return SavedForm(kept, saved_forward, tuple(saved), outputs.used)


def _read_residuals(expr: sp.Expr, residuals: Sequence[Residual]) -> list[Residual]:
    names = {str(a.base.label) for a in expr.atoms(sp.Indexed)}
    return [r for r in residuals if r.name in names]
