"""Token shuffle (TPG's perturbation; Rajabi et al. 2025).

On the branch's rows, the hidden states (B, N, C) entering each selected transformer block
are permuted along the token axis N. Each call draws a fresh permutation; nothing
un-shuffles the tokens afterwards (as in the paper's official SDXL code).

Permutations come from one CPU generator per image, seeded with
``branch_seed(seed_i, branch)``: a run repeats exactly, and image i of a batch gets the same
permutations as its seed run alone. (The paper draws one permutation shared by the batch;
per-image draws are equally distributed and make batches reproducible image by image.)

On a transformer (DiT) the selected modules are blocks (``transformer_blocks.7``, ``s3``) and
only the *image* tokens are shuffled, never the text tokens: a joint block's ``hidden_states``
is the image stream (the text stream, ``encoder_hidden_states``, is left alone); a
single-stream block that receives ``[text, image]`` concatenated (AuraFlow's single blocks) has
only its last ``n_image`` tokens permuted (``n_image`` recorded from the model's input).
Flux's single blocks in diffusers receive the two streams separately, like joint blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..models.layers import is_dit
from .base import ForwardContext, first_target, put_rows, select_targets, take_rows
from .dit import ImageTokens, is_dit_block


def is_transformer_block(name: str, module: nn.Module) -> bool:
    return type(module).__name__ in ("BasicTransformerBlock", "JointTransformerBlock") or (
        name.split(".")[-2:-1] == ["transformer_blocks"] and hasattr(module, "attn1")
    )


def shuffle_tokens(h: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Permute tokens row by row: out[b, n] = h[b, perms[b, n]].  h: (R, N, C); perms: (R, N)."""
    return torch.gather(h, 1, perms.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


Permutation = Literal["per_image", "shared"]
PERMUTATIONS: tuple[str, ...] = ("per_image", "shared")


@dataclass(frozen=True)
class TokenShuffle:
    """Shuffle the tokens entering the selected transformer blocks.

    ``permutation="shared"``: the official code's convention, one permutation per block call for
    every row of the branch, drawn with ``torch.randperm(N, generator=g)`` from one CPU generator
    seeded with the run's seed (image 0's), the stream ``torch.manual_seed(seed)`` gives the
    official pipeline's global ``torch.randperm(N)`` on CPU. When chunking splits the branch's rows,
    later chunks reuse the block's permutation (drawn when image 0's rows pass)."""

    layers: str | None = None  # None: the model's preset (see models.presets)
    permutation: Permutation = "per_image"

    def __post_init__(self) -> None:
        if self.permutation not in PERMUTATIONS:
            raise ConfigError(
                f"TPG permutation must be one of {', '.join(PERMUTATIONS)}, got {self.permutation!r}"
            )

    def targets(self, model: nn.Module) -> list[str]:
        if is_dit(model):
            return select_targets(model, self.layers, "tpg", is_dit_block)
        return select_targets(model, self.layers, "tpg", is_transformer_block)

    def first_module(self, model: nn.Module) -> str | None:
        """The first selected module in forward order: the branch equals the conditional one before it."""
        return first_target(model, self.targets(model))

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        tokens = ImageTokens()
        last: dict[int, torch.Tensor] = {}  # shared mode: each block's permutation of this call

        def draw(module: nn.Module, n: int, images: tuple[int, ...]) -> torch.Tensor:
            if self.permutation == "per_image":
                return torch.stack([torch.randperm(n, generator=ctx.generator(branch, i)) for i in images])
            if images[0] == 0 or id(module) not in last:
                key = (f"{branch}/shared", 0)
                if key not in ctx.generators:
                    ctx.generators[key] = torch.Generator().manual_seed(ctx.seeds[0])
                last[id(module)] = torch.randperm(n, generator=ctx.generators[key])
            return last[id(module)].expand(len(images), n)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            sel = ctx.rows_of(branch)
            if sel is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            n = h.shape[0]
            keep, rows = take_rows(h, sel.rows, n)
            start, stop = tokens.image_span(h.shape[1])  # UNet / image stream: every token
            perms = draw(module, stop - start, sel.images)
            shuffled = shuffle_tokens(rows[:, start:stop], perms.to(h.device))
            if stop - start < h.shape[1]:
                shuffled = torch.cat([rows[:, :start], shuffled, rows[:, stop:]], dim=1)
            h = put_rows(keep, shuffled, sel.rows, n)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        modules = dict(model.named_modules())
        stack = ExitStack()
        handles = []
        try:
            stack.enter_context(tokens.recording(model))
            for name in self.targets(model):
                handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            stack.close()
