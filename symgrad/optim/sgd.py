"""SGD with torch's semantics: momentum, dampening, Nesterov, weight decay, maximize.

torch's ``_single_tensor_sgd``, term for term, is the rule :data:`SGD_RULE`::

    g = -grad if maximize else grad
    d = g + weight_decay·param
    momentum_buffer = d                                   (the first step with momentum ≠ 0)
                    = momentum·momentum_buffer + (1 − dampening)·d          (later)
    param = param − lr·(d                                 if momentum = 0
                        d + momentum·momentum_buffer      if nesterov
                        momentum_buffer)                  otherwise

The buffer exists only while ``momentum != 0`` (it is created on the first step with momentum,
as torch creates it), so momentum may be switched on, off or changed between steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import HyperparameterError
from ..symbolic.update import Formulas, Hyperparameter, State, UpdateRule
from .optimizer import Optimizer, check_flag, check_real


def _sgd_formulas() -> Formulas:
    import sympy as sp

    (param, grad, buf, lr, mu, damp, wd, nesterov, maximize, fresh, g, d) = sp.symbols(
        "param grad momentum_buffer lr momentum dampening weight_decay nesterov maximize "
        "fresh_buffer g d",
        real=True,
    )
    step = sp.Piecewise((d, sp.Eq(mu, 0)), (d + mu * buf, sp.Ne(nesterov, 0)), (buf, True))
    return Formulas(
        scalars=(),
        updates=(
            (g, sp.Piecewise((-grad, sp.Ne(maximize, 0)), (grad, True))),
            (d, g + wd * param),
            (buf, sp.Piecewise((d, sp.Ne(fresh, 0)), (mu * buf + (1 - damp) * d, True))),
            (param, param - lr * step),
        ),
    )


SGD_RULE = UpdateRule(
    name="sgd",
    hyperparameters=tuple(
        Hyperparameter(k, k)
        for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    ),
    states=(State("momentum_buffer", active_if="momentum", fresh="fresh_buffer"),),
    counter=None,
    build=_sgd_formulas,
)


class SGD(Optimizer):
    """Stochastic gradient descent, ``torch.optim.SGD``'s arguments and semantics.

    >>> import numpy as np
    >>> from symgrad import nn, optim
    >>> w = nn.Parameter(np.array([1.0, -2.0]))
    >>> opt = optim.SGD([w], lr=0.1, momentum=0.9)
    >>> w.grad = np.array([1.0, 1.0])
    >>> opt.step()
    >>> w.data
    array([ 0.9, -2.1])
    >>> opt.param_groups[0]["lr"] = 1.0   # takes effect on the next step
    >>> opt.step()
    >>> w.data
    array([-1., -4.])
    """

    rule = SGD_RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def check_group(self, group: Mapping[str, Any], index: int) -> None:
        check_real(index, "lr", group["lr"], low=0.0, what="learning rate")
        check_real(index, "momentum", group["momentum"], low=0.0)
        check_real(index, "dampening", group["dampening"])
        check_real(index, "weight_decay", group["weight_decay"], low=0.0)
        check_flag(index, "nesterov", group["nesterov"])
        check_flag(index, "maximize", group["maximize"])

    def check_new_group(self, group: Mapping[str, Any], index: int) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise HyperparameterError(
                f"param group {index}: Nesterov momentum requires a momentum and zero "
                f"dampening, got momentum={group['momentum']!r}, "
                f"dampening={group['dampening']!r}"
            )
