"""Optimizer: torch.optim.Optimizer's interface over symgrad Parameters, updates compiled.

Parameters come in **parameter groups**, as in torch: ``SGD(model.parameters(), lr=0.1)`` makes
one group; ``SGD([{"params": head, "lr": 1e-3}, {"params": body}], lr=5e-5)`` two, each key a
group lacks taken from the optimizer's ``defaults``.  ``optimizer.param_groups`` is the list of
those dicts, and a hyperparameter changed there (by hand or by a
:mod:`~symgrad.optim.lr_scheduler`) takes effect on the next step: every hyperparameter is an
*input* of the compiled update, read on each step.  ``optimizer.state[p]`` holds a parameter's
state under torch's names; :meth:`Optimizer.state_dict` has torch's layout
(``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``).

Each optimizer class is one :class:`~symgrad.symbolic.update.UpdateRule` (its ``rule``) plus the
checks of its hyperparameters: the eager step runs the rule's compiled kernel on every parameter
with a gradient, and the fused training step (:func:`symgrad.compile.compile_step`)
compiles the same rule into its loops.  Bad hyperparameters raise
:class:`~symgrad.errors.HyperparameterError` (a ``ValueError``) naming the group and the value,
when a group is added and before every step.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any, ClassVar

import numpy as np

from ..errors import ArgumentError, HyperparameterError, OptimizerError, ShapeError
from ..nn.modules import Parameter
from ..runtime.update import update_kernel
from ..symbolic.update import UpdateRule

#: The value of a default that every group must give itself (torch's ``required``).
required: Any = type("_Required", (), {"__repr__": lambda self: "<required parameter>"})()


def check_real(
    group: int,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    what: str = "",
) -> float:
    """``value`` as a float if it is a real number within ``[low, high]`` (``[low, high)`` with
    ``high_open``); else a :class:`HyperparameterError` naming the group and the value."""
    if type(value) is float or type(value) is int:  # the usual case, checked quickly
        number = float(value)
        if (
            number == number
            and (low is None or number >= low)
            and (high is None or (number < high if high_open else number <= high))
        ):
            return number
    label = f"{what} {name}" if what else name
    bounds = []
    if low is not None:
        bounds.append(f"≥ {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '≤'} {high:g}")
    need = f"a real number {' and '.join(bounds)}".rstrip()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise HyperparameterError(
            f"param group {group}: invalid {label}: {value!r} ({type(value).__name__}); it must "
            f"be {need}"
        )
    number = float(value)
    bad = math.isnan(number)
    bad |= low is not None and number < low
    bad |= high is not None and (number >= high if high_open else number > high)
    if bad:
        raise HyperparameterError(
            f"param group {group}: invalid {label}: {value!r}; it must be {need}"
        )
    return number


def check_flag(group: int, name: str, value: object) -> bool:
    """``value`` as a bool if it is one (or 0/1); else a :class:`HyperparameterError`."""
    if value is True or value is False or isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise HyperparameterError(
        f"param group {group}: invalid {name}: {value!r}; it must be True or False"
    )


@cache
def _switches(rule: UpdateRule) -> tuple[int, ...]:
    """For each state of ``rule``, the index of the hyperparameter it is active with (-1:
    always active)."""
    names = [h.name for h in rule.hyperparameters]
    return tuple(-1 if s.active_if is None else names.index(s.active_if) for s in rule.states)


class Optimizer:
    """Base class: parameter groups, per-parameter state, the compiled update step.

    A subclass sets ``rule`` (its :class:`UpdateRule`), passes its ``defaults`` and checks a
    group's hyperparameters in :meth:`check_group`.
    """

    rule: ClassVar[UpdateRule]

    def __init__(self, params: Iterable[Any], defaults: Mapping[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.state: defaultdict[Parameter, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        if isinstance(params, (Parameter, np.ndarray, dict)):
            raise ArgumentError(
                f"params given to {type(self).__name__} should be an iterable of Parameters or "
                f"of dicts (parameter groups), got a {type(params).__name__}: wrap it in a list"
            )
        if isinstance(params, (set, frozenset)):
            raise ArgumentError(
                f"params given to {type(self).__name__} must come in an ordered collection (a "
                "list), not a set, whose order changes between runs"
            )
        groups = list(params)
        if not groups:
            raise OptimizerError(
                f"{type(self).__name__} got an empty parameter list: give it "
                "model.parameters() or a list of parameter groups"
            )
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # -- attributes: hyperparameters live in the groups -----------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        defaults = self.__dict__.get("defaults")
        if defaults is not None and name in defaults:
            raise OptimizerError(
                f"{type(self).__name__} has no attribute {name!r}: hyperparameters live in the "
                f"parameter groups, as in torch — set optimizer.param_groups[k][{name!r}] "
                f"(every group: for g in optimizer.param_groups: g[{name!r}] = ...)"
            )
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        defaults = self.__dict__.get("defaults", {})
        if name in defaults:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: read it from a parameter "
                f"group, optimizer.param_groups[k][{name!r}] (as in torch)"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for k, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {k}")
            lines += [f"    {key}: {group[key]}" for key in sorted(group) if key != "params"]
        return "\n".join([*lines, ")"])

    # -- parameter groups -----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (a dict with ``"params"`` and any hyperparameters; the rest from
        ``defaults``), as torch's ``add_param_group``: checked before it is added."""
        index = len(self.param_groups)
        if not isinstance(param_group, dict):
            raise ArgumentError(
                f"param group {index} must be a dict with a 'params' entry, got "
                f"{type(param_group).__name__}"
            )
        if "params" not in param_group:
            raise OptimizerError(f"param group {index} has no 'params' entry: {param_group!r}")
        params = param_group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise ArgumentError(
                f"param group {index}: parameters must come in an ordered collection (a list), "
                "not a set, whose order changes between runs"
            )
        else:
            params = list(params)
        for p in params:
            if not isinstance(p, Parameter):
                raise ArgumentError(
                    f"param group {index}: optimizers take symgrad Parameters, got "
                    f"{type(p).__name__}"
                )
        if len({id(p) for p in params}) != len(params):
            raise OptimizerError(
                f"param group {index} lists a parameter twice: it would be updated twice"
            )
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise OptimizerError(
                f"param group {index}: some parameters appear in more than one parameter group"
            )
        group = dict(param_group)
        group["params"] = params
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise HyperparameterError(
                    f"param group {index} does not give a value of the required "
                    f"hyperparameter {name!r}"
                )
            group.setdefault(name, default)
        self.check_group(group, index)
        self.check_new_group(group, index)
        self.param_groups.append(group)

    def check_group(self, group: Mapping[str, Any], index: int) -> None:
        """Raise :class:`HyperparameterError` if a hyperparameter of ``group`` is invalid
        (called when a group is added and before every step)."""

    def check_new_group(self, group: Mapping[str, Any], index: int) -> None:
        """Checks made once, when a group is added (torch makes them at construction)."""

    # -- the step -------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every parameter's gradient (``None``, or zeros with ``set_to_none=False``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad[...] = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every trainable parameter that has a gradient; returns ``closure()`` (called
        first, as in torch) or None.  Every group is checked before anything is updated."""
        loss = closure() if closure is not None else None
        for index, group in enumerate(self.param_groups):
            self.check_group(group, index)
        for group in self.param_groups:
            hyper = self.hyperparameters(group)
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if not (p.data.flags.c_contiguous and p.data.flags.writeable):
                    p.data = np.array(p.data, order="C")  # updated in place from here on
                states, scalars, _ = self.prepare_update(p, hyper, np.empty(0, p.data.dtype))
                kernel = update_kernel(self.rule, p.data.dtype)
                kernel.run(p.data, p.grad, states, [*hyper, *scalars])
        return loss

    def hyperparameters(self, group: Mapping[str, Any]) -> list[float]:
        """The group's hyperparameters as the update reads them (``rule.hyperparameters``
        order, floats)."""
        return [h.value(group) for h in self.rule.hyperparameters]

    def prepare_update(
        self, p: Parameter, hyper: list[float], inactive: np.ndarray
    ) -> tuple[list[np.ndarray], list[float], tuple[Any, ...]]:
        """Create or advance ``p``'s state for its next update, as torch does, given its
        group's :meth:`hyperparameters`: the counter incremented, an active state created as
        zeros (its fresh flag 1.0), an inactive one passed as ``inactive`` and left as it is.

        Returns the state arrays (``rule.states`` order), the scalar inputs after the
        hyperparameters (counter, fresh flags) and what :meth:`undo_prepare` needs to take
        the change back.  The eager step and the fused step both call this.
        """
        rule = self.rule
        cached = self.__dict__.get("_switch_cache")
        if cached is None or cached[0] is not rule:  # once per rule: it runs before every step
            cached = self.__dict__["_switch_cache"] = (rule, _switches(rule))
        switches = cached[1]
        state = self.state.get(p)
        scalars: list[float] = []
        previous = None
        if rule.counter is not None:
            if state is None:
                state = self.state[p]
            previous = state.get(rule.counter)
            state[rule.counter] = float(previous or 0.0) + 1.0
            scalars.append(state[rule.counter])
        arrays: list[np.ndarray] = []
        created: list[str] = []
        fresh: list[float] = []
        for spec, switch in zip(rule.states, switches, strict=True):
            if switch >= 0 and hyper[switch] == 0.0:
                arrays.append(inactive)
                new = False
            else:
                if state is None:
                    state = self.state[p]
                new = spec.name not in state
                if new:
                    state[spec.name] = np.zeros_like(p.data)
                    created.append(spec.name)
                arrays.append(state[spec.name])
            if spec.fresh is not None:
                fresh.append(1.0 if new else 0.0)
        return arrays, scalars + fresh, (p, created, previous)

    def undo_prepare(self, undo: tuple[Any, ...]) -> None:
        """Take back what :meth:`prepare_update` did (an update that did not happen)."""
        p, created, previous = undo
        state = self.state.get(p)
        if state is None:
            return
        for name in created:
            state.pop(name, None)
        if self.rule.counter is not None:
            if previous is None:
                state.pop(self.rule.counter, None)
            else:
                state[self.rule.counter] = previous
        if not state:
            del self.state[p]

    def structure(self) -> str:
        """What the generated update code depends on: the rule alone (no hyperparameter)."""
        return f"{type(self).__name__}:{self.rule.name}:{self.rule.fingerprint()}"

    # -- state dicts ----------------------------------------------------------------------------

    def _indices(self) -> dict[int, int]:
        """Each parameter's index across the groups, in order (torch's numbering)."""
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return index

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {name: value}}, "param_groups": [{..., "params": [index]}]}``,
        torch's layout; arrays and values are copies."""
        index = self._indices()
        groups = []
        for group in self.param_groups:
            packed = copy.deepcopy({k: v for k, v in group.items() if k != "params"})
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {
            index[id(p)]: copy.deepcopy(values)
            for p, values in self.state.items()
            if id(p) in index and values
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (for the same parameters, in the same
        groups): hyperparameters and state; arrays are copied and cast to the parameters'
        dtype.  Anything that does not fit raises before the optimizer changes: a state dict
        of another kind of optimizer (whose groups lack this one's hyperparameters, or whose
        state has entries this one does not keep) included."""
        self._set_state(*self._checked_state(state_dict))

    def _set_state(
        self, groups: list[dict[str, Any]], state: defaultdict[Parameter, dict[str, Any]]
    ) -> None:
        """Install what :meth:`_checked_state` returned (cannot fail)."""
        self.param_groups = groups
        self.state = state

    def _checked_state(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], defaultdict[Parameter, dict[str, Any]]]:
        """The groups and the state ``state_dict`` gives this optimizer, every entry checked;
        nothing changes."""
        try:
            saved_groups = list(state_dict["param_groups"])
            saved_state = dict(state_dict["state"])
        except (KeyError, TypeError) as err:
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict)
            raise OptimizerError(
                "an optimizer state dict has 'state' and 'param_groups' entries (see "
                f"Optimizer.state_dict); got {got}"
            ) from err
        if len(saved_groups) != len(self.param_groups):
            raise OptimizerError(
                f"the state dict has {len(saved_groups)} parameter group(s), the optimizer "
                f"{len(self.param_groups)}"
            )
        by_index: dict[int, Parameter] = {}
        for k, (mine, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            ids = list(saved.get("params", []))
            if len(ids) != len(mine["params"]):
                raise OptimizerError(
                    f"param group {k} of the state dict has {len(ids)} parameters, the "
                    f"optimizer's {len(mine['params'])}"
                )
            by_index.update(zip((int(i) for i in ids), mine["params"], strict=True))
        kind = type(self).__name__
        groups = []
        for k, (mine, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            missing = [key for key in self.defaults if key not in saved]
            if missing:
                raise OptimizerError(
                    f"param group {k} of the state dict lacks {missing}, hyperparameters of "
                    f"{kind}: it was saved by another kind of optimizer (its group has "
                    f"{sorted(str(key) for key in saved if key != 'params')}); load it into "
                    "the optimizer that saved it"
                )
            group = copy.deepcopy({key: v for key, v in saved.items() if key != "params"})
            group["params"] = mine["params"]
            self.check_group(group, k)
            groups.append(group)
        state: defaultdict[Parameter, dict[str, Any]] = defaultdict(dict)
        arrays = {s.name for s in self.rule.states}
        for key, values in saved_state.items():
            p = by_index.get(int(key))
            if p is None:
                raise OptimizerError(
                    f"the state dict has state for parameter {key}, which no group lists"
                )
            for name, value in dict(values).items():
                if name == self.rule.counter:
                    state[p][name] = float(np.asarray(value))
                elif name in arrays:
                    arr = np.array(value, dtype=p.data.dtype, order="C")
                    if arr.shape != p.shape:
                        raise ShapeError(
                            f"the state dict's {name!r} of parameter {key} has shape "
                            f"{arr.shape}, the parameter {p.shape}"
                        )
                    state[p][name] = arr
                else:
                    kept = sorted(arrays | ({self.rule.counter} if self.rule.counter else set()))
                    raise OptimizerError(
                        f"the state dict's state of parameter {key} has {name!r}, which "
                        f"{kind} does not keep (it keeps {kept}): it was saved by another "
                        "kind of optimizer; load it into the optimizer that saved it"
                    )
        return groups, state
