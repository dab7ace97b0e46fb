"""A diffguide run -> a ComfyUI workflow (API format) that runs it: the inverse of :mod:`.translate`.

Only runs ComfyUI can express are written: the comfy noise policy, CFG first (no rescale, renorm
or window), then RescaleCFG right after it, CFGNorm / PAG terms with the default window, and
embedded guidance (a FluxGuidance node on both conditionings); anything else is a one-line
:class:`WorkflowError` saying what cannot be expressed. Conditioning is referenced as
``DiffguideLoadConditioning`` files (written with :func:`save_comfy_conditioning`), or as
``CLIPTextEncode`` of the prompts for a checkpoint with its own text encoder.
"""

from __future__ import annotations

from typing import Any

from ..guidance import CFG, PAG, CFGNorm, EmbeddedGuidance, RescaleCFG, Window
from ..pipeline import COMFY_SAMPLER_NAMES
from .graph import WorkflowError
from .translate import WorkflowRun


def _node(cls: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": cls, "inputs": inputs}


def to_workflow(run: WorkflowRun, conditioning_files: tuple[str, str] | None = None) -> dict[str, Any]:
    """The API-format workflow of ``run``; ``conditioning_files`` (positive, negative) names the
    ComfyUI-form conditioning files when the run has no prompts to encode."""
    cfg, spec = run.config, run.model
    if cfg.noise != "comfy":
        raise WorkflowError("only comfy-noise-policy runs can be written as a ComfyUI workflow")
    terms = list(cfg.guidance)
    first = terms.pop(0) if terms else None
    if not (isinstance(first, CFG) and first.rescale == 0 and not first.renorm and first.window == Window()):
        raise WorkflowError(
            "a ComfyUI workflow needs plain CFG (no rescale, renorm or window) as the first term"
        )
    nodes: dict[str, Any] = {}

    def add(node: dict[str, Any]) -> list[Any]:
        nid = str(len(nodes) + 1)
        nodes[nid] = node
        return [nid, 0]

    if spec.loader == "UNETLoader":
        dtype = {"float32": "default", "float16": "fp16", "bfloat16": "bf16"}[spec.dtype]
        model = add(_node("UNETLoader", unet_name=spec.path.name, weight_dtype=dtype))
    else:
        model = add(_node("CheckpointLoaderSimple", ckpt_name=spec.path.name))
    clip = [model[0], 1]
    for path, strength in spec.loras:
        model = add(_node("LoraLoaderModelOnly", model=model, lora_name=path.name, strength_model=strength))
    if cfg.comfy_sampling is not None:
        s = cfg.comfy_sampling
        if s.kind == "flux":
            raise WorkflowError(
                "a ModelSamplingFlux override is written by its width and height; not supported yet"
            )
        cls = "ModelSamplingAuraFlow" if s.multiplier == 1.0 else "ModelSamplingSD3"
        model = add(_node(cls, model=model, shift=s.shift))
    shape = run.latent_shape
    embedded = [t for t in terms if isinstance(t, EmbeddedGuidance)]
    terms = [t for t in terms if not isinstance(t, EmbeddedGuidance)]
    rescale = terms[0] if terms else None
    if isinstance(rescale, RescaleCFG) and rescale.window == Window():
        columns = shape[-1] if len(shape) == 5 else 0
        if rescale.columns != columns:
            raise WorkflowError(
                f"rescale_cfg columns {rescale.columns}: the RescaleCFG node on this latent takes {columns}"
            )
        model = add(_node("RescaleCFG", model=model, multiplier=rescale.multiplier))
        terms.pop(0)
    for t in terms:
        if isinstance(t, CFGNorm) and t.window == Window():
            model = add(_node("CFGNorm", model=model, strength=t.strength, pre_cfg=t.pre_cfg))
        elif isinstance(t, PAG) and t.layers == "mid" and t.window == Window():
            model = add(_node("PerturbedAttentionGuidance", model=model, scale=t.scale))
        else:
            raise WorkflowError(f"guidance term {t.describe()} has no ComfyUI node equivalent here")
    if run.conditioning is not None:
        if conditioning_files is None:
            raise WorkflowError("the run uses conditioning tensors: name their files (conditioning_files)")
        pos = add(_node("DiffguideLoadConditioning", file=conditioning_files[0]))
        neg = add(_node("DiffguideLoadConditioning", file=conditioning_files[1]))
    elif spec.loader == "CheckpointLoaderSimple" and len(set(cfg.prompts)) == 1:
        pos = add(_node("CLIPTextEncode", text=cfg.prompts[0], clip=clip))
        neg = add(_node("CLIPTextEncode", text=cfg.negative_prompts[0], clip=clip))
    else:
        raise WorkflowError("a ComfyUI workflow needs one prompt for the whole batch, or conditioning files")
    for t in embedded:
        pos = add(_node("FluxGuidance", conditioning=pos, guidance=t.scale))
        neg = add(_node("FluxGuidance", conditioning=neg, guidance=t.scale))
    size = {"width": cfg.width, "height": cfg.height, "batch_size": shape[0]}
    if len(shape) == 5:
        latent = add(_node("EmptyHunyuanLatentVideo", length=1, **size))
    else:
        latent = add(_node("EmptySD3LatentImage" if shape[1] == 16 else "EmptyLatentImage", **size))
    add(
        _node(
            "KSampler",
            model=model,
            seed=cfg.seed,
            steps=cfg.steps,
            cfg=first.scale,
            sampler_name=COMFY_SAMPLER_NAMES[cfg.scheduler],
            scheduler=cfg.schedule or "normal",
            positive=pos,
            negative=neg,
            latent_image=latent,
            denoise=1.0,
        )
    )
    return nodes
