"""Frequency-decoupled guidance, FDG (Sadat et al. 2025, arXiv:2506.19713).

c and u are split into Laplacian pyramids of L levels (level 0 the finest band, level L - 1 the
coarse Gaussian residual); each level gets its own CFG scale, optionally with the parallel part of
its guidance direction reweighted as in APG, and the guided pyramid is collapsed again::

    c_l, u_l = pyr(c)_l, pyr(u)_l
    D_l = c_l - u_l ;  D_l <- rho_l D_l,par + D_l,perp        (only where rho_l != 1; float64)
    g = collapse(u_l + w_l D_l)

The pyramid is Burt & Adelson's, as kornia builds it (what diffusers' guider calls): a 5x5 binomial
blur ([1 4 6 4 1]^2 / 256) with reflect padding, then a bilinear halving (``pyrdown``); ``pyrup``
doubles bilinearly, then blurs; ``collapse(pyr(x)) = x``, so equal scales give CFG exactly.

Scale convention: each w_l as CFG's (1 = off for that band); diffusers'
``FrequencyDecoupledGuidance(guidance_scales=[w_0, ..., w_{L-1}], parallel_weights=[rho_l])``
(default formulation) is the same, with the same defaults (10, 5). Its guidance rescale and
per-level start/stop are not offered here (use a window on the whole term). No ComfyUI core node.

Shapes: (B, C, H, W) predictions with H and W divisible by 2^(L - 1). diffusers' guider (through
kornia) reflect-pads a latent whose sides are both not powers of two (96 x 96, a 768-pixel SD image)
to 128 x 128 and returns the guided prediction at that padded size; packed transformer predictions
(Flux, Qwen-Image) are not images and are refused, as kornia does. Cost: one unconditional branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DiffguideError
from .apg import project
from .base import UNCOND, Branch, Predictions, StepInfo, Window, check_finite
from .term import Term, register

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def blur(x: Tensor) -> Tensor:
    """The 5x5 binomial blur of every channel, reflect-padded (kornia's pyramid kernel)."""
    k1 = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def pyr_down(x: Tensor) -> Tensor:
    return F.interpolate(
        blur(x), size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear", align_corners=False
    )


def pyr_up(x: Tensor) -> Tensor:
    return blur(F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """[band 0 (finest), ..., band L - 2, Gaussian residual]; sides divisible by 2^(L - 1)."""
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(pyr_down(gaussian[-1]))
    return [gaussian[i] - pyr_up(gaussian[i + 1]) for i in range(levels - 1)] + [gaussian[-1]]


def collapse(pyramid: list[Tensor]) -> Tensor:
    img = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        img = pyr_up(img) + band
    return img


def check_shape(pred: Tensor, levels: int) -> None:
    stride = 1 << (levels - 1)
    if pred.ndim != 4:
        raise DiffguideError(
            f"FDG needs (B, C, H, W) predictions, got shape {tuple(pred.shape)} (packed transformer latents)"
        )
    if pred.shape[2] % stride or pred.shape[3] % stride or min(pred.shape[2:]) // stride < 3:
        raise DiffguideError(
            f"FDG with {levels} levels needs latent sides divisible by {stride} and at least "
            f"{3 * stride}, got {pred.shape[2]}x{pred.shape[3]}"
        )


@register("fdg")
@dataclass(frozen=True)
class FDG(Term):
    """Frequency-decoupled guidance. ``scales``: one CFG scale per level, finest first;
    ``parallel_weights``: rho per level (None: all 1, no projection)."""

    scales: tuple[float, ...] = (10.0, 5.0)
    parallel_weights: tuple[float, ...] | None = None
    window: Window = field(default_factory=Window)
    name: str = "fdg"

    off = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(self.scales))  # manifests store lists
        if self.parallel_weights is not None:
            object.__setattr__(self, "parallel_weights", tuple(self.parallel_weights))
        super().__post_init__()

    def validate(self) -> None:
        if not 1 <= len(self.scales) <= 8:
            raise ConfigError(f"FDG needs 1 to 8 scales (one per pyramid level), got {len(self.scales)}")
        for w in self.scales:
            check_finite("FDG scale", w)
            if not 0.0 <= w <= 100.0:
                raise ConfigError(f"FDG scales must be in [0, 100], got {w}")
        if self.parallel_weights is not None:
            if len(self.parallel_weights) != len(self.scales):
                raise ConfigError(
                    f"FDG has {len(self.scales)} scales but {len(self.parallel_weights)} parallel_weights"
                )
            for rho in self.parallel_weights:
                check_finite("FDG parallel weight", rho)

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def active(self, step: StepInfo) -> bool:
        return any(w != 1.0 for w in self.scales) and self.window.contains(step)

    def guided(self, c: Tensor, u: Tensor) -> Tensor:
        check_shape(c, len(self.scales))
        rhos = self.parallel_weights or (1.0,) * len(self.scales)
        levels = []
        for c_l, u_l, w, rho in zip(
            laplacian_pyramid(c, len(self.scales)),
            laplacian_pyramid(u, len(self.scales)),
            self.scales,
            rhos,
            strict=True,
        ):
            d = c_l - u_l
            if rho != 1.0:
                parallel, orthogonal = project(d, c_l)
                d = rho * parallel + orthogonal
            levels.append(c_l if w == 1.0 else u_l + w * d)
        return collapse(levels)

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        c = preds["cond"]
        return self.guided(c, preds["uncond"]) - c
