"""The main job's training step, symgrad's compiled step beside the torch twin's, kernel by kernel.

    python benchmarks/profile_minilm_step.py [--threads N] [--level c] [--repeat R] [--kernels]

Builds both sides as ``symgrad finetune --task sms-minilm --limit all`` does (all-MiniLM-L6-v2,
AdamW, batch 16, float32), takes training batches of the first epoch at about six different
lengths (each padded to its longest message, as the task pads them), and times one step of each
side on each (the median of R after a warm-up that also compiles).  ``--kernels`` then times every
kernel the compiled step calls, once per length (a step of more than ``WHOLE_STEP_OPS`` ops is a
Python driver over the kernels, so their calls can be wrapped).  symgrad's kernels and torch both
run on ``--threads`` threads (symgrad's pool, the BLAS in its kernels
single-threaded).  Prints the machine and the command.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time
from typing import Any


def _median_ms(f: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--level", default="c", choices=["b", "c"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kernels", action="store_true")
    opts = parser.parse_args(argv)

    import scipy.linalg.cython_blas  # noqa: F401  (Numba's BLAS, loaded before the limit)
    import torch
    from threadpoolctl import threadpool_limits

    from symgrad.runtime import threads
    from symgrad.tasks import minilm

    torch.set_num_threads(opts.threads)
    threadpool_limits(opts.threads)
    threads.set_num_threads(opts.threads)
    threads.limit_blas()  # the BLAS in symgrad's kernels on one thread (the limit above raised it)
    print(f"python {' '.join(sys.argv)}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; {opts.threads} thread(s), level {opts.level}")

    work = minilm.step_workload(opts.level)
    train, ours, by_length = work.train, work.ours, work.by_length
    ours_step, twin_step = work.symgrad_step(), work.torch_step()
    lengths = sorted(by_length)
    picked = [by_length[t] for t in lengths[:: max(1, len(lengths) // 6)]]

    for idx in picked:  # warm-up: every shape compiled and traced
        ours_step(idx)
        twin_step(idx)
    assert ours.compiled is not None
    module = ours.compiled._module
    names = [n for n in dir(module) if n[:1] == "k" and "_" in n and callable(getattr(module, n))]
    kernels = {n: getattr(module, n) for n in names}
    spent: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def timed(name: str, f: Any) -> Any:
        label = f"{f.__module__.split('_kernels_')[-1].rsplit('_', 1)[0]}.{name.split('_', 1)[1]}"

        def call(*args: Any) -> Any:
            start = time.perf_counter()
            out = f(*args)
            spent[label] += time.perf_counter() - start
            calls[label] += 1
            return out

        return call

    print(f"{'T':>4} {'symgrad ms':>11} {'torch ms':>9} {'ratio':>6}")
    for idx in picked:
        length = train.batch(idx)[0].shape[1]
        mine = _median_ms(lambda idx=idx: ours_step(idx), opts.repeat)
        theirs = _median_ms(lambda idx=idx: twin_step(idx), opts.repeat)
        print(f"{length:4d} {mine:11.1f} {theirs:9.1f} {mine / theirs:6.2f}", flush=True)
        if not opts.kernels or not names:
            continue
        for n in names:
            setattr(module, n, timed(n, kernels[n]))
        spent.clear()
        calls.clear()
        start = time.perf_counter()
        ours_step(idx)
        whole = time.perf_counter() - start
        for n in names:
            setattr(module, n, kernels[n])
        for label, seconds in spent.most_common(12):
            print(f"      {label:<40} {seconds * 1e3:8.2f} ms  ×{calls[label]}")
        print(f"      kernels {sum(spent.values()) * 1e3:.1f} ms of the step's {whole * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
