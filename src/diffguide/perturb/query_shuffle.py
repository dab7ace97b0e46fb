"""Query shuffle: the perturbation of the second TPG variant (seed 001's ``MD_ApplyTPG`` node).

On the branch's rows (the unconditional rows, in :class:`~diffguide.guidance.UncondQueryShuffle`),
the queries of each selected self-attention layer (``attn1``) are permuted along the token axis
and blended with the originals: ``q' = lerp(q, q[perm], strength)`` (``q[perm]`` itself at
strength 1, as the node does). Keys and values are not permuted, so each output token attends
with another token's query: the rows of the attention output are permuted (and, below strength
1, the query mixed). Nothing extra is evaluated.

Determinism: one permutation per image, layer and model call, from a generator seeded
``branch_seed(seed_i, "<branch>/<layer>/<timestep, 3 decimals>")``: the same layer at the same step always
draws the same permutation, whatever the batch, chunking or a repeated (out-of-memory) step.
The node instead seeds ``seed ^ layer_hash ^ int(1000 sigma)`` once for all its rows and
guesses which half of the batch is unconditional; diffguide's engine labels the rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..models.layers import is_dit, select
from .base import BranchRows, ForwardContext, branch_seed, first_target
from .dit import is_dit_attention
from .query import LatentGrid, install_query_edit, is_self_attention_module

DEFAULT_LAYERS = "down"  # the node's default, "Down (Encoder)": every attn1 of the down path


def shuffle_queries(q: torch.Tensor, perms: torch.Tensor, strength: float) -> torch.Tensor:
    """Row r of (R, N, C) ``q`` with its tokens permuted by ``perms[r]``, blended by ``strength``."""
    shuffled = torch.gather(q, 1, perms.to(q.device).unsqueeze(-1).expand(-1, -1, q.shape[-1]))
    return shuffled if strength >= 1.0 else torch.lerp(q, shuffled, strength)


@dataclass(frozen=True)
class QueryShuffle:
    """Shuffle (blend) the self-attention queries of the selected layers on the branch's rows."""

    layers: str | None = None  # None: "down" on UNets; on a DiT give the blocks
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:  # also rejects nan
            raise ConfigError(f"query shuffle strength must be in [0, 1], got {self.strength}")

    def targets(self, model: nn.Module) -> list[str]:
        if is_dit(model):
            if self.layers is None:
                raise ConfigError("query shuffle has no preset for transformers; give its layers (e.g. b7-9)")
            return select(model, self.layers, is_dit_attention)
        return select(model, self.layers or DEFAULT_LAYERS, is_self_attention_module)

    def first_module(self, model: nn.Module) -> str | None:
        """The first shuffled attention in forward order. On the unconditional rows (in place) the
        branch is the rows the others share from: the prefix plan shares nothing for it."""
        return first_target(model, self.targets(model))

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        grid = LatentGrid()

        def edit(q: torch.Tensor, sel: BranchRows, name: str) -> torch.Tensor:
            start, stop = grid.image_span(q.shape[1])
            key = f"{branch}/{name}/{grid.timestep:.3f}"
            perms = torch.stack(
                [
                    torch.randperm(
                        stop - start, generator=torch.Generator().manual_seed(branch_seed(ctx.seeds[i], key))
                    )
                    for i in sel.images
                ]
            )
            out = shuffle_queries(q[:, start:stop], perms, self.strength)
            return out if start == 0 else torch.cat([q[:, :start], out], dim=1)

        with ExitStack() as stack:
            stack.enter_context(grid.recording(model))
            stack.enter_context(install_query_edit(model, self.targets(model), branch, ctx, edit))
            yield
