"""``symgrad bench``: training-step and loss-kernel benchmarks against PyTorch, in one run.

Workloads (float32 unless stated, thread count fixed and reported, 1 by default):

* **W1** — one SGD training step of a 64→H→H→10 tanh MLP with softmax cross-entropy at
  (B, H) = (32, 128), (256, 512), (1024, 2048): symgrad's compiled step, the same step through
  :func:`symgrad.train.fit` (an epoch of :data:`FIT_STEPS` shuffled batches per call, reported
  per step: checks, batching and the step's lookup included), symgrad layer by layer,
  torch eager, ``torch.compile`` of a functional step (``fullgraph=True``), JAX ``jit`` when JAX
  is installed, and a NumPy step written by hand (the peer baseline the issue asks for; it is
  a benchmark reference, not a code path of symgrad).
* **W2** — sigmoid + binary cross-entropy value and gradient (mean) on 10M float64 elements:
  symgrad's fused kernel, torch ``BCEWithLogitsLoss`` forward + backward, NumPy, and a
  bandwidth floor (a Numba loop that reads the two inputs and writes one array).
* **W3** — wall time of a fresh process, imports included, to the first finished training step,
  with a warm and with a cold (empty) kernel cache; beside it the same for a process that only
  imports NumPy and Numba and calls one cached ``njit`` function with a GEMM — the floor any
  Numba-compiled step starts from.
* **W4** — one training step (forward, MSE, backward, AdamW) of a MiniLM-size BERT encoder layer
  (B=32, T=64, hidden 384, 12 heads, FFN 1536, padding mask): symgrad's compiled step and its
  tape, Hugging Face's ``BertLayer`` in torch eager and ``torch.compile``, JAX ``jit``; and each
  part of the layer (linear layers, attention products, masked softmax, GELU, residual layer
  norms) alone, forward + VJP, symgrad vs torch (:mod:`symgrad.bench_encoder`).

Every system gets ``threads`` threads (thread-pool settings) on as many cores (the process's CPU
affinity); symgrad's through :func:`symgrad.set_num_threads` (one pool for its loops and its
GEMMs, the BLAS they call single-threaded).  Timings are medians of repeats after warm-up, the
candidates of one size interleaved so drift hits them alike (W1 times a block of consecutive
steps per turn, as a training loop runs them; at several threads each turn starts with
:data:`SETTLE_S` seconds of untimed calls, so that the previous system's spinning threads are
off the cores); ratios are to torch eager measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

W1_SIZES = [(32, 128), (256, 512), (1024, 2048)]
W1_QUICK = [(32, 128), (256, 512)]
W4_SIZE = (32, 64)  # sequences, tokens
WORKLOADS = ("W1", "W2", "W3", "W4")
LR = 0.01
#: Steps (batches) of one ``fit`` call in W1's "symgrad fit" row, whose time is per step.
FIT_STEPS = 16
#: Seconds of untimed calls that start each turn of a candidate at several threads
#: (:func:`interleaved`).
SETTLE_S = 0.02


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        info["cpu"] = fields.get("model name", "unknown")
        info["cpu_family_model"] = f"family {fields.get('cpu family')} model {fields.get('model')}"
        flags = set(fields.get("flags", "").split())
        simd = ("sse4_2", "avx", "avx2", "fma", "avx512f")
        info["simd"] = " ".join(f for f in simd if f in flags)
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    info["cores"] = _cores()
    from .runtime.blas import KERNEL_BLAS

    info["kernel_blas"] = KERNEL_BLAS
    info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def versions() -> dict[str, str]:
    import llvmlite
    import numba
    import numpy
    import sympy
    import torch

    import symgrad

    found = {
        "symgrad": symgrad.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "sympy": sympy.__version__,
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import version

        found["jax"] = version("jax")
    except ImportError:  # PackageNotFoundError is an ImportError: JAX is optional
        pass
    return found


def interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    block: int = 1,
    steps: dict[str, int] | None = None,
    settle: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Median and minimum seconds of each candidate, run round-robin after ``warmup`` calls.

    Each turn of a candidate is ``block`` steps in a row, timed together (seconds per step):
    consecutive steps as in a training loop, with the caches holding that candidate's data
    rather than the previous candidate's.  A candidate named in ``steps`` takes that many
    steps per call (a ``fit`` epoch): its turn is ``block / steps`` calls (at least one).
    With ``settle`` > 0, each turn starts with untimed calls, at least one, for that many
    seconds: with several threads, the previous candidate's thread pool is still spinning on
    the cores when a turn starts (torch's OpenMP workers wait busily for a while after each
    op), and the calls at the start of a turn share the cores with it — in a training loop
    nothing else runs between steps.  (At two threads, symgrad's layer norms measured 3.5 ms
    right after torch's turn, 2.0 ms after 20 ms of settling; torch's parts gain too.)
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            per_call = (steps or {}).get(name, 1)
            calls = max(1, block // per_call)
            if settle > 0:
                start = time.perf_counter()
                fn()
                while time.perf_counter() - start < settle:
                    fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / (calls * per_call))
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "repeats": len(ts)}
        for name, ts in times.items()
    }


# -- W1 ------------------------------------------------------------------------------------


def _mlp(hidden: int, dtype: Any = np.float32) -> Any:
    """The W1 model, 64→H→H→10 with tanh, the same initial weights each call."""
    from . import nn

    r = np.random.default_rng(1)
    return nn.Sequential(
        nn.Linear(64, hidden, dtype=dtype, rng=r),
        nn.Tanh(),
        nn.Linear(hidden, hidden, dtype=dtype, rng=r),
        nn.Tanh(),
        nn.Linear(hidden, 10, dtype=dtype, rng=r),
    )


def _w1_candidates(batch: int, hidden: int, with_compile: bool) -> dict[str, Callable[[], object]]:
    import torch

    from . import nn, optim
    from .compile import compile_step
    from .torch import to_torch
    from .train import fit

    rng = np.random.default_rng(0)
    dt = np.float32
    x = rng.normal(size=(batch, 64)).astype(dt)
    y = rng.integers(0, 10, batch)

    def mlp() -> nn.Sequential:
        return _mlp(hidden, dt)  # type: ignore[no-any-return]

    step_model = mlp()
    ours = compile_step(
        step_model, nn.CrossEntropyLoss(), optim.SGD(step_model.parameters(), lr=LR)
    )
    layered = mlp()
    layered_opt = optim.SGD(layered.parameters(), lr=LR)
    ce = nn.CrossEntropyLoss()

    def layer_by_layer() -> None:
        layered_opt.zero_grad()
        out, ctx = layered.forward(x)
        _, grad = ce.value_and_grad(out, y)
        layered.backward(ctx, grad, need_input_grad=False)
        layered_opt.step()

    twin = to_torch(mlp())
    topt = torch.optim.SGD(twin.parameters(), lr=LR)
    tloss = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def torch_eager() -> None:
        topt.zero_grad()
        tloss(twin(tx), ty).backward()
        topt.step()

    fitted = mlp()
    fit_opt = optim.SGD(fitted.parameters(), lr=LR)
    xs, ys = np.concatenate([x] * FIT_STEPS), np.concatenate([y] * FIT_STEPS)

    def through_fit() -> None:
        fit(fitted, nn.CrossEntropyLoss(), fit_opt, xs, ys, epochs=1, batch_size=batch)

    candidates: dict[str, Callable[[], object]] = {
        "symgrad compiled": lambda: ours(x, y),
        "symgrad fit": through_fit,
        "symgrad layers": layer_by_layer,
        "torch eager": torch_eager,
        "numpy by hand": _numpy_step(mlp(), x, y)[0],
    }
    if with_compile:
        compiled = _torch_compiled_step(mlp(), tx, ty)
        if compiled is not None:
            candidates["torch.compile"] = compiled
    jax_step = _jax_step(mlp(), x, y)
    if jax_step is not None:
        candidates["jax jit"] = jax_step
    return candidates


def _numpy_step(
    model: Any, x: np.ndarray, y: np.ndarray
) -> tuple[Callable[[], object], list[np.ndarray], list[np.ndarray]]:
    """The peer baseline: the same SGD step written by hand in NumPy (tanh MLP, softmax CE).

    Returns the step and the weight and bias arrays it updates in place.
    """
    w = [model[k].weight.data.copy() for k in (0, 2, 4)]
    b = [model[k].bias.data.copy() for k in (0, 2, 4)]
    onehot = np.eye(10, dtype=x.dtype)[y]

    def step() -> None:
        a0 = x
        a1 = np.tanh(a0 @ w[0].T + b[0])
        a2 = np.tanh(a1 @ w[1].T + b[1])
        z = a2 @ w[2].T + b[2]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        dz = (e / e.sum(axis=1, keepdims=True) - onehot) / len(x)
        da2 = (dz @ w[2]) * (1 - a2 * a2)
        da1 = (da2 @ w[1]) * (1 - a1 * a1)
        for k, (g, a) in enumerate(((da1, a0), (da2, a1), (dz, a2))):
            w[k] -= LR * (g.T @ a)
            b[k] -= LR * g.sum(axis=0)

    return step, w, b


def _torch_compiled_step(model: Any, tx: Any, ty: Any) -> Callable[[], object] | None:
    import torch

    twin = __import__("symgrad.torch", fromlist=["to_torch"]).to_torch(model)
    params = [p.detach().clone() for p in twin.parameters()]
    names = [n for n, _ in twin.named_parameters()]

    def step(ps: list[Any], xb: Any, yb: Any) -> list[Any]:
        def loss_of(*weights: Any) -> Any:
            out = torch.func.functional_call(twin, dict(zip(names, weights, strict=True)), (xb,))
            return torch.nn.functional.cross_entropy(out, yb)

        grads = torch.func.grad(loss_of, argnums=tuple(range(len(ps))))(*ps)
        return [p - LR * g for p, g in zip(ps, grads, strict=True)]

    try:
        compiled = torch.compile(step, fullgraph=True)
        state = {"ps": compiled(params, tx, ty)}
    except Exception:  # a peer that cannot compile here is left out of the table, not fatal
        return None

    def run() -> None:
        state["ps"] = compiled(state["ps"], tx, ty)

    return run


def _jax_step(model: Any, x: np.ndarray, y: np.ndarray) -> Callable[[], object] | None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    params = [
        (jnp.asarray(model[k].weight.data), jnp.asarray(model[k].bias.data)) for k in (0, 2, 4)
    ]
    onehot = jnp.asarray(np.eye(10, dtype=x.dtype)[y])
    jx = jnp.asarray(x)

    def loss(ps: Any) -> Any:
        a = jx
        for k, (w, b) in enumerate(ps):
            a = a @ w.T + b
            if k < 2:
                a = jnp.tanh(a)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(a), axis=1))

    @jax.jit
    def step(ps: Any) -> Any:
        grads = jax.grad(loss)(ps)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, ps, grads)

    state = {"ps": params}

    def run() -> None:
        state["ps"] = step(state["ps"])
        jax.block_until_ready(state["ps"])

    return run


# -- W2 ------------------------------------------------------------------------------------


def _w2_candidates(n: int) -> dict[str, Callable[[], object]]:
    import numba
    import torch

    from .api import builtin

    rng = np.random.default_rng(0)
    x = rng.normal(size=n) * 4
    y = (rng.uniform(size=n) > 0.5).astype(np.float64)
    op = builtin("bce_with_logits", wrt=["x"])  # torch's targets need no gradient either
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.from_numpy(y)
    loss = torch.nn.BCEWithLogitsLoss()

    def torch_step() -> None:
        tx.grad = None
        loss(tx, ty).backward()

    def numpy_step() -> None:
        e = np.exp(-np.abs(x))
        value = np.mean(np.maximum(x, 0) - x * y + np.log1p(e))
        sig = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        _ = (value, (sig - y) / n)

    @numba.njit(cache=False)  # not into the package directory
    def floor(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        for i in range(a.shape[0]):
            out[i] = a[i] + b[i]

    out = np.empty_like(x)
    return {
        "symgrad": lambda: op.value_and_vjp(x, y, reduction="mean"),  # type: ignore[union-attr]
        "torch eager": torch_step,
        "numpy": numpy_step,
        "bandwidth floor": lambda: floor(x, y, out),
    }


# -- W3 ------------------------------------------------------------------------------------

_FIRST_STEP = """
import numpy as np
from symgrad import nn, optim
from symgrad.compile import compile_step
rng = np.random.default_rng(0)
model = nn.Sequential(nn.Linear(64, 128, rng=rng), nn.Tanh(), nn.Linear(128, 128, rng=rng),
                      nn.Tanh(), nn.Linear(128, 10, rng=rng))
step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01))
step(rng.normal(size=(32, 64)).astype(np.float32), rng.integers(0, 10, 32))
"""

# The floor: NumPy, Numba and one cached njit function with a GEMM, loaded and called.
_NUMBA_FLOOR = """
import numpy as np
from numba import njit

@njit(cache=True)
def f(a, b, out):
    np.dot(a, b, out)
    return out[0, 0]

f(np.ones((32, 64), np.float32), np.ones((64, 128), np.float32), np.empty((32, 128), np.float32))
"""


def _fresh_process_seconds(code: str, cache: str, threads: int) -> float:
    env = dict(
        os.environ,
        SYMGRAD_CACHE_DIR=cache,
        NUMBA_NUM_THREADS=str(threads),
        SYMGRAD_NUM_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - start


def _w3_rows(threads: int, repeats: int) -> list[dict[str, Any]]:
    """Fresh-process times: cold (an empty cache, ``repeats`` times), warm and the Numba floor
    (three runs after each cold one, interleaved); medians and minima."""
    cold, warm, floor = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(_fresh_process_seconds(_FIRST_STEP, cache, threads))
            script = os.path.join(cache, "floor.py")  # Numba caches functions of files only
            Path(script).write_text(_NUMBA_FLOOR)
            run_floor = f"import runpy; runpy.run_path({script!r})"
            _fresh_process_seconds(run_floor, cache, threads)  # compiles into the cache
            for _ in range(3):
                warm.append(_fresh_process_seconds(_FIRST_STEP, cache, threads))
                floor.append(_fresh_process_seconds(run_floor, cache, threads))
    rows = []
    for size, system, times in (
        ("cold cache", "symgrad", cold),
        ("warm cache", "symgrad", warm),
        ("warm cache", "numba floor", floor),
    ):
        rows.append(
            {
                "workload": "W3 first step",
                "size": size,
                "system": system,
                "median_ms": statistics.median(times) * 1e3,
                "min_ms": min(times) * 1e3,
                "ratio_to_torch": None,
            }
        )
    return rows


# -- the run -------------------------------------------------------------------------------


def run(
    quick: bool = False,
    threads: int = 1,
    with_compile: bool = True,
    w1_sizes: list[tuple[int, int]] | None = None,
    w2_size: int | None = None,
    w3: bool = True,
    workloads: tuple[str, ...] = WORKLOADS,
    w4_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run the ``workloads``; returns ``{"machine", "versions", "threads", "started",
    "seconds", "rows"}``.

    ``w1_sizes``, ``w2_size``, ``w3`` and ``w4_size`` override the workloads (tests run a tiny
    set).
    """
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    # Every thread pool at `threads`: libraries loaded from here on read these at load time,
    # XLA (JAX) reads its flags at import, and the BLAS symgrad's kernels call is loaded now so
    # that threadpool_limits (which sees loaded libraries only) covers it.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    multi = "true" if threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (
        f"--xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={threads}"
    )
    from .runtime.threads import kernel_blas

    kernel_blas()
    import torch

    info = machine()  # before the pinning below: the machine's cores, not the run's
    # ... and the process on `threads` cores: a pool that ignores every setting (XLA's ran two
    # threads under all of the above) still gets no more cores than the others.
    pinned = hasattr(os, "sched_setaffinity")
    cores = sorted(os.sched_getaffinity(0)) if pinned else []
    if pinned:
        os.sched_setaffinity(0, cores[:threads])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    try:
        rows = _rows(
            quick, threads, with_compile, w1_sizes, w2_size, w3 and "W3" in workloads,
            workloads, w4_size,
        )
    finally:
        torch.set_num_threads(before)
        if pinned:
            os.sched_setaffinity(0, cores)
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "machine": info,
        "versions": versions(),
        "threads": threads,
        "started": started,
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def _rows(
    quick: bool,
    threads: int,
    with_compile: bool,
    w1_sizes: list[tuple[int, int]] | None,
    w2_size: int | None,
    w3: bool,
    workloads: tuple[str, ...] = WORKLOADS,
    w4_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_limits

    from .runtime import threads as sg_threads

    rows: list[dict[str, Any]] = []

    def add(workload: str, size: str, timings: dict[str, dict[str, float]]) -> None:
        ref = timings.get("torch eager", {}).get("median_s")
        for system, t in timings.items():
            rows.append(
                {
                    "workload": workload,
                    "size": size,
                    "system": system,
                    "median_ms": t["median_s"] * 1e3,
                    "min_ms": t["min_s"] * 1e3,
                    "ratio_to_torch": t["median_s"] / ref if ref else None,
                }
            )

    sizes = w1_sizes if w1_sizes is not None else (W1_QUICK if quick else W1_SIZES)
    if "W1" not in workloads:
        sizes = []
    with threadpool_limits(threads), sg_threads.num_threads(threads):
        # symgrad's kernels on Numba's pool of `threads`, the BLAS they call on one thread each
        # (threadpool_limits just gave it `threads`: they would compete)
        sg_threads.limit_blas()
        settle = SETTLE_S if threads > 1 else 0.0  # see interleaved()
        for batch, hidden in sizes:
            work = batch * hidden * hidden + 1
            repeats = max(15, min(100, int(5e8 / work)))
            block = max(1, min(20, int(1e7 / work)))  # 20 steps a turn at B=32, H=128
            cands = _w1_candidates(batch, hidden, with_compile and not quick)
            timings = interleaved(
                cands, repeats, warmup=3, block=block, steps={"symgrad fit": FIT_STEPS},
                settle=settle,
            )
            add("W1 train step", f"B={batch} H={hidden}", timings)
        n = w2_size if w2_size is not None else (1_000_000 if quick else 10_000_000)
        if "W2" in workloads:
            add(
                "W2 sigmoid+BCE",
                f"n={n:,} float64",
                interleaved(_w2_candidates(n), 5 if quick else 15, settle=settle),
            )
        if "W4" in workloads:
            from . import bench_encoder

            batch, seq = w4_size if w4_size is not None else W4_SIZE
            size = f"B={batch} T={seq}"
            repeats = 5 if quick else 11
            cands = bench_encoder.candidates(batch, seq, with_compile and not quick)
            add("W4 BERT layer", size, interleaved(cands, repeats, settle=settle))
            for part, pair in bench_encoder.parts(batch, seq).items():
                add(f"W4 {part}", size, interleaved(pair, repeats, settle=settle))
    sg_threads.limit_blas()  # threadpool_limits restored the BLAS's threads on leaving
    if w3:
        rows += _w3_rows(threads, 1 if quick else 3)
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The rows as a text table with ratios to torch eager."""
    m, v = result["machine"], result["versions"]
    lines = [
        f"{m['cpu']} ({m.get('cpu_family_model', 'family ?')}, {m['cores']} cores, load at start "
        f"{m['load_average_at_start']}), {result['threads']} thread(s); "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"kernels' BLAS: {m.get('kernel_blas', 'unknown')}",
        f"{'workload':<16} {'size':<20} {'system':<16} {'median ms':>11} {'min ms':>10} "
        f"{'× torch':>8}",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_torch']:.2f}" if r["ratio_to_torch"] is not None else "-"
        lines.append(
            f"{r['workload']:<16} {r['size']:<20} {r['system']:<16} "
            f"{r['median_ms']:>11.3f} {r['min_ms']:>10.3f} {ratio:>8}"
        )
    return "\n".join(lines)


def format_markdown(result: dict[str, Any], command: str) -> str:
    """The rows as a Markdown report: command, machine, versions, table."""
    m, v = result["machine"], result["versions"]
    lines = [
        "# symgrad bench",
        "",
        f"Command: `{command}` ({result['threads']} thread(s) for every system, on as many "
        f"cores); run {result.get('started', '?')}, {result.get('seconds', '?')} s.",
        "",
        f"Machine: {m['cpu']} ({m.get('cpu_family_model', '')}, "
        f"{m.get('simd', '')}), {m['cores']} cores, {m['platform']}, Python {m['python']}; "
        f"load average at start {m['load_average_at_start']}, at end "
        f"{m.get('load_average_at_end', '?')}. Kernels' BLAS: {m.get('kernel_blas', 'unknown')}.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "| workload | size | system | median ms | min ms | × torch eager |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_torch']:.2f}" if r["ratio_to_torch"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['size']} | {r['system']} | {r['median_ms']:.3f} | "
            f"{r['min_ms']:.3f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
