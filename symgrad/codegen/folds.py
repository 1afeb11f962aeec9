"""Folds: a float64 buffer reduced to one value in an order fixed by its length alone.

A reduction whose terms are buffered (a block of a softmax's ``Σ exp``, of a loss's sum) is
finished by a helper that folds the buffer in halves — the values past the first ``h`` (``h``
at least half of them, a multiple of :data:`LANES`) joined onto the first ones, element by
element — until :data:`LANES` values are left, which are joined in a fixed tree.  Each fold is
a loop without a carried dependence, which LLVM vectorises under strict IEEE rules (Numba
leaves LLVM's SLP vectoriser off, so partial sums kept in registers would run scalar); the
serial chain of one accumulator costs a floating-point addition's latency per element.  The
order depends only on the number of values — never on threads or load — and the rounding error
of a buffer's sum grows with log n, not n (the buffers' sums are then added in order).  Used by
the tensor kernels' blocked reductions (:mod:`symgrad.codegen.lower`) and the elementwise
kernels' sums (:mod:`symgrad.codegen.emit`).
"""

from __future__ import annotations

from .jit import njit

#: Values a buffer is folded down to before its final tree (the halves it adds are multiples
#: of LANES long: whole vectors).
LANES = 8


def _tree(join: str) -> str:
    """The first LANES values of ``buf`` joined pairwise (``join`` of two texts), in a fixed
    tree."""
    tree = [f"buf[{k}]" for k in range(LANES)]
    while len(tree) > 1:
        tree = [join.format(tree[k], tree[k + 1]) for k in range(0, len(tree), 2)]
    return tree[0]


def _fold(name: str, join: str, start: str) -> str:
    """A helper reducing ``buf[:m]`` (destroying it): while more than LANES values are left,
    the values past the first ``h`` (``h`` ≥ half of them, a multiple of LANES) are joined
    onto the first ones, element by element; the rest is filled up to LANES with ``start``
    and joined in a fixed tree.  ``join`` joins two texts."""
    return f"""\
{njit()}
def {name}(buf, m{", start" if start == "start" else ""}):
    while m > {LANES}:
        h = ((m + 1) // 2 + {LANES - 1}) // {LANES} * {LANES}
        for k in range(m - h):
            buf[k] = {join.format("buf[k]", "buf[h + k]")}
        m = h
    for k in range(m, {LANES}):
        buf[k] = {start}
    return {_tree(join)}
"""


#: Numba source of the folds, by name: ``_sg_fold_sum(buf, m)`` the sum of ``buf[:m]``,
#: ``_sg_fold_max(buf, m, start)`` its maximum (``start`` fills the tree's unused leaves);
#: both destroy the buffer, which must hold at least LANES values.
FOLD_SOURCE: dict[str, str] = {
    "_sg_fold_sum": _fold("_sg_fold_sum", "({} + {})", "0.0"),
    "_sg_fold_max": _fold("_sg_fold_max", "max({}, {})", "start"),
}
