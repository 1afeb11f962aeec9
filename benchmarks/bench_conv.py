"""Benchmark: conv2d forward + VJP (symgrad's built-in, BLAS GEMMs) against torch, 1 thread.

One command, one run::

    python benchmarks/bench_conv.py [--quick] [--repeats 7] [--dtype float32] [--output PATH]

A small CNN's layer: B = 32 images, 32 → 64 channels, 32 × 32 pixels, 3 × 3 kernel, padding 1
(``--quick``: B = 4).  symgrad: ``conv2d(X, W, c)`` then ``conv2d.vjp(X, W, c, G)`` — the
generated kernels fill the shifted reads once per image over ``p + q`` (a padded copy per
kernel column, not im2col's 9× copy) and run one GEMM per kernel row on views into it; the
input's gradient (the transposed convolution, derived) is here ``Wᵀ·G`` per image, then the
sum of its shifted reads, as there are more output than input channels (codegen/gemm.py).
torch: ``F.conv2d`` then ``torch.autograd.grad`` of the three inputs.  Target: ≤ 1.5× torch.

Threads are fixed to 1 before NumPy, Numba or torch load (``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS``) and ``torch.set_num_threads``.
Times are medians of ``--repeats`` after two warm-up calls, the two systems interleaved so the
machine's drift hits them alike; wall time and, beside it, the process's CPU time (which does
not count the time other processes hold the core).  On a shared machine compare the ratio,
not the times.
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
    parser.add_argument("--quick", action="store_true", help="B = 4 and 3 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]

    import platform

    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import symgrad as sg

    torch.set_num_threads(1)
    batch = 4 if args.quick else 32
    repeats = 3 if args.quick else args.repeats
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 32)).astype(dtype)
    w = (rng.normal(size=(64, 32, 3, 3)) / np.sqrt(32 * 9)).astype(dtype)
    c = rng.normal(size=64).astype(dtype)
    start = time.perf_counter()
    conv = sg.builtin("conv2d", padding=1)
    y = conv(x, w, c)
    g = rng.normal(size=y.shape).astype(dtype)
    conv.vjp(x, w, c, g)
    build = time.perf_counter() - start

    tx, tw, tc = (torch.tensor(a, requires_grad=True) for a in (x, w, c))
    tg = torch.tensor(g)

    def run_symgrad() -> None:
        conv(x, w, c)
        conv.vjp(x, w, c, g)

    def run_torch() -> None:
        out = torch.nn.functional.conv2d(tx, tw, tc, padding=1)
        torch.autograd.grad(out, (tx, tw, tc), tg)

    # the same numbers first: a benchmark of a wrong kernel measures nothing
    ref = torch.nn.functional.conv2d(tx.double(), tw.double(), tc.double(), padding=1)
    err = float(np.max(np.abs(y - ref.detach().numpy())) / np.max(np.abs(ref.detach().numpy())))
    times: dict[str, list[float]] = {"symgrad": [], "torch": []}
    cpu_times: dict[str, list[float]] = {"symgrad": [], "torch": []}
    for fn in (run_symgrad, run_torch, run_symgrad, run_torch):
        fn()
    for _ in range(repeats):
        for name, fn in (("symgrad", run_symgrad), ("torch", run_torch)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    cpu_med = {k: float(np.median(v)) for k, v in cpu_times.items()}
    args_given = sys.argv[1:] if argv is None else argv
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    cpu = models[0] if models else platform.processor() or "unknown CPU"
    lines = [
        "# conv2d forward + VJP, 1 thread",
        "",
        f"command: `{' '.join(['python benchmarks/bench_conv.py', *args_given])}`",
        "",
        f"machine: {cpu}, {os.cpu_count()} cores; {platform.platform()}; Python "
        f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
        f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"B = {batch}, 32 → 64 channels, 32 × 32, 3 × 3, padding 1, {dtype}; median of "
        f"{repeats} (min in brackets); load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores (this run adds about 1; "
        "more means other processes shared the machine: the times are then inflated, the ratio, "
        "measured side by side, much less so).",
        "",
        "| system | forward + VJP, wall (ms) | CPU time of the process (ms) |",
        "| --- | --- | --- |",
        *(
            f"| {k} | {1e3 * med[k]:.1f} ({1e3 * min(times[k]):.1f}) | "
            f"{1e3 * cpu_med[k]:.1f} ({1e3 * min(cpu_times[k]):.1f}) |"
            for k in ("symgrad", "torch")
        ),
        "",
        f"Ratio symgrad / torch: **{med['symgrad'] / med['torch']:.2f}×** (target ≤ 1.5×); "
        f"in CPU time {cpu_med['symgrad'] / cpu_med['torch']:.2f}× (less sensitive to the "
        "time other processes take from this core). "
        f"Forward relative error against torch float64: {err:.1e}. First call (compile or "
        f"cache load): {build:.1f} s.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
