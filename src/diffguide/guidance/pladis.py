"""PLADIS (Kim et al. 2025, "Pushing the Limits of Attention in Diffusion Models at Inference Time
by Leveraging Sparsity").

A model change, not an extra branch: every selected cross-attention layer uses the map
``A_dense + scale (A_sparse - A_dense)`` with ``A_sparse`` the 1.5-entmax (or sparsemax) of the
attention scores (see :mod:`diffguide.perturb.sparse_attention`). As in the paper and its ComfyUI
node, it acts on *every* row (conditional, unconditional, perturbed branches), so with CFG w::

    g = u' + w (c' - u')        (primes: predictions of the model with PLADIS attention)

The term's own delta is zero; it changes the predictions every other term reads. It rides on the
conditional branch in place (the engine lists it on every row of every chunk while active), so
it costs no extra rows. Defaults (the paper's and the node's): scale 2, entmax15, every
cross-attention layer. UNets only (SD1.5/SDXL); joint attention (SD3/Flux) is an error. With NAG
the two stack on the conditional branch (:mod:`diffguide.perturb.stacked`): NAG on the PLADIS model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..perturb.sparse_attention import SparseAttention
from .base import Branch, Predictions, StepInfo, Window
from .term import Term, bounds, register


@register("pladis")
@dataclass(frozen=True)
class PLADIS(Term):
    """Sparse cross-attention extrapolation ``A_d + scale (A_s - A_d)`` on every row (no extra rows)."""

    scale: float = 2.0
    sparse: Literal["entmax15", "sparsemax"] = "entmax15"
    layers: str | None = None
    window: Window = field(default_factory=Window)
    name: str = "pladis"

    ranges = bounds(scale=(0.0, 100.0))

    def branches(self) -> tuple[Branch, ...]:
        return (Branch("cond", "cond", SparseAttention(self.scale, self.sparse, self.layers)),)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        return torch.zeros_like(preds["cond"])
