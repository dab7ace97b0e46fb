"""Fooocus's adaptive CFG: CFG at a high scale that mimics a lower one early in sampling.

Fooocus (lllyasviel, ``modules/patch.py``: ``compute_cfg``) blends, at a scale w above the mimicked
scale w_m, the real CFG prediction with the one at w_m by the diffusion progress
t = 1 - timestep / 999 (0 at the first, pure-noise step, 1 at the end)::

    g = t * CFG(w) + (1 - t) * CFG(w_m)        if w > w_m       (CFG(v) = u + v (c - u))
    g = CFG(w)                                 otherwise

that is CFG with the scale ``w_t = t w + (1 - t) w_m``: early steps are guided like w_m (less
saturation, Fooocus's "TSNR mimicry"), late steps with the full w. Fooocus combines ``x - x0``
(sigma * epsilon); the blend is linear, so any prediction space gives the same x0.

t is taken from :attr:`StepInfo.timestep` (the 0..999 training timestep on the SD family, what
Fooocus reads from ComfyUI's model sampling; ``1000 sigma`` on flow models, where t is clamped to
[0, 1]). Defaults: Fooocus's ``adaptive_cfg`` 7 as ``mimic``; ``scale`` 10.

Sharpness (``sharpness`` s; Fooocus's default 2, here 0 = off): Fooocus replaces the cond "noise"
``n = x - x0`` (ComfyUI's input minus the cond's x0) in that CFG by ``n + a (F(n) - n)``, F its
anisotropic filter (:mod:`.sharpness`), ``a = 0.001 s t``, so the guided noise gains
``w_t a (F(n) - n)``; here that change is mapped to the prediction (:mod:`.space`). It needs the
model input x and (B, C, H, W) predictions. Cost: one unconditional branch, as CFG, plus the
13 x 13 filter of one image per image when sharpness is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .base import UNCOND, Branch, Predictions, StepInfo, Window
from .sharpness import anisotropic
from .space import comfy_input, x0_to_pred
from .term import Term, bounds, register


def progress(timestep: float) -> float:
    """Fooocus's diffusion progress 1 - timestep / 999, clamped to [0, 1]."""
    return min(1.0, max(0.0, 1.0 - timestep / 999.0))


def adaptive_scale(w: float, mimic: float, t: float) -> float:
    """The effective CFG scale: t w + (1 - t) mimic above the mimicked scale, else w."""
    return t * w + (1.0 - t) * mimic if w > mimic else w


@register("adaptive_cfg")
@dataclass(frozen=True)
class AdaptiveCFG(Term):
    """Fooocus's adaptive CFG. ``scale`` w (1 = off), ``mimic`` w_m (Fooocus's ``adaptive_cfg``),
    ``sharpness`` (Fooocus's sharpness; 0 = off)."""

    scale: float = 10.0
    mimic: float = 7.0
    sharpness: float = 0.0
    window: Window = field(default_factory=Window)
    name: str = "adaptive_cfg"

    label = "adaptive CFG"
    off = 1.0
    ranges = bounds(scale=(0.0, 100.0), mimic=(0.0, 100.0), sharpness=(0.0, 30.0))

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def scale_at(self, step: StepInfo) -> float:
        return adaptive_scale(self.scale, self.mimic, progress(step.timestep))

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        c, w = preds["cond"], self.scale_at(step)
        delta = (w - 1.0) * (c - preds["uncond"])
        a = 0.001 * self.sharpness * progress(step.timestep)
        if a == 0.0:
            return delta
        c0 = step.to_x0(c)
        n = comfy_input(step) - c0
        return delta + x0_to_pred(step, -w * a * (anisotropic(n, c0) - n))
