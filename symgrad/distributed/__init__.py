"""Data-parallel training on ``torch.distributed`` (gloo, CPU), launched by ``torchrun``.

Every rank holds the whole model; each global batch is split across the ranks
(:class:`DistributedSampler`, seeded, the same global batches for any number of ranks); after the
backward pass the gradients — flat per-dtype bucket buffers handed to torch without copies — are
summed with asynchronous ``all_reduce`` calls, last layer first, and every rank applies the same
update.  N processes train exactly as one process on the same global batches.

>>> import symgrad.distributed as sd          # doctest: +SKIP
>>> world = sd.init(timeout=300)               # under torchrun  # doctest: +SKIP
>>> history = sd.fit(model, loss, opt, x, y, epochs=3, batch_size=64)  # doctest: +SKIP

Above :mod:`symgrad.train` and :mod:`symgrad.compile` in the pipeline; with ``symgrad.torch``, the
tasks and the benchmarks, the only package that imports torch.
"""

from .group import (
    DEFAULT_TIMEOUT,
    CollectiveError,
    DistributedError,
    RankMismatchError,
    SetupError,
    World,
    abort,
    check_same,
    current,
    init,
    launched,
    shutdown,
)
from .launch import launch, torchrun_command
from .reducer import DEFAULT_BUCKET_BYTES, GradientReducer, ReduceStats
from .sampler import LAST_BATCH, DistributedSampler, SamplerError, Shard
from .train import DataParallel, describe_model, fit, trained_parameters

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT",
    "LAST_BATCH",
    "CollectiveError",
    "DataParallel",
    "DistributedError",
    "DistributedSampler",
    "GradientReducer",
    "RankMismatchError",
    "ReduceStats",
    "SamplerError",
    "SetupError",
    "Shard",
    "World",
    "abort",
    "check_same",
    "current",
    "describe_model",
    "fit",
    "init",
    "launch",
    "launched",
    "shutdown",
    "torchrun_command",
    "trained_parameters",
]
