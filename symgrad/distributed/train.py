"""Data-parallel training: every rank holds the whole model and trains on its share of each
global batch; gradients are summed across ranks before every rank applies the same update.

:class:`DataParallel` is the set-up of one run — the process group (:func:`~.group.init`), the
start-up check that every rank runs the same thing, rank 0's parameters broadcast to all, the
sampler (:class:`~.sampler.DistributedSampler`) and the gradient buckets
(:class:`~.reducer.GradientReducer`) — and runs one step of either path:

* :meth:`DataParallel.backward` — the layer path or the tape: ``compute(indices, weight)`` runs
  the forward and the backward pass of the rank's rows with the loss cotangent scaled by
  ``weight``; the buckets leave while it runs;
* :meth:`DataParallel.compiled` — a compiled step (:func:`symgrad.compile.compile_step`) whose
  gradient hook all-reduces its flat gradient buffers between backward and update.

:func:`fit` is :func:`symgrad.train.fit` on top of it, with ``compiled=True`` for the step
compiler.  Rank 0 alone evaluates, shows progress and writes checkpoints; on resuming, rank 0
reads the checkpoint and sends it to every rank (no shared file system needed), and the run
continues with any number of ranks.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..compile import CompiledStep, compile_step
from ..nn.losses import Loss, fuse
from ..nn.modules import Module, Parameter
from ..optim import Optimizer
from ..optim.lr_scheduler import LRScheduler
from ..optim.serialize import to_json
from ..train import (
    History,
    backward_pass,
    check_checkpoint_path,
    check_fit_options,
    clip_gradients,
    compile_or_fallback,
    fallback_step,
    load_checkpoint,
    run_epochs,
)
from .group import World, check_same, current, guarded, init
from .reducer import DEFAULT_BUCKET_BYTES, GradientReducer
from .sampler import DistributedSampler, Shard


def describe_model(model: Module) -> str:
    """The model's structure as text: its modules, and every parameter's name, shape, dtype and
    whether it is trained (what every rank must agree on; hashed by :func:`~.group.check_same`)."""
    lines = [repr(model)]
    lines += [
        f"{name} {p.shape} {p.data.dtype} {'trained' if p.requires_grad else 'frozen'}"
        for name, p in model.named_parameters()
    ]
    return "\n".join(lines)


def describe_optimizer(optimizer: Any) -> str:
    """The optimizer's class and parameter groups (hyperparameters, parameter indices)."""
    groups = optimizer.state_dict()["param_groups"]
    return f"{type(optimizer).__name__}\n{to_json(groups)}"


def describe_data(*arrays: np.ndarray) -> str:
    """Shapes, dtypes and a SHA-256 of the bytes of the training arrays."""
    parts = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        parts.append(f"{a.shape} {a.dtype} {hashlib.sha256(a.tobytes()).hexdigest()[:16]}")
    return "\n".join(parts)


def trained_parameters(model: Module, optimizer: Any) -> list[Parameter]:
    """The parameters ``optimizer`` trains, in the model's order (its layers' order)."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for p in model.parameters() if p.requires_grad and id(p) in owned]


class DataParallel:
    """Data-parallel training of ``model`` by ``optimizer`` over ``n`` examples in global batches
    of ``batch_size`` (see the module docstring).

    Args:
        world: the process group; default: the one joined, else :func:`~.group.init`.
        facts: more descriptions every rank must share (name → text), checked at start with the
            model's structure, the optimizer and symgrad's version.
        last_batch: ``"split"``, ``"pad"`` or ``"drop"`` (:mod:`~symgrad.distributed.sampler`).
        bucket_bytes, overlap: the gradient buckets (:class:`~.reducer.GradientReducer`).
    """

    def __init__(
        self,
        model: Module,
        optimizer: Optimizer,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        last_batch: str = "split",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        overlap: bool = True,
        world: World | None = None,
        facts: dict[str, str] | None = None,
    ) -> None:
        self.world = world or current() or init()
        self.model, self.optimizer = model, optimizer
        self.sampler = DistributedSampler(
            n,
            batch_size,
            rank=self.world.rank,
            world_size=self.world.world_size,
            seed=seed,
            last_batch=last_batch,
        )
        schedule = f"n={n} batch_size={batch_size} seed={seed} last_batch={last_batch}"
        check_same(
            self.world,
            {
                "model structure": describe_model(model),
                "optimizer": describe_optimizer(optimizer),
                "schedule": schedule,
                **(facts or {}),
            },
        )
        self.broadcast_parameters()
        self.params = trained_parameters(model, optimizer)
        self.reducer = GradientReducer(self.params, self.world, bucket_bytes, overlap)
        self._weight = 1.0  # the current shard's, for a compiled step's gradient hook

    def broadcast_parameters(self) -> None:
        """Every parameter (trained or not) set to rank 0's values."""
        import torch
        import torch.distributed as dist

        with guarded("the broadcast of rank 0's parameters", self.world):
            for p in self.model.parameters():
                dist.broadcast(torch.from_numpy(p.data), src=0)

    def shards(self, epoch: int) -> list[Shard]:
        """This rank's share of every global batch of ``epoch``."""
        return self.sampler.shards(epoch)

    def backward(self, shard: Shard, compute: Callable[[np.ndarray, float], float]) -> float:
        """One step's gradients on the layer path or the tape: ``compute(indices, weight)``
        runs forward and backward on the rank's rows, the loss cotangent scaled by ``weight``,
        and returns their mean loss.  Afterwards every trained ``grad`` holds the gradient of
        the global batch's mean loss; returns that loss."""
        self.reducer.attach()
        try:
            value = compute(shard.indices, shard.weight)
        except BaseException:
            self.reducer.abandon()
            raise
        return self.reducer.finish(value * shard.weight)

    def compiled(
        self,
        loss: Loss,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        fuse_loss: bool = True,
    ) -> Callable[..., float]:
        """A compiled step of the model + ``loss`` + this optimizer whose gradients are summed
        across ranks in its ``grad_hook``, between its backward pass and its clipping and
        update (so clipping sees the summed gradient): ``run(shard, *arrays)`` runs it on the
        rank's rows of ``arrays`` and returns the global batch's mean loss.  Building it may
        raise :class:`~symgrad.errors.UnsupportedStepError`; so may its first call, before
        any collective (every rank alike: they run the same model)."""
        step: CompiledStep = compile_step(
            self.model,
            loss,
            self.optimizer,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            fuse_loss=fuse_loss,
        )
        self.reduce_in(step)

        def run(shard: Shard, *arrays: np.ndarray) -> float:
            return self.run_compiled(step, shard, *(a[shard.indices] for a in arrays))

        run.step = step  # type: ignore[attr-defined]
        return run

    def reduce_in(self, step: CompiledStep) -> None:
        """Make ``step`` (a compiled step of this model and optimizer) sum its gradients across
        ranks: its ``grad_hook`` all-reduces its flat gradient buffers, scaled by the weight of
        the shard :meth:`run_compiled` runs, between its backward pass and its clipping and
        update.  Run it with :meth:`run_compiled` from then on."""

        def all_reduce(grads: list[np.ndarray]) -> None:
            self.reducer.reduce_flat(step.flat_gradients(), self._weight)

        step.grad_hook = all_reduce

    def run_compiled(self, step: CompiledStep, shard: Shard, *rows: np.ndarray) -> float:
        """One step of ``step`` (see :meth:`reduce_in`) on ``rows``, this rank's rows of the
        global batch (``shard``): every rank's gradients summed before the update; returns the
        global batch's mean loss."""
        self._weight = shard.weight
        value = step(*rows)
        return self.reducer.sum_scalar(value * shard.weight)

    def restore(
        self, checkpoint: str | Path | None, scheduler: LRScheduler | None = None
    ) -> tuple[int, History] | None:
        """Resume every rank from rank 0's checkpoint (read by rank 0, broadcast): returns
        ``(next_epoch, history)``, or None where rank 0 has no checkpoint (start afresh)."""
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.world.is_main and checkpoint is not None and Path(checkpoint).exists():
            payload = [Path(checkpoint).read_bytes()]
        with guarded("the broadcast of the checkpoint", self.world):
            dist.broadcast_object_list(payload, src=0)
        if payload[0] is None:
            return None
        return load_checkpoint(io.BytesIO(payload[0]), self.model, self.optimizer, scheduler)

    def close(self) -> None:
        """Remove the reducer's hooks from the parameters."""
        self.reducer.detach()


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
    last_batch: str = "split",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    overlap: bool = True,
    world: World | None = None,
) -> History:
    """:func:`symgrad.train.fit` over the ranks of a process group: the same arguments, and the
    same result as one process on the same global batches (``batch_size`` is the global batch:
    each of ``W`` ranks computes about ``batch_size / W`` rows of it).

    Every rank calls it with the same model, data and options (checked at start: a
    :class:`~symgrad.distributed.group.RankMismatchError` otherwise).  ``compiled`` as in
    :func:`~symgrad.train.fit`: the step compiler (the gradients all-reduced between its
    backward pass and its clipping and update) where it can (None, the default) or must
    (True), else through the layers (buckets sent while the backward pass runs, unless
    ``overlap=False``).  ``last_batch``: see :mod:`symgrad.distributed.sampler`.  Clipping sees
    the summed gradient.  Rank 0 alone evaluates, shows progress and writes ``checkpoint``; each
    rank's history holds the global losses (``evals`` on rank 0 only).
    """
    x, y = np.asarray(x), np.asarray(y)
    check_fit_options(model, loss, optimizer, x, y, epochs=epochs, batch_size=batch_size,
                      fuse_loss=fuse_loss, scheduler=scheduler,
                      scheduler_interval=scheduler_interval, clip_grad_norm=clip_grad_norm,
                      clip_grad_value=clip_grad_value)  # fmt: skip
    options = (
        f"epochs={epochs} compiled={compiled} fuse_loss={fuse_loss} clip_grad_norm="
        f"{clip_grad_norm} clip_grad_value={clip_grad_value} loss={loss!r} scheduler="
        f"{type(scheduler).__name__} every {scheduler_interval}"
    )
    dp = DataParallel(
        model,
        optimizer,
        len(x),
        batch_size,
        seed=seed,
        last_batch=last_batch,
        bucket_bytes=bucket_bytes,
        overlap=overlap,
        world=world,
        facts={"data": describe_data(x, y), "options": options},
    )
    if checkpoint is not None and dp.world.is_main:
        check_checkpoint_path(checkpoint)
    try:
        body, objective = fuse(model, loss) if fuse_loss else (model, loss)
        run = compile_or_fallback(
            lambda: dp.compiled(loss, clip_grad_norm=clip_grad_norm,
                                clip_grad_value=clip_grad_value, fuse_loss=fuse_loss),
            compiled,
        )  # fmt: skip

        def on_shard(shard: Shard) -> float:
            # a step that cannot be compiled raises before any collective (every rank alike)
            return run(shard, x, y)  # type: ignore[misc]

        def op_by_op(shard: Shard) -> float:
            value = dp.backward(
                shard, lambda idx, weight: backward_pass(body, objective, x[idx], y[idx], weight)
            )
            clip_gradients(optimizer, clip_grad_norm, clip_grad_value)
            optimizer.step()
            return value

        step = fallback_step(
            on_shard if run is not None else None, op_by_op, lambda s: s.global_size, compiled
        )
        return run_epochs(
            model,
            optimizer,
            dp.shards,
            step,
            epochs=epochs,
            evaluate=evaluate,
            checkpoint=checkpoint,
            resume=resume,
            stop_after_epoch=stop_after_epoch,
            progress=progress,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            main=dp.world.is_main,
            restore=lambda: dp.restore(checkpoint, scheduler),
        )
    finally:
        dp.close()
