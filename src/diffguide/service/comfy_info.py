"""ComfyUI's ``GET /object_info`` for the nodes ``diffguide serve``'s ``POST /prompt`` runs, and
its ``POST /upload/image`` (files kept under ``data_dir/comfy/input``, served by ``/view``).

Each node's entry has ComfyUI's ``node_info`` shape (``input`` with ``required`` / ``optional``,
``input_order``, ``output``, ``output_is_list``, ``output_name``, ``name``, ``display_name``,
``description``, ``python_module``, ``category``, ``output_node``); the inputs and outputs are
ComfyUI's (:mod:`diffguide.comfy_workflow.nodes`); a choice input lists only the values the
service accepts (its models as ``ckpt_name``, the samplers and schedules it runs).
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

from ..errors import DiffguideError
from ..io import replace_atomic

#: Nodes that name files or change the model's sampling: POST /prompt refuses them (the LoRA
#: loaders are served: their ``lora_name`` lists the files sent to ``POST /v1/uploads``).
REFUSED = (
    "UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader",
    "DiffguideLoadConditioning", "ConditioningZeroOut",
    "ModelSamplingAuraFlow", "ModelSamplingSD3", "ModelSamplingFlux",
    "LoadLatent",  # `comfy run` reads latent files; a /prompt job cannot name one (yet)
)  # fmt: skip
UPLOAD_TYPES = ("input", "temp")
#: Where ComfyUI's node declares other outputs than the workflow translator links (SaveImage).
_OUTPUTS = {"SaveImage": ("IMAGE",)}
#: Inputs that ComfyUI's node requires but the translator also accepts missing (older workflows).
_REQUIRED = {"SkipLayerGuidanceDiT": ("rescaling_scale",)}
_SAFE_NAME = re.compile(r"^[\w][\w .()+,-]{0,199}$")


def served_nodes() -> list[str]:
    from ..comfy_workflow.nodes import NODES

    return [n for n in NODES if n not in REFUSED]


def _choices(models: list[str], loras: list[str]) -> dict[str, list[str]]:
    from ..comfy_workflow.translate import SAMPLERS
    from ..sampling.comfy import COMFY_SCHEDULERS

    return {
        "ckpt_name": [f"{m}.safetensors" for m in models],
        "lora_name": list(loras),
        "sampler_name": list(SAMPLERS),
        "scheduler": list(COMFY_SCHEDULERS),
        "add_noise": ["enable"],
        "return_with_leftover_noise": ["disable"],
    }


def object_info(models: list[str], only: str | None = None, loras: list[str] | None = None) -> dict[str, Any]:
    """``{class_type: node_info}`` for every served node (or just ``only``; {} if not served);
    ``loras``: the uploaded files a LoRA loader's ``lora_name`` may name."""
    from ..comfy_workflow.nodes import NODES

    choices = _choices(models, loras or [])
    out = {}
    for name in served_nodes():
        if only is not None and name != only:
            continue
        node = NODES[name]
        outputs = list(_OUTPUTS.get(name, node.outputs))
        optional_names = set(node.optional) - set(_REQUIRED.get(name, ()))
        required = {k: _spec(k, t, choices) for k, t in node.inputs.items() if k not in optional_names}
        optional = {k: _spec(k, t, choices) for k, t in node.inputs.items() if k in optional_names}
        out[name] = {
            "input": {"required": required, **({"optional": optional} if optional else {})},
            "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
            "is_input_list": False,
            "output": outputs,
            "output_is_list": [False] * len(outputs),
            "output_name": outputs,
            "name": name,
            "display_name": name,
            "description": "run by diffguide serve",
            "python_module": "diffguide",
            "category": "diffguide",
            "output_node": name == "SaveImage",
            "has_intermediate_output": False,
            "search_aliases": [],
        }
    return out


def _spec(name: str, kind: str, choices: dict[str, list[str]]) -> list[Any]:
    if name in choices:
        return [choices[name], {}]
    return [kind, {"multiline": True} if name == "text" else {}]


def upload_image(
    folder: Path, data: bytes, filename: str, subfolder: str, kind: str, overwrite: bool
) -> dict[str, str]:
    """Store an uploaded image as ComfyUI does (a new name ``stem (i).ext`` unless ``overwrite``
    or the same bytes are already there); its ``{"name", "subfolder", "type"}``."""
    from PIL import Image

    if kind not in UPLOAD_TYPES:
        raise DiffguideError(f"upload type '{kind[:20]}' is not one of: {', '.join(UPLOAD_TYPES)}")
    if not _SAFE_NAME.match(filename) or ".." in filename:
        raise DiffguideError(f"'{filename[:80]}' is not a plain file name")
    if subfolder and (not all(_SAFE_NAME.match(p) for p in subfolder.split("/")) or ".." in subfolder):
        raise DiffguideError(f"subfolder '{subfolder[:80]}' is not a plain folder name")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception:
        raise DiffguideError(f"'{filename}' is not an image (PNG, JPEG, WebP, ...)") from None
    target = folder / kind / subfolder
    path = target / filename
    stem, dot, ext = filename.rpartition(".")
    stem, ext = (stem, dot + ext) if dot else (filename, "")
    i = 1
    while not overwrite and path.exists():
        if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
            break  # the same image: kept once (ComfyUI's duplicate check)
        path = target / f"{stem} ({i}){ext}"
        i += 1
    else:
        target.mkdir(parents=True, exist_ok=True)
        replace_atomic(path, data)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def uploaded(folder: Path, filename: str, subfolder: str, kind: str) -> Path | None:
    """An uploaded image's path for ``/view`` (None: no such upload)."""
    if kind not in UPLOAD_TYPES or not _SAFE_NAME.match(filename) or ".." in filename:
        return None
    if subfolder and (not all(_SAFE_NAME.match(p) for p in subfolder.split("/")) or ".." in subfolder):
        return None
    path = folder / kind / subfolder / filename
    return path if path.is_file() else None
