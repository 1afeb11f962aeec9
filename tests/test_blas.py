"""symgrad.runtime.blas.gemm: row-major products of strided matrix views against NumPy."""

import itertools

import numpy as np
import pytest

from symgrad.runtime.blas import gemm


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ta, tb", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("m, n, k, pad", [(5, 3, 4, 2), (1, 3, 4, 2), (5, 1, 4, 2), (1, 1, 4, 2),
                                          (1, 3, 4, 0), (5, 1, 4, 0), (1, 1, 1, 0)])
def test_gemm_on_views_inside_larger_arrays(dtype, ta, tb, m, n, k, pad):
    """C[m, n] = alpha·op(A)·op(B) + beta·C with every matrix a strided view at an offset.

    One row or one column (``pad`` 0: contiguous vectors) is a matrix-vector product."""
    rng = np.random.default_rng(0)
    # each matrix sits inside a larger array, at an offset (pad > 0: ld > its width)
    a_rows, a_cols = (k, m) if ta else (m, k)
    b_rows, b_cols = (n, k) if tb else (k, n)
    a = rng.normal(size=(a_rows + 1, a_cols + pad)).astype(dtype)
    b = rng.normal(size=(b_rows + 1, b_cols + pad)).astype(dtype)
    c = rng.normal(size=(m + 1, n + pad)).astype(dtype)
    at = min(pad, 1)  # first column of each view (pad 0: rows are whole, vectors contiguous)
    a_view, b_view = a[1:, at : at + a_cols], b[1:, at : at + b_cols]
    op_a, op_b = (a_view.T if ta else a_view), (b_view.T if tb else b_view)
    for alpha, beta in ((1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)):
        before = c.copy()
        want = before.copy()
        want[1:, at : at + n] = (
            alpha * op_a.astype(np.float64) @ op_b + beta * before[1:, at : at + n]
        )
        lda, ldb, ldc = a.shape[1], b.shape[1], c.shape[1]
        gemm(ta, tb, m, n, k, alpha, a, lda + at, lda, b, ldb + at, ldb, beta, c, ldc + at, ldc)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(c, want, rtol=tol, atol=tol)
        assert c.dtype == dtype


def test_gemm_with_beta_zero_overwrites_nan_and_empty_products():
    a, b = np.ones((2, 0)), np.ones((0, 3))
    c = np.full((2, 3), np.nan)
    gemm(False, False, 2, 3, 0, 1.0, a, 0, 0, b, 0, 3, 0.0, c, 0, 3)
    assert np.array_equal(c, np.zeros((2, 3)))  # an empty sum is 0, whatever C held
    c = np.full((2, 3), np.nan)
    gemm(False, False, 2, 3, 1, 1.0, np.ones((2, 1)), 0, 1, np.ones((1, 3)), 0, 3, 0.0, c, 0, 3)
    assert np.array_equal(c, np.ones((2, 3)))
    gemm(False, False, 0, 3, 1, 1.0, a, 0, 1, b, 0, 3, 0.0, c, 0, 3)  # m = 0: nothing happens
    assert np.array_equal(c, np.ones((2, 3)))
    row = np.full((1, 3), np.nan)  # one row: a matrix-vector product, NaN overwritten too
    gemm(False, False, 1, 3, 2, 1.0, np.ones((1, 2)), 0, 2, np.ones((2, 3)), 0, 3, 0.0, row, 0, 3)
    assert np.array_equal(row, np.full((1, 3), 2.0))
    column = np.full((3, 1), np.nan)
    gemm(False, False, 3, 1, 2, 1.0, np.ones((3, 2)), 0, 2, np.ones((2, 1)), 0, 1, 0.0, column, 0,
         1)
    assert np.array_equal(column, np.full((3, 1), 2.0))
