"""Layer-skip guidance, "autoguidance-like": guide away from a weaker copy of the model.

Autoguidance (Karras et al. 2024) guides with a smaller or less-trained version of the same
model: ``g = p + w (c - p)``. Without a second model, skipping some of the network's layers
gives a training-free "bad version" of it. Here ``p`` is the conditional prediction with the
selected transformer blocks skipped on the branch's rows (``mode="block"``: each block is the
identity; ``"attn"`` / ``"ff"``: only its attention modules / feed-forwards output zero; see
:mod:`diffguide.perturb.block_skip`). With s = ``scale``::

    g = c + s (c - p)                     (alone; autoguidance's w is 1 + s)
    g = u + w (c - u) + s (c - p)         (with CFG w)

How it differs from SLG: the same perturbation, but active on every step (restrict it with a
``window``), any skip mode, and a UNet default (``layers=None``: the mid block's transformer
blocks; on a transformer the family's SLG preset). SLG keeps SD3.5's strict 1 %..20 % step
rule and scale 2.8. Default scale 2 (no reference default exists). Cost: one branch (B rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..perturb.block_skip import SkipMode
from ..perturb.layer_skip import LayerSkipBlocks
from .base import Branch, Predictions, StepInfo, Window
from .perturbed import perturbation_delta
from .term import Term, bounds, register


@register("layer_skip")
@dataclass(frozen=True)
class LayerSkip(Term):
    """Guide away from the model with the selected blocks skipped (autoguidance-like)."""

    scale: float = 2.0
    layers: str | None = None
    mode: SkipMode = "block"
    window: Window = field(default_factory=Window)
    name: str = "layer_skip"

    ranges = bounds(scale=(0.0, 100.0))
    label = "layer skip"

    def validate(self) -> None:
        LayerSkipBlocks(self.layers, self.mode)  # validates mode

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", LayerSkipBlocks(self.layers, self.mode)),)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return perturbation_delta(preds["cond"], preds[self.name], self.scale)
