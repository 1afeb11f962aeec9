"""BLAS for generated kernels: ``gemm`` on strided matrix views, transposes as flags.

A contraction lowered to BLAS (:mod:`symgrad.codegen.lower`) multiplies matrices that live
*inside* C-contiguous tensors: the rows of a ``(B, S, H, M)`` query tensor for one batch element
and head are ``S`` rows of ``M`` numbers, ``H·M`` apart.  BLAS takes such a matrix as it is — a
pointer, a leading dimension and a transpose flag — so no operand is copied, transposed or
reshaped, and the product is written straight into its destination (``beta`` = 0), or added to
it (``beta`` = 1), scaled by ``alpha`` (attention's ``1/√d``).

``gemm`` calls the BLAS that NumPy's ``np.dot`` uses inside Numba (SciPy's, through Numba's
``numba_xxgemm`` helper, resolved by symbol name so that kernels calling it are cached on disk
like any other).  Generated kernels import it; this module's source is part of the toolchain
fingerprint (:func:`symgrad.runtime.cache.toolchain_fingerprint`).

**Threads.**  BLAS runs single-threaded inside symgrad's kernels
(:func:`symgrad.runtime.threads.limit_blas`); a large product is split by
:func:`gemm_blocks` into :data:`BLOCKS` blocks of rows (or columns) of ``C`` — a partition
fixed by the sizes alone — each one ``gemm`` call: serially in a kernel's serial variant,
spread over Numba's threads by :func:`gemm_blocks_par` in its parallel one.  Both compute every
block the same way, so the product has the same bits on any number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from .threads import configure

configure()  # before any kernel calls BLAS: single-threaded BLAS, the thread count set

# int numba_xxgemm(char kind, char transa, char transb, intp m, intp n, intp k, void *alpha,
#                  void *a, intp lda, void *b, intp ldb, void *beta, void *c, intp ldc):
# Fortran (column-major) dgemm/sgemm of SciPy's BLAS.
_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(
        types.char,
        types.char,
        types.char,
        types.intp,
        types.intp,
        types.intp,
        types.voidptr,
        types.voidptr,
        types.intp,
        types.voidptr,
        types.intp,
        types.voidptr,
        types.voidptr,
        types.intp,
    ),
)

_N, _T = 110, 116  # ord("n"), ord("t")


@njit(cache=True)
def gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc):  # type: ignore[no-untyped-def]
    """Row-major ``C = alpha·op(A)·op(B) + beta·C`` for an ``m × n`` matrix ``C``.

    ``a``, ``b``, ``c`` are C-contiguous arrays (any rank, one float dtype); the matrices start
    at their flat offsets ``ao``, ``bo``, ``co`` and have leading dimensions (row strides in
    elements) ``lda``, ``ldb``, ``ldc``.  ``op(A)`` is ``m × k``: stored as ``A`` (``ta``
    false) or as its transpose; ``op(B)`` is ``k × n`` likewise.  ``beta`` = 0 overwrites ``C``
    (whatever it held, NaN included).
    """
    if m == 0 or n == 0:
        return
    kind = 115 if a.itemsize == 4 else 100  # "s" or "d"
    scale = np.empty(2, a.dtype)
    scale[0] = alpha
    scale[1] = beta
    af = a.reshape(a.size)[ao:]
    bf = b.reshape(b.size)[bo:]
    cf = c.reshape(c.size)[co:]
    # Column-major BLAS sees each row-major matrix as its transpose: C' = op(B)' op(A)'.
    _xxgemm(
        kind,
        _T if tb else _N,
        _T if ta else _N,
        n,
        m,
        k,
        scale[0:].ctypes,
        bf.ctypes,
        max(ldb, 1),
        af.ctypes,
        max(lda, 1),
        scale[1:].ctypes,
        cf.ctypes,
        max(ldc, 1),
    )


#: A split product has this many blocks (of whole multiples of 64 rows, at least
#: MIN_BLOCK_ROWS): each block re-packs the other operand, so every block more costs, and
#: fewer blocks share out over fewer threads (see benchmarks/THREADS.md).
BLOCKS = 4
MIN_BLOCK_ROWS = 128


@njit(cache=True)
def _blocks(m, n, k):  # type: ignore[no-untyped-def]
    """How :func:`gemm_blocks` splits an ``m × n`` product: (blocks, split the rows, block
    size).  The longer side of ``C`` is split; a product with too little work, or too short a
    side to split, is one block.  A function of the sizes alone."""
    rows = m >= n
    long = m if rows else n
    if long < 2 * MIN_BLOCK_ROWS or m * n * k < (1 << 22):
        return 1, rows, long
    size = max(MIN_BLOCK_ROWS, ((long + BLOCKS - 1) // BLOCKS + 63) // 64 * 64)
    return (long + size - 1) // size, rows, size


@njit(cache=True)
def _block(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, i, nb, rows, size):  # type: ignore[no-untyped-def]
    """Block ``i`` of ``nb`` (``size`` rows or columns each) of the product (all of it when
    ``nb`` is 1)."""
    if nb == 1:
        gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc)
        return
    lo = i * size
    if rows:  # rows lo.. of C: rows lo.. of op(A)
        part = min(size, m - lo)
        a_at = ao + (lo if ta else lo * lda)
        gemm(ta, tb, part, n, k, alpha, a, a_at, lda, b, bo, ldb, beta, c, co + lo * ldc, ldc)
    else:  # columns lo.. of C: columns lo.. of op(B)
        part = min(size, n - lo)
        b_at = bo + (lo * ldb if tb else lo)
        gemm(ta, tb, m, part, k, alpha, a, ao, lda, b, b_at, ldb, beta, c, co + lo, ldc)


@njit(cache=True)
def gemm_blocks(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc):  # type: ignore[no-untyped-def]
    """``gemm`` split into the blocks of :func:`_blocks`, one after another."""
    nb, rows, size = _blocks(m, n, k)
    for i in range(nb):
        _block(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, i, nb, rows,
               size)


@njit(cache=True, parallel=True)
def gemm_blocks_par(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc):  # type: ignore[no-untyped-def]
    """``gemm`` split into the blocks of :func:`_blocks`, spread over Numba's threads: the same
    calls as :func:`gemm_blocks`, so the same result."""
    nb, rows, size = _blocks(m, n, k)
    if nb == 1:
        gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc)
        return
    for i in prange(nb):
        _block(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, i, nb, rows,
               size)
