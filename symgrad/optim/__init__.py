"""Optimizers with torch's semantics, their update rules compiled like any op.

``from symgrad import optim``: :class:`SGD`, :class:`Adam`, :class:`AdamW` (parameter groups,
live hyperparameters, torch's state dicts) and :mod:`symgrad.optim.lr_scheduler` (torch's
schedulers and the linear warm-up then decay of BERT fine-tuning).  Gradient clipping is in
:mod:`symgrad.nn.utils` (``clip_grad_norm_``, ``clip_grad_value_``), where torch has it.
"""

from . import lr_scheduler
from .adam import ADAM_RULE, Adam, AdamW
from .optimizer import Optimizer, required
from .sgd import SGD, SGD_RULE

__all__ = [
    "ADAM_RULE",
    "SGD",
    "SGD_RULE",
    "Adam",
    "AdamW",
    "Optimizer",
    "lr_scheduler",
    "required",
]
