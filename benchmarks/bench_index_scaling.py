"""Benchmark: derived VJPs of user formulas stay linear in the row length.

One command, one run::

    python benchmarks/bench_index_scaling.py [--repeats 15] [--output PATH]

Two ops written by hand in index notation, their VJPs derived: L2-normalize
``y = x / ‖x‖`` (whose gradient ``g/‖x‖ - x·(Σ_i g_i x_i)/‖x‖³`` holds a sum that does not depend
on the output index) and softmax.  Each VJP is timed at B = 64 rows of N = 512 and N = 4096:
with the row sums computed once per row the time grows about 8× (linear), recomputed per
element it would grow 64×.  One thread (the kernels are serial Numba code); medians of
``--repeats`` after two warm-up calls, the sizes interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)

    import numpy as np
    import sympy as sp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import symgrad as sg

    b, i, j = sp.symbols("b i j", integer=True)
    B, N = sp.symbols("B N", integer=True, positive=True)
    X = sp.IndexedBase("X", shape=(B, N))
    ops = {
        "normalize": sg.tensor_op(
            X[b, i] / sp.sqrt(sp.Sum(X[b, j] ** 2, (j, 0, N - 1))),
            out=(b, i), inputs=[X], name="bench_normalize",
        ),
        "softmax": sg.tensor_op(
            sp.exp(X[b, i]) / sp.Sum(sp.exp(X[b, j]), (j, 0, N - 1)),
            out=(b, i), inputs=[X], name="bench_softmax",
        ),
    }
    rng = np.random.default_rng(0)
    sizes = (512, 4096)
    data = {n: (rng.normal(size=(64, n)), rng.normal(size=(64, n))) for n in sizes}
    times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in ops for n in sizes}
    for _ in range(2):
        for op in ops.values():
            for n in sizes:
                op.vjp(*data[n])
    for _ in range(args.repeats):
        for name, op in ops.items():
            for n in sizes:
                t0 = time.perf_counter()
                op.vjp(*data[n])
                times[(name, n)].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    lines = [
        "# Derived VJPs against the row length (B = 64, float64, 1 thread)",
        "",
        f"Median of {args.repeats}; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| op | N = 512 (ms) | N = 4096 (ms) | ratio (linear: 8×, quadratic: 64×) |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {1e3 * med[(name, 512)]:.3f} | {1e3 * med[(name, 4096)]:.3f} | "
            f"{med[(name, 4096)] / med[(name, 512)]:.1f}× |"
            for name in ops
        ),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
