"""A diffguide run -> a ComfyUI workflow (API format) that runs it: the inverse of :mod:`.translate`.

Only runs ComfyUI can express are written: the comfy noise policy with the KSampler's knobs at
their defaults, CFG first (no rescale, renorm or window), then ComfyUI's CFG function (RescaleCFG
or CFGNorm pre_cfg) right after it, post-CFG CFGNorm / PAG (``mid``) terms with the default window
(PAG's ``post_cfg`` as the translation sets it), and embedded guidance (a FluxGuidance node on both
conditionings); anything else is a one-line :class:`WorkflowError` saying what cannot be expressed.
:func:`generate_workflow` is ``diffguide generate --save-workflow``. Conditioning is referenced as
``DiffguideLoadConditioning`` files (written with :func:`save_comfy_conditioning`), or as
``CLIPTextEncode`` of the prompts for a checkpoint with its own text encoder.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ..guidance import CFG, PAG, CFGNorm, EmbeddedGuidance, RescaleCFG, Window
from ..pipeline import COMFY_SAMPLER_NAMES, GenerateConfig
from .graph import WorkflowError
from .translate import ModelSpec, WorkflowRun

#: GenerateConfig fields a KSampler cannot set: a workflow runs them at their defaults.
_KNOBS = (
    "eta", "max_rows", "shift", "batch_invariant", "prefix_sharing", "compact_text", "s_churn", "s_tmin", "s_tmax",
    "s_noise", "ancestral_eta", "dynamic_thresholding",
)  # fmt: skip


def _check_knobs(cfg: GenerateConfig) -> None:
    defaults = {f.name: f.default for f in fields(GenerateConfig)}
    for name in _KNOBS:
        if getattr(cfg, name) != defaults[name]:
            raise WorkflowError(
                f"{name}={getattr(cfg, name)!r} has no ComfyUI KSampler input (a workflow runs it at "
                f"{defaults[name]!r})"
            )


def _node(cls: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": cls, "inputs": inputs}


def to_workflow(run: WorkflowRun, conditioning_files: tuple[str, str] | None = None) -> dict[str, Any]:
    """The API-format workflow of ``run``; ``conditioning_files`` (positive, negative) names the
    ComfyUI-form conditioning files when the run has no prompts to encode."""
    cfg, spec = run.config, run.model
    if cfg.noise != "comfy":
        raise WorkflowError("only comfy-noise-policy runs can be written as a ComfyUI workflow")
    _check_knobs(cfg)
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
    function = terms[0] if terms else None
    corrected = False  # a correction (CFG function, CFGNorm) precedes the next patch
    if isinstance(function, RescaleCFG) and function.window == Window():
        columns = shape[-1] if len(shape) == 5 else 0
        if function.columns != columns:
            raise WorkflowError(
                f"rescale_cfg columns {function.columns}: the RescaleCFG node on this latent takes {columns}"
            )
        model = add(_node("RescaleCFG", model=model, multiplier=function.multiplier))
        terms.pop(0)
        corrected = True
    elif isinstance(function, CFGNorm) and function.pre_cfg and function.window == Window():
        model = add(_node("CFGNorm", model=model, strength=function.strength, pre_cfg=True))
        terms.pop(0)
        corrected = True
    for t in terms:
        if isinstance(t, CFGNorm) and not t.pre_cfg and t.window == Window():
            model = add(_node("CFGNorm", model=model, strength=t.strength, pre_cfg=False))
            corrected = True
        elif isinstance(t, PAG) and t.layers == "mid" and t.window == Window() and t.adaptive_scale == 0.0:
            if t.post_cfg != corrected:  # the translation's rule (translate._terms)
                where = "after" if corrected else "before"
                raise WorkflowError(
                    f"guidance term {t.describe()}: here ComfyUI adds PAG's term {where} the corrections "
                    f"of the terms before it; post_cfg must be {corrected}"
                )
            model = add(_node("PerturbedAttentionGuidance", model=model, scale=t.scale))
        else:
            raise WorkflowError(
                f"guidance term {t.describe()} has no ComfyUI node equivalent at this place "
                "(ComfyUI computes RescaleCFG and CFGNorm pre_cfg as its CFG function, right after CFG)"
            )
    if run.conditioning is not None:
        if conditioning_files is None:
            raise WorkflowError("the run uses conditioning tensors: name their files (conditioning_files)")
        pos = add(_node("DiffguideLoadConditioning", file=conditioning_files[0]))
        neg = add(_node("DiffguideLoadConditioning", file=conditioning_files[1]))
    elif (
        spec.loader == "CheckpointLoaderSimple"
        and len(set(cfg.prompts)) == len(set(cfg.negative_prompts)) == 1
    ):
        pos = add(_node("CLIPTextEncode", text=cfg.prompts[0], clip=clip))
        neg = add(_node("CLIPTextEncode", text=cfg.negative_prompts[0], clip=clip))
    else:
        raise WorkflowError(
            "a ComfyUI workflow needs one prompt and one negative prompt for the whole batch, or conditioning files"
        )
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


def generate_workflow(
    pipeline: Any,
    config: GenerateConfig,
    model: Path,
    loras: tuple[tuple[str, float], ...] = (),
    dtype: str = "float32",
    conditioning: Any = None,
) -> dict[str, Any]:
    """The workflow of a ``diffguide generate`` run (``--save-workflow``): its single-file checkpoint
    (CheckpointLoaderSimple, resolved under ``checkpoints/`` when run back), LoRAs, terms, sampler,
    size and seed. A run a workflow cannot express is a one-line :class:`WorkflowError`."""
    if conditioning is not None:
        raise WorkflowError(
            "a run from --conditioning cannot be written as a workflow yet; encode the prompts with the model"
        )
    if not model.is_file():
        raise WorkflowError(
            f"'{model}' is a diffusers folder; a ComfyUI workflow loads a single-file checkpoint "
            "(CheckpointLoaderSimple): generate from the .safetensors file (with --config)"
        )
    if dtype != "float32":
        raise WorkflowError(
            f"--dtype {dtype}: CheckpointLoaderSimple runs the checkpoint in float32 here; use --dtype float32"
        )
    size = pipeline.default_size()
    width, height = config.width or size, config.height or size
    if width % 8 or height % 8 or min(width, height) < 16:
        raise WorkflowError(f"{width}x{height}: ComfyUI's empty latents need multiples of 8 >= 16")
    channels = pipeline.family.latent_shape(pipeline.pipe, 1, height, width)[1]
    shape = (len(config.prompts), channels, height // 8, width // 8)
    spec = ModelSpec("CheckpointLoaderSimple", model, "float32", tuple((Path(p), s) for p, s in loras))
    run = WorkflowRun(spec, replace(config, width=width, height=height), None, shape, "")
    return to_workflow(run)
