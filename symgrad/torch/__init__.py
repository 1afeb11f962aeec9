"""PyTorch interop: the only part of symgrad that imports torch.

* :func:`function` (a ``torch.autograd.Function`` running an op's compiled kernels, double
  backward included) and :class:`Module` (an op with trainable parameters as a torch layer) —
  in :mod:`symgrad.torch.function`;
* :func:`to_torch` / :func:`from_torch` — a symgrad ``Sequential`` to a torch one and back,
  weights copied — in :mod:`symgrad.torch.exchange`;
* the twin helpers here: :func:`twin_loss` and :func:`twin_optimizer` map losses and optimizers
  with their hyperparameters; :func:`run_twin` trains the twin on exactly the batches
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
from .exchange import from_torch, to_torch
from .function import Module, function

__all__ = [
    "Module",
    "from_torch",
    "function",
    "reference_value_and_grads",
    "run_twin",
    "state_dict_numpy",
    "to_torch",
    "twin_loss",
    "twin_optimizer",
]


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
    """A torch optimizer with ``opt``'s parameter groups and hyperparameters over ``params``.

    ``params`` are the torch twins of ``opt``'s parameters, in order across its groups (one
    flat list: ``[*group0_twins, *group1_twins, ...]``); each torch group gets the
    hyperparameters of the matching symgrad group as they are now.
    """
    table = {
        optim.SGD: torch.optim.SGD,
        optim.Adam: torch.optim.Adam,
        optim.AdamW: torch.optim.AdamW,
    }
    if type(opt) not in table:
        raise SymgradError(f"optimizer {type(opt).__name__} has no torch twin")
    params = list(params)
    sizes = [len(group["params"]) for group in opt.param_groups]
    if sum(sizes) != len(params):
        raise SymgradError(
            f"{type(opt).__name__} has {sum(sizes)} parameters in groups of {sizes}; got "
            f"{len(params)} torch parameters"
        )
    groups, start = [], 0
    for group, size in zip(opt.param_groups, sizes, strict=True):
        hyper = {key: value for key, value in group.items() if key in opt.defaults}
        groups.append({"params": params[start : start + size], **hyper})
        start += size
    return table[type(opt)](groups)


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
