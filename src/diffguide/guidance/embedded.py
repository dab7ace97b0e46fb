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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from .base import Predictions, StepInfo, Window
from .term import Term, bounds, register

#: diffusers' FluxPipeline default ``guidance_scale``.
DEFAULT_EMBEDDED_GUIDANCE = 3.5


@register("embedded_guidance")
@dataclass(frozen=True)
class EmbeddedGuidance(Term):
    """The embedded guidance scale (>= 0) of a guidance-distilled model; adds no branch."""

    scale: float = DEFAULT_EMBEDDED_GUIDANCE
    name: str = "embedded_guidance"
    window: Window = field(default_factory=Window, init=False, repr=False)  # a model input: no window

    label = "embedded guidance"
    hidden = frozenset({"name"})  # the manifest records the scale only
    ranges = bounds(scale=(0.0, 100.0))

    def active(self, step: StepInfo) -> bool:
        return False  # never combines predictions

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return preds["cond"].new_zeros(())

    @classmethod
    def a1111(cls, d: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Forge's key for Flux's embedded guidance."""
        return [("Distilled CFG Scale", f"{float(d['scale']):g}")] if "scale" in d else []


def embedded_scale(terms: tuple[object, ...]) -> float | None:
    """The scale of the run's EmbeddedGuidance term (None without one); two are an error."""
    found = [t for t in terms if isinstance(t, EmbeddedGuidance)]
    if len(found) > 1:
        raise ConfigError("give embedded guidance once (it is one model input)")
    return found[0].scale if found else None
