"""Optimizer and scheduler state as JSON text, for checkpoints that load without pickle.

Parameter groups and scheduler state dicts hold numbers, strings, lists, tuples (``betas``),
dicts, ``Counter``s (``MultiStepLR.milestones``) and dicts with integer keys.  :func:`to_json`
writes them with tuples, Counters and non-string keys tagged, and floats exactly (``repr``
precision, ``Infinity``/``NaN`` included); :func:`from_json` gives the same objects back.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from ..errors import SymgradError

_TAGS = ("__tuple__", "__counter__", "__items__")


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Counter):
        return {"__counter__": [[_encode(k), n] for k, n in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise SymgradError(
        f"cannot store a {type(value).__name__} ({value!r:.60}) in a checkpoint: optimizer and "
        "scheduler state must be numbers, strings, lists, tuples and dicts"
    )


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        (tag, items), = obj.items()
        if tag == "__tuple__":
            return tuple(items)
        if tag == "__counter__":
            return Counter({_hashable(k): n for k, n in items})
        if tag == "__items__":
            return {_hashable(k): v for k, v in items}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def to_json(value: Any) -> str:
    """``value`` as JSON text (see the module docstring)."""
    return json.dumps(_encode(value))


def from_json(text: str) -> Any:
    """What :func:`to_json` wrote."""
    return json.loads(text, object_hook=_decode)
