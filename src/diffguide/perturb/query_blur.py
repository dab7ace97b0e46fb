"""Query blur: the perturbation of Smoothed Energy Guidance (SEG; Hong 2024).

On the branch's rows, the queries of each selected self-attention layer, laid out on the
layer's (h, w) token grid, are blurred with a Gaussian of standard deviation ``sigma`` (in
tokens). Blurring the queries blurs the attention weights (the paper's Sec. 3.3), smoothing
the energy landscape of self-attention. As ``sigma`` grows the blur tends to the spatial mean:
every query becomes the mean query of its image, and every token then attends alike.

The kernel follows the official SDXL code (SusungHong/SEG-SDXL, ``gaussian_blur_2d``):
``k = ceil(6 sigma) + 1 - ceil(6 sigma) mod 2`` taps (odd), clamped to the grid side
(``side`` if odd, ``side + 1`` if even), weights ``exp(-x^2 / (2 sigma^2))`` at
``x = -(k-1)/2 .. (k-1)/2`` normalised to sum 1, the 2-D kernel their outer product, reflect
padding of ``k // 2``, one depthwise convolution. ``sigma > 9999`` (``INF_SIGMA``, the official
threshold; ``math.inf`` too) is the infinite blur, the mean. The official code assumes a
square grid (it clamps both sides by the width); diffguide clamps each side by its own length,
the same on square grids.

On a transformer the image tokens of each selected attention are blurred: all of ``to_q``'s
tokens (SD3's image stream; Flux's double blocks), or the last h*w of a single-stream
``[text, image]`` sequence (Flux single blocks). Flux's grid comes from its ``img_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.layers import is_dit
from .base import BranchRows, ForwardContext, first_target, select_targets
from .dit import is_dit_attention
from .query import LatentGrid, install_query_edit, is_self_attention_module

INF_SIGMA = 9999.0  # the official threshold: sigma above it is the infinite blur


def kernel_size(sigma: float, side: int) -> int:
    """The official tap count for ``sigma``, clamped to a grid side of ``side`` tokens."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return min(k, side - (side % 2 - 1))


def gaussian_taps(sigma: float, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``size`` normalised Gaussian weights at -(size-1)/2 .. (size-1)/2 (float32, then ``dtype``)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(dtype)


def blur_grid(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (R, C, h, w) maps, each channel alone; ``sigma > INF_SIGMA``: the spatial mean."""
    if sigma > INF_SIGMA:
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    kh, kw = kernel_size(sigma, x.shape[-2]), kernel_size(sigma, x.shape[-1])
    kernel = torch.mm(gaussian_taps(sigma, kh, x.dtype)[:, None], gaussian_taps(sigma, kw, x.dtype)[None, :])
    kernel = kernel.to(x.device).expand(x.shape[1], 1, kh, kw)
    padded = F.pad(x, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    return F.conv2d(padded, kernel, groups=x.shape[1])


def blur_queries(q: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Blur (R, N, C) queries laid out row-major on an (h, w) grid of N = h*w tokens."""
    r, n, c = q.shape
    maps = q.transpose(1, 2).reshape(r, c, grid[0], grid[1])
    return blur_grid(maps, sigma).reshape(r, c, n).transpose(1, 2)


@dataclass(frozen=True)
class QueryBlur:
    """Blur the self-attention queries of the selected layers (SEG). ``sigma`` in tokens, > 0."""

    layers: str | None = None  # None: PAG's preset (UNets: the mid block, the official default)
    sigma: float = math.inf

    def __post_init__(self) -> None:
        try:
            ok = self.sigma > 0  # also rejects nan
        except TypeError:
            raise ConfigError(f"SEG blur sigma must be a number, got {self.sigma!r}") from None
        if not ok:
            raise ConfigError(f"SEG blur sigma must be > 0 (inf for the mean), got {self.sigma}")

    def targets(self, model: nn.Module) -> list[str]:
        if is_dit(model):
            return select_targets(model, self.layers, "pag", is_dit_attention)
        return select_targets(model, self.layers, "pag", is_self_attention_module)

    def first_module(self, model: nn.Module) -> str | None:
        """The first blurred attention in forward order: the branch equals the conditional one before it."""
        return first_target(model, self.targets(model))

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        grid = LatentGrid()

        def edit(q: torch.Tensor, sel: BranchRows, name: str) -> torch.Tensor:
            start, stop = grid.image_span(q.shape[1])
            blurred = blur_queries(q[:, start:stop], grid.grid(stop - start), self.sigma)
            return blurred if start == 0 else torch.cat([q[:, :start], blurred], dim=1)

        with ExitStack() as stack:
            stack.enter_context(grid.recording(model))
            stack.enter_context(install_query_edit(model, self.targets(model), branch, ctx, edit))
            yield
