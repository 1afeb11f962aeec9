"""The GEMMs of a BERT layer split into pieces, against one BLAS call.

    python benchmarks/bench_gemm_pieces.py [--threads N] [--repeat R] [--markdown PATH]

Every single product in symgrad's kernels runs through ``gemm_blocks`` (serially) or
``gemm_blocks_par`` (on symgrad's pool): up to 4 pieces chosen by the sizes alone
(:func:`symgrad.runtime.blas._blocks`), so that any number of threads gives the same bits.
This times, in float32 with BLAS on one thread, the products of one MiniLM-size layer's
forward and backward (hidden 384, FFN 1536) at the main job's size (B·T = 848 rows) and W4's
(2048 rows): one ``gemm`` call and the pieces one after another on 1 thread (what splitting
costs), and the pieces on N threads (what they gain).  Best of R calls each.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

import symgrad
from symgrad.runtime import blas

SPLITS = {blas._WHOLE: "whole", blas._ROWS: "rows", blas._COLUMNS: "columns", blas._TERMS: "sum"}


def shapes(rows: int) -> list[tuple[str, int, int, int, bool, bool]]:
    """(what, m, n, k, transpose A, transpose B) of one layer's products at ``rows`` rows."""
    h, f = 384, 1536
    return [
        ("x·Wᵀ 384→384", rows, h, h, False, True),
        ("x·Wᵀ 384→1536", rows, f, h, False, True),
        ("x·Wᵀ 1536→384", rows, h, f, False, True),
        ("dy·W (dx) 384←384", rows, h, h, False, False),
        ("dy·W (dx) 384←1536", rows, h, f, False, False),
        ("dyᵀ·x (dW) 384×384", h, h, rows, True, False),
        ("dyᵀ·x (dW) 1536×384", f, h, rows, True, False),
        ("dyᵀ·x (dW) 384×1536", h, f, rows, True, False),
    ]


def best(f, args, repeat: int) -> float:  # type: ignore[no-untyped-def]
    f(*args)
    fastest = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        f(*args)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--markdown", default=None)
    opts = parser.parse_args(argv)
    symgrad.set_num_threads(1)  # symgrad's pool, BLAS single-threaded in its kernels
    rng = np.random.default_rng(0)
    lines = [
        f"| rows | product | split | one call, 1 thread | pieces, 1 thread | "
        f"pieces, {opts.threads} threads | speed-up |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    totals = np.zeros(3)
    for rows in (848, 2048):
        for what, m, n, k, ta, tb in shapes(rows):
            a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
            b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
            c = np.zeros((m, n), np.float32)
            args = (ta, tb, m, n, k, 1.0, a, 0, a.shape[1], b, 0, b.shape[1], 0.0, c, 0, n)
            how, pieces, _ = blas._blocks(m, n, k)
            with symgrad.num_threads(1):
                one = best(blas.gemm, args, opts.repeat)
                serial = best(blas.gemm_blocks, args, opts.repeat)
            with symgrad.num_threads(opts.threads):
                threaded = best(blas.gemm_blocks_par, args, opts.repeat)
            totals += (one, serial, threaded)
            lines.append(
                f"| {rows} | {what} | {pieces} × {SPLITS[how]} | {one:.2f} | {serial:.2f} | "
                f"{threaded:.2f} | {one / threaded:.2f} |"
            )
            print(lines[-1], flush=True)
    lines.append(
        f"| | **all** | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[2]:.1f} | "
        f"{totals[0] / totals[2]:.2f} |"
    )
    print(lines[-1])
    if opts.markdown:
        head = (
            f"Machine: {platform.processor() or platform.machine()}, Python "
            f"{platform.python_version()}, numpy {np.__version__}; ms, best of {opts.repeat}.\n"
            f"Command: python benchmarks/bench_gemm_pieces.py --threads {opts.threads}\n\n"
        )
        with open(opts.markdown, "w") as out:
            out.write(head + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
