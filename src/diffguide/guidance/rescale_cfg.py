"""ComfyUI's RescaleCFG node: guidance rescale (Lin et al. 2023) in v space, whatever the model predicts.

With x ComfyUI's model input (:func:`.space.comfy_input`), s = sigma, and x0 estimates c0, g0 of
the conditional and the guided prediction, the node turns both into v predictions::

    x' = x / (s^2 + 1)          v = (x' - x0) sqrt(s^2 + 1) / s
    v_r = phi * v_g * std(v_c) / std(v_g) + (1 - phi) * v_g     (std over an image's values)
    x0 <- x' - v_r s / sqrt(s^2 + 1)

(phi = ``multiplier``; ComfyUI's default 0.7). On an epsilon model this is not diffusers'
``guidance_rescale`` (:class:`~diffguide.guidance.cfg.CFG` ``rescale``), which rescales epsilon
itself: the std of v includes the x-dependent part. On flow models ComfyUI applies the same
formula to its input and x0 as they are (the formula assumes the SD family's sigma); so does this.

``columns`` mirrors the node on a 5-D ComfyUI latent ``[B, C, 1, H, W]`` (Qwen-Image's
EmptyHunyuanLatentVideo): there its ``std(dim=(1, 2, 3))`` is over C, the frame and H only, one std
per latent column; ``columns`` = W (latent pixels) takes the std per column too, unpacking a packed
(B, tokens, 4C) prediction (2x2 patches, channel-major) to (B, C, H, W) first. 0 (the default): one
std per image, the node on a 4-D latent.

Here it is a correction (``post``) of the combined prediction of every term, with no branch of its
own: [CFG(w), RescaleCFG(phi)] is the node on a CFG model. At sigma 0 it is the identity (ComfyUI
divides by zero there). Cost: no extra rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Predictions, StepInfo, Window
from .space import comfy_input, dims, x0_to_pred
from .term import Term, bounds, register


def unpack(t: Tensor, columns: int) -> Tensor:
    """A packed (B, tokens, 4C) prediction (2x2 patches, channel-major) as (B, C, H, W), W = columns;
    a (B, C, H, W) one as is."""
    if t.ndim != 3:
        return t
    b, n, ch = t.shape
    w2 = columns // 2
    if columns % 2 or n % w2:
        raise ConfigError(f"rescale_cfg columns {columns} does not fit a packed latent of {n} tokens")
    t = t.reshape(b, n // w2, w2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(b, ch // 4, 2 * (n // w2), columns)


def pack(t: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`unpack` for a tensor shaped as ``like`` was."""
    if like.ndim != 3:
        return t
    b, c, h, w = t.shape
    t = t.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(like.shape)


def rescale_in_v(
    g0: Tensor, c0: Tensor, x: Tensor, sigma: float, phi: float, per_column: bool = False
) -> Tensor:
    """The node's rescaled x0, from the x0 estimates g0 (guided) and c0 (cond) at ComfyUI input x;
    ``per_column``: one std per (B, C, H, W) column (the node's std over dims 1-3 of a 5-D latent)."""
    root = math.sqrt(sigma * sigma + 1.0)
    xs = x / (sigma * sigma + 1.0)
    v_g, v_c = (xs - g0) * root / sigma, (xs - c0) * root / sigma
    d = [1, 2] if per_column else dims(v_g)
    rescaled = v_g * (v_c.std(dim=d, keepdim=True) / v_g.std(dim=d, keepdim=True))
    v = phi * rescaled + (1.0 - phi) * v_g
    return xs - v * sigma / root


@register("rescale_cfg")
@dataclass(frozen=True)
class RescaleCFG(Term):
    """ComfyUI's RescaleCFG. ``multiplier`` phi in [0, 1]; ``columns``: the latent width for
    ComfyUI's per-column std on a 5-D latent (0: per image)."""

    multiplier: float = 0.7
    columns: int = 0
    window: Window = field(default_factory=Window)
    name: str = "rescale_cfg"

    label = "RescaleCFG"
    ranges = bounds(multiplier=(0.0, 1.0), columns=(0, 4096))

    def active(self, step: StepInfo) -> bool:
        return self.multiplier != 0.0 and step.sigma > 0.0 and self.window.contains(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return torch.zeros_like(preds["cond"])

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        g0, c0 = step.to_x0(guided), step.to_x0(preds["cond"])
        if not self.columns:
            target = rescale_in_v(g0, c0, comfy_input(step), float(step.sigma), self.multiplier)
            return guided + x0_to_pred(step, target - g0)
        g, c, x = (unpack(t, self.columns) for t in (g0, c0, comfy_input(step)))
        if g.shape[-1] != self.columns:
            raise ConfigError(f"rescale_cfg columns {self.columns}, but the latent is {g.shape[-1]} wide")
        target = pack(rescale_in_v(g, c, x, float(step.sigma), self.multiplier, True), g0)
        return guided + x0_to_pred(step, target - g0)
