"""Replay a run from its manifest and say whether the result is bit-identical.

The manifest holds the whole batch's parameters, so replay regenerates the same batch
(batch composition changes CPU arithmetic in the last bits) with the recorded thread count,
then compares the image's latents with the recorded latents hash, and the decoded pixels
with the saved PNG when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conditioning import ConditioningFile, load_conditioning
from ..errors import DiffguideError
from ..manifest import tensor_hash
from ..pipeline import GuidedPipeline
from .diff import DiffReport, compare
from .schema import config_from_manifest, validate_manifest

__all__ = ["ReplayReport", "config_from_manifest", "load_for_replay", "replay", "validate_manifest"]


@dataclass(frozen=True)
class ReplayReport:
    index: int
    identical: bool
    expected_hash: str | None
    actual_hash: str
    model_mismatch: dict[str, tuple[str, str]]  # component -> (recorded, loaded)
    pixels: DiffReport | None  # decoded image vs the saved PNG, when a PNG was given
    threads: int


def load_for_replay(
    manifest: dict[str, Any], model: str | None = None, device: str | None = None
) -> GuidedPipeline:
    spec = validate_manifest(manifest, device=device)  # every field checked before loading anything
    source = model or spec.source
    if not source:
        raise DiffguideError("the manifest does not record the model path; pass --model")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    pipe = GuidedPipeline.from_pretrained(source, dtype=dtype, device=spec.device)
    for path, scale in spec.loras:
        pipe.load_lora(path, scale)
    return pipe


def _conditioning_file(manifest: dict[str, Any]) -> ConditioningFile | None:
    """The conditioning file a run was generated from (checked against its recorded hash), or None."""
    record = manifest.get("conditioning")
    if not isinstance(record, dict) or record.get("source") != "file":
        return None
    file = record.get("file")
    path = file.get("path") if isinstance(file, dict) else None
    if not isinstance(path, str) or not path:
        raise DiffguideError(
            "this image was generated from precomputed embeddings that the manifest does not name "
            "(conditioning.file.path); it cannot be replayed"
        )
    if not Path(path).is_file():
        raise DiffguideError(f"the run's conditioning file '{path}' does not exist")
    loaded = load_conditioning(path)
    recorded = file.get("sha256") if isinstance(file, dict) else None
    if recorded and loaded.sha256 != recorded:
        raise DiffguideError(
            f"the conditioning file '{path}' changed since the run (sha256 {loaded.sha256}, recorded {recorded})"
        )
    return loaded


def replay(manifest: dict[str, Any], pipe: GuidedPipeline, png: str | Path | None = None) -> ReplayReport:
    """Regenerate the manifest's batch on ``pipe`` and compare image ``index`` with the record.

    A batch-invariant run sampled each image alone, so only image ``index`` is regenerated."""
    spec = validate_manifest(manifest, device=str(pipe.pipe.device))
    cfg, index = spec.config, spec.index
    loaded = pipe.component_hashes()
    mismatch = {k: (v, loaded.get(k, "missing")) for k, v in spec.hashes.items() if loaded.get(k) != v}
    threads = spec.threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        conditioning = _conditioning_file(manifest)
        if cfg.batch_invariant:  # image ``index`` was sampled alone: replay just that image
            if conditioning is not None:
                conditioning = conditioning.image(index, cfg.num_images)
            cfg = replace(
                cfg,
                prompts=(cfg.prompts[index],),
                negative_prompts=(cfg.negative_prompts[index],),
                seed=cfg.seed + index,
            )
        result = pipe.generate(
            cfg, decode=png is not None, rows_schedule=spec.fallbacks, conditioning=conditioning
        )
    finally:
        torch.set_num_threads(before)
    row = 0 if cfg.batch_invariant else index  # the image's row in what was regenerated
    latents = result.latents[row : row + 1]
    actual = tensor_hash(latents)
    expected = spec.latents_hash
    pixels = None
    if png is not None:
        from PIL import Image

        saved = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        mine = np.asarray(result.images[row].convert("RGB"), dtype=np.float64)
        pixels = compare(torch.from_numpy(mine), torch.from_numpy(saved), rtol=0.0, atol=0.0, name="pixels")
    identical = expected == actual and (pixels is None or pixels.ok)
    return ReplayReport(index, identical, expected, actual, mismatch, pixels, threads)
