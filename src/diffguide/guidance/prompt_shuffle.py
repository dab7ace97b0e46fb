"""Prompt-shuffle guidance: the first TPG variant, named apart from TPG (seed 000, Fooocus).

``p`` is the conditional prediction with the *prompt embedding's* token order shuffled (see
:mod:`diffguide.perturb.text_shuffle`): the text is scrambled, the network is not. With
s = ``scale``::

    g = c + s (c - p)                        (alone)
    g = u + w (c - u) + s (c - p)            (with CFG w: seed 000's ``cfg + s * (cond - tpg_cond)``)

How it differs from TPG (Rajabi et al. 2025): TPG shuffles the *image* tokens (hidden states)
entering selected transformer blocks, keeping the prompt intact; this keeps the network intact
and shuffles the *text* tokens of the prompt, so ``c - p`` points away from a "bag of words"
reading of the prompt (word order, attribute binding). One extra branch (B rows), one forward
per step with every other term. Default scale 3 (seed 000 takes TPG's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..perturb.text_shuffle import TextShuffle
from .base import Branch, Predictions, StepInfo, Window
from .perturbed import perturbation_delta
from .term import Term, bounds, register


@register("prompt_shuffle")
@dataclass(frozen=True)
class PromptShuffle(Term):
    """Guide away from the prompt with its token order shuffled (a TPG variant; not TPG)."""

    scale: float = 3.0
    window: Window = field(default_factory=Window)
    name: str = "prompt_shuffle"

    ranges = bounds(scale=(0.0, 100.0))
    label = "prompt shuffle"

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(self.name, "cond", TextShuffle()),)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return perturbation_delta(preds["cond"], preds[self.name], self.scale)
