"""symgrad: a symbolic-to-numeric derivative compiler.

Write the forward math of an op once, as a SymPy expression; symgrad derives its gradients
symbolically, makes them numerically stable, and compiles them into cached Numba kernels.

>>> import numpy as np, sympy as sp, symgrad as sg
>>> x = sp.Symbol("x", real=True)
>>> op = sg.elementwise(x**2, inputs=[x], name="square")
>>> op.vjp(np.array([3.0]), np.array([1.0]))[0]
array([6.])
"""

import os as _os
import sys as _sys
from importlib import import_module
from typing import Any

from ._version import __version__
from .errors import SymgradError


def _reserve_threads() -> None:
    """Numba fixes the size of its thread pool when it is first imported: make room for
    ``SYMGRAD_NUM_THREADS`` threads if it asks for more (:mod:`symgrad.runtime.threads`)."""
    text = _os.environ.get("SYMGRAD_NUM_THREADS", "").strip()
    if "numba" in _sys.modules or not text.isdigit():
        return  # a bad value is reported when the threads are first used
    pool = _os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if int(text) > (int(pool) if pool.isdigit() else _os.cpu_count() or 1):
        _os.environ["NUMBA_NUM_THREADS"] = text


_reserve_threads()

# The rest loads on first use (PEP 562): SymPy takes half a second to import, and a process
# that only runs compiled kernels from a warm cache (a fused training step) never needs it.
_LAZY = {
    "builtin": ".api",
    "elementwise": ".api",
    "tensor_op": ".api",
    "BUILTINS": ".builtins",
    "TENSOR_BUILTINS": ".builtins",
    "grad": ".functional",
    "hessian": ".functional",
    "hvp": ".functional",
    "jvp": ".functional",
    "vjp": ".functional",
    "index_sum": ".symbolic.index",
    "output_pool_limit": ".runtime.output_pool",
    "release_output_pool": ".runtime.output_pool",
    "set_output_pool_limit": ".runtime.output_pool",
    "get_num_threads": ".runtime.threads",
    "num_threads": ".runtime.threads",
    "set_num_threads": ".runtime.threads",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'symgrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BUILTINS",
    "TENSOR_BUILTINS",
    "SymgradError",
    "__version__",
    "builtin",
    "elementwise",
    "get_num_threads",
    "grad",
    "hessian",
    "hvp",
    "index_sum",
    "jvp",
    "num_threads",
    "output_pool_limit",
    "release_output_pool",
    "set_num_threads",
    "set_output_pool_limit",
    "tensor_op",
    "vjp",
]
