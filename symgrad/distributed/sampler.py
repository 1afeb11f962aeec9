"""Global batches split across ranks: seeded, deterministic, the same for any number of ranks.

The global batches of an epoch are those of :func:`symgrad.train.batch_order` — a permutation
seeded by ``(seed, epoch)`` cut into ``batch_size`` rows — so a run on N processes sees exactly
the global batches a run on one process sees.  Rank ``r`` of ``W`` takes the rows
``batch[r::W]`` of each: the interleaving of torch's ``DistributedSampler`` (whose rank ``r``
reads ``indices[r::W]``; with a per-rank batch ``b`` its ranks together read the consecutive
``b·W`` indices of one global batch, as here).

Each rank's share carries a **weight**, its rows over the global batch's rows: the rank's mean
loss times its weight, summed over ranks, is the mean over the global batch — so the summed
gradients equal the one-process gradient also when a batch does not divide evenly among ranks.

The last batch of an epoch (``last_batch``):

* ``"split"`` (default) — kept as it is; ranks get ``⌈m/W⌉`` or ``⌊m/W⌋`` of its ``m`` rows,
  weighted: N processes ≡ 1 process, for any N.
* ``"pad"`` — torch's ``DistributedSampler(drop_last=False)``: the epoch's permutation is padded
  with its own first indices to a multiple of ``W`` (those examples count twice that epoch);
* ``"drop"`` — ``DistributedSampler(drop_last=True)``: the permutation's last ``n mod W``
  indices are left out of the epoch.

With ``"pad"`` and ``"drop"`` the batches depend on ``W`` (and a resumed run with another ``W``
differs from an uninterrupted one); with ``"split"`` they do not.  A rank whose share of a batch
is empty (a last batch of fewer rows than ranks) runs the step on the batch's first row with
weight 0: every rank runs every step and every collective, and it adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SymgradError
from ..train import batch_order

LAST_BATCH = ("split", "pad", "drop")


class SamplerError(SymgradError, ValueError):
    """The sampler's options do not make an epoch (sizes, rank, last-batch rule)."""


@dataclass(frozen=True)
class Shard:
    """One rank's share of one global batch: row indices, and their weight
    ``len(share) / global_size`` (0 for a stand-in row of an empty share)."""

    indices: np.ndarray
    weight: float
    global_size: int


class DistributedSampler:
    """The shards of rank ``rank`` of ``world_size`` over ``n`` examples.

    >>> s = DistributedSampler(10, batch_size=4, rank=1, world_size=3, seed=0)
    >>> [len(b) for b in s.global_batches(0)], [len(sh.indices) for sh in s.shards(0)]
    ([4, 4, 2], [1, 1, 1])
    >>> [round(sh.weight, 3) for sh in s.shards(0)]
    [0.25, 0.25, 0.5]
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        last_batch: str = "split",
    ) -> None:
        if last_batch not in LAST_BATCH:
            raise SamplerError(
                f"last_batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}"
            )
        if n < 1 or batch_size < 1:
            raise SamplerError(f"need n ≥ 1 examples and batch_size ≥ 1, got {n}, {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SamplerError(f"rank {rank} of world size {world_size}: need 0 ≤ rank < size")
        if last_batch == "drop" and n < world_size:
            raise SamplerError(
                f"last_batch='drop' leaves none of {n} examples for {world_size} ranks"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.last_batch = rank, world_size, last_batch

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (index arrays), the same on every rank."""
        batches = batch_order(self.n, self.batch_size, self.seed, epoch)
        if self.last_batch == "split" or self.n % self.world_size == 0:
            return batches
        perm = np.concatenate(batches)
        if self.last_batch == "pad":
            total = -(-self.n // self.world_size) * self.world_size
            perm = np.resize(perm, total)  # repeats the permutation's start, as torch pads
        else:
            perm = perm[: self.n - self.n % self.world_size]
        return [perm[k : k + self.batch_size] for k in range(0, len(perm), self.batch_size)]

    def shard(self, batch: np.ndarray) -> Shard:
        """This rank's share of a global batch."""
        mine = batch[self.rank :: self.world_size]
        if len(mine) == 0:
            return Shard(batch[:1], 0.0, len(batch))
        return Shard(mine, len(mine) / len(batch), len(batch))

    def shards(self, epoch: int) -> list[Shard]:
        """This rank's share of every global batch of the epoch."""
        return [self.shard(b) for b in self.global_batches(epoch)]

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.global_batches(0))
