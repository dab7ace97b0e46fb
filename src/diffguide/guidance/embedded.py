"""Embedded guidance: the guidance scale a guidance-distilled model takes as an input.

FLUX.1 [dev] was distilled from a CFG teacher: its transformer has a guidance embedding
(``guidance_embeds=True``) and takes the scale as a model input, next to the timestep, in the
one conditional forward. It is not a branch and combines no predictions: diffusers' FluxPipeline
``guidance_scale`` (default 3.5), ComfyUI's ``FluxGuidance`` node. This term only carries the
scale; the family adapter feeds it to the model (Flux: ``guidance = scale`` per row, which the
transformer multiplies by 1000 as it does the timestep). It can sit next to real guidance terms
(true CFG with a negative prompt, PAG, TPG), which then add branches as usual.

A family whose model has no guidance embedding (SD, SD3, schnell-like Flux) rejects the term.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from .base import Branch, Predictions, StepInfo, Window, check_finite

#: diffusers' FluxPipeline default ``guidance_scale``.
DEFAULT_EMBEDDED_GUIDANCE = 3.5


@dataclass(frozen=True)
class EmbeddedGuidance:
    """The embedded guidance scale (>= 0) of a guidance-distilled model; adds no branch."""

    scale: float = DEFAULT_EMBEDDED_GUIDANCE
    name: str = "embedded_guidance"

    def __post_init__(self) -> None:
        check_finite("embedded guidance scale", self.scale)
        if not 0.0 <= self.scale <= 100.0:
            raise ConfigError(f"embedded guidance scale must be in [0, 100], got {self.scale}")

    @property
    def window(self) -> Window:
        return Window()  # a model input for the whole run: no window

    def branches(self) -> tuple[Branch, ...]:
        return ()

    def active(self, step: StepInfo) -> bool:
        return False  # never combines predictions

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return preds["cond"].new_zeros(())

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        return guided

    def describe(self) -> dict[str, object]:
        return {"method": "embedded_guidance", "scale": self.scale}


def embedded_scale(terms: tuple[object, ...]) -> float | None:
    """The scale of the run's EmbeddedGuidance term (None without one); two are an error."""
    found = [t for t in terms if isinstance(t, EmbeddedGuidance)]
    if len(found) > 1:
        raise ConfigError("give embedded guidance once (it is one model input)")
    return found[0].scale if found else None
