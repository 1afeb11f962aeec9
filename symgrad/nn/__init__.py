"""Trainable networks built from derived kernels (torch-compatible layout and names)."""

from . import utils
from .bert import BertConfig, BertEncoder
from .gpt import GPTBlock
from .losses import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    ElementwiseLoss,
    Loss,
    MSELoss,
    fuse,
)
from .modules import (
    ELU,
    GELU,
    Elementwise,
    Hardtanh,
    LayerNorm,
    LeakyReLU,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    SiLU,
    Softplus,
    Softsign,
    StateDictError,
    Tanh,
)
from .tape import Tape

__all__ = [
    "ELU",
    "GELU",
    "BCELoss",
    "BCEWithLogitsLoss",
    "BertConfig",
    "BertEncoder",
    "CrossEntropyLoss",
    "Elementwise",
    "ElementwiseLoss",
    "GPTBlock",
    "Hardtanh",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "Loss",
    "MSELoss",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Softsign",
    "StateDictError",
    "Tanh",
    "Tape",
    "fuse",
    "utils",
]
