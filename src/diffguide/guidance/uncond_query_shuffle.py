"""Unconditional query shuffle: the second TPG variant, named apart from TPG (seed 001, ``MD_ApplyTPG``).

No branch is added: the perturbation acts *in place* on the unconditional rows that CFG already
evaluates, shuffling the queries of the selected self-attention layers (``attn1``) and blending
them with the originals by ``strength`` (see :mod:`diffguide.perturb.query_shuffle`). With ``u~``
the unconditional prediction so perturbed and w the CFG scale::

    g = u~ + w (c - u~)

The term's own delta is zero: it changes ``u`` for every term that reads it (CFG). Without an
active CFG the unconditional rows are still evaluated (B rows) but nothing uses them. The
engine knows which rows are unconditional (it lays them out), so nothing guesses a batch half.

How it differs from TPG (Rajabi et al. 2025): TPG adds a *perturbed conditional* branch whose
transformer blocks see their hidden-state tokens shuffled, and guides with ``s (c - p)``; this
perturbs the *unconditional* prediction, and only through the queries of ``attn1`` (a permutation
of the attention output's rows): a different and much weaker perturbation, with CFG's scale.
Defaults (the node's): every ``attn1`` of the down path, strength 1. Cost: nothing beyond CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..perturb.query_shuffle import QueryShuffle
from .base import Branch, Predictions, StepInfo, Window
from .term import Term, bounds, register


@register("uncond_query_shuffle")
@dataclass(frozen=True)
class UncondQueryShuffle(Term):
    """Shuffle the self-attention queries of the unconditional rows in place (a TPG variant; not TPG)."""

    strength: float = 1.0
    layers: str | None = None
    window: Window = field(default_factory=Window)
    name: str = "uncond_query_shuffle"

    ranges = bounds(strength=(0.0, 1.0))
    label = "query shuffle"

    def branches(self) -> tuple[Branch, ...]:
        return (Branch("uncond", "uncond", QueryShuffle(self.layers, self.strength)),)

    def active(self, step: StepInfo) -> bool:
        return self.strength != 0.0 and self.window.contains(step)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return torch.zeros_like(preds["cond"])
