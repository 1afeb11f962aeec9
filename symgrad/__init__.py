"""symgrad: a symbolic-to-numeric derivative compiler.

Write the forward math of an op once, as a SymPy expression; symgrad derives its gradients
symbolically, makes them numerically stable, and compiles them into cached Numba kernels.

>>> import numpy as np, sympy as sp, symgrad as sg
>>> x = sp.Symbol("x", real=True)
>>> op = sg.elementwise(x**2, inputs=[x], name="square")
>>> op.vjp(np.array([3.0]), np.array([1.0]))[0]
array([6.])
"""

from ._version import __version__
from .api import builtin, elementwise, tensor_op
from .builtins import BUILTINS, TENSOR_BUILTINS
from .errors import SymgradError
from .functional import grad, hessian, hvp, jvp, vjp
from .symbolic.index import index_sum

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
