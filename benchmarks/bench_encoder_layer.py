"""W4 in one command: forward + backward of one MiniLM-size BERT encoder layer, and its parts.

    python benchmarks/bench_encoder_layer.py [--quick] [--threads N] [--no-compile] [--json PATH]
        [--markdown PATH]

The same as ``symgrad bench --workloads W4`` (the workload lives in ``symgrad/bench_encoder.py``);
the last full run and its command are in ``benchmarks/RESULTS-encoder.md``.
"""

import sys

from symgrad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--workloads", "W4", *sys.argv[1:]]))
