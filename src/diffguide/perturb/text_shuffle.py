"""Text-token shuffle: the prompt embedding with its token order permuted, on one branch's rows.

The perturbation of the first TPG variant (seed 000's Fooocus code, "TPG at the CFG level"):
before each model call, the text tokens of the branch's rows (``encoder_hidden_states``, (B, L, D)),
and their per-token mask if the family passes one (``encoder_hidden_states_mask``,
``encoder_attention_mask``), are permuted along the token axis L. Nothing inside the network is
touched; pooled embeddings (SDXL's ``text_embeds``, SD3/Flux ``pooled_projections``) are order-free
and stay. Each model call draws a fresh permutation per image from that image's generator
(``branch_seed(seed_i, branch)``), so a batch reproduces its single-image runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import GuidanceWarning
from ..errors import DiffguideError
from .base import ForwardContext
from .dit import arg_namer

TEXT = "encoder_hidden_states"
MASKS = ("encoder_hidden_states_mask", "encoder_attention_mask")
# Denoisers whose attention gives text tokens no position: shuffling them only reorders a set
# (measured: final latents move by 1e-5 or less; docs/methods.md, "PromptShuffle")
ORDER_FREE = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")


def permute_rows(x: torch.Tensor, start: int, perms: torch.Tensor) -> torch.Tensor:
    """x with rows start.. start+R permuted along dim 1 by ``perms`` (R, L); other rows as they are."""
    index = perms.to(x.device).view(perms.shape + (1,) * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
    out = x.clone()
    out[start : start + perms.shape[0]] = torch.gather(x[start : start + perms.shape[0]], 1, index)
    return out


@dataclass(frozen=True)
class TextShuffle:
    """Shuffle the text tokens the model is conditioned on, on the branch's rows."""

    @property
    def layers(self) -> str | None:
        return None  # acts on the model's input, not on layers

    def targets(self, model: nn.Module) -> list[str]:
        return []

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        if type(model).__name__ in ORDER_FREE:
            warnings.warn(
                f"PromptShuffle changes nothing but float rounding on {type(model).__name__}: its attention "
                "gives text tokens no position, so a shuffle only reorders them (docs/methods.md); to perturb "
                "word order, shuffle before the text encoder",
                GuidanceWarning,
                stacklevel=2,
            )
        named = arg_namer(model.forward)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            sel = ctx.rows_of(branch)
            if sel is None:
                return None
            call = named(args, kwargs)
            text = call.get(TEXT)
            if not isinstance(text, torch.Tensor) or text.ndim != 3:
                raise DiffguideError(
                    f"text shuffle: {type(model).__name__} was called without {TEXT} (B, L, D)"
                )
            start = sel.rows.start or 0
            n_tokens = text.shape[1]
            perms = torch.stack(
                [torch.randperm(n_tokens, generator=ctx.generator(branch, i)) for i in sel.images]
            )
            call[TEXT] = permute_rows(text, start, perms)
            for key in MASKS:
                mask = call.get(key)
                if isinstance(mask, torch.Tensor) and mask.ndim >= 2 and mask.shape[1] == n_tokens:
                    call[key] = permute_rows(mask, start, perms)
            return (), call

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
