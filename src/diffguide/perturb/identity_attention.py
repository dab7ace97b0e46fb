"""Identity self-attention (PAG's perturbation; Ahn et al. 2024).

On the branch's rows, each selected self-attention layer replaces its attention map by the
identity matrix, so the layer outputs its value projection: ``out = to_out(to_v(h))``
(plus the layer's residual connection and output rescale, as diffusers' PAG processors do).
Other rows go through the layer's own processor unchanged.

On a transformer (DiT) model the selected layers are the attention modules of the selected
blocks, and ``semantics`` chooses what "identity" means for joint attention (``"diagonal"``,
diffusers' SD3 PAG pipeline; ``"value"``, the modular guider): see
:mod:`diffguide.perturb.joint_identity`. On a UNet both readings are ``out = V``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..models.layers import is_dit
from .base import ForwardContext, first_target, put_rows, select_targets, take_rows
from .dit import is_dit_attention
from .joint_identity import Semantics, check_semantics, install_joint_identity


def is_self_attention(name: str, module: nn.Module) -> bool:
    return isinstance(module, Attention) and not module.is_cross_attention


def identity_attention(
    attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None = None
) -> torch.Tensor:
    """Self-attention with the identity attention map: (B, N, C) or (B, C, H, W) -> same shape."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    ndim = hidden_states.ndim
    if ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))  # (B, N, C): V, projected
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _RowIdentityProcessor:
    """Wraps a layer's processor: identity attention on the branch's rows, the original elsewhere."""

    def __init__(self, original: Any, branch: str, ctx: ForwardContext) -> None:
        self.original, self.branch, self.ctx = original, branch, ctx

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        sel = self.ctx.rows_of(self.branch)
        extra = {"temb": temb} if temb is not None else {}
        if sel is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs
            )
        n = hidden_states.shape[0]
        keep, perturbed = take_rows(hidden_states, sel.rows, n)
        temb_p = take_rows(temb, sel.rows, n)[1] if temb is not None and temb.shape[0] == n else temb
        out_p = identity_attention(attn, perturbed, temb_p)
        if keep.shape[0] == 0:
            return out_p
        sub = {k: _outside(v, sel.rows, n) for k, v in kwargs.items()}
        if temb is not None:
            sub["temb"] = _outside(temb, sel.rows, n)
        ehs = _outside(encoder_hidden_states, sel.rows, n)
        mask = _outside(attention_mask, sel.rows, n)
        with self.ctx.sub_batch(sel.rows, n, inside=False):
            out_keep = self.original(attn, keep, ehs, mask, **sub)
        return put_rows(out_keep, out_p, sel.rows, n)


def _outside(x: Any, rows: slice, n: int) -> Any:
    """The rows of a per-row tensor outside ``rows``; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
        return take_rows(x, rows, n)[0]
    return x


@dataclass(frozen=True)
class IdentityAttention:
    """Replace the self-attention map of the selected layers by the identity (output = V)."""

    layers: str | None = None  # None: the model's preset (see models.presets)
    semantics: Semantics = "diagonal"  # joint attention only: "diagonal" | "value"

    def __post_init__(self) -> None:
        check_semantics(self.semantics)

    def targets(self, model: nn.Module) -> list[str]:
        if is_dit(model):
            return select_targets(model, self.layers, "pag", is_dit_attention)
        return select_targets(model, self.layers, "pag", is_self_attention)

    def first_module(self, model: nn.Module) -> str | None:
        """The first selected module in forward order: the branch equals the conditional one before it."""
        return first_target(model, self.targets(model))

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        if is_dit(model):
            with install_joint_identity(model, self.targets(model), self.semantics, branch, ctx):
                yield
            return
        modules = dict(model.named_modules())
        saved: list[tuple[Attention, Any]] = []
        try:
            for name in self.targets(model):
                attn = modules[name]
                saved.append((attn, attn.processor))  # type: ignore[arg-type]
                attn.processor = _RowIdentityProcessor(attn.processor, branch, ctx)
            yield
        finally:
            for attn, processor in reversed(saved):
                attn.processor = processor
