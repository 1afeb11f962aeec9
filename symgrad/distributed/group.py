"""The process group: set up from ``torchrun``'s environment, torn down, checked, guarded.

``torchrun`` (or ``python -m torch.distributed.run``) starts one process per rank and gives each
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init`
reads them and joins the gloo process group (CPU) with a timeout: every collective — and the
rendezvous itself — that waits longer than ``timeout`` seconds fails instead of hanging.  A
collective that fails (a rank died: its connections close at once; a rank hangs: the timeout
expires) raises :class:`CollectiveError`, which names the rank, the operation and what to do.

:func:`check_same` compares facts every rank must share — symgrad's version, a hash of the
model's structure, the data and the schedule — with one ``all_gather`` at the start, so that two
ranks never train different models in lockstep without anyone noticing.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NoReturn

from .._version import __version__
from ..errors import SymgradError

#: The environment ``torchrun`` gives each process.
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective may wait for the other ranks before it fails (torch's default is 30
#: minutes; a rank that hangs should not hold the others that long).
DEFAULT_TIMEOUT = 600.0


class DistributedError(SymgradError, RuntimeError):
    """Data-parallel training cannot go on: set-up, a rank lost, ranks that disagree."""


class SetupError(DistributedError):
    """The process group cannot be set up (not launched by torchrun, bad environment)."""


class CollectiveError(DistributedError):
    """A collective failed: another rank died, hung past the timeout, or the network failed."""


class RankMismatchError(DistributedError):
    """The ranks do not run the same thing (symgrad version, model structure, data, schedule)."""


@dataclass(frozen=True)
class World:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    timeout: float

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes checkpoints and reports."""
        return self.rank == 0


_current: World | None = None


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise SetupError(
            f"the environment variable {name} is not set: start data-parallel training with "
            "torchrun (torchrun --nproc-per-node N -m symgrad finetune ...), or with "
            "'symgrad finetune --nproc N' on one machine"
        )
    try:
        return int(value)
    except ValueError:
        raise SetupError(f"{name}={value!r} is not an integer") from None


def init(timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the gloo process group described by torchrun's environment; returns the
    :class:`World`.  Called again in the same process, it returns the group already joined.

    ``timeout``: seconds any collective (and the rendezvous) waits for the other ranks before
    it fails with :class:`CollectiveError` — a hung rank stops the job within it.
    """
    global _current
    import torch.distributed as dist

    if _current is not None and dist.is_initialized():
        return _current
    if not (timeout > 0):
        raise SetupError(f"the process group's timeout must be positive seconds, got {timeout}")
    rank, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if size < 1 or not 0 <= rank < size:
        raise SetupError(f"RANK={rank} and WORLD_SIZE={size}: need 0 ≤ RANK < WORLD_SIZE")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise SetupError(f"{name} is not set: torchrun sets it (--rdzv-endpoint HOST:PORT)")
    _env_int("MASTER_PORT")
    if not dist.is_gloo_available():  # pragma: no cover - every CPU build of torch has gloo
        raise SetupError("this build of torch has no gloo backend")
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout)
        )
    except (RuntimeError, ValueError, TimeoutError) as err:
        raise SetupError(
            f"rank {rank} of {size} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s: "
            f"{_first_line(err)}"
        ) from err
    _current = World(rank, size, local, float(timeout))
    return _current


def current() -> World | None:
    """The group this process joined with :func:`init`, or None."""
    return _current


def shutdown() -> None:
    """Leave the process group (nothing happens if none was joined)."""
    global _current
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None


def abort(status: int) -> NoReturn:
    """End this process at once with ``status``, after a :class:`CollectiveError`: once a peer
    is gone, gloo's threads cannot be torn down cleanly (the interpreter's exit may abort in
    them), so output is flushed and the process leaves without running finalizers."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(status)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextmanager
def guarded(what: str, world: World | None = None) -> Iterator[None]:
    """Turn the failure of a collective inside the block into a :class:`CollectiveError`
    naming this rank, the operation and the likely cause."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, TimeoutError) as err:
        world = world or _current
        where = f"rank {world.rank} of {world.world_size}" if world else "this rank"
        limit = f"{world.timeout:g} s" if world else "the process group's timeout"
        raise CollectiveError(
            f"{where}: {what} failed — another rank died, or did not answer within {limit} "
            f"(hung), or the network failed ({_first_line(err)}). The job stops; checkpoints "
            "written so far are intact: fix the cause and start it again with resume (any "
            "number of ranks)."
        ) from err


def structure_hash(description: str) -> str:
    """A short hash of a structure description."""
    return hashlib.sha256(description.encode()).hexdigest()[:16]


def check_same(world: World, facts: Mapping[str, str]) -> None:
    """All-gather ``facts`` (name → description) from every rank and compare them with rank 0's,
    with symgrad's version added; a difference is a :class:`RankMismatchError` naming the ranks
    and the fact.  Each description is compared by hash; its text only makes the message."""
    import torch.distributed as dist

    mine = {"symgrad version": __version__, **facts}
    hashed = {name: structure_hash(text) for name, text in mine.items()}
    gathered: list[Any] = [None] * world.world_size
    with guarded("the start-up check (all_gather of the structure hashes)", world):
        dist.all_gather_object(gathered, (hashed, mine))
    base_hashes, base = gathered[0]
    for rank, (hashes, theirs) in enumerate(gathered):
        for name in sorted(set(base_hashes) | set(hashes)):
            if hashes.get(name) != base_hashes.get(name):
                raise RankMismatchError(
                    f"rank {rank} differs from rank 0 in its {name}: "
                    f"{_difference(str(base.get(name)), str(theirs.get(name)))}. Every rank must "
                    "run the same symgrad version on the same model, data and schedule."
                )


def _difference(a: str, b: str) -> str:
    """The first line where two descriptions differ, both ways."""
    la, lb = a.splitlines(), b.splitlines()
    for k in range(max(len(la), len(lb))):
        x = la[k] if k < len(la) else "<nothing>"
        y = lb[k] if k < len(lb) else "<nothing>"
        if x != y:
            return f"rank 0 has {x!r:.200}, it has {y!r:.200}"
    return "the descriptions differ"  # pragma: no cover - equal text, equal hash
