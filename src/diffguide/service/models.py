"""Models by name from configured folders, and an LRU cache of loaded models under a memory budget."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import app
from ..defaults import DEFAULT_MODEL_NAME, default_model
from ..errors import ConfigError
from ..pipeline import GuidedPipeline
from .config import MB

TINY_VAE = "vae_tiny"  # a model folder's optional tiny autoencoder, for previews
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    """A model name: a folder name, never a path (no '/', no '..')."""
    if not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"model '{name[:80]}' is not a model name: use a name from GET /v1/models "
            "(letters, digits, '.', '_', '-'; no paths)"
        )
    return name


def find_models(dirs: tuple[Path, ...], bundled: bool) -> dict[str, Path]:
    """name -> diffusers folder: every sub-folder with a model_index.json, plus the bundled model."""
    found: dict[str, Path] = {}
    if bundled:
        found[DEFAULT_MODEL_NAME] = default_model()
    for folder in dirs:
        for sub in sorted(Path(folder).iterdir()):
            if (sub / "model_index.json").is_file() and _NAME.match(sub.name) and sub.name not in found:
                found[sub.name] = sub
    return found


def pipeline_bytes(pipe: GuidedPipeline) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules."""
    import torch

    total = 0
    for component in pipe.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for t in [*component.parameters(), *component.buffers()]:
                total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class CachedModel:
    name: str
    bytes: int


class ModelCache:
    """Loaded models, least recently used evicted first; the total never exceeds the budget.

    A job keeps its pipeline object while it runs, so evicting a model only drops the cache's
    reference (its weights are freed when the last job using it ends). Thread-safe.
    """

    def __init__(self, models: dict[str, Path], budget_mb: float, device: str = "cpu") -> None:
        self.models = models
        self.budget = int(budget_mb * MB)
        self.device = device
        self._loaded: OrderedDict[str, tuple[GuidedPipeline, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._tiny: dict[str, Any] = {}
        self.loads = 0
        self.evictions = 0

    def path(self, name: str) -> Path:
        check_model_name(name)
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigError(f"unknown model '{name}'; available: {known}")
        return self.models[name]

    def get(self, name: str, loras: tuple[tuple[str, float], ...] = ()) -> GuidedPipeline:
        """The model, with ``loras`` ((file, scale), in order) loaded as ``diffguide generate --lora``
        does: a model with LoRAs is its own cache entry (its own copy of the weights)."""
        path = self.path(name)
        key = name + "".join(f"+lora:{Path(f).stem}@{scale:g}" for f, scale in loras)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key][0]
            pipe = app.load_model(app.ModelRequest(str(path), device=self.device, loras=loras))
            size = pipeline_bytes(pipe)
            if size > self.budget:
                raise ConfigError(
                    f"model '{key}' needs {size / MB:.1f} MB, more than the model memory budget "
                    f"({self.budget / MB:.1f} MB)"
                )
            while self._loaded and self.used() + size > self.budget:
                self._loaded.popitem(last=False)
                self.evictions += 1
            self._loaded[key] = (pipe, size)
            self.loads += 1
            return pipe

    def tiny_vae(self, name: str) -> Any | None:
        """The model folder's tiny autoencoder (a diffusers ``AutoencoderTiny`` in its ``vae_tiny``
        sub-folder, e.g. TAESD) for previews, loaded once; None when it has none."""
        folder = self.path(name) / TINY_VAE
        if not (folder / "config.json").is_file():
            return None
        with self._lock:
            if name not in self._tiny:
                from diffusers import AutoencoderTiny

                self._tiny[name] = AutoencoderTiny.from_pretrained(folder).to(self.device).eval()
            return self._tiny[name]

    def used(self) -> int:
        return sum(size for _, size in self._loaded.values())

    def held(self) -> list[CachedModel]:
        """What the cache holds, least recently used first."""
        with self._lock:
            return [CachedModel(name, size) for name, (_, size) in self._loaded.items()]

    def describe(self) -> dict[str, Any]:
        held = self.held()
        return {
            "budget_bytes": self.budget,
            "used_bytes": sum(m.bytes for m in held),
            "loaded": [{"name": m.name, "bytes": m.bytes} for m in held],
        }
