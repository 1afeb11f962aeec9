"""Adam and AdamW with torch's semantics (``torch.optim.Adam``/``AdamW``, amsgrad, maximize).

torch's ``_single_tensor_adam``, term for term, is the rule :data:`ADAM_RULE`; with ``t`` the
parameter's step count (incremented first)::

    bias_correction1 = 1 − β1ᵗ,  bias_correction2 = 1 − β2ᵗ
    step_size = lr / bias_correction1,  bias_correction2_sqrt = √bias_correction2
    g = -grad if maximize else grad
    g = g                      if decoupled_weight_decay (AdamW), else g + weight_decay·param
    param' = param·(1 − lr·weight_decay)  if decoupled_weight_decay, else param
    exp_avg = lerp(exp_avg, g, 1 − β1)    (torch's lerp, both of its branches)
    exp_avg_sq = β2·exp_avg_sq + (1 − β2)·g·g
    max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)              (amsgrad only)
    second = max_exp_avg_sq if amsgrad else exp_avg_sq
    param = param' − step_size·exp_avg / (√second / bias_correction2_sqrt + eps)

AdamW is Adam with ``decoupled_weight_decay=True`` (and weight decay 0.01 by default), as in
torch 2.13.  Every hyperparameter, ``betas`` and the two flags included, is read on each step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import HyperparameterError
from ..symbolic.update import Formulas, Hyperparameter, State, UpdateRule
from .optimizer import Optimizer, check_flag, check_real


def _adam_formulas() -> Formulas:
    import sympy as sp

    (param, grad, m, v, vmax, lr, beta1, beta2, eps, wd, amsgrad, maximize, decoupled, t) = (
        sp.symbols(
            "param grad exp_avg exp_avg_sq max_exp_avg_sq lr beta1 beta2 eps weight_decay "
            "amsgrad maximize decoupled_weight_decay step",
            real=True,
        )
    )
    bc1, bc2, step_size, bc2_sqrt, decay, weight = sp.symbols(
        "bias_correction1 bias_correction2 step_size bias_correction2_sqrt decay lerp_weight",
        real=True,
    )
    g, g_wd, p_decayed, g_scaled = sp.symbols("g g_wd p_decayed g_scaled", real=True)
    second = sp.Piecewise((vmax, sp.Ne(amsgrad, 0)), (v, True))
    return Formulas(
        scalars=(
            (bc1, 1 - beta1**t),
            (bc2, 1 - beta2**t),
            (step_size, lr / bc1),
            (bc2_sqrt, sp.sqrt(bc2)),
            (decay, sp.Piecewise((1 - lr * wd, sp.Ne(decoupled, 0)), (1, True))),
            (weight, 1 - beta1),
        ),
        updates=(
            (g, sp.Piecewise((-grad, sp.Ne(maximize, 0)), (grad, True))),
            (g_wd, sp.Piecewise((g, sp.Ne(decoupled, 0)), (g + wd * param, True))),
            (p_decayed, param * decay),
            # torch's lerp(start, end, w): start + w·(end − start) if |w| < ½, else
            # end − (end − start)·(1 − w)
            (
                m,
                sp.Piecewise(
                    (m + weight * (g_wd - m), sp.Abs(weight) < sp.Rational(1, 2)),
                    (g_wd - (g_wd - m) * (1 - weight), True),
                ),
            ),
            (g_scaled, (1 - beta2) * g_wd),  # addcmul: (value·g)·g
            (v, v * beta2 + g_scaled * g_wd),
            (vmax, sp.Max(vmax, v)),
            (param, p_decayed - step_size * m / (sp.sqrt(second) / bc2_sqrt + eps)),
        ),
    )


ADAM_RULE = UpdateRule(
    name="adam",
    hyperparameters=(
        Hyperparameter("lr", "lr"),
        Hyperparameter("beta1", "betas", 0),
        Hyperparameter("beta2", "betas", 1),
        Hyperparameter("eps", "eps"),
        Hyperparameter("weight_decay", "weight_decay"),
        Hyperparameter("amsgrad", "amsgrad"),
        Hyperparameter("maximize", "maximize"),
        Hyperparameter("decoupled_weight_decay", "decoupled_weight_decay"),
    ),
    states=(State("exp_avg"), State("exp_avg_sq"), State("max_exp_avg_sq", active_if="amsgrad")),
    counter="step",
    build=_adam_formulas,
)


class Adam(Optimizer):
    """Adam, ``torch.optim.Adam``'s arguments and semantics (L2 weight decay added to the
    gradient unless ``decoupled_weight_decay``)."""

    rule = ADAM_RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def check_group(self, group: Mapping[str, Any], index: int) -> None:
        check_real(index, "lr", group["lr"], low=0.0, what="learning rate")
        check_real(index, "eps", group["eps"], low=0.0, what="epsilon")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise HyperparameterError(
                f"param group {index}: invalid betas: {betas!r}; give two numbers "
                "(beta1, beta2), each in [0, 1)"
            )
        for k, beta in enumerate(betas):
            check_real(
                index, f"betas[{k}]", beta, low=0.0, high=1.0, high_open=True, what="beta"
            )
        check_real(index, "weight_decay", group["weight_decay"], low=0.0)
        for flag in ("amsgrad", "maximize", "decoupled_weight_decay"):
            check_flag(index, flag, group[flag])


class AdamW(Adam):
    """AdamW, ``torch.optim.AdamW``: Adam with decoupled weight decay
    ``param ← param·(1 − lr·weight_decay)`` (default ``weight_decay=0.01``)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
            decoupled_weight_decay=True,
        )
