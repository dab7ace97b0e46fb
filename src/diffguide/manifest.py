"""Run manifests: everything needed to reproduce an image, and hashes to check it.

A manifest is a JSON-able dict: parameters, per-image seeds, noise policy, scheduler and its
sigmas, a hash per model component and LoRA, conditioning hashes, dtype, device, attention
backend, thread count, determinism flags and library versions.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from typing import Any

import torch
from torch import nn

MANIFEST_VERSION = 1


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tensor_hash(*tensors: torch.Tensor | None) -> str:
    """SHA-256 (first 16 hex digits) of tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def module_hash(module: nn.Module) -> str:
    """Hash of a module's state dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_hash(t).encode())
    return h.hexdigest()[:16]


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            n: _version(n) for n in ("diffguide", "torch", "diffusers", "transformers", "peft", "safetensors")
        },
    }


def attention_backend(model: nn.Module) -> list[str]:
    """Names of the attention processor classes in use (e.g. AttnProcessor2_0)."""
    procs = getattr(model, "attn_processors", {})
    return sorted({type(p).__name__ for p in procs.values()})
