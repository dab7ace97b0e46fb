"""ComfyUI's CFGNorm node (``comfy_extras/nodes_cfg.py``) as a guidance correction.

CFGNorm adds no branch: it rescales the combined prediction of the terms before it (CFG) per
pixel, with norms over the latent channels (ComfyUI's ``dim=1``). Two forms, as the node:

* post-CFG (default; ``pre_cfg=False``), in x0 space, attenuate only::

      x0_g <- x0_g * clamp(||x0_c|| / (||x0_g|| + 1e-8), 0, 1) * strength

  where ``x0_g`` is the guided denoised estimate and ``x0_c`` the conditional one; the result is
  turned back into the model's prediction space (the sampler then gets exactly that x0).
* ``pre_cfg=True``: the combined prediction ``comb = u + w (c - u)`` rescaled to the norm of the
  conditional one, without clamping (can amplify), blended by strength::

      comb <- s * comb * (||c|| / ||comb||) + (1 - s) * comb      (ratio 1 where ||comb|| = 0)

  ComfyUI computes this on ``x - x0`` (``sigma eps`` or ``sigma v``): the ratio is the same in the
  epsilon and flow prediction spaces, so it is applied there (not defined for v-prediction).

Channels: dim 1 of an unpacked latent ``(B, C, ...)``; on a packed transformer layout
``(B, tokens, 4C)`` (Flux, Qwen-Image: 2x2 patches, channel-major) the C channels of each of the
4 pixels of a token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Predictions, StepInfo, Window
from .term import Term, bounds, register


def channel_norm(t: Tensor) -> Tensor:
    """L2 norm over the latent channels, broadcastable against ``t`` (see the module doc)."""
    if t.ndim == 3:  # packed (B, tokens, C * 4): per pixel of each 2x2 patch
        b, n, ch = t.shape
        return torch.linalg.vector_norm(t.reshape(b, n, ch // 4, 4), dim=2, keepdim=True)
    return torch.linalg.vector_norm(t, dim=1, keepdim=True)


def _scaled(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` where ``scale`` is a :func:`channel_norm`-shaped factor."""
    if t.ndim == 3:
        b, n, ch = t.shape
        return (t.reshape(b, n, ch // 4, 4) * scale).reshape(b, n, ch)
    return t * scale


def x0_to_prediction(prediction: str, x: Tensor, sigma: float, x0: Tensor) -> Tensor:
    """The prediction that :func:`~diffguide.models.denoiser.prediction_to_x0` maps to ``x0``."""
    if prediction == "flow":
        return (x - x0) / sigma
    if prediction == "epsilon":
        return (x * (1 + sigma * sigma) ** 0.5 - x0) / sigma
    if prediction == "v_prediction":
        return (x - x0 * (1 + sigma * sigma) ** 0.5) / sigma
    raise ConfigError(f"CFGNorm: unknown prediction type '{prediction}'")


@register("cfgnorm")
@dataclass(frozen=True)
class CFGNorm(Term):
    """ComfyUI's CFGNorm: ``strength`` in [0, 100]; ``pre_cfg`` selects the node's pre-CFG form.

    Adds no branch and no delta: it corrects the combined prediction (``post``), so it goes after
    CFG in the term list. Active inside its window at every strength (strength 0 zeroes the
    guided x0, as the node does)."""

    strength: float = 1.0
    pre_cfg: bool = False
    window: Window = field(default_factory=Window)
    name: str = "cfgnorm"

    label = "CFGNorm"
    ranges = bounds(strength=(0.0, 100.0))
    hidden = frozenset({"name"})

    def scale_at(self, step: StepInfo) -> float:
        return self.strength

    def active(self, step: StepInfo) -> bool:
        return self.window.contains(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return torch.zeros_like(preds["cond"])

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        if self.pre_cfg:
            return self._pre(guided, preds["cond"], step)
        x0_g = step.to_x0(guided.float())
        x0_c = step.to_x0(preds["cond"].float())
        scale = (channel_norm(x0_c) / (channel_norm(x0_g) + 1e-8)).clamp(min=0.0, max=1.0)
        x0 = _scaled(x0_g, scale) * self.strength
        assert step.x is not None  # to_x0 checked it
        return x0_to_prediction(step.prediction, step.x.float(), step.sigma, x0).to(guided.dtype)

    def _pre(self, comb: Tensor, cond: Tensor, step: StepInfo) -> Tensor:
        if step.prediction == "v_prediction":
            raise ConfigError("CFGNorm pre_cfg is not supported on v-prediction models")
        cond_norm, comb_norm = channel_norm(cond), channel_norm(comb)
        ratio = torch.where(comb_norm > 0, cond_norm / comb_norm.clamp_min(1e-12), torch.ones_like(comb_norm))
        rescaled = _scaled(comb, ratio)
        if self.strength != 1.0:
            rescaled = self.strength * rescaled + (1.0 - self.strength) * comb
        return rescaled
