"""A GPT-2-style block's training step, symgrad's compiled step vs torch eager, at 1 and 2
threads in one run.

    python benchmarks/bench_gpt_block.py [--quick] [--batch 16] [--tokens 128]
        [--markdown benchmarks/RESULTS-gpt.md] [--json PATH]

One step: the forward of :class:`symgrad.nn.GPTBlock` (hidden 384, 6 heads of 64, MLP 1536,
pre-LN, causal self-attention, tanh-GELU), the mean squared error against a fixed target, the
backward pass (every parameter's gradient) and an AdamW update (lr 1e-4), float32, on
``B × T`` tokens.  The systems, each with the same weights and data:

* **symgrad compiled** — :func:`symgrad.compile.compile_step` of the block;
* **symgrad tape** — the block recorded on a :class:`symgrad.nn.Tape`, then ``optimizer.step()``;
* **torch eager** — nanoGPT's ``Block`` (:class:`symgrad.torch.gpt.GPTBlockTwin`,
  ``scaled_dot_product_attention(is_causal=True)``), ``torch.optim.AdamW``;
* **symgrad compiled, plain softmax (cost reference)** — not the block: the compiled step with
  the softmax over all keys in place of ``causal_softmax`` (the causal one does about half its
  arithmetic, the plain one none of its index tests).

For each thread count the process is pinned to that many cores and every pool set to it
(torch's intra-op pool, symgrad's through ``symgrad.set_num_threads`` — the BLAS its kernels
call stays single-threaded, symgrad splits the GEMMs itself); medians of interleaved repeats
after warm-up, ratios to torch eager of the same thread count.  The last full run is in
``benchmarks/RESULTS-gpt.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

MAX_THREADS = 2
# every pool sized for the most threads measured, before the libraries load; lowered per run
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = str(MAX_THREADS)

import numpy as np  # noqa: E402

HIDDEN, HEADS, LR = 384, 6, 1e-4


def _data(batch: int, tokens: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(batch, tokens, HIDDEN)).astype(np.float32),
        "target": rng.normal(size=(batch, tokens, HIDDEN)).astype(np.float32),
    }


def _block() -> Any:
    from symgrad.nn import GPTBlock

    return GPTBlock(HIDDEN, HEADS, dtype=np.float32, rng=np.random.default_rng(1))


def candidates(batch: int, tokens: int) -> dict[str, Any]:
    """System name → a callable running one training step."""
    import torch

    from symgrad import nn, optim
    from symgrad.compile import compile_step
    from symgrad.nn import Tape
    from symgrad.torch.gpt import GPTBlockTwin

    data = _data(batch, tokens)
    x, target = data["x"], data["target"]
    block = _block()
    compiled = compile_step(block, nn.MSELoss(), optim.AdamW(block.parameters(), lr=LR))
    taped = _block()
    opt, mse = optim.AdamW(taped.parameters(), lr=LR), nn.MSELoss()

    def tape_step() -> None:
        opt.zero_grad()
        tape = Tape()
        out = taped.record(tape, x)
        _, grad = mse.value_and_grad(out, target)
        tape.backward(out, grad)
        opt.step()

    twin = GPTBlockTwin(HIDDEN, HEADS)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in _block().torch_state_dict().items()})
    t_opt = torch.optim.AdamW(twin.parameters(), lr=LR)
    tx, tt = torch.from_numpy(x), torch.from_numpy(target)

    def torch_step() -> None:
        t_opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(twin(tx), tt).backward()
        t_opt.step()

    # A cost reference, not the block: the same step with a plain (non-causal) softmax in
    # place of causal_softmax (before the lowering kept a row's sums out of the key loop, the
    # causal kernels were O(T³) and this showed what an O(T²) one would cost).
    plain = _block()
    plain._built = {**plain._op, "causal_softmax": _builtin_softmax()}
    reference = compile_step(plain, nn.MSELoss(), optim.AdamW(plain.parameters(), lr=LR))
    return {
        "symgrad compiled": lambda: compiled(x, target),
        "symgrad tape": tape_step,
        "torch eager": torch_step,
        REFERENCE: lambda: reference(x, target),
    }


REFERENCE = "symgrad compiled, plain softmax (cost reference)"


def _builtin_softmax() -> Any:
    import symgrad as sg

    return sg.builtin("softmax")


def parts(batch: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Each op of the block alone, forward + VJP (symgrad, the ops as the tape records them):
    where the step's time goes."""
    import statistics

    from symgrad.nn import Tape

    x = _data(batch, tokens)["x"]
    tape = Tape()
    _block().record(tape, x)
    totals: dict[str, list[float]] = {}
    for _ in range(repeats + 1):  # the first round loads the kernels
        for n, r in enumerate(tape._records):
            grad = np.ones_like(r.output)
            start = time.perf_counter()
            r.op(*r.arrays)
            r.op.vjp(*r.arrays, grad)
            totals.setdefault(f"{n:2d} {r.op.name}", []).append(time.perf_counter() - start)
    return [
        {"op": name, "median_ms": statistics.median(ts[1:]) * 1e3} for name, ts in totals.items()
    ]


def run(batch: int, tokens: int, repeats: int) -> dict[str, Any]:
    import scipy.linalg.cython_blas  # noqa: F401  # the BLAS Numba calls, loaded for threadpoolctl
    import torch
    from threadpoolctl import threadpool_limits

    import symgrad as sg
    from symgrad.bench import interleaved, machine, versions
    from symgrad.runtime.threads import limit_blas

    info = machine()
    cores = sorted(os.sched_getaffinity(0))
    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    t0 = time.perf_counter()
    cands = candidates(batch, tokens)
    cands["symgrad compiled"]()  # the first call compiles (or loads) the step
    first_s = time.perf_counter() - t0
    rows = []
    op_rows: list[dict[str, Any]] = []
    for threads in range(1, MAX_THREADS + 1):
        if threads > len(cores):
            rows.append({"threads": threads, "skipped": f"only {len(cores)} core(s)"})
            continue
        os.sched_setaffinity(0, cores[:threads])
        torch.set_num_threads(threads)
        with threadpool_limits(threads), sg.num_threads(threads):
            limit_blas()  # symgrad's BLAS on one thread per call (threadpool_limits raised it)
            timings = interleaved(cands, repeats, warmup=2)
            if threads == 1:
                op_rows = parts(batch, tokens, repeats)
        ref = timings["torch eager"]["median_s"]
        for system, t in timings.items():
            rows.append(
                {
                    "threads": threads,
                    "system": system,
                    "median_ms": t["median_s"] * 1e3,
                    "min_ms": t["min_s"] * 1e3,
                    "ratio_to_torch": t["median_s"] / ref,
                }
            )
    os.sched_setaffinity(0, cores)
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "machine": info,
        "versions": versions(),
        "size": f"B={batch} T={tokens} hidden {HIDDEN}, {HEADS} heads, MLP {4 * HIDDEN}",
        "started": started,
        "seconds": round(time.perf_counter() - start, 1),
        "first_step_s": round(first_s, 1),
        "repeats": repeats,
        "rows": rows,
        "parts": op_rows,
    }


def markdown(result: dict[str, Any], command: str) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        "# GPT-2-style block, training step: symgrad compiled vs torch eager, 1 and 2 threads",
        "",
        f"Forward + MSE + backward + AdamW of one pre-LN decoder block ({result['size']}, "
        "causal self-attention, tanh-GELU), float32; medians of "
        f"{result['repeats']} interleaved repeats after warm-up; ratios to torch eager at the "
        "same thread count, measured in the same run.",
        "",
        f"Command: `{command}`; run {result['started']}, {result['seconds']} s (first compiled "
        f"step, compile or cache load included: {result['first_step_s']} s).",
        "",
        f"Machine: {m['cpu']} ({m.get('cpu_family_model', '')}, {m.get('simd', '')}), "
        f"{m['cores']} cores, {m['platform']}, Python {m['python']}; load average at start "
        f"{m['load_average_at_start']}, at end {m.get('load_average_at_end', '?')}.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "| threads | system | median ms | min ms | × torch eager |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['threads']} | (skipped: {r['skipped']}) | | | |")
            continue
        lines.append(
            f"| {r['threads']} | {r['system']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['ratio_to_torch']:.2f} |"
        )
    if result.get("parts"):
        lines += [
            "",
            "Each op of the block alone, forward + VJP, symgrad, 1 thread (median ms):",
            "",
            "| op | median ms |",
            "|---|---:|",
            *[f"| {r['op']} | {r['median_ms']:.1f} |" for r in result["parts"]],
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 11")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--markdown", help="write the results as Markdown to this path")
    parser.add_argument("--json", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    result = run(args.batch, args.tokens, 5 if args.quick else 11)
    command = "python benchmarks/bench_gpt_block.py " + " ".join(argv)
    text = markdown(result, command.strip())
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
