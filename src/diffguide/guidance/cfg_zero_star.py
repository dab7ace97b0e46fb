"""CFG-Zero* (Fan et al. 2025, arXiv:2503.18886): optimized scale and zero-init.

Per image, in the model's prediction space (the flow velocity in the paper; epsilon or v on UNets)::

    alpha = <c, u> / (||u||^2 + 1e-8)            (over all of an image's values, at least float32)
    g = alpha u + w (c - alpha u)

and for the first ``zero_init_steps`` model evaluations (``StepInfo.index < zero_init_steps``,
counted from the start of the run whatever the window) the guided prediction is zero: on a flow
model x stays where it is (ODE solvers start from the noise), on an epsilon model the step
scales x0 = x sqrt(1 + sigma^2). Zero-init is applied in :meth:`post`, to the prediction combined
from every term, as diffusers does; put this term last when composing with terms that have
their own ``post`` (CFG rescale divides by the std of a zero prediction).

Scale convention: w as in CFG (1 = off; then no optimized scale either). diffusers'
``ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=K)`` is the same formula
(default formulation). ComfyUI's ``CFGZeroStar`` node computes alpha from ``x - x0`` (proportional
to the prediction, so the same alpha) but applies ``alpha u0 + w (c0 - alpha u0)`` to the x0
estimates; x0 is affine in the prediction, not linear, so the node's x0 differs from the paper's
by ``(w - 1)(1 - alpha) x`` (x: ComfyUI's model input). The node has no zero-init.

Cost: one unconditional branch (also evaluated on the zero-init steps).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checks import GuidanceWarning
from ..defaults import DEFAULTS
from ..errors import ConfigError
from .base import UNCOND, Branch, Predictions, StepInfo, Window
from .term import Term, bounds, register


def optimized_scale(c: Tensor, u: Tensor, eps: float = 1e-8) -> Tensor:
    """alpha = <c, u> / (||u||^2 + eps) per image, shaped (B, 1, ..., 1), in c's dtype
    (computed in float32 as diffusers does, or float64 for a float64 model)."""
    dtype = torch.promote_types(c.dtype, torch.float32)
    cf, uf = c.flatten(1).to(dtype), u.flatten(1).to(dtype)
    alpha = (cf * uf).sum(dim=1) / ((uf * uf).sum(dim=1) + eps)
    return alpha.to(c.dtype).view(-1, *([1] * (c.ndim - 1)))


@register("cfg_zero_star")
@dataclass(frozen=True)
class CFGZeroStar(Term):
    """CFG-Zero*. ``scale`` w (1 = off), ``zero_init_steps`` K (0 = none)."""

    scale: float = DEFAULTS.cfg
    zero_init_steps: int = 1
    window: Window = field(default_factory=Window)
    name: str = "cfg_zero_star"

    label = "CFG-Zero*"
    off = 1.0
    ranges = bounds(scale=(0.0, 100.0))

    def validate(self) -> None:
        if self.zero_init_steps < 0:
            raise ConfigError(f"CFG-Zero* zero_init_steps must be >= 0, got {self.zero_init_steps}")

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def _guiding(self, step: StepInfo) -> bool:
        return self.scale != 1.0 and self.window.contains(step)

    def active(self, step: StepInfo) -> bool:
        return step.index < self.zero_init_steps or self._guiding(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        c, u = preds["cond"], preds["uncond"]
        if not self._guiding(step):
            return torch.zeros_like(c)
        return (self.scale - 1.0) * (c - optimized_scale(c, u) * u)  # = alpha u + w (c - alpha u) - c

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        if step.index == 0 and self.zero_init_steps > 0 and step.prediction != "flow":
            warnings.warn(
                f"CFG-Zero* zero-init (zero_init_steps={self.zero_init_steps}) is made for flow models; on "
                f"this {step.prediction} model a zero prediction keeps all the starting noise "
                "(docs/methods.md: FID 134 vs 38 on tiny-sd); use cfg_zero_star:zero_init_steps=0",
                GuidanceWarning,
                stacklevel=2,
            )
        return torch.zeros_like(guided) if step.index < self.zero_init_steps else guided
