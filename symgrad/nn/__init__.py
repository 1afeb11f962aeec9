"""Trainable networks built from derived kernels (torch-compatible layout and names)."""

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

__all__ = [
    "ELU", "GELU", "BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "Elementwise",
    "ElementwiseLoss", "Hardtanh", "LayerNorm", "LeakyReLU", "Linear", "Loss", "MSELoss",
    "Module", "Parameter", "ReLU", "Sequential", "SiLU", "Sigmoid", "Softplus", "Softsign",
    "StateDictError", "Tanh", "fuse",
]
