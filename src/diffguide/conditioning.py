"""Conditioning files: precomputed prompt embeddings with their metadata.

A conditioning file is a .safetensors file of named tensors (batch first):

| key | shape | needed by |
| --- | --- | --- |
| ``prompt_embeds`` | (B, L, D) | every model |
| ``negative_prompt_embeds`` | (B, L, D) | CFG |
| ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds`` | (B, P) | SDXL |
| ``time_ids`` / ``negative_time_ids`` | (B, 6) | SDXL |
| ``prompt_embeds_mask`` / ``negative_prompt_embeds_mask`` | (B, L) | Qwen-Image (text attention mask, 1 = token) |

plus string metadata (prompt, encoder, anything). ``.pt`` files are read only with
``torch.load(weights_only=True)`` and must hold the same dict. Nothing is filled in silently:
a model that needs pooled embeddings or time ids fails loudly when they are missing, and a
ComfyUI-style ``[[tensor, {}]]`` list is refused (that wrapping drops the metadata).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from .errors import DiffguideError
from .io import replace_atomic
from .manifest import file_hash
from .models.denoiser import Conditioning

#: File key (without ``negative_``) -> the Conditioning tensor name.
NAMES = {
    "prompt_embeds": "embeds",
    "pooled_prompt_embeds": "pooled",
    "time_ids": "time_ids",
    "prompt_embeds_mask": "mask",
}

KEYS = {
    "prompt_embeds": 3,
    "negative_prompt_embeds": 3,
    "pooled_prompt_embeds": 2,
    "negative_pooled_prompt_embeds": 2,
    "time_ids": 2,
    "negative_time_ids": 2,
    "prompt_embeds_mask": 2,
    "negative_prompt_embeds_mask": 2,
}


@dataclass(frozen=True)
class ConditioningFile:
    """Embeddings loaded from a file; ``path``/``sha256`` name the file (recorded in manifests,
    so replay can load it again), None when built in code."""

    cond: Conditioning
    uncond: Conditioning | None
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None

    def image(self, i: int, count: int) -> ConditioningFile:
        """The conditioning of image ``i`` of ``count`` (batch 1 serves every image)."""

        def pick(c: Conditioning) -> Conditioning:
            if c.batch not in (1, count):
                raise DiffguideError(f"conditioning has batch {c.batch}, but {count} images were asked for")
            return c if c.batch == 1 else c.rows(i, i + 1)

        return ConditioningFile(
            pick(self.cond),
            None if self.uncond is None else pick(self.uncond),
            self.metadata,
            self.path,
            self.sha256,
        )


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.exists():
        raise DiffguideError(f"conditioning file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except Exception as err:
            raise DiffguideError(f"'{path}' is not a readable safetensors file: {err}") from err
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise DiffguideError(
                f"'{path}' holds arbitrary Python objects; diffguide reads .pt files only with weights_only=True. "
                "Save a dict of tensors with safetensors instead."
            ) from err
        if isinstance(obj, (list, tuple)):
            raise DiffguideError(
                f"'{path}' holds a {type(obj).__name__} (ComfyUI-style [[tensor, {{}}]] wrapping?), which drops "
                f"the metadata; save a dict with keys {', '.join(KEYS)}"
            )
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise DiffguideError(f"'{path}' must hold a dict of named tensors, got {type(obj).__name__}")
        return dict(obj), {}
    raise DiffguideError(f"conditioning file '{path}' must be .safetensors (or .pt via weights_only)")


def _validate(tensors: dict[str, Tensor], path: Path) -> None:
    unknown = sorted(set(tensors) - set(KEYS))
    if unknown:
        raise DiffguideError(
            f"'{path}': unknown conditioning keys {unknown}; expected some of {sorted(KEYS)}"
        )
    if "prompt_embeds" not in tensors:
        raise DiffguideError(f"'{path}' has no 'prompt_embeds'")
    batch = tensors["prompt_embeds"].shape[0]
    for key, t in tensors.items():
        if t.ndim != KEYS[key] or t.shape[0] != batch:
            raise DiffguideError(
                f"'{path}': '{key}' has shape {tuple(t.shape)}; expected {KEYS[key]} dims with batch {batch}"
            )
    for a, b in (
        ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        ("time_ids", "negative_time_ids"),
        ("negative_prompt_embeds", "negative_prompt_embeds_mask"),
    ):
        if b in tensors and a not in tensors:
            raise DiffguideError(f"'{path}' has '{b}' but not '{a}'")
    for embeds in ("prompt_embeds", "negative_prompt_embeds"):
        mask = tensors.get(embeds.replace("embeds", "embeds_mask"))
        if mask is not None and mask.shape != tensors[embeds].shape[:2]:
            raise DiffguideError(
                f"'{path}': '{embeds}_mask' has shape {tuple(mask.shape)}; expected "
                f"{tuple(tensors[embeds].shape[:2])} (batch, tokens of '{embeds}')"
            )


def load_conditioning(path: str | Path) -> ConditioningFile:
    """Read and validate a conditioning file."""
    path = Path(path)
    tensors, metadata = _read(path)
    _validate(tensors, path)
    cond = Conditioning(tensors={n: tensors[k] for k, n in NAMES.items() if k in tensors})
    uncond = None
    if "negative_prompt_embeds" in tensors:
        named = {n: tensors[f"negative_{k}"] for k, n in NAMES.items() if f"negative_{k}" in tensors}
        if "time_ids" in tensors and "time_ids" not in named:  # one set of time ids serves both
            named["time_ids"] = tensors["time_ids"]
        uncond = Conditioning(tensors=named)
    return ConditioningFile(cond, uncond, metadata, str(path.resolve()), file_hash(str(path)))


def save_conditioning(
    path: str | Path, cond: Conditioning, uncond: Conditioning | None, metadata: dict[str, str] | None = None
) -> Path:
    """Write a conditioning file atomically."""
    path = Path(path)
    tensors = _file_keys(cond, "")
    if uncond is not None:
        tensors.update(_file_keys(uncond, "negative_"))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return replace_atomic(path, save(data, metadata=metadata or {}))


def _file_keys(c: Conditioning, prefix: str) -> dict[str, Tensor]:
    """The file's keys for ``c``'s tensors; a tensor the format has no key for is an error."""
    keys = {n: k for k, n in NAMES.items()}
    extra = sorted(set(c.tensors) - set(keys))
    if extra or c.shared:
        what = ", ".join(extra + sorted(c.shared))
        raise DiffguideError(
            f"conditioning files cannot hold '{what}' yet (known: {', '.join(NAMES.values())})"
        )
    return {prefix + keys[n]: t for n, t in c.tensors.items()}
