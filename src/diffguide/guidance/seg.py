"""Smoothed Energy Guidance (SEG; Hong 2024, NeurIPS).

``p`` is the conditional prediction with the queries of the selected self-attention layers
blurred by a Gaussian of ``blur_sigma`` tokens (see :mod:`diffguide.perturb.query_blur`;
``blur_sigma=inf``, the default, is the paper's limit: every query the mean query). With
s = ``scale``::

    g = c + s (c - p)                       (SEG alone)
    g = c + (w - 1)(c - u) + s (c - p)      (with CFG w; the official pipeline's combination)

This is the official SDXL pipeline's convention (``seg_scale``, ``seg_blur_sigma``,
``seg_applied_layers=["mid"]``) and diffusers' ``SmoothedEnergyGuidance`` guider's formula
(``seg_guidance_scale``). That guider never installs its blur (a plain conditional pass, so
``p = c`` and SEG adds nothing) and inverts its finite/infinite blur test: docs/methods.md.
Defaults: s = 3 (the official example), infinite blur, PAG's layer preset (UNets: the mid
block's self-attention, the official default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..perturb.query_blur import QueryBlur
from .base import Branch, Predictions, StepInfo, Window, check_finite
from .perturbed import perturbation_delta
from .term import Term, register


@register("seg")
@dataclass(frozen=True)
class SEG(Term):
    """Smoothed Energy Guidance. ``blur_sigma`` in tokens (> 0; inf = the mean query)."""

    scale: float = 3.0
    blur_sigma: float = math.inf
    layers: str | None = None
    window: Window = field(default_factory=Window)
    name: str = "seg"

    def __post_init__(self) -> None:
        check_finite("SEG scale", self.scale)
        if not 0.0 <= self.scale <= 100.0:
            raise ConfigError(f"SEG scale must be in [0, 100], got {self.scale}")
        QueryBlur(self.layers, self.blur_sigma)  # validates blur_sigma

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", QueryBlur(self.layers, self.blur_sigma)),)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return perturbation_delta(preds["cond"], preds[self.name], self.scale)

    def describe(self) -> dict[str, object]:
        sigma = None if math.isinf(self.blur_sigma) else self.blur_sigma
        return {
            "method": "seg",
            "name": self.name,
            "scale": self.scale,
            "blur_sigma": sigma,  # None: infinite (JSON has no inf)
            "layers": self.layers,
            "window": self.window.describe(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SEG:
        """Inverse of :meth:`describe` (``blur_sigma`` None is the infinite blur)."""
        kwargs = {k: v for k, v in d.items() if k != "method"}
        if kwargs.get("blur_sigma") is None:
            kwargs["blur_sigma"] = math.inf
        if isinstance(kwargs.get("window"), dict):
            kwargs["window"] = Window.from_dict(kwargs["window"])  # type: ignore[arg-type]
        return cls(**kwargs)
