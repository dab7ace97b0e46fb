"""Token Perturbation Guidance (Rajabi et al. 2025), the paper's operation.

``p`` is the conditional prediction with the hidden-state tokens entering each selected
transformer block permuted along the token axis (see :mod:`diffguide.perturb.token_shuffle`).
With s = ``scale``::

    g = c + s (c - p)                       (TPG alone)
    g = c + (w - 1)(c - u) + s (c - p)      (with CFG w: the paper's combination)

Paper defaults: s = 3; SDXL layers ``d2.2-9,d3``; CFG off in its unconditional runs.
This is not the ``MD_ApplyTPG`` ComfyUI node, which shuffles self-attention *queries* of the
unconditional rows in place (no extra branch): see docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..perturb.token_shuffle import Permutation, TokenShuffle
from .base import Branch, Predictions, StepInfo, Window
from .perturbed import perturbation_delta
from .term import Term, bounds, register


@register("tpg")
@dataclass(frozen=True)
class TPG(Term):
    """Token Perturbation Guidance. ``layers``: a layer spec, or None for the paper's preset.
    ``permutation``: ``"per_image"`` (diffguide's default, a batch reproduces its single runs) or
    ``"shared"`` (the official code's one permutation for the batch; docs/methods.md)."""

    scale: float = 3.0
    layers: str | None = None
    window: Window = field(default_factory=Window)
    name: str = "tpg"
    permutation: Permutation = "per_image"

    ranges = bounds(scale=(0.0, 100.0))
    preset, layer_kind = "tpg", "transformer blocks"
    optional = frozenset({"permutation"})  # absent = per_image (manifests before it)

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", TokenShuffle(self.layers, self.permutation)),)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return perturbation_delta(preds["cond"], preds[self.name], self.scale)
