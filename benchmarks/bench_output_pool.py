"""The op outputs' memory pool on W4's step recorded on a Tape: time, page faults, system time.

    python benchmarks/bench_output_pool.py [--rounds 4] [--steps 10] [--threads 1]

Each configuration runs in a process of its own (the pool's state and the C library's heap are
per process): the Tape step with the pool (``SYMGRAD_OUTPUT_POOL_MB`` default), without it
(``SYMGRAD_OUTPUT_POOL_MB=0``), and torch eager's step of the same layer, in turn, ``--rounds``
times; each process times ``--steps`` steps after two warm-up steps.  Prints the medians over
all steps of a configuration (wall ms, minor page faults, system CPU ms) and each one's ratio to
torch's wall time.  Results: ``benchmarks/RESULTS-threads.md`` ("Op outputs' memory pool").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
from symgrad import bench_encoder as be
data = be._data(32, 64)
if sys.argv[1] == "torch":
    import torch
    torch.set_num_threads(int(os.environ["SYMGRAD_NUM_THREADS"]))
    _, step = be._torch_layer(data, "sdpa")
else:
    step = be._symgrad_steps(data)["symgrad tape"]
step(); step()
rows = []
for _ in range(int(sys.argv[2])):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    step()
    t1 = time.perf_counter(); r1 = resource.getrusage(resource.RUSAGE_SELF)
    rows.append(((t1 - t0) * 1e3, r1.ru_minflt - r0.ru_minflt, (r1.ru_stime - r0.ru_stime) * 1e3))
print(json.dumps(rows))
"""

CONFIGS = {
    "symgrad tape, pool": ("tape", {}),
    "symgrad tape, no pool": ("tape", {"SYMGRAD_OUTPUT_POOL_MB": "0"}),
    "torch eager": ("torch", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    seen: dict[str, list[tuple[float, int, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (what, env) in CONFIGS.items():
            child_env = {**os.environ, **env, "SYMGRAD_NUM_THREADS": str(args.threads)}
            child_env.setdefault("OMP_NUM_THREADS", str(args.threads))
            out = subprocess.run(
                [sys.executable, "-c", CHILD, what, str(args.steps)],
                env=child_env, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            seen[name] += json.loads(out.strip().splitlines()[-1])
    torch_ms = statistics.median(r[0] for r in seen["torch eager"])
    print(f"W4 step, B=32 T=64 float32, {args.threads} thread(s); {args.rounds} processes × "
          f"{args.steps} steps each")  # fmt: skip
    print("| system | median ms | min ms | page faults | system ms | × torch eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in seen.items():
        wall = statistics.median(r[0] for r in rows)
        faults = statistics.median(r[1] for r in rows)
        system = statistics.median(r[2] for r in rows)
        print(f"| {name} | {wall:.1f} | {min(r[0] for r in rows):.1f} | {faults:.0f} | "
              f"{system:.1f} | {wall / torch_ms:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
