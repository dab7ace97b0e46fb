"""ComfyUI's CFGNorm node, both forms: keep the per-pixel norm of the guided prediction near the cond's.

Norms are over the channel dim of each pixel (dim 1 of (B, C, H, W); on a packed transformer
prediction (B, tokens, channels) over each token's channels, i.e. per 2x2 patch on Flux, where
ComfyUI, which sees unpacked latents, takes them per pixel). k = ``strength``.

Post-CFG form (``pre_cfg=False``, the node's default), on the x0 estimates g0 (guided), c0 (cond)::

    g0 <- k * g0 * clamp(||c0|| / (||g0|| + 1e-8), 0, 1)           (attenuates only)

Pre-CFG form (``pre_cfg=True``), on ComfyUI's "noise" n = x - x0 (x: ComfyUI's model input, so
n = sigma * epsilon on epsilon models and sigma * v on flow models)::

    n_g <- n_g * ||n_c|| / ||n_g||  (1 where ||n_g|| = 0)            (can amplify)
    n_g <- k * that + (1 - k) * n_g

Both correct (``post``) the combined prediction of every term: [CFG(w), CFGNorm(k)] is the node on
a CFG model. Note that k scales x0 itself in the post form: k != 1 shrinks the image towards 0
(ComfyUI's behaviour). Cost: no extra rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Predictions, StepInfo, Window
from .space import comfy_input, x0_to_pred
from .term import Term, bounds, register


def channel_dim(t: Tensor) -> int:
    """The channel dim: 1 of a (B, C, H, W) latent, the last of a packed (B, tokens, channels) one."""
    return 1 if t.ndim == 4 else -1


def norm_post(g0: Tensor, c0: Tensor, strength: float) -> Tensor:
    d = channel_dim(g0)
    ratio = c0.norm(dim=d, keepdim=True) / (g0.norm(dim=d, keepdim=True) + 1e-8)
    return g0 * ratio.clamp(min=0.0, max=1.0) * strength


def norm_pre(n_g: Tensor, n_c: Tensor, strength: float) -> Tensor:
    d = channel_dim(n_g)
    norm_c = torch.linalg.vector_norm(n_c, dim=d, keepdim=True)
    norm_g = torch.linalg.vector_norm(n_g, dim=d, keepdim=True)
    ratio = torch.where(norm_g > 0, norm_c / norm_g.clamp_min(1e-12), torch.ones_like(norm_g))
    rescaled = n_g * ratio
    return strength * rescaled + (1.0 - strength) * n_g if strength != 1.0 else rescaled


@register("cfg_norm")
@dataclass(frozen=True)
class CFGNorm(Term):
    """ComfyUI's CFGNorm. ``strength`` k in [0, 100]; ``pre_cfg`` picks the form."""

    strength: float = 1.0
    pre_cfg: bool = False
    window: Window = field(default_factory=Window)
    name: str = "cfg_norm"

    label = "CFGNorm"
    ranges = bounds(strength=(0.0, 100.0))

    def active(self, step: StepInfo) -> bool:
        return step.sigma > 0.0 and self.window.contains(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return torch.zeros_like(preds["cond"])

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        g0, c0 = step.to_x0(guided), step.to_x0(preds["cond"])
        if self.pre_cfg:
            x = comfy_input(step)
            target = x - norm_pre(x - g0, x - c0, self.strength)
        else:
            target = norm_post(g0, c0, self.strength)
        return guided + x0_to_pred(step, target - g0)
