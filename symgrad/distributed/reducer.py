"""Gradients averaged across ranks: flat bucket buffers, all-reduced asynchronously.

Every trained parameter's gradient is a view of one flat, contiguous buffer per dtype, the last
parameter's gradient first (reverse layer order: the order the backward pass finishes them).
Each buffer is cut into **buckets** of consecutive parameters (about ``bucket_bytes`` each); a
bucket is handed to ``torch.distributed.all_reduce`` as ``torch.from_numpy(view)`` — the NumPy
memory itself, no copy — with ``async_op=True``, and the result lands in place.

* **Layer path / tape** (:meth:`GradientReducer.attach` … :meth:`~GradientReducer.finish`):
  ``Parameter.grad`` points into the buffers before the backward pass, so each VJP's gradient is
  added straight into its bucket; a post-accumulate hook counts the gradients each parameter
  receives, and a bucket whose parameters are complete is sent at once — while the backward
  pass goes on computing the lower layers.  The counts are learnt in the first step (the model
  must run the same backward every step, as torch's ``static_graph``); a gradient arriving after
  its bucket left is a :class:`~symgrad.distributed.group.DistributedError`.  Buckets leave in
  the same order on every rank (a bucket waits for the ones before it), as collectives must.
* **Compiled step** (:meth:`GradientReducer.reduce_flat`): the step computes every gradient into
  its own flat buffers (:meth:`symgrad.compile.CompiledStep.flat_gradients`); between the
  backward pass and the update they are scaled by the rank's weight and sent in buckets, last
  layer first.  The step is one function, so nothing overlaps the backward pass there.

The loss a rank computes is its shard's mean; the rank's weight (its rows over the global
batch's, :class:`~symgrad.distributed.sampler.Shard`) scales its loss cotangent (or its
gradients), so the all-reduced **sum** is the gradient of the global batch's mean loss — the
one-process gradient, up to the order of the additions.

``stats`` accumulate, per step: the seconds the buckets took from leaving to arriving
(``comm_s``, from the completion callbacks of the gloo work), the seconds the step waited for
them (``wait_s``: what was not overlapped) and the bytes sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..nn.modules import HookHandle, Parameter
from .group import DistributedError, World, guarded

#: Bucket size: large enough that the per-message latency does not dominate, small enough that
#: the last layers' gradients leave while the backward pass computes the first ones.
DEFAULT_BUCKET_BYTES = 4 << 20


@dataclass
class _Bucket:
    view: np.ndarray  # 1-D slice of a flat buffer
    params: list[Parameter]


@dataclass
class ReduceStats:
    """Totals over the steps run: all-reduce time, the part the step waited for, bytes."""

    steps: int = 0
    early: int = 0  # buckets sent while the backward pass was still running
    comm_s: float = 0.0
    wait_s: float = 0.0
    bytes: int = 0
    per_step: list[tuple[float, float]] = field(default_factory=list)  # (comm_s, wait_s)

    @property
    def overlapped_fraction(self) -> float:
        """The share of the all-reduce time hidden behind computation."""
        return 0.0 if self.comm_s <= 0 else max(0.0, 1.0 - self.wait_s / self.comm_s)


class _InFlight:
    """The buckets of one step that have left: their work handles and timings."""

    def __init__(self) -> None:
        self.works: list[Any] = []
        self.launched: list[float] = []
        self.done: list[float] = []
        self.bytes = 0

    def send(self, view: np.ndarray, count: bool = True) -> None:
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(view)  # the NumPy memory: the sum lands in place
        self.launched.append(time.perf_counter())
        work = dist.all_reduce(tensor, async_op=True)
        work.get_future().add_done_callback(lambda _: self.done.append(time.perf_counter()))
        self.works.append(work)
        self.bytes += view.nbytes if count else 0

    def drain(self) -> BaseException | None:
        """Wait for every bucket sent, also past a failure (a failed collective left pending
        aborts the process when gloo gives up on it); the first failure, or None."""
        failure = None
        for work in self.works:
            try:
                work.wait()
            except Exception as err:  # every one is awaited; the first failure is raised
                failure = failure or err
        self.works = []
        return failure

    def wait(self, stats: ReduceStats) -> None:
        start = time.perf_counter()
        failure = self.drain()
        if failure is not None:
            raise failure
        end = time.perf_counter()
        # the comm thread's busy time: each bucket from when it left (or the previous one
        # arrived) to its arrival; completion callbacks may lag the wait by a hair
        busy, free = 0.0, 0.0
        for left, arrived in zip(self.launched, sorted(self.done), strict=False):
            begin = max(left, free)
            busy += max(0.0, arrived - begin)
            free = arrived
        waited = end - start
        stats.steps += 1
        stats.comm_s += max(busy, waited)
        stats.wait_s += waited
        stats.bytes += self.bytes
        stats.per_step.append((max(busy, waited), waited))


class GradientReducer:
    """Flat per-dtype gradient buffers of ``params`` (the trained parameters, in the model's
    order), cut into buckets and all-reduced (summed) across the ranks of ``world``.  The
    buffers are made at the first :meth:`attach` (the layer path and the tape); a compiled
    step's own buffers go through :meth:`reduce_flat`, with none allocated here.

    ``overlap=False`` sends every bucket after the backward pass, in the same order.
    """

    def __init__(
        self,
        params: Sequence[Parameter],
        world: World,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        overlap: bool = True,
    ) -> None:
        if bucket_bytes < 1:
            raise DistributedError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.world, self.bucket_bytes, self.overlap = world, int(bucket_bytes), overlap
        self.params = list({id(p): p for p in params}.values())
        self.stats = ReduceStats()
        # The layer path's flat buffers and buckets are made at the first attach(): a compiled
        # step all-reduces buffers of its own (reduce_flat), so it never allocates these.
        self.flats: dict[np.dtype, np.ndarray] = {}
        self._views: dict[int, np.ndarray] = {}
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}
        self._expected: dict[int, int] | None = None  # gradients per parameter per step
        self._counts: dict[int, int] = {}
        self._ready: list[int] = []  # parameters complete, per bucket
        self._next = 0  # the next bucket to send (they leave in order)
        self._flight: _InFlight | None = None
        self._handles: list[HookHandle] = []
        if overlap:
            self._handles = [
                p.register_post_accumulate_grad_hook(self._arrived) for p in self.params[::-1]
            ]

    def _layout(self) -> None:
        """The flat per-dtype buffers, each parameter's view and the buckets (layer path)."""
        order = self.params[::-1]  # the backward pass finishes the last layer first
        for dtype in dict.fromkeys(p.data.dtype for p in order):
            same = [p for p in order if p.data.dtype == dtype]
            flat = self.flats[dtype] = np.zeros(sum(p.data.size for p in same), dtype)
            offset = 0
            for p in same:
                self._views[id(p)] = flat[offset : offset + p.data.size]
                offset += p.data.size
        for p in order:
            last = self.buckets[-1] if self.buckets else None
            full = last is not None and last.view.nbytes >= self.bucket_bytes
            if last is None or full or last.view.dtype != p.data.dtype:
                self.buckets.append(_Bucket(self._views[id(p)], [p]))
            else:  # the next slice of the same flat buffer
                flat = self.flats[p.data.dtype]
                start = _offset(flat, last.view)
                last.view = flat[start : start + last.view.size + p.data.size]
                last.params.append(p)
        self._bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b.params}

    # -- the layer path and the tape ---------------------------------------------------------

    def attach(self) -> None:
        """Before a backward pass: zero the buffers and point every ``grad`` into them."""
        if self._flight is not None:
            raise DistributedError("attach() again before finish(): a step was left half done")
        if not self.flats and self.params:
            self._layout()
        for flat in self.flats.values():
            flat.fill(0)
        for p in self.params:
            p.grad = self._views[id(p)].reshape(p.data.shape)
        self._counts = {id(p): 0 for p in self.params}
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._flight = _InFlight()
        if self._expected is not None:
            for p in self.params:
                if self._expected[id(p)] == 0:
                    self._ready[self._bucket_of[id(p)]] += 1
            self._send_ready()

    def _arrived(self, p: Parameter) -> None:
        if self._flight is None or id(p) not in self._counts:
            return  # a gradient outside a data-parallel step (or of another optimizer)
        self._counts[id(p)] += 1
        k = self._bucket_of[id(p)]
        if k < self._next:
            raise DistributedError(
                f"a parameter of shape {p.shape} received gradient number {self._counts[id(p)]}"
                f" of this step after its bucket was all-reduced: the backward pass differs "
                "from the first step's; train with overlap=False"
            )
        if self._expected is not None and self._counts[id(p)] == self._expected[id(p)]:
            self._ready[k] += 1
            self._send_ready()

    def _send_ready(self) -> None:
        assert self._flight is not None
        while self._next < len(self.buckets) and self._ready[self._next] == len(
            self.buckets[self._next].params
        ):
            with guarded(f"the all-reduce of gradient bucket {self._next}", self.world):
                self._flight.send(self.buckets[self._next].view)
            self._next += 1
            self.stats.early += 1

    def finish(self, loss: float = 0.0) -> float:
        """After the backward pass: send the buckets still here and ``loss``, wait for all;
        every ``grad`` then holds the sum over ranks, and the sum of ``loss`` is returned."""
        flight = self._flight
        if flight is None:
            raise DistributedError("finish() without attach(): no step is in progress")
        for p in self.params:
            if p.grad is None or not np.shares_memory(p.grad, self._views[id(p)]):
                self._flight = None
                raise DistributedError(
                    f"the gradient of a parameter of shape {p.shape} was replaced during the "
                    "backward pass instead of added with Parameter.accumulate: it is not in the "
                    "buffers the all-reduce sends"
                )
        try:
            with guarded("the all-reduce of the gradients", self.world):
                while self._next < len(self.buckets):
                    flight.send(self.buckets[self._next].view)
                    self._next += 1
                total = np.array([loss], np.float64)
                flight.send(total, count=False)
                flight.wait(self.stats)
        except BaseException:
            flight.drain()
            raise
        finally:
            self._flight = None
        if self.overlap:
            self._expected = dict(self._counts)
        return float(total[0])

    def abandon(self) -> None:
        """Forget a step whose backward pass failed, once the buckets it sent are through."""
        if self._flight is not None:
            self._flight.drain()
        self._flight = None

    def detach(self) -> None:
        """Remove the hooks (the reducer is not used again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- a compiled step ---------------------------------------------------------------------

    def reduce_flat(self, flats: Sequence[np.ndarray], weight: float) -> None:
        """Scale the flat gradient buffers of a compiled step by ``weight`` and sum them over
        ranks in place, in buckets of ``bucket_bytes``, first elements (the last layer) first."""
        flight = _InFlight()
        try:
            with guarded("the all-reduce of the gradients", self.world):
                for flat in flats:
                    step = max(1, self.bucket_bytes // flat.itemsize)
                    for start in range(0, flat.size, step):
                        view = flat[start : start + step]
                        view *= weight
                        flight.send(view)
                flight.wait(self.stats)
        except BaseException:
            flight.drain()
            raise

    # -- scalars -------------------------------------------------------------------------------

    def sum_scalar(self, value: float) -> float:
        """``value`` summed over ranks."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64)
        with guarded("the all-reduce of the loss", self.world):
            dist.all_reduce(tensor)
        return float(tensor.item())


def _offset(flat: np.ndarray, view: np.ndarray) -> int:
    """Where the 1-D ``view`` starts in ``flat``."""
    return (view.__array_interface__["data"][0] - flat.__array_interface__["data"][0]) // (
        flat.itemsize
    )
