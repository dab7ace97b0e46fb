"""NAG: Normalized Attention Guidance (Chen et al. 2025, "Universal Negative Guidance for Diffusion Models").

A negative prompt acting inside cross-attention instead of through an unconditional prediction:
on the conditional rows, every selected cross-attention output is extrapolated away from the
negative prompt's and clipped (see :mod:`diffguide.perturb.nag_attention`)::

    z = alpha clip_tau(phi z+ - (phi - 1) z-) + (1 - alpha) z+

Scale convention: ``scale`` is the official ``nag_scale`` phi (1 = off; the paper's
``z+ + s (z+ - z-)`` has s = phi - 1). Defaults: phi 5, tau 2.5, alpha 0.25 (the official Flux
settings), every cross-attention layer. It needs the negative prompt (encoded even without CFG)
and rides on the conditional rows in place (no extra rows); it acts on every row with the prompt
(perturbed branches' too), never on the unconditional rows: with CFG w, ``g = u + w (c' - u)``;
with PAG s, ``+ s (c' - p')``. On SD3/Flux (joint attention, :mod:`diffguide.perturb.nag_dit`) the
negative prompt runs as a second text stream as in the official pipelines, and NAG changes the
conditional rows only (``+ s (c' - p)``); Flux mixes with L2 norms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..perturb.nag_attention import NagAttention
from .base import Branch, Predictions, StepInfo, Window
from .term import Term, bounds, register


@register("nag")
@dataclass(frozen=True)
class NAG(Term):
    """Normalized attention guidance with the negative prompt, on the conditional rows (no extra rows)."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    layers: str | None = None
    window: Window = field(default_factory=Window)
    name: str = "nag"

    off = 1.0
    ranges = bounds(scale=(1.0, 100.0), tau=(0.0, 100.0), alpha=(0.0, 1.0))
    needs_negative: ClassVar[bool] = True  # the pipeline encodes the negative prompt for it

    def branches(self) -> tuple[Branch, ...]:
        return (Branch("cond", "cond", NagAttention(self.scale, self.tau, self.alpha, self.layers)),)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return torch.zeros_like(preds["cond"])
