"""The ``@njit`` line of every generated function, in one place.

Kernels are IEEE computations: no fast-math unless the user asks for it (``make_op(fastmath=
True)``). The vectorised math helpers (``printer.VECTOR_MATH_SOURCE``) are compiled with one
fast-math flag, ``contract``: LLVM may fuse a product and the sum that consumes it into one
fused multiply-add — one rounding instead of two, and half the instructions of their polynomials
(a float32 GELU forward over 3.1M elements, one thread: 8.0–9.4 → 5.2–7.1 ms). Only the helpers:
their bodies are branch-free straight code, inlined the same way into a kernel's serial and
parallel variants, so both fuse the same products and give the same bits at any thread count; a
kernel's own loop is shaped differently in its two variants (``prange`` outlines the body), and
LLVM fuses only within one basic block, so contraction there could make 1 and 2 threads differ.
"""

from __future__ import annotations


def njit(*, parallel: bool = False, fastmath: bool = False, contract: bool = False) -> str:
    """The decorator line: cached, NumPy's error model, IEEE arithmetic.

    ``fastmath=True`` is the user's opt-in to all of LLVM's fast-math; ``contract=True`` allows
    fused multiply-adds only; ``parallel=True`` lets the function's ``prange`` loops run on
    Numba's threads.
    """
    flags = "True" if fastmath else "{'contract'}" if contract else "False"
    tail = ", parallel=True" if parallel else ""
    return f"@njit(cache=True, error_model='numpy', fastmath={flags}{tail})"
