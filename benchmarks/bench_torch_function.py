"""Benchmark: a custom activation through ``symgrad.torch.function`` vs the same activation as a
composition of torch ops, forward + backward on a large tensor.

One command, one run::

    python benchmarks/bench_torch_function.py [--quick] [--threads 1,2] [--dtype float32]
                                              [--size N] [--repeats R] [--json PATH]

Two custom activations, each written once as a SymPy formula:

* **mish**, ``x · tanh(softplus(x))`` (written ``x * tanh(log(1 + exp(x)))``; symgrad stabilizes
  it onto its softplus primitive) — transcendental-heavy;
* **squareplus**, ``(x + sqrt(x² + 4)) / 2`` (So, 2021; torch has no built-in) — arithmetic and
  one square root.

Candidates per activation:

* **symgrad**: ``symgrad.torch.function(op).apply(x)`` then ``y.backward(g)`` — one generated
  forward kernel and one generated backward kernel (the derived ``g · y'(x)``, fused);
* **torch composition**: the same formula as torch ops (``x * torch.tanh(F.softplus(x))``,
  ``0.5 * (x + torch.sqrt(x * x + 4))``) then ``y.backward(g)`` — what a user writes without a
  custom kernel: several forward ops, autograd's backward of each;
* for mish, torch's native fused ``F.mish`` (a hand-written ATen kernel and backward).

``x`` is a fresh leaf requiring grad at each call, ``g`` a fixed tensor of ones-like noise.  Each
thread count is its own block: torch gets ``torch.set_num_threads(t)``; symgrad runs its default
serial kernels at t = 1 and the ``parallel=True`` (``prange``) build of the same formula at
t > 1 with ``numba.set_num_threads(t)``.  ``NUMBA_NUM_THREADS`` is fixed to the largest t before
Numba is imported.  Times are the median (and minimum) of repeats after warm-up, the candidates
interleaved round-robin; ratios are to the torch composition at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _parse_threads(text: str) -> list[int]:
    values = sorted({int(t) for t in text.split(",") if t.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--threads takes positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M elements, 3 repeats")
    parser.add_argument("--threads", type=_parse_threads, default=None,
                        help="comma-separated thread counts (default: 1 and all cores)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--size", type=int, default=None, help="elements (default 10_000_000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or sorted({1, cores or 1})
    args.size = args.size or (1_000_000 if args.quick else 10_000_000)
    args.repeats = args.repeats or (3 if args.quick else 9)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["NUMBA_NUM_THREADS"] = str(max(args.threads))  # before Numba is imported
    import numba
    import sympy as sp
    import torch

    import symgrad as sg
    import symgrad.torch as sgt
    from symgrad.bench import interleaved, machine, versions

    info = machine()  # the load average before the run
    x = sp.Symbol("x", real=True)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = 1000
    data = (torch.randn(rows, args.size // rows, generator=gen, dtype=torch.float64) * 3).to(dtype)
    grad = torch.rand(data.shape, generator=gen, dtype=torch.float64).to(dtype)

    def step(fn: Any) -> Any:
        def call() -> torch.Tensor:
            leaf = data.detach().requires_grad_(True)
            fn(leaf).backward(grad)
            assert leaf.grad is not None
            return leaf.grad
        return call

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a64, b64 = a.double(), b.double()
        return float((a64 - b64).abs().max() / b64.abs().max())

    activations: dict[str, tuple[sp.Expr, Any, Any]] = {
        "mish": (
            x * sp.tanh(sp.log(1 + sp.exp(x))),
            lambda t: t * torch.tanh(torch.nn.functional.softplus(t)),
            torch.nn.functional.mish,
        ),
        "squareplus": (
            (x + sp.sqrt(x**2 + 4)) / 2,
            lambda t: 0.5 * (t + torch.sqrt(t * t + 4.0)),
            None,
        ),
    }
    agreement: dict[str, float] = {}
    blocks = []
    for act, (formula, composition, native) in activations.items():
        serial = sgt.function(sg.elementwise(formula, inputs=[x], name=f"bench_{act}"))
        parallel = sgt.function(
            sg.elementwise(formula, inputs=[x], name=f"bench_{act}", parallel=True)
        )
        # Agreement (and the warm-up / compilation of every path).
        agreement[f"{act}: grad symgrad vs composition"] = rel(
            step(serial.apply)(), step(composition)()
        )
        agreement[f"{act}: grad parallel vs serial"] = rel(
            step(parallel.apply)(), step(serial.apply)()
        )
        agreement[f"{act}: value symgrad vs composition"] = rel(
            serial.apply(data), composition(data)
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            numba.set_num_threads(threads)
            symgrad_fn = serial if threads == 1 else parallel
            label = "serial" if threads == 1 else f"parallel=True, {threads} Numba threads"
            base_name = f"torch composition [{threads} threads]"
            candidates = {
                f"symgrad.torch.function [{label}]": step(symgrad_fn.apply),
                base_name: step(composition),
            }
            if native is not None:
                candidates[f"torch native F.{act} [{threads} threads]"] = step(native)
            times = interleaved(candidates, args.repeats)
            base = times[base_name]["median_s"]
            for t in times.values():
                t["x_composition"] = t["median_s"] / base
            blocks.append({"activation": act, "threads": threads, "times": times})

    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "versions": versions(),
        "size": args.size,
        "shape": list(data.shape),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "numba_num_threads": os.environ["NUMBA_NUM_THREADS"],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "agreement": agreement,
        "blocks": blocks,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"forward + backward, {result['size']:,} {result['dtype']} elements "
        f"(shape {tuple(result['shape'])}), median of {result['repeats']}",
        "",
        "| activation | threads | candidate | median ms | min ms | × composition |",
        "|---|---|---|---:|---:|---:|",
    ]
    for block in result["blocks"]:
        for name, t in block["times"].items():
            lines.append(
                f"| {block['activation']} | {block['threads']} | {name} | "
                f"{t['median_s'] * 1e3:.1f} | "
                f"{t['min_s'] * 1e3:.1f} | {t['x_composition']:.2f} |"
            )
    lines.append("")
    lines.append("agreement (max |Δ| / max |reference|):")
    lines += [f"- {k}: {v:.1e}" for k, v in result["agreement"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps({"machine": result["machine"], "versions": result["versions"]}, indent=1))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
