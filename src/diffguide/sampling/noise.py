"""Explicit initial noise: one generator per image.

Policy ``diffusers`` (default): image i draws its latent noise from its own CPU generator
seeded ``seed + i`` with diffusers' ``randn_tensor``, exactly as diffusers' pipelines do when
given a list of generators, so image i of a batch gets the same noise as seed + i alone.
The same generators then drive the scheduler's per-step noise (ancestral samplers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each image: seed, seed + 1, ..."""
    return [seed + i for i in range(count)]


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def initial_noise(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    gens: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, C, H, W) standard normal noise; row i from a generator seeded ``seeds[i]`` (diffusers policy).

    Pass ``gens`` (from :func:`generators`) to draw from generators that the scheduler then keeps
    using for its per-step noise, as diffusers does; otherwise fresh ones are made.
    """
    gens = generators(seeds) if gens is None else gens
    return randn_tensor((len(seeds), *shape), generator=gens, device=torch.device(device), dtype=dtype)
