"""Simplification with a time budget.

``sympy.simplify`` can take minutes on a large derivative.  :func:`bounded_simplify` tries a
ladder of rewrites, cheapest first, and keeps the one with the fewest operations; the expensive
``sympy.simplify`` rung runs under a wall-clock budget (a ``SIGALRM`` timer, available on the
main thread of a POSIX process) and is skipped where no timer can be set.  The result is always
mathematically equal to the input: every rung is an identity-preserving SymPy rewrite.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import sympy as sp

#: Default budget in seconds for the expensive rung; ``SYMGRAD_SIMPLIFY_SECONDS`` overrides it.
DEFAULT_BUDGET = 2.0


class _OutOfTimeError(Exception):
    pass


def _budget_from_env() -> float:
    raw = os.environ.get("SYMGRAD_SIMPLIFY_SECONDS")
    if raw is None:
        return DEFAULT_BUDGET
    try:
        return max(0.0, float(raw))
    except ValueError:
        return DEFAULT_BUDGET


#: Seconds between repeated alarms once the budget is spent (see :func:`_deadline`).
_RETRY_SECONDS = 0.05


def _swallowing(frame: FrameType | None) -> bool:
    """Whether ``frame`` (or a caller) runs where Python drops exceptions: a ``__del__``, a
    weakref callback, a ``gc`` callback or the unraisable-exception hook.  An alarm raised there
    is lost (and reported as unraisable, or fails the hook); the repeated alarm lands later."""
    hooks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    hooks.add(getattr(sys.unraisablehook, "__code__", None))
    while frame is not None:
        code = frame.f_code
        if code in hooks or code.co_name == "__del__" or code.co_filename == weakref.__file__:
            return True
        frame = frame.f_back
    return False


@contextmanager
def _deadline(seconds: float) -> Iterator[bool]:
    """Abandon the block after ``seconds``; yields whether a timer could be set.

    The alarm raises :class:`_OutOfTimeError` inside the block, which this context suppresses.  It
    repeats every :data:`_RETRY_SECONDS`, and does not raise where Python swallows exceptions
    (a ``gc`` callback, a ``__del__``; :func:`_swallowing`): there the exception would be lost,
    or would fail the unraisable-exception hook that reports it.
    """
    can_time = (
        seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not can_time:
        yield False
        return
    armed = True

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if armed and not _swallowing(frame):
            raise _OutOfTimeError

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, _RETRY_SECONDS)
    try:
        try:
            yield True
        finally:
            armed = False  # a repeated alarm landing before this line is caught below
    except _OutOfTimeError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_CHEAP: tuple[Callable[[sp.Expr], sp.Expr], ...] = (
    sp.expand,
    sp.factor_terms,
    lambda e: sp.factor_terms(sp.expand(e)),
    sp.cancel,
)


def bounded_simplify(expr: sp.Expr, budget: float | None = None) -> sp.Expr:
    """The smallest (by ``count_ops``) of several SymPy simplifications of ``expr``.

    ``budget`` bounds the time spent in ``sympy.simplify`` (default
    :data:`DEFAULT_BUDGET`, or the environment variable ``SYMGRAD_SIMPLIFY_SECONDS``).
    """
    budget = _budget_from_env() if budget is None else budget
    best, best_ops = expr, sp.count_ops(expr)

    def consider(candidate: sp.Expr) -> None:
        nonlocal best, best_ops
        ops = sp.count_ops(candidate)
        if ops < best_ops:
            best, best_ops = candidate, ops

    for rewrite in _CHEAP:
        try:
            consider(rewrite(expr))
        except (sp.PolynomialError, TypeError, ValueError, NotImplementedError):
            continue  # a rung that does not apply to this expression
    with _deadline(budget) as timed:
        if timed:
            consider(sp.simplify(best))
    return best
