"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023).

Formula (epsilon or v space; w = ``scale``)::

    g = u + w (c - u)  =  c + (w - 1)(c - u)

Convention: w = 1 is no guidance (no unconditional branch is evaluated); this is the
convention of diffusers' pipelines (``guidance_scale``) and ComfyUI's ``cfg``. ComfyUI
combines in x0 space; for a linear combination at one sigma the two are identical.

Rescale (phi = ``rescale``), applied to the combined prediction as diffusers does::

    g <- phi * g * std(c) / std(g) + (1 - phi) * g      (std over all non-batch dims)

Norm-preserving true CFG (``renorm=True``; Qwen-Image's pipeline), applied to the combined
prediction after the rescale::

    g <- g * ||c|| / ||g||      (L2 norm over the LAST dim, per token; no epsilon)

On a packed transformer prediction (B, tokens, channels) the last dim is each token's channels
(64 = 16 latent channels x 2x2 patch on Qwen-Image), exactly diffusers'
``torch.norm(dim=-1, keepdim=True)``; a token where g is zero gives nan, as in diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..defaults import DEFAULTS
from .base import UNCOND, Branch, Predictions, StepInfo, Window
from .term import Term, bounds, register


def cfg_delta(c: Tensor, u: Tensor, w: float) -> Tensor:
    """(w - 1)(c - u), so that c + delta = u + w (c - u).  c, u: (B, C, H, W)."""
    return (w - 1.0) * (c - u)


def renorm(g: Tensor, c: Tensor) -> Tensor:
    """g rescaled to the norm of c over the last dim (per token): ``g * ||c|| / ||g||``."""
    return g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True))


def rescale(g: Tensor, c: Tensor, phi: float) -> Tensor:
    """Guidance rescale: match the std of g to that of c, blended by phi.  g, c: (B, ...)."""
    dims = list(range(1, c.ndim))
    std_c = c.std(dim=dims, keepdim=True)
    std_g = g.std(dim=dims, keepdim=True)
    return phi * (g * (std_c / std_g)) + (1.0 - phi) * g


@register("cfg")
@dataclass(frozen=True)
class CFG(Term):
    """Classifier-free guidance. ``scale`` w >= 0 (1 = off); ``rescale`` phi in [0, 1];
    ``renorm``: keep the per-token norm of the conditional prediction (Qwen-Image's true CFG)."""

    scale: float = DEFAULTS.cfg  # diffguide.defaults; diffusers' SD1.5 pipeline uses 7.5
    rescale: float = 0.0
    window: Window = field(default_factory=Window)
    name: str = "cfg"
    renorm: bool = False

    off = 1.0
    ranges = bounds(scale=(0.0, 100.0), rescale=(0.0, 1.0))
    optional = frozenset({"renorm"})  # absent = off (manifests before it)
    hidden = frozenset({"name"})  # manifests never recorded CFG's name

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return cfg_delta(preds["cond"], preds["uncond"], self.scale)

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        if self.rescale != 0.0:
            guided = rescale(guided, preds["cond"], self.rescale)
        return renorm(guided, preds["cond"]) if self.renorm else guided

    @classmethod
    def a1111(cls, d: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The CFG scale has its fixed place in the A1111 text; the rescale follows it."""
        return [("CFG Rescale phi", f"{float(d['rescale']):g}")] if d.get("rescale") else []
