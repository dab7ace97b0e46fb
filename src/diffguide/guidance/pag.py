"""Perturbed-Attention Guidance (Ahn et al. 2024).

``p`` is the conditional prediction with the selected self-attention maps replaced by the
identity (see :mod:`diffguide.perturb.identity_attention`). With s = ``scale``::

    g = c + s (c - p)                   (PAG alone)
    g = u + w (c - u) + s (c - p)       (with CFG)

This is the convention of diffusers' PAG pipelines (``pag_scale``) and of ComfyUI's
PerturbedAttentionGuidance node (``scale``). diffusers' *modular* PAG guider without CFG
computes ``p + s (c - p) = c + (s - 1)(c - p)``: its scale s equals diffguide's s - 1.

Adaptive scale, as diffusers' pipelines define it::

    s_t = max(0, s - adaptive_scale * (1000 - t))

t is :attr:`StepInfo.timestep`, the family's scheduler timestep on the 0..1000 scale: the
training timestep 999 -> 0 on SD1.5/SDXL; ``1000 sigma`` (1000 -> ~0) on flow models, which
is what diffusers' ``StableDiffusion3PAGPipeline`` passes (its scheduler's timesteps). With
the comfy noise policy t is ComfyUI's integer timestep of the step's sigma.

Paper defaults: mid-block self-attention on SD1.5 and SDXL; s = 3 with CFG 4, or s = 5 alone.

``post_cfg``: ``s (c - p)`` is added in :meth:`PAG.post` instead of as a delta, so it lands on the
result of the corrections of the terms before it (RescaleCFG, CFGNorm), as ComfyUI's node adds it
in a post-CFG function after theirs; the comfy workflow translation sets it where that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..perturb.identity_attention import IdentityAttention
from ..perturb.joint_identity import Semantics
from .base import Branch, Predictions, StepInfo, Window
from .perturbed import perturbation_delta
from .term import Term, bounds, register


def adaptive_scale(s: float, s_ad: float, t: float) -> float:
    """diffusers' adaptive PAG scale: max(0, s - s_ad (1000 - t))."""
    return max(0.0, s - s_ad * (1000.0 - t))


@register("pag")
@dataclass(frozen=True)
class PAG(Term):
    """Perturbed-Attention Guidance. ``layers``: a layer spec, or None for the paper's preset.

    ``semantics`` (joint attention of DiTs only; a UNet self-attention outputs V either way):
    ``"diagonal"``, diffusers' SD3 PAG processor (image-to-image scores masked to the diagonal,
    text kept), or ``"value"``, the modular guider's "attention output = V" for the whole joint
    sequence (docs/methods.md)."""

    scale: float = 3.0
    layers: str | None = None
    adaptive_scale: float = 0.0
    window: Window = field(default_factory=Window)
    name: str = "pag"
    semantics: Semantics = "diagonal"
    post_cfg: bool = False

    ranges = bounds(scale=(0.0, 100.0), adaptive_scale=(0.0, math.inf))
    # absent = diagonal / additive (manifests before them)
    optional = frozenset({"semantics", "post_cfg"})
    preset, layer_kind = "pag", "self-attention modules"

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", IdentityAttention(self.layers, self.semantics)),)

    def scale_at(self, step: StepInfo) -> float:
        if self.adaptive_scale == 0.0:
            return self.scale
        return adaptive_scale(self.scale, self.adaptive_scale, step.timestep)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        if self.post_cfg:
            return torch.zeros_like(preds["cond"])
        return perturbation_delta(preds["cond"], preds[self.name], self.scale_at(step))

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        """``post_cfg``: the term added to the result of the corrections (``post``) of the terms
        before it, as ComfyUI's post-CFG function (its node after a RescaleCFG or CFGNorm)."""
        if not self.post_cfg:
            return guided
        return guided + perturbation_delta(preds["cond"], preds[self.name], self.scale_at(step))
