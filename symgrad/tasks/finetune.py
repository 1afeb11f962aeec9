"""The fine-tuning task, side by side with a PyTorch twin (``symgrad finetune``).

The recipe of the article the project grew from — pretrained body, new task head, small data:

1. **pre-train** an MLP (64-128-64-10, tanh) on 5,000 real MNIST digits brought to the 8×8
   format of scikit-learn's digits;
2. **fine-tune**: keep the body, replace the head with a fresh ``Linear(64, 10)``, optionally
   freeze the body, and train on ``k`` labelled examples per class of scikit-learn's digits;
3. **kept head**: the whole pretrained network, its MNIST head kept (both sides classify the
   digits 0–9), trained on the same ``k`` examples — transfer without a new head;
4. **from scratch**: the same network, freshly initialised, trained on the same ``k`` examples.

Every phase runs twice — symgrad, and a PyTorch twin from the same weights on the same batches
with the same optimizer — and the report gives both runs' losses, accuracies and times, and how
far apart they are (``max_loss_rel_diff`` over every step, ``max_param_rel_diff`` of the final
weights).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import nn, optim
from ..errors import SymgradError
from ..train import History, accuracy, fit
from .digits import few_shot_split, load_mnist_8x8, load_sklearn_digits


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of ``symgrad finetune`` (see ``symgrad finetune --help``)."""

    dtype: str = "float64"
    seed: int = 0
    labels_per_class: int = 1
    freeze_body: bool = False
    optimizer: str = "sgd"
    pretrain_epochs: int = 30
    epochs: int = 100
    batch_size: int = 64
    test_fraction: float = 0.5
    progress: bool = False


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
) -> PhaseResult:
    """Train ``model`` and its torch twin from the same weights; compare."""
    from .. import torch as twin_lib  # the only place torch is imported

    twin = twin_lib.to_torch(model)
    loss = nn.CrossEntropyLoss()
    opt = make_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    topt = twin_lib.twin_optimizer(opt, [p for p in twin.parameters() if p.requires_grad])
    start = time.perf_counter()
    history: History = fit(
        model,
        loss,
        opt,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    seconds = time.perf_counter() - start
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
    ours = np.asarray(history.step_losses)
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


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the four phases; returns the report (see the module docstring)."""
    if cfg.dtype not in ("float32", "float64"):
        raise SymgradError(f"dtype must be float32 or float64, got {cfg.dtype!r}")
    if cfg.labels_per_class < 1:
        raise SymgradError(f"--labels-per-class must be ≥ 1, got {cfg.labels_per_class}")
    dtype = np.dtype(cfg.dtype)
    rng = np.random.default_rng(cfg.seed)
    mnist_x, mnist_y = load_mnist_8x8()
    digits_x, digits_y = load_sklearn_digits()
    mnist_x = (mnist_x / 16.0).astype(dtype)
    digits_x = (digits_x / 16.0).astype(dtype)
    train_idx, test_idx = few_shot_split(
        digits_y, cfg.labels_per_class, cfg.test_fraction, cfg.seed
    )
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
        )
    ]

    snapshot = pretrained.state_dict()  # the fine-tune phase trains the shared body in place
    body = pretrained[: len(pretrained) - 1]
    if cfg.freeze_body:
        body.requires_grad_(False)
    finetuned = nn.Sequential(
        *[body[k] for k in range(len(body))], nn.Linear(64, 10, dtype=dtype, rng=rng)
    )
    phases.append(
        _phase("finetune", finetuned, cfg, few_x, few_y, cfg.epochs, few_batch, test_x, test_y)
    )
    # The same digits 0-9 on both sides, so the pretrained head can also be kept and trained on.
    # Its initialisation is overwritten; a separate generator leaves ``rng``'s draws unchanged.
    kept = make_mlp(dtype, np.random.default_rng(cfg.seed))
    kept.load_state_dict(snapshot)
    if cfg.freeze_body:
        kept[: len(kept) - 1].requires_grad_(False)
    phases.append(
        _phase("kept_head", kept, cfg, few_x, few_y, cfg.epochs, few_batch, test_x, test_y)
    )
    scratch = make_mlp(dtype, rng)
    phases.append(
        _phase("scratch", scratch, cfg, few_x, few_y, cfg.epochs, few_batch, test_x, test_y)
    )

    by_name = {p.name: p for p in phases}
    return {
        "config": cfg.__dict__,
        "train_examples": len(few_x),
        "test_examples": len(test_x),
        "max_loss_rel_diff": max(p.max_loss_rel_diff for p in phases),
        "max_param_rel_diff": max(p.max_param_rel_diff for p in phases),
        "symgrad_accuracy": by_name["finetune"].symgrad_accuracy,
        "torch_accuracy": by_name["finetune"].torch_accuracy,
        "kept_head_accuracy": by_name["kept_head"].symgrad_accuracy,
        "torch_kept_head_accuracy": by_name["kept_head"].torch_accuracy,
        "scratch_accuracy": by_name["scratch"].symgrad_accuracy,
        "torch_scratch_accuracy": by_name["scratch"].torch_accuracy,
        "pretrain_accuracy_on_digits": by_name["pretrain"].symgrad_accuracy,
        "phases": [p.__dict__ for p in phases],
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table, one row per phase."""
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
    lines.append(
        f"fine-tuned {100 * report['symgrad_accuracy']:.1f}% with a new head, "
        f"{100 * report['kept_head_accuracy']:.1f}% with the pretrained head kept, vs from scratch "
        f"{100 * report['scratch_accuracy']:.1f}% on {report['test_examples']} held-out digits "
        f"({report['train_examples']} labelled examples); largest differences from torch: "
        f"loss {report['max_loss_rel_diff']:.1e}, weights {report['max_param_rel_diff']:.1e}"
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


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
