"""Magnitude-aware guidance, MAMBO-G (diffusers' ``MagnitudeAwareGuidance``).

Per image, in the model's prediction space, the CFG scale shrinks where the guidance direction
is large relative to the unconditional prediction::

    r  = ||c - u|| / ||u||                 (over all of an image's values)
    w' = 1 + (w - 1) exp(-alpha r)
    g  = u + w' (c - u)                    (delta (w' - 1)(c - u))

Scale convention: w as in CFG (1 = off); diffusers' ``MagnitudeAwareGuidance(guidance_scale=w,
alpha=alpha)`` (default formulation) is the same (its defaults: w = 10, alpha = 8). diffusers'
``use_original_formulation=True`` is ``c + w exp(-alpha r)(c - u)``: its w is ours minus 1 only at
alpha = 0. diffusers 0.42's guider crashes on (B, C, H, W) predictions (UNets, SD3):
``torch.norm(x, dim=[1, 2, 3])`` with its default p='fro' raises "dim must be a 2-tuple"; it works
on packed (B, tokens, channels) ones (Flux). No ComfyUI core node. Cost: one unconditional branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import UNCOND, Branch, Predictions, StepInfo, Window
from .space import dims
from .term import Term, bounds, register


def magnitude_scale(c: Tensor, u: Tensor, w: float, alpha: float) -> Tensor:
    """w' = 1 + (w - 1) exp(-alpha ||c - u|| / ||u||), shaped (B, 1, ..., 1)."""
    d = dims(c)
    ratio = torch.linalg.vector_norm(c - u, dim=d, keepdim=True) / torch.linalg.vector_norm(
        u, dim=d, keepdim=True
    )
    return 1.0 + (w - 1.0) * torch.exp(-alpha * ratio)


@register("mag")
@dataclass(frozen=True)
class MagnitudeAware(Term):
    """Magnitude-aware guidance. ``scale`` w (1 = off), ``alpha`` >= 0 (0 = CFG)."""

    scale: float = 10.0
    alpha: float = 8.0
    window: Window = field(default_factory=Window)
    name: str = "mag"

    label = "magnitude-aware"
    off = 1.0
    ranges = bounds(scale=(0.0, 100.0), alpha=(0.0, math.inf))

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        c, u = preds["cond"], preds["uncond"]
        return (magnitude_scale(c, u, self.scale, self.alpha) - 1.0) * (c - u)
