"""The HTTP request of a job: the same fields as the CLI and :mod:`diffguide.app`, typed.

:meth:`JobRequest.to_config` builds the :class:`~diffguide.pipeline.GenerateConfig` exactly as
``diffguide generate`` does from the same values (same terms, same defaults), so a job's
result equals the CLI's bit for bit on the same thread count.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..defaults import DEFAULTS
from ..errors import ConfigError
from ..guidance import CFG, PAG, SLG, TPG, Window
from ..guidance.base import GuidanceTerm
from ..pipeline import GenerateConfig
from .models import check_model_name

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_SIDE = 2048


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowIn(Strict):
    """When a term is active: fractions of the run [start, end) and noise levels [sigma_min, sigma_max]."""

    start: float = 0.0
    end: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float | None = None  # None: no upper bound

    def build(self) -> Window:
        hi = math.inf if self.sigma_max is None else self.sigma_max
        return Window(sigma_min=self.sigma_min, sigma_max=hi, start=self.start, end=self.end)


def _window(w: WindowIn | None) -> Window:
    return Window() if w is None else w.build()


class CFGIn(Strict):
    method: Literal["cfg"]
    scale: float = DEFAULTS.cfg
    rescale: float = 0.0
    renorm: bool = False
    window: WindowIn | None = None

    def build(self) -> GuidanceTerm:
        return CFG(self.scale, self.rescale, _window(self.window), renorm=self.renorm)


class PAGIn(Strict):
    method: Literal["pag"]
    scale: float = 3.0
    layers: str | None = None
    adaptive: float = 0.0
    window: WindowIn | None = None

    def build(self) -> GuidanceTerm:
        return PAG(self.scale, self.layers, self.adaptive, _window(self.window))


class TPGIn(Strict):
    method: Literal["tpg"]
    scale: float = 3.0
    layers: str | None = None
    window: WindowIn | None = None

    def build(self) -> GuidanceTerm:
        return TPG(self.scale, self.layers, _window(self.window))


class SLGIn(Strict):
    method: Literal["slg"]
    scale: float = 2.8
    layers: str | None = None
    start: float = 0.01
    stop: float = 0.2

    def build(self) -> GuidanceTerm:
        return SLG(self.scale, self.layers, self.start, self.stop)


Term = Annotated[CFGIn | PAGIn | TPGIn | SLGIn, Field(discriminator="method")]


class JobRequest(Strict):
    """One generation: ``POST /v1/jobs``'s body. Defaults are the CLI's (diffguide.defaults)."""

    model: str = "tiny-sd"
    prompt: str | list[str] = Field(description="a prompt, or one per image")
    negative_prompt: str | list[str] = ""
    num_images: int | None = Field(None, ge=1, le=MAX_IMAGES)
    guidance: list[Term] | None = Field(
        None, description="guidance terms; null: the default (CFG 4), as the CLI without --cfg"
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

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
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

    def to_config(self) -> GenerateConfig:
        """The run's config (ConfigError on a bad combination, before anything is queued)."""
        terms = None if self.guidance is None else [t.build() for t in self.guidance]
        count = self.num_images
        prompt = self.prompt if isinstance(self.prompt, str) or len(self.prompt) > 1 else self.prompt[0]
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
        )
        if cfg.num_images > MAX_IMAGES:
            raise ConfigError(f"at most {MAX_IMAGES} images per job, got {cfg.num_images}")
        return cfg
