"""ComfyUI's CONDITIONING value, ``[[tensor, {"pooled_output": ..., ...}], ...]``, kept whole.

On disk: a .safetensors file with, for entry i, the tensor ``{i}.cond`` and every tensor of its
dict as ``{i}.{key}``; the dict's other values (numbers, strings, booleans, None, lists of them)
and which keys were tensors go to the file's metadata as JSON (``comfy_conditioning``), so nothing
of the dict is lost (a bare tensor saved as ``.pt`` and re-wrapped as ``[[tensor, {}]]`` drops,
for example, Qwen-Image's ``attention_mask``). ``.pt`` files are read only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from ..errors import DiffguideError
from ..io import replace_atomic
from ..models.denoiser import Conditioning

ComfyConditioning = list[list[Any]]  # [[Tensor, dict], ...]
META_KEY = "comfy_conditioning"


def _json_value(key: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise DiffguideError(
            f"conditioning metadata '{key}' is a {type(value).__name__}; only tensors and JSON values can be saved"
        ) from None
    return value


def check_comfy_conditioning(value: Any, what: str = "conditioning") -> ComfyConditioning:
    """``value`` as ComfyUI's [[tensor, dict], ...] form, or a one-line error."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DiffguideError(
            f"{what} must be ComfyUI's [[tensor, {{...}}], ...] form, got {type(value).__name__}"
        )
    out = []
    for i, entry in enumerate(value):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise DiffguideError(f"{what} entry {i} must be [tensor, {{...}}], got {type(entry).__name__}")
        tensor, meta = entry
        if not isinstance(tensor, Tensor) or not isinstance(meta, dict):
            raise DiffguideError(
                f"{what} entry {i} must be [tensor, dict], got [{type(tensor).__name__}, {type(meta).__name__}]"
            )
        out.append([tensor, dict(meta)])
    return out


def save_comfy_conditioning(
    path: str | Path, conditioning: Any, metadata: dict[str, str] | None = None
) -> Path:
    """Write ComfyUI-form conditioning (with every dict entry) atomically as .safetensors."""
    entries = check_comfy_conditioning(conditioning)
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise DiffguideError(f"conditioning is saved as .safetensors, not '{path.suffix}'")
    tensors: dict[str, Tensor] = {}
    described = []
    for i, (tensor, meta) in enumerate(entries):
        tensors[f"{i}.cond"] = tensor
        plain = {}
        keys = []
        for key, value in meta.items():
            if isinstance(value, Tensor):
                tensors[f"{i}.{key}"] = value
                keys.append(key)
            else:
                plain[key] = _json_value(key, value)
        described.append({"tensors": keys, "values": plain})
    meta_out = {**(metadata or {}), META_KEY: json.dumps(described)}
    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomic(path, save(data, metadata=meta_out))


def load_comfy_conditioning(path: str | Path) -> tuple[ComfyConditioning, dict[str, str]]:
    """ComfyUI-form conditioning and the file's other metadata."""
    path = Path(path)
    if not path.is_file():
        raise DiffguideError(f"conditioning file '{path}' does not exist")
    if path.suffix.lower() in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise DiffguideError(
                f"'{path}' holds arbitrary Python objects; .pt conditioning is read only with weights_only=True"
            ) from err
        return check_comfy_conditioning(obj, f"'{path}'"), {}
    if path.suffix.lower() != ".safetensors":
        raise DiffguideError(
            f"conditioning file '{path}' must be .safetensors (or .pt, read with weights_only=True)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = dict(f.metadata() or {})
    except Exception as err:
        raise DiffguideError(f"'{path}' is not a readable safetensors file: {err}") from err
    if META_KEY not in metadata:
        raise DiffguideError(
            f"'{path}' has no '{META_KEY}' metadata: not ComfyUI-form conditioning (save it with save_comfy_conditioning)"
        )
    try:
        described = json.loads(metadata.pop(META_KEY))
        entries = []
        for i, d in enumerate(described):
            meta = dict(d["values"])
            meta.update({k: tensors[f"{i}.{k}"] for k in d["tensors"]})
            entries.append([tensors[f"{i}.cond"], meta])
    except (KeyError, TypeError, ValueError) as err:
        raise DiffguideError(
            f"'{path}': malformed '{META_KEY}' metadata ({type(err).__name__}: {err})"
        ) from err
    return check_comfy_conditioning(entries, f"'{path}'"), metadata


def to_diffguide(entries: ComfyConditioning, what: str) -> Conditioning:
    """diffguide's Conditioning for one ComfyUI conditioning (one entry): ``embeds`` the tensor,
    ``mask`` its ``attention_mask``, ``pooled`` its ``pooled_output``; with SDXL's ``width`` /
    ``height`` keys, ``time_ids`` as ComfyUI builds them."""
    if len(entries) != 1:
        raise DiffguideError(
            f"{what}: {len(entries)} conditioning entries (combined/area conditioning) are not supported"
        )
    tensor, meta = entries[0]
    tensors: dict[str, Tensor] = {"embeds": tensor}
    if isinstance(meta.get("attention_mask"), Tensor):
        tensors["mask"] = meta["attention_mask"]
    if isinstance(meta.get("pooled_output"), Tensor):
        tensors["pooled"] = meta["pooled_output"]
        if "width" in meta or "height" in meta:  # SDXL's size conditioning (CLIPTextEncodeSDXL's keys)
            tensors["time_ids"] = sdxl_time_ids(meta, tensor.shape[0])
    return Conditioning(tensors=tensors)


def sdxl_time_ids(meta: dict[str, Any], batch: int) -> Tensor:
    """SDXL's ``time_ids`` (B, 6) from a conditioning dict, with ComfyUI's ``SDXL.encode_adm``
    defaults: ``[height, width, crop_h, crop_w, target_height, target_width]``, 768 when absent."""
    h, w = float(meta.get("height", 768)), float(meta.get("width", 768))
    values = [h, w, meta.get("crop_h", 0), meta.get("crop_w", 0), meta.get("target_height", h)]
    values.append(meta.get("target_width", w))
    return torch.tensor([[float(v) for v in values]]).expand(batch, 6).clone()


def describe_metadata(entries: ComfyConditioning) -> str:
    """The dict of each entry as JSON (tensors by shape), for manifests and ``comfy explain``."""
    out = []
    for _, meta in entries:
        out.append(
            {k: (f"tensor{list(v.shape)}" if isinstance(v, Tensor) else v) for k, v in sorted(meta.items())}
        )
    return json.dumps(out)
