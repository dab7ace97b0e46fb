"""Comparing two jobs' results: the ``diff`` report (diffguide.repro.diff) and a heatmap."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from fastapi import HTTPException

from .files import finished_folder, image_path

if TYPE_CHECKING:
    from .worker import Worker


def _latents(worker: Worker, job_id: str, index: int) -> torch.Tensor:
    from safetensors.torch import load_file

    latents = load_file(str(finished_folder(worker, job_id) / "latents.safetensors"))["latents"]
    if not 0 <= index < latents.shape[0]:
        raise HTTPException(404, f"job '{job_id}' has no image {index}")
    return latents[index]


def _pixels(worker: Worker, job_id: str, index: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(image_path(worker, job_id, index)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def compare_jobs(worker: Worker, a: str, b: str, index: int) -> dict[str, Any]:
    """Latents and pixels of image ``index`` of job ``a`` against job ``b`` (the reference)."""
    from ..repro.diff import compare

    la, lb = _latents(worker, a, index), _latents(worker, b, index)
    pa, pb = _pixels(worker, a, index), _pixels(worker, b, index)
    latents = compare(la, lb, name="latents")
    pixels = compare(pa, pb, rtol=0.0, atol=1 / 255 / 2, name="pixels")
    return {
        "a": a,
        "b": b,
        "image": index,
        "identical": bool(torch.equal(la, lb) and torch.equal(pa, pb)),
        "latents": latents.to_dict(),
        "pixels": pixels.to_dict(),
    }


def heatmap_png(worker: Worker, a: str, b: str, index: int) -> bytes:
    """Per-pixel max |a - b| over channels, scaled to the largest difference (black: equal;
    then red to yellow to white), nearest-neighbour upscaled to at least 256 pixels."""
    from PIL import Image

    pa, pb = _pixels(worker, a, index), _pixels(worker, b, index)
    if pa.shape != pb.shape:
        raise HTTPException(
            409, f"images of different sizes: {tuple(pa.shape[1:])} and {tuple(pb.shape[1:])}"
        )
    diff = (pa - pb).abs().amax(dim=0)
    peak = float(diff.max())
    v = diff / peak if peak > 0 else diff
    rgb = torch.stack([(v * 3).clamp(0, 1), (v * 3 - 1).clamp(0, 1), (v * 3 - 2).clamp(0, 1)], dim=-1)
    image = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), "RGB")
    scale = max(1, 256 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
