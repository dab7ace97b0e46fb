"""Replay a run from its manifest and say whether the result is bit-identical.

The manifest holds the whole batch's parameters, so replay regenerates the same batch
(batch composition changes CPU arithmetic in the last bits) with the recorded thread count,
then compares the image's latents with the recorded latents hash, and the decoded pixels
with the saved PNG when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conditioning import ConditioningFile, load_conditioning
from ..errors import DiffguideError
from ..guidance.registry import term_from_dict
from ..manifest import tensor_hash
from ..pipeline import GenerateConfig, GuidedPipeline
from .diff import DiffReport, compare

REQUIRED = ("prompts", "negative_prompts", "guidance", "steps", "seed", "scheduler")


def config_from_manifest(manifest: dict[str, Any]) -> GenerateConfig:
    """The :class:`GenerateConfig` a manifest was made with: every recorded field of the config
    (older manifests lack newer fields, which keep their defaults)."""
    p = manifest.get("parameters", {})
    missing = [k for k in REQUIRED if k not in p]
    if missing:
        raise DiffguideError(f"manifest lacks {missing}; it was not written by a compatible diffguide")
    kwargs = {f.name: p[f.name] for f in fields(GenerateConfig) if f.name in p}
    kwargs.update(
        prompts=tuple(p["prompts"]),
        negative_prompts=tuple(p["negative_prompts"]),
        guidance=tuple(term_from_dict(d) for d in p["guidance"]),
    )
    cfg = GenerateConfig(**kwargs)
    cfg.validate()
    return cfg


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
    source = model or manifest.get("model", {}).get("source")
    if not source:
        raise DiffguideError("the manifest does not record the model path; pass --model")
    env = manifest.get("environment", {})
    dtype = getattr(torch, env.get("dtype", "float32"))
    pipe = GuidedPipeline.from_pretrained(source, dtype=dtype, device=device or env.get("device", "cpu"))
    for lora in manifest.get("model", {}).get("loras", []):
        pipe.load_lora(lora["path"], lora["scale"])
    return pipe


def _conditioning_file(manifest: dict[str, Any]) -> ConditioningFile | None:
    """The conditioning file a run was generated from (checked against its recorded hash), or None."""
    record = manifest.get("conditioning", {})
    if record.get("source") != "file":
        return None
    file = record.get("file") or {}
    if not file.get("path"):
        raise DiffguideError(
            "this image was generated from precomputed embeddings that the manifest does not name; "
            "it cannot be replayed"
        )
    if not Path(file["path"]).exists():
        raise DiffguideError(f"the run's conditioning file '{file['path']}' does not exist")
    loaded = load_conditioning(file["path"])
    if file.get("sha256") and loaded.sha256 != file["sha256"]:
        raise DiffguideError(
            f"the conditioning file '{file['path']}' changed since the run (sha256 {loaded.sha256}, "
            f"recorded {file['sha256']})"
        )
    return loaded


def replay(manifest: dict[str, Any], pipe: GuidedPipeline, png: str | Path | None = None) -> ReplayReport:
    """Regenerate the manifest's batch on ``pipe`` and compare image ``index`` with the record.

    A batch-invariant run sampled each image alone, so only image ``index`` is regenerated."""
    cfg = config_from_manifest(manifest)
    index = int(manifest.get("image", {}).get("index", 0))
    recorded = manifest.get("model", {}).get("hashes", {})
    loaded = pipe.component_hashes()
    mismatch = {k: (v, loaded.get(k, "missing")) for k, v in recorded.items() if loaded.get(k) != v}
    threads = int(manifest.get("environment", {}).get("threads", torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fallbacks = manifest.get("engine", {}).get("out_of_memory_fallbacks", {})
        schedule = {int(k): int(v) for k, v in fallbacks.items()}
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
        result = pipe.generate(cfg, decode=png is not None, rows_schedule=schedule, conditioning=conditioning)
    finally:
        torch.set_num_threads(before)
    row = 0 if cfg.batch_invariant else index  # the image's row in what was regenerated
    latents = result.latents[row : row + 1]
    actual = tensor_hash(latents)
    expected = manifest.get("output", {}).get("latents_hash")
    pixels = None
    if png is not None:
        from PIL import Image

        saved = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        mine = np.asarray(result.images[row].convert("RGB"), dtype=np.float64)
        pixels = compare(torch.from_numpy(mine), torch.from_numpy(saved), rtol=0.0, atol=0.0, name="pixels")
    identical = expected == actual and (pixels is None or pixels.ok)
    return ReplayReport(index, identical, expected, actual, mismatch, pixels, threads)
