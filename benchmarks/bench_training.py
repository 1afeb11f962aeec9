"""The issue-6 benchmarks in one command: W1 (training step), W2 (sigmoid+BCE), W3 (first step).

    python benchmarks/bench_training.py [--quick] [--threads N] [--no-compile] [--json PATH]

The same as ``symgrad bench`` (the workloads live in ``symgrad/bench.py``); the last full run
and its command are in ``benchmarks/RESULTS.md``.
"""

import sys

from symgrad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
