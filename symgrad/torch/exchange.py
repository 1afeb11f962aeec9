"""Model exchange: a symgrad ``Sequential`` to a torch ``nn.Sequential`` and back, weights copied.

Supported layers, both ways: ``Linear`` (with or without bias), ``LayerNorm`` (one normalized
axis, affine), and the activations Tanh, Sigmoid, ReLU, LeakyReLU, ELU, GELU (erf and tanh
forms), SiLU, Softplus, Softsign, Hardtanh with their parameters.  A symgrad layer running any
other one-input elementwise op becomes a :class:`symgrad.torch.Module` of that op (and comes
back as the same layer).  Any other layer is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import nn
from ..api import builtin
from ..errors import DeviceError, DTypeError, SymgradError
from ..runtime.elementwise import ElementwiseOp
from .function import Module

#: symgrad activation → its torch twin, given the module and its constants.
_ACTIVATIONS: dict[type, Callable[[Any, dict[str, float]], torch.nn.Module]] = {
    nn.Tanh: lambda m, c: torch.nn.Tanh(),
    nn.Sigmoid: lambda m, c: torch.nn.Sigmoid(),
    nn.ReLU: lambda m, c: torch.nn.ReLU(),
    nn.LeakyReLU: lambda m, c: torch.nn.LeakyReLU(c["negative_slope"]),
    nn.ELU: lambda m, c: torch.nn.ELU(c["alpha"]),
    nn.GELU: lambda m, c: torch.nn.GELU(),
    nn.SiLU: lambda m, c: torch.nn.SiLU(),
    nn.Softplus: lambda m, c: torch.nn.Softplus(c["beta"], c["threshold"]),
    nn.Softsign: lambda m, c: torch.nn.Softsign(),
    nn.Hardtanh: lambda m, c: torch.nn.Hardtanh(c["min_val"], c["max_val"]),
}


def _gelu(m: torch.nn.GELU) -> nn.Module:
    if m.approximate == "tanh":
        op = builtin("gelu_tanh")
        assert isinstance(op, ElementwiseOp)
        return nn.Elementwise(op)
    return nn.GELU()


#: torch activation → its symgrad twin.
_FROM_TORCH: dict[type, Callable[[Any], nn.Module]] = {
    torch.nn.Tanh: lambda m: nn.Tanh(),
    torch.nn.Sigmoid: lambda m: nn.Sigmoid(),
    torch.nn.ReLU: lambda m: nn.ReLU(),
    torch.nn.LeakyReLU: lambda m: nn.LeakyReLU(negative_slope=m.negative_slope),
    torch.nn.ELU: lambda m: nn.ELU(alpha=m.alpha),
    torch.nn.GELU: _gelu,
    torch.nn.SiLU: lambda m: nn.SiLU(),
    torch.nn.Softplus: lambda m: nn.Softplus(beta=m.beta, threshold=m.threshold),
    torch.nn.Softsign: lambda m: nn.Softsign(),
    torch.nn.Hardtanh: lambda m: nn.Hardtanh(min_val=m.min_val, max_val=m.max_val),
}


def _torch_dtype(model: nn.Module) -> torch.dtype:
    params = model.parameters()
    kind = params[0].data.dtype if params else np.dtype(np.float64)
    return torch.float64 if kind == np.float64 else torch.float32


def _is_gelu_tanh(op: ElementwiseOp) -> bool:
    return op.spec.key == builtin("gelu_tanh").spec.key


def to_torch(model: nn.Sequential) -> torch.nn.Sequential:
    """The torch ``nn.Sequential`` twin of ``model``, with copies of its weights.

    Layers map one to one (children keep their indices, so state dicts match); a layer of a
    custom elementwise op becomes :class:`symgrad.torch.Module` running that op.
    """
    layers: list[torch.nn.Module] = []
    for name, m in model.children():
        if isinstance(m, nn.Linear):
            layers.append(torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None))
        elif isinstance(m, nn.LayerNorm):
            layers.append(torch.nn.LayerNorm(m.normalized_shape, eps=m.eps))
        elif isinstance(m, nn.Elementwise) and type(m) in _ACTIVATIONS:
            layers.append(_ACTIVATIONS[type(m)](m, dict(m.op.spec.constants)))
        elif type(m) is nn.Elementwise and _is_gelu_tanh(m.op):
            layers.append(torch.nn.GELU(approximate="tanh"))
        elif type(m) is nn.Elementwise:
            layers.append(Module(m.op))
        else:
            raise SymgradError(
                f"layer {name} ({type(m).__name__}) has no torch twin; supported: Linear, "
                f"LayerNorm, Elementwise, {', '.join(sorted(t.__name__ for t in _ACTIVATIONS))}"
            )
    twin = torch.nn.Sequential(*layers).to(_torch_dtype(model))
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    for (_, p), (_, tp) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        tp.requires_grad_(p.requires_grad)
    return twin


def _numpy_dtype(model: torch.nn.Module) -> np.dtype:
    """The one float dtype of ``model``'s parameters (float32 when it has none)."""
    dtypes = {p.dtype for p in model.parameters()}
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise DeviceError(
            f"the torch model has parameters on {sorted(devices)}; move it with model.cpu()"
        )
    if len(dtypes) > 1 or (dtypes and dtypes.pop() not in (torch.float32, torch.float64)):
        found = sorted(str(p.dtype) for p in model.parameters())
        raise DTypeError(
            f"the torch model's parameters must all be float32 or all float64, found "
            f"{sorted(set(found))}; convert it with model.double() or model.float()"
        )
    params = list(model.parameters())
    double = bool(params) and params[0].dtype == torch.float64
    return np.dtype(np.float64) if double else np.dtype(np.float32)


def _supported() -> str:
    names = sorted(t.__name__ for t in _FROM_TORCH)
    return ", ".join(["Linear", "LayerNorm", *names, "symgrad.torch.Module"])


def from_torch(model: torch.nn.Sequential) -> nn.Sequential:
    """The symgrad ``Sequential`` twin of a torch ``nn.Sequential``, with copies of its weights.

    Children map one to one, by position (``0``, ``1``, ...), whatever the torch children are
    named; parameters keep their dtype (all float32 or all float64) and ``requires_grad``.
    An unsupported layer is a :class:`~symgrad.errors.SymgradError` naming it.

    >>> import torch, symgrad.torch as sgt
    >>> twin = sgt.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh()))
    >>> twin
    Sequential(
      (0): Linear(in_features=3, out_features=2, bias=True)
      (1): Tanh()
    )
    """
    if not isinstance(model, torch.nn.Sequential):
        raise SymgradError(
            f"from_torch takes a torch.nn.Sequential, got {type(model).__name__}"
        )
    dtype = _numpy_dtype(model)
    pairs: list[tuple[torch.nn.Module, nn.Module]] = []
    for name, m in model.named_children():
        layer: nn.Module
        if type(m) is torch.nn.Linear:
            layer = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        elif type(m) is torch.nn.LayerNorm:
            if len(m.normalized_shape) != 1 or not m.elementwise_affine or m.bias is None:
                raise SymgradError(
                    f"layer {name} (LayerNorm{tuple(m.normalized_shape)}, elementwise_affine="
                    f"{m.elementwise_affine}, bias={m.bias is not None}) is not supported: "
                    "symgrad's LayerNorm normalizes one axis with affine weight and bias"
                )
            layer = nn.LayerNorm(m.normalized_shape[0], eps=m.eps, dtype=dtype)
        elif type(m) in _FROM_TORCH:
            layer = _FROM_TORCH[type(m)](m)
        elif isinstance(m, Module) and len(m.input_names) == 1 and not list(m.parameters()):
            op = m.op
            if not isinstance(op, ElementwiseOp):
                raise SymgradError(
                    f"layer {name} (symgrad.torch.Module of tensor op {op.name!r}) is not "
                    f"supported; supported: {_supported()}"
                )
            layer = nn.Elementwise(op)
        else:
            raise SymgradError(
                f"layer {name} ({type(m).__name__}) is not supported by from_torch; "
                f"supported: {_supported()}"
            )
        pairs.append((m, layer))
    for m, layer in pairs:
        layer.load_state_dict(dict(m.state_dict()))
        for p, tp in zip(layer.parameters(), m.parameters(), strict=True):
            p.requires_grad = tp.requires_grad
    return nn.Sequential(*(layer for _, layer in pairs))
