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
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

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
