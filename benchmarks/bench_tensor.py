"""Benchmark of symgrad's tensor ops: linear layer GEMMs and layer-norm scaling.

One command, one run, results written to ``benchmarks/RESULTS-tensor.md``::

    python benchmarks/bench_tensor.py [--quick] [--threads 1,2] [--repeats 9] [--output PATH]

(a) **linear**, forward + VJP at (B, N, M) = (1024, 2048, 2048), float32:

* symgrad: ``y = linear(X, W, c)`` then ``linear.vjp(X, W, c, grad_y)`` — the generated kernels
  (three GEMMs through ``np.dot`` in Numba, bias added in place, bias gradient one pass over rows);
* NumPy: the same math written directly, ``X @ W.T + c``, ``grad_y @ W``, ``grad_y.T @ X``,
  ``grad_y.sum(0)`` (new output arrays each call, as symgrad);
* GEMM floor: the three GEMMs alone into preallocated outputs (``np.matmul(..., out=)``).

Target: symgrad ≤ 1.2× NumPy.

(b) **layer norm VJP** at a fixed batch (B = 256, float64) for N = 512 … 4096: symgrad's
``layer_norm.vjp``.  The row mean and variance are hoisted (computed once per row), so the time
must grow linearly with N: N = 4096 against N = 512 is about 8×, where recomputing them per
element would be 64×.  Torch's layer-norm backward is timed beside it for context.  This part
runs on one thread (BLAS and torch): the kernel is serial Numba code.

Thread counts are fixed before NumPy, Numba or torch are imported (``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS`` = the largest ``--threads``) and
then set per block with threadpoolctl (every BLAS loaded: NumPy's and the one Numba's ``np.dot``
calls through SciPy) and ``torch.set_num_threads``; the report lists them.  symgrad's tensor
kernels are serial Numba code: threads only reach their BLAS calls.  Timings are medians (and
minima) of repeats (five times as many for the millisecond-long layer-norm calls) after two
warm-up calls, candidates interleaved round-robin so that the machine's drift hits them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS-tensor.md"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller linear (256, 512, 512) and fewer repeats: a smoke run",
    )
    parser.add_argument(
        "--threads",
        default=",".join(str(t) for t in sorted({1, _cores()})),
        help="comma-separated BLAS thread counts (default: 1 and all cores)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per candidate (default 9, 3 with --quick)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help=f"where to write the Markdown report (default {RESULTS.name})",
    )
    args = parser.parse_args(argv)
    args.threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    if not args.threads or args.threads[0] < 1:
        parser.error("--threads takes positive integers")
    args.repeats = args.repeats or (3 if args.quick else 9)
    return args


def _fix_threads_before_imports(threads: int) -> dict[str, str]:
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    for name in names:
        os.environ[name] = str(threads)
    return {name: os.environ[name] for name in names}


# -- (a) linear ---------------------------------------------------------------------------------


def bench_linear(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    import symgrad as sg
    from symgrad.bench import interleaved

    B, N, M = (256, 512, 512) if args.quick else (1024, 2048, 2048)
    dtype = np.float32
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, N)).astype(dtype)
    w = (rng.normal(size=(M, N)) / np.sqrt(N)).astype(dtype)
    c = rng.normal(size=M).astype(dtype)
    grad_y = rng.normal(size=(B, M)).astype(dtype)
    linear = sg.builtin("linear")

    def run_symgrad() -> tuple[Any, ...]:
        return (linear(x, w, c), *linear.vjp(x, w, c, grad_y))

    def run_numpy() -> tuple[Any, ...]:
        return x @ w.T + c, grad_y @ w, grad_y.T @ x, grad_y.sum(axis=0)

    y_out, gx_out, gw_out = (
        np.empty((B, M), dtype),
        np.empty((B, N), dtype),
        np.empty((M, N), dtype),
    )

    def run_floor() -> None:
        np.matmul(x, w.T, out=y_out)
        np.matmul(grad_y, w, out=gx_out)
        np.matmul(grad_y.T, x, out=gw_out)

    agreement = {}
    for name, got, want in zip(
        ("y", "grad_X", "grad_W", "grad_c"), run_symgrad(), run_numpy(), strict=True
    ):
        scale = float(np.max(np.abs(want)))
        agreement[name] = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
    blocks = []
    for threads in args.threads:
        with threadpool_limits(limits=threads):
            pools = [
                (p["internal_api"], Path(p["filepath"]).name, p["num_threads"])
                for p in threadpool_info()
            ]
            timings = interleaved(
                {"symgrad": run_symgrad, "numpy": run_numpy, "gemm floor": run_floor}, args.repeats
            )
        base = timings["numpy"]["median_s"]
        for t in timings.values():
            t["ratio_to_numpy"] = t["median_s"] / base
        blocks.append({"threads": threads, "pools": pools, "timings": timings})
    return {"shape": (B, N, M), "dtype": "float32", "agreement": agreement, "blocks": blocks}


# -- (b) layer norm -----------------------------------------------------------------------------


def bench_layer_norm(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    import symgrad as sg
    from symgrad.bench import interleaved

    batch, widths = 256, (512, 1024, 2048, 4096)
    op = sg.builtin("layer_norm")
    rng = np.random.default_rng(1)
    threads = 1  # symgrad's kernel is serial (its one GEMV aside): no thread-pool noise
    torch.set_num_threads(threads)
    rows = []
    with threadpool_limits(limits=threads):
        for n in widths:
            x = rng.normal(size=(batch, n))
            w, b = rng.normal(size=n), rng.normal(size=n)
            g = rng.normal(size=(batch, n))
            xt = torch.from_numpy(x).requires_grad_(True)
            wt = torch.from_numpy(w).requires_grad_(True)
            bt = torch.from_numpy(b).requires_grad_(True)
            yt = torch.nn.functional.layer_norm(xt, (n,), wt, bt, 1e-5)
            gt = torch.from_numpy(g)

            def run_torch(
                yt: Any = yt, xt: Any = xt, wt: Any = wt, bt: Any = bt, gt: Any = gt
            ) -> Any:
                return torch.autograd.grad(yt, (xt, wt, bt), gt, retain_graph=True)

            def run_symgrad(x: Any = x, w: Any = w, b: Any = b, g: Any = g) -> Any:
                return op.vjp(x, w, b, g)

            ours, theirs = run_symgrad(), run_torch()
            agreement = max(
                float(np.max(np.abs(a - t.numpy())) / np.max(np.abs(t.numpy())))
                for a, t in zip(ours, theirs, strict=True)
            )
            # milliseconds per call: many repeats, so a burst of other load moves no median
            timings = interleaved({"symgrad": run_symgrad, "torch": run_torch}, 5 * args.repeats)
            rows.append({"N": n, "timings": timings, "agreement": agreement})
    first = rows[0]["timings"]["symgrad"]
    for row in rows:
        row["growth"] = row["timings"]["symgrad"]["median_s"] / first["median_s"]
        row["growth_min"] = row["timings"]["symgrad"]["min_s"] / first["min_s"]
        row["ns_per_element"] = row["timings"]["symgrad"]["median_s"] / (batch * row["N"]) * 1e9
    return {"batch": batch, "dtype": "float64", "threads": threads, "rows": rows}


# -- report -------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    m, v = results["machine"], results["versions"]
    lin, ln = results["linear"], results["layer_norm"]
    lines = [
        "# symgrad tensor-op benchmark",
        "",
        f"command: `{results['command']}`  ",
        f"run: {results['date']}, {results['wall_s']:.0f} s",
        "",
        f"machine: {m['cpu']} ({m.get('cpu_family_model', '')}), {m['cores']} cores, "
        f"SIMD {m.get('simd', '?')}; load average at start {m['load_average_at_start']}, "
        f"at end {results['load_average_at_end']}  ",
        f"{m['platform']}; Python {m['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "Timings are medians of interleaved repeats after warm-up; a load average above the "
        "core count means other processes shared the machine: absolute times are then "
        "inflated, the ratios (measured side by side) much less so.",
        "",
        "threads fixed before imports: "
        + ", ".join(f"{k}={val}" for k, val in results["thread_env"].items()),
        "",
        f"## (a) linear forward + VJP, (B, N, M) = {tuple(lin['shape'])}, {lin['dtype']}",
        "",
        "| BLAS threads | candidate | median ms | min ms | × NumPy |",
        "|---:|---|---:|---:|---:|",
    ]
    for block in lin["blocks"]:
        for name, t in block["timings"].items():
            lines.append(
                f"| {block['threads']} | {name} | {t['median_s'] * 1e3:.1f} | "
                f"{t['min_s'] * 1e3:.1f} | {t['ratio_to_numpy']:.3f} |"
            )
    lines += [
        "",
        "BLAS pools per block (threadpoolctl): "
        + "; ".join(
            f"{block['threads']} thread(s): "
            + ", ".join(f"{lib} {path} = {n}" for lib, path, n in block["pools"])
            for block in lin["blocks"]
        ),
    ]
    lines += [
        "",
        "symgrad vs NumPy (max relative difference, float32): "
        + ", ".join(f"{k} {val:.1e}" for k, val in lin["agreement"].items()),
    ]
    for block in lin["blocks"]:
        ratio = block["timings"]["symgrad"]["ratio_to_numpy"]
        verdict = "met" if ratio <= 1.2 else "MISSED"
        lines.append(
            f"- target symgrad ≤ 1.2× NumPy at {block['threads']} thread(s): "
            f"{ratio:.3f}× — {verdict}"
        )
    lines += [
        "",
        f"## (b) layer-norm VJP, B = {ln['batch']}, {ln['dtype']}, {ln['threads']} thread(s)",
        "",
        "| N | symgrad median ms | min ms | × N = 512 | ns / element | torch median ms | "
        "max rel. diff vs torch |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ln["rows"]:
        s, t = row["timings"]["symgrad"], row["timings"]["torch"]
        lines.append(
            f"| {row['N']} | {s['median_s'] * 1e3:.2f} | {s['min_s'] * 1e3:.2f} | "
            f"{row['growth']:.2f} | {row['ns_per_element']:.1f} | "
            f"{t['median_s'] * 1e3:.2f} | {row['agreement']:.1e} |"
        )
    growth, growth_min = ln["rows"][-1]["growth"], ln["rows"][-1]["growth_min"]
    n_ratio = ln["rows"][-1]["N"] // ln["rows"][0]["N"]
    verdict = "linear" if growth < 2 * n_ratio else "NOT linear"
    lines += [
        "",
        f"- N = {ln['rows'][-1]['N']} vs N = {ln['rows'][0]['N']}: {growth:.1f}× by medians, "
        f"{growth_min:.1f}× by minima (linear growth is {n_ratio}×, quadratic {n_ratio**2}×) "
        f"— {verdict}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    thread_env = _fix_threads_before_imports(max(args.threads))
    start = time.perf_counter()
    from symgrad.bench import machine, versions

    command = "python benchmarks/bench_tensor.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    results: dict[str, Any] = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "versions": versions(),
        "thread_env": thread_env,
    }
    results["linear"] = bench_linear(args)
    results["layer_norm"] = bench_layer_norm(args)
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - start
    text = report(results)
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
