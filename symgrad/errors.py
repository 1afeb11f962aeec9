"""The one error hierarchy of symgrad.

Every error symgrad raises on bad input is a :class:`SymgradError`.  Subclasses also derive
from the builtin exception a caller would naturally catch (``ValueError`` for bad values and
shapes, ``TypeError`` for bad types), so ``except ValueError`` keeps working.  A message says
what is wrong, shows the offending value, and says what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


class ThreadPoolWarning(UserWarning):
    """symgrad's thread pool stays off by default (kernels serial, the BLAS with its own
    threads): Numba's TBB layer did not load or another layer runs, or the kernels' BLAS was not
    found — the message says which and how to fix it."""


class BlasWarning(UserWarning):
    """symgrad's own OpenBLAS computed a wrong product in its check at load, with the kernel it
    picked or ``SYMGRAD_BLAS_CORETYPE`` named: the kernels call SciPy's BLAS instead; the
    message names the kernel and how to pick another."""


class OptionError(SymgradError, ValueError):
    """A command or task option has a value outside its range (or does not apply)."""


class OutputError(SymgradError, OSError):
    """An output file or directory cannot be written (checked before any work starts)."""


def _edits(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
    neighbours (``tahn`` → ``tanh`` is one edit)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` most likely misspells: the fewest edits (at most a third of the
    word, one at least; ties go to the same length, then to :mod:`difflib`'s similarity), else
    the closest by :mod:`difflib` (similarity ≥ 0.6), else the only candidate that starts with
    (or contains) ``word``; ``None`` otherwise.

    >>> closest("tahn", ["tan", "tanh"]), closest("sms", ["sms-minilm", "digits"])
    ('tanh', 'sms-minilm')
    """
    options = list(dict.fromkeys(candidates))
    if not word or not options:
        return None

    def rank(c: str) -> tuple[int, int, float]:
        similarity = difflib.SequenceMatcher(None, word, c).ratio()
        return (_edits(word, c), abs(len(c) - len(word)), -similarity)

    best = min(options, key=rank)
    if rank(best)[0] <= max(1, len(word) // 3):
        return best
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return close[0]
    for matches in (str.startswith, str.__contains__):
        found = [c for c in options if matches(c, word)]
        if len(found) == 1:
            return found[0]
    return None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = closest(word, candidates)
    return f" (did you mean {close!r}?)" if close is not None else ""
