"""Which rows of a ComfyUI model call belong to a diffguide branch, and which image each row shows.

ComfyUI's ``calc_cond_batch`` concatenates *chunks* of ``B`` rows (one per conditioning entry,
``B`` = the latent batch) and lists each chunk's conditioning index in
``transformer_options["cond_or_uncond"]``; the pack maps its indices to branches in
``transformer_options["diffguide_rows"]`` (``{index: plan}``). A conditioning with several
entries (ConditioningCombine, area or timestep-ranged prompts) gives several chunks with the same
index; ComfyUI lays a call's chunks out grouped by index, so a branch's rows are one contiguous
range (checked: an interleaved layout is an error, never a half-perturbed branch). Row ``r``
shows image ``r mod B``; random perturbations draw once per image and reuse the draw in every
chunk of that image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import DiffguideError
from ..perturb.base import ForwardContext

ROWS = "diffguide_rows"  # transformer_options of one call: {cond index: Plan}


def branch_rows(options: dict[str, Any], branch: str, n: int) -> slice | None:
    """The rows of ``branch`` in a model call of ``n`` rows, from ComfyUI's ``cond_or_uncond``."""
    rows, chunks = options.get(ROWS), options.get("cond_or_uncond")
    if not rows or not chunks:
        return None
    size = n // len(chunks)
    hits = [j for j, index in enumerate(chunks) if getattr(rows.get(index), "branch", None) == branch]
    if not hits:
        return None
    if hits != list(range(hits[0], hits[-1] + 1)):
        raise DiffguideError(f"branch {branch}: its chunks {hits} of this ComfyUI call are not side by side")
    return slice(hits[0] * size, (hits[-1] + 1) * size)


def row_images(options: dict[str, Any], rows: slice, n: int) -> list[int]:
    """The image each row of ``rows`` shows (a model call of ``n`` rows)."""
    size = n // len(options["cond_or_uncond"])
    return [r % size for r in range(rows.start, rows.stop)]


def per_image(images: list[int], draw: Callable[[int], Tensor]) -> Tensor:
    """``draw(i)`` once per image, stacked in row order."""
    drawn = {i: draw(i) for i in dict.fromkeys(images)}
    return torch.stack([drawn[i] for i in images])


def permutations(
    ctx: ForwardContext,
    branch: str,
    n: int,
    images: list[int],
    shared: dict[object, Tensor] | None,
    site: object,
) -> Tensor:
    """One token permutation of ``n`` per row of ``images``: per image from diffguide's per-image
    generators, or (``shared`` given: TPG's ``permutation=shared``) one per block call for every
    row, drawn in block order from one generator seeded with image 0's seed, as the engine draws
    it; a later sub-batch of the same call reuses the block's draw (kept in ``shared[site]``)."""
    if shared is None:
        return per_image(images, lambda i: torch.randperm(n, generator=ctx.generator(branch, i)))
    if images[0] == 0 or site not in shared:
        key = (f"{branch}/shared", 0)
        if key not in ctx.generators:
            ctx.generators[key] = torch.Generator().manual_seed(ctx.seeds[0])
        shared[site] = torch.randperm(n, generator=ctx.generators[key])
    return shared[site].expand(len(images), n)
