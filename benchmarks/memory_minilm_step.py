"""The memory one side of the main job takes to train: symgrad's compiled step or the torch twin's.

    python benchmarks/memory_minilm_step.py --side symgrad|torch [--level c] [--threads N]

Builds both sides as ``symgrad finetune --task sms-minilm --limit all`` does (all-MiniLM-L6-v2,
AdamW, batch 16, float32), then trains **one** side for one step at every padded length of the
first epoch's batches, shortest to longest (the longest batch is the step's largest working set,
and symgrad's buffer pool grows to it).  Prints the process's resident memory after the set-up
and the peak while training (Linux's ``VmHWM``, reset after the set-up through
``/proc/self/clear_refs``): the difference is what that side's training step needs — its
activations, gradients, optimizer state and (symgrad) its step's buffer pool and kernels.  Run
it once per side, each in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", required=True, choices=["symgrad", "torch"])
    parser.add_argument("--level", default="c", choices=["b", "c"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for both sides (default: the cores this process may use)")
    opts = parser.parse_args(argv)

    import torch

    from symgrad.runtime import threads
    from symgrad.tasks import minilm

    torch.set_num_threads(opts.threads)
    threads.set_num_threads(opts.threads)
    print(f"python {' '.join(sys.argv)}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{opts.threads} thread(s), level {opts.level}, side {opts.side}")

    work = minilm.step_workload(opts.level)
    by_length = work.by_length
    batches = [by_length[t] for t in sorted(by_length)]
    step = work.symgrad_step() if opts.side == "symgrad" else work.torch_step()

    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    for idx in batches:
        step(idx)
    peak = _status_kib("VmHWM")
    longest = max(by_length)
    print(f"{len(batches)} steps, lengths {min(by_length)} … {longest} tokens")
    need = (peak - before) / 1024
    print(f"resident after set-up {before / 1024:.0f} MiB, peak while training "
          f"{peak / 1024:.0f} MiB: the {opts.side} side's step needs {need:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
