"""The application layer: a typed request -> a run, independent of any front end.

The CLI (``diffguide generate``, ``check-determinism``), and the coming HTTP service and
trainer API, all go through these functions: build a :class:`ModelRequest` and a
:class:`~diffguide.pipeline.GenerateConfig` (itself validated), then :func:`load_model`,
:func:`dry_run_layers` (a bad layer spec fails here, before any sampling) and
:func:`generate`. Nothing here prints or exits; errors are :class:`DiffguideError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .conditioning import ConditioningFile, load_conditioning
from .errors import ConfigError
from .guidance.base import GuidanceTerm
from .pipeline import GenerateConfig, GenerationResult, GuidedPipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Models with fewer parameters run single-threaded on the CPU (threads cost more than they save).
SMALL_MODEL = 10_000_000


@dataclass(frozen=True)
class ModelRequest:
    """Which model to load and how: a diffusers folder or a single file (+ ``config`` folder)."""

    path: str
    dtype: str = "float32"
    device: str = "cpu"
    config: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (path, scale)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}'; one of: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: the model, the run's config, optional precomputed conditioning, threads."""

    model: ModelRequest
    config: GenerateConfig
    # a conditioning file, or one already loaded (used instead of encoding the prompts)
    conditioning: str | ConditioningFile | None = None
    threads: int | None = None  # None: torch's default (1 for small models on the CPU)


@dataclass(frozen=True)
class LayerChoice:
    """What a term's perturbation acts on: its spec (or preset) and the selected modules."""

    term: str
    spec: str | None
    modules: tuple[str, ...]


def load_model(req: ModelRequest) -> GuidedPipeline:
    """The pipeline with its LoRAs, on the requested device and dtype."""
    pipe = GuidedPipeline.from_pretrained(
        req.path, dtype=DTYPES[req.dtype], device=req.device, config=req.config
    )
    for path, scale in req.loras:
        pipe.load_lora(path, scale)
    return pipe


def set_threads(pipe: GuidedPipeline, threads: int | None) -> None:
    """``threads`` intra-op threads; None: one thread for a small model on the CPU, else unchanged."""
    if threads is not None:
        torch.set_num_threads(threads)
    elif pipe.pipe.device.type == "cpu" and sum(p.numel() for p in pipe.model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)


def dry_run_layers(pipe: GuidedPipeline, terms: tuple[GuidanceTerm, ...]) -> list[LayerChoice]:
    """Resolve every perturbation's layers on the model (a bad spec raises LayerSpecError)."""
    choices = []
    for term in terms:
        for branch in term.branches():
            pert = branch.perturbation
            if pert is not None:
                choices.append(LayerChoice(term.name, pert.layers, tuple(pert.targets(pipe.model))))
    return choices


def conditioning_of(req: GenerateRequest) -> ConditioningFile | None:
    if req.conditioning is None or isinstance(req.conditioning, ConditioningFile):
        return req.conditioning
    return load_conditioning(Path(req.conditioning))


def generate(
    req: GenerateRequest,
    pipe: GuidedPipeline | None = None,
    *,
    callback: Callable[[Any], None] | None = None,
    decode: bool = True,
) -> GenerationResult:
    """Run ``req`` (on ``pipe`` when given, e.g. a service keeping models loaded)."""
    pipe = pipe or load_model(req.model)
    set_threads(pipe, req.threads)
    dry_run_layers(pipe, req.config.guidance)
    return pipe.generate(req.config, callback=callback, decode=decode, conditioning=conditioning_of(req))
