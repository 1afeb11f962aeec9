"""BLAS for generated kernels: ``gemm`` on strided matrix views, transposes as flags.

A contraction lowered to BLAS (:mod:`symgrad.codegen.lower`) multiplies matrices that live
*inside* C-contiguous tensors: the rows of a ``(B, S, H, M)`` query tensor for one batch element
and head are ``S`` rows of ``M`` numbers, ``H·M`` apart.  BLAS takes such a matrix as it is — a
pointer, a leading dimension and a transpose flag — so no operand is copied, transposed or
reshaped, and the product is written straight into its destination (``beta`` = 0), or added to
it (``beta`` = 1), scaled by ``alpha`` (attention's ``1/√d``).

``gemm`` calls symgrad's own OpenBLAS — the ``scipy-openblas32`` wheel, a dependency; a
copy of its own, newer than SciPy's (a BERT layer's products 5–9 % faster) and run on one thread
for the pool without changing NumPy's or SciPy's BLAS — through its CBLAS functions, bound by
symbol name (``symgrad_sgemm`` …) when this module is imported, so that kernels calling them
are cached on disk like any other.  Without the wheel the same symbols are functions compiled
here that call SciPy's BLAS through Numba's ``numba_xxgemm`` helper.  Generated kernels import
``gemm``; this module's source is part of the toolchain fingerprint
(:func:`symgrad.runtime.cache.toolchain_fingerprint`).

**Threads.**  BLAS runs single-threaded inside symgrad's kernels when symgrad's pool runs them
(:func:`symgrad.runtime.threads.limit_blas`); a large product is split by :func:`gemm_blocks`
into at most :data:`BLOCKS` pieces — of the rows of ``C``, of its columns, or of the sum over
``k`` (partial products added up in piece order), whichever side is longest — a partition fixed
by the sizes alone, each piece one ``gemm`` call: serially in a kernel's serial variant, spread
over Numba's threads by :func:`gemm_blocks_par` in its parallel one.  Both compute every piece
the same way and add partial products in the same order, so the product has the same bits on
any number of threads.

When the BLAS has threads of its own — symgrad's pool off (e.g. on Numba's workqueue layer) —
:func:`gemm_blocks` makes one call instead: BLAS's threads then share one packing of each
operand, where pieces
re-pack one per piece (with OpenBLAS's 2 threads, a BERT layer's products took 1.08–1.16× as
long in pieces; benchmarks/RESULTS-mainjob.md).  Its bits then depend on BLAS's thread count,
as BLAS's own threading always makes them; on the pool (BLAS on one thread) they never do.
The kernels ask BLAS for its thread count on every call (``symgrad_blas_threads``, a symbol
bound at import to the kernels' OpenBLAS's ``openblas_get_num_threads``, so cached kernels
stay valid in a new process).
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np
from llvmlite import binding
from numba import cfunc, njit, prange, types

from .threads import blas_core, configure, kernel_blas, own_blas

configure()  # before any kernel calls BLAS: SYMGRAD_NUM_THREADS read (the pool, BLAS on one thread)

_C, _I, _P, _I32 = types.char, types.intp, types.voidptr, types.int32  # the helpers' C types
_F32, _F64 = types.float32, types.float64

# The kernels' BLAS, column-major CBLAS by value, bound by symbol name at import (so cached
# kernels stay valid in a new process):
#   void symgrad_[sd]gemm(int order, int transa, int transb, int m, int n, int k, T alpha,
#                         const T *a, int lda, const T *b, int ldb, T beta, T *c, int ldc)
#   void symgrad_[sd]gemv(int order, int trans, int m, int n, T alpha, const T *a, int lda,
#                         const T *x, int incx, T beta, T *y, int incy)
# symgrad's own OpenBLAS's ``scipy_cblas_*`` (runtime.threads.own_blas), else the functions
# below that call SciPy's BLAS through Numba's helpers.
_GEMM_SIGS = {t: types.void(_I32, _I32, _I32, _I32, _I32, _I32, t, _P, _I32, _P, _I32, t, _P, _I32)
              for t in (_F32, _F64)}
_GEMV_SIGS = {t: types.void(_I32, _I32, _I32, _I32, t, _P, _I32, _P, _I32, t, _P, _I32)
              for t in (_F32, _F64)}
_sgemm = types.ExternalFunction("symgrad_sgemm", _GEMM_SIGS[_F32])
_dgemm = types.ExternalFunction("symgrad_dgemm", _GEMM_SIGS[_F64])
_sgemv = types.ExternalFunction("symgrad_sgemv", _GEMV_SIGS[_F32])
_dgemv = types.ExternalFunction("symgrad_dgemv", _GEMV_SIGS[_F64])

_COLUMN_MAJOR, _NO_TRANS, _TRANS = 102, 111, 112  # CBLAS's enums
_INT_MAX = 2**31 - 1  # the BLAS's int

# Numba's helpers (SciPy's BLAS, Fortran): int numba_xxgemm(char kind, char transa, char transb,
# intp m, intp n, intp k, void *alpha, void *a, intp lda, void *b, intp ldb, void *beta, void *c,
# intp ldc) and int numba_xxgemv(char kind, char trans, intp m, intp n, void *alpha, void *a,
# intp lda, void *x, void *beta, void *y), x and y contiguous.
_xxgemm = types.ExternalFunction(
    "numba_xxgemm", types.intc(_C, _C, _C, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I)
)
_xxgemv = types.ExternalFunction("numba_xxgemv", types.intc(_C, _C, _I, _I, _P, _P, _I, _P, _P, _P))

_N, _T = 110, 116  # ord("n"), ord("t"): the Fortran flags


@njit(cache=True)
def _numba_gemm(kind, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # type: ignore[no-untyped-def]
    """A column-major CBLAS gemm call made through ``numba_xxgemm``."""
    scale = np.array((alpha, beta))
    _xxgemm(kind, _T if ta == _TRANS else _N, _T if tb == _TRANS else _N, m, n, k,
            scale[0:].ctypes, a, lda, b, ldb, scale[1:].ctypes, c, ldc)


@njit(cache=True)
def _numba_gemv(kind, trans, m, n, alpha, a, lda, x, beta, y):  # type: ignore[no-untyped-def]
    """A column-major CBLAS gemv call (unit increments) made through ``numba_xxgemv``."""
    scale = np.array((alpha, beta))
    _xxgemv(kind, _T if trans == _TRANS else _N, m, n, scale[0:].ctypes, a, lda, x,
            scale[1:].ctypes, y)


def _sgemm_via_numba(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # type: ignore[no-untyped-def]
    _numba_gemm(115, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


def _dgemm_via_numba(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # type: ignore[no-untyped-def]
    _numba_gemm(100, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


def _sgemv_via_numba(order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):  # type: ignore[no-untyped-def]
    _numba_gemv(115, trans, m, n, alpha, a, lda, x, beta, y)


def _dgemv_via_numba(order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):  # type: ignore[no-untyped-def]
    _numba_gemv(100, trans, m, n, alpha, a, lda, x, beta, y)


def _address(function: Any) -> int:
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


def _bind_blas() -> str:
    """Bind the kernels' BLAS symbols; the name of the BLAS bound."""
    own = own_blas()
    if own is not None:
        for name in ("sgemm", "dgemm", "sgemv", "dgemv"):
            binding.add_symbol(f"symgrad_{name}", _address(getattr(own, f"scipy_cblas_{name}")))
        return f"symgrad's own OpenBLAS (scipy-openblas32, {blas_core(own)} kernels)"
    # (compiled only here, where they are needed; cached like the kernels)
    for name, function, sig in (
        ("sgemm", _sgemm_via_numba, _GEMM_SIGS[_F32]),
        ("dgemm", _dgemm_via_numba, _GEMM_SIGS[_F64]),
        ("sgemv", _sgemv_via_numba, _GEMV_SIGS[_F32]),
        ("dgemv", _dgemv_via_numba, _GEMV_SIGS[_F64]),
    ):
        binding.add_symbol(f"symgrad_{name}", cfunc(sig, cache=True)(function).address)
    return "SciPy's BLAS (through Numba's numba_xxgemm)"


#: Which BLAS the kernels call.
KERNEL_BLAS = _bind_blas()

_ONE_THREAD = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 1)  # a BLAS without the query: one thread


def _thread_count_address() -> int:
    """The address of the kernels' BLAS's ``openblas_get_num_threads`` (with the prefix and
    suffix its build gives it); of a function answering 1 for another BLAS."""
    for lib in kernel_blas():
        dll = ctypes.CDLL(lib.filepath)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            found = getattr(dll, f"{prefix}openblas_get_num_threads{suffix}", None)
            if found is not None:
                return _address(found)
    return _address(_ONE_THREAD)


binding.add_symbol("symgrad_blas_threads", _thread_count_address())
#: int symgrad_blas_threads(void): the number of threads BLAS runs a call on.
_blas_threads = types.ExternalFunction("symgrad_blas_threads", types.intc())


@njit(cache=True)
def blas_threads():  # type: ignore[no-untyped-def]
    """The number of threads the kernels' BLAS runs a call on (as a kernel sees it)."""
    return _blas_threads()


@njit(cache=True)
def _xgemm(single, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # type: ignore[no-untyped-def]
    """Column-major ``gemm`` of the kernels' BLAS, in ``a``'s precision (``single``: float32)."""
    if single:
        _sgemm(_COLUMN_MAJOR, ta, tb, np.int32(m), np.int32(n), np.int32(k), np.float32(alpha),
               a, np.int32(lda), b, np.int32(ldb), np.float32(beta), c, np.int32(ldc))
    else:
        _dgemm(_COLUMN_MAJOR, ta, tb, np.int32(m), np.int32(n), np.int32(k), np.float64(alpha),
               a, np.int32(lda), b, np.int32(ldb), np.float64(beta), c, np.int32(ldc))


@njit(cache=True)
def _xgemv(single, trans, m, n, alpha, a, lda, x, beta, y):  # type: ignore[no-untyped-def]
    """Column-major ``gemv`` (unit increments) of the kernels' BLAS, likewise."""
    if single:
        _sgemv(_COLUMN_MAJOR, trans, np.int32(m), np.int32(n), np.float32(alpha), a,
               np.int32(lda), x, 1, np.float32(beta), y, 1)
    else:
        _dgemv(_COLUMN_MAJOR, trans, np.int32(m), np.int32(n), np.float64(alpha), a,
               np.int32(lda), x, 1, np.float64(beta), y, 1)


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
    if max(m, n, k, lda, ldb, ldc) > _INT_MAX:
        raise ValueError("a matrix product's side or row stride exceeds BLAS's 32-bit int")
    single = a.itemsize == 4
    af = a.reshape(a.size)[ao:]
    bf = b.reshape(b.size)[bo:]
    cf = c.reshape(c.size)[co:]
    if k > 0 and m == 1 and (not ta or lda == 1):
        # C's row = op(A)'s row (contiguous) times op(B); column-major BLAS sees B stored
        # row-major as its transpose: y = B'·x when B is op(B) as stored, y = (B')'·x else.
        _xgemv(single, _TRANS if tb else _NO_TRANS, k if tb else n, n if tb else k, alpha,
               bf.ctypes, max(ldb, 1), af.ctypes, beta, cf.ctypes)
        return
    if k > 0 and n == 1 and (ldc == 1 or m == 1) and (tb or ldb == 1):
        # C's column (contiguous) = op(A) times op(B)'s column (contiguous), likewise.
        _xgemv(single, _NO_TRANS if ta else _TRANS, m if ta else k, k if ta else m, alpha,
               af.ctypes, max(lda, 1), bf.ctypes, beta, cf.ctypes)
        return
    # Column-major BLAS sees each row-major matrix as its transpose: C' = op(B)' op(A)'.
    _xgemm(single, _TRANS if tb else _NO_TRANS, _TRANS if ta else _NO_TRANS, n, m, k, alpha,
           bf.ctypes, max(ldb, 1), af.ctypes, max(lda, 1), beta, cf.ctypes, max(ldc, 1))


#: A large product is split into this many pieces (or fewer, when a side is short): pieces
#: whose boundaries depend on the sizes alone, so that any number of threads computes the same
#: bits; see benchmarks/RESULTS-threads.md for the arithmetic at 16 and 64 cores.
BLOCKS = 4
#: A piece spans a multiple of ALIGN rows, columns or terms, and at least MIN_PIECE of them.
ALIGN = 16
MIN_PIECE = 64
#: Products of fewer multiply-adds than this are never split.
MIN_SPLIT_WORK = 1 << 22

_WHOLE, _ROWS, _COLUMNS, _TERMS = 0, 1, 2, 3


@njit(cache=True)
def _blocks(m, n, k):  # type: ignore[no-untyped-def]
    """How :func:`gemm_blocks` splits an ``m × n`` product with ``k`` terms: ``(how, pieces,
    size)``.  ``how`` is ``_ROWS`` or ``_COLUMNS`` (pieces of ``C``) or ``_TERMS`` (pieces of
    the sum over ``k``, each a product of its own, added up in piece order).  Each split costs
    extra memory traffic: every piece of rows re-packs all of ``op(B)`` (``k·n`` numbers), every
    piece of columns all of ``op(A)`` (``m·k``), every piece of terms but the first writes a
    partial ``C`` that is read back and added (``m·n``, weighed 3×: measured, a partial costs
    more than a packing).  The cheapest split with pieces of at least :data:`MIN_PIECE` is
    taken: a weight gradient (``k`` the batch, ``C`` small) splits its sum, a layer's forward
    its rows.  ``pieces - 1`` pieces of ``size`` (a multiple of :data:`ALIGN`), the last one
    the rest: as even as ALIGN allows, none shorter than :data:`MIN_PIECE`.  A function of the
    sizes alone."""
    if m * n * k < MIN_SPLIT_WORK:
        return _WHOLE, 1, max(m, 1)
    how, cost, long = _WHOLE, 0, 0
    for option in (_ROWS, _COLUMNS, _TERMS):
        side = m if option == _ROWS else n if option == _COLUMNS else k
        extra = k * n if option == _ROWS else m * k if option == _COLUMNS else 3 * m * n
        if side >= 2 * MIN_PIECE and (how == _WHOLE or extra < cost):
            how, cost, long = option, extra, side
    if how == _WHOLE:
        return _WHOLE, 1, max(m, 1)
    pieces = min(BLOCKS, long // MIN_PIECE)
    return how, pieces, long // pieces // ALIGN * ALIGN  # the last piece takes the rest


@njit(cache=True)
def _block(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, i, how, pieces,
           size, partial):  # type: ignore[no-untyped-def]
    """Piece ``i`` of the product split as :func:`_blocks` says (all of it for ``_WHOLE``).
    A piece of terms other than the first writes its partial product to ``partial[i - 1]``."""
    lo = i * size
    last = i == pieces - 1
    if how == _WHOLE:
        gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc)
    elif how == _ROWS:  # rows lo.. of C: rows lo.. of op(A)
        part = m - lo if last else size
        a_at = ao + (lo if ta else lo * lda)
        gemm(ta, tb, part, n, k, alpha, a, a_at, lda, b, bo, ldb, beta, c, co + lo * ldc, ldc)
    elif how == _COLUMNS:  # columns lo.. of C: columns lo.. of op(B)
        part = n - lo if last else size
        b_at = bo + (lo * ldb if tb else lo)
        gemm(ta, tb, m, part, k, alpha, a, ao, lda, b, b_at, ldb, beta, c, co + lo, ldc)
    else:  # terms lo.. of the sum: columns lo.. of op(A), rows lo.. of op(B)
        part = k - lo if last else size
        a_at = ao + (lo * lda if ta else lo)
        b_at = bo + (lo if tb else lo * ldb)
        if i == 0:
            gemm(ta, tb, m, n, part, alpha, a, a_at, lda, b, b_at, ldb, beta, c, co, ldc)
        else:
            gemm(ta, tb, m, n, part, alpha, a, a_at, lda, b, b_at, ldb, 0.0, partial[i - 1], 0, n)


@njit(cache=True)
def _add_row(c, co, ldc, n, partial, row):  # type: ignore[no-untyped-def]
    """``C[row] += partial[0][row]``, then ``+= partial[1][row]``, … (piece order)."""
    cf = c.reshape(c.size)
    at = co + row * ldc
    for p in range(partial.shape[0]):
        for j in range(n):
            cf[at + j] += partial[p, row, j]


@njit(cache=True)
def _partials(how, pieces, m, n, c):  # type: ignore[no-untyped-def]
    """Room for the partial products of a split sum (none for other splits)."""
    return np.empty((pieces - 1 if how == _TERMS else 0, m, n), c.dtype)


@njit(cache=True)
def gemm_blocks(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc):  # type: ignore[no-untyped-def]
    """``gemm`` split into the pieces of :func:`_blocks`, one after another — or one call when
    BLAS runs on threads of its own (they split it better)."""
    how, pieces, size = _blocks(m, n, k)
    if how == _WHOLE or _blas_threads() > 1:
        gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc)
        return
    partial = _partials(how, pieces, m, n, c)
    for i in range(pieces):
        _block(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, i, how, pieces,
               size, partial)
    if partial.shape[0]:
        for row in range(m):
            _add_row(c, co, ldc, n, partial, row)


@njit(cache=True, parallel=True)
def gemm_blocks_par(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc):  # type: ignore[no-untyped-def]
    """``gemm`` split into the pieces of :func:`_blocks`, spread over Numba's threads: the same
    calls (and the same additions of partial products) as :func:`gemm_blocks`, so the same
    result."""
    how, pieces, size = _blocks(m, n, k)
    if how == _WHOLE:
        gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc)
        return
    partial = _partials(how, pieces, m, n, c)
    for i in prange(pieces):
        _block(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, i, how, pieces,
               size, partial)
    if partial.shape[0]:
        for row in prange(m):
            _add_row(c, co, ldc, n, partial, row)
