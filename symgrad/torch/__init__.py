"""PyTorch interop: the only part of symgrad that imports torch.

:func:`to_torch` builds the torch twin of a symgrad ``Sequential`` (same layers, weights and
dtype); :func:`twin_loss` and :func:`twin_optimizer` map losses and optimizers with their
hyperparameters; :func:`run_twin` trains the twin on exactly the batches
:func:`symgrad.train.fit` uses.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .. import nn, optim
from ..errors import SymgradError
from ..train import batch_order

_ACTIVATIONS: dict[type, Any] = {
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


def _torch_dtype(model: nn.Module) -> torch.dtype:
    params = model.parameters()
    kind = params[0].data.dtype if params else np.dtype(np.float64)
    return torch.float64 if kind == np.float64 else torch.float32


def to_torch(model: nn.Sequential) -> torch.nn.Sequential:
    """The torch ``nn.Sequential`` twin of ``model``, with copies of its weights."""
    layers: list[torch.nn.Module] = []
    for name, m in model.children():
        if isinstance(m, nn.Linear):
            layers.append(torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None))
        elif isinstance(m, nn.LayerNorm):
            layers.append(torch.nn.LayerNorm(m.normalized_shape, eps=m.eps))
        elif isinstance(m, nn.Elementwise) and type(m) in _ACTIVATIONS:
            layers.append(_ACTIVATIONS[type(m)](m, dict(m.op.spec.constants)))
        else:
            raise SymgradError(
                f"layer {name} ({type(m).__name__}) has no torch twin; supported: Linear, "
                f"LayerNorm, {', '.join(sorted(t.__name__ for t in _ACTIVATIONS))}"
            )
    twin = torch.nn.Sequential(*layers).to(_torch_dtype(model))
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    for (_, p), (_, tp) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        tp.requires_grad_(p.requires_grad)
    return twin


def twin_loss(loss: nn.Loss) -> torch.nn.Module:
    """The torch loss module matching ``loss`` (mean reduction)."""
    table = {
        nn.MSELoss: torch.nn.MSELoss,
        nn.BCELoss: torch.nn.BCELoss,
        nn.BCEWithLogitsLoss: torch.nn.BCEWithLogitsLoss,
        nn.CrossEntropyLoss: torch.nn.CrossEntropyLoss,
    }
    if type(loss) not in table:
        raise SymgradError(
            f"loss {loss!r} has no torch twin; supported: {sorted(t.__name__ for t in table)}"
        )
    return table[type(loss)]()


def twin_optimizer(opt: optim.Optimizer, params: Any) -> torch.optim.Optimizer:
    """A torch optimizer with ``opt``'s hyperparameters over ``params``."""
    if isinstance(opt, optim.SGD):
        return torch.optim.SGD(
            params,
            lr=opt.lr,
            momentum=opt.momentum,
            dampening=opt.dampening,
            weight_decay=opt.weight_decay,
            nesterov=opt.nesterov,
        )
    if isinstance(opt, optim.AdamW):
        return torch.optim.AdamW(
            params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
    if isinstance(opt, optim.Adam):
        return torch.optim.Adam(
            params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
    raise SymgradError(f"optimizer {type(opt).__name__} has no torch twin")


def run_twin(
    twin: torch.nn.Module,
    loss: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[list[float], float]:
    """Train the twin on :func:`symgrad.train.batch_order`'s batches; (step losses, seconds)."""
    dtype = next(twin.parameters()).dtype
    tx = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    ty = torch.from_numpy(np.ascontiguousarray(y))
    if ty.is_floating_point():
        ty = ty.to(dtype)
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in batch_order(len(x), batch_size, seed, epoch):
            index = torch.from_numpy(idx)
            opt.zero_grad()
            value = loss(twin(tx[index]), ty[index])
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
    return losses, time.perf_counter() - start


def state_dict_numpy(twin: torch.nn.Module) -> dict[str, np.ndarray]:
    """The twin's weights as NumPy arrays."""
    return {k: v.detach().cpu().numpy().copy() for k, v in twin.state_dict().items()}


def reference_value_and_grads(
    entry: Any, arrays: list[np.ndarray], grad_output: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """A registry entry's torch reference: its value and the gradients torch computes
    (``None`` for inputs torch does not differentiate), in float64 autograd."""
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    ref = entry.torch_ref(torch, *tensors, **entry.params)
    ref.backward(torch.tensor(grad_output, dtype=torch.float64))
    grads = [
        t.grad.numpy() if (t.grad is not None and checked) else None
        for t, checked in zip(tensors, entry.torch_grads, strict=True)
    ]
    return ref.detach().numpy(), grads
