"""Front end: define an op from a formula, get back a compiled, checked op.

:func:`elementwise` runs the pipeline of DESIGN.md — validate (``OpSpec``) → derive and
stabilize (``Derivation``) → emit (``KernelSource``) → write to the cache and compile — and
returns an :class:`~symgrad.runtime.elementwise.ElementwiseOp`.  When the cache already holds a
verified module for the same spec and toolchain, derivation is skipped (it runs lazily if
``op.derivation()`` is asked for), which keeps a warm start fast; a built-in op asked for
before is found without building its formula at all (:mod:`symgrad.runtime.stored`), so this
module imports SymPy only on the way to deriving something.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import DefinitionError
from .runtime import stored
from .runtime.cache import module_path, verified_text, write_source
from .runtime.elementwise import ElementwiseOp
from .runtime.tensor import TensorOp

if TYPE_CHECKING:
    import sympy as sp

    from .symbolic.derive import Derivation
    from .symbolic.index import TensorDerivation, TensorSpec
    from .symbolic.spec import OpSpec

_OPS: dict[str, ElementwiseOp | TensorOp] = {}
_BUILTINS: dict[str, ElementwiseOp | TensorOp] = {}  # built-in request → op (see builtin)
D = TypeVar("D", "Derivation", "TensorDerivation")


def _derive_checked(spec: OpSpec) -> Derivation:
    from .codegen.printer import check_supported
    from .symbolic.derive import derive_elementwise

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
    wrt: Iterable[sp.Symbol | str] | None = None,
) -> ElementwiseOp:
    """Compile a scalar formula into an elementwise op with derived gradients.

    Args:
        expr: a SymPy expression in the ``inputs`` (and ``constants``).
        inputs: the input symbols, in call order; each becomes an array argument.
        name: a Python identifier naming the op (in kernels, cache files and printouts).
        constants: values for the formula's other free symbols, e.g. ``{alpha: 0.01}``.
        fastmath: compile with LLVM fast-math (faster, may break float64 agreement).
        parallel: parallelise the element loop over cores (``numba.prange``).
        wrt: the inputs that get a gradient (symbols or names; default: all).  The kernels
            compute and store only these; ``op.vjp`` returns ``None`` for the others.

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
    from .symbolic.spec import elementwise_spec

    spec = elementwise_spec(
        expr, inputs, name, constants, fastmath=fastmath, parallel=parallel, wrt=wrt
    )
    return _elementwise_op(spec)


def _elementwise_op(spec: OpSpec) -> ElementwiseOp:
    """The op of an elementwise spec (the one already made, if any)."""
    from .codegen.emit import emit_elementwise
    from .codegen.printer import check_supported

    if spec.key in _OPS:
        return _OPS[spec.key]  # type: ignore[return-value]
    check_supported(spec.expr, spec.name)

    def emit(d: Derivation) -> str:
        return emit_elementwise(d, spec.key, spec.fastmath, spec.parallel).text

    path, derivation = _build(spec.name, spec.key, lambda: _derive_checked(spec), emit)
    op = ElementwiseOp(spec, path, lambda: _derive_checked(spec), derivation, emit)
    op.recipe = (_elementwise_op, (spec,))  # how a pickled op is made again
    _OPS[spec.key] = op
    return op


def _build(
    name: str, key: str, derive: Callable[[], D], emit: Callable[[D], str]
) -> tuple[Path, D | None]:
    """The cached module of an op, derived and emitted only when the cache has no valid copy."""
    path = module_path(name, key)
    if verified_text(path, key) is not None:
        return path, None
    derivation = derive()
    write_source(path, emit(derivation))
    return path, derivation


def _without_deltas(expr: sp.Expr) -> sp.Expr:
    """``expr`` for the support check: a Kronecker delta in a tensor formula is lowered (a
    scatter-add, or an index test), not printed as a function."""
    import sympy as sp

    return expr.xreplace(dict.fromkeys(expr.atoms(sp.KroneckerDelta), sp.S.One))


def tensor_op(
    expr: sp.Expr,
    out: Iterable[sp.Symbol],
    inputs: Iterable[sp.IndexedBase],
    name: str,
    constants: Mapping[sp.Symbol | str, object] | None = None,
    wrt: Iterable[sp.IndexedBase | str] | None = None,
    out_shape: Iterable[object] | None = None,
    batch: sp.Symbol | None = None,
) -> TensorOp:
    """Compile a tensor formula in index notation into an op with derived VJPs.

    Args:
        expr: the output element, over ``IndexedBase`` tensors declared with symbolic shapes,
            the output indices and ``sympy.Sum``s over declared dims (or :func:`index_sum`).
        out: the output indices, in axis order (empty for a scalar output).
        inputs: the input tensors, in call order.
        name: a Python identifier naming the op.
        constants: values for other free symbols (e.g. ``{eps: 1e-5}``).
        wrt: the inputs (tensors or their names) that get a gradient (default: all but
            integer tensors); ``op.vjp``
            returns ``None`` for the others.
        out_shape: the output's shape, in dims (e.g. ``(B, O, L - K + 3)``); by default each
            output index runs as far as every tensor read it appears in stays in range
            (``l`` in ``X[b, c, l + q]`` up to ``L - K``).  A read outside its tensor is 0
            (zero padding).
        batch: a dim of the shapes that stands for any number of leading axes (the first
            axis of each tensor that has it, and of the output): declared ``(B, N)`` and read
            ``X[b, j]``, the op takes ``X`` of shape ``(N,)``, ``(B, N)``, ``(B, S, N)``...; the
            leading axes of every such input must agree, and the output and the gradients
            keep them.  One formula then serves every rank (a linear layer over a sequence).

    An input declared ``IndexedBase("ids", shape=(B, T), integer=True)`` is an integer tensor:
    token ids or labels that subscript other tensors (``E[ids[b, t], d]``, a gather).  Its
    arrays must hold integers within the axis they index; it has no gradient, and the
    gradient of the gathered tensor comes out of the index calculus as a scatter-add.

    >>> import numpy as np, sympy as sp, symgrad as sg
    >>> b, i, j = sp.symbols("b i j", integer=True)
    >>> B, N, M = sp.symbols("B N M", integer=True, positive=True)
    >>> X = sp.IndexedBase("X", shape=(B, N))
    >>> W = sp.IndexedBase("W", shape=(M, N))
    >>> matvec = sg.tensor_op(sp.Sum(W[i, j] * X[b, j], (j, 0, N - 1)), out=(b, i),
    ...                       inputs=[X, W], name="doc_matmul")
    >>> matvec(np.ones((2, 3)), np.arange(12.0).reshape(4, 3))
    array([[ 3., 12., 21., 30.],
           [ 3., 12., 21., 30.]])
    """
    from .symbolic.index import tensor_spec

    return _tensor_op(tensor_spec(expr, out, inputs, name, constants, wrt, out_shape, batch))


def _tensor_derive(spec: TensorSpec) -> TensorDerivation:
    from .codegen.printer import check_supported
    from .symbolic.index import derive_tensor

    derivation = derive_tensor(spec)
    for p in derivation.partials:
        check_supported(_without_deltas(p.final), spec.name, f"the gradient of {p.wrt}")
    return derivation


def _tensor_op(spec: TensorSpec) -> TensorOp:
    from .codegen.lower import emit_tensor
    from .codegen.printer import check_supported

    if spec.key in _OPS:
        return _OPS[spec.key]  # type: ignore[return-value]
    check_supported(_without_deltas(spec.expr), spec.name)

    def derive() -> TensorDerivation:
        return _tensor_derive(spec)

    def emit(d: TensorDerivation) -> str:
        return emit_tensor(d, spec.key).text

    path, derivation = _build(spec.name, spec.key, derive, emit)
    op = TensorOp(spec, path, derive, derivation, emit)
    op.recipe = (_tensor_op, (spec,))  # how a pickled op is made again
    _OPS[spec.key] = op
    return op


def builtin(
    name: str, *, wrt: Iterable[str] | None = None, **params: Any
) -> ElementwiseOp | TensorOp:
    """A built-in op by name, with torch's parameters (e.g. ``builtin("elu", alpha=0.5)``).

    ``wrt`` names the inputs that get a gradient (default: the built-in's own choice, every
    float input for most): ``builtin("bce_with_logits", wrt=["x"])`` computes no gradient for
    the targets, ``builtin("linear", wrt=["W", "c"])`` none for the layer's input.

    >>> import numpy as np, symgrad as sg
    >>> sg.builtin("relu")(np.array([-1.0, 2.0]))
    array([0., 2.])
    """
    chosen = None if wrt is None else _wrt_names(name, wrt)
    request = stored.request_key(name, params, chosen)
    found = _BUILTINS.get(request)
    if found is not None:
        return found

    def built() -> ElementwiseOp | TensorOp:
        return _built(name, params, chosen)

    op = stored.load(
        name,
        request,
        lambda: built().spec,
        lambda: built().derivation(),
        lambda d: built()._emit(d),
    )
    if op is None:
        op = built()
        stored.save(request, op)
    op.origin = (name, dict(params))
    op.recipe = (_builtin_op, (name, dict(params), chosen))  # made again by name, no SymPy
    _BUILTINS[request] = op
    return op


def _builtin_op(
    name: str, params: dict[str, Any], wrt: tuple[str, ...] | None
) -> ElementwiseOp | TensorOp:
    """``builtin(name, wrt=wrt, **params)``: what an unpickled built-in op is."""
    return builtin(name, wrt=wrt, **params)


def _built(
    name: str, params: Mapping[str, Any], wrt: tuple[str, ...] | None
) -> ElementwiseOp | TensorOp:
    """The built-in ``name`` built from its formula (SymPy; its kernels from the cache if
    there)."""
    from .builtins import TensorBuiltin, get_builtin

    entry = get_builtin(name)
    if isinstance(entry, TensorBuiltin):
        expr, out, inputs, constants = entry.build(**params)
        chosen = entry.wrt if wrt is None else wrt
        return tensor_op(
            expr, out=out, inputs=inputs, name=name, constants=constants, wrt=chosen,
            batch=entry.batch, out_shape=entry.out_shape(**params),
        )  # fmt: skip
    formula, constants = entry.expr(**params)
    return elementwise(formula, inputs=entry.inputs, name=name, constants=constants, wrt=wrt)


#: (op key, inputs named in wrt) → the op derived so: each variant derived once per process
_WITH_WRT: dict[tuple[str, tuple[str, ...]], ElementwiseOp | TensorOp] = {}


def with_wrt(op: ElementwiseOp | TensorOp, wrt: Iterable[str]) -> ElementwiseOp | TensorOp:
    """``op`` derived again with gradients for the inputs named ``wrt`` only (a built-in keeps
    its parameters; a user op its formula, constants and options); ``op`` itself when those
    are its gradients already.  Each variant is derived once per process (and its kernels
    cached on disk as any op's)."""
    names = tuple(wrt)
    if names == tuple(op.input_names[k] for k in op._wrt):
        return op
    key = (op.key, names)
    found = _WITH_WRT.get(key)
    if found is None:
        found = _WITH_WRT[key] = _derived_with_wrt(op, list(names))
    return found


#: An op's VJP leaves out the gradients nobody reads (a model's first layer's input gradient)
#: when the inputs they belong to hold at least this many elements together: the op is then
#: derived again without them (:func:`with_wrt`, once per process, its kernels cached on disk).
#: Below it, computing an unread gradient costs less than deriving and compiling a variant.
SKIP_GRADIENT_MIN = 1 << 16


def for_gradients(
    op: ElementwiseOp | TensorOp, arrays: tuple[Any, ...], needed: list[bool]
) -> ElementwiseOp | TensorOp:
    """The op whose VJP gives the gradients of the inputs ``needed`` marks (``arrays`` as the
    op is called): ``op``, or its variant without large unread gradients
    (:data:`SKIP_GRADIENT_MIN`).  Either computes the needed gradients the same way up to
    rounding (the same formulas, shared subexpressions computed once either way)."""
    wrt = getattr(op, "_wrt", ())
    skipped = [k for k in wrt if not needed[k]]
    keep = [k for k in wrt if needed[k]]
    if not skipped or not keep:
        return op
    if sum(int(getattr(arrays[k], "size", 1)) for k in skipped) < SKIP_GRADIENT_MIN:
        return op
    return with_wrt(op, [op.input_names[k] for k in keep])


def _derived_with_wrt(op: ElementwiseOp | TensorOp, names: list[str]) -> ElementwiseOp | TensorOp:
    origin = getattr(op, "origin", None)
    if origin is not None:
        name, params = origin
        return builtin(name, wrt=names, **params)
    # A user op: its validated spec with only the gradients changed, so every other option
    # (out_shape, batch, constants, fastmath, parallel...) stays as the user gave it.
    chosen = set(names)
    if isinstance(op, TensorOp):
        t = op.spec
        wrt = tuple(b for b in t.inputs if str(b.label) in chosen)
        return _tensor_op(dataclasses.replace(t, wrt=wrt))
    e = op.spec
    return _elementwise_op(
        dataclasses.replace(e, wrt=tuple(s for s in e.inputs if s.name in chosen))
    )


def _wrt_names(op: str, wrt: object) -> tuple[str, ...]:
    if isinstance(wrt, str) or not isinstance(wrt, Iterable):
        raise DefinitionError(
            f"op {op!r}: wrt is a list of input names, e.g. wrt=['x'], got {wrt!r}"
        )
    return tuple(str(w) for w in wrt)
