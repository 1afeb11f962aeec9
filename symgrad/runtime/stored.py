"""Built-in ops found again in the kernel cache without SymPy.

``symgrad.builtin(name, wrt=..., **params)`` builds the op's formula with SymPy, derives it and
emits its kernels — on the first request.  It then writes a small *op record* beside the module
(``op_<name>_<digest>.json``, the digest hashing the request — name, parameters, ``wrt`` — and
the toolchain): the op's spec key, its module file, its inputs and gradients, and for a tensor
op its shape-binding plan as plain data.  A later process asking the same finds the record,
verifies the module, and builds the op from the record: no formula, no SymPy.  The spec is
built on first use (a derivation printout; an error message about a dim given by an
expression).  A record that is missing, torn or for another request is ignored (the cold path
rewrites it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .cache import atomic_write, cache_dir, toolchain_fingerprint, verified_text
from .elementwise import ElementwiseOp
from .tensor import TensorOp

_FORMAT = "symgrad-op-record-1"


def request_key(name: str, params: Mapping[str, Any], wrt: tuple[str, ...] | None) -> str:
    """The hash of a built-in request (its name, parameters and ``wrt``) and the toolchain."""
    text = json.dumps(
        [_FORMAT, name, sorted((k, repr(v)) for k, v in params.items()), wrt,
         toolchain_fingerprint()]
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def record_path(name: str, request: str) -> Path:
    return cache_dir() / f"op_{name}_{request[:24]}.json"


def load(
    name: str,
    request: str,
    spec: Callable[[], Any],
    derive: Callable[[], Any],
    emit: Callable[[Any], str],
) -> ElementwiseOp | TensorOp | None:
    """The op a record describes, or None when there is no valid record.  ``spec``,
    ``derive`` and ``emit`` build the op's spec, derivation and source on demand (SymPy)."""
    path = record_path(name, request)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("request") != request or entry.get("format") != _FORMAT:
            return None
        module = path.parent / entry["module"]
        if module.parent != path.parent or verified_text(module, entry["key"]) is None:
            return None
        wrt = tuple(int(k) for k in entry["wrt"])
        if entry["kind"] == "tensor":
            return TensorOp.stored(
                entry["name"], entry["key"], module, entry["plan"], wrt, spec, derive, emit
            )
        return ElementwiseOp.stored(
            entry["name"], entry["key"], module, tuple(entry["inputs"]), wrt, spec, derive, emit
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(request: str, op: ElementwiseOp | TensorOp) -> None:
    """Write the record of ``op`` for ``request`` (best effort: a cache that cannot be written
    only costs the next process the cold path)."""
    entry: dict[str, Any] = {
        "format": _FORMAT,
        "request": request,
        "name": op.name,
        "key": op.key,
        "module": op._path.name,
        "wrt": list(op._wrt),
        "kind": "tensor" if isinstance(op, TensorOp) else "elementwise",
        "inputs": list(op.input_names),
    }
    if isinstance(op, TensorOp):
        entry["plan"] = op._plan.data()
    with contextlib.suppress(OSError):
        atomic_write(record_path(op.name, request), json.dumps(entry, indent=1) + "\n")
