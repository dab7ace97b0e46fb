"""ComfyUI's CFGNorm node, both forms: keep the per-pixel norm of the guided prediction near the cond's.

Norms are over the channel dim of each pixel, as ComfyUI's ``dim=1``: dim 1 of (B, C, H, W); on a
packed transformer prediction (B, tokens, 4C) (Flux, Qwen-Image: 2x2 patches, channel-major) the C
channels of each of a token's 4 pixels (equal to ComfyUI's node within 5.7e-6 on a Qwen-Image
workflow, tests/test_comfy_workflow_parity.py). k = ``strength``.

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


def per_pixel(t: Tensor) -> Tensor:
    """``t`` with its channels on dim 1 per pixel: a packed (B, tokens, 4C) prediction (2x2 patches,
    channel-major, as Flux and Qwen-Image pack) viewed as (B, tokens, C, 4); (B, C, ...) as is."""
    if t.ndim == 3:
        b, n, ch = t.shape
        return t.reshape(b, n, ch // 4, 4).transpose(1, 2)  # (B, C, tokens, 4): channels on dim 1
    return t


def norm_post(g0: Tensor, c0: Tensor, strength: float) -> Tensor:
    g, c = per_pixel(g0), per_pixel(c0)
    ratio = c.norm(dim=1, keepdim=True) / (g.norm(dim=1, keepdim=True) + 1e-8)
    out = g * ratio.clamp(min=0.0, max=1.0) * strength
    return out.transpose(1, 2).reshape(g0.shape) if g0.ndim == 3 else out


def norm_pre(n_g0: Tensor, n_c0: Tensor, strength: float) -> Tensor:
    n_g, n_c = per_pixel(n_g0), per_pixel(n_c0)
    norm_c = torch.linalg.vector_norm(n_c, dim=1, keepdim=True)
    norm_g = torch.linalg.vector_norm(n_g, dim=1, keepdim=True)
    ratio = torch.where(norm_g > 0, norm_c / norm_g.clamp_min(1e-12), torch.ones_like(norm_g))
    rescaled = n_g * ratio
    out = strength * rescaled + (1.0 - strength) * n_g if strength != 1.0 else rescaled
    return out.transpose(1, 2).reshape(n_g0.shape) if n_g0.ndim == 3 else out


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
