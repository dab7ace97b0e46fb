"""Tangential Damping CFG, TCFG (Kwon et al. 2025, arXiv:2503.18137).

Per image, with c and u flattened to rows of the 2 x D matrix A = [c; u] and v1 its first right
singular vector (the direction of largest energy), the unconditional prediction loses its
components tangential to v1 before CFG::

    u' = (u . v1) v1
    g  = u' + w (c - u')        (delta (w - 1)(c - u'))

in the model's prediction space (SVD in float32, or float64 for a float64 model). Scale convention: w as in CFG (1 = off).
diffusers' ``TangentialClassifierFreeGuidance(guidance_scale=w)`` (default formulation) is the
same; ComfyUI's TCFG node (pre-CFG) damps ``x - x0`` (sigma * epsilon, sigma * v on flow models),
a multiple of the prediction, which gives the same u' (v1 does not change with the scale, nor with
the order of A's rows: diffusers stacks [c; u], ComfyUI [u; c]).

Cost: one unconditional branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..defaults import DEFAULTS
from .base import UNCOND, Branch, Predictions, StepInfo, Window
from .term import Term, bounds, register


def damp_tangential(c: Tensor, u: Tensor) -> Tensor:
    """u' = (u . v1) v1 per image, v1 the first right singular vector of [c; u] (at least float32)."""
    dtype = torch.promote_types(c.dtype, torch.float32)
    a = torch.stack([c, u], dim=1).flatten(2).to(dtype)  # (B, 2, D)
    v1 = torch.linalg.svd(a, full_matrices=False).Vh[:, :1]  # (B, 1, D)
    uf = u.reshape(u.shape[0], 1, -1).to(dtype)
    return ((uf @ v1.transpose(-2, -1)) * v1).reshape(u.shape).to(u.dtype)


@register("tcfg")
@dataclass(frozen=True)
class TCFG(Term):
    """Tangential damping CFG. ``scale`` w (1 = off)."""

    scale: float = DEFAULTS.cfg
    window: Window = field(default_factory=Window)
    name: str = "tcfg"

    off = 1.0
    ranges = bounds(scale=(0.0, 100.0))

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        c = preds["cond"]
        return (self.scale - 1.0) * (c - damp_tangential(c, preds["uncond"]))
