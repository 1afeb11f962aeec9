"""The float dtypes a generated module serves, and the name of each kernel per dtype.

A generated module holds every kernel once per dtype, so that float32 data runs in float32
arithmetic (float32 constants, float32 math helpers) and float64 data in float64, from one cache
file: ``forward`` takes float64 arrays, ``forward_f32`` float32 ones.  This module imports
neither SymPy nor Numba: the runtime looks kernels up by these names on a warm start.
"""

from __future__ import annotations

import numpy as np

#: dtype name → suffix of its kernels' names ("" for float64: ``forward``, ``vjp``...).
SUFFIXES: dict[str, str] = {"float64": "", "float32": "_f32"}


def kernel_name(function: str, dtype: np.dtype | str) -> str:
    """The name of ``function``'s kernel for ``dtype`` data (``forward_f32`` for float32)."""
    return function + SUFFIXES[np.dtype(dtype).name]
