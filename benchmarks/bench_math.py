"""Benchmark of the kernels' math: float32 GELU, masked softmax's masks, a tensor op's call cost.

One command, one run, one pinned core, printed as a table (ratios are within this run)::

    python benchmarks/bench_math.py [--repeats 15] [--output PATH]

(a) **GELU forward + VJP, float32**, on the FFN activation of a MiniLM-size encoder layer
    (B·T = 2048 rows × 1536): symgrad's ``gelu`` as the Tape runs it (``op(x)`` then
    ``op.vjp(x, g)``) and in one pass (``op.value_and_vjp``), against torch eager
    (``F.gelu`` forward, ``torch.autograd.grad`` backward).  Target ≤ 1.0× torch.
(b) **masked softmax forward + VJP, float32** at (B, H, S) = (32, 12, 64) with three additive
    masks on half the keys: 0 (nothing masked), −inf, and Hugging Face's ``finfo(float32).min``.
    ``exp`` far into underflow must not take a slow path: the finfo.min mask should cost what
    the 0 mask costs.  torch's ``softmax(x + mask)`` forward + backward beside it.
(c) **a tiny tensor op's call**: ``linear`` on X (2, 4), W (3, 4), c (3) against the
    ``np.dot(X, W.T)`` of the same arrays (``timeit``, interleaved, best of each): the per-call
    cost of binding dims and checking shapes.  Target ≤ 3×.

Threads: every pool is limited to one thread before NumPy, Numba or torch load, and the process
is pinned to one core.  Timings are medians of interleaved repeats (``symgrad.bench.interleaved``)
after warm-up calls; the machine is shared, so compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from pathlib import Path
from typing import Any

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_name] = "1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per candidate")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3
    return args


def _pin() -> str:
    try:
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    except (AttributeError, OSError):  # not Linux
        return "not pinned"


def bench_gelu(repeats: int) -> list[tuple[str, float, str]]:
    import numpy as np
    import torch

    import symgrad as sg
    from symgrad.bench import interleaved

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2048, 1536)) * 2).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    op = sg.builtin("gelu")
    xt = torch.from_numpy(x).requires_grad_(True)
    gt = torch.from_numpy(g)

    def tape() -> Any:
        return op(x), op.vjp(x, g)

    def one_pass() -> Any:
        return op.value_and_vjp(x, grad_output=g)

    def torch_eager() -> Any:
        y = torch.nn.functional.gelu(xt)
        return torch.autograd.grad(y, xt, gt)

    y, (gx,) = tape()
    (gx_t,) = torch_eager()
    y_t = torch.nn.functional.gelu(xt).detach().numpy()
    err = max(
        float(np.max(np.abs(y - y_t)) / np.max(np.abs(y_t))),
        float(np.max(np.abs(gx - gx_t.numpy())) / np.max(np.abs(gx_t.numpy()))),
    )
    t = interleaved({"tape": tape, "one pass": one_pass, "torch": torch_eager}, repeats)
    base = t["torch"]["median_s"]
    note = f"max rel. diff to torch {err:.1e}"
    return [
        ("GELU f32 fwd+VJP, symgrad op() + op.vjp()", t["tape"]["median_s"], note),
        ("GELU f32 fwd+VJP, symgrad value_and_vjp", t["one pass"]["median_s"], ""),
        ("GELU f32 fwd+VJP, torch eager", base, "1.00× (reference)"),
    ]


def bench_softmax(repeats: int) -> list[tuple[str, float, str]]:
    import numpy as np
    import torch

    import symgrad as sg
    from symgrad.bench import interleaved

    B, H, S = 32, 12, 64
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, H, S, S)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    op = sg.builtin("masked_softmax")
    masked = np.zeros((B, S), dtype=bool)
    masked[:, S // 2 :] = True
    masks = {
        "0": np.zeros((B, S), np.float32),
        "-inf": np.where(masked, -np.inf, 0.0).astype(np.float32),
        "finfo.min": np.where(masked, np.finfo(np.float32).min, 0.0).astype(np.float32),
    }
    xt = torch.from_numpy(x).requires_grad_(True)
    gt = torch.from_numpy(g)
    candidates = {}
    for name, a in masks.items():
        at = torch.from_numpy(a)

        def ours(a: Any = a) -> Any:
            return op(x, a), op.vjp(x, a, g)

        def theirs(at: Any = at) -> Any:
            y = torch.softmax(xt + at[:, None, None, :], dim=-1)
            return torch.autograd.grad(y, xt, gt)

        candidates[f"symgrad {name}"] = ours
        candidates[f"torch {name}"] = theirs
    t = interleaved(candidates, repeats)
    zero = t["symgrad 0"]["median_s"]
    rows = []
    for name in masks:
        ours_s, theirs_s = t[f"symgrad {name}"]["median_s"], t[f"torch {name}"]["median_s"]
        rows.append(
            (
                f"masked softmax f32 fwd+VJP, mask {name}, symgrad",
                ours_s,
                f"{ours_s / zero:.2f}× the 0 mask; {ours_s / theirs_s:.2f}× torch",
            )
        )
        rows.append((f"masked softmax f32 fwd+VJP, mask {name}, torch", theirs_s, ""))
    return rows


def bench_call(repeats: int) -> list[tuple[str, float, str]]:
    import numpy as np

    import symgrad as sg

    rng = np.random.default_rng(2)
    x, w, c = rng.normal(size=(2, 4)), rng.normal(size=(3, 4)), rng.normal(size=3)
    op = sg.builtin("linear")
    op(x, w, c)
    number = 2000
    ours = dot = float("inf")
    for _ in range(max(repeats, 5)):  # interleaved, best of each: the machine's load moves both
        ours = min(ours, timeit.timeit(lambda: op(x, w, c), number=number))
        dot = min(dot, timeit.timeit(lambda: np.dot(x, w.T), number=number))
    return [
        ("tiny linear call (2×4 · 4×3)", ours / number, f"{ours / dot:.2f}× np.dot"),
        ("np.dot of the same arrays", dot / number, ""),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = _pin()
    import numba
    import numpy as np
    import torch

    torch.set_num_threads(1)
    rows = bench_gelu(args.repeats) + bench_softmax(args.repeats) + bench_call(args.repeats)
    lines = [
        f"bench_math: one thread, {pinned}; numpy {np.__version__}, numba {numba.__version__}, "
        f"torch {torch.__version__}; medians of {args.repeats} interleaved repeats",
        "",
        "| case | time | note |",
        "|---|---:|---|",
    ]
    for name, seconds, note in rows:
        shown = f"{seconds * 1e3:.2f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.2f} µs"
        lines.append(f"| {name} | {shown} | {note} |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
