"""Run a ComfyUI workflow with diffguide and get ComfyUI's tensors.

>>> run = load("workflow_api.json", models="ComfyUI/models")        # doctest: +SKIP
>>> result = execute(run)                                            # doctest: +SKIP
>>> result.latents.shape       # ComfyUI's LATENT, e.g. [1, 16, 1, h, w]  # doctest: +SKIP

:func:`load` reads the workflow (API or UI format), checks it (one-line :class:`WorkflowError`
naming node id and class) and translates it into one :class:`WorkflowRun` (model file + LoRAs,
a :class:`~diffguide.pipeline.GenerateConfig` with the comfy noise policy, conditioning);
nothing is loaded until :func:`execute`. See docs/comfyui.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffguideError
from ..sampling.comfy import ComfyShift
from .conditioning import load_comfy_conditioning, save_comfy_conditioning
from .graph import WorkflowError, read_workflow
from .translate import ModelSpec, WorkflowRun, model_hash, translate
from .writer import to_workflow

__all__ = [
    "WorkflowError",
    "WorkflowResult",
    "WorkflowRun",
    "build_pipeline",
    "comfy_latent_out",
    "execute",
    "explain",
    "load",
    "load_comfy_conditioning",
    "save_comfy_conditioning",
    "to_workflow",
]

#: ComfyUI's Wan21 latent format (Qwen-Image): per-channel mean and std of the VAE latents.
WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
#: ComfyUI's SD3 latent format (the SD3 VAE's scaling and shift factors).
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609
#: ComfyUI's Flux latent format.
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


def load(
    path: str | Path,
    models: str | Path | None = None,
    conditioning: Mapping[str, str | Path] | None = None,
) -> WorkflowRun:
    """The diffguide run of the workflow file ``path``; model names resolve under ``models``
    (ComfyUI's models folder layout). ``conditioning``: {node id: ComfyUI-form conditioning file}
    replacing that node's output (a CLIPTextEncode whose text encoder diffguide cannot run)."""
    path = Path(path)
    graph = read_workflow(path)
    models_dir = None if models is None else Path(models)
    if models_dir is not None and not models_dir.is_dir():
        raise DiffguideError(f"models folder '{models_dir}' does not exist")
    overrides = {str(k): Path(v) for k, v in (conditioning or {}).items()}
    return translate(graph, models_dir, path.parent, overrides)


def explain(run: WorkflowRun) -> list[str]:
    """What the run is, in lines: model, patches, terms, schedule (sigmas after the shift), seeds,
    noise policy, conditioning and its metadata."""
    from ..sampling.comfy import ComfyFlowSampling, ComfyFluxSampling, comfy_sigmas

    cfg = run.config
    lines = list(run.explain)
    shift = cfg.comfy_sampling
    if shift is not None:  # the node's model sampling, whatever the model (execute checks the fit)
        ms = (
            ComfyFluxSampling(shift.shift)
            if shift.kind == "flux"
            else ComfyFlowSampling(shift.shift, shift.multiplier)
        )
        sigmas = comfy_sigmas(cfg.schedule or "normal", cfg.steps, model_sampling=ms)
        lines.append("sigmas (after the shift): " + ", ".join(f"{s:.6g}" for s in sigmas.tolist()))
    else:
        lines.append("sigmas: the model family's own ComfyUI model sampling (no ModelSampling node)")
    lines.append(
        f"noise: comfy policy: one CPU generator seeded {cfg.seed} draws the whole {list(run.latent_shape)} "
        "batch (torch.randn, as ComfyUI's prepare_noise)"
        + ("; euler_ancestral's per-step noise from seed + 1" if cfg.scheduler == "euler_a" else "")
    )
    return lines


@dataclass
class WorkflowResult:
    latents: torch.Tensor  # ComfyUI's LATENT["samples"] convention and shape
    result: Any  # the GenerationResult (model-space latents, manifests)


def build_pipeline(spec: ModelSpec, config: str | None = None) -> Any:
    """A GuidedPipeline for the model spec, LoRAs applied (in order, at their strengths)."""
    from ..pipeline import GuidedPipeline
    from .models import load_diffusion_model

    dtype = getattr(torch, spec.dtype)
    if spec.loader == "UNETLoader":
        gp = GuidedPipeline(load_diffusion_model(spec.path, dtype), source=str(spec.path))
    else:
        gp = GuidedPipeline.from_pretrained(spec.path, dtype=dtype, device="cpu", config=config)
    for path, strength in spec.loras:
        gp.load_lora(path, strength)
    return gp


def execute(
    run: WorkflowRun, pipeline: Any = None, *, config: str | None = None, callback: Any = None
) -> WorkflowResult:
    """Sample the run (on ``pipeline`` if given, else the model spec's); latents as ComfyUI returns
    them. ``callback``: a step callback, e.g. a :class:`~diffguide.repro.trace.TraceRecorder`."""
    gp = pipeline if pipeline is not None else build_pipeline(run.model, config)
    run = _native_sampling(gp, run)
    result = gp.generate(run.config, decode=False, conditioning=run.conditioning, callback=callback)
    for m in result.manifests:
        m["comfy_workflow"] = {"sampler_node": run.sampler_node, "files": model_hash(run.model)}
    return WorkflowResult(comfy_latent_out(gp, result.latents, run.latent_shape), result)


def _native_sampling(gp: Any, run: WorkflowRun) -> WorkflowRun:
    """Without a ModelSampling node, ComfyUI samples a guidance-distilled Flux with its
    ``ModelSamplingFlux`` default (shift 1.15), not the node's size-dependent shift that diffguide's
    Flux family assumes for ``generate --noise comfy``."""
    if run.config.comfy_sampling is not None or gp.family.name != "flux":
        return run
    if not getattr(gp.pipe.transformer.config, "guidance_embeds", False):
        return run  # schnell-like: ComfyUI's FluxSchnell flow shift 1, the family's own
    return replace(run, config=replace(run.config, comfy_sampling=ComfyShift("flux", 1.15)))


def comfy_latent_out(gp: Any, latents: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Model-space latents of ``gp``'s model -> ComfyUI's LATENT (``process_latent_out`` of its
    latent format: Qwen-Image's Wan21 mean/std per channel, SD's scale factor)."""
    x = latents.float()
    family = gp.family.name
    if family == "qwen-image":
        view = (1, 16, 1, 1, 1)
        mean = torch.tensor(WAN21_MEAN).view(view)
        std = torch.tensor(WAN21_STD).view(view)
        x = x.reshape(x.shape[0], 16, 1, *x.shape[-2:]) * std + mean
    elif family == "auraflow":  # ComfyUI's AuraFlow latent format is SDXL's
        from ..sampling.comfy import SDXL_SCALE_FACTOR

        x = x / SDXL_SCALE_FACTOR
    elif family == "sd":
        from ..sampling.comfy import SD_SCALE_FACTOR, SDXL_SCALE_FACTOR

        x = x / (SDXL_SCALE_FACTOR if gp.is_xl else SD_SCALE_FACTOR)
    elif family == "sd3":  # ComfyUI's SD3 latent format: x / scale + shift
        x = x / SD3_SCALE + SD3_SHIFT
    elif family == "flux":  # ComfyUI's Flux latent format (SD3's form, Flux's factors)
        x = x / FLUX_SCALE + FLUX_SHIFT
    else:
        raise DiffguideError(f"ComfyUI's latent format for {family} models is not mapped yet")
    # ComfyUI's empty-latent nodes make ``size // 8`` latents whatever the VAE; diffguide sizes runs
    # in pixels. They agree on every released model (VAE factor 8); on another factor (the bundled
    # tiny models: 4) the latent keeps the model's own spatial size at the workflow's pixel size,
    # the same run `diffguide serve`'s /prompt makes (docs/comfyui.md).
    return x.reshape(*shape[:-2], *latents.shape[-2:])
