"""Memory for op outputs, reused once nothing refers to it.

Every call of an op returns fresh arrays: its output, the residuals its forward keeps, the
gradients its VJP returns.  Large fresh arrays cost page faults — the C library hands freed
memory back to the system and the next call's array touches new pages (thousands of faults,
tens of ms of system time in one training step of a transformer layer recorded on a
:class:`~symgrad.nn.Tape`).  The pool keeps the memory of the arrays the ops returned and
gives it out again once no Python object refers to it any more: the next step's arrays land on
pages the process has touched already.

* **Only free memory is reused.**  An array handed out is a view of one of the pool's buffers;
  every array, view, ``memoryview`` or tensor (``torch.from_numpy``) made from it holds a
  reference to that buffer, and a buffer is given out again only when the pool's own references
  are the only ones left (its reference count).  Results do not depend on the pool: a kernel
  writes every element of the arrays it is given, as it does for ``np.empty``'s.
* **Bounded.**  The pool holds at most :func:`output_pool_limit` bytes
  (``SYMGRAD_OUTPUT_POOL_MB``, default 1024; 0 turns it off); past that it drops buffers no one
  uses, and when none are left to drop the arrays come from ``np.empty`` as before.
  :func:`release_output_pool` drops every unused buffer now.  Arrays under 64 KiB are not pooled:
  the C library's heap serves them without faults.
* Buffers come in sizes of four steps per power of two (at most 25 % more than asked for), so a
  batch of another length reuses the memory of the last one when it is not longer by a step.

The compiled step does not use it: it plans its buffers itself, in one arena
(:class:`symgrad.compile.plan.BufferPool`).
"""

from __future__ import annotations

import math
import operator
import os
import sys
import threading
from typing import Any

import numpy as np

from ..errors import OptionError

#: Arrays smaller than this are not pooled.
MIN_BYTES = 1 << 16

_ENV = "SYMGRAD_OUTPUT_POOL_MB"
_DEFAULT_MB = 1024


def _limit_from_env() -> int:
    text = os.environ.get(_ENV, "").strip()
    if not text:
        return _DEFAULT_MB << 20
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise OptionError(
            f"{_ENV}={text!r} is not a size in MB: set it to the most memory symgrad may keep "
            f"for reuse (e.g. {_DEFAULT_MB}), or 0 to allocate every array afresh"
        )
    return int(value * (1 << 20))


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to one of four sizes per power of two."""
    step = 1 << max(nbytes.bit_length() - 3, 0)
    return -(-nbytes // step) * step


def _count_unused() -> int | None:
    """What ``sys.getrefcount`` says of a buffer only its bucket holds, seen from a loop over
    the bucket as :meth:`OutputPool.empty` sees it (3 on CPython 3.11: the list, the loop's
    variable, the call's argument; an interpreter may count borrowed references otherwise);
    ``None`` — never reuse — when one more reference would not change the count."""
    bucket = [np.empty(1, np.uint8)]
    for buffer in bucket:
        unused = sys.getrefcount(buffer)
    held = bucket[0][:]  # a view holds its base
    for buffer in bucket:
        if sys.getrefcount(buffer) != unused + 1:
            return None
    del held
    return unused


class OutputPool:
    """Buffers of a few sizes, each given out as one array at a time."""

    #: references to a buffer when only the pool holds it
    _UNUSED = _count_unused()

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buckets: dict[int, list[np.ndarray]] = {}
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes the pool's buffers take, in use or not."""
        return self._held

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An array of ``shape`` and ``dtype``, its contents undefined (as ``np.empty``'s)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES or nbytes > self.limit:
            return np.empty(shape, dtype)
        size = _size_class(nbytes)
        with self._lock:
            bucket = self._buckets.setdefault(size, [])
            for buffer in bucket:
                if sys.getrefcount(buffer) == self._UNUSED:
                    return np.ndarray(shape, dtype, buffer=buffer)
            if self._held + size > self.limit:
                self._drop(self._held + size - self.limit)
                if self._held + size > self.limit:
                    return np.empty(shape, dtype)
            buffer = np.empty(size, np.uint8)
            bucket.append(buffer)
            self._held += size
            return np.ndarray(shape, dtype, buffer=buffer)

    def release(self) -> int:
        """Drop every buffer no array uses; return the bytes dropped."""
        with self._lock:
            return self._drop(self._held)

    def _drop(self, wanted: int) -> int:
        """Drop unused buffers, largest sizes first, until ``wanted`` bytes are dropped."""
        dropped = 0
        for size in sorted(self._buckets, reverse=True):
            bucket = self._buckets[size]
            keep = []
            for buffer in bucket:
                if dropped >= wanted or sys.getrefcount(buffer) != self._UNUSED:
                    keep.append(buffer)
                else:
                    dropped += size
            bucket[:] = keep
            if not bucket:
                del self._buckets[size]
        self._held -= dropped
        return dropped


_POOL: OutputPool | None = None


def pool() -> OutputPool:
    """The process's pool (its limit read from ``SYMGRAD_OUTPUT_POOL_MB`` on first use)."""
    global _POOL
    if _POOL is None:
        _POOL = OutputPool(_limit_from_env())
    return _POOL


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.empty(shape, dtype)``, from the pool when the array is large enough."""
    return (_POOL or pool()).empty(shape, dtype)


def output_pool_limit() -> int:
    """The most bytes symgrad keeps for reusing op outputs' memory."""
    return pool().limit


def set_output_pool_limit(nbytes: int) -> int:
    """Keep at most ``nbytes`` for reuse (0: allocate every array afresh); return the previous
    limit.  Unused buffers past the new limit are dropped now."""
    try:
        limit = operator.index(nbytes) if not isinstance(nbytes, bool) else -1
    except TypeError:
        limit = -1
    if limit < 0:
        raise OptionError(
            f"set_output_pool_limit: give a whole number of bytes ≥ 0, got {nbytes!r}"
        )
    shared = pool()
    with shared._lock:
        previous, shared.limit = shared.limit, limit
        if shared._held > limit:
            shared._drop(shared._held - limit)
    return previous


def release_output_pool() -> int:
    """Drop every buffer no array uses (the memory goes back to the C library); return the
    bytes dropped."""
    return pool().release()
