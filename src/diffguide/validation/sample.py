"""``sample_validation``: validation images during training, on the model being trained.

The same code path as ``diffguide generate`` (:meth:`GuidedPipeline.generate` with a
:class:`GenerateConfig`, one image per prompt and seed), so image (prompt i, seed s) of any step
is exactly what ``diffguide generate -p PROMPT --seed s`` gives for those weights and settings.
Layout under ``out_dir``::

    step-000100/0-42.png        prompt 0, seed 42 (manifest in the PNG and in 0-42.json)
    step-000100/grid.png        every image of the step: a row per prompt, a column per seed
    step-000100/index.json      prompt index, prompt, seed, settings and file of every image
    steps-0.png                 prompt 0 over the training steps so far: a row per seed

A step folder is written complete under a temporary name, then renamed (never half-written,
never overwritten); ``steps-{i}.png`` is replaced atomically after each call.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..checks import is_int
from ..defaults import DEFAULTS
from ..engine import OutOfMemory, free_cached_memory, is_out_of_memory
from ..errors import ConfigError, DiffguideError
from ..io import _png_bytes, manifest_json, replace_atomic
from ..pipeline import GenerateConfig, GenerationResult, GuidedPipeline
from .components import assemble, plain_forward, unwrap
from .isolation import free_memory, training_untouched
from .memory import ExecutionView, MemoryOptions, applied
from .presets import FamilyDefaults, family_defaults
from .prompts import PromptSet, ValidationPrompt, prompt_set

STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class ValidationResult:
    step: int
    folder: Path
    images: list[Image.Image]  # in index order: prompt by prompt, seed by seed
    index: dict[str, Any]
    grid: Path
    latents: list[torch.Tensor] = field(default_factory=list)  # final latents per image (CPU)
    step_grids: dict[int, Path] = field(default_factory=dict)  # prompt index -> grid over steps


@dataclass(frozen=True)
class Job:
    prompt_index: int
    seed: int
    config: GenerateConfig
    where: str


def _pipeline(model: Any, components: Any) -> tuple[GuidedPipeline, list[nn.Module]]:
    """A fresh GuidedPipeline (fresh weight hashes) over the given objects, and every module involved."""
    wrappers: list[nn.Module] = [model] if isinstance(model, nn.Module) else []
    if isinstance(model, GuidedPipeline):
        gp = GuidedPipeline(model.pipe, source=model.source, loras=list(model.loras))
    elif hasattr(model, "components") and not isinstance(model, nn.Module):
        gp = GuidedPipeline(model)
    elif isinstance(model, nn.Module):
        if components is None:
            raise ConfigError("a bare model needs components= (vae, text encoders, tokenizers, scheduler)")
        parts = dict(components.components if hasattr(components, "components") else components)
        for attr in ("unet", "transformer"):
            parts.pop(attr, None)
        gp = GuidedPipeline(assemble(unwrap(model), parts))
    else:
        raise ConfigError(
            f"model must be a GuidedPipeline, a diffusers pipeline or a denoiser module, got {type(model).__name__}"
        )
    modules = [m for m in gp.pipe.components.values() if isinstance(m, nn.Module)]
    for m in modules:
        if any(p.is_meta for p in m.parameters()):
            raise ConfigError(
                f"the {type(m).__name__} has weights on the meta device (lazy init or an offload hook "
                "left in place): it cannot be sampled; load or materialise its weights first"
            )
    return gp, wrappers + modules


def _config(p: ValidationPrompt, seed: int, d: FamilyDefaults) -> GenerateConfig:
    try:
        return GenerateConfig.create(
            p.prompt,
            p.negative,
            num_images=1,
            guidance=d.guidance() if p.guidance is None else p.guidance,
            steps=d.steps if p.steps is None else p.steps,
            width=p.width,
            height=p.height,
            seed=seed,
            scheduler=p.scheduler or d.scheduler,
            shift=DEFAULTS.shift if p.shift is None else p.shift,
            eta=DEFAULTS.eta if p.eta is None else p.eta,
            **dict(p.knobs),
            dynamic_thresholding=p.dynamic_thresholding,
        )
    except ConfigError as err:
        raise ConfigError(f"{p.where}: {err}" if p.where else str(err)) from None


def plan(pset: PromptSet, defaults: FamilyDefaults) -> list[Job]:
    """One job per prompt and seed, all configs built (and checked) before any sampling."""
    jobs = []
    for i, p in enumerate(pset.prompts):
        for seed in p.seeds or (DEFAULTS.seed,):
            jobs.append(Job(i, seed, _config(p, seed, defaults), p.where))
    return jobs


def _run(
    gp: GuidedPipeline, job: Job, memory: MemoryOptions, offload_on_oom: bool, device: torch.device
) -> tuple[GenerationResult, dict[str, Any]]:
    """One image; out of memory: the engine halves the rows per forward down to one, then the model
    is offloaded (``offload_on_oom``), then the error is reported. Each step is recorded."""
    record: dict[str, Any] = {"options": memory.describe(), "escalation": []}
    try:
        with applied(gp.pipe, gp.model, memory, device):
            result = _on(gp, memory).generate(job.config)
    except Exception as err:
        if not (isinstance(err, OutOfMemory) or is_out_of_memory(err)):
            raise
        if memory.offload or not offload_on_oom:
            raise OutOfMemory(_oom_message(job, memory, offload_on_oom)) from None
        record["escalation"] = ["rows halved to 1", "model_cpu_offload"]
    else:
        return result, _rows(record, result)
    free_cached_memory(device)
    try:
        with applied(gp.pipe, gp.model, memory.offloaded(), device):
            result = _on(gp, memory.offloaded()).generate(job.config)
    except Exception as err:
        if not (isinstance(err, OutOfMemory) or is_out_of_memory(err)):
            raise
        raise OutOfMemory(_oom_message(job, memory.offloaded(), True)) from None
    record["options"] = memory.offloaded().describe()
    return result, _rows(record, result)


def _on(gp: GuidedPipeline, memory: MemoryOptions) -> GuidedPipeline:
    """``gp``, or with offload a view of it whose device is the execution device; the weight hashes
    are those taken before offloading (sequential offload parks weights on the meta device)."""
    if not memory.offload:
        return gp
    return GuidedPipeline(
        ExecutionView(gp.pipe), source=gp.source, loras=gp.loras, _hashes=gp.component_hashes()
    )


def _rows(record: dict[str, Any], result: GenerationResult) -> dict[str, Any]:
    fallbacks = result.manifests[0]["engine"]["out_of_memory_fallbacks"]
    if fallbacks and not record["escalation"]:
        record["escalation"] = [f"rows halved to {min(fallbacks.values())}"]
    return record


def _oom_message(job: Job, memory: MemoryOptions, offloaded: bool) -> str:
    tried = "one row per forward" + (" and model CPU offload" if offloaded else "")
    hint = "" if offloaded else "; pass offload_on_oom=True (or model_cpu_offload) to try offloading"
    return (
        f"out of memory sampling prompt {job.prompt_index} seed {job.seed} even with {tried}: "
        f"lower the size or sample in float16/bfloat16{hint}"
    )


def _step_folder(out_dir: Path, step: int) -> Path:
    folder = out_dir / f"step-{step:06d}"
    if folder.exists():
        raise DiffguideError(
            f"'{folder}' already exists; validation never overwrites a step: use a new step or out_dir"
        )
    return folder


def grid(images: Sequence[Sequence[Image.Image | None]]) -> Image.Image:
    """Rows of images (None: an empty cell) in cells of the largest image's size."""
    cells = [im for row in images for im in row if im is not None]
    w, h = max(im.width for im in cells), max(im.height for im in cells)
    cols = max(len(row) for row in images)
    out = Image.new("RGB", (cols * w, len(images) * h))
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            if im is not None:
                out.paste(im.convert("RGB"), (c * w, r * h))
    return out


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_step(
    folder: Path, jobs: list[Job], results: list[GenerationResult], index: dict[str, Any]
) -> Path:
    """All files of a step in a hidden temporary folder, then renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for job, result in zip(jobs, results, strict=True):
            stem = f"{job.prompt_index}-{job.seed}"
            manifest = result.manifests[0]
            (tmp / f"{stem}.json").write_text(manifest_json(manifest, indent=2) + "\n")
            (tmp / f"{stem}.png").write_bytes(_png_bytes(result.images[0], manifest))
        rows: dict[int, list[Image.Image]] = {}
        for job, result in zip(jobs, results, strict=True):
            rows.setdefault(job.prompt_index, []).append(result.images[0])
        (tmp / "grid.png").write_bytes(_png(grid(list(rows.values()))))
        (tmp / "index.json").write_text(manifest_json(index, indent=2) + "\n")
        try:
            os.rename(tmp, folder)  # fails when folder appeared meanwhile (non-empty) or exists
        except OSError:
            raise DiffguideError(f"'{folder}' already exists; validation never overwrites a step") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def step_grids(out_dir: Path, jobs: list[Job]) -> dict[int, Path]:
    """Per prompt: its images over every step folder so far (a row per seed), ``steps-{i}.png``."""
    steps = sorted(
        (int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )
    seeds: dict[int, list[int]] = {}
    for job in jobs:
        seeds.setdefault(job.prompt_index, []).append(job.seed)
    out = {}
    for i, ss in seeds.items():
        rows = []
        for s in ss:
            row: list[Image.Image | None] = []
            for _, folder in steps:
                path = folder / f"{i}-{s}.png"
                row.append(Image.open(path).convert("RGB") if path.exists() else None)
            rows.append(row)
        out[i] = replace_atomic(out_dir / f"steps-{i}.png", _png(grid(rows)))
    return out


def _check_step(step: Any) -> int:
    if not is_int(step) or step < 0:
        raise ConfigError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


def sample_validation(
    model: Any,
    prompts: Any,
    *,
    step: int,
    out_dir: str | os.PathLike[str],
    components: Mapping[str, Any] | Any | None = None,
    seeds: int | Sequence[int] | None = None,
    family: str | None = None,
    threads: int | None = None,
    memory: MemoryOptions | None = None,
    offload_on_oom: bool | None = None,
) -> ValidationResult:
    """Sample every (prompt, seed) of ``prompts`` with ``model`` as it is now; write and return them.

    ``model``: a :class:`GuidedPipeline`, a diffusers pipeline, or the denoiser being trained
    (UNet / transformer, possibly wrapped by peft, accelerate, DDP or torch.compile: used in place)
    with ``components`` (a mapping or a pipeline: vae, text encoders, tokenizers, scheduler).
    ``prompts``: a prompt file path, a :class:`PromptSet`, a prompt, or a list of prompts
    (strings, mappings with the prompt file's keys, or :class:`ValidationPrompt`). ``seeds``:
    for prompts without their own, one seed for all (int) or one per prompt (list). ``family``:
    the row of the defaults table (default: the file's ``family``, else the model's architecture).
    ``threads``: torch intra-op threads while sampling (restored after). ``memory``: memory
    options; ``offload_on_oom``: offload the model when out of memory at one row per forward
    (default: when the model is on an accelerator).

    Training state (RNG states, modes, requires_grad, grad mode, autocast, threads) is exactly as
    before on return, also when sampling fails; nothing is written for a step that fails.
    """
    step = _check_step(step)
    memory = memory or MemoryOptions()
    pset = prompt_set(prompts, seeds)
    out = Path(out_dir)
    folder = _step_folder(out, step)
    gp, modules = _pipeline(model, components)
    arch = family or pset.family or gp.family.architecture(gp.pipe)
    defaults = family_defaults(arch)
    jobs = plan(pset, defaults)
    device = next(gp.model.parameters()).device
    oom_offload = device.type != "cpu" if offload_on_oom is None else offload_on_oom
    results, records = [], []
    gp.component_hashes()  # the weights as they are now, before any offload hook
    with training_untouched(modules), plain_forward(gp.model):
        if threads is not None:
            torch.set_num_threads(threads)
        for job in jobs:
            result, record = _run(gp, job, memory, oom_offload, device)
            result.latents = result.latents.cpu()
            for m in result.manifests:
                m["validation"] = {
                    "step": step,
                    "prompt_index": job.prompt_index,
                    "defaults": arch,
                    "memory": record,
                }
            results.append(result)
            records.append(record)
    index = {
        "step": step,
        "family": gp.family.name,
        "architecture": gp.family.architecture(gp.pipe),
        "defaults": arch,
        "images": [
            {
                "prompt_index": job.prompt_index,
                "prompt": job.config.prompts[0],
                "seed": job.seed,
                "file": f"{job.prompt_index}-{job.seed}.png",
                "settings": {
                    k: v
                    for k, v in r.manifests[0]["parameters"].items()
                    if k not in ("prompts", "negative_prompts")
                },
                "negative_prompt": job.config.negative_prompts[0],
                "memory": rec,
            }
            for job, r, rec in zip(jobs, results, records, strict=True)
        ],
    }
    _write_step(folder, jobs, results, index)
    images, latents = [r.images[0] for r in results], [r.latents[0] for r in results]
    del results
    free_memory()
    return ValidationResult(step, folder, images, index, folder / "grid.png", latents, step_grids(out, jobs))


__all__ = ["Job", "ValidationResult", "grid", "plan", "sample_validation"]
