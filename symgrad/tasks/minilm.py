"""The main job: fine-tuning a real pretrained transformer — all-MiniLM-L6-v2 on SMS spam —
beside a PyTorch twin, as §5 of the article does it.

``symgrad finetune`` (``--task sms-minilm``, the default).  The article (《从零开始大模型开发与
微调：链式求导法则》, "Developing and fine-tuning large models from scratch: the chain rule",
§5) fine-tunes a pretrained BERT with a new classification head on labelled text: Adam, lr
2e-5, batch 16, 3 epochs, a train/validation/test split, one line per epoch (``Epoch 1, Train
Loss …, Train Acc …, Val Loss …, Val Acc …``) and scikit-learn's classification report on the
test set.  This task runs that recipe with symgrad, at lr 5e-5 (``lr``; ``--lr 2e-5`` is
the article's value): 2e-5 is the low end of the range the BERT authors recommend (2e-5 to
5e-5) and suits thousands of steps; on 256 training messages (48 steps) the model fine-tuned
at 2e-5 is no better than the frozen baseline below (96.09 % accuracy for both, spam F1 0.83
against 0.84), at 5e-5 it is clearly better (98.83 %, F1 0.95;
``benchmarks/RESULTS-mainjob.md``).  symgrad's :class:`~symgrad.nn.BertEncoder`
(every op an index formula, every gradient derived) loads the MiniLM weights; a Hugging Face
``BertModel`` loads the same file (:mod:`symgrad.torch.bert`).  Both get the same fresh
``Linear(384, 2)`` head, the same minibatches (:func:`symgrad.train.batch_order`, each padded
to its longest message) and the same optimizer (AdamW with weight decay 0, which is Adam's
update; two parameter groups: the pretrained layers at ``lr``, the fresh head at
``head_lr``).  Levels (which layers train):

* ``a`` — the encoder frozen: each side computes the pooled sentence embeddings once, then
  trains the head on them (lr 1e-3, 30 epochs: the head alone needs larger steps);
* ``b`` — the top encoder layer (attention, feed-forward, both layer norms) and the head
  trained; the frozen lower layers' outputs are computed once, per message, and cached;
* ``c`` (default) — every layer and the head trained (the embeddings stay frozen), from the
  tokens every step: the article's full fine-tuning.

Data: the 4,862 messages are split 70/30 into training and test sets (stratified, seeded); 10 %
of the training part is the validation set.  ``limit`` (default 128, so the default run takes
minutes on two cores) trains on a stratified sample of ``limit`` training messages, validates
on ``⌈limit/4⌉`` and tests on ``limit``; ``limit=None`` uses every message (3,063 / 340 / 1,459).

Beside the fine-tuned model the report holds a **frozen-encoder baseline** (levels b and c): the
pretrained encoder's pooled embeddings of the same training messages, computed by symgrad before
fine-tuning, and a new head trained on them with level a's recipe — what fine-tuning the encoder
adds.  It also holds the agreement with torch: checked on one real batch in float64 before
training (``forward_rel_diff`` of the pooled embeddings, ``max_grad_rel_diff`` over every
trainable tensor), the per-step losses of both float32 runs (``max_loss_rel_diff``), the final
weights (``param_rel_diff`` per tensor), accuracy and spam F1 on the test set for both, and the
training time per epoch of both.  Dropout is off on both sides (symgrad does not model it).

Tensors whose gradient is zero (to rounding) in the float64 check are listed in
``zero_gradient_tensors``.  One is known: each attention layer's key bias.  A query ``q``'s
scores are ``q·(k_j + b)/√d = q·k_j/√d + q·b/√d`` — the bias adds the same amount to every
score of the row, and softmax does not change when a row's scores all shift by the same amount;
so the loss does not depend on the key bias and its exact gradient is 0 (the float64 check
measures it at ~1e-18 of the largest gradient).  In float32 both sides compute rounding noise
for it instead (~1e-10, different on each side), and Adam, which divides a gradient by its own
running scale (plus ε = 1e-8), turns that noise into real steps of about 1 % of lr: that
tensor's weights drift apart while every other tensor agrees to float32 rounding.  The report
separates the two (``max_param_rel_diff_other`` leaves out the zero-gradient tensors).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from .. import nn, optim
from ..api import builtin
from ..compile import CompiledStep, compile_step
from ..errors import OptionError
from ..nn.bert import BertConfig, BertEncoder, SequenceClassifier
from ..nn.tape import Tape
from ..runtime.threads import serial
from ..train import batch_order
from .finetune import loss_rel_diff, param_rel_diff
from .progress import SILENT, Console
from .sms import load_minilm_config, load_minilm_weights, load_sms, stratified_split, tokenize

LEVELS = {"a": 0, "b": 1, "c": 6}  # level → trained encoder layers (from the top)
LEVEL_NAMES = {
    "a": "the head only, encoder frozen",
    "b": "the top layer and the head",
    "c": "all 6 layers and the head",
}
KEY_BIAS = "attention.self.key.bias"
KEY_BIAS_REASON = (
    "the key bias adds q·b/√d to every score of a query's row, and softmax does not change when "
    "a whole row shifts"
)


def default_epochs(level: str) -> int:
    """3 epochs (the article's), 30 at level a (the head alone: cheap epochs)."""
    return 30 if level == "a" else 3


@dataclass(frozen=True)
class MinilmConfig:
    """Options of ``symgrad finetune`` (``--task sms-minilm``); the defaults are the article's
    recipe (at lr 5e-5) on 128 training messages."""

    level: str = "c"
    dtype: str = "float32"
    seed: int = 0
    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5  # the pretrained layers (and the head, at levels b and c); article: 2e-5
    head_lr: float | None = None  # the fresh head; default: lr, or 1e-3 at level a
    weight_decay: float = 0.0  # AdamW with weight decay 0: Adam, as the article trains
    max_length: int = 128
    limit: int | None = 128  # training messages (⌈limit/4⌉ validation, limit test); None: all
    val_fraction: float = 0.1  # of the training part
    check_batch: int = 8  # messages in the float64 agreement check before training
    baseline: bool = True  # also train a head on the frozen encoder's embeddings (levels b, c)
    compiled: bool = True  # train through one compiled step (symgrad.compile), else the tape
    baseline_epochs: int = 30
    baseline_lr: float = 1e-3

    def validate(self) -> None:
        """An :class:`~symgrad.errors.OptionError` naming the first bad option."""
        if self.level not in LEVELS:
            raise OptionError(f"--level must be one of {sorted(LEVELS)}, got {self.level!r}")
        if self.dtype not in ("float32", "float64"):
            raise OptionError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("epochs", "batch_size", "check_batch", "baseline_epochs"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise OptionError(f"limit must be ≥ 1 (or None: every message), got {self.limit}")
        if self.seed < 0:
            raise OptionError(f"seed must be ≥ 0, got {self.seed}")
        if not 0.0 < self.val_fraction < 1.0:
            raise OptionError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        for name in ("lr", "baseline_lr"):
            if not getattr(self, name) > 0:
                raise OptionError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class _Data:
    ids: np.ndarray  # (n, T) padded to the longest message
    mask: np.ndarray
    labels: np.ndarray

    def subset(self, idx: np.ndarray) -> _Data:
        return _Data(self.ids[idx], self.mask[idx], self.labels[idx])

    def batch(
        self, idx: np.ndarray, length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``idx``, padded to their own longest message (or to ``length`` tokens: a
        data-parallel rank pads its rows as the whole global batch is padded)."""
        if length is None:
            length = int(self.mask[idx].sum(axis=1).max())
        return self.ids[idx, :length], self.mask[idx, :length], self.labels[idx]


def _data(texts: Sequence[str], labels: np.ndarray, max_length: int) -> _Data:
    ids, mask = tokenize(list(texts), max_length=max_length)
    return _Data(ids, mask, np.asarray(labels, dtype=np.int64))


def _chunks(data: _Data, size: int = 16) -> list[np.ndarray]:
    """Index batches of similar lengths, for the passes without training (caching, embedding,
    evaluating): each is padded to its own longest message, and attention costs the square of
    that length, so short batches of sorted messages waste little on padding."""
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

    def __init__(
        self, dtype: np.dtype, trained: int, seed: int, config: BertConfig | None = None
    ) -> None:
        """MiniLM-L6 with its pretrained weights; or (``config``: tests) an encoder of that
        shape whose weights the caller sets."""
        self.config = config or BertConfig.from_dict(load_minilm_config())
        self.encoder = BertEncoder(self.config, dtype=dtype)
        if config is None:
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
        self.last_logits = np.empty((0, 2), dtype)
        self.compiled: CompiledStep | None = None  # the training step, once compiled

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in [*self.encoder.parameters(), *self.head.parameters()] if p.requires_grad]

    def named_trainable(self) -> dict[str, np.ndarray]:
        """Trained weights in Hugging Face's names and shapes (the head as ``head.*``)."""
        trained = {n for n, p in self.encoder.named_parameters() if p.requires_grad}
        out = {n: v for n, v in self.encoder.hf_state_dict().items() if n in trained}
        out.update({f"head.{n}": v for n, v in self.head.state_dict().items()})
        return out

    def cache(self, data: _Data, chunks: Iterable[np.ndarray] | None = None) -> list[np.ndarray]:
        """Per message: the pooled embedding (level a) or the hidden states entering the first
        trained layer, unpadded (level b); nothing to cache for level c.  ``chunks``: the
        batches to compute (default :func:`_chunks`; a progress bar may wrap them)."""
        cached: list[np.ndarray] = [np.empty(0)] * len(data.labels)
        if self.first == 0:
            return cached
        for idx in _chunks(data) if chunks is None else chunks:
            ids, mask, _ = data.batch(idx)
            tape = Tape()
            hidden = self.encoder.encode(tape, ids, mask, layers=range(self.first))
            if self.first == self.config.num_hidden_layers:
                hidden = self.encoder.pool(tape, hidden, mask)
            for row, n in enumerate(idx):
                cached[n] = hidden[row] if hidden.ndim == 2 else hidden[row, : mask[row].sum()]
        return cached

    def model(self) -> SequenceClassifier:
        """The trained part as one module: the trained layers (on the cached frozen part's
        outputs) and the head."""
        return SequenceClassifier(self.encoder, self.head, self.first)

    def pooled(
        self,
        tape: Tape,
        data: _Data,
        cached: list[np.ndarray],
        idx: np.ndarray,
        length: int | None = None,
    ) -> Any:
        """The sentence embeddings ``(len(idx), 384)`` of messages ``idx``: the trained layers
        run on the cached frozen part (or the cached embeddings themselves, at level a)."""
        ids, mask, _ = data.batch(idx, length)
        layers = self.config.num_hidden_layers
        if self.first == layers:  # level a: the head on cached embeddings
            return np.stack([cached[n] for n in idx])
        hidden = None
        if self.first > 0:
            hidden = np.zeros((len(idx), ids.shape[1], self.config.hidden_size), self.dtype)
            for row, n in enumerate(idx):
                hidden[row, : len(cached[n])] = cached[n]
        top = self.encoder.encode(tape, ids, mask, layers=range(self.first, layers), hidden=hidden)
        return self.encoder.pool(tape, top, mask)

    def inputs(
        self, data: _Data, cached: list[np.ndarray], idx: np.ndarray, length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The compiled step's inputs for messages ``idx``: the token ids (level c), the cached
        frozen part padded (level b) or the cached embeddings (level a); the float mask."""
        ids, mask, _ = data.batch(idx, length)
        layers = self.config.num_hidden_layers
        x: np.ndarray = ids
        if self.first == layers:
            x = np.stack([cached[n] for n in idx])
        elif self.first > 0:
            x = np.zeros((len(idx), ids.shape[1], self.config.hidden_size), self.dtype)
            for row, n in enumerate(idx):
                x[row, : len(cached[n])] = cached[n]
        return x, mask.astype(self.dtype)

    def compile(self, opt: optim.Optimizer) -> CompiledStep:
        """The training step (forward, backward, ``opt``'s update) as one compiled function of
        :meth:`inputs` and the labels."""
        self.compiled = compile_step(self.model(), self.loss, opt)
        return self.compiled

    def train_step(self, data: _Data, cached: list[np.ndarray], idx: np.ndarray) -> float:
        """One compiled step (the update included) on messages ``idx``; the logits its forward
        computed are kept in ``last_logits``."""
        assert self.compiled is not None, "compile() first"
        x, mask = self.inputs(data, cached, idx)
        loss = self.compiled(x, mask, data.labels[idx])
        self.last_logits = self.compiled.output  # type: ignore[assignment]
        return loss

    def logits(
        self,
        tape: Tape,
        data: _Data,
        cached: list[np.ndarray],
        idx: np.ndarray,
        length: int | None = None,
    ) -> Any:
        pooled = self.pooled(tape, data, cached, idx, length)
        return tape.apply(self.linear, pooled, self.head.weight, self.head.bias)

    def step(
        self,
        data: _Data,
        cached: list[np.ndarray],
        idx: np.ndarray,
        weight: float = 1.0,
        length: int | None = None,
    ) -> float:
        """One forward and backward (gradients accumulate in the parameters), the loss
        cotangent scaled by ``weight`` (a data-parallel rank's share of the global batch); the
        batch's logits are kept in ``last_logits`` (the epoch line's training accuracy)."""
        tape = Tape()
        logits = self.logits(tape, data, cached, idx, length)
        loss, grad = self.loss.value_and_grad(logits, data.labels[idx])
        tape.backward(logits, grad if weight == 1.0 else grad * weight)
        self.last_logits = np.asarray(logits)
        return loss

    def evaluate(
        self, data: _Data, cached: list[np.ndarray], idx: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """``(summed cross-entropy, predictions)`` of messages ``idx``, without gradients."""
        logits = self.logits(Tape(), data, cached, idx)
        loss = self.loss.value_and_grad(logits, data.labels[idx])[0] * len(idx)
        return float(loss), np.argmax(logits, axis=1)


def _optimizers(cfg: MinilmConfig, ours: _Ours, twin: Any) -> tuple[optim.AdamW, Any]:
    """One AdamW on each side (symgrad, torch), with two parameter groups: the pretrained
    layers at ``lr`` and the fresh head at ``head_lr`` (alone, at level a, it takes larger
    steps: 1e-3).  Without a twin (``None``) the second is None."""
    from ..torch import twin_optimizer

    head_lr = cfg.head_lr if cfg.head_lr is not None else 1e-3 if cfg.level == "a" else cfg.lr
    encoder = [p for p in ours.encoder.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": encoder, "lr": cfg.lr}] if encoder else []
    groups.append({"params": ours.head.parameters(), "lr": head_lr})
    opt = optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if twin is None:
        return opt, None
    theirs = [*twin.layer_params, *twin.head_params] if encoder else list(twin.head_params)
    return opt, twin_optimizer(opt, theirs)


# -- the run ----------------------------------------------------------------------------------


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if b.size else 0.0


def _sides(level: str, dtype: np.dtype, seed: int, twin: bool = True) -> tuple[_Ours, Any]:
    """symgrad's side and (unless ``twin=False``: None) the Hugging Face twin."""
    from ..torch.sms import TwinRunner

    ours = _Ours(dtype, LEVELS[level], seed)
    if not twin:
        return ours, None
    return ours, TwinRunner(ours.head.state_dict(), dtype, LEVELS[level])


@dataclass
class StepWorkload:
    """The main job's training set-up as ``finetune --limit all`` builds it (float32), for the
    benchmarks that time or measure one side's step (``benchmarks/profile_minilm_step.py``,
    ``benchmarks/memory_minilm_step.py``): the training split, both sides and their optimizers,
    and one batch of the first epoch for each padded length (``by_length``)."""

    train: _Data
    ours: _Ours
    twin: Any
    opt: optim.AdamW
    twin_opt: Any
    by_length: dict[int, np.ndarray]

    def symgrad_step(self) -> Callable[[np.ndarray], object]:
        """symgrad's training step (compiled) on the messages ``idx``, as ``finetune`` runs it."""
        self.ours.compile(self.opt)
        cached = self.ours.cache(self.train)
        return lambda idx: self.ours.train_step(self.train, cached, idx)

    def torch_step(self) -> Callable[[np.ndarray], object]:
        """The twin's training step (forward, backward, AdamW) on the messages ``idx``."""
        cached = _twin_cache(self.twin, self.train)

        def step(idx: np.ndarray) -> None:
            ids, mask, labels = self.train.batch(idx)
            self.twin.step(ids, mask, labels, [cached[n] for n in idx])
            self.twin_opt.step()
            self.twin_opt.zero_grad()

        return step


def step_workload(level: str) -> StepWorkload:
    """:class:`StepWorkload` at ``level`` (``"b"`` or ``"c"``)."""
    cfg = MinilmConfig(level=level, limit=None)
    train = load_splits(cfg)["train"]
    ours, twin = _sides(level, np.dtype(np.float32), cfg.seed)
    opt, twin_opt = _optimizers(cfg, ours, twin)
    by_length: dict[int, np.ndarray] = {}
    for idx in batch_order(len(train.labels), cfg.batch_size, cfg.seed, 0):
        by_length.setdefault(train.batch(idx)[0].shape[1], idx)
    return StepWorkload(train, ours, twin, opt, twin_opt, by_length)


def _twin_cache(twin: Any, data: _Data, chunks: Iterable[np.ndarray] | None = None) -> list[Any]:
    cached: list[Any] = [None] * len(data.labels)
    for idx in _chunks(data) if chunks is None else chunks:
        ids, mask, _ = data.batch(idx)
        for n, value in zip(idx, twin.cache(ids, mask), strict=True):
            cached[n] = value
    return cached


def _evaluate_both(
    ours: _Ours,
    twin: Any,
    data: _Data,
    ours_cached: list[np.ndarray],
    twin_cached: list[Any],
    chunks: Iterable[np.ndarray],
) -> tuple[float, np.ndarray, float, np.ndarray]:
    """Mean cross-entropy and predictions of both sides over the messages of ``chunks`` (one
    chunk at a time on both sides, so a progress bar around ``chunks`` moves with the work)."""
    mine = np.empty(len(data.labels), dtype=np.int64)
    theirs = np.empty_like(mine)
    ours_total = twin_total = 0.0
    for idx in chunks:
        loss, mine[idx] = ours.evaluate(data, ours_cached, idx)
        ours_total += loss
        ids, mask, labels = data.batch(idx)
        twin_loss, theirs[idx] = twin.evaluate(ids, mask, labels, [twin_cached[n] for n in idx])
        twin_total += twin_loss
    n = max(len(data.labels), 1)
    return ours_total / n, mine, twin_total / n, theirs


ZERO_GRADIENT = 1e-12
"""A tensor whose float64 gradient is at most this fraction of the largest gradient (on both
sides) has a gradient of zero up to rounding."""


def agreement_check(level: str, data: _Data, seed: int = 0) -> dict[str, Any]:
    """float64, on the messages of ``data`` as one batch: the pooled embeddings of both encoders,
    and the gradient of the mean cross-entropy for every trainable parameter of ``level``.

    ``zero_gradient_tensors`` maps each tensor whose gradient is zero up to rounding on both
    sides (``max |grad| ≤ 1e-12 ×`` the largest) to that ratio (the larger side's).
    """
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
    largest_mine = max(float(np.max(np.abs(np.asarray(g)))) for g in mine.values())
    worst = 0.0
    zero: dict[str, float] = {}
    for name, want in theirs.items():
        got = np.asarray(mine[name]).reshape(want.shape)
        scale = max(float(np.max(np.abs(want))), 1e-6 * largest)  # exact zeros: key biases
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
        ratio = max(
            float(np.max(np.abs(want))) / largest, float(np.max(np.abs(got))) / largest_mine
        )
        if ratio <= ZERO_GRADIENT:
            zero[name] = ratio
    return {
        "forward_rel_diff": forward,
        "max_grad_rel_diff": worst,
        "grad_tensors": len(theirs),
        "zero_gradient_tensors": zero,
    }


def stratified_sample(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` of ``labels`` (all if ``n`` is ``None`` or too large), each
    class's share kept (largest remainders), drawn by a generator seeded with ``seed``."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - take), kind="stable")[: n - int(take.sum())]:
        take[k] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def load_splits(cfg: MinilmConfig) -> dict[str, _Data]:
    """The ``train``, ``val`` and ``test`` messages of ``cfg`` (see the module docstring),
    tokenized."""
    split = load_sms(cfg.seed)
    fit_idx, val_idx = stratified_split(split.train_labels, cfg.val_fraction, cfg.seed)
    parts = {
        "train": ([split.train_texts[i] for i in fit_idx], split.train_labels[fit_idx]),
        "val": ([split.train_texts[i] for i in val_idx], split.train_labels[val_idx]),
        "test": (split.test_texts, split.test_labels),
    }
    limits = {"train": cfg.limit, "val": None, "test": cfg.limit}
    if cfg.limit is not None:
        limits["val"] = math.ceil(cfg.limit / 4)
    out = {}
    for name, (texts, labels) in parts.items():
        pick = stratified_sample(labels, limits[name], cfg.seed)
        out[name] = _data([texts[i] for i in pick], labels[pick], cfg.max_length)
    return out


def _frozen_baseline(
    cfg: MinilmConfig,
    ours: _Ours,
    head: dict[str, np.ndarray],
    splits: dict[str, _Data],
    cached: dict[str, list[np.ndarray]],
    console: Console,
) -> dict[str, Any]:
    """Level a's recipe on the pretrained encoder, before fine-tuning: pooled embeddings of
    the training and test messages (symgrad), a fresh head (the fine-tuned run's initial head)
    trained on them with Adam; its test predictions."""
    from ..train import fit

    embeddings = {}
    jobs = {name: _chunks(splits[name]) for name in ("train", "test")}
    bar = console.counter(
        sum(len(c) for c in jobs.values()),
        f"frozen-encoder baseline: embedding {len(splits['train'].labels)} training and "
        f"{len(splits['test'].labels)} test messages · symgrad",
    )
    for name, chunks in jobs.items():
        data = splits[name]
        rows = np.empty((len(data.labels), ours.config.hidden_size), ours.dtype)
        for idx in chunks:
            rows[idx] = ours.pooled(Tape(), data, cached[name], idx)
            bar.update(1)
        embeddings[name] = rows
    bar.close()
    with console.phase(
        f"frozen-encoder baseline: training a new head on the embeddings (Adam lr "
        f"{cfg.baseline_lr:g}, {cfg.baseline_epochs} epochs)"
    ):
        model = nn.Sequential(nn.Linear(ours.config.hidden_size, 2, dtype=ours.dtype))
        model[0].load_state_dict(head)
        fit(
            model,
            nn.CrossEntropyLoss(),
            optim.Adam(model.parameters(), lr=cfg.baseline_lr),
            embeddings["train"],
            splits["train"].labels,
            epochs=cfg.baseline_epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        predicted = np.argmax(model(embeddings["test"]), axis=1)
    labels = splits["test"].labels
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "f1_spam": f1_spam(labels, predicted),
        "epochs": cfg.baseline_epochs,
        "lr": cfg.baseline_lr,
    }


def _cache_side(
    label: str,
    cache: Any,
    splits: dict[str, _Data],
    console: Console,
) -> tuple[dict[str, list[Any]], float]:
    """One side's frozen-part cache of every split under one labelled bar; its seconds."""
    jobs = {name: _chunks(data) for name, data in splits.items()}
    bar = console.counter(sum(len(c) for c in jobs.values()), label)

    def ticking(chunks: list[np.ndarray]) -> Iterable[np.ndarray]:
        for idx in chunks:
            yield idx
            bar.update(1)

    start = time.perf_counter()
    cached = {name: cache(splits[name], ticking(chunks)) for name, chunks in jobs.items()}
    seconds = time.perf_counter() - start
    bar.close()
    return cached, seconds


def _correct(logits: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(np.argmax(logits, axis=1) == labels))


def run(cfg: MinilmConfig, console: Console = SILENT, world: Any = None) -> dict[str, Any]:
    """Fine-tune both sides; returns the report (see the module docstring).  ``console``
    receives the progress of every phase and the per-epoch lines.

    ``world`` (a :class:`symgrad.distributed.World`: ``symgrad finetune --nproc N`` or under
    ``torchrun``): symgrad's side trains data-parallel — each rank runs the step on its share
    of every global batch (padded as the whole batch is), the gradients summed across ranks in
    the compiled step's gradient hook (:meth:`symgrad.distributed.DataParallel.reduce_in`) —
    so the run is the one-process run to rounding.  Rank 0 alone runs the float64 check, the
    twin, the baseline, the validation and the test, and returns the report; another rank
    returns only its training losses (``{"task", "rank", "symgrad_losses"}``).
    """
    cfg.validate()
    dtype = np.dtype(cfg.dtype)
    main = world is None or world.is_main
    if not main:
        console = SILENT
    with console.phase("reading the SMS spam collection and tokenizing"):
        splits = load_splits(cfg)
    train, val, test = splits["train"], splits["val"], splits["test"]
    head_lr = cfg.head_lr if cfg.head_lr is not None else 1e-3 if cfg.level == "a" else cfg.lr
    console.say(
        f"Fine-tuning all-MiniLM-L6-v2 on SMS spam — {LEVEL_NAMES[cfg.level]} trained, Adam lr "
        f"{cfg.lr:g}{f' (head {head_lr:g})' if head_lr != cfg.lr else ''}, batch "
        f"{cfg.batch_size}, {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, {cfg.dtype}; "
        f"{len(train.labels)} training / {len(val.labels)} validation / {len(test.labels)} test "
        f"messages; a Hugging Face twin trains beside it on the same batches"
    )

    if world is not None:
        console.say(
            f"Data-parallel: symgrad trains on {world.world_size} processes (gloo), each "
            f"computing its share of every global batch of {cfg.batch_size}; rank 0 alone runs "
            "the twin, evaluates and reports"
        )

    n_check = min(cfg.check_batch, len(train.labels))
    check: dict[str, Any] = {}
    if main:
        # on one thread: these float64 kernels run once here, and the serial variants compile
        # far faster (from a cold cache the check took 108 s on 2 threads, 32 s on one); the
        # results are the same bits on any number of threads
        with console.phase(
            f"float64 check: {n_check} messages through both encoders, the gradient of every "
            f"trained tensor compared (a cold kernel cache compiles symgrad's kernels here)"
        ), serial():
            check = agreement_check(cfg.level, train.subset(np.arange(n_check)), cfg.seed)
    with console.phase(
        f"loading all-MiniLM-L6-v2 into symgrad's encoder and the Hugging Face twin ({cfg.dtype})"
    ):
        ours, twin = _sides(cfg.level, dtype, cfg.seed, twin=main)
        opt, topt = _optimizers(cfg, ours, twin)
        if cfg.compiled:
            ours.compile(opt)
        initial_head = {k: v.copy() for k, v in ours.head.state_dict().items()}

    frozen = (
        "the pooled embeddings of the frozen encoder"
        if ours.first == ours.config.num_hidden_layers
        else f"the outputs of frozen layers 1–{ours.first}"
    )
    ours_cache, ours_cache_s = _cache_side(
        f"caching {frozen} · symgrad", ours.cache, splits, console if ours.first else SILENT
    )
    twin_cache: dict[str, list[Any]] = {}
    twin_cache_s = 0.0
    if main:
        twin_cache, twin_cache_s = _cache_side(
            f"caching {frozen} · torch",
            lambda data, chunks: _twin_cache(twin, data, chunks),
            splits,
            console if ours.first else SILENT,
        )
    baseline = None
    if cfg.baseline and cfg.level != "a" and main:
        baseline = _frozen_baseline(cfg, ours, initial_head, splits, ours_cache, console)
    dp = None
    if world is not None:
        from ..distributed import DataParallel

        dp = DataParallel(
            ours.model(),
            opt,
            len(train.labels),
            cfg.batch_size,
            seed=cfg.seed,
            world=world,
            facts={"task": f"sms-minilm {asdict(cfg)}"},
        )
        if ours.compiled is not None:
            dp.reduce_in(ours.compiled)

    ours_losses: list[float] = []
    twin_losses: list[float] = []
    ours_epoch_s: list[float] = []
    twin_epoch_s: list[float] = []
    epochs: list[dict[str, Any]] = []
    val_chunks = _chunks(val)
    for epoch in range(cfg.epochs):
        batches = batch_order(len(train.labels), cfg.batch_size, cfg.seed, epoch)
        t_ours = t_twin = 0.0
        first = len(ours_losses)
        ours_right = twin_right = 0
        label = f"epoch {epoch + 1}/{cfg.epochs} · training both sides"
        for idx in console.bar(batches, label):
            ids, mask, labels = train.batch(idx)
            t0 = time.perf_counter()
            if dp is not None:
                value, right = _data_parallel_step(dp, ours, opt, train, ours_cache["train"], idx)
                ours_losses.append(value)
                ours_right += right
            elif cfg.compiled:
                ours_losses.append(ours.train_step(train, ours_cache["train"], idx))
            else:
                ours_losses.append(ours.step(train, ours_cache["train"], idx))
                opt.step()
                opt.zero_grad()
            if dp is None:
                ours_right += _correct(ours.last_logits, labels)
            t1 = time.perf_counter()
            t_ours += t1 - t0
            if twin is None:
                continue
            twin_losses.append(twin.step(ids, mask, labels, [twin_cache["train"][n] for n in idx]))
            topt.step()
            topt.zero_grad()
            t_twin += time.perf_counter() - t1
            twin_right += _correct(twin.last_logits, labels)
        ours_epoch_s.append(t_ours)
        twin_epoch_s.append(t_twin)
        if not main:
            continue
        bar = console.bar(val_chunks, f"epoch {epoch + 1}/{cfg.epochs} · validation, both sides")
        val_loss, val_pred, twin_val_loss, twin_val_pred = _evaluate_both(
            ours, twin, val, ours_cache["val"], twin_cache["val"], bar
        )
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(ours_losses[first:])),
            "train_acc": ours_right / len(train.labels),
            "val_loss": float(val_loss),
            "val_acc": float(np.mean(val_pred == val.labels)),
            "torch_train_loss": float(np.mean(twin_losses[first:])),
            "torch_train_acc": twin_right / len(train.labels),
            "torch_val_loss": float(twin_val_loss),
            "torch_val_acc": float(np.mean(twin_val_pred == val.labels)),
            "symgrad_seconds": t_ours,
            "torch_seconds": t_twin,
        }
        epochs.append(record)
        console.say(epoch_line(record))

    if dp is not None:
        dp.close()
    if not main:
        return {"task": "sms-minilm", "rank": world.rank, "symgrad_losses": ours_losses}
    bar = console.bar(_chunks(test), "test set · both sides")
    ours_test_loss, ours_pred, twin_test_loss, twin_pred = _evaluate_both(
        ours, twin, test, ours_cache["test"], twin_cache["test"], bar
    )
    theirs = twin.named_trainable()
    mine = ours.named_trainable()
    per_tensor = {
        n: param_rel_diff({n: mine[n].reshape(v.shape)}, {n: v}) for n, v in theirs.items()
    }
    zero = check["zero_gradient_tensors"]
    loss_diff = loss_rel_diff(np.asarray(ours_losses), np.asarray(twin_losses))
    return {
        "task": "sms-minilm",
        "config": asdict(cfg),
        "head_lr": head_lr,
        "train_messages": len(train.labels),
        "val_messages": len(val.labels),
        "test_messages": len(test.labels),
        "test_spam": int(np.sum(test.labels == 1)),
        "trained_parameters": int(sum(p.data.size for p in ours.trainable())),
        "agreement_check_float64": check,
        "max_loss_rel_diff": loss_diff,
        "max_param_rel_diff": max(per_tensor.values(), default=0.0),
        "max_param_rel_diff_other": max(
            (v for n, v in per_tensor.items() if n not in zero), default=0.0
        ),
        "param_rel_diff": per_tensor,
        "epochs": epochs,
        "symgrad_accuracy": float(np.mean(ours_pred == test.labels)),
        "torch_accuracy": float(np.mean(twin_pred == test.labels)),
        "symgrad_f1_spam": f1_spam(test.labels, ours_pred),
        "torch_f1_spam": f1_spam(test.labels, twin_pred),
        "symgrad_test_loss": float(ours_test_loss),
        "torch_test_loss": float(twin_test_loss),
        "baseline": baseline,
        "classification_report": classification_report(test.labels, ours_pred),
        "symgrad_cache_seconds": ours_cache_s,
        "torch_cache_seconds": twin_cache_s,
        "symgrad_epoch_seconds": ours_epoch_s,
        "torch_epoch_seconds": twin_epoch_s,
        "epoch_time_ratio": float(np.median(ours_epoch_s) / max(np.median(twin_epoch_s), 1e-12)),
        "symgrad_losses": ours_losses,
        "torch_losses": twin_losses,
    }


def _data_parallel_step(
    dp: Any, ours: _Ours, opt: optim.Optimizer, data: _Data, cached: list[Any], idx: np.ndarray
) -> tuple[float, int]:
    """One data-parallel step on the global batch ``idx``: this rank runs its rows, padded as
    the global batch is; returns the global batch's mean loss and its correct predictions
    (summed over ranks)."""
    shard = dp.sampler.shard(idx)
    rows = shard.indices
    length = int(data.mask[idx].sum(axis=1).max())  # the global batch's padding
    if ours.compiled is not None:
        x, mask = ours.inputs(data, cached, rows, length)
        value = dp.run_compiled(ours.compiled, shard, x, mask, data.labels[rows])
        ours.last_logits = ours.compiled.output  # type: ignore[assignment]
    else:
        value = dp.backward(shard, lambda r, w: ours.step(data, cached, r, w, length))
        opt.step()
    right = _correct(ours.last_logits, data.labels[rows]) if shard.weight > 0 else 0
    return value, round(dp.reducer.sum_scalar(float(right)))


# -- the report -------------------------------------------------------------------------------


def classification_report(labels: np.ndarray, predicted: np.ndarray) -> str:
    """scikit-learn's ``classification_report`` of ham/spam, 4 digits, as the article prints it."""
    from sklearn.metrics import classification_report as sk_report

    text: str = sk_report(
        labels, predicted, labels=[0, 1], target_names=["ham", "spam"], digits=4, zero_division=0
    )
    return text


def epoch_line(record: dict[str, Any]) -> str:
    """The article's per-epoch line for symgrad's run, and the twin's numbers beside it."""
    return (
        f"Epoch {record['epoch']}, Train Loss: {record['train_loss']:.4f}, Train Acc: "
        f"{record['train_acc']:.4f}, Val Loss: {record['val_loss']:.4f}, Val Acc: "
        f"{record['val_acc']:.4f}\n"
        f"         torch twin: Train Loss: {record['torch_train_loss']:.4f}, Train Acc: "
        f"{record['torch_train_acc']:.4f}, Val Loss: {record['torch_val_loss']:.4f}, Val Acc: "
        f"{record['torch_val_acc']:.4f}; training took {record['symgrad_seconds']:.1f} s "
        f"(symgrad) and {record['torch_seconds']:.1f} s (torch)"
    )


def drift_explanation(report: dict[str, Any]) -> str | None:
    """One line on the tensors whose drift has a known cause (an exact-zero gradient), or
    ``None`` when no such tensor drifts more than the others."""
    zero = report["agreement_check_float64"]["zero_gradient_tensors"]
    drift = report["param_rel_diff"]
    drifting = {n: drift[n] for n in zero if n in drift}
    if not drifting or max(drifting.values()) <= report["max_param_rel_diff_other"]:
        return None
    names = sorted(drifting)
    keys = [n for n in names if n.endswith(KEY_BIAS)]
    worst = max(drifting.values())
    largest = max(zero[n] for n in names)
    one = len(names) == 1
    what = (
        (
            "the key bias of 1 attention layer"
            if one
            else f"the key biases of the {len(keys)} attention layers"
        )
        if len(keys) == len(names)
        else ", ".join(names)
    )
    why = f" ({KEY_BIAS_REASON})" if len(keys) == len(names) else ""
    return (
        f"Why the weights differ by {worst:.1e}: only {what} drift{'s' if one else ''} apart. "
        f"{'Its' if one else 'Their'} exact gradient is 0{why}: the float64 check measured it at "
        f"≤ {largest:.0e} of the largest gradient on both sides. Each side computes rounding "
        "noise instead, different on each side, and Adam, which divides a gradient by its own "
        "running scale, turns that noise into real steps."
    )


def format_report(report: dict[str, Any]) -> str:
    """The classification report and the headline, as ``symgrad finetune`` prints them."""
    cfg = report["config"]
    check = report["agreement_check_float64"]
    rows = [
        "",
        f"Test set: {report['test_messages']} held-out messages ({report['test_spam']} spam), "
        "never trained or validated on. scikit-learn's classification report of symgrad's "
        "fine-tuned model:",
        "",
        report["classification_report"].rstrip(),
        "",
        f"Headline — all-MiniLM-L6-v2 fine-tuned on SMS spam ({LEVEL_NAMES[cfg['level']]}, "
        f"{report['trained_parameters']:,} parameters; Adam lr {cfg['lr']:g}, batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''} on "
        f"{report['train_messages']} messages; {cfg['dtype']}), on the "
        f"{report['test_messages']} test messages:",
        f"  {'':<40} {'accuracy':>9} {'spam F1':>8}",
        f"  {'symgrad, fine-tuned':<40} {100 * report['symgrad_accuracy']:>7.2f} % "
        f"{report['symgrad_f1_spam']:>8.4f}",
        f"  {'torch twin, fine-tuned':<40} {100 * report['torch_accuracy']:>7.2f} % "
        f"{report['torch_f1_spam']:>8.4f}",
    ]
    base = report.get("baseline")
    if base is not None:
        rows.append(
            f"  {'frozen encoder + new head (baseline)':<40} "
            f"{100 * base['accuracy']:>7.2f} % {base['f1_spam']:>8.4f}"
        )
    other = report["max_param_rel_diff_other"]
    explained = drift_explanation(report)
    weights = f"weights within {other:.1e}" + (
        f" (all but the key biases; those {report['max_param_rel_diff']:.1e}, see below)"
        if explained
        else ""
    )
    rows += [
        f"  symgrad vs torch: float64 gradients of {check['grad_tensors']} tensors within "
        f"{check['max_grad_rel_diff']:.1e} and pooled embeddings within "
        f"{check['forward_rel_diff']:.1e} (relative); the {cfg['dtype']} run's per-step losses "
        f"within {report['max_loss_rel_diff']:.1e}, {weights}",
        f"  training time per epoch (median): symgrad {median(report['symgrad_epoch_seconds']):.1f}"
        f" s, torch {median(report['torch_epoch_seconds']):.1f} s — symgrad takes "
        f"{report['epoch_time_ratio']:.2f}× torch's time",
    ]
    if explained:
        rows.append(f"  {explained}")
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Both runs' per-step training losses, and each epoch's validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(report["symgrad_losses"], label="symgrad, training batches", lw=1.6)
    ax.plot(report["torch_losses"], label="torch twin, training batches", lw=0.8, ls="--")
    steps = len(report["symgrad_losses"]) / max(len(report["epochs"]), 1)
    ends = [steps * e["epoch"] - 1 for e in report["epochs"]]
    ax.plot(ends, [e["val_loss"] for e in report["epochs"]], "o", label="symgrad, validation")
    ax.plot(ends, [e["torch_val_loss"] for e in report["epochs"]], "x", label="torch, validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    cfg = report["config"]
    ax.set_title(f"MiniLM-L6 on SMS spam, level {cfg['level']} ({LEVEL_NAMES[cfg['level']]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(report: dict[str, Any]) -> str:
    """The report as JSON text."""
    return json.dumps(report, indent=1) + "\n"
