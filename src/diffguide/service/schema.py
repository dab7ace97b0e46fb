"""The HTTP request of a job: the same fields as the CLI and :mod:`diffguide.app`, typed.

:meth:`JobRequest.to_config` builds the :class:`~diffguide.pipeline.GenerateConfig` exactly as
``diffguide generate`` does from the same values (same terms, same defaults), so a job's
result equals the CLI's bit for bit on the same thread count.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..defaults import DEFAULTS
from ..errors import ConfigError
from ..guidance.base import GuidanceTerm
from ..pipeline import GenerateConfig
from .models import check_model_name

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_SIDE = 2048


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    prompt: str | list[str] = Field(description="a prompt, or one per image")
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
        terms = None if self.guidance is None else [build_term(t, i) for i, t in enumerate(self.guidance)]
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
