"""Front end: define an op from a formula, get back a compiled, checked op.

:func:`elementwise` runs the pipeline of DESIGN.md — validate (``OpSpec``) → derive and
stabilize (``Derivation``) → emit (``KernelSource``) → write to the cache and compile — and
returns an :class:`~symgrad.runtime.elementwise.ElementwiseOp`.  When the cache already holds a
verified module for the same spec and toolchain, derivation is skipped (it runs lazily if
``op.derivation()`` is asked for), which keeps a warm start fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import sympy as sp

from .builtins import get_builtin
from .codegen.emit import emit_elementwise
from .codegen.printer import check_supported
from .runtime.cache import module_path, verified_text, write_source
from .runtime.elementwise import ElementwiseOp
from .symbolic.derive import Derivation, derive_elementwise
from .symbolic.spec import OpSpec, elementwise_spec

_OPS: dict[str, ElementwiseOp] = {}


def _derive_checked(spec: OpSpec) -> Derivation:
    derivation = derive_elementwise(spec)
    for partial in derivation.partials:
        check_supported(partial.final, spec.name, f"the derivative with respect to {partial.wrt}")
    return derivation


def elementwise(
    expr: sp.Expr,
    inputs: Iterable[sp.Symbol],
    name: str,
    constants: Mapping[sp.Symbol | str, object] | None = None,
    *,
    fastmath: bool = False,
    parallel: bool = False,
) -> ElementwiseOp:
    """Compile a scalar formula into an elementwise op with derived gradients.

    Args:
        expr: a SymPy expression in the ``inputs`` (and ``constants``).
        inputs: the input symbols, in call order; each becomes an array argument.
        name: a Python identifier naming the op (in kernels, cache files and printouts).
        constants: values for the formula's other free symbols, e.g. ``{alpha: 0.01}``.
        fastmath: compile with LLVM fast-math (faster, may break float64 agreement).
        parallel: parallelise the element loop over cores (``numba.prange``).

    Returns:
        An op: ``op(*arrays)``, ``op.vjp(*arrays, grad_output)``, ``op.value_and_vjp(...)``,
        ``op.derivation()``, ``op.source``.  Arrays are float32 or float64, any shape.

    Raises:
        UnboundSymbolError, UnsupportedFunctionError, NonDifferentiableError, DefinitionError:
        at definition time, naming what is wrong.

    >>> import numpy as np, sympy as sp, symgrad as sg
    >>> x = sp.Symbol("x", real=True)
    >>> softsign = sg.elementwise(x / (1 + sp.Abs(x)), inputs=[x], name="softsign")
    >>> softsign(np.array([-1.0, 0.0, 3.0]))
    array([-0.5 ,  0.  ,  0.75])
    >>> softsign.vjp(np.array([-1.0, 0.0, 3.0]), np.ones(3))[0]
    array([0.25  , 1.    , 0.0625])
    """
    spec = elementwise_spec(expr, inputs, name, constants, fastmath=fastmath, parallel=parallel)
    if spec.key in _OPS:
        return _OPS[spec.key]
    check_supported(spec.expr, spec.name)
    path = module_path(spec.name, spec.key)
    derivation = None
    if verified_text(path) is None:
        derivation = _derive_checked(spec)
        source = emit_elementwise(derivation, spec.key, fastmath, parallel)
        write_source(path, source.text)
    op = ElementwiseOp(spec, path, lambda: _derive_checked(spec), derivation)
    _OPS[spec.key] = op
    return op


def builtin(name: str, **params: float) -> ElementwiseOp:
    """A built-in op by name, with torch's parameters (e.g. ``builtin("elu", alpha=0.5)``).

    >>> import numpy as np, symgrad as sg
    >>> sg.builtin("relu")(np.array([-1.0, 2.0]))
    array([0., 2.])
    """
    entry = get_builtin(name)
    formula, constants = entry.expr(**params)
    return elementwise(formula, inputs=entry.inputs, name=name, constants=constants)
