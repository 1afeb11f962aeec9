"""TensorOp: the checked Python wrapper around a tensor op's compiled kernels.

Dims are bound from the arrays' shapes; a dim bound to two different sizes is a
:class:`~symgrad.errors.ShapeError` naming the dim and both arrays.  Arrays must have the
declared rank and one float dtype; non-contiguous arrays are copied.  Float32 arrays run the
module's float32 kernels (``forward_f32``...), float64 arrays its float64 ones.

How the arrays bind the dims is worked out once per op (:class:`_BindPlan`): a call runs a
small generated function of plain ints, and no SymPy — a tiny op's call costs about what its
kernel's does.  Error messages are composed only when a check fails.  A built-in op loaded from
the cache (:mod:`symgrad.runtime.stored`) brings its plan as data: this module imports SymPy
only to build a plan or a spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ArgumentError, DTypeError, IndexRangeError, ShapeError
from .compiled import CompiledOp, Saved
from .elementwise import _as_float_array, canonical_dtype
from .output_pool import empty

if TYPE_CHECKING:  # building a plan or a spec needs SymPy; running a stored op does not
    import sympy as sp

    from ..symbolic.index import TensorDerivation, TensorSpec


def _as_index_array(value: object, what: str) -> np.ndarray:
    """An integer tensor's array, as int64."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise DTypeError(
            f"{what} is an integer tensor (token ids, labels) but has dtype {array.dtype}; "
            "give integers, e.g. np.asarray(ids, dtype=np.int64)"
        )
    return canonical_dtype(array.astype(np.int64, copy=False))


def _local(k: int, axis: int) -> str:
    """The generated functions' name of the size of input ``k``'s axis ``axis``."""
    return f"s{k}_{axis}"


def _int_source(expr: sp.Expr, names: dict[sp.Symbol, str]) -> str:
    """Python source of an integer dim expression, with each dim read from ``names``."""
    import sympy as sp

    from ..codegen.printer import index_code  # floor(D/3 - 1/3) as (D - 1) // 3: exact

    text = index_code(expr.xreplace({d: sp.Symbol(n, integer=True) for d, n in names.items()}))
    exact = all(r.is_Integer for r in expr.atoms(sp.Rational)) and not expr.atoms(sp.Function)
    return text if exact else f"int({text})"


def _tuple(items: Iterable[str]) -> str:
    """Source of a tuple of ``items`` (``(a, )``, ``()``)."""
    return "(" + "".join(f"{item}, " for item in items) + ")"


class _BindPlan:
    """How a call's arrays bind an op's dims, worked out once per op from its spec.

    Every axis of every input *binds* a dim (its first occurrence, input by input, axis by
    axis), or is *checked* against a dim already bound, or against a dim expression (``N - K
    + 1``).  :attr:`fast` is a small generated function of plain ints doing exactly that for
    C-contiguous arrays of one float dtype (int64 for integer tensors): it returns the dtype,
    the dims in ``spec.dims`` order and the output shape — or ``None`` when anything is off,
    and the checked path (:meth:`TensorOp._bind`) converts the arrays or names the mismatch.
    """

    #: the plan's plain part, stored with a cached built-in op (:meth:`data`)
    FIELDS = (
        "names", "integer", "shape_text", "checks", "index_uses", "source", "batch", "out_batch",
    )  # fmt: skip

    def __init__(self, spec: TensorSpec) -> None:
        import sympy as sp

        self.names = tuple(str(b.label) for b in spec.inputs)
        self.integer = tuple(bool(b.is_integer) for b in spec.inputs)
        shapes = [tuple(sp.sympify(d) for d in b.shape) for b in spec.inputs]
        self.shape_text = tuple(tuple(map(str, shape)) for shape in shapes)
        first: dict[sp.Symbol, tuple[int, int]] = {}
        #: (input, axis, input, axis): an axis of a dim and the axis that bound it first
        self.checks: list[tuple[int, int, int, int]] = []
        for k, shape in enumerate(shapes):
            for axis, dim in enumerate(shape):
                if isinstance(dim, sp.Symbol):
                    if dim in first:
                        self.checks.append((k, axis, *first[dim]))
                    else:
                        first[dim] = (k, axis)
        bound = {d: _local(*where) for d, where in first.items()}
        self.first = first  # dim -> (input, axis) that binds it
        # A dim that appears only inside shape expressions (N of an axis 2*N) is solved from
        # the first such axis with it as the one unknown: computed (N = s/2) before the checks,
        # which then test every expression (2*N == s, so 7 is refused).
        size = sp.Symbol("_size", integer=True)
        #: (dim, its solution in ``_size``, input, axis) in the order they are computed
        self.solved: list[tuple[sp.Symbol, sp.Expr, int, int]] = []
        solved_source: list[tuple[str, str]] = []
        progress = True
        while progress:
            progress = False
            for k, shape in enumerate(shapes):
                for axis, dim in enumerate(shape):
                    unknown = dim.free_symbols - set(bound)
                    if isinstance(dim, sp.Symbol) or len(unknown) != 1:
                        continue
                    (symbol,) = unknown
                    found = sp.solve(sp.Eq(dim, size), symbol, dict=False)
                    if len(found) != 1:
                        continue
                    local = f"d{len(self.solved)}"
                    axis_size = sp.Symbol(_local(k, axis), integer=True)
                    solution = found[0].xreplace({size: axis_size})
                    solved_source.append((local, _int_source(solution, bound)))
                    self.solved.append((symbol, found[0], k, axis))
                    bound[symbol] = local
                    progress = True
        self._solved_source = solved_source
        #: (input, axis, the dim expression, its source in the bound sizes — None when it
        #: uses a dim that no axis gives, an error at every call)
        self.derived = [
            (k, axis, dim, _int_source(dim, bound) if dim.free_symbols <= set(bound) else None)
            for k, shape in enumerate(shapes)
            for axis, dim in enumerate(shape)
            if not isinstance(dim, sp.Symbol)
        ]
        # batch axes: inputs whose first dim is the batch dim take any number of leading axes
        batch = getattr(spec, "batch", None)
        self.batch = tuple(
            k for k, shape in enumerate(shapes) if batch is not None and shape and shape[0] == batch
        )
        self.out_batch = bool(
            batch is not None and spec.out and sp.sympify(spec.out_shape[0]) == batch
        )
        dims = [bound.get(d, "None") for d in spec.dims]
        out = [_int_source(d, bound) for d in spec.out_shape]
        # (integer tensor, axis, tensor it indexes, source of that axis's size) per gather
        uses = set()
        for access in spec.expr.atoms(sp.Indexed):
            for axis, (index, dim) in enumerate(
                zip(access.indices, access.base.shape, strict=True)
            ):
                for read in index.atoms(sp.Indexed):
                    if read.base.is_integer:
                        uses.add((str(read.base.label), axis, str(access.base.label), dim))
        index_sizes = []
        self.index_uses: list[tuple[int, int, str]] = []
        for label, axis, base, dim in sorted(uses, key=str):
            self.index_uses.append((self.names.index(label), axis, base))
            index_sizes.append(_int_source(sp.sympify(dim), bound))
        self.fast = self._generate(dims, out, index_sizes)

    def _generate(
        self, dims: list[str], out: list[str], index_sizes: list[str]
    ) -> Callable[[tuple[object, ...]], Any]:
        """The fast path's source (see the class doc), compiled; plain ints and names only."""
        n = len(self.names)
        floats = [k for k in range(n) if not self.integer[k]]
        lines = [
            "def fast(arrays):",
            f"    if len(arrays) != {n}:",
            "        return None",
            f"    {_tuple(f'a{k}' for k in range(n))} = arrays",
        ]
        if n:
            types = " or ".join(f"type(a{k}) is not ndarray" for k in range(n))
            lines += [f"    if {types}:", "        return None"]
        lines.append(f"    dtype = a{floats[0]}.dtype" if floats else "    dtype = F64")
        tests = ["(dtype is not F64 and dtype is not F32)"]
        tests += [f"a{k}.dtype is not dtype" for k in floats[1:]]
        tests += [f"a{k}.dtype is not I64" for k in range(n) if self.integer[k]]
        tests += [f"not a{k}.flags.c_contiguous" for k in range(n)]
        tests += [f"a{k}.ndim != {len(shape)}" for k, shape in enumerate(self.shape_text)]
        lines += [f"    if {' or '.join(tests)}:", "        return None"]
        for k, shape in enumerate(self.shape_text):
            if shape:
                lines.append(f"    {_tuple(_local(k, a) for a in range(len(shape)))} = a{k}.shape")
        lines += [f"    {local} = {source}" for local, source in self._solved_source]
        tests = [f"{_local(k, a)} != {_local(k0, a0)}" for k, a, k0, a0 in self.checks]
        tests += [
            f"{_local(k, a)} != {source}" if source else "True"
            for k, a, _, source in self.derived
        ]
        if tests:
            lines += [f"    if {' or '.join(tests)}:", "        return None"]
        lines.append(f"    return dtype, {_tuple(dims)}, {_tuple(out)}, {_tuple(index_sizes)}")
        self.source = "\n".join(lines)
        return self._compile(self.source)

    @staticmethod
    def _compile(source: str) -> Callable[[tuple[object, ...]], Any]:
        namespace: dict[str, Any] = {
            "ndarray": np.ndarray,
            "F64": np.dtype(np.float64),
            "F32": np.dtype(np.float32),
            "I64": np.dtype(np.int64),
            "int": int,
            "math": math,
        }
        exec(source, namespace)  # built by _generate from ints and names (no user text)
        return namespace["fast"]  # type: ignore[no-any-return]

    def data(self) -> dict[str, Any]:
        """The plan's plain part (JSON-ready): what a call needs when nothing fails."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def stored(cls, data: dict[str, Any]) -> _BindPlan:
        """A plan from :meth:`data`, without SymPy; its checked path's messages need the full
        plan (:meth:`TensorOp._checked_plan`)."""
        plan = cls.__new__(cls)
        plan.names = tuple(data["names"])
        plan.integer = tuple(bool(v) for v in data["integer"])
        plan.shape_text = tuple(tuple(s) for s in data["shape_text"])
        plan.checks = [tuple(c) for c in data["checks"]]  # type: ignore[misc]
        plan.index_uses = [tuple(u) for u in data["index_uses"]]  # type: ignore[misc]
        plan.batch = tuple(int(k) for k in data["batch"])
        plan.out_batch = bool(data["out_batch"])
        plan.source = str(data["source"])
        plan.fast = cls._compile(plan.source)
        return plan


class TensorOp(CompiledOp["TensorDerivation"]):
    """A compiled tensor op.  Create it with :func:`symgrad.tensor_op`.

    ``op(*arrays)`` is the forward, ``op.vjp(*arrays, grad_output)`` returns one gradient per
    input, ``op.source`` the generated source, ``op.derivation()`` the symbolic derivation.
    """

    def __init__(
        self,
        spec: TensorSpec,
        path: Path,
        derive: Callable[[], TensorDerivation],
        derivation: TensorDerivation | None,
        emit: Callable[[TensorDerivation], str],
    ) -> None:
        super().__init__(spec.name, path, derive, derivation, emit, spec.key)
        self._spec: TensorSpec | None = spec
        self._spec_factory: Callable[[], TensorSpec] = lambda: spec
        self.input_names = tuple(str(b.label) for b in spec.inputs)
        self._wrt = tuple(spec.inputs.index(b) for b in spec.wrt)
        self._plan = _BindPlan(spec)
        self._full_plan: _BindPlan | None = self._plan

    @classmethod
    def stored(
        cls,
        name: str,
        key: str,
        path: Path,
        plan: dict[str, Any],
        wrt: tuple[int, ...],
        spec: Callable[[], TensorSpec],
        derive: Callable[[], TensorDerivation],
        emit: Callable[[TensorDerivation], str],
    ) -> TensorOp:
        """An op from the cache without SymPy: its plan as data, its spec built by ``spec``
        on first use (a derivation printout, an error message)."""
        op = cls.__new__(cls)
        CompiledOp.__init__(op, name, path, derive, None, emit, key)
        op._spec, op._spec_factory = None, spec
        op._plan = _BindPlan.stored(plan)
        op._full_plan = None
        op.input_names = op._plan.names
        op._wrt = tuple(wrt)
        return op

    @property
    def spec(self) -> TensorSpec:
        """The validated formula (built on first use for an op loaded from the cache)."""
        if self._spec is None:
            self._spec = self._spec_factory()
        return self._spec

    def _checked_plan(self) -> _BindPlan:
        """The full plan (with the dims' formulas, for messages; SymPy)."""
        if self._full_plan is None:
            self._full_plan = _BindPlan(self.spec)
        return self._full_plan

    def __repr__(self) -> str:
        return f"<symgrad tensor op {self.name}({', '.join(self.input_names)})>"

    def _bound(
        self, arrays: tuple[object, ...], found: Any
    ) -> tuple[tuple[Any, ...], np.dtype, tuple[int, ...], tuple[int, ...]]:
        """The arrays, ready for a kernel, their dtype, the dims and the output shape, given
        what the plan's fast path ``found`` for them (``None``: take the checked path)."""
        if found is None:
            checked = self._bind(arrays)
            found = self._plan.fast(checked)
            if found is None:  # pragma: no cover - _bind raises on anything fast rejects
                raise AssertionError(f"op {self.name!r}: inconsistent shape checks")
            arrays = checked
        dtype, dims, out_shape, index_sizes = found
        if index_sizes:
            self._check_index_ranges(arrays, index_sizes)
        return arrays, dtype, dims, out_shape

    def _bind(self, arrays: tuple[object, ...]) -> tuple[np.ndarray, ...]:
        """The checked path: convert the arrays (integer tensors to int64, non-contiguous
        arrays copied) and raise the error that names what does not fit."""
        plan = self._plan
        n = len(plan.names)
        if len(arrays) != n:
            raise ArgumentError(
                f"op {self.name!r} takes {n} array(s) ({', '.join(plan.names)}), "
                f"got {len(arrays)}"
            )
        checked = [
            _as_index_array(a, f"op {self.name!r} input {nm!r}")
            if integer
            else _as_float_array(a, f"op {self.name!r} input {nm!r}")
            for nm, integer, a in zip(plan.names, plan.integer, arrays, strict=True)
        ]
        floats = [
            (nm, a)
            for nm, integer, a in zip(plan.names, plan.integer, checked, strict=True)
            if not integer
        ]
        if len({a.dtype for _, a in floats}) > 1:
            listing = ", ".join(f"{nm}: {a.dtype}" for nm, a in floats)
            raise DTypeError(
                f"op {self.name!r}: inputs have different dtypes ({listing}); cast them to one"
            )
        for nm, shape, a in zip(plan.names, plan.shape_text, checked, strict=True):
            if a.ndim != len(shape):
                raise ShapeError(
                    f"op {self.name!r}: input {nm!r} must have {len(shape)} dims "
                    f"{shape}, got an array of shape {a.shape}"
                )
        for k, axis, k0, axis0 in plan.checks:
            size, bound = checked[k].shape[axis], checked[k0].shape[axis0]
            if size != bound:
                raise ShapeError(
                    f"op {self.name!r}: dim {plan.shape_text[k][axis]} is {bound} in "
                    f"{plan.names[k0]!r} (shape {checked[k0].shape}) but {size} in "
                    f"{plan.names[k]!r} (axis {axis}, shape {checked[k].shape})"
                )
        ready = tuple(a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in checked)
        if plan.fast(ready) is not None:
            return ready
        # only a dim given by an expression (N - K + 1) is left to fail: name it (SymPy)
        import sympy as sp

        full = self._checked_plan()
        sizes = {d: checked[k].shape[axis] for d, (k, axis) in full.first.items()}
        for symbol, solution, k, axis in full.solved:
            value = solution.xreplace({sp.Symbol("_size", integer=True): checked[k].shape[axis]})
            value = value.xreplace(sizes)
            if not value.is_Integer or value < 0:
                raise ShapeError(
                    f"op {self.name!r}: axis {axis} of {plan.names[k]!r} (shape "
                    f"{checked[k].shape}) should be {plan.shape_text[k][axis]}, but no whole "
                    f"{symbol} gives {checked[k].shape[axis]}"
                )
            sizes[symbol] = int(value)
        for k, axis, dim, _ in full.derived:
            size, expected = checked[k].shape[axis], dim.xreplace(sizes)
            if expected.free_symbols:
                raise ShapeError(
                    f"op {self.name!r}: dim(s) {sorted(map(str, expected.free_symbols))} cannot "
                    "be found from the arrays' shapes; give some input an axis of that dim alone"
                )
            if not expected.is_Integer or int(expected) != size:
                raise ShapeError(
                    f"op {self.name!r}: axis {axis} of {plan.names[k]!r} (shape "
                    f"{checked[k].shape}) should be {dim} = {expected}, got {size}"
                )
        return ready

    def _check_index_ranges(self, arrays: tuple[Any, ...], sizes: tuple[int, ...]) -> None:
        """Every integer tensor's values must lie within each axis it subscripts: the
        compiled loops do not check bounds (a bad token id would read or write memory)."""
        for (k, axis, base), size in zip(self._plan.index_uses, sizes, strict=True):
            values = arrays[k]
            if values.size and (values.min() < 0 or values.max() >= size):
                raise IndexRangeError(
                    f"op {self.name!r}: integer input {self._plan.names[k]!r} holds values in "
                    f"[{values.min()}, {values.max()}], but it indexes axis {axis} of "
                    f"{base!r}, of size {size} (valid: 0 to {size - 1})"
                )

    def _flatten_batch(
        self, arrays: tuple[object, ...]
    ) -> tuple[tuple[object, ...], tuple[int, ...] | None]:
        """The inputs with their leading (batch) axes flattened into one, and those axes'
        shape (None for an op without a batch dim); see ``batch`` in :func:`symgrad.tensor_op`."""
        plan = self._plan
        if not plan.batch or len(arrays) != len(plan.names):
            return arrays, None
        lead: tuple[int, ...] | None = None
        flat = list(arrays)
        for k in plan.batch:
            rest = len(plan.shape_text[k]) - 1
            array = np.asarray(arrays[k])
            if array.ndim < rest:
                raise ShapeError(
                    f"op {self.name!r}: input {plan.names[k]!r} must have at least {rest} dims "
                    f"{plan.shape_text[k][1:]} after its batch axes, got shape {array.shape}"
                )
            here = array.shape[: array.ndim - rest]
            if lead is not None and here != lead:
                raise ShapeError(
                    f"op {self.name!r}: the batch axes of the inputs differ: {lead} and {here} "
                    f"(input {plan.names[k]!r}, shape {array.shape})"
                )
            lead = here
            flat[k] = array.reshape((math.prod(here), *array.shape[array.ndim - rest :]))
        return tuple(flat), lead

    def _unflatten(self, shape: tuple[int, ...], lead: tuple[int, ...] | None) -> tuple[int, ...]:
        """The output's shape with its batch axis as the inputs' leading axes."""
        if lead is None or not self._plan.out_batch:
            return shape
        return (*lead, *shape[1:])

    def output_shape(self, *arrays: object) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of ``op(*arrays)``, its arguments checked, nothing computed."""
        flat, lead = self._flatten_batch(arrays)
        _, dtype, _, shape = self._bound(flat, self._plan.fast(flat))
        return self._unflatten(shape, lead), dtype

    def __call__(self, *arrays: object) -> np.ndarray:
        """Forward: the output tensor, of shape given by the ``out`` indices' ranges."""
        arrays, lead = self._flatten_batch(arrays)
        found = self._plan.fast(arrays)
        if found is not None and not found[3]:  # the common case: nothing to convert
            dtype, dims, shape, _ = found
        else:
            arrays, dtype, dims, shape = self._bound(arrays, found)
        out = empty(shape if shape else (1,), dtype)
        self._run("forward", dtype, *arrays, *dims, out)
        return out.reshape(self._unflatten(shape, lead)) if shape else out.reshape(())

    def forward_saved(self, *arrays: object) -> tuple[np.ndarray, Saved | None]:
        """The forward, and what it saved for the VJP (``None`` when the VJP reads nothing
        saved): ``out, saved = op.forward_saved(*inputs)``, later
        ``op.vjp(*inputs, grad_output, saved=saved)`` — the same gradients as the plain
        ``vjp``, without recomputing the row statistics (or ``exp``) the forward had."""
        layout = getattr(self.module, "RESIDUALS", None)
        if layout is None:
            return self(*arrays), None
        flat, lead = self._flatten_batch(arrays)
        checked, dtype, dims, shape = self._bound(flat, self._plan.fast(flat))
        out = empty(shape if shape else (1,), dtype)
        residuals = tuple(empty(tuple(shape[k] for k in axes), dtype) for axes in layout)
        self._run("forward_saved", dtype, *checked, *dims, out, *residuals)
        shown = out.reshape(self._unflatten(shape, lead)) if shape else out.reshape(())
        return shown, Saved(out, residuals)

    def vjp(self, *arrays_and_grad: object, saved: Saved | None = None) -> tuple[Any, ...]:
        """``op.vjp(*inputs, grad_output)``: one gradient per input, of its shape and dtype
        (``None`` for integer inputs and inputs left out of ``wrt``).

        ``saved``: what :meth:`forward_saved` returned for these inputs; the VJP then reads
        the saved residuals instead of recomputing them.
        """
        if not arrays_and_grad:
            raise ArgumentError(f"op {self.name!r}: vjp takes the inputs and then grad_output")
        *arrays, grad_output = arrays_and_grad
        given = tuple(arrays)
        flat, lead = self._flatten_batch(given)
        checked, dtype, dims, shape = self._bound(flat, self._plan.fast(flat))
        g = np.asarray(grad_output)
        if g.dtype.kind not in "iuf" or g.dtype == np.bool_:
            raise DTypeError(
                f"op {self.name!r}: grad_output has dtype {g.dtype}; give a float array"
            )
        expected = self._unflatten(shape, lead)
        if g.shape != expected:
            raise ShapeError(
                f"op {self.name!r}: grad_output has shape {g.shape}, the output has shape "
                f"{expected}"
            )
        g = g.reshape(shape)
        # a scalar cotangent is passed as a scalar of the data's dtype (a Python float would
        # turn the float32 kernel's arithmetic into float64)
        g_arg: Any = dtype.type(g) if not shape else np.ascontiguousarray(g, dtype=dtype)
        grads = [empty(checked[n].shape, dtype) for n in self._wrt]
        if saved is not None:
            self._run("vjp_saved", dtype, *checked, *dims, saved.out, *saved.arrays, g_arg, *grads)
        else:
            self._run("vjp", dtype, *checked, *dims, g_arg, *grads)
        result: list[np.ndarray | None] = [None] * len(checked)
        for n, grad in zip(self._wrt, grads, strict=True):
            result[n] = grad.reshape(np.asarray(given[n]).shape) if lead is not None else grad
        return tuple(result)

