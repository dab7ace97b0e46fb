"""The HTTP request of a job: the same fields as the CLI and :mod:`diffguide.app`, typed.

:meth:`JobRequest.to_config` builds the :class:`~diffguide.pipeline.GenerateConfig` exactly as
``diffguide generate`` does from the same values (same terms, same defaults), so a job's
result equals the CLI's bit for bit on the same thread count.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..defaults import DEFAULTS
from ..errors import ConfigError
from ..guidance.base import GuidanceTerm
from ..pipeline import GenerateConfig
from ..sampling.init import InitLatents, check_strength_value
from .models import check_model_name

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_SIDE = 2048


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(Strict):
    """A file of the request: exactly one of ``upload`` (an id from ``POST /v1/uploads``),
    ``base64`` (the file's bytes, in a JSON body) or ``part`` (a file part of a multipart body).
    Stored requests hold ``upload`` only."""

    upload: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="id from POST /v1/uploads")
    base64: str | None = Field(None, description="the .safetensors file, base64-encoded")
    part: str | None = Field(None, description="the name of a file part of a multipart/form-data body")

    @model_validator(mode="after")
    def _one(self) -> FileRef:
        if sum(v is not None for v in (self.upload, self.base64, self.part)) != 1:
            raise ValueError("give exactly one of 'upload' (an id), 'base64' or 'part'")
        return self


class LoraRef(Strict):
    """A LoRA (.safetensors, diffusers/peft or kohya keys as ``diffguide generate --lora``) and its scale."""

    file: FileRef
    scale: float = Field(1.0, ge=-100.0, le=100.0)


def build_term(spec: dict[str, Any], index: int) -> GuidanceTerm:
    """A term from its JSON form: ``method`` (any registered one, see ``diffguide guides``) and
    that method's parameters by name, a window as ``{start, end, sigma_min, sigma_max}``: the
    manifest's form, so a manifest's ``parameters.guidance`` can be sent back as is."""
    from ..guidance.registry import term_class

    cls = term_class(spec.get("method"), f" in guidance[{index}]")
    return cls.from_dict({k: v for k, v in spec.items() if v is not None})  # null: the default


class JobRequest(Strict):
    """One generation: ``POST /v1/jobs``'s body. Defaults are the CLI's (diffguide.defaults)."""

    model: str = "tiny-sd"
    prompt: str | list[str] | None = Field(
        None, description="a prompt, or one per image; may be left out with a conditioning file"
    )
    negative_prompt: str | list[str] = ""
    num_images: int | None = Field(None, ge=1, le=MAX_IMAGES)
    guidance: list[dict[str, Any]] | None = Field(
        None,
        description='guidance terms, e.g. {"method": "pag", "scale": 1.5, "layers": "mid"}; '
        "any registered method and its parameters (diffguide guides); null: the default (CFG 4), "
        "as the CLI without --cfg",
    )
    steps: int = Field(DEFAULTS.steps, ge=1, le=MAX_STEPS)
    width: int | None = Field(None, ge=8, le=MAX_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    seed: int = Field(DEFAULTS.seed, ge=0)
    scheduler: str = DEFAULTS.scheduler
    eta: float = DEFAULTS.eta
    noise: str = DEFAULTS.noise
    schedule: str | None = None
    shift: float = DEFAULTS.shift
    batch_invariant: bool = False
    max_rows: int | None = Field(None, ge=1)
    callback_url: str | None = Field(None, description="POSTed the job's status when it ends")
    conditioning: FileRef | None = Field(
        None,
        description="precomputed prompt embeddings instead of encoding the prompts: diffguide's "
        "conditioning file (prompt_embeds, negative_prompt_embeds, ...) as generate --conditioning, "
        "or ComfyUI's CONDITIONING saved by save_comfy_conditioning (the positive one)",
    )
    negative_conditioning: FileRef | None = Field(
        None, description="with a ComfyUI-form conditioning: the negative one (ComfyUI form)"
    )
    loras: list[LoraRef] = Field(
        default_factory=list, max_length=8, description="as generate --lora, in order"
    )
    initial_latents: FileRef | None = Field(
        None,
        description="start from these latents (img2img), as generate --init-latents: a safetensors file "
        "with one model-space latent tensor (batch 1 or one per image), or ComfyUI's SaveLatent file",
    )
    strength: float = Field(
        1.0,
        description="with initial_latents: how much of the schedule runs, in (0, 1], as generate --strength",
    )
    trace: bool = Field(
        False, description="record the step trace (generate --trace): GET /v1/jobs/{id}/trace"
    )
    trace_modules: str | None = Field(
        None, description="with trace: also module outputs (generate --trace-modules)"
    )
    vae_preview_every: int = Field(
        0, ge=0, description="a VAE-decoded preview in the event stream every this many steps (0: none)"
    )

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_IMAGES:
            raise ValueError(f"give 1 to {MAX_IMAGES} prompts, got {len(v)}")
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"callback_url must be an http(s) URL, got '{v[:80]}'")
        return v

    def to_config(
        self, conditioning_prompt: str | None = None, init_latents: InitLatents | None = None
    ) -> GenerateConfig:
        """The run's config (ConfigError on a bad combination, before anything is queued).
        ``conditioning_prompt``: the conditioning file's ``prompt`` metadata (the prompt when none
        is given, as in the CLI). ``init_latents``: the loaded ``initial_latents`` file (without it, on
        submission, only the strength is checked; the file was checked when it was staged)."""
        self._check_files()
        terms = None if self.guidance is None else [build_term(t, i) for i, t in enumerate(self.guidance)]
        count = self.num_images
        given = self.prompt if self.prompt is not None else (conditioning_prompt or "<conditioning file>")
        prompt = given if isinstance(given, str) or len(given) > 1 else given[0]
        cfg = GenerateConfig.create(
            prompt,
            self.negative_prompt,
            num_images=count,
            guidance=terms,
            steps=self.steps,
            width=self.width,
            height=self.height,
            seed=self.seed,
            scheduler=self.scheduler,
            eta=self.eta,
            max_rows=self.max_rows,
            noise=self.noise,
            schedule=self.schedule,
            shift=self.shift,
            batch_invariant=self.batch_invariant,
            prefix_sharing=not self.trace_modules,  # module traces need every row through every module
            **self._init_kwargs(init_latents),
        )
        if cfg.num_images > MAX_IMAGES:
            raise ConfigError(f"at most {MAX_IMAGES} images per job, got {cfg.num_images}")
        return cfg

    def _init_kwargs(self, init: InitLatents | None) -> dict[str, Any]:
        if init is not None:
            return {"init_latents": init, "strength": self.strength}
        if self.initial_latents is not None:  # submission: the file is read when the job runs
            check_strength_value(self.strength)
            return {}
        return {"strength": self.strength}  # strength < 1 without latents: GenerateConfig's error

    def _check_files(self) -> None:
        if self.prompt is None and self.conditioning is None:
            raise ConfigError("give a prompt, or a conditioning file ('conditioning')")
        if self.negative_conditioning is not None and self.conditioning is None:
            raise ConfigError("negative_conditioning needs a (ComfyUI-form) conditioning")
        if self.trace_modules and not self.trace:
            raise ConfigError("trace_modules needs trace: true")
        if self.trace and self.batch_invariant:
            raise ConfigError(
                "a trace records the steps of one batch; with batch_invariant each image is sampled alone: "
                "trace one image at a time (num_images 1 with its seed)"
            )
