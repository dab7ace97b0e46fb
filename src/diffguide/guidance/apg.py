"""Adaptive Projected Guidance, APG (Sadat et al. 2024, arXiv:2410.02416, Algorithm 1).

In x0 space (the paper's; ``space="x0"``), with c0, u0 the denoised estimates of the two branches::

    D = c0 - u0
    D <- D + beta * D_prev             (momentum beta; D_prev: the running D of the previous step)
    D <- D * min(1, r / ||D||)         (norm threshold r; ||.|| over all of an image's values)
    D = D_par + D_perp                 (parallel / orthogonal to c0)
    g0 = c0 + (w - 1) (D_perp + eta * D_par)

and the prediction-space delta is the change of x0 mapped back (:mod:`.space`). With eta = 1,
r = 0, beta = 0 this is CFG with scale w. ``space="prediction"`` applies the same formula to the
model's raw output (epsilon / v / flow velocity), as diffusers' guider does.

Scale conventions: paper w. diffusers' ``AdaptiveProjectedGuidance`` with
``use_original_formulation=True`` computes ``c + guidance_scale * N``: its guidance_scale is
w - 1 (``adaptive_projected_guidance_rescale`` = r, ``..._momentum`` = beta, in prediction
space); its default formulation ``u + guidance_scale * N`` equals the paper only where N = D
(eta = 1, no clipping, no momentum). ComfyUI's APG node (pre-CFG, x0 space) returns
``c0 + cfg * N``: its ``cfg`` is w - 1 as well, so at eta = 1, r = 0 the node gives CFG at
cfg + 1, not the "default CFG behaviour" its tooltip promises. ComfyUI resets the momentum when
sigma rises between calls; so does this term.

Momentum is per run and per image: the running D is a (B, ...) tensor kept in the run's
:class:`~diffguide.guidance.base.RunState`, updated only on the steps where the term is active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import UNCOND, Branch, Predictions, StepInfo, Window
from .space import dims, x0_to_pred
from .term import Term, bounds, register

Space = Literal["x0", "prediction"]
SPACES: tuple[Space, ...] = ("x0", "prediction")


def project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of v relative to ``onto``, per image, computed in float64."""
    d = dims(v)
    v64, w64 = v.double(), onto.double()
    unit = w64 / w64.norm(p=2, dim=d, keepdim=True).clamp_min(1e-12)  # F.normalize over several dims
    parallel = (v64 * unit).sum(dim=d, keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


def clip_norm(d: Tensor, r: float) -> Tensor:
    """d scaled down to norm r where its per-image norm exceeds r (r = 0: unchanged)."""
    if r <= 0.0:
        return d
    norm = d.norm(p=2, dim=dims(d), keepdim=True)
    return d * torch.minimum(torch.ones_like(norm), r / norm)


def apg_update(d: Tensor, c: Tensor, eta: float, r: float) -> Tensor:
    """N = D_perp + eta * D_par of the clipped D, projected relative to c."""
    parallel, orthogonal = project(clip_norm(d, r), c)
    return orthogonal + eta * parallel


@register("apg")
@dataclass(frozen=True)
class APG(Term):
    """Adaptive Projected Guidance. ``scale`` w (1 = off), ``eta`` weight of the parallel part,
    ``norm_threshold`` r (0 = no clipping), ``momentum`` beta (0 = none), ``space`` x0 or prediction.
    Defaults: the paper's Algorithm 1 listing (eta 0, r 2.5, beta -0.75) at scale 7.5."""

    scale: float = 7.5
    eta: float = 0.0
    norm_threshold: float = 2.5
    momentum: float = -0.75
    space: Space = "x0"
    window: Window = field(default_factory=Window)
    name: str = "apg"

    off = 1.0
    ranges = bounds(scale=(0.0, 100.0), norm_threshold=(0.0, math.inf), momentum=(-5.0, 1.0))

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def _momentum(self, d: Tensor, step: StepInfo) -> Tensor:
        if self.momentum == 0.0:
            return d
        if step.state is None:
            raise ConfigError("APG with momentum needs the run's state: call it through GuidedModel")
        key = f"{self.name}:momentum"
        previous = step.state.get(key)
        if previous is not None and step.sigma <= previous[0]:
            d = d + self.momentum * previous[1]
        step.state[key] = (step.sigma, d)
        return d

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        c, u = preds["cond"], preds["uncond"]
        if self.space == "x0":
            c, u = step.to_x0(c), step.to_x0(u)
        update = (self.scale - 1.0) * apg_update(
            self._momentum(c - u, step), c, self.eta, self.norm_threshold
        )
        return x0_to_pred(step, update) if self.space == "x0" else update
