"""Fine-tuning a real pretrained transformer: all-MiniLM-L6-v2 on SMS spam, beside a PyTorch twin.

``symgrad finetune --task sms-minilm``.  symgrad's :class:`~symgrad.nn.BertEncoder` (every op an
index formula, every gradient derived) loads the MiniLM weights; a Hugging Face ``BertModel``
loads the same file (:mod:`symgrad.torch.bert`).  Both get the same fresh ``Linear(384, 2)``
head, the same minibatches (:func:`symgrad.train.batch_order`, each padded to its longest
message) and one AdamW with the same two parameter groups — the pretrained layers at ``lr``,
the fresh head at ``head_lr`` — and the same hyperparameters.  Levels:

* ``a`` — the encoder frozen: each side computes the pooled sentence embeddings once, then
  trains the head on them;
* ``b`` — the top encoder layer (attention, feed-forward, both layer norms) and the head
  trained; the frozen lower layers' outputs are computed once, per message, and cached;
* ``c`` — every layer trained (the embeddings stay frozen), from the tokens every step.

The report holds the agreement checked on one real batch in float64 before training
(``forward_rel_diff`` of the pooled embeddings, ``max_grad_rel_diff`` over every trainable
parameter), the per-step losses of both runs (``max_loss_rel_diff``), the final weights
(``max_param_rel_diff``), accuracy and spam F1 on the held-out 30 % for both, and the time per
epoch of both.  Dropout is off on both sides (symgrad does not model it).

The key projection's bias has a gradient of exactly 0 (softmax does not change when every score
of a row moves by the same amount); both sides compute rounding noise for it, and AdamW, which
divides by the gradient's own scale, turns that noise into steps of ±lr.  That tensor's weights
therefore drift apart by up to lr per step while every other tensor agrees to float32 rounding:
``param_rel_diff`` lists every tensor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import nn, optim
from ..api import builtin
from ..errors import SymgradError
from ..nn.bert import BertConfig, BertEncoder
from ..nn.tape import Tape
from ..train import batch_order
from .finetune import loss_rel_diff, param_rel_diff
from .sms import load_minilm_config, load_minilm_weights, load_sms, tokenize

LEVELS = {"a": 0, "b": 1, "c": 6}  # level → trained encoder layers (from the top)


@dataclass(frozen=True)
class MinilmConfig:
    """Options of ``symgrad finetune --task sms-minilm``."""

    level: str = "b"
    dtype: str = "float32"
    seed: int = 0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4  # the pretrained layers (and the head, at levels b and c)
    head_lr: float | None = None  # the fresh head; default: lr, or 1e-3 at level a
    weight_decay: float = 0.01
    max_length: int = 128
    limit: int | None = None  # the first `limit` training and test messages only (quick runs)
    check_batch: int = 8  # messages in the float64 agreement check before training


@dataclass
class _Data:
    ids: np.ndarray  # (n, T) padded to the longest message
    mask: np.ndarray
    labels: np.ndarray

    def subset(self, idx: np.ndarray) -> _Data:
        return _Data(self.ids[idx], self.mask[idx], self.labels[idx])

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``idx``, padded to their own longest message."""
        length = int(self.mask[idx].sum(axis=1).max())
        return self.ids[idx, :length], self.mask[idx, :length], self.labels[idx]


def _data(texts: Sequence[str], labels: np.ndarray, max_length: int) -> _Data:
    ids, mask = tokenize(list(texts), max_length=max_length)
    return _Data(ids, mask, np.asarray(labels, dtype=np.int64))


def _chunks(data: _Data, size: int = 64) -> list[np.ndarray]:
    """Index batches of similar lengths: cheap to pad when caching frozen outputs."""
    order = np.argsort(data.mask.sum(axis=1), kind="stable")
    return [order[k : k + size] for k in range(0, len(order), size)]


def f1_spam(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of the spam class (label 1)."""
    tp = int(np.sum((predicted == 1) & (labels == 1)))
    fp = int(np.sum((predicted == 1) & (labels == 0)))
    fn = int(np.sum((predicted == 0) & (labels == 1)))
    return 2 * tp / max(2 * tp + fp + fn, 1)


# -- the symgrad side ------------------------------------------------------------------------


class _Ours:
    """symgrad's encoder + head, with the frozen part's outputs cached per message."""

    def __init__(self, dtype: np.dtype, trained: int, seed: int) -> None:
        self.config = BertConfig.from_dict(load_minilm_config())
        self.encoder = BertEncoder(self.config, dtype=dtype)
        self.encoder.load_hf(load_minilm_weights(np.float32))
        self.head = nn.Linear(
            self.config.hidden_size, 2, dtype=dtype, rng=np.random.default_rng(seed)
        )
        self.linear = builtin("linear")
        self.loss = nn.CrossEntropyLoss()
        self.first = self.config.num_hidden_layers - trained  # the first trained layer
        self.encoder.requires_grad_(False)
        for layer in self.encoder.layers[self.first :]:
            layer.requires_grad_(True)
        self.dtype = dtype

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in [*self.encoder.parameters(), *self.head.parameters()] if p.requires_grad]

    def named_trainable(self) -> dict[str, np.ndarray]:
        """Trained weights in Hugging Face's names and shapes (the head as ``head.*``)."""
        trained = {n for n, p in self.encoder.named_parameters() if p.requires_grad}
        out = {n: v for n, v in self.encoder.hf_state_dict().items() if n in trained}
        out.update({f"head.{n}": v for n, v in self.head.state_dict().items()})
        return out

    def cache(self, data: _Data) -> list[np.ndarray]:
        """Per message: the pooled embedding (level a) or the hidden states entering the first
        trained layer, unpadded (level b); nothing to cache for level c."""
        cached: list[np.ndarray] = [np.empty(0)] * len(data.labels)
        if self.first == 0:
            return cached
        for idx in _chunks(data):
            ids, mask, _ = data.batch(idx)
            tape = Tape()
            hidden = self.encoder.encode(tape, ids, mask, layers=range(self.first))
            if self.first == self.config.num_hidden_layers:
                hidden = self.encoder.pool(tape, hidden, mask)
            for row, n in enumerate(idx):
                cached[n] = hidden[row] if hidden.ndim == 2 else hidden[row, : mask[row].sum()]
        return cached

    def logits(self, tape: Tape, data: _Data, cached: list[np.ndarray], idx: np.ndarray) -> Any:
        ids, mask, _ = data.batch(idx)
        layers = self.config.num_hidden_layers
        if self.first == layers:  # level a: the head on cached embeddings
            pooled = np.stack([cached[n] for n in idx])
        else:
            hidden = None
            if self.first > 0:
                hidden = np.zeros((len(idx), ids.shape[1], self.config.hidden_size), self.dtype)
                for row, n in enumerate(idx):
                    hidden[row, : len(cached[n])] = cached[n]
            top = self.encoder.encode(
                tape, ids, mask, layers=range(self.first, layers), hidden=hidden
            )
            pooled = self.encoder.pool(tape, top, mask)
        return tape.apply(self.linear, pooled, self.head.weight, self.head.bias)

    def step(self, data: _Data, cached: list[np.ndarray], idx: np.ndarray) -> float:
        tape = Tape()
        logits = self.logits(tape, data, cached, idx)
        loss, grad = self.loss.value_and_grad(logits, data.labels[idx])
        tape.backward(logits, grad)
        return loss

    def predict(self, data: _Data, cached: list[np.ndarray]) -> np.ndarray:
        out = np.empty(len(data.labels), dtype=np.int64)
        for idx in _chunks(data):
            out[idx] = np.argmax(self.logits(Tape(), data, cached, idx), axis=1)
        return out


def _optimizers(cfg: MinilmConfig, ours: _Ours, twin: Any) -> tuple[optim.AdamW, Any]:
    """One AdamW on each side (symgrad, torch), with two parameter groups: the pretrained
    layers at ``lr`` and the fresh head at ``head_lr`` (alone, at level a, it takes larger
    steps: 1e-3)."""
    from ..torch import twin_optimizer

    head_lr = cfg.head_lr if cfg.head_lr is not None else 1e-3 if cfg.level == "a" else cfg.lr
    encoder = [p for p in ours.encoder.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": encoder, "lr": cfg.lr}] if encoder else []
    groups.append({"params": ours.head.parameters(), "lr": head_lr})
    theirs = [*twin.layer_params, *twin.head_params] if encoder else list(twin.head_params)
    opt = optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, twin_optimizer(opt, theirs)


# -- the run ----------------------------------------------------------------------------------


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if b.size else 0.0


def _sides(level: str, dtype: np.dtype, seed: int) -> tuple[_Ours, Any]:
    from ..torch.sms import TwinRunner

    ours = _Ours(dtype, LEVELS[level], seed)
    twin = TwinRunner(ours.head.state_dict(), dtype, LEVELS[level])
    return ours, twin


def _twin_cache(twin: Any, data: _Data) -> list[Any]:
    cached: list[Any] = [None] * len(data.labels)
    for idx in _chunks(data):
        ids, mask, _ = data.batch(idx)
        for n, value in zip(idx, twin.cache(ids, mask), strict=True):
            cached[n] = value
    return cached


def agreement_check(level: str, data: _Data, seed: int = 0) -> dict[str, float]:
    """float64, on the messages of ``data`` as one batch: the pooled embeddings of both encoders,
    and the gradient of the mean cross-entropy for every trainable parameter of ``level``."""
    ours, twin = _sides(level, np.dtype(np.float64), seed)
    everything = np.arange(len(data.labels))
    ids, mask, labels = data.batch(everything)
    tape = Tape()
    pooled = ours.encoder.pool(tape, ours.encoder.encode(tape, ids, mask), mask)
    forward = _rel(pooled, twin.pooled(ids, mask))
    ours.step(data, ours.cache(data), everything)
    twin.step(ids, mask, labels, [c for c in _twin_cache(twin, data)])
    theirs = twin.grads()
    largest = max(float(np.max(np.abs(g))) for g in theirs.values())
    mine = {n: p.grad for n, p in ours.encoder.named_parameters() if p.requires_grad}
    mine.update({f"head.{n}": p.grad for n, p in ours.head.named_parameters()})
    worst = 0.0
    for name, want in theirs.items():
        got = np.asarray(mine[name]).reshape(want.shape)
        scale = max(float(np.max(np.abs(want))), 1e-6 * largest)  # exact zeros: key biases
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    return {"forward_rel_diff": forward, "max_grad_rel_diff": worst, "grad_tensors": len(theirs)}


def run(cfg: MinilmConfig, progress: bool = False) -> dict[str, Any]:
    """Fine-tune both sides; returns the report (see the module docstring)."""
    if cfg.level not in LEVELS:
        raise SymgradError(f"--level must be one of {sorted(LEVELS)}, got {cfg.level!r}")
    if cfg.dtype not in ("float32", "float64"):
        raise SymgradError(f"dtype must be float32 or float64, got {cfg.dtype!r}")
    dtype = np.dtype(cfg.dtype)
    split = load_sms(cfg.seed)
    n_train = len(split.train_labels) if cfg.limit is None else cfg.limit
    n_test = len(split.test_labels) if cfg.limit is None else cfg.limit
    train = _data(split.train_texts[:n_train], split.train_labels[:n_train], cfg.max_length)
    test = _data(split.test_texts[:n_test], split.test_labels[:n_test], cfg.max_length)

    check = agreement_check(cfg.level, train.subset(np.arange(cfg.check_batch)), cfg.seed)

    ours, twin = _sides(cfg.level, dtype, cfg.seed)
    opt, topt = _optimizers(cfg, ours, twin)
    start = time.perf_counter()
    ours_train, ours_test = ours.cache(train), ours.cache(test)
    ours_cache_s = time.perf_counter() - start
    start = time.perf_counter()
    twin_train, twin_test = _twin_cache(twin, train), _twin_cache(twin, test)
    twin_cache_s = time.perf_counter() - start

    ours_losses: list[float] = []
    twin_losses: list[float] = []
    ours_epoch_s: list[float] = []
    twin_epoch_s: list[float] = []
    for epoch in range(cfg.epochs):
        batches = batch_order(len(train.labels), cfg.batch_size, cfg.seed, epoch)
        t_ours = t_twin = 0.0
        for idx in _progress(batches, progress, f"epoch {epoch + 1}/{cfg.epochs}"):
            ids, mask, labels = train.batch(idx)
            t0 = time.perf_counter()
            ours_losses.append(ours.step(train, ours_train, idx))
            opt.step()
            opt.zero_grad()
            t1 = time.perf_counter()
            twin_losses.append(twin.step(ids, mask, labels, [twin_train[n] for n in idx]))
            topt.step()
            topt.zero_grad()
            t2 = time.perf_counter()
            t_ours += t1 - t0
            t_twin += t2 - t1
        ours_epoch_s.append(t_ours)
        twin_epoch_s.append(t_twin)

    ours_pred = ours.predict(test, ours_test)
    twin_pred = np.empty_like(ours_pred)
    for idx in _chunks(test):
        ids, mask, _ = test.batch(idx)
        twin_pred[idx] = twin.predict(ids, mask, [twin_test[n] for n in idx])
    theirs = twin.named_trainable()
    mine = ours.named_trainable()
    per_tensor = {
        n: param_rel_diff({n: mine[n].reshape(v.shape)}, {n: v}) for n, v in theirs.items()
    }
    param_diff = max(per_tensor.values(), default=0.0)
    loss_diff = loss_rel_diff(np.asarray(ours_losses), np.asarray(twin_losses))
    return {
        "task": "sms-minilm",
        "config": asdict(cfg),
        "train_messages": len(train.labels),
        "test_messages": len(test.labels),
        "trained_parameters": int(sum(p.data.size for p in ours.trainable())),
        "agreement_check_float64": check,
        "max_loss_rel_diff": loss_diff,
        "max_param_rel_diff": param_diff,
        "param_rel_diff": per_tensor,
        "symgrad_accuracy": float(np.mean(ours_pred == test.labels)),
        "torch_accuracy": float(np.mean(twin_pred == test.labels)),
        "symgrad_f1_spam": f1_spam(test.labels, ours_pred),
        "torch_f1_spam": f1_spam(test.labels, twin_pred),
        "symgrad_cache_seconds": ours_cache_s,
        "torch_cache_seconds": twin_cache_s,
        "symgrad_epoch_seconds": ours_epoch_s,
        "torch_epoch_seconds": twin_epoch_s,
        "epoch_time_ratio": float(np.median(ours_epoch_s) / np.median(twin_epoch_s))
        if cfg.epochs
        else None,
        "symgrad_losses": ours_losses,
        "torch_losses": twin_losses,
    }


def _progress(batches: list[np.ndarray], enabled: bool, desc: str) -> Any:
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=desc, leave=False)


def format_table(report: dict[str, Any]) -> str:
    """The report as a short text table."""
    cfg = report["config"]
    check = report["agreement_check_float64"]
    rows = [
        f"MiniLM-L6 on SMS spam, level {cfg['level']} ({report['trained_parameters']:,} trained "
        f"parameters), {cfg['dtype']}, {report['train_messages']} training / "
        f"{report['test_messages']} test messages, {cfg['epochs']} epoch(s)",
        f"{'':<22} {'symgrad':>10} {'torch':>10}",
        f"{'accuracy %':<22} {100 * report['symgrad_accuracy']:>10.2f} "
        f"{100 * report['torch_accuracy']:>10.2f}",
        f"{'spam F1':<22} {report['symgrad_f1_spam']:>10.4f} {report['torch_f1_spam']:>10.4f}",
        f"{'frozen-part cache s':<22} {report['symgrad_cache_seconds']:>10.2f} "
        f"{report['torch_cache_seconds']:>10.2f}",
    ]
    for n, (a, b) in enumerate(
        zip(report["symgrad_epoch_seconds"], report["torch_epoch_seconds"], strict=True)
    ):
        rows.append(f"{f'epoch {n + 1} s':<22} {a:>10.2f} {b:>10.2f}")
    if report["symgrad_losses"]:
        rows.append(
            f"{'final loss':<22} {report['symgrad_losses'][-1]:>10.5f} "
            f"{report['torch_losses'][-1]:>10.5f}"
        )
    rows.append(
        f"float64 check on one batch: forward {check['forward_rel_diff']:.1e}, gradients of "
        f"{check['grad_tensors']} tensors {check['max_grad_rel_diff']:.1e}; training run: loss "
        f"{report['max_loss_rel_diff']:.1e}, weights {report['max_param_rel_diff']:.1e}; "
        f"epoch time symgrad/torch {report['epoch_time_ratio']:.2f}"
        if report["epoch_time_ratio"] is not None
        else f"float64 check: forward {check['forward_rel_diff']:.1e}"
    )
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Both runs' per-step training losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(report["symgrad_losses"], label="symgrad", lw=1.6)
    ax.plot(report["torch_losses"], label="torch", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"MiniLM-L6, SMS spam, level {report['config']['level']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
