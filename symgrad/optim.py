"""Optimizers with torch's exact update formulas, as generated elementwise kernels.

Each update rule is a SymPy formula compiled like any other op; hyperparameters are constants of
the kernel, per-step scalars (Adam's bias corrections) are inputs.  The formulas follow
``torch.optim`` (``_single_tensor_sgd`` / ``_single_tensor_adam``) term for term:

* SGD: ``d = g + wd·p``; momentum ``b = μ·b + (1 − dampening)·d`` (``b = d`` on the first step);
  Nesterov ``d = d + μ·b`` else ``d = b``; ``p = p − lr·d``.
* Adam: ``g = g + wd·p``; ``m = m + (1 − β1)(g − m)`` (torch's ``lerp``);
  ``v = β2·v + (1 − β2)·g²``; ``p = p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)``.
* AdamW: ``p = p·(1 − lr·wd)`` first, then Adam without the L2 term.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import SymgradError
from .nn.modules import Parameter


class Optimizer:
    """Base class: holds parameters, per-parameter state and a step counter."""

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise SymgradError("the optimizer got no parameters to update")
        for p in self.params:
            if not isinstance(p, Parameter):
                raise SymgradError(f"optimizers take symgrad Parameters, got {type(p).__name__}")
        if not lr > 0:
            raise SymgradError(f"learning rate must be positive, got lr={lr!r}")
        self.lr = lr
        self.state: list[dict[str, Any]] = [{} for _ in self.params]
        self._built: dict[str, Any] | None = None

    def _op(self, name: str) -> Any:
        """The compiled update formula ``name``, all built on first use (SymPy loads then)."""
        if self._built is None:
            self._built = self._build()
        return self._built[name]

    def _build(self) -> dict[str, Any]:
        raise NotImplementedError

    def structure(self) -> str:
        """What determines the generated update code: the class and every hyperparameter."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for k, p in enumerate(self.params):
            if p.grad is None or not p.requires_grad:
                continue
            self._update(p, p.grad, self.state[k])

    def _update(self, p: Parameter, grad: np.ndarray, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays of the optimizer state (for checkpoints)."""
        out: dict[str, np.ndarray] = {}
        for k, state in enumerate(self.state):
            for name, value in state.items():
                out[f"{k}.{name}"] = np.asarray(value)
        return out

    def load_state_dict(self, flat: dict[str, np.ndarray]) -> None:
        self.state = [{} for _ in self.params]
        for key, value in flat.items():
            k, name = key.split(".", 1)
            arr = np.array(value)
            self.state[int(k)][name] = arr if arr.ndim else arr.item()


def _compile(expr: Any, inputs: list[Any], name: str, **constants: float) -> Any:
    from .api import elementwise

    symbols = {str(s): s for s in expr.free_symbols}
    bound = {symbols[k]: v for k, v in constants.items() if k in symbols}
    return elementwise(expr, inputs=inputs, name=name, constants=bound)


def _symbols() -> Any:
    import sympy as sp

    return sp, sp.symbols("p g b m v s c", real=True)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise SymgradError(
                "Nesterov momentum requires a momentum and zero dampening (as torch)"
            )
        if momentum < 0 or weight_decay < 0:
            raise SymgradError(
                f"momentum and weight_decay must be ≥ 0, got {momentum}, {weight_decay}"
            )
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def _build(self) -> dict[str, Any]:
        sp, (p_, g_, b_, _, _, _, _) = _symbols()
        lr_, wd, mu, damp = sp.symbols("lr wd mu damp", real=True)
        consts = {"lr": self.lr, "wd": self.weight_decay, "mu": self.momentum}
        consts["damp"] = self.dampening
        d = g_ + wd * p_
        ops = {
            "decayed": _compile(d, [g_, p_], "sgd_decayed_grad", **consts),
            "buffer": _compile(mu * b_ + (1 - damp) * d, [b_, g_, p_], "sgd_momentum", **consts),
        }
        if self.momentum == 0:
            ops["step"] = _compile(p_ - lr_ * d, [p_, g_], "sgd_step", **consts)
        elif self.nesterov:
            ops["step"] = _compile(
                p_ - lr_ * (d + mu * b_), [p_, g_, b_], "sgd_nesterov_step", **consts
            )
        else:
            ops["step"] = _compile(p_ - lr_ * b_, [p_, b_], "sgd_momentum_step", **consts)
        return ops

    @property
    def _decayed(self) -> Any:
        return self._op("decayed")

    @property
    def _buffer(self) -> Any:
        return self._op("buffer")

    @property
    def _step(self) -> Any:
        return self._op("step")

    def structure(self) -> str:
        return (
            f"SGD:{self.lr!r}:{self.momentum!r}:{self.dampening!r}:{self.weight_decay!r}:"
            f"{self.nesterov!r}"
        )

    def _update(self, p: Parameter, grad: np.ndarray, state: dict[str, Any]) -> None:
        if self.momentum == 0:
            p.data = self._step(p.data, grad)
            return
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = self._decayed(grad, p.data)
        else:
            state["momentum_buffer"] = self._buffer(state["momentum_buffer"], grad, p.data)
        buf = state["momentum_buffer"]
        p.data = self._step(p.data, grad, buf) if self.nesterov else self._step(p.data, buf)


class Adam(Optimizer):
    """Adam (``decoupled=False``, L2 added to the gradient) or AdamW (``decoupled=True``)."""

    decoupled = False

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr)
        beta1, beta2 = betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or eps < 0 or weight_decay < 0:
            raise SymgradError(
                f"invalid Adam hyperparameters betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}"
            )
        self.betas, self.eps, self.weight_decay = (beta1, beta2), eps, weight_decay

    def _build(self) -> dict[str, Any]:
        sp, (p_, g_, _, m_, v_, s_, c_) = _symbols()
        lr_, wd, b1, b2, eps_ = sp.symbols("lr wd beta1 beta2 eps", real=True)
        beta1, beta2 = self.betas
        consts = {"lr": self.lr, "wd": self.weight_decay, "beta1": beta1, "beta2": beta2}
        consts["eps"] = self.eps
        grad = g_ if self.decoupled else g_ + wd * p_
        kind = "adamw" if self.decoupled else "adam"
        base = p_ * (1 - lr_ * wd) if self.decoupled else p_
        return {
            "m": _compile(
                m_ + (1 - b1) * (grad - m_), [m_, g_, p_], f"{kind}_first_moment", **consts
            ),
            "v": _compile(
                b2 * v_ + (1 - b2) * grad**2, [v_, g_, p_], f"{kind}_second_moment", **consts
            ),
            # s = lr / (1 - β1ᵗ), c = √(1 - β2ᵗ): per-step scalars, passed as inputs
            "step": _compile(
                base - s_ * m_ / (sp.sqrt(v_) / c_ + eps_),
                [p_, m_, v_, s_, c_],
                f"{kind}_step",
                **consts,
            ),
        }

    @property
    def _m(self) -> Any:
        return self._op("m")

    @property
    def _v(self) -> Any:
        return self._op("v")

    @property
    def _step(self) -> Any:
        return self._op("step")

    def structure(self) -> str:
        return (
            f"{type(self).__name__}:{self.decoupled}:{self.lr!r}:{self.betas!r}:{self.eps!r}:"
            f"{self.weight_decay!r}"
        )

    def _update(self, p: Parameter, grad: np.ndarray, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = self.betas
        state["exp_avg"] = self._m(state["exp_avg"], grad, p.data)
        state["exp_avg_sq"] = self._v(state["exp_avg_sq"], grad, p.data)
        step_size = self.lr / (1 - beta1**t)
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        dt = p.data.dtype
        p.data = self._step(
            p.data,
            state["exp_avg"],
            state["exp_avg_sq"],
            np.asarray(step_size, dtype=dt),
            np.asarray(bias_correction2_sqrt, dtype=dt),
        )


class AdamW(Adam):
    """AdamW: decoupled weight decay ``p ← p·(1 − lr·wd)`` (default ``weight_decay=0.01``)."""

    decoupled = True

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)
