"""Skip Layer Guidance (SLG; Stability AI's SD3.5, diffusers' ``skip_guidance_layers``).

``p`` is the conditional prediction with the selected transformer blocks skipped (identity)
on the branch's rows (see :mod:`diffguide.perturb.block_skip`). With s = ``scale``::

    g = u + w (c - u) + s (c - p)        (with CFG w, as diffusers' StableDiffusion3Pipeline)

When: ``start`` and ``stop`` are fractions of the run with the pipeline's *strict* rule,
active at step i of N when ``N * start < i < N * stop`` (defaults 0.01 and 0.2, scale 2.8:
steps 1..5 of 28). diffusers' modular SLG guider uses ``int(start * N) < i < int(stop * N)``
instead (steps 1..4 of 28): diffguide follows the pipeline. The pipeline applies SLG only
together with CFG; diffguide also runs it alone (``g = c + s (c - p)``). The ``window``
restricts it further (e.g. in sigma). Layers: exact blocks, e.g. ``transformer_blocks.7-9``
(SD3.5 Medium's suggestion 7, 8, 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..errors import ConfigError
from ..perturb.block_skip import BlockSkip
from .base import Branch, Predictions, StepInfo, Window
from .perturbed import perturbation_delta
from .term import Term, bounds, register


@register("slg")
@dataclass(frozen=True)
class SLG(Term):
    """Skip Layer Guidance. ``layers``: a layer spec of transformer blocks."""

    scale: float = 2.8
    layers: str | None = None
    start: float = 0.01
    stop: float = 0.2
    window: Window = field(default_factory=Window)
    name: str = "slg"

    ranges = bounds(scale=(0.0, 100.0))
    preset, layer_kind = "slg", "transformer blocks"

    def validate(self) -> None:
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ConfigError(f"SLG needs 0 <= start < stop <= 1, got start={self.start}, stop={self.stop}")

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", BlockSkip(self.layers)),)

    def in_steps(self, step: StepInfo) -> bool:
        """diffusers' StableDiffusion3Pipeline rule: ``N * start < i < N * stop`` (strict)."""
        return step.count * self.start < step.index < step.count * self.stop

    def active(self, step: StepInfo) -> bool:
        return super().active(step) and self.in_steps(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return perturbation_delta(preds["cond"], preds[self.name], self.scale)
