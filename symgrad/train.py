"""Training: seeded minibatches, the step loop, evaluation, history and checkpoints.

Batches are a pure function of ``(seed, epoch)`` (:func:`batch_order`), so a run resumed from a
checkpoint — or a PyTorch twin fed by the same function — sees exactly the same batches in the
same order.  Checkpoints are ``.npz`` files written atomically (temporary file + rename; a
temporary file left by a killed save is removed by the next): the model's weights, the
optimizer's state arrays (``optim/state/<index>/<name>``) and its parameter groups (JSON), the
learning-rate scheduler's state (JSON), the epoch and the history.  They are read without
pickle, and a damaged one is a :class:`~symgrad.errors.CheckpointError` naming the file and the
cause — before any weight is changed.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from .errors import (
    CheckpointError,
    SchedulerError,
    StepFallbackWarning,
    SymgradError,
    UnsupportedStepError,
)
from .nn.losses import Loss, fuse
from .nn.modules import Module, check_integer
from .nn.utils import clip_grad_norm_, clip_grad_value_
from .optim import Optimizer
from .optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from .optim.serialize import from_json, to_json

T = TypeVar("T")
B = TypeVar("B")


class DataError(SymgradError, ValueError):
    """Training data are malformed (NaN, mismatched lengths, empty)."""


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The minibatches (index arrays) of one epoch: a seeded permutation cut into batches."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[k : k + batch_size] for k in range(0, n, batch_size)]


@dataclass
class History:
    """What a run recorded: every step's loss, and per-epoch evaluations."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def accuracy(model: Module, x: np.ndarray, labels: np.ndarray, batch: int = 4096) -> float:
    """Fraction of rows whose arg-max output equals the label."""
    hits = 0
    for k in range(0, len(x), batch):
        hits += int(np.sum(np.argmax(model(x[k : k + batch]), axis=1) == labels[k : k + batch]))
    return hits / max(1, len(x))


def check_data(x: np.ndarray, y: np.ndarray) -> None:
    """Reject data that would train on garbage: NaN/inf, mismatched lengths, empty sets."""
    if x.shape[0] == 0:
        raise DataError("the training set is empty")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} inputs but {y.shape[0]} targets: they must be as many")
    for name, arr in (("inputs", x), ("targets", y)):
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise DataError(f"the {name} contain NaN or inf (first at index {tuple(bad)})")


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed save
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stubs: kwargs
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {err.strerror or err}"
        ) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_checkpoint_path(path: str | Path) -> Path:
    """``path`` as a checkpoint to write: its directory must exist or be creatable, and be
    writable, and ``path`` must not be a directory — checked before training starts (a
    training run must not find out after its first epoch)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"the checkpoint path {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CheckpointError(
            f"cannot write the checkpoint {path}: its directory {path.parent} is not "
            f"writable ({err.strerror or err})"
        ) from err
    return path


def _optimizer_arrays(optimizer: Optimizer) -> dict[str, np.ndarray]:
    """The optimizer's state dict as checkpoint entries: arrays, and the groups as JSON."""
    state = optimizer.state_dict()
    arrays = {
        f"optim/state/{index}/{name}": np.asarray(value)
        for index, values in state["state"].items()
        for name, value in values.items()
    }
    arrays["optim/param_groups"] = np.asarray(to_json(state["param_groups"]))
    arrays["optim/class"] = np.asarray(type(optimizer).__name__)
    return arrays


def _optimizer_state(data: Mapping[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer state dict stored by :func:`_optimizer_arrays` (or, from a checkpoint of
    symgrad before parameter groups, its flat ``optim/<index>.<name>`` arrays)."""
    state: dict[int, dict[str, Any]] = {}
    if "optim/param_groups" in data:
        groups = from_json(str(data["optim/param_groups"]))
        for key in data:
            if key.startswith("optim/state/"):
                index, name = key[len("optim/state/") :].split("/", 1)
                state.setdefault(int(index), {})[name] = data[key]
        return {"state": state, "param_groups": groups}
    for key in data:  # the earlier layout: one group, its hyperparameters not saved
        if key.startswith("optim/"):
            index, name = key[len("optim/") :].split(".", 1)
            state.setdefault(int(index), {})[name] = data[key]
    current = optimizer.state_dict()["param_groups"]
    return {"state": state, "param_groups": current}


def save_checkpoint(
    path: str | Path,
    model: Module,
    optimizer: Optimizer,
    epoch: int,
    history: History,
    scheduler: LRScheduler | None = None,
) -> None:
    """Write model, optimizer state (groups included), the scheduler's state, the next epoch
    and the history to ``path`` atomically."""
    arrays: dict[str, np.ndarray] = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update(_optimizer_arrays(optimizer))
    if scheduler is not None:
        arrays["scheduler"] = np.asarray(to_json(scheduler.state_dict()))
    arrays["epoch"] = np.asarray(epoch)
    arrays["step_losses"] = np.asarray(history.step_losses, dtype=np.float64)
    arrays["epoch_losses"] = np.asarray(history.epoch_losses, dtype=np.float64)
    arrays["evals"] = np.asarray(json.dumps(history.evals))
    _atomic_savez(Path(path), arrays)


#: What reading a damaged ``.npz`` raises: a bad or truncated zip, a missing array, bad data.
_DAMAGED = (
    zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, TypeError, OSError,
    json.JSONDecodeError,
)  # fmt: skip


def load_checkpoint(
    path: str | Path | BinaryIO,
    model: Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None = None,
) -> tuple[int, History]:
    """Restore what :func:`save_checkpoint` wrote (from a path, or an open binary file:
    data-parallel ranks resume from the bytes rank 0 read); returns ``(next_epoch, history)``.

    With ``scheduler`` (built as for the original run) its state is restored too, so the
    schedule continues where it stopped.  Everything is read and checked before the model or
    the optimizer is touched; a damaged, truncated or foreign file is a
    :class:`~symgrad.errors.CheckpointError`.
    """
    if not hasattr(path, "read"):
        path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}  # every array decompressed now
        model_state = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
        optim_state = _optimizer_state(arrays, optimizer)
        epoch = int(arrays["epoch"])
        history = History(
            [float(v) for v in arrays["step_losses"]],
            [float(v) for v in arrays["epoch_losses"]],
            json.loads(str(arrays["evals"])),
        )
        schedule = from_json(str(arrays["scheduler"])) if "scheduler" in arrays else None
        if not model_state or not isinstance(history.evals, list):
            raise ValueError("it holds no model state")
    except _DAMAGED as err:
        cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise CheckpointError(
            f"the checkpoint {path} is damaged or not a symgrad checkpoint ({cause}); delete "
            "it to start afresh"
        ) from err
    saved_kind = str(arrays.get("optim/class", type(optimizer).__name__))
    if saved_kind != type(optimizer).__name__:
        raise CheckpointError(
            f"the checkpoint {path} holds the state of the optimizer {saved_kind}, and this "
            f"run's optimizer is {type(optimizer).__name__}: resume with {saved_kind}, or "
            "delete the checkpoint to start afresh"
        )
    if scheduler is not None and schedule is None:
        raise SchedulerError(
            f"the checkpoint {path} holds no scheduler state (it was saved without a "
            "scheduler): resume it without one, or start the run again"
        )
    groups, state = optimizer._checked_state(optim_state)  # before the model changes
    model.load_state_dict(model_state)  # checks every entry before it writes any
    optimizer._set_state(groups, state)
    if scheduler is not None and schedule is not None:
        scheduler.load_state_dict(schedule)
    return epoch, history


def fit(
    model: Module,
    loss: Loss,
    optimizer: Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    evaluate: Callable[[Module], dict[str, float]] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: bool = False,
    fuse_loss: bool = True,
    scheduler: LRScheduler | None = None,
    scheduler_interval: str = "step",
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
    compiled: bool | None = None,
) -> History:
    """Train ``model`` on ``(x, y)``; returns the :class:`History`.

    Args:
        x: inputs ``(n, features)``; y: targets (labels ``(n,)`` or values like the output).
        epochs, batch_size, seed: the schedule; batches come from :func:`batch_order`.
        evaluate: called on the model after every epoch; its dict goes to ``history.evals``.
        checkpoint: a ``.npz`` path written after every epoch; with ``resume=True`` a run
            continues from it and ends exactly as an uninterrupted run would.
        stop_after_epoch: stop (as if interrupted) after this many epochs in total.
        fuse_loss: fold a trailing elementwise activation into an elementwise loss (see
            :func:`symgrad.nn.fuse`).
        scheduler: a learning-rate scheduler of ``optimizer``, stepped after every optimizer
            step (``scheduler_interval="step"``, as in BERT fine-tuning) or after every epoch
            (``"epoch"``; a ``ReduceLROnPlateau`` always, with the epoch's mean loss); saved in
            and restored from checkpoints.
        clip_grad_norm, clip_grad_value: clip the gradients of the optimizer's parameters
            before each optimizer step to this global 2-norm
            (:func:`symgrad.nn.utils.clip_grad_norm_`) or into ``[-value, value]``
            (:func:`~symgrad.nn.utils.clip_grad_value_`); one of the two.
        compiled: train through one compiled step per batch shape
            (:func:`symgrad.compile.compile_step`: forward, backward, clipping and update in
            one generated function), kept with the model for the next call with the same
            optimizer (:func:`symgrad.compile.step.fit_step`: an edited model is traced
            again).  ``None`` (the default) compiles when the model, loss and
            optimizer can be compiled and otherwise trains op by op with a
            :class:`~symgrad.errors.StepFallbackWarning` naming why; ``True`` makes that an
            :class:`~symgrad.errors.UnsupportedStepError`; ``False`` trains op by op.  The two
            paths agree to rounding (1e-12 in float64), not bit for bit: they sum in other
            orders.

    Data are checked first — NaN, lengths, feature count, labels — and an error is raised
    before any weight changes.  Data-parallel training over several processes:
    :func:`symgrad.distributed.fit` (the same arguments).
    """
    x, y = np.asarray(x), np.asarray(y)
    from .compile.step import fit_step

    compiled_step = compile_or_fallback(
        lambda: fit_step(model, loss, optimizer, clip_grad_norm=clip_grad_norm,
                         clip_grad_value=clip_grad_value, fuse_loss=fuse_loss),
        compiled,
    )  # fmt: skip
    check_fit_options(model, loss, optimizer, x, y, epochs=epochs, batch_size=batch_size,
                      checkpoint=checkpoint, fuse_loss=fuse_loss, scheduler=scheduler,
                      scheduler_interval=scheduler_interval, clip_grad_norm=clip_grad_norm,
                      clip_grad_value=clip_grad_value,
                      output_form=_traced_output(compiled_step))  # fmt: skip
    body, objective = fuse(model, loss) if fuse_loss else (model, loss)

    def on_batch(idx: np.ndarray) -> float:
        return float(compiled_step(x[idx], y[idx]))  # type: ignore[misc]

    def op_by_op(idx: np.ndarray) -> float:
        optimizer.zero_grad()
        value = backward_pass(body, objective, x[idx], y[idx])
        clip_gradients(optimizer, clip_grad_norm, clip_grad_value)
        optimizer.step()
        return value

    step = fallback_step(on_batch if compiled_step is not None else None, op_by_op, len, compiled)
    return run_epochs(
        model,
        optimizer,
        lambda epoch: batch_order(len(x), batch_size, seed, epoch),
        step,
        epochs=epochs,
        evaluate=evaluate,
        checkpoint=checkpoint,
        resume=resume,
        stop_after_epoch=stop_after_epoch,
        progress=progress,
        scheduler=scheduler,
        scheduler_interval=scheduler_interval,
    )


def check_fit_options(
    model: Module,
    loss: Loss,
    optimizer: Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    checkpoint: str | Path | None = None,
    fuse_loss: bool = True,
    scheduler: LRScheduler | None = None,
    scheduler_interval: str = "step",
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
    output_form: Callable[[np.ndarray, np.ndarray], tuple[tuple[int, ...], Any] | None]
    | None = None,
) -> None:
    """The checks :func:`fit` makes before training: the data, the schedule, the scheduler,
    clipping, the checkpoint's path, and the model and the loss on the data (a wrong feature
    count or label fails here, not mid-run): for floating-point ``x`` one batch through the
    model and the loss on all of ``y``, for integer ``x`` (ids) all of ``x`` through the
    model.  ``output_form(rows, targets)``, if given, replaces the batch through the model:
    the shape and dtype of the model's output on ``rows`` (a compiled step's
    :meth:`~symgrad.compile.CompiledStep.output_form`: traced, not computed), or None."""
    check_data(x, y)
    batch_size, epochs = check_integer("batch_size", batch_size), check_integer("epochs", epochs)
    if batch_size < 1 or epochs < 0:
        raise SymgradError(f"need batch_size ≥ 1 and epochs ≥ 0, got {batch_size}, {epochs}")
    if scheduler is not None and scheduler.optimizer is not optimizer:
        raise SchedulerError("the scheduler given to fit schedules another optimizer")
    if scheduler_interval not in ("step", "epoch"):
        raise SchedulerError(
            f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
        )
    if clip_grad_norm is not None and clip_grad_value is not None:
        raise SymgradError(
            "give clip_grad_norm or clip_grad_value, not both: which one comes first changes "
            "the result"
        )
    if checkpoint is not None:
        check_checkpoint_path(checkpoint)
    body, objective = fuse(model, loss) if fuse_loss else (model, loss)
    if x.dtype.kind == "f":
        # Floating-point rows can fail the model only by their shape or dtype, the same for
        # every row: one batch through the model, and the loss (every label or target) on its
        # outputs repeated to all rows — not an epoch's forward before the first step.
        rows = x[: max(1, min(batch_size, len(x)))]
        form = None if output_form is None else output_form(rows, y[: len(rows)])
        if form is not None and len(form[0]) >= 1 and form[0][0] == len(rows):
            objective.check(np.zeros((len(x), *form[0][1:]), form[1]), y)
            return
        out = body(rows)
        if np.ndim(out) >= 1 and len(out) == len(rows):
            whole = out if len(rows) == len(x) else np.resize(out, (len(x), *np.shape(out)[1:]))
            objective.check(whole, y)
            return
    # integer rows (token ids) may fail on any row: all of them through the model
    objective.check(body(x), y)


def _traced_output(
    step: Any,
) -> Callable[[np.ndarray, np.ndarray], tuple[tuple[int, ...], Any] | None] | None:
    """``check_fit_options``'s ``output_form`` from a compiled step (None without one): a
    model the step cannot trace gives None (checked op by op; the first step says why)."""
    if step is None:
        return None

    def form(rows: np.ndarray, targets: np.ndarray) -> tuple[tuple[int, ...], Any] | None:
        try:
            return step.output_form(rows, targets)  # type: ignore[no-any-return]
        except UnsupportedStepError:
            return None

    return form


def clip_gradients(
    optimizer: Optimizer, clip_grad_norm: float | None, clip_grad_value: float | None
) -> None:
    """Clip the gradients ``optimizer`` is about to apply by global norm or by value, as
    :func:`fit` asks (a parameter outside the optimizer counts in no norm: its gradient is
    not applied, and not zeroed between steps either), as the compiled step clips."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if clip_grad_norm is not None:
        clip_grad_norm_(params, clip_grad_norm)
    elif clip_grad_value is not None:
        clip_grad_value_(params, clip_grad_value)


def run_epochs(
    model: Module,
    optimizer: Optimizer,
    batches: Callable[[int], Sequence[Any]],
    step: Callable[[Any], tuple[float, int]],
    *,
    epochs: int,
    evaluate: Callable[[Module], dict[str, float]] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: bool = False,
    scheduler: LRScheduler | None = None,
    scheduler_interval: str = "step",
    main: bool = True,
    restore: Callable[[], tuple[int, History] | None] | None = None,
) -> History:
    """The epoch loop of :func:`fit`: ``step(batch) -> (loss, examples)`` for every batch of
    ``batches(epoch)``, the scheduler, then ``evaluate`` and the checkpoint after each epoch.

    ``main=False`` (a data-parallel process other than rank 0) evaluates, shows progress and
    writes checkpoints not at all; ``restore()`` replaces reading ``checkpoint`` on resuming
    (it returns ``(next_epoch, history)``, or None to start afresh).
    """
    plateau = isinstance(scheduler, ReduceLROnPlateau)  # stepped with each epoch's loss
    start, history = 0, History()
    if resume and restore is not None:
        start, history = restore() or (start, history)
    elif resume and checkpoint is not None and Path(checkpoint).exists():
        start, history = load_checkpoint(checkpoint, model, optimizer, scheduler)
    last = epochs if stop_after_epoch is None else min(epochs, stop_after_epoch)
    bar = None
    for epoch in range(start, last):
        epoch_batches = batches(epoch)
        if bar is None:
            bar = _progress(progress and main, (last - start) * len(epoch_batches))
        total, count = 0.0, 0
        for batch in epoch_batches:
            value, examples = step(batch)
            if scheduler_interval == "step" and scheduler is not None and not plateau:
                scheduler.step()
            history.step_losses.append(value)
            total, count = total + value * examples, count + examples
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
        history.epoch_losses.append(total / count)
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(total / count)
        elif scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        if evaluate is not None and main:
            history.evals.append(evaluate(model))
        if checkpoint is not None and main:
            save_checkpoint(checkpoint, model, optimizer, epoch + 1, history, scheduler)
    if bar is not None:
        bar.close()
    return history


def compile_or_fallback(build: Callable[[], T], compiled: bool | None) -> T | None:
    """``fit``'s compiled step, built by ``build()``; or None to train op by op:
    ``compiled=False``, or a model the step compiler refuses (an
    :class:`~symgrad.errors.UnsupportedStepError`) when ``compiled`` is None — with a
    :class:`~symgrad.errors.StepFallbackWarning` naming why.  ``compiled=True`` lets the error
    through."""
    if compiled is not None and not isinstance(compiled, bool):
        raise SymgradError(f"compiled must be True, False or None, got {compiled!r}")
    if compiled is False:
        return None
    try:
        return build()
    except UnsupportedStepError as error:
        if compiled:
            raise
        _warn_fallback(error)
        return None


def backward_pass(
    body: Module, objective: Loss, x: np.ndarray, y: np.ndarray, weight: float = 1.0
) -> float:
    """Forward and backward of one batch op by op, the gradients added into the parameters'
    ``grad``; the loss cotangent scaled by ``weight`` (a data-parallel rank's share).  Returns
    the batch's mean loss."""
    out, ctx = body.forward(x)
    value, grad = objective.value_and_grad(out, y)
    body.backward(ctx, grad if weight == 1.0 else grad * weight, need_input_grad=False)
    return float(value)


def fallback_step(
    compiled_step: Callable[[B], float] | None,
    op_by_op: Callable[[B], float],
    size: Callable[[B], int],
    compiled: bool | None,
) -> Callable[[B], tuple[float, int]]:
    """``fit``'s step of one batch, ``(loss, examples)``: ``compiled_step(batch)`` while it runs,
    else ``op_by_op(batch)``.  A compiled step refusing a batch (an
    :class:`~symgrad.errors.UnsupportedStepError`, raised before anything changed) is a
    :class:`~symgrad.errors.StepFallbackWarning` and op by op from then on — or the error,
    with ``compiled=True``."""
    current = [compiled_step]

    def step(batch: B) -> tuple[float, int]:
        run = current[0]
        if run is not None:
            try:
                return run(batch), size(batch)
            except UnsupportedStepError as error:
                if compiled:
                    raise
                _warn_fallback(error)
                current[0] = None
        return op_by_op(batch), size(batch)

    return step


def _warn_fallback(error: UnsupportedStepError) -> None:
    warnings.warn(
        f"fit trains op by op: the step cannot be compiled ({error}); pass compiled=False to "
        "choose that path without this warning",
        StepFallbackWarning,
        stacklevel=3,
    )


def _progress(enabled: bool, total: int) -> Any:
    if not enabled or total <= 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, disable=None)  # None: only on a TTY
