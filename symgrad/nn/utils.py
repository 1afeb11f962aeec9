"""Gradient clipping, where torch has it (``torch.nn.utils``): by global norm and by value.

Both act in place on the ``grad`` of the given parameters, between the backward pass and
``optimizer.step()``.  A compiled training step does the same inside its one function
(``compile_step(..., clip_grad_norm=...)``): the global norm is a reduction over every gradient
after the backward pass, and the clipping factor a per-step scalar of the update loops.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

from ..errors import NonFiniteNormError, SymgradError
from .modules import Parameter


def _grads(parameters: Parameter | Iterable[Parameter]) -> list[np.ndarray]:
    params = [parameters] if isinstance(parameters, Parameter) else list(parameters)
    for p in params:
        if not isinstance(p, Parameter):
            raise SymgradError(f"clipping takes symgrad Parameters, got {type(p).__name__}")
    return [p.grad for p in params if p.grad is not None]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise SymgradError(f"{name} must be a real number, got {value!r}")
    return float(value)


def clip_grad_norm_(
    parameters: Parameter | Iterable[Parameter],
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> np.float64:
    """Scale the gradients so that their global norm is at most ``max_norm``; returns the
    norm before clipping (torch's ``clip_grad_norm_``).

    The norm is that of the per-parameter norms, as torch computes it; every gradient is
    multiplied by ``min(max_norm / (norm + 1e-6), 1)``.  ``norm_type`` is any positive real or
    ``inf`` (or ``"inf"``).  The norm is a NumPy float (``.item()`` works, as on torch's
    tensor); ``foreach`` is accepted for torch's signature and changes nothing.

    >>> import numpy as np
    >>> from symgrad import nn
    >>> p = nn.Parameter(np.zeros(2)); p.grad = np.array([3.0, 4.0])
    >>> float(clip_grad_norm_([p], max_norm=1.0))
    5.0
    >>> p.grad.round(6)
    array([0.6, 0.8])
    """
    max_norm = _real("max_norm", max_norm)
    if isinstance(norm_type, str) and norm_type.strip().lower() in ("inf", "+inf"):
        norm_type = math.inf
    order = _real("norm_type", norm_type)
    if order <= 0:
        raise SymgradError(f"norm_type must be positive (or inf), got {norm_type!r}")
    grads = _grads(parameters)
    if not grads:
        return np.float64(0.0)
    if math.isinf(order):
        total = np.float64(max(float(np.max(np.abs(g))) if g.size else 0.0 for g in grads))
    else:
        norms = [np.linalg.norm(g.ravel(), ord=order) for g in grads]
        total = np.float64(np.linalg.norm(np.asarray(norms, dtype=np.float64), ord=order))
    if error_if_nonfinite and not math.isfinite(total):
        raise NonFiniteNormError(
            f"the total norm of order {norm_type} of the gradients is {total}: it is not "
            "finite, so clip_grad_norm_ cannot scale them; set error_if_nonfinite=False to "
            "scale them anyway"
        )
    coef = max_norm / (float(total) + 1e-6)
    coef = 1.0 if coef > 1.0 else coef  # torch.clamp(max=1.0): a NaN stays NaN
    for g in grads:
        g *= coef
    return total


def clip_grad_value_(parameters: Parameter | Iterable[Parameter], clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` (torch's
    ``clip_grad_value_``)."""
    clip_value = _real("clip_value", clip_value)
    for g in _grads(parameters):
        np.clip(g, -clip_value, clip_value, out=g)
