"""UpdateRule: an optimizer's update written once, as data that every consumer reads.

An optimizer (``symgrad.optim.SGD``, ``Adam``...) is described by one :class:`UpdateRule`:

* its **hyperparameters** — the parameter-group keys read on every step (``lr``, ``momentum``,
  ``betas[0]``...), each a real symbol in the formulas (booleans are 0.0 / 1.0);
* its per-parameter **states** (torch's names: ``momentum_buffer``, ``exp_avg``...), each
  starting as zeros; a state may exist only while a hyperparameter is nonzero (SGD's buffer
  while ``momentum != 0``: torch creates it on the first step with momentum, and a rule may read
  the state's *fresh* flag — 1.0 on that step — to give it its first value);
* an optional per-parameter **counter** (Adam's ``step``), incremented before each update;
* the per-step **scalars** (Adam's bias corrections), in order, as formulas of the
  hyperparameters and the counter;
* the ordered **updates**: assignments ``target = formula`` evaluated element by element, where
  a target is the parameter, a state (its new value: later formulas that name it read the new
  value, as in sequential code) or a new local name.

The plain part (names, keys, counter) is read at run time without SymPy — a warm start of a
compiled step imports none.  The formulas are built on first use (:meth:`UpdateRule.formulas`)
and compiled by :mod:`symgrad.codegen.update`, both into the eager per-parameter kernel
(:mod:`symgrad.runtime.update`) and into the fused training step: nothing about an update is
written anywhere else.  Because every hyperparameter is a kernel *input*, changing one between
steps takes effect, as in torch, and the generated code depends on the rule alone.
"""

from __future__ import annotations

import hashlib
import inspect
import keyword
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from ..errors import DefinitionError

if TYPE_CHECKING:
    import sympy as sp


#: Names the generated kernels use themselves.
_RESERVED = frozenset({"i", "r", "n", "math", "np", "njit", "update"})


@dataclass(frozen=True)
class Hyperparameter:
    """A scalar read from a parameter group on every step: ``group[key]`` or
    ``group[key][index]`` (``betas[0]``); ``name`` is its symbol's name in the formulas."""

    name: str
    key: str
    index: int | None = None

    def value(self, group: Mapping[str, Any]) -> float:
        """The value in ``group`` as a float (``True`` → 1.0)."""
        raw = group[self.key] if self.index is None else group[self.key][self.index]
        return float(raw)


@dataclass(frozen=True)
class State:
    """A per-parameter state array (``optimizer.state[p][name]``), zeros when created.

    ``active_if`` names a hyperparameter: the state exists, and is read and updated, only while
    that hyperparameter is nonzero (the formulas see it as 0 otherwise).  ``fresh`` names a
    flag symbol that is 1.0 on the update that creates the state and 0.0 after.
    """

    name: str
    active_if: str | None = None
    fresh: str | None = None


@dataclass(frozen=True)
class Formulas:
    """The SymPy part of a rule: per-step scalars and element updates, each in order."""

    scalars: tuple[tuple[sp.Symbol, sp.Expr], ...]
    updates: tuple[tuple[sp.Symbol, sp.Expr], ...]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per rule
class UpdateRule:
    """One optimizer's update (see the module docstring).

    ``build`` returns the :class:`Formulas`; their symbols are real symbols named ``param``,
    ``grad``, and by the names declared here (hyperparameters, states, the counter, fresh
    flags), earlier scalars and earlier locals.
    """

    name: str
    hyperparameters: tuple[Hyperparameter, ...]
    states: tuple[State, ...]
    counter: str | None
    build: Callable[[], Formulas]
    param: str = "param"
    grad: str = "grad"

    # -- the plain part: what a kernel call passes --------------------------------------------

    @property
    def fresh_flags(self) -> tuple[str, ...]:
        return tuple(s.fresh for s in self.states if s.fresh is not None)

    @property
    def scalar_inputs(self) -> tuple[str, ...]:
        """The scalar arguments of an update, in order: hyperparameters, counter, fresh flags."""
        counter = (self.counter,) if self.counter is not None else ()
        return (*(h.name for h in self.hyperparameters), *counter, *self.fresh_flags)

    @property
    def array_inputs(self) -> tuple[str, ...]:
        """The array arguments of an update, in order: the parameter, its gradient, states."""
        return (self.param, self.grad, *(s.name for s in self.states))

    def fingerprint(self) -> str:
        """A hash of the rule computed without SymPy: its plain fields and the source of its
        ``build`` function (a changed formula names new kernels)."""
        return _fingerprint(self)

    # -- the formulas ---------------------------------------------------------------------------

    def formulas(self) -> Formulas:
        """The rule's formulas, built on first use and checked (:class:`DefinitionError` for a
        symbol that is not declared, a target assigned twice, or a parameter never updated)."""
        return _checked_formulas(self)


@cache
def _fingerprint(rule: UpdateRule) -> str:
    try:
        source = inspect.getsource(rule.build)
    except (OSError, TypeError):  # no source (built interactively): its compiled code instead
        code = rule.build.__code__
        consts = [c for c in code.co_consts if not isinstance(c, types.CodeType)]
        source = repr((code.co_code, code.co_names, consts))
    plain = repr(
        (rule.name, rule.hyperparameters, rule.states, rule.counter, rule.param, rule.grad)
    )
    return hashlib.sha256(f"{plain}\0{source}".encode()).hexdigest()


@cache
def _checked_formulas(rule: UpdateRule) -> Formulas:
    import sympy as sp

    formulas = rule.build()
    known = {rule.param, rule.grad, *rule.scalar_inputs, *(s.name for s in rule.states)}
    declared = [rule.param, rule.grad, *rule.scalar_inputs, *(s.name for s in rule.states)]
    if len(set(declared)) != len(declared):
        raise DefinitionError(f"update rule {rule.name!r}: names repeat in {declared}")
    for name in declared:  # they name kernel arguments; generated locals start with "_"
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_") or (
            name in _RESERVED
        ):
            raise DefinitionError(
                f"update rule {rule.name!r}: {name!r} cannot name a kernel argument (an "
                f"identifier not starting with '_' and not one of {sorted(_RESERVED)})"
            )
    hyper = {h.name for h in rule.hyperparameters}
    for s in rule.states:
        if s.active_if is not None and s.active_if not in hyper:
            raise DefinitionError(
                f"update rule {rule.name!r}: state {s.name!r} is active_if {s.active_if!r}, "
                "which is not a hyperparameter"
            )

    def check(what: str, expr: sp.Expr) -> None:
        unknown = sorted(s.name for s in expr.free_symbols if s.name not in known)
        if unknown:
            raise DefinitionError(
                f"update rule {rule.name!r}: {what} uses {unknown}, which are neither declared "
                f"nor assigned before (known: {sorted(known)})"
            )
        if not all(getattr(s, "is_real", False) for s in expr.free_symbols):
            raise DefinitionError(f"update rule {rule.name!r}: {what} has non-real symbols")

    for target, expr in formulas.scalars:
        check(f"scalar {target}", sp.sympify(expr))
        if target.name in known:
            raise DefinitionError(f"update rule {rule.name!r}: scalar {target} is assigned twice")
        known.add(target.name)
    assigned: set[str] = set()
    stored = {rule.param, *(s.name for s in rule.states)}
    for target, expr in formulas.updates:
        check(f"the update of {target}", sp.sympify(expr))
        if target.name in assigned or (target.name in known and target.name not in stored):
            raise DefinitionError(f"update rule {rule.name!r}: {target} is assigned twice")
        assigned.add(target.name)
        known.add(target.name)
    if rule.param not in assigned:
        raise DefinitionError(f"update rule {rule.name!r}: the parameter is never updated")
    return formulas
