"""The shared math of perturbation guidance: ``s (c - p)``."""

from __future__ import annotations

from torch import Tensor


def perturbation_delta(c: Tensor, p: Tensor, s: float) -> Tensor:
    """s (c - p): push away from the perturbed prediction.  c, p: (B, C, H, W)."""
    return s * (c - p)
