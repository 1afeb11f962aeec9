"""symgrad: a symbolic-to-numeric derivative compiler.

Write the forward math of an op once, as a SymPy expression; symgrad derives its gradients
symbolically, makes them numerically stable, and compiles them into cached Numba kernels.

>>> import numpy as np, sympy as sp, symgrad as sg
>>> x = sp.Symbol("x", real=True)
>>> op = sg.elementwise(x**2, inputs=[x], name="square")
>>> op.vjp(np.array([3.0]), np.array([1.0]))[0]
array([6.])
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .errors import SymgradError

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
    "grad",
    "hessian",
    "hvp",
    "index_sum",
    "jvp",
    "tensor_op",
    "vjp",
]
