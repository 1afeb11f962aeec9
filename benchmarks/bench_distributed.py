"""Data-parallel scaling of symgrad on torch.distributed (gloo, CPU), in one command.

    python benchmarks/bench_distributed.py [--steps N] [--nproc 1,2] [--workloads W1,minilm-b]
        [--json PATH] [--markdown PATH]

Workloads (float32, one thread per process — NumPy, Numba and torch — as every rank of a real
run would have one core):

* **W1** — the MLP of ``symgrad bench`` W1 at B=1024, H=2048 (64→2048→2048→10, tanh, softmax
  cross-entropy, SGD): the layer path (buckets sent while the backward pass runs) and the
  compiled step (``symgrad.compile``; the all-reduce between its backward pass and its update);
* **minilm-b** — the MiniLM level-b training step (``symgrad finetune --task sms-minilm``): the
  top encoder layer (384 wide, 12 heads, FFN 1536) + a 2-class head trained on the cached
  hidden states of the five frozen layers (B=32 messages of 64 tokens, padding mask, AdamW),
  through the tape and through the compiled step (the task's path: ``symgrad finetune --level
  b --nproc N`` all-reduces in the compiled step's ``grad_hook`` as here); random weights and
  inputs (the timing does not depend on them).

For each workload and path: samples per second of one plain process (no process group) and of
N processes under torchrun, each rank computing B/N rows of the same global batch; the scaling
efficiency (N-process throughput / (N × one-process throughput)); per step, the seconds the
all-reduce took (gloo's completion callbacks), the share of the step it took, how much of it
the step did not wait for (overlapped), and the bytes all-reduced.  A separate loop times the
all-reduce of the same buffers alone (no computation beside it).  Medians over ``--steps``
steps after two warm-up steps.  Then the arithmetic for N machines at 1 and 10 Gb/s: the
bytes a ring all-reduce moves per step against the one-process compute time per step.  The
processes of one run share the machine with whatever else runs on it: compare the rows of one
run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("W1", "minilm-b")
PATHS = {"W1": ("layers", "compiled"), "minilm-b": ("tape", "compiled")}
W1_BATCH, W1_HIDDEN = 1024, 2048
MINILM_BATCH, MINILM_TOKENS = 32, 64


def _threads_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- the workloads ---------------------------------------------------------------------------


def build(workload: str) -> dict[str, Any]:
    """Model, loss, optimizer, the global batch (arrays), the flops of one step (estimate)."""
    from symgrad import nn, optim

    rng = np.random.default_rng(0)
    if workload == "W1":
        from symgrad.bench import _mlp

        model = _mlp(W1_HIDDEN, np.float32)
        b, h = W1_BATCH, W1_HIDDEN
        arrays = (rng.normal(size=(b, 64)).astype(np.float32), rng.integers(0, 10, b))
        flops = 6 * b * (64 * h + h * h + h * 10)  # forward 2·B·weights, backward twice that
        return {
            "model": model,
            "loss": nn.CrossEntropyLoss(),
            "optimizer": optim.SGD(model.parameters(), lr=0.01),
            "arrays": arrays,
            "flops": flops,
        }
    from symgrad.nn.bert import BertConfig, BertEncoder, SequenceClassifier

    config = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                        num_hidden_layers=6, vocab_size=8, max_position_embeddings=8)  # fmt: skip
    encoder = BertEncoder(config, np.float32)
    encoder.requires_grad_(False)
    encoder.layers[5].requires_grad_(True)
    head = nn.Linear(384, 2, dtype=np.float32, rng=rng)
    model = SequenceClassifier(encoder, head, start=5)
    b, t, n, i = MINILM_BATCH, MINILM_TOKENS, 384, 1536
    lengths = rng.integers(t // 2, t + 1, b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    hidden = rng.normal(size=(b, t, n)).astype(np.float32)
    trained = [p for p in model.parameters() if p.requires_grad]
    flops = 3 * (2 * b * t * (4 * n * n + 2 * n * i) + 4 * b * t * t * n)  # GEMMs and attention
    return {
        "model": model,
        "loss": nn.CrossEntropyLoss(),
        "optimizer": optim.AdamW(trained, lr=1e-4),
        "arrays": (hidden, mask, rng.integers(0, 2, b)),
        "flops": flops,
    }


def _eager_step(workload: str, setup: dict[str, Any]) -> Any:
    """``compute(indices, weight) -> loss``: forward and backward of rows, cotangent scaled."""
    from symgrad.nn import Tape

    model, loss, arrays = setup["model"], setup["loss"], setup["arrays"]

    def compute(idx: np.ndarray, weight: float) -> float:
        if workload == "W1":
            out, ctx = model.forward(arrays[0][idx])
            value, grad = loss.value_and_grad(out, arrays[1][idx])
            model.backward(ctx, grad * weight, need_input_grad=False)
            return float(value)
        tape = Tape()
        out = model.record(tape, arrays[0][idx], arrays[1][idx])
        value, grad = loss.value_and_grad(out, arrays[2][idx])
        tape.backward(out, grad * weight)
        return float(value)

    return compute


def _timed(step: Any, steps: int) -> list[float]:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker(workload: str, path: str, steps: int, out: Path) -> None:
    """One process: plain (no torchrun environment) or one rank of a torchrun job."""
    import torch

    torch.set_num_threads(1)
    setup = build(workload)
    model, opt, arrays = setup["model"], setup["optimizer"], setup["arrays"]
    batch = len(arrays[0])
    result: dict[str, Any] = {"workload": workload, "path": path, "batch": batch,
                              "flops": setup["flops"]}  # fmt: skip
    if "RANK" not in os.environ:  # one plain process
        if path == "compiled":
            from symgrad.compile import compile_step

            compiled = compile_step(model, setup["loss"], opt)
            times = _timed(lambda: compiled(*arrays), steps)
        else:
            compute = _eager_step(workload, setup)
            everything = np.arange(batch)

            def plain() -> None:
                opt.zero_grad()
                compute(everything, 1.0)
                opt.step()

            times = _timed(plain, steps)
        result.update(nproc=1, step_s=statistics.median(times))
        (out / f"{workload}-{path}-1.json").write_text(json.dumps(result))
        return

    import symgrad.distributed as sd

    world = sd.init(timeout=600)
    dp = sd.DataParallel(model, opt, batch, batch, seed=0)
    shard = dp.sampler.shard(np.arange(batch))
    if path == "compiled":
        run = dp.compiled(setup["loss"])
        times = _timed(lambda: run(shard, *arrays), steps)
        buffers = run.step.flat_gradients()  # type: ignore[attr-defined]
    else:
        compute = _eager_step(workload, setup)

        def data_parallel() -> None:
            dp.backward(shard, compute)
            opt.step()

        times = _timed(data_parallel, steps)
        buffers = list(dp.reducer.flats.values())
    timed = dp.reducer.stats.per_step[-steps:]
    # the all-reduce alone: the same buffers, nothing computed beside it
    alone = []
    for _ in range(steps):
        start = time.perf_counter()
        dp.reducer.reduce_flat(buffers, 1.0)
        alone.append(time.perf_counter() - start)
    if world.is_main:
        result.update(
            nproc=world.world_size,
            step_s=statistics.median(times),
            comm_s=statistics.median(c for c, _ in timed),
            wait_s=statistics.median(w for _, w in timed),
            allreduce_alone_s=statistics.median(alone),
            bytes=sum(b.nbytes for b in buffers),
        )
        (out / f"{workload}-{path}-{world.world_size}.json").write_text(json.dumps(result))
    dp.close()
    sd.shutdown()


# -- the driver ------------------------------------------------------------------------------


def _launch(workload: str, path: str, nproc: int, steps: int, out: Path) -> None:
    me = [str(Path(__file__).resolve()), "--worker", workload, path, str(steps), str(out)]
    if nproc == 1:
        command = [sys.executable, *me]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", *me]  # fmt: skip
    done = subprocess.run(command, env=_threads_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def _rows(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    one = {(r["workload"], r["path"]): r for r in found if r["nproc"] == 1}
    rows = []
    for r in found:
        base = one.get((r["workload"], r["path"]))
        row = dict(r)
        row["samples_per_s"] = r["batch"] / r["step_s"]
        if base is not None:
            speedup = base["step_s"] / r["step_s"]
            row["speedup"] = speedup
            row["efficiency"] = speedup / r["nproc"]
        if "comm_s" in r:
            row["allreduce_share"] = r["comm_s"] / r["step_s"]
            row["overlapped"] = max(0.0, 1 - r["wait_s"] / r["comm_s"]) if r["comm_s"] else 0.0
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<9} {'path':<9} {'procs':>5} {'step ms':>8} {'samples/s':>9} "
            f"{'eff.':>5} {'allred ms':>9} {'share':>6} {'overlap':>7} {'alone ms':>8} "
            f"{'MB/step':>7}")  # fmt: skip
    lines = [head]
    for r in rows:
        comm = f"{1e3 * r['comm_s']:>9.1f}" if "comm_s" in r else f"{'-':>9}"
        share = f"{100 * r['allreduce_share']:>5.1f}%" if "comm_s" in r else f"{'-':>6}"
        over = f"{100 * r['overlapped']:>6.0f}%" if "comm_s" in r else f"{'-':>7}"
        alone = f"{1e3 * r['allreduce_alone_s']:>8.1f}" if "comm_s" in r else f"{'-':>8}"
        mb = f"{r['bytes'] / 1e6:>7.2f}" if "bytes" in r else f"{'-':>7}"
        eff = f"{r['efficiency']:>5.2f}" if "efficiency" in r else f"{'-':>5}"
        lines.append(
            f"{r['workload']:<9} {r['path']:<9} {r['nproc']:>5} {1e3 * r['step_s']:>8.1f} "
            f"{r['samples_per_s']:>9.1f} {eff} {comm} {share} {over} {alone} {mb}"
        )
    return "\n".join(lines)


def arithmetic(rows: list[dict[str, Any]], gbit: float = 10.0) -> str:
    """Bytes all-reduced per step against compute per step, for N machines on a network of
    ``gbit`` Gb/s: a ring all-reduce sends and receives 2(N-1)/N of the buffer per rank."""
    lines = [
        f"N machines, {gbit:g} Gb/s network, ring all-reduce (2(N-1)/N × bytes per rank each "
        "way), one process per machine at the one-process speed measured here:"
    ]
    one = {(r["workload"], r["path"]): r for r in rows if r["nproc"] == 1}
    for r in rows:
        if "bytes" not in r or (r["workload"], r["path"]) not in one:
            continue
        if r["nproc"] != 2:
            continue
        base = one[(r["workload"], r["path"])]
        compute = base["step_s"]
        flops = r["flops"] / compute / 1e9
        parts = []
        for n in (2, 4, 8, 16):
            comm = 2 * (n - 1) / n * r["bytes"] / (gbit * 1e9 / 8)
            # without overlap the step is compute/N + comm; efficiency = (compute/N) / that
            eff = (compute / n) / (compute / n + comm)
            parts.append(
                f"N={n}: all-reduce {1e3 * comm:.1f} ms vs compute {1e3 * compute / n:.1f} ms "
                f"→ efficiency ≤ {eff:.2f} (no overlap)"
            )
        lines.append(f"- {r['workload']} {r['path']}: {r['bytes'] / 1e6:.2f} MB per step, one "
                     f"process {1e3 * compute:.1f} ms per step ({flops:.1f} GFLOP/s); "
                     + "; ".join(parts))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        workload, path, steps, out = argv[1:5]
        worker(workload, path, int(steps), Path(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--nproc", default="1,2", help="process counts (default 1,2)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    import tempfile

    load = os.getloadavg()
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            for path in PATHS[workload]:
                for nproc in map(int, args.nproc.split(",")):
                    _launch(workload, path, nproc, args.steps, Path(tmp))
                    found.append(json.loads(
                        (Path(tmp) / f"{workload}-{path}-{nproc}.json").read_text()
                    ))  # fmt: skip
                    print(f"done: {workload} {path} {nproc} process(es)", file=sys.stderr)
    rows = _rows(found)
    table = format_table(rows)
    note = "\n\n".join(arithmetic(rows, gbit) for gbit in (1.0, 10.0))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
               f"average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(table)
    print(note)
    print(machine)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine}, indent=1))
    if args.markdown:
        command = "python benchmarks/bench_distributed.py " + " ".join(argv)
        Path(args.markdown).write_text(
            f"# Data-parallel scaling (gloo, CPU)\n\n`{command.strip()}` — {machine}\n\n"
            f"```\n{table}\n```\n\n{note}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
