"""The one composer: load, encode, sample, decode; returns images, latents and manifests."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .checks import check_prompt_arg, check_types, warn_long_prompts, warn_size
from .conditioning import ConditioningFile
from .defaults import DEFAULTS, NOISE_POLICIES, default_device, default_model, model_path
from .engine import GuidedModel
from .errors import ConfigError
from .guidance.base import GuidanceTerm
from .guidance.cfg import CFG
from .manifest import MANIFEST_VERSION, attention_backend, environment, file_hash, module_hash, tensor_hash
from .models.denoiser import Conditioning, FamilyDenoiser
from .models.families import Family, family_of
from .models.families.sd3_compact import compact_record
from .models.loading import load_lora, load_pipeline, own_memory
from .quiet import library_noise_off
from .sampling.comfy import (
    COMFY_SCHEDULERS,
    ComfyFlowSampling,
    ComfyFluxSampling,
    ComfyShift,
    comfy_noise,
    comfy_sigmas,
)
from .sampling.comfy_churn import CHURN_NOISE, churn_description, comfy_churn
from .sampling.init import InitLatents, TailStepper, check_strength, img2img_begin, init_rows
from .sampling.knobs import DynamicThreshold, apply_thresholding, check_config_knobs, churn_step_kwargs
from .sampling.loop import Callback, run
from .sampling.noise import generators, image_seeds, initial_noise
from .sampling.schedulers import SCHEDULERS, SHIFTABLE
from .sampling.steppers import ComfyStepper, DiscreteStepper

MAX_STEPS = 1000
DEFAULT_DTYPE: torch.dtype = getattr(torch, DEFAULTS.dtype)
#: diffguide scheduler name -> ComfyUI KSampler sampler name, for the comfy noise policy.
COMFY_SAMPLER_NAMES = {"euler": "euler", "euler_a": "euler_ancestral", "dpmpp_2m": "dpmpp_2m", "heun": "heun"}


def _as_list(value: str | Sequence[str], count: int | None, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if count is None or len(items) == count:
        return items
    if len(items) == 1:
        return items * count
    raise ConfigError(f"{len(items)} {what}s for {count} images: give one {what}, or one per image")


@dataclass(frozen=True)
class GenerateConfig:
    """Everything a run depends on besides the model. Build with :meth:`create`.
    Defaults: :data:`diffguide.defaults.DEFAULTS`, the same as the CLI's."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    guidance: tuple[GuidanceTerm, ...] = field(default_factory=lambda: (CFG(),))
    steps: int = DEFAULTS.steps
    width: int | None = None
    height: int | None = None
    seed: int = DEFAULTS.seed
    scheduler: str = DEFAULTS.scheduler
    eta: float = DEFAULTS.eta
    max_rows: int | None = None
    noise: str = DEFAULTS.noise
    schedule: str | None = None  # comfy policy only: ComfyUI scheduler ("normal", "karras", ...)
    shift: float = DEFAULTS.shift  # sampling time shift (SD3 eq. 23); 1 = off
    # Image i bit-identical to its seed run alone: each image sampled by itself (B forwards a step)
    batch_invariant: bool = False
    # CFG was not asked for explicitly: the model family may replace the default CFG term by its
    # own default (guidance-distilled Flux: embedded guidance, no true CFG, as FluxPipeline)
    default_cfg: bool = False
    # comfy policy only: a ComfyUI ModelSampling* node's override of the family's model sampling
    comfy_sampling: ComfyShift | None = None
    # Perturbed branches reuse the conditional rows' work up to their first perturbed unit
    # (diffguide.prefix); equal to an unshared run within float rounding. Manifests written before
    # this switch replay with it off (repro.schema), as they were made.
    prefix_sharing: bool = True
    # Repeated trailing text tokens (SD3 without T5: 256 zero tokens) run as one token with a
    # log(count) attention bias (models/families/sd3_compact.py); exact to float rounding. Manifests
    # written before this switch replay with it off (repro.schema), as they were made.
    compact_text: bool = True
    # Sampler knobs (diffguide.sampling.knobs; defaults = off). diffusers policy, euler: Karras churn
    # (s_churn, s_tmin, s_tmax (None: no bound), s_noise). comfy policy, euler_a: KSampler's
    # sample_euler_ancestral eta (ancestral_eta) and s_noise.
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None
    s_noise: float = 1.0
    ancestral_eta: float = 1.0
    # Imagen dynamic thresholding of x0 (diffusers policy: ddim, dpmpp_2m, unipc, ddpm); None = off
    dynamic_thresholding: DynamicThreshold | None = None
    # img2img (diffguide.sampling.init): start from these latents at ``strength`` (1 = pure noise)
    init_latents: InitLatents | None = None
    strength: float = 1.0

    @staticmethod
    def create(
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        num_images: int | None = None,
        guidance: Sequence[GuidanceTerm] | None = None,
        **kwargs: Any,
    ) -> GenerateConfig:
        check_prompt_arg(prompt, "prompt")
        check_prompt_arg(negative_prompt, "negative_prompt")
        if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool)):
            raise ConfigError(f"num_images must be an integer, got {num_images!r}")
        count = num_images if num_images is not None else (None if isinstance(prompt, str) else len(prompt))
        if count is not None and count < 1:
            raise ConfigError(f"number of images must be >= 1, got {count}")
        prompts = _as_list(prompt, count, "prompt")
        negatives = _as_list(negative_prompt, len(prompts), "negative prompt")
        if isinstance(guidance, GuidanceTerm):
            guidance = [guidance]
        elif guidance is not None and not isinstance(guidance, (list, tuple)):
            raise ConfigError(f"guidance must be a list of terms such as [CFG(5.0)], got {guidance!r}")
        terms: tuple[GuidanceTerm, ...] = (CFG(),) if guidance is None else tuple(guidance)
        if guidance is None:
            kwargs.setdefault("default_cfg", True)
        return GenerateConfig(tuple(prompts), tuple(negatives), terms, **kwargs)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self)  # types, seeds and integer ranges (checks.py); then the consistency rules
        check_config_knobs(self)
        check_strength(self.strength, self.init_latents)
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        for side, v in (("width", self.width), ("height", self.height)):
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"{side} must be a positive multiple of 8, got {v}")
        if not self.prompts:
            raise ConfigError("give at least one prompt")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must be in [0, 1], got {self.eta}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; choose one of: {', '.join(SCHEDULERS)}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"shift must be a finite number > 0 (1 = off), got {self.shift}")
        if self.shift != 1.0 and self.noise == "diffusers" and self.scheduler not in SHIFTABLE:
            raise ConfigError(
                f"--shift needs a scheduler that takes custom timesteps ({', '.join(SHIFTABLE)}), not '{self.scheduler}'"
            )
        if self.noise not in NOISE_POLICIES:
            raise ConfigError(
                f"unknown noise policy '{self.noise}'; choose one of: {', '.join(NOISE_POLICIES)}"
            )
        if self.noise == "comfy":
            if self.scheduler == "dpmpp_2m_karras":
                raise ConfigError(
                    "with the comfy noise policy the schedule is separate from the sampler: "
                    "pass --scheduler dpmpp_2m --schedule karras instead of dpmpp_2m_karras"
                )
            if self.scheduler not in COMFY_SAMPLER_NAMES:
                raise ConfigError(
                    f"the comfy noise policy supports the samplers {', '.join(COMFY_SAMPLER_NAMES)} "
                    f"(ComfyUI's {', '.join(COMFY_SAMPLER_NAMES.values())}), not '{self.scheduler}'"
                )
            if self.shift != 1.0:
                raise ConfigError("--shift is not supported with the comfy noise policy")
            if self.eta != 0.0:
                raise ConfigError(
                    "--eta (DDIM's) is not used by the comfy noise policy; euler_a's eta is --ancestral-eta"
                )
            if self.batch_invariant:
                raise ConfigError(
                    "--batch-invariant needs per-image noise; the comfy noise policy draws one noise "
                    "tensor for the whole batch (as ComfyUI does), so it has no single-image runs to match"
                )
            if self.comfy_sampling is not None and not isinstance(self.comfy_sampling, ComfyShift):
                raise ConfigError(f"comfy_sampling must be a ComfyShift, got {self.comfy_sampling!r}")
            if (self.schedule or "normal") not in COMFY_SCHEDULERS:
                raise ConfigError(
                    f"unknown ComfyUI schedule '{self.schedule}'; one of: {', '.join(COMFY_SCHEDULERS)}"
                )
        elif self.schedule is not None:
            raise ConfigError(
                "--schedule applies to the comfy noise policy only (diffusers schedulers set their own)"
            )
        elif self.comfy_sampling is not None:
            raise ConfigError("a ComfyUI model sampling override applies to the comfy noise policy only")

    @property
    def num_images(self) -> int:
        return len(self.prompts)

    def describe(self) -> dict[str, Any]:
        d = {
            f.name: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v
            for f in fields(self)
            if f.name not in ("guidance", "init_latents")
            for v in (getattr(self, f.name),)
        }
        d["guidance"] = [t.describe() for t in self.guidance]
        d["init_latents"] = None if self.init_latents is None else self.init_latents.describe()
        return d


@dataclass
class GenerationResult:
    latents: Tensor  # (B, C, h, w) final latents, before VAE scaling is undone
    images: list[Image.Image]
    manifests: list[dict[str, Any]]  # one per image
    forward_calls: int = 0


@dataclass
class LoRA:
    path: str
    scale: float
    name: str
    sha256: str


@dataclass
class GuidedPipeline:
    """Guided sampling over a diffusers pipeline of a supported family (wrapped, not copied).

    The family adapter (:mod:`diffguide.models.families`) is chosen from the pipeline.

    Thread safety: one pipeline may be shared by threads. :meth:`generate` holds ``lock`` (a
    re-entrant lock of this pipeline) for the whole run (encode, install perturbations, sample,
    remove them, decode), so concurrent calls run one after another and each returns exactly
    its serial result; no processor or hook outlives its run. Hold ``lock`` yourself to install
    your own hooks around a run (e.g. a trace recorder's) or to change the model.
    """

    pipe: Any
    source: str | None = None
    loras: list[LoRA] = field(default_factory=list)
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)
    family: Family = field(init=False, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.family = family_of(self.pipe)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        dtype: torch.dtype = DEFAULT_DTYPE,
        device: str | None = DEFAULTS.device,
        config: str | None = None,
    ) -> GuidedPipeline:
        """Load a diffusers folder or single-file checkpoint; no path: the bundled model
        (:func:`diffguide.default_model`); no device: cuda if available, else cpu. Quiet:
        diffusers' and transformers' logs and loading bars are off while loading (restored after)."""
        path = default_model() if path is None else model_path(path)
        device = default_device() if device is None else device
        with library_noise_off():
            pipe = load_pipeline(path, dtype=dtype, config=config)
        if torch.device(device).type != "cpu":
            pipe = pipe.to(device)
        elif Path(path).is_dir():  # a folder's weights are memory-mapped views (single files are copied)
            own_memory(pipe)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, source=str(path))

    @property
    def is_xl(self) -> bool:
        return self.family.architecture(self.pipe) == "sdxl"

    @property
    def model(self) -> Any:
        """The denoising network (UNet or transformer)."""
        return self.family.model(self.pipe)

    @property
    def unet(self) -> Any:
        """The denoising network (kept under its SD name; see :attr:`model`)."""
        return self.model

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        with self.lock:
            self._load_lora(path, scale)

    def _load_lora(self, path: str | Path, scale: float) -> None:
        name = f"lora{len(self.loras)}"
        load_lora(self.pipe, path, name)
        self.loras.append(LoRA(str(path), scale, name, file_hash(str(path))))
        self.pipe.set_adapters(
            [lo.name for lo in self.loras], adapter_weights=[lo.scale for lo in self.loras]
        )
        self._hashes.pop(self.family.model_attr, None)

    # -- encoding --------------------------------------------------------------------------
    def encode(
        self, cfg: GenerateConfig, height: int, width: int
    ) -> tuple[Conditioning, Conditioning | None]:
        need_uncond = any(b.name == "uncond" for t in cfg.guidance for b in t.branches()) or any(
            getattr(t, "needs_negative", False) for t in cfg.guidance
        )
        # library_noise_off: diffusers' own truncation log would repeat our PromptTruncatedWarning
        with library_noise_off():
            return self.family.encode(
                self.pipe, cfg.prompts, cfg.negative_prompts, need_uncond, height, width
            )

    # -- sampling --------------------------------------------------------------------------
    def default_size(self) -> int:
        return self.family.default_size(self.pipe)

    def denoiser(self) -> FamilyDenoiser:
        return FamilyDenoiser(self.family, self.model, self.family.prediction(self.pipe))

    def generate(
        self,
        prompt: str | Sequence[str] | GenerateConfig,
        negative_prompt: str | Sequence[str] = "",
        *,
        callback: Callback | None = None,
        progress: bool = False,
        decode: bool = True,
        conditioning: ConditioningFile | None = None,
        rows_schedule: dict[int, int] | None = None,
        **kwargs: Any,
    ) -> GenerationResult:
        """Sample images. ``prompt`` may be a ready :class:`GenerateConfig`; else kwargs build one.

        ``callback`` gets a :class:`StepState` per step; if it also has an ``on_retry()`` method,
        that is called when a step's forwards are abandoned and repeated (out of memory).
        ``rows_schedule``: {model evaluation: rows per forward from then on}, as a manifest's
        ``engine.out_of_memory_fallbacks`` records; replay passes it to chunk the same way.

        ``conditioning``: precomputed embeddings (a loaded conditioning file) used instead of
        encoding the prompts; its batch must be 1 or the number of images.

        Holds :attr:`lock` for the whole run: concurrent calls on one pipeline wait their turn.
        """
        cfg = (
            prompt
            if isinstance(prompt, GenerateConfig)
            else GenerateConfig.create(prompt, negative_prompt, **kwargs)
        )
        # the family checks the terms (before any work) and adds its defaults, for the whole batch
        has_negative = any(cfg.negative_prompts) or (
            conditioning is not None and conditioning.uncond is not None
        )
        terms = cfg.guidance
        if cfg.default_cfg:  # CFG not asked for: the family's default instead of the global one
            terms = self.family.default_cfg(self.pipe, terms, has_negative)
        # the manifest records the resolved terms (default_cfg off), so replay needs no defaults
        terms = self.family.guidance_terms(self.pipe, terms, has_negative)
        cfg = replace(cfg, guidance=terms, default_cfg=False)
        with self.lock:
            return self._generate(cfg, callback, progress, decode, conditioning, rows_schedule)

    def _generate(
        self,
        cfg: GenerateConfig,
        callback: Callback | None,
        progress: bool,
        decode: bool,
        conditioning: ConditioningFile | None,
        rows_schedule: dict[int, int] | None,
    ) -> GenerationResult:
        if cfg.batch_invariant and cfg.num_images > 1:
            return self._generate_per_image(cfg, callback, progress, decode, conditioning, rows_schedule)
        height, width = cfg.height or self.default_size(), cfg.width or self.default_size()
        self._check_family(cfg, height, width)
        warn_size(width, height, self.default_size())
        if conditioning is None:
            windows = self.family.text_windows(self.pipe)
            warn_long_prompts(windows, cfg.prompts)
            warn_long_prompts(windows, cfg.negative_prompts, "negative prompt")
            cond, uncond = self.encode(cfg, height, width)
        else:
            cond, uncond = _broadcast(conditioning, cfg.num_images, self.pipe.device, self.model.dtype)
        cond, uncond = self.family.model_inputs(self.pipe, cfg.guidance, cond, uncond, height, width)
        seeds = image_seeds(cfg.seed, cfg.num_images)
        denoiser = self.denoiser()
        # a callback that records from module hooks (TraceRecorder) drops an abandoned attempt's records
        on_retry = getattr(callback, "on_retry", None)
        # a trace of module outputs needs every row through every module: no sharing while tracing
        share = cfg.prefix_sharing and not getattr(callback, "module_pattern", None)
        tracing = bool(getattr(callback, "module_pattern", None))
        compaction = self.family.text_compaction(tracing) if cfg.compact_text else None
        guided = GuidedModel(
            denoiser, cfg.guidance, cond, uncond, seeds, cfg.max_rows, rows_schedule, on_retry, share,
            compaction,
        )  # fmt: skip
        shape = self.family.latent_shape(self.pipe, cfg.num_images, height, width)
        init = (
            None
            if cfg.init_latents is None
            else init_rows(cfg.init_latents, shape, self.family, self.pipe, (height, width))
        )
        if cfg.noise == "comfy":
            latents, schedule = self._sample_comfy(
                cfg, guided, shape, (height, width), callback, progress, init
            )
        else:
            latents, schedule = self._sample_diffusers(
                cfg, guided, shape, seeds, (height, width), callback, progress, init
            )
        images = self.decode(latents) if decode else []
        manifests = [
            self.manifest(cfg, schedule, seeds[i], i, cond, uncond, height, width) for i in range(len(seeds))
        ]
        for i, m in enumerate(manifests):
            m["conditioning"]["source"] = "encoded" if conditioning is None else "file"
            if conditioning is not None:
                m["conditioning"]["metadata"] = dict(conditioning.metadata)
                if conditioning.path is not None:  # replay loads it again
                    m["conditioning"]["file"] = {"path": conditioning.path, "sha256": conditioning.sha256}
            m["output"] = {"latents_hash": tensor_hash(latents[i : i + 1]), "shape": list(latents.shape[1:])}
            m["engine"] = {
                "forward_calls": guided.forward_calls,
                # model evaluations of one image over the run: its rows in every call (cond,
                # uncond, each perturbed branch; those outside their window are not run)
                "model_evaluations": guided.rows_evaluated / len(seeds),
                "out_of_memory_fallbacks": {str(k): v for k, v in sorted(guided.fallbacks.items())},
                "prefix_sharing": guided.prefix_sharing,
                "compact_text": compact_record(cfg.compact_text, compaction, self.family.name),
            }
        if guided.fallbacks:
            warnings.warn(
                "ran out of memory: rows per forward reduced to "
                + ", ".join(f"{v} at model evaluation {k}" for k, v in sorted(guided.fallbacks.items()))
                + " (recorded in the manifest; --max-rows sets it from the start)",
                RuntimeWarning,
                stacklevel=2,
            )
        return GenerationResult(latents, images, manifests, guided.forward_calls)

    __call__ = generate

    def _generate_per_image(
        self,
        cfg: GenerateConfig,
        callback: Callback | None,
        progress: bool,
        decode: bool,
        conditioning: ConditioningFile | None,
        rows_schedule: dict[int, int] | None,
    ) -> GenerationResult:
        """Batch-invariant mode: image i is sampled alone (prompt i, seed + i), exactly as a
        one-image run of that seed, so it is bit-identical to it; the manifests describe the
        whole batch. ``callback`` sees each image's steps in turn."""
        parts = []
        for i in range(cfg.num_images):
            one = replace(
                cfg,
                prompts=(cfg.prompts[i],),
                negative_prompts=(cfg.negative_prompts[i],),
                seed=cfg.seed + i,
                init_latents=None if cfg.init_latents is None else cfg.init_latents.image(i, cfg.num_images),
            )
            cond_i = None if conditioning is None else conditioning.image(i, cfg.num_images)
            parts.append(
                self._generate(
                    one,
                    callback=callback,
                    progress=progress,
                    decode=decode,
                    conditioning=cond_i,
                    rows_schedule=rows_schedule,
                )
            )
        manifests = []
        for i, part in enumerate(parts):
            m = part.manifests[0]
            m["parameters"].update(cfg.describe())
            m["image"]["index"] = i
            manifests.append(m)
        return GenerationResult(
            torch.cat([p.latents for p in parts]),
            [im for p in parts for im in p.images],
            manifests,
            sum(p.forward_calls for p in parts),
        )

    def _sample_diffusers(
        self,
        cfg: GenerateConfig,
        guided: GuidedModel,
        shape: tuple[int, ...],
        seeds: list[int],
        size: tuple[int, int],
        callback: Callback | None,
        progress: bool,
        init: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        # One generator per image for the initial noise AND the scheduler's per-step noise, in
        # that order (as diffusers' pipelines do); fresh generators for the steps would replay
        # the initial noise in ancestral samplers.
        gens = generators(seeds)
        height, width = size
        stepper, scheduler = self.family.stepper(
            self.pipe,
            cfg.scheduler,
            cfg.steps,
            shift=cfg.shift,
            height=height,
            width=width,
            generators=gens,
            eta=cfg.eta,
        )
        if isinstance(stepper, DiscreteStepper):
            stepper.extra.update(churn_step_kwargs(cfg, scheduler))
            apply_thresholding(cfg, scheduler)
        elif cfg.s_churn or cfg.dynamic_thresholding is not None:
            raise ConfigError(
                f"s_churn and dynamic thresholding apply to the SD family's samplers, not to {type(scheduler).__name__}"
            )
        noise = initial_noise(seeds, shape[1:], self.pipe.device, guided.cond.dtype, gens=gens)
        if init is not None and cfg.strength < 1.0:  # img2img: the schedule's tail from the noised latents
            begin = img2img_begin(cfg.steps, cfg.strength, getattr(scheduler, "order", 1))
            packed = self.family.pack(init.to(noise.device, noise.dtype))
            stepper = TailStepper(stepper, begin, packed)
        x = run(guided, stepper, self.family.pack(noise), callback=callback, progress=progress)
        latents = self.family.unpack(x, height, width)
        schedule = {
            "name": cfg.scheduler,
            "class": type(scheduler).__name__,
            "config": dict(scheduler.config),
            "shift": cfg.shift,
            **({"churn": churn_step_kwargs(cfg, scheduler)} if cfg.s_churn else {}),
            "timesteps": list(stepper.timesteps),
            "sigmas": list(stepper.sigmas),
            "noise": {
                "policy": "diffusers",
                "generator": "cpu",
                "seeds": "seed + i, one generator per image",
            },
        }
        return latents, schedule

    def _sample_comfy(
        self,
        cfg: GenerateConfig,
        guided: GuidedModel,
        shape: tuple[int, ...],
        size: tuple[int, int],
        callback: Callback | None,
        progress: bool,
        init: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        height, width = size
        ms = self.family.comfy_model_sampling(self.pipe, height, width)
        if cfg.comfy_sampling is not None:
            ms = cfg.comfy_sampling.build(ms)
        name = cfg.schedule or "normal"
        sampler = COMFY_SAMPLER_NAMES[cfg.scheduler]
        sigmas = comfy_sigmas(
            name, cfg.steps, cfg.strength, model_sampling=ms
        )  # strength: KSampler's denoise
        timesteps = ms.model_timestep(sigmas[:-1])  # once per run, on the CPU
        dtype = guided.cond.dtype
        # ComfyUI samples in float32 whatever the model's dtype (only the model input is cast).
        noise = comfy_noise(cfg.seed, shape).to(self.pipe.device)
        churn = comfy_churn(cfg)
        stepper = ComfyStepper(
            ms,
            sigmas,
            timesteps,
            sampler,
            cfg.seed,
            dtype,
            self.family.pack,
            cfg.ancestral_eta,
            cfg.s_noise,
            churn,
            latent_image=None if init is None else init.to(noise.device),
        )
        x = run(guided, stepper, noise, callback=callback, progress=progress)
        latents = self.family.unpack(x, height, width)
        noise_desc: dict[str, Any] = {
            "policy": "comfy",
            "generator": "cpu",
            "seeds": "one generator seeded with seed, whole batch",
        }
        if sampler == "euler_ancestral":
            noise_desc["per_step"] = (
                "ComfyUI's default_noise_sampler: one generator on the sampling device, seeded with "
                "seed + 1 on the CPU (seed on other devices), whole batch per step"
            )
            noise_desc["per_step_device"] = str(noise.device)
        if churn is not None:
            noise_desc["per_step"] = CHURN_NOISE
            noise_desc["per_step_device"] = str(noise.device)
        schedule = {
            "name": f"comfy {sampler}/{name}",
            "class": type(ms).__name__,
            "sampler": {
                "name": sampler,
                **(
                    {"eta": cfg.ancestral_eta, "s_noise": cfg.s_noise} if sampler == "euler_ancestral" else {}
                ),
                **(churn_description(cfg, stepper.sigma_hats) if churn is not None else {}),
            },
            "schedule": name,
            "config": comfy_config(ms),
            "timesteps": [float(t) for t in timesteps.tolist()],
            "sigmas": sigmas.tolist(),
            "noise": noise_desc,
        }
        return latents, schedule

    def decode(self, latents: Tensor) -> list[Image.Image]:
        return self.family.decode(self.pipe, latents)

    def _check_family(self, cfg: GenerateConfig, height: int, width: int) -> None:
        """What this model's family cannot run: a one-line error before any work."""
        fam = self.family
        self.family.check_size(self.pipe, height, width)
        if cfg.noise == "comfy" and not fam.comfy:
            raise ConfigError(f"the comfy noise policy does not support {fam.name} models yet")
        if cfg.noise != "comfy" and cfg.scheduler not in fam.schedulers:
            raise ConfigError(
                f"scheduler '{cfg.scheduler}' does not run {fam.name} models; choose one of: "
                + ", ".join(fam.schedulers)
            )

    # -- provenance ------------------------------------------------------------------------
    def component_hashes(self) -> dict[str, str]:
        for name in self.family.components:
            module = getattr(self.pipe, name, None)
            if module is not None and name not in self._hashes:
                self._hashes[name] = module_hash(module)
        return dict(self._hashes)

    def manifest(
        self,
        cfg: GenerateConfig,
        schedule: dict[str, Any],
        seed: int,
        index: int,
        cond: Conditioning,
        uncond: Conditioning | None,
        height: int,
        width: int,
    ) -> dict[str, Any]:
        params = cfg.describe()
        params.update(height=height, width=width)
        rows = slice(index, index + 1)
        return {
            "diffguide_manifest": MANIFEST_VERSION,
            "model": {
                "source": self.source,
                "family": self.family.name,
                "architecture": self.family.architecture(self.pipe),
                "prediction_type": self.family.prediction(self.pipe),
                "hashes": self.component_hashes(),
                "loras": [{"path": lo.path, "scale": lo.scale, "sha256": lo.sha256} for lo in self.loras],
                "sampling_shift": cfg.shift,
            },
            "parameters": params,
            "image": {
                "index": index,
                "seed": seed,
                "prompt": cfg.prompts[index],
                "negative_prompt": cfg.negative_prompts[index],
            },
            "noise": {**schedule["noise"], "seed": seed},
            "scheduler": {k: v for k, v in schedule.items() if k != "noise"},
            "conditioning": {
                "cond": _hash_rows(cond, rows),
                "uncond": None if uncond is None else _hash_rows(uncond, rows),
            },
            "attention_backend": attention_backend(self.model),
            "environment": environment(self.pipe.device, self.model.dtype),
        }


def _broadcast(
    conditioning: ConditioningFile, count: int, device: torch.device, dtype: torch.dtype
) -> tuple[Conditioning, Conditioning | None]:
    """Conditioning of batch 1 or ``count``, as ``count`` rows on ``device`` in the model's ``dtype``
    (a float32 file drives a float16 model as its own encoder's output would)."""

    def fit(c: Conditioning) -> Conditioning:
        if c.batch not in (1, count):
            raise ConfigError(f"conditioning has batch {c.batch}, but {count} images were asked for")
        return c.repeat(count if c.batch == 1 else 1).to(device, dtype)

    uncond = conditioning.uncond
    return fit(conditioning.cond), (None if uncond is None else fit(uncond))


def comfy_config(ms: Any) -> dict[str, Any]:
    """The manifest's description of a comfy-policy model sampling."""
    if isinstance(ms, ComfyFluxSampling):
        return {"prediction_type": "flow", "flux_time_shift_mu": ms.shift, "table": len(ms.sigmas)}
    if isinstance(ms, ComfyFlowSampling):
        return {"prediction_type": "flow", "shift": ms.shift, "multiplier": ms.multiplier}
    return {"prediction_type": ms.prediction_type, "beta_schedule": "scaled_linear 0.00085..0.012"}


def _hash_rows(c: Conditioning, rows: slice) -> str:
    return tensor_hash(*(None if t is None else t[rows] for t in c.hash_order()))
