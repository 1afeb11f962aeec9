"""Benchmark of symgrad's fused elementwise kernels: the W2 workload and compile times.

One command, one run::

    python benchmarks/bench_elementwise.py [--quick] [--json PATH] [--threads 1,2]

(``--skip-breakdown``, ``--skip-compile`` leave parts out; ``--size``, ``--repeats`` override.)

(a) **W2** — ``bce_with_logits`` (mean) loss value and gradient on 10M float64 elements:

* symgrad: ``sg.builtin("bce_with_logits").value_and_vjp(x, y, reduction="mean")`` — one fused
  pass that returns the loss and the gradients of *both* inputs (x and y);
* torch: ``nn.BCEWithLogitsLoss()`` (mean) forward and backward, ``x`` requiring grad (torch
  computes the gradient of x only);
* NumPy: the same stable formula, ``max(x, 0) - x·y + log1p(exp(-|x|))`` and
  ``σ(x) - y`` by sign, with temporaries (value and both gradients, as symgrad);
* a bandwidth floor: a trivial Numba loop that reads x and y and writes two arrays — the memory
  traffic of symgrad's kernel with no arithmetic;
* "symgrad kernel only": the same generated kernel called on preallocated outputs, so that
  API-call − kernel-only is the wrapper's share (argument checks, allocating the gradients).

Each thread count in ``--threads`` is its own block: torch gets ``torch.set_num_threads(t)``;
symgrad runs its default serial kernel at t = 1 and the ``parallel=True`` (``prange``) build of
the same op at t > 1 with ``numba.set_num_threads(t)``; NumPy is single-threaded at any t.
``NUMBA_NUM_THREADS`` is fixed to the largest t before Numba is imported.  Timings are the
median (and minimum) of repeats after warm-up, candidates interleaved round-robin so that the
machine's drift hits them alike.  Ratios are to torch at the same thread count.

Then **where the time goes**: the kernel's pieces as separate single-thread loops — libm
``exp``/``log1p`` against symgrad's vectorisable helpers, and the in-order sum of the loss.

(b) **Compile times**, each in a fresh subprocess (``NUMBA_NUM_THREADS=1``): *cold* — an empty
``SYMGRAD_CACHE_DIR``, from ``import symgrad`` to the first result of
``value_and_vjp(..., reduction="mean")`` on a small array (derivation, code generation, Numba
compilation of the one kernel that call needs); *warm* — a fresh process on the filled cache, to
the first result.  The process wall time (interpreter start-up included) is reported beside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from symgrad.bench import _cores, interleaved, machine, versions

OP = "bce_with_logits"


def _parse_threads(text: str) -> list[int]:
    values = sorted({int(t) for t in text.split(",") if t.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--threads takes positive integers, got {text!r}")
    return values


def _default_threads() -> str:
    return ",".join(str(t) for t in sorted({1, _cores()}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1M elements, fewer repeats (a smoke run; the target is for 10M)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--threads",
        type=_parse_threads,
        default=None,
        help=f"comma-separated thread counts (default: {_default_threads()})",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="number of elements (default 10_000_000, 1_000_000 with --quick)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per candidate (default 9, 3 with --quick)",
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=None,
        help="cold and warm subprocess runs each (default 3, 1 with --quick)",
    )
    parser.add_argument("--skip-compile", action="store_true", help="skip part (b)")
    parser.add_argument(
        "--skip-breakdown", action="store_true", help="skip timing the kernel's pieces"
    )
    args = parser.parse_args(argv)
    args.threads = args.threads or _parse_threads(_default_threads())
    args.size = args.size or (1_000_000 if args.quick else 10_000_000)
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.compile_repeats = args.compile_repeats or (1 if args.quick else 3)
    return args


# -- machine ------------------------------------------------------------------------------------


# -- timing -------------------------------------------------------------------------------------


# -- (a) W2 -------------------------------------------------------------------------------------


def bench_w2(args: argparse.Namespace) -> dict[str, Any]:
    import numba
    import numpy as np
    import torch
    from numba import njit, prange

    import symgrad as sg
    from symgrad.builtins import get_builtin

    n = args.size
    rng = np.random.default_rng(0)
    x = rng.normal(size=n) * 3.0  # logits: both signs, |x| up to ~15
    y = rng.uniform(0.0, 1.0, size=n)  # soft targets

    serial = sg.builtin(OP)
    formula, constants = get_builtin(OP).expr()
    inputs = get_builtin(OP).inputs
    parallel = sg.elementwise(formula, inputs=inputs, name=OP, constants=constants, parallel=True)

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.BCEWithLogitsLoss()  # reduction="mean"

    def run_torch() -> tuple[float, np.ndarray]:
        leaf = xt.detach().requires_grad_(True)
        loss = loss_fn(leaf, yt)
        loss.backward()
        assert leaf.grad is not None
        return float(loss.item()), leaf.grad.numpy()

    def run_numpy() -> tuple[float, np.ndarray, np.ndarray]:
        e = np.exp(-np.abs(x))  # shared exp(-|x|), as in symgrad's kernel
        loss = np.maximum(x, 0.0)
        loss -= x * y
        loss += np.log1p(e)
        value = float(loss.mean())
        inv = 1.0 / (1.0 + e)
        sig = np.where(x >= 0.0, inv, e * inv)
        grad_x = (sig - y) * (1.0 / n)
        grad_y = x * (-1.0 / n)
        return value, grad_x, grad_y

    def run_symgrad(op: Any) -> Callable[[], Any]:
        return lambda: op.value_and_vjp(x, y, reduction="mean")

    # The generated kernel alone, on preallocated outputs (what the wrapper adds is the rest).
    gx, gy = np.empty(n), np.empty(n)

    def kernel_only(op: Any) -> Callable[[], Any] | None:
        try:
            kernel = op._kernel("value_and_vjp_sum")  # private: benchmark introspection only
        except Exception:
            return None
        return lambda: kernel(x, y, 1.0 / n, gx, gy)

    @njit(cache=False)
    def floor_serial(a: Any, b: Any, out_a: Any, out_b: Any) -> None:
        for i in range(a.shape[0]):
            out_a[i] = a[i]
            out_b[i] = b[i]

    @njit(cache=False, parallel=True)
    def floor_parallel(a: Any, b: Any, out_a: Any, out_b: Any) -> None:
        for i in prange(a.shape[0]):
            out_a[i] = a[i]
            out_b[i] = b[i]

    fa, fb = np.empty(n), np.empty(n)

    # Agreement check (also the warm-up of every path).
    value_s, (gxs, gys) = serial.value_and_vjp(x, y, reduction="mean")
    value_p, (gxp, _gyp) = parallel.value_and_vjp(x, y, reduction="mean")
    value_t, gxt = run_torch()
    value_n, gxn, _ = run_numpy()

    def rel(a: Any, b: Any) -> float:
        return float(np.max(np.abs(np.asarray(a) - b)) / max(float(np.max(np.abs(b))), 1e-300))

    agreement = {
        "value_symgrad_vs_torch": rel(value_s, value_t),
        "grad_x_symgrad_vs_torch": rel(gxs, gxt),
        "value_numpy_vs_torch": rel(value_n, value_t),
        "grad_x_numpy_vs_torch": rel(gxn, gxt),
        "value_parallel_vs_serial": rel(value_p, value_s),
        "grad_x_parallel_vs_serial": rel(gxp, gxs),
        "grad_y_symgrad_is_minus_x_over_n": rel(gys, -x / n),
    }

    blocks = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        op = serial if threads == 1 else parallel
        candidates: dict[str, Callable[[], object]] = {
            "symgrad": run_symgrad(op),
            "torch": run_torch,
            "numpy": run_numpy,
            "floor": (lambda: floor_serial(x, y, fa, fb))
            if threads == 1
            else (lambda: floor_parallel(x, y, fa, fb)),
        }
        kernel = kernel_only(op)
        if kernel is not None:
            candidates["symgrad kernel only"] = kernel
        timings = interleaved(candidates, args.repeats)
        torch_s = timings["torch"]["median_s"]
        for t in timings.values():
            t["ratio_to_torch"] = t["median_s"] / torch_s
        blocks.append(
            {
                "threads": threads,
                "symgrad_build": "serial (range)" if threads == 1 else "parallel=True (prange)",
                "torch_threads": torch.get_num_threads(),
                "numba_threads": numba.get_num_threads(),
                "numpy_threads": 1,
                "timings": timings,
            }
        )
    torch.set_num_threads(args.threads[-1])
    return {
        "elements": n,
        "dtype": "float64",
        "agreement": agreement,
        "blocks": blocks,
        "numba_num_threads_env": os.environ.get("NUMBA_NUM_THREADS"),
    }


# -- where the time goes ------------------------------------------------------------------------

_PIECES = """
@njit(cache=False, error_model='numpy')
def libm_exp(x, out):
    for i in range(x.shape[0]):
        out[i] = math.exp(-abs(x[i]))


@njit(cache=False, error_model='numpy')
def vector_exp(x, out):
    for i in range(x.shape[0]):
        out[i] = _sg_exp(-abs(x[i]))


@njit(cache=False, error_model='numpy')
def libm_log1p(e, out):
    for i in range(e.shape[0]):
        out[i] = math.log1p(e[i])


@njit(cache=False, error_model='numpy')
def vector_log1p(e, out):
    for i in range(e.shape[0]):
        out[i] = _sg_log1p(e[i])


@njit(cache=False, error_model='numpy')
def ordered_sum(v, out):
    total = 0.0
    for i in range(v.shape[0]):
        total += v[i]
    out[0] = total
"""


def bench_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Single-thread cost of the pieces of the W2 kernel, each as its own loop over n elements.

    libm ``exp``/``log1p`` (one call per element: the loop cannot vectorise) against symgrad's
    branch-free helpers (the loop vectorises), and the in-order sum that keeps the loss
    bit-for-bit the sequential one.  Each loop reads one array and writes one.
    """
    import math

    import numpy as np
    from numba import njit

    from symgrad.codegen.printer import VECTOR_MATH_SOURCE

    namespace: dict[str, Any] = {"np": np, "math": math, "njit": njit}
    for source in VECTOR_MATH_SOURCE.values():
        exec(source.replace("cache=True", "cache=False"), namespace)
    exec(_PIECES, namespace)
    rng = np.random.default_rng(0)
    x = rng.normal(size=args.size) * 3.0
    e = np.exp(-np.abs(x))
    out = np.empty(args.size)
    candidates = {
        "exp(-abs(x)), libm": lambda: namespace["libm_exp"](x, out),
        "exp(-abs(x)), symgrad helper": lambda: namespace["vector_exp"](x, out),
        "log1p(e), libm": lambda: namespace["libm_log1p"](e, out),
        "log1p(e), symgrad helper": lambda: namespace["vector_log1p"](e, out),
        "in-order sum of n values": lambda: namespace["ordered_sum"](x, out),
    }
    return interleaved(candidates, args.repeats)


# -- (b) compile times --------------------------------------------------------------------------

_CHILD = r"""
import json, time
t0 = time.perf_counter()
import symgrad as sg
t1 = time.perf_counter()
import numpy as np
op = sg.builtin({op!r})
t2 = time.perf_counter()
x = np.linspace(-5.0, 5.0, 1000)
y = np.linspace(0.0, 1.0, 1000)
value, grads = op.value_and_vjp(x, y, reduction="mean")
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "define_s": t2 - t1, "first_call_s": t3 - t2,
                  "to_first_result_s": t3 - t0, "value": float(value)}}))
"""


def _child(cache: str) -> dict[str, float]:
    env = {**os.environ, "SYMGRAD_CACHE_DIR": cache, "NUMBA_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(op=OP)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"compile-time child failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def bench_compile(args: argparse.Namespace) -> dict[str, Any]:
    cold, warm = [], []
    for _ in range(args.compile_repeats):
        with tempfile.TemporaryDirectory(prefix="symgrad-bench-cache-") as cache:
            cold.append(_child(cache))  # empty cache
            for _ in range(args.compile_repeats):
                warm.append(_child(cache))  # the cache the cold run filled

    def summary(runs: list[dict[str, float]]) -> dict[str, float]:
        keys = ("import_s", "define_s", "first_call_s", "to_first_result_s", "process_wall_s")
        out = {k: statistics.median(r[k] for r in runs) for k in keys}
        out["runs"] = len(runs)
        return out

    return {"op": OP, "cold": summary(cold), "warm": summary(warm)}


# -- report -------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    m, v, w2 = results["machine"], results["versions"], results.get("w2")
    lines = [
        f"command: {results['command']}",
        f"machine: {m['cpu']} ({m.get('cpu_family_model', '')}), {m['cores']} cores, "
        f"SIMD {m.get('simd', '?')}; load average at start {m['load_average_at_start']}",
        f"{m['platform']}; Python {m['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    if w2:
        lines += [
            "",
            f"W2: bce_with_logits (mean), value + gradient, {w2['elements']:,} {w2['dtype']} "
            f"elements; NUMBA_NUM_THREADS={w2['numba_num_threads_env']}",
            "| threads | candidate | median ms | min ms | × torch |",
            "|---|---|---:|---:|---:|",
        ]
        for block in w2["blocks"]:
            for name, t in block["timings"].items():
                label = name
                if name.startswith("symgrad"):
                    label = f"{name} [{block['symgrad_build']}]"
                if name == "torch":
                    label = f"torch [{block['torch_threads']} thread(s)]"
                if name == "numpy":
                    label = "numpy [1 thread]"
                if name == "floor":
                    label = "floor: read x,y, write 2 arrays"
                lines.append(
                    f"| {block['threads']} | {label} | {t['median_s'] * 1e3:.1f} | "
                    f"{t['min_s'] * 1e3:.1f} | {t['ratio_to_torch']:.2f} |"
                )
        lines += [
            "",
            "agreement (max relative difference): "
            + ", ".join(f"{k} {val:.1e}" for k, val in w2["agreement"].items()),
        ]
        for block in w2["blocks"]:
            ratio = block["timings"]["symgrad"]["ratio_to_torch"]
            verdict = "met" if ratio <= 0.5 else "MISSED"
            lines.append(
                f"target symgrad ≤ 0.5× torch at {block['threads']} thread(s): "
                f"{ratio:.2f}× — {verdict}"
            )
    if "breakdown" in results:
        n = results["w2"]["elements"] if w2 else 0
        lines += [
            "",
            f"where the time goes: the kernel's pieces as separate loops, 1 thread, {n:,} elements",
            "| piece | median ms | min ms |",
            "|---|---:|---:|",
        ]
        for name, t in results["breakdown"].items():
            lines.append(f"| {name} | {t['median_s'] * 1e3:.1f} | {t['min_s'] * 1e3:.1f} |")
    if "compile" in results:
        c = results["compile"]
        lines += [
            "",
            f"compile times of {c['op']!r} (fresh process each, median of runs):",
            "| start | runs | import symgrad s | define op s | first call s | "
            "import → first result s | process wall s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in ("cold", "warm"):
            s = c[kind]
            lines.append(
                f"| {kind} | {s['runs']} | {s['import_s']:.2f} | {s['define_s']:.2f} | "
                f"{s['first_call_s']:.2f} | {s['to_first_result_s']:.2f} | "
                f"{s['process_wall_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Fixed before Numba is imported (here or by symgrad): the parallel kernels' thread pool.
    os.environ["NUMBA_NUM_THREADS"] = str(max(args.threads))
    command = "python benchmarks/bench_elementwise.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    results: dict[str, Any] = {
        "command": command.strip(),
        "machine": machine(),
        "versions": versions(),
    }
    results["w2"] = bench_w2(args)
    if not args.skip_breakdown:
        results["breakdown"] = bench_breakdown(args)
    if not args.skip_compile:
        results["compile"] = bench_compile(args)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
