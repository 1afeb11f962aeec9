"""CompiledOp: what every compiled op wrapper shares — its cached module, source, derivation.

:class:`~symgrad.runtime.elementwise.ElementwiseOp` and :class:`~symgrad.runtime.tensor.TensorOp`
check arguments their own way; both hold a generated module in the kernel cache, its verified
source, and a derivation that is derived on first use when the op was loaded from a warm cache.

The module is imported on first call, from text verified against its hash and its op's spec key
at that moment: a file changed or deleted since the op was defined is regenerated (derived and
emitted again), never run.  A kernel call that fails *inside Numba's own cache* (a corrupt
index or data file fails on load) drops the module's compiled binaries, re-imports it and retries
once; any other error — a typing error, a bad argument — is the caller's, and propagates as is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import numpy as np

from ..codegen.dtypes import kernel_name
from ..errors import SymgradError
from .cache import ensure_imported, import_module, purge_compiled, verified_text, write_source
from .threads import use_parallel

D = TypeVar("D")

_NUMBA_CACHE = os.path.join("numba", "core", "caching.py")


def _raised_in_numba_cache(err: BaseException) -> bool:
    """Whether ``err`` was raised while Numba loaded its cache files (index or binaries)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_NUMBA_CACHE):
            return True
        tb = tb.tb_next
    return False


@dataclass(frozen=True)
class Saved:
    """What an op's forward kept for its VJP (``op.forward_saved``): the output as the kernel
    wrote it, and the arrays its derived VJP reads instead of recomputing them — a tensor op's
    residuals (row statistics), an elementwise op's local partial derivatives."""

    out: np.ndarray
    arrays: tuple[np.ndarray, ...]


class CompiledOp(Generic[D]):
    """The parts of a compiled op that do not depend on its kind.

    ``derive`` derives the op, ``emit`` turns a derivation into the module's source text
    (used again if the cached file is damaged or gone), ``key`` is the op's spec key.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        derive: Callable[[], D],
        derivation: D | None,
        emit: Callable[[D], str],
        key: str,
    ) -> None:
        self.name = name
        #: the spec's content hash: the formula, inputs, gradients and constants
        self.key = key
        self._path = path
        self._derive = derive
        self._derivation = derivation
        self._emit = emit
        self._module: ModuleType | None = None
        self._kernels: dict[tuple[str, np.dtype], Callable[..., Any]] = {}
        self._recovered = False
        #: ``(name, params)`` of a built-in op (``symgrad.builtin`` sets it), else None
        self.origin: tuple[str, dict[str, Any]] | None = None
        #: ``(function, arguments)`` making this op again in another process (pickling)
        self.recipe: tuple[Callable[..., Any], tuple[Any, ...]] | None = None

    def __copy__(self) -> CompiledOp[D]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledOp[D]:
        """The op itself: an op is a compiled function, which copies of a module share (as
        copies of a torch module share its functions)."""
        return self

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """Pickled as the way to make it again (its spec, or a built-in's name and
        parameters): unpickled, it is found in the kernel cache or compiled."""
        if self.recipe is None:
            raise SymgradError(
                f"op {self.name!r} cannot be pickled: it was not made by symgrad.elementwise, "
                "symgrad.tensor_op or symgrad.builtin"
            )
        return self.recipe

    @property
    def source(self) -> str:
        """The generated Numba source of this op's kernels (regenerated if the file was lost)."""
        return self._verified_source()

    def _verified_source(self) -> str:
        text = verified_text(self._path, self.key)
        if text is None:  # changed, damaged or deleted since the op was defined
            text = self._emit(self.derivation())
            write_source(self._path, text)
        return text

    def derivation(self) -> D:
        """The symbolic derivation behind the kernels (derived on first use if loaded warm)."""
        if self._derivation is None:
            self._derivation = self._derive()
        return self._derivation

    @property
    def module(self) -> ModuleType:
        """The kernel module, imported on first use (once per process) from verified text."""
        if self._module is None:
            self._module = ensure_imported(self._path, self._verified_source())
        return self._module

    def _kernel(self, function: str, dtype: np.dtype) -> Callable[..., Any]:
        """The compiled ``function`` (``"forward"``, ``"vjp"``...) for ``dtype`` data."""
        found = self._lookup(function, dtype)
        if found is None:  # the module lacks it: the same AttributeError as reading it
            return getattr(self.module, kernel_name(function, dtype))  # type: ignore[no-any-return]
        return found

    def _lookup(self, function: str, dtype: np.dtype) -> Callable[..., Any] | None:
        """``function``'s kernel for ``dtype`` data, or None when the module has none."""
        found = self._kernels.get((function, dtype))
        if found is None:
            found = getattr(self.module, kernel_name(function, dtype), None)
            if found is not None:
                self._kernels[function, dtype] = found
        return found

    def _run(self, function: str, dtype: np.dtype, *args: Any) -> Any:
        """Call ``function``'s kernel for ``dtype`` data with ``args``: its parallel variant
        (``function_par``, the same result) when the largest array is large enough to share
        out over the threads (:func:`~symgrad.runtime.threads.use_parallel`)."""
        largest = max((a.size for a in args if isinstance(a, np.ndarray)), default=0)
        if use_parallel(largest) and self._lookup(function + "_par", dtype) is not None:
            function += "_par"
        try:
            kernel = self._kernels.get((function, dtype))
            return (kernel or self._kernel(function, dtype))(*args)
        except Exception as err:
            # A corrupt Numba cache file fails on load: drop the binaries, re-import, retry once.
            if self._recovered or not _raised_in_numba_cache(err):
                raise
            self._recovered = True
            purge_compiled(self._path)
            self._module = import_module(self._path, self._verified_source())
            self._kernels.clear()
            return self._kernel(function, dtype)(*args)
