"""The ``symgrad`` command line.

``symgrad finetune``
    the main job: fine-tune the pretrained MiniLM-L6 transformer on SMS spam beside its Hugging
    Face twin, as §5 of the article does it (``--task digits``: the small MLP task).
``symgrad demo``
    derive and compile every elementwise built-in, check values and gradients against PyTorch in
    float64 (if torch is installed) and print a table.
``symgrad derive NAME_OR_FORMULA``
    print the derivation of a built-in op or of a formula (text, LaTeX or Markdown).
``symgrad bench``
    training-step and loss-kernel benchmarks against torch (see :mod:`symgrad.bench`).
``symgrad cache {path,clear}``
    show or empty the kernel cache.

Every argument and every output path is checked before any work starts: a bad one exits with
status 2 and one line on stderr (``symgrad finetune: error: ...``), writing nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import __version__
from .api import builtin
from .builtins import BUILTINS, TENSOR_BUILTINS, Builtin
from .errors import DefinitionError, OptionError, OutputError, SymgradError, closest
from .runtime.cache import cache_dir, clear_cache
from .runtime.elementwise import ElementwiseOp

RUNS_DIR = Path("runs")
"""Where ``symgrad finetune`` writes its outputs by default: ``runs/<task>/`` under the current
directory (``.gitignore`` lists ``runs/``)."""

TASKS = ("sms-minilm", "digits")


def default_out(task: str) -> Path:
    """The default output directory of ``symgrad finetune --task TASK``."""
    return RUNS_DIR / task


# -- argument parsing ----------------------------------------------------------------------


_CHOICE = re.compile(r"invalid choice: '(?P<value>[^']*)' \(choose from (?P<choices>.*)\)")


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors and a "did you mean" for a misspelt choice."""

    def error(self, message: str) -> NoReturn:
        found = _CHOICE.search(message)
        if found:
            choices = [c.strip().strip("'\"") for c in found.group("choices").split(",")]
            close = closest(found.group("value"), choices)
            if close is not None:
                message += f"; did you mean {close!r}?"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number ≥ ``low``."""

    def parse(text: str) -> int:
        value = _whole(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    parse.__name__ = f"whole number ≥ {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _limit(text: str) -> int | str:
    """``--limit``: a number of training messages ≥ 1, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (or 'all'), got {value}")
    return value


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def _check_creatable(path: Path, option: str, shown: Path) -> None:
    """``path`` (a directory) exists or can be created: its nearest existing ancestor is a
    writable directory."""
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise OutputError(f"{option} {shown}: {base} is a file, so nothing can be written under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {shown}: {base} is not writable; choose another place")
    try:  # permissions are not everything (/proc, a read-only or full file system): try it
        handle, probe = tempfile.mkstemp(dir=base, prefix=".symgrad-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"{option} {shown}: cannot write in {base} ({err.strerror or err}); choose another "
            "place"
        ) from None


def check_output_dir(path: str | Path, option: str) -> Path:
    """Check, writing nothing, that the directory ``path`` exists or can be created and written
    into; an :class:`~symgrad.errors.OutputError` naming ``option`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: a file is there, not a directory; choose another")
    _check_creatable(path, option, path)
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Check, writing nothing, that the file ``path`` can be written (its directory exists or
    can be created); an :class:`~symgrad.errors.OutputError` naming ``option`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: a directory is there, not a file; name a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path}: the file is not writable")
    _check_creatable(path.absolute().parent, option, path)
    return path


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (creating its directory); an ``OutputError`` naming the path
    and the cause if the system refuses even so (a full disk)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise OutputError(f"could not write {path}: {err.strerror or err}") from None


# -- demo ------------------------------------------------------------------------------------


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


# -- finetune --------------------------------------------------------------------------------

# Options that belong to one task only (default None: given for the other task, they are an
# error rather than silently ignored).
_TASK_OPTIONS = {
    "sms-minilm": {"level": "--level", "limit": "--limit", "lr": "--lr"},
    "digits": {
        "labels_per_class": "--labels-per-class",
        "seeds": "--seeds",
        "optimizer": "--optimizer",
        "pretrain_epochs": "--pretrain-epochs",
        "freeze_body": "--freeze-body",
    },
}


def _check_finetune_options(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Options that apply to another task, and the output paths: checked before any work."""
    for task, options in _TASK_OPTIONS.items():
        if task == args.task:
            continue
        for dest, flag in options.items():
            if getattr(args, dest) not in (None, False):
                raise OptionError(f"{flag} applies to --task {task} only, not --task {args.task}")
    out = check_output_dir(args.out if args.out is not None else default_out(args.task), "--out")
    json_path = check_output_file(args.json, "--json") if args.json else None
    return out, json_path


def cmd_finetune(args: argparse.Namespace) -> int:
    out, json_path = _check_finetune_options(args)
    if args.nproc is not None:
        return _launch_ranks(args)
    world = _join_process_group(args)
    run = _finetune_minilm if args.task == "sms-minilm" else _finetune_digits
    if world is None:
        return run(args, out, json_path, None)
    from .distributed import CollectiveError, abort, shutdown

    try:
        status = run(args, out, json_path, world)
    except CollectiveError as err:  # a peer is gone: leave at once (see symgrad.distributed.abort)
        print(f"symgrad finetune: error: {' '.join(str(err).split())}", file=sys.stderr)
        abort(3)
    shutdown()
    return status


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line of each rank: ``argv`` without ``--nproc N`` (or an abbreviation of
    it, or ``--nproc=N``)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name, sep, _ = token.partition("=")
        if len(name) > 2 and "--nproc".startswith(name):
            skip = not sep
            continue
        kept.append(token)
    return kept


def _launch_ranks(args: argparse.Namespace) -> int:
    """``symgrad finetune --nproc N ...``: the same command on N local ranks under torchrun."""
    from .distributed import launch, launched, torchrun_command

    if launched():
        raise OptionError(
            "--nproc inside a torchrun job: torchrun already started the ranks; drop --nproc "
            "(or start without torchrun)"
        )
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise OptionError(
            "--nproc runs the ranks on torch.distributed, and torch is not installed: "
            "pip install 'symgrad[torch]' (or drop --nproc)"
        )
    argv = ["finetune", *_without_nproc(args.argv)]
    print(
        f"symgrad finetune: {args.nproc} process(es) on this machine, one thread each: "
        f"python {' '.join(torchrun_command(args.nproc, argv)[1:])}",
        file=sys.stderr,
        flush=True,
    )
    return launch(args.nproc, argv)


def _join_process_group(args: argparse.Namespace) -> Any:
    """The process group when started by torchrun (``RANK`` and ``WORLD_SIZE`` set), else None;
    ``--timeout`` applies to a process group only."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if args.timeout is not None:
            raise OptionError(
                "--timeout applies to data-parallel runs only: give --nproc N too, or start "
                "under torchrun"
            )
        return None
    from .distributed import DEFAULT_TIMEOUT, init

    return init(timeout=args.timeout if args.timeout is not None else DEFAULT_TIMEOUT)


def _written(out: Path, files: dict[Path, str]) -> None:
    """The last lines: where the outputs are."""
    print(f"Outputs (in {out.absolute()}):")
    for path, what in files.items():
        print(f"  {path} — {what}")


def _finetune_digits(
    args: argparse.Namespace, out: Path, json_path: Path | None, world: Any
) -> int:
    from .tasks import finetune
    from .tasks.progress import SILENT, Console

    defaults = finetune.FinetuneConfig()
    cfg = finetune.FinetuneConfig(
        dtype=args.dtype or defaults.dtype,
        seed=args.seed,
        labels_per_class=args.labels_per_class or defaults.labels_per_class,
        freeze_body=args.freeze_body,
        optimizer=args.optimizer or defaults.optimizer,
        pretrain_epochs=args.pretrain_epochs or defaults.pretrain_epochs,
        epochs=args.epochs or defaults.epochs,
    )
    finetune.check_split(cfg)
    main = world is None or world.is_main
    console = Console(progress=not args.quiet) if main else SILENT
    if world is not None:
        console.say(
            f"Data-parallel: symgrad trains on {world.world_size} processes (gloo), each "
            "computing its share of every global batch; rank 0 alone runs the twin and reports"
        )
    study = finetune.run_study(cfg, args.seeds or finetune.SEEDS, console, world)
    if not main:  # rank 0 alone prints and writes
        return 0
    print(finetune.format_study(study))
    json_path = json_path or out / "finetune_report.json"
    png = out / "finetune_losses.png"
    write_text(json_path, finetune.to_json(study))
    with console.phase(f"writing the plot {png}"):
        finetune.plot(study["runs"][0], png)
    tolerance = 1e-9 if cfg.dtype == "float64" else 1e-4
    worst = max(study["max_loss_rel_diff"], study["max_param_rel_diff"])
    agree = worst <= tolerance
    print(f"agreement with torch within {tolerance:g}: {'yes' if agree else 'NO'} ({worst:.1e})")
    _written(out, {json_path: "the full report, every seed", png: f"seed {cfg.seed}'s loss curves"})
    return 0 if agree else 1


def _chosen_limit(given: int | str | None, default: int | None) -> int | None:
    if given is None:
        return default
    return None if given == "all" else int(given)


def _finetune_minilm(
    args: argparse.Namespace, out: Path, json_path: Path | None, world: Any
) -> int:
    from .tasks import minilm
    from .tasks.progress import SILENT, Console

    defaults = minilm.MinilmConfig()
    level = args.level or defaults.level
    cfg = minilm.MinilmConfig(
        level=level,
        dtype=args.dtype or defaults.dtype,
        seed=args.seed,
        epochs=args.epochs or minilm.default_epochs(level),
        limit=_chosen_limit(args.limit, defaults.limit),
        lr=args.lr or defaults.lr,
    )
    cfg.validate()
    main = world is None or world.is_main
    console = Console(progress=not args.quiet) if main else SILENT
    report = minilm.run(cfg, console=console, world=world)
    if not main:  # rank 0 alone prints and writes
        return 0
    print(minilm.format_report(report))
    json_path = json_path or out / "sms_minilm_report.json"
    png = out / "sms_minilm_losses.png"
    text_report = out / "sms_minilm_summary.txt"
    write_text(json_path, minilm.to_json(report))
    write_text(text_report, minilm.format_report(report).lstrip() + "\n")
    with console.phase(f"writing the plot {png}"):
        minilm.plot(report, png)
    check = report["agreement_check_float64"]
    agree = check["forward_rel_diff"] <= 1e-10 and check["max_grad_rel_diff"] <= 1e-8
    print(
        f"float64 agreement with torch (forward 1e-10, gradients 1e-8): {'yes' if agree else 'NO'}"
    )
    _written(
        out,
        {
            json_path: "the full report",
            text_report: "the classification report and the headline",
            png: "the loss curves",
        },
    )
    return 0 if agree else 1


# -- bench, derive, cache --------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    json_path = check_output_file(args.json, "--json") if args.json else None
    md_path = check_output_file(args.markdown, "--markdown") if args.markdown else None
    result = bench.run(
        quick=args.quick,
        threads=args.threads,
        with_compile=not args.no_compile,
        workloads=tuple(args.workloads.split(",")),
    )
    print(bench.format_table(result))
    if json_path is not None:
        bench.write_json(result, str(json_path))
        print(f"wrote {json_path}")
    if md_path is not None:
        command = "symgrad bench " + " ".join(args.argv)
        write_text(md_path, bench.format_markdown(result, command.strip()))
        print(f"wrote {md_path}")
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
    from .explain import RENDERERS, derivation_for

    output = check_output_file(args.output, "--output") if args.output else None
    params = _assignments(args.param, "--param")
    derivation = derivation_for(args.target, wrt=args.wrt, params=params, name=args.name)
    text = RENDERERS[args.format](derivation)
    if output is not None:
        write_text(output, text)
        print(f"wrote {output}")
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
    parser = _Parser(
        prog="symgrad",
        description="symgrad: a symbolic-to-numeric derivative compiler. Write a layer's or a "
        "loss's forward math once as a SymPy formula; symgrad derives the chain rule "
        "symbolically, stabilises it, and compiles Numba kernels that train networks — checked "
        "against PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"symgrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="the main job: fine-tune the pretrained MiniLM-L6 transformer on SMS spam beside "
        "its Hugging Face twin (--task digits: an MLP pre-trained on MNIST, fine-tuned on "
        "sklearn digits)",
        description="The article's job (§5 of 《从零开始大模型开发与微调：链式求导法则》): "
        "fine-tune the pretrained all-MiniLM-L6-v2 encoder with a new classification head on "
        "the SMS spam collection — Adam, batch 16, 3 epochs, a train/validation/test split "
        "(at lr 5e-5: the article's 2e-5 is too small a step for a run of minutes — on 256 "
        "messages it ends no better than the frozen encoder; --lr 2e-5 restores it) — beside "
        "a Hugging Face BertModel twin that "
        "starts from the same weights and sees the same batches. It prints one line per epoch, "
        "scikit-learn's classification report and a headline: accuracy and spam F1 against a "
        "frozen-encoder baseline and the twin, "
        "how far symgrad's gradients and losses are from torch's, and the time per epoch of "
        "each. --task digits: a 64-128-64-10 MLP pre-trained on 5,000 MNIST digits, fine-tuned "
        f"on a few labelled scikit-learn digits, against training from scratch, over several "
        f"seeds. Outputs go to {RUNS_DIR}/TASK/ (--out).",
    )
    ft.add_argument(
        "--task",
        choices=TASKS,
        default="sms-minilm",
        help="sms-minilm (default): MiniLM-L6 on SMS spam (needs the 'text' extra, part of "
        "'all'); digits: the MLP task",
    )
    ft.add_argument(
        "--level",
        choices=["a", "b", "c"],
        default=None,
        help="sms-minilm: which layers train — a: only the head (encoder frozen), b: the top "
        "layer and the head, c: every layer and the head (default; the embeddings stay frozen)",
    )
    ft.add_argument(
        "--limit",
        type=_limit,
        default=None,
        metavar="N",
        help="sms-minilm: train on N messages, validate on N/4 and test on N (stratified samples "
        "of each split; default 128 so the run takes minutes); 'all': the whole collection",
    )
    ft.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="sms-minilm: Adam's learning rate (default 5e-05; the article's is 2e-5)",
    )
    ft.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="default float32 (sms-minilm), float64 (digits)",
    )
    ft.add_argument("--seed", type=at_least(0), default=0, help="random seed ≥ 0 (default 0)")
    ft.add_argument(
        "--epochs",
        type=at_least(1),
        default=None,
        help="training epochs: sms-minilm 3 (30 at --level a: the head alone); digits: "
        "fine-tuning and from-scratch epochs, default 100",
    )
    ft.add_argument(
        "--labels-per-class",
        type=at_least(1),
        default=None,
        metavar="K",
        help="digits: labelled sklearn digits per class to fine-tune on (default 5)",
    )
    ft.add_argument(
        "--seeds",
        type=at_least(1),
        default=None,
        metavar="N",
        help="digits: repeat the study with seeds SEED … SEED+N-1 (default 3)",
    )
    ft.add_argument("--freeze-body", action="store_true", help="digits: fine-tune only the head")
    ft.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], default=None, help="digits (default sgd)"
    )
    ft.add_argument(
        "--pretrain-epochs",
        type=at_least(1),
        default=None,
        help="digits: MNIST pre-training epochs (default 30)",
    )
    ft.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"directory for the report, the plot and the JSON (default {RUNS_DIR}/TASK)",
    )
    ft.add_argument(
        "--json", default=None, metavar="PATH", help="JSON report path (default in --out)"
    )
    ft.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    ft.add_argument(
        "--nproc",
        type=at_least(1),
        default=None,
        metavar="N",
        help="train data-parallel on N processes of this machine (torchrun, gloo, one thread "
        "each): the same global batches and result as one process; rank 0 alone prints and "
        "writes. On several machines, start 'torchrun ... -m symgrad finetune ...' on each "
        "instead",
    )
    ft.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="data-parallel runs: how long a rank waits for the others before it stops with an "
        "error (default 600; rank 0's twin, checks and evaluation run while the others wait)",
    )
    ft.set_defaults(func=cmd_finetune)

    demo = sub.add_parser(
        "demo",
        help="derive, compile and check every elementwise built-in op against torch",
        description="Derive and compile every elementwise built-in op (sigmoid, tanh, gelu, the "
        "losses, ...), evaluate each on --size random inputs from its domain, and compare its "
        "values and gradients with PyTorch autograd in float64: one row per op (compile "
        "seconds, largest relative differences) and a final verdict (agrees within 1e-10).",
    )
    demo.add_argument(
        "--size", type=at_least(1), default=10_000, help="elements per op (default 10000)"
    )
    demo.add_argument("--seed", type=at_least(0), default=0, help="random seed (default 0)")
    demo.set_defaults(func=cmd_demo)

    derive = sub.add_parser(
        "derive",
        help="print the derivation of a built-in op or a formula, step by step",
        description="Print the derivation symgrad compiles — forward, stability rewrites, local "
        "partial derivatives, chain rule, Kronecker contraction (index notation), common "
        "subexpressions — for a built-in op or a formula in Python syntax, e.g. "
        "symgrad derive 'x*tanh(softplus(x))' --wrt x. Formulas are parsed without evaluating "
        "any Python: only numbers, symbols, + - * / ** and known functions are accepted; "
        "decimal numbers are read exactly (0.5 is 1/2). A formula may start with '-'.",
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
    bn.add_argument(
        "--threads", type=at_least(1), default=1, help="threads for every system (default 1)"
    )
    bn.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    bn.add_argument("--json", default=None, help="write the rows to this JSON file")
    bn.add_argument(
        "--markdown", default=None, help="write the table, machine and command as Markdown"
    )
    bn.set_defaults(func=cmd_bench)

    cache = sub.add_parser(
        "cache",
        help="show (path) or empty (clear) the kernel cache",
        description="The compiled kernels live in $SYMGRAD_CACHE_DIR (default ~/.cache/symgrad): "
        "'path' prints the directory, 'clear' removes the cached modules.",
    )
    cache.add_argument("action", choices=["path", "clear"])
    cache.set_defaults(func=cmd_cache)
    for name, command in sub.choices.items():
        command.set_defaults(_parser=command, _name=name)
    return parser


def _formula_behind_dashes(raw: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``symgrad derive -x**2 --wrt x``: a formula starting with '-' would read as an option;
    it is moved behind ``--``, where argparse takes it as the positional argument."""
    if not raw or raw[0] != "derive" or "--" in raw:
        return raw
    derive = _subparser(parser, "derive")
    takes_value = [
        s for a in derive._actions if a.nargs != 0 for s in a.option_strings if s.startswith("--")
    ]
    rest, k = raw[1:], 0
    while k < len(rest):
        token = rest[k]
        if token.startswith("--") and "=" not in token:
            k += 2 if any(s.startswith(token) for s in takes_value) else 1
            continue
        if token.startswith("-") and not token.startswith("--") and token not in ("-", "-h"):
            return ["derive", *rest[:k], *rest[k + 1 :], "--", token]
        k += 1
    return raw


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)  # pragma: no cover


def _unrecognized(sub: argparse.ArgumentParser, extras: Sequence[str]) -> NoReturn:
    options = [s for a in sub._actions for s in a.option_strings]
    hints = []
    for token in extras:
        close = closest(token.partition("=")[0], options) if token.startswith("-") else None
        if close is not None:
            hints.append(f"{token!r}: did you mean {close!r}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    sub.error("; ".join([message, *hints]))


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    raw = _formula_behind_dashes(raw, parser)
    args, extras = parser.parse_known_args(raw)
    if extras:
        _unrecognized(args._parser, extras)
    args.argv = raw[1:]  # the options after the command (reports quote the command line)
    try:
        return int(args.func(args))
    except SymgradError as err:
        message = " ".join(str(err).split())  # one line
        print(f"symgrad {args._name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"symgrad {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
