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

from dataclasses import dataclass, field

from torch import Tensor

from ..defaults import DEFAULTS
from ..errors import ConfigError
from .base import UNCOND, Branch, Predictions, StepInfo, Window, check_finite


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


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance. ``scale`` w >= 0 (1 = off); ``rescale`` phi in [0, 1];
    ``renorm``: keep the per-token norm of the conditional prediction (Qwen-Image's true CFG)."""

    scale: float = DEFAULTS.cfg  # diffguide.defaults; diffusers' SD1.5 pipeline uses 7.5
    rescale: float = 0.0
    window: Window = field(default_factory=Window)
    name: str = "cfg"
    renorm: bool = False

    def __post_init__(self) -> None:
        check_finite("CFG scale", self.scale)
        check_finite("CFG rescale", self.rescale)
        if not 0.0 <= self.scale <= 100.0:
            raise ConfigError(f"CFG scale must be in [0, 100], got {self.scale}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ConfigError(f"CFG rescale must be in [0, 1], got {self.rescale}")
        if not isinstance(self.renorm, bool):
            raise ConfigError(f"CFG renorm must be true or false, got {self.renorm!r}")

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def active(self, step: StepInfo) -> bool:
        return self.scale != 1.0 and self.window.contains(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return cfg_delta(preds["cond"], preds["uncond"], self.scale)

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        if self.rescale != 0.0:
            guided = rescale(guided, preds["cond"], self.rescale)
        return renorm(guided, preds["cond"]) if self.renorm else guided

    def describe(self) -> dict[str, object]:
        return {
            "method": "cfg",
            "scale": self.scale,
            "rescale": self.rescale,
            "window": self.window.describe(),
            **({"renorm": True} if self.renorm else {}),  # absent = off (manifests before it)
        }
