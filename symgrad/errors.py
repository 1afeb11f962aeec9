"""The one error hierarchy of symgrad.

Every error symgrad raises on bad input is a :class:`SymgradError`.  Subclasses also derive
from the builtin exception a caller would naturally catch (``ValueError`` for bad values and
shapes, ``TypeError`` for bad types), so ``except ValueError`` keeps working.  A message says
what is wrong, shows the offending value, and says what to do.
"""

from __future__ import annotations


class SymgradError(Exception):
    """Base class of every error symgrad raises on bad input."""


class DefinitionError(SymgradError, ValueError):
    """An op definition is malformed (inputs, names, constants, indices)."""


class UnboundSymbolError(DefinitionError):
    """A free symbol of a formula is neither an input, a dim, nor a bound constant."""


class UnsupportedFunctionError(DefinitionError):
    """A formula uses a function that symgrad cannot differentiate or compile."""


class NonDifferentiableError(DefinitionError):
    """Differentiating a formula produced a construct that has no numeric meaning."""


class ComplexityError(DefinitionError):
    """A symbolic step (differentiation, contraction, common subexpressions...) would exceed
    one of symgrad's size limits (:mod:`symgrad.symbolic.bounds`); the message names the op, the
    step and the limit."""


class CodegenError(SymgradError, ValueError):
    """The code generator met an expression it cannot print as Numba source."""


class ShapeError(SymgradError, ValueError):
    """Array shapes do not fit an op (mismatched inputs, wrong rank, inconsistent dims)."""


class IndexRangeError(SymgradError, IndexError):
    """An integer tensor (token ids, labels) holds a value outside the axis it indexes."""


class DTypeError(SymgradError, TypeError):
    """An array has a dtype symgrad does not compute in (only float32 and float64)."""


class MissingDataError(SymgradError, FileNotFoundError):
    """A data or model file that ships inside a package is not there (package not installed)."""


class CacheError(SymgradError, OSError):
    """The kernel cache cannot be used: a directory or file that cannot be created, read or
    written (the message names the path and the cause)."""


class CheckpointError(SymgradError, OSError):
    """A training checkpoint cannot be read (damaged, truncated, not a checkpoint) or written;
    the message names the file and the cause."""


class ArgumentError(SymgradError, TypeError):
    """An op was called with the wrong number or kind of arguments."""


class DeviceError(SymgradError, ValueError):
    """A tensor lives on a device symgrad's kernels cannot read (they run on the CPU)."""


class FormulaError(DefinitionError):
    """A formula string is not a formula symgrad accepts (see :mod:`symgrad.symbolic.parse`)."""


class ExplainError(SymgradError, TypeError):
    """A derivation printout was asked for something symgrad cannot explain (e.g. a module type)."""


class UnsupportedStepError(SymgradError, TypeError):
    """A model, loss or optimizer the step compiler cannot compile: the message names what and
    why; the tape's reverse mode trains it instead (``fit(..., compiled=False)``)."""


class OptimizerError(SymgradError, ValueError):
    """An optimizer's parameter groups or state dict are malformed (no parameters, a parameter
    in two groups, a state dict made for other parameters)."""


class HyperparameterError(OptimizerError):
    """A hyperparameter of a parameter group is invalid (a negative learning rate, a beta
    outside [0, 1)); the message names the group and the value, as torch's ValueError does."""


class SchedulerError(SymgradError, ValueError):
    """A learning-rate scheduler got invalid arguments or a state it cannot use."""


class NonFiniteNormError(SymgradError, RuntimeError):
    """The total gradient norm is NaN or infinite and ``error_if_nonfinite`` was set."""


class StepFallbackWarning(UserWarning):
    """``fit`` could not compile the training step (an :class:`UnsupportedStepError`, named in
    the message) and trains op by op instead; ``fit(..., compiled=True)`` makes it an error."""

