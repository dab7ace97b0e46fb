"""A checked workflow graph -> one diffguide run (:class:`WorkflowRun`), without loading a model.

How each node maps (docs/comfyui.md has the table):

* ``UNETLoader`` / ``CheckpointLoaderSimple``: the model file (Qwen-Image, AuraFlow, SD3, FLUX.1
  transformers; SD1.5/SDXL single files) (``weight_dtype`` default = float32);
  ``LoraLoaderModelOnly`` / ``LoraLoader``: LoRAs in order, with their model strength;
* ``ModelSamplingAuraFlow`` / ``ModelSamplingSD3`` / ``ModelSamplingFlux``: a
  :class:`~diffguide.sampling.comfy.ComfyShift` (the last one applied wins, as in ComfyUI);
* ``CFGNorm``: a :class:`~diffguide.guidance.CFGNorm` term after CFG; ``PerturbedAttentionGuidance``
  a ``PAG`` term on the UNet's middle block (SD UNets only); ``RescaleCFG`` and ``CFGNorm``
  ``pre_cfg``: a term right after CFG (ComfyUI's CFG function; the last node wins); post-CFG
  patches in node order, a PAG / SLG after a correction ``post_cfg`` (:func:`_terms`);
* ``SkipLayerGuidanceSD3`` / ``SkipLayerGuidanceDiT``: an :class:`~diffguide.guidance.slg_comfy.SLGComfy`
  term (the node's semantics: sigma window from the percents, optional rescaling);
* ``FluxGuidance``: the conditioning's ``guidance``, an :class:`~diffguide.guidance.EmbeddedGuidance`
  term (guidance-distilled models);
* ``KSampler`` / ``KSamplerAdvanced`` (full run only): CFG(cfg), sampler, schedule, steps, seed, the
  ``comfy`` noise policy; ``Empty*Latent*``: batch and size;
* conditioning: ``CLIPTextEncode`` (a prompt for a model with its text encoder),
  ``DiffguideLoadConditioning`` (a ComfyUI-form conditioning file), ``ConditioningZeroOut``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..conditioning import ConditioningFile
from ..errors import DiffguideError
from ..guidance import CFG, PAG, CFGNorm, EmbeddedGuidance, GuidanceTerm, RescaleCFG, Window
from ..guidance.slg_comfy import SLGComfy
from ..manifest import file_hash
from ..pipeline import COMFY_SAMPLER_NAMES, GenerateConfig
from ..sampling.comfy import COMFY_SCHEDULERS, ComfyShift, flux_node_shift
from ..sampling.init import InitLatents
from .conditioning import ComfyConditioning, describe_metadata, load_comfy_conditioning, to_diffguide
from .graph import Graph, Link, Node, WorkflowError
from .models import resolve

#: ComfyUI sampler name -> diffguide scheduler name (the comfy policy's samplers).
SAMPLERS = {v: k for k, v in COMFY_SAMPLER_NAMES.items()}
DTYPES = {"default": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ModelSpec:
    """The model of a run: a loader node's file, its dtype, and the LoRAs applied to it."""

    loader: str  # UNETLoader or CheckpointLoaderSimple
    path: Path
    dtype: str
    loras: tuple[tuple[Path, float], ...] = ()
    node: str = ""


@dataclass(frozen=True)
class _Model:
    spec: ModelSpec
    sampling: ComfyShift | None = None
    terms: tuple[GuidanceTerm, ...] = ()
    notes: tuple[str, ...] = ()
    # ComfyUI's sampler CFG function, RescaleCFG or CFGNorm pre_cfg (the last one set wins)
    cfg_function: RescaleCFG | CFGNorm | None = None


@dataclass(frozen=True)
class _Clip:
    node: str
    checkpoint: bool  # a checkpoint's own text encoder (diffguide can encode prompts with it)


@dataclass(frozen=True)
class _Cond:
    node: str
    text: str | None = None
    entries: ComfyConditioning | None = None
    source: str = ""
    guidance: float | None = None  # FluxGuidance's embedded guidance scale


@dataclass(frozen=True)
class _Latent:
    node: str
    shape: tuple[int, ...]
    width: int
    height: int
    init: InitLatents | None = None  # LoadLatent's samples (ComfyUI's LATENT); None: an empty latent


@dataclass(frozen=True)
class WorkflowRun:
    """One diffguide run: the model, the GenerateConfig, the conditioning and what ComfyUI returns."""

    model: ModelSpec
    config: GenerateConfig
    conditioning: ConditioningFile | None  # None: prompts encoded by the model's text encoder
    latent_shape: tuple[int, ...]  # ComfyUI's LATENT shape, e.g. (1, 16, 1, h, w)
    sampler_node: str
    explain: tuple[str, ...] = field(default_factory=tuple)
    decode_node: str | None = None
    save_prefix: str | None = None


class Translator:
    def __init__(
        self,
        graph: Graph,
        models_dir: Path | None,
        base_dir: Path,
        overrides: dict[str, Path] | None = None,
    ) -> None:
        self.graph, self.models_dir, self.base_dir = graph, models_dir, base_dir
        self.overrides = overrides or {}
        self._values: dict[str, tuple[Any, ...]] = {}
        for nid in self.overrides:
            if nid not in graph:
                raise WorkflowError(f"--conditioning names node {nid}, which is not in the workflow")

    # -- evaluation ---------------------------------------------------------------------------
    def value(self, node: Node, name: str) -> Any:
        v = node.inputs.get(name)
        if isinstance(v, Link):
            return self.output(v)
        return v

    def output(self, link: Link) -> Any:
        if link.node not in self._values:
            node = self.graph[link.node]
            handler: Callable[[Node], tuple[Any, ...]] = getattr(self, f"_{node.class_type}")
            self._values[link.node] = handler(node)
        return self._values[link.node][link.slot]

    def number(self, node: Node, name: str, low: float | None = None, high: float | None = None) -> float:
        v = float(self.value(node, name))
        if (low is not None and v < low) or (high is not None and v > high):
            raise WorkflowError(f"{node.label}: {name} must be in [{low}, {high}], got {v:g}")
        return v

    # -- loaders ------------------------------------------------------------------------------
    def _UNETLoader(self, node: Node) -> tuple[Any, ...]:
        dtype = str(self.value(node, "weight_dtype"))
        if dtype not in DTYPES:
            raise WorkflowError(
                f"{node.label}: weight_dtype '{dtype}' is not supported (one of {', '.join(DTYPES)})"
            )
        path = resolve(self.models_dir, "diffusion_models", str(self.value(node, "unet_name")), node.label)
        model = _Model(ModelSpec("UNETLoader", path, DTYPES[dtype], node=node.id))
        if _is_flux_dev(path):  # ComfyUI's supported_models.Flux: ModelSamplingFlux, shift 1.15
            note = f"{node.label}: FLUX.1 dev: ComfyUI's default model sampling, flux time shift mu 1.15"
            model = replace(model, sampling=ComfyShift("flux", 1.15), notes=(note,))
        return (model,)

    def _CheckpointLoaderSimple(self, node: Node) -> tuple[Any, ...]:
        path = resolve(self.models_dir, "checkpoints", str(self.value(node, "ckpt_name")), node.label)
        spec = ModelSpec("CheckpointLoaderSimple", path, "float32", node=node.id)
        return (_Model(spec), _Clip(node.id, True), ("checkpoint", node.id))

    def _CLIPLoader(self, node: Node) -> tuple[Any, ...]:
        resolve(self.models_dir, "text_encoders", str(self.value(node, "clip_name")), node.label)
        return (_Clip(node.id, False),)

    def _DualCLIPLoader(self, node: Node) -> tuple[Any, ...]:
        for key in ("clip_name1", "clip_name2"):
            resolve(self.models_dir, "text_encoders", str(self.value(node, key)), node.label)
        return (_Clip(node.id, False),)

    def _VAELoader(self, node: Node) -> tuple[Any, ...]:
        return (
            ("file", node.id, resolve(self.models_dir, "vae", str(self.value(node, "vae_name")), node.label)),
        )

    def _lora(self, node: Node) -> _Model:
        model: _Model = self.value(node, "model")
        strength = self.number(node, "strength_model", -100.0, 100.0)
        path = resolve(self.models_dir, "loras", str(self.value(node, "lora_name")), node.label)
        if strength == 0.0:
            return model
        note = f"{node.label}: LoRA {path.name} at strength {strength:g} (merged as diffusers/peft adapters)"
        spec = replace(model.spec, loras=(*model.spec.loras, (path, strength)))
        return replace(model, spec=spec, notes=(*model.notes, note))

    def _LoraLoaderModelOnly(self, node: Node) -> tuple[Any, ...]:
        return (self._lora(node),)

    def _LoraLoader(self, node: Node) -> tuple[Any, ...]:
        clip: _Clip = self.value(node, "clip")
        model = self._lora(node)
        if self.number(node, "strength_clip") != 0.0 and self.number(node, "strength_clip") != self.number(
            node, "strength_model"
        ):
            raise WorkflowError(
                f"{node.label}: strength_clip differs from strength_model; diffguide applies one strength per LoRA"
            )
        return (model, clip)

    # -- model patches ------------------------------------------------------------------------
    def _shift(self, node: Node, shift: ComfyShift, what: str) -> tuple[Any, ...]:
        model: _Model = self.value(node, "model")
        note = f"{node.label}: {what}"
        return (replace(model, sampling=shift, notes=(*model.notes, note)),)

    def _ModelSamplingAuraFlow(self, node: Node) -> tuple[Any, ...]:
        s = self.number(node, "shift", 0.0, 100.0)
        return self._shift(
            node, ComfyShift("flow", s, 1.0), f"ModelSamplingDiscreteFlow shift {s:g}, multiplier 1"
        )

    def _ModelSamplingSD3(self, node: Node) -> tuple[Any, ...]:
        s = self.number(node, "shift", 0.0, 100.0)
        return self._shift(
            node, ComfyShift("flow", s, 1000.0), f"ModelSamplingDiscreteFlow shift {s:g}, multiplier 1000"
        )

    def _ModelSamplingFlux(self, node: Node) -> tuple[Any, ...]:
        mu = flux_node_shift(
            int(self.value(node, "width")),
            int(self.value(node, "height")),
            self.number(node, "max_shift"),
            self.number(node, "base_shift"),
        )
        return self._shift(node, ComfyShift("flux", mu), f"ModelSamplingFlux, flux time shift mu {mu:.6g}")

    def _term(self, node: Node, term: GuidanceTerm, what: str) -> tuple[Any, ...]:
        model: _Model = self.value(node, "model")
        return (replace(model, terms=(*model.terms, term), notes=(*model.notes, f"{node.label}: {what}")),)

    def _CFGNorm(self, node: Node) -> tuple[Any, ...]:
        strength = self.number(node, "strength", 0.0, 100.0)
        if self.value(node, "pre_cfg") or False:
            what = f"CFGNorm strength {strength:g} (pre-CFG: ComfyUI's CFG function, the CFG result rescaled to the cond norm)"
            return (self._cfg_function(node, CFGNorm(strength, pre_cfg=True), what),)
        what = f"CFGNorm strength {strength:g} (post-CFG, x0 space, attenuate only)"
        return self._term(node, CFGNorm(strength), what)

    def _cfg_function(self, node: Node, term: RescaleCFG | CFGNorm, what: str) -> _Model:
        """The model with ComfyUI's sampler CFG function set: it replaces an earlier one."""
        model: _Model = self.value(node, "model")
        notes = (*model.notes, f"{node.label}: {what}")
        if model.cfg_function is not None:
            notes = (
                *notes,
                f"  (replaces the CFG function {_term_text(model.cfg_function)} set before it, as in ComfyUI)",
            )
        return replace(model, cfg_function=term, notes=notes)

    def _PerturbedAttentionGuidance(self, node: Node) -> tuple[Any, ...]:
        scale = self.number(node, "scale", 0.0, 100.0)
        return self._term(node, PAG(scale, layers="mid"), f"PAG scale {scale:g} on the UNet's middle block")

    def _unsupported(self, node: Node, why: str) -> tuple[Any, ...]:
        raise WorkflowError(f"{node.label}: {why}")

    def _RescaleCFG(self, node: Node) -> tuple[Any, ...]:
        phi = self.number(node, "multiplier", 0.0, 1.0)
        what = f"RescaleCFG multiplier {phi:g} (ComfyUI's CFG function: rescaled in v space)"
        return (self._cfg_function(node, RescaleCFG(phi), what),)

    def _slg(self, node: Node, double: str, single: str, rescaling: float) -> tuple[Any, ...]:
        model: _Model = self.value(node, "model")
        blocks = [f"b{i}" for i in re.findall(r"\d+", double)] + [f"s{i}" for i in re.findall(r"\d+", single)]
        if not blocks:  # the node returns the model unchanged
            return (replace(model, notes=(*model.notes, f"{node.label}: no layers, no effect")),)
        scale = self.number(node, "scale", 0.0, 100.0)
        start, end = (self.number(node, k, 0.0, 1.0) for k in ("start_percent", "end_percent"))
        sampling = model.sampling or (
            ComfyShift("flow", 3.0, 1000.0) if node.class_type.endswith("SD3") else None
        )
        if sampling is None or sampling.kind != "flow":
            raise WorkflowError(
                f"{node.label}: needs a ModelSamplingSD3 or ModelSamplingAuraFlow node before it "
                "(its percents are sigmas of that model sampling)"
            )
        top, bottom = _percent_to_sigma(sampling.shift, start), _percent_to_sigma(sampling.shift, end)
        if bottom > top:
            raise WorkflowError(f"{node.label}: end_percent {end:g} is before start_percent {start:g}")
        window = Window(sigma_min=bottom, sigma_max=top)
        term = SLGComfy(scale, ",".join(blocks), rescaling, window=window)
        what = f"SLG (ComfyUI) scale {scale:g} skipping {term.layers}, sigma {bottom:.6g}..{top:.6g}" + (
            f", rescaling {rescaling:g}" if rescaling else ""
        )
        return self._term(node, term, what)

    def _SkipLayerGuidanceSD3(self, node: Node) -> tuple[Any, ...]:
        return self._slg(node, str(self.value(node, "layers")), "", 0.0)

    def _SkipLayerGuidanceDiT(self, node: Node) -> tuple[Any, ...]:
        rescaling = (
            self.number(node, "rescaling_scale", 0.0, 10.0) if "rescaling_scale" in node.inputs else 0.0
        )
        double, single = (str(self.value(node, k)) for k in ("double_layers", "single_layers"))
        return self._slg(node, double, single, rescaling)

    def _FluxGuidance(self, node: Node) -> tuple[Any, ...]:
        cond: _Cond = self.value(node, "conditioning")
        scale = self.number(node, "guidance", 0.0, 100.0)
        entries = None if cond.entries is None else [[t, {**m, "guidance": scale}] for t, m in cond.entries]
        source = f"{cond.source}, embedded guidance {scale:g} via {node.label}"
        return (replace(cond, node=node.id, entries=entries, source=source, guidance=scale),)

    # -- conditioning ---------------------------------------------------------------------------
    def _CLIPTextEncode(self, node: Node) -> tuple[Any, ...]:
        if node.id in self.overrides:
            return (self._from_file(node, self.overrides[node.id]),)
        clip: _Clip = self.value(node, "clip")
        if not clip.checkpoint:
            raise WorkflowError(
                f"{node.label}: diffguide cannot run this text encoder (node {clip.node}); give the encoded "
                f"conditioning instead: --conditioning {node.id}=FILE (ComfyUI form, saved by save_comfy_conditioning)"
            )
        return (_Cond(node.id, text=str(self.value(node, "text")), source=f"prompt of {node.label}"),)

    def _from_file(self, node: Node, path: Path) -> _Cond:
        entries, _ = load_comfy_conditioning(path)
        return _Cond(node.id, entries=entries, source=f"{path} via {node.label}")

    def _DiffguideLoadConditioning(self, node: Node) -> tuple[Any, ...]:
        if node.id in self.overrides:
            return (self._from_file(node, self.overrides[node.id]),)
        name = Path(str(self.value(node, "file")))
        path = name if name.is_absolute() else self.base_dir / name
        if not path.is_file():
            raise WorkflowError(f"{node.label}: conditioning file '{path}' does not exist")
        return (self._from_file(node, path),)

    def _ConditioningZeroOut(self, node: Node) -> tuple[Any, ...]:
        cond: _Cond = self.value(node, "conditioning")
        if cond.entries is None:
            raise WorkflowError(
                f"{node.label}: zeroing a prompt needs its encoded tensors; give them with --conditioning {cond.node}=FILE"
            )
        zeroed = [
            [
                torch.zeros_like(t),
                {k: (torch.zeros_like(v) if k == "pooled_output" else v) for k, v in m.items()},
            ]
            for t, m in cond.entries
        ]
        return (_Cond(node.id, entries=zeroed, source=f"zeros of {cond.source} via {node.label}"),)

    # -- latents -------------------------------------------------------------------------------
    def _empty(self, node: Node, channels: int, frames: int | None) -> tuple[Any, ...]:
        w, h, b = (int(self.value(node, k)) for k in ("width", "height", "batch_size"))
        if w < 16 or h < 16 or w % 8 or h % 8 or not 1 <= b <= 64:
            raise WorkflowError(
                f"{node.label}: width/height must be multiples of 8 >= 16 and batch 1..64, got {w}x{h}x{b}"
            )
        shape = (b, channels, h // 8, w // 8) if frames is None else (b, channels, frames, h // 8, w // 8)
        return (_Latent(node.id, shape, w, h),)

    def _EmptyLatentImage(self, node: Node) -> tuple[Any, ...]:
        return self._empty(node, 4, None)

    def _EmptySD3LatentImage(self, node: Node) -> tuple[Any, ...]:
        return self._empty(node, 16, None)

    def _EmptyHunyuanLatentVideo(self, node: Node) -> tuple[Any, ...]:
        length = int(self.value(node, "length"))
        if not 1 <= length <= 4:
            raise WorkflowError(
                f"{node.label}: length {length} makes a video; diffguide samples one frame (length 1)"
            )
        return self._empty(node, 16, 1)

    def _LoadLatent(self, node: Node) -> tuple[Any, ...]:
        init = load_latent_node(node, str(self.value(node, "latent")), self.base_dir, self.models_dir)
        x = init.latents
        if x.ndim not in (4, 5):
            raise WorkflowError(
                f"{node.label}: a LATENT is (batch, channels, [frames,] h, w), got {list(x.shape)}"
            )
        return (_Latent(node.id, tuple(x.shape), x.shape[-1] * 8, x.shape[-2] * 8, init),)

    # -- the sampler ---------------------------------------------------------------------------
    def _KSampler(self, node: Node) -> tuple[Any, ...]:
        denoise = self.number(node, "denoise")
        if not 0.0 < denoise <= 1.0:
            raise WorkflowError(f"{node.label}: denoise must be in (0, 1], got {denoise:g}")
        return (self._sample(node, int(self.value(node, "seed")), denoise),)

    def _KSamplerAdvanced(self, node: Node) -> tuple[Any, ...]:
        steps = int(self.value(node, "steps"))
        if (
            self.value(node, "add_noise") != "enable"
            or int(self.value(node, "start_at_step")) != 0
            or int(self.value(node, "end_at_step")) < steps
            or self.value(node, "return_with_leftover_noise") != "disable"
        ):
            raise WorkflowError(
                f"{node.label}: only a full run is supported (add_noise enable, start 0, end >= steps, no leftover noise)"
            )
        return (self._sample(node, int(self.value(node, "noise_seed"))),)

    def _sample(self, node: Node, seed: int, denoise: float = 1.0) -> WorkflowRun:
        model: _Model = self.value(node, "model")
        pos: _Cond = self.value(node, "positive")
        neg: _Cond = self.value(node, "negative")
        latent: _Latent = self.value(node, "latent_image")
        sampler = str(self.value(node, "sampler_name"))
        if sampler not in SAMPLERS:
            raise WorkflowError(
                f"{node.label}: sampler '{sampler}' is not supported; one of {', '.join(SAMPLERS)}"
            )
        schedule = str(self.value(node, "scheduler"))
        if schedule not in COMFY_SCHEDULERS:
            raise WorkflowError(
                f"{node.label}: scheduler '{schedule}' is not supported; one of {', '.join(COMFY_SCHEDULERS)}"
            )
        cfg_scale = self.number(node, "cfg", 0.0, 100.0)
        init = latent.init
        if (
            init is None and denoise < 1.0
        ):  # ComfyUI noises the empty latent's zeros (after process_latent_in)
            init = InitLatents(torch.zeros(latent.shape), "comfy")
        terms = _terms(node, model, cfg_scale, pos, neg, latent)
        batch = latent.shape[0]
        conditioning = None
        if (pos.entries is None) != (neg.entries is None):
            raise WorkflowError(
                f"{node.label}: positive and negative must both be prompts or both conditioning files"
            )
        if pos.entries is not None and neg.entries is not None:
            conditioning = ConditioningFile(
                to_diffguide(pos.entries, f"{node.label} positive"),
                to_diffguide(neg.entries, f"{node.label} negative"),
                {"positive": describe_metadata(pos.entries), "negative": describe_metadata(neg.entries)},
            )
            prompts, negatives = (f"<{pos.source}>",) * batch, (f"<{neg.source}>",) * batch
        else:
            prompts, negatives = (str(pos.text),) * batch, (str(neg.text),) * batch
        try:
            config = GenerateConfig(
                prompts, negatives, terms, steps=int(self.value(node, "steps")), width=latent.width,
                height=latent.height, seed=seed, scheduler=SAMPLERS[sampler], noise="comfy",
                schedule=schedule, comfy_sampling=model.sampling, init_latents=init, strength=denoise,
            )  # fmt: skip
        except Exception as err:
            raise WorkflowError(f"{node.label}: {err}") from err
        lines = [
            f"model: {model.spec.loader} (node {model.spec.node}) {model.spec.path} [{model.spec.dtype}]",
            *[f"  {n}" for n in model.notes],
            f"sampler: {node.label}: {sampler} / {schedule}, {config.steps} steps, cfg {cfg_scale:g}, seed {seed}"
            + (
                f", denoise {denoise:g} (the last {config.steps} of int(steps / denoise) sigmas)"
                if denoise < 1
                else ""
            ),
            "guidance terms: " + ", ".join(_term_text(t) for t in terms),
            f"latent: {self.graph[latent.node].label}: {list(latent.shape)} ({latent.width}x{latent.height} px)"
            + (f" from {latent.init.path} (sha256 {latent.init.sha256})" if latent.init is not None else ""),
            f"positive: {pos.source}"
            + (f" metadata {describe_metadata(pos.entries)}" if pos.entries else ""),
            f"negative: {neg.source}"
            + (f" metadata {describe_metadata(neg.entries)}" if neg.entries else ""),
        ]
        return WorkflowRun(model.spec, config, conditioning, latent.shape, node.id, tuple(lines))

    def _VAEDecode(self, node: Node) -> tuple[Any, ...]:
        run: WorkflowRun = self.value(node, "samples")
        self.value(node, "vae")
        return (replace(run, decode_node=node.id),)

    def _SaveImage(self, node: Node) -> tuple[Any, ...]:
        run: WorkflowRun = self.value(node, "images")
        return (replace(run, save_prefix=str(self.value(node, "filename_prefix"))),)


def _terms(
    node: Node, model: _Model, cfg: float, pos: _Cond, neg: _Cond, latent: _Latent
) -> tuple[GuidanceTerm, ...]:
    """ComfyUI's order: CFG(cfg), or the model's CFG function (RescaleCFG, CFGNorm pre_cfg: the last
    node wins) right after it, whatever the node order; then the post-CFG patches in node order,
    each on the result of those before it: a PAG / SLG term after a correction (RescaleCFG, CFGNorm,
    SLG rescaling) adds its ``s (c - p)`` there (``post_cfg``), not before the corrections as a
    delta. FluxGuidance's scale is the embedded guidance (one model input). On a 5-D latent
    RescaleCFG's std is per column."""
    function = model.cfg_function
    if isinstance(function, RescaleCFG) and len(latent.shape) == 5:
        function = replace(function, columns=latent.shape[-1])
    chain: list[GuidanceTerm] = [] if function is None else [function]
    for t in model.terms:
        corrected = any(
            not isinstance(c, (PAG, SLGComfy)) or getattr(c, "rescaling_scale", 0.0) for c in chain
        )
        chain.append(replace(t, post_cfg=True) if isinstance(t, (PAG, SLGComfy)) and corrected else t)
    embedded: tuple[GuidanceTerm, ...] = ()
    if pos.guidance is not None or neg.guidance is not None:
        if cfg != 1.0 and pos.guidance != neg.guidance:
            raise WorkflowError(
                f"{node.label}: positive and negative carry different FluxGuidance scales "
                f"({pos.guidance}, {neg.guidance}); diffguide feeds one embedded guidance scale"
            )
        embedded = (EmbeddedGuidance(float(pos.guidance if pos.guidance is not None else 0.0)),)
    return (CFG(cfg), *chain, *embedded)


def load_latent_node(node: Node, name: str, base_dir: Path, models_dir: Path | None) -> InitLatents:
    """LoadLatent's file (ComfyUI's SaveLatent form): an absolute path, or a name under the workflow's
    folder or ComfyUI's ``input/`` next to the models folder."""
    from ..sampling.init import load_init_latents

    path = Path(name)
    if not path.is_absolute():
        places = [base_dir / name] + ([models_dir.parent / "input" / name] if models_dir is not None else [])
        path = next((p for p in places if p.is_file()), places[0])
    if not path.is_file():
        raise WorkflowError(f"{node.label}: latent file '{path}' does not exist")
    try:
        init = load_init_latents(path)
    except DiffguideError as err:
        raise WorkflowError(f"{node.label}: {err}") from None
    if init.space != "comfy":
        raise WorkflowError(
            f"{node.label}: '{path}' is not a ComfyUI latent file (SaveLatent's 'latent_tensor' key); "
            "give model-space latents to diffguide generate --init-latents instead"
        )
    return init


def _is_flux_dev(path: Path) -> bool:
    """Whether ``path`` holds a guidance-distilled FLUX.1 transformer (read from its key names only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception:  # unreadable: the loader says so when the run executes
        return False
    names = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")
    return any(k.endswith(n) for k in keys for n in names) and any(
        "double_blocks." in k or "x_embedder" in k for k in keys
    )


def _percent_to_sigma(shift: float, percent: float) -> float:
    """ComfyUI's ``ModelSamplingDiscreteFlow.percent_to_sigma``."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    return shift * t / (1.0 + (shift - 1.0) * t)


def _term_text(t: GuidanceTerm) -> str:
    d = t.describe()
    d.pop("window", None)
    d.pop("name", None)
    return f"{d.pop('method')}(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"


def translate(
    graph: Graph, models_dir: Path | None, base_dir: Path, overrides: dict[str, Path] | None = None
) -> WorkflowRun:
    """The one run of a workflow: exactly one KSampler; a SaveImage/VAEDecode after it if any."""
    samplers = [n for n in graph.values() if n.class_type in ("KSampler", "KSamplerAdvanced")]
    if len(samplers) != 1:
        raise WorkflowError(f"the workflow has {len(samplers)} KSampler nodes; diffguide runs exactly one")
    tr = Translator(graph, models_dir, base_dir, overrides)
    sinks = [n for n in graph.values() if n.class_type == "SaveImage"] or [
        n for n in graph.values() if n.class_type == "VAEDecode"
    ]
    if len(sinks) > 1:
        raise WorkflowError(
            f"{sinks[1].label}: more than one output; diffguide runs one sampler and one output"
        )
    target = sinks[0] if sinks else samplers[0]
    run: WorkflowRun = tr.output(Link(target.id, 0)) if target.spec.outputs else tr._SaveImage(target)[0]
    unused = sorted(set(graph) - set(tr._values) - {target.id})
    if unused:
        lines = (*run.explain, f"not used by the run: {', '.join(graph[n].label for n in unused)}")
        run = replace(run, explain=lines)
    return run


def model_hash(spec: ModelSpec) -> dict[str, str]:
    """sha256 of the model file and of each LoRA file (for explain and manifests)."""
    out = {spec.path.name: file_hash(str(spec.path))}
    out.update({p.name: file_hash(str(p)) for p, _ in spec.loras})
    return out
