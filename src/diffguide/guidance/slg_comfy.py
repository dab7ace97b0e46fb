"""ComfyUI's SkipLayerGuidanceDiT / SkipLayerGuidanceSD3 node, with the node's own semantics.

The node adds a post-CFG function: while ``sigma_end <= sigma <= sigma_start`` it runs the cond
rows again with the listed blocks skipped (identity, as :class:`~diffguide.perturb.block_skip.BlockSkip`
``mode="block"``) and, in x0 space (equal to prediction space: one affine map at a fixed sigma)::

    g <- g + s (c - p)                                   s = ``scale``
    g <- g * (r * std(c) / std(g) + 1 - r)               r = ``rescaling_scale``, when r != 0

where the stds are of the x0 estimates over the *whole batch* (the node's ``tensor.std()``).
``sigma_start``/``sigma_end`` are the node's ``start_percent``/``end_percent`` through the model
sampling's ``percent_to_sigma``; they are the term's window (both ends inclusive). What differs
from :class:`~diffguide.guidance.slg.SLG`: no step-fraction rule (diffusers' strict
``N start < i < N stop`` drops step 0 even at start 0; the node does not), the sigma window, and the
rescaling. ``post_cfg``: ``s (c - p)`` is added in :meth:`SLGComfy.post` (then the rescaling), on
the result of the corrections of the terms before it, as the node's post-CFG function after a
RescaleCFG or CFGNorm (set by the comfy workflow translation where that matters). Cost: one branch of cond rows while active (ComfyUI: one extra model call per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..perturb.block_skip import BlockSkip
from .base import Branch, Predictions, StepInfo, Window
from .perturbed import perturbation_delta
from .space import x0_to_pred
from .term import Term, bounds, register


@register("slg_comfy")
@dataclass(frozen=True)
class SLGComfy(Term):
    """ComfyUI's SkipLayerGuidanceDiT. ``layers``: a layer spec of transformer blocks (``b7-9``);
    the node's sigma range is the ``window``."""

    scale: float = 3.0
    layers: str | None = None
    rescaling_scale: float = 0.0
    window: Window = field(default_factory=Window)
    name: str = "slg_comfy"
    post_cfg: bool = False

    label = "SLG (ComfyUI)"
    ranges = bounds(scale=(0.0, 100.0), rescaling_scale=(0.0, 10.0))
    optional = frozenset({"post_cfg"})
    preset, layer_kind = "slg", "transformer blocks"

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", BlockSkip(self.layers)),)

    def active(self, step: StepInfo) -> bool:
        return self.scale > 0.0 and super().active(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        if self.post_cfg:
            return torch.zeros_like(preds["cond"])
        return perturbation_delta(preds["cond"], preds[self.name], self.scale)

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        if self.post_cfg:
            guided = guided + perturbation_delta(preds["cond"], preds[self.name], self.scale)
        if self.rescaling_scale == 0.0:
            return guided
        g0, c0 = step.to_x0(guided), step.to_x0(preds["cond"])
        factor = self.rescaling_scale * c0.std() / g0.std() + (1.0 - self.rescaling_scale)
        return guided + x0_to_pred(step, g0 * factor - g0)
