"""What a task shows while it runs: labelled progress bars and one-line phase statuses.

A task takes a :class:`Console` and calls ``console.phase(label)`` around a step of unknown
length (``loading the weights … done in 2.1 s``), ``console.bar(items, label)`` around a loop
(a tqdm bar that stays on screen when done) and ``console.say(line)`` for a result line (per-epoch
lines, the headline).  Status and bars go to stderr, results to stdout, so
``symgrad finetune > report.txt`` keeps the results and still shows the progress.

``Console(progress=False)`` (``--quiet``) prints results only; :data:`SILENT` (the default of
the library functions) prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class Console:
    """Where a task reports: ``say`` (results, stdout), ``phase`` and ``bar`` (progress, stderr;
    only with ``progress=True``)."""

    def __init__(
        self,
        progress: bool = True,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        results: bool = True,
    ) -> None:
        self.progress = progress
        self.results = results
        self._out = out
        self._err = err

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    def say(self, line: str = "") -> None:
        """A result line (stdout)."""
        if self.results:
            print(line, file=self.out, flush=True)

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """``label …`` now, `` done in S s`` when the block ends (stderr)."""
        if not self.progress:
            yield
            return
        print(f"{label} …", end="", file=self.err, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" failed", file=self.err, flush=True)
            raise
        print(f" done in {time.perf_counter() - start:.1f} s", file=self.err, flush=True)

    def bar(self, items: Sequence[T] | Iterable[T], label: str, total: int | None = None) -> Any:
        """``items`` under a labelled tqdm bar (stderr) that stays on screen when done."""
        if not self.progress:
            return items
        return self._tqdm(items, label, total)

    def counter(self, total: int, label: str) -> Any:
        """A labelled bar advanced by hand (``.update(n)``, ``.close()``); a no-op without
        progress."""
        if not self.progress:
            return _NoBar()
        return self._tqdm(None, label, total)

    def _tqdm(self, items: Any, label: str, total: int | None) -> Any:
        from tqdm import tqdm

        return tqdm(
            items,
            desc=label,
            total=total,
            leave=True,
            file=self.err,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}]",
        )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


SILENT = Console(progress=False, results=False)
"""Prints nothing: the default of the tasks' ``run`` functions."""
