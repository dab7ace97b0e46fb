"""Normalized attention guidance in cross-attention (NAG's model change; Chen et al. 2025).

On every row with the prompt (``scope = "prompt"``: the conditional rows, which
:class:`~diffguide.guidance.NAG` perturbs in place, and the rows of perturbed branches with the
prompt, PAG's, SEG's, ...: NAG changes how the model reads the prompt), each selected cross-attention layer (``attn2`` of a UNet) attends with the same queries
to the prompt (``z+``) and to the negative prompt (``z-``), before its output projection, and
replaces ``z+`` by (per token, L1 norms over the channels; phi = ``scale``)::

    z~ = phi z+ - (phi - 1) z-                          (= z+ + (phi - 1)(z+ - z-))
    r  = |z~|_1 / (|z+|_1 + 1e-7)
    z^ = z~ min(r, tau) / (r + 1e-7)                    (norm clipped to tau times |z+|)
    z  = alpha z^ + (1 - alpha) z+

as the official implementation's ``NAGAttnProcessor2_0`` does (its ``nag_scale``, ``nag_tau``,
``nag_alpha``). The negative prompt's text embeddings come from the engine
(:attr:`ForwardContext.negative`, image i's row for the row of image i); the other rows run the
layer's own processor. Cost: no extra model rows, one more cross-attention per selected layer
on the conditional rows. On SD3/Flux (joint attention) see :mod:`.nag_dit`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import ConfigError
from ..models.layers import is_dit, select
from .base import ForwardContext, put_rows, take_rows
from .identity_attention import _outside
from .nag_dit import NagDiT, nag_targets
from .sparse_attention import _PladisProcessor, is_cross_attention, pladis_map


def nag_mix(pos: torch.Tensor, neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG's extrapolation, L1 clipping and blend of attention outputs (..., C) -> (..., C)."""
    guided = pos * scale - neg * (scale - 1.0)
    ratio = guided.abs().sum(-1, keepdim=True) / (pos.abs().sum(-1, keepdim=True) + 1e-7)
    guided = guided * ratio.clamp(max=tau) / (ratio + 1e-7)
    return guided * alpha + pos * (1.0 - alpha)


def _attend(attn: Attention, q: torch.Tensor, context: torch.Tensor, pladis: Any = None) -> torch.Tensor:
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    k = attn.head_to_batch_dim(attn.to_k(context))
    v = attn.head_to_batch_dim(attn.to_v(context))
    if pladis is not None:  # the PLADIS model's map (NAG stacked on PLADIS)
        scores = (q @ k.transpose(-1, -2)) * attn.scale
        return attn.batch_to_head_dim(pladis_map(scores.float(), pladis.lam, pladis.sparse).to(v.dtype) @ v)
    return attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k), v))


def nag_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    nag: NagAttention,
    pladis: Any = None,
) -> torch.Tensor:
    """A diffusers cross-attention layer's forward with NAG: (R, N, C) -> (R, N, C). ``pladis``: the
    layer's active PLADIS processor (its attention maps replace the softmax's), or None."""
    residual = hidden_states
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    z = nag_mix(
        _attend(attn, q, positive, pladis), _attend(attn, q, negative, pladis), nag.scale, nag.tau, nag.alpha
    )
    out = attn.to_out[1](attn.to_out[0](z))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _NagProcessor:
    """Wraps a cross-attention layer's processor: NAG on the branch's rows, the original elsewhere."""

    def __init__(self, original: Any, branch: str, ctx: ForwardContext, nag: NagAttention) -> None:
        self.original, self.branch, self.ctx, self.nag = original, branch, ctx, nag

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        sel, negative = self.ctx.rows_of(self.branch), self.ctx.negative
        if sel is None or negative is None or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ConfigError("NAG does not support a cross-attention mask")
        n = hidden_states.shape[0]
        keep, rows = take_rows(hidden_states, sel.rows, n)
        pos = take_rows(encoder_hidden_states, sel.rows, n)[1]
        neg = negative[list(sel.images)].to(device=pos.device, dtype=pos.dtype)
        pladis = self.original if isinstance(self.original, _PladisProcessor) else None
        if pladis is not None and self.ctx.rows_of(pladis.branch) is None:
            pladis = None  # PLADIS installed but outside its window
        out = nag_attention(attn, rows, pos, neg, self.nag, pladis)
        if keep.shape[0] == 0:
            return out
        sub = {k: _outside(v, sel.rows, n) for k, v in kwargs.items()}
        with self.ctx.sub_batch(sel.rows, n, inside=False):
            out_keep = self.original(attn, keep, _outside(encoder_hidden_states, sel.rows, n), None, **sub)
        return put_rows(out_keep, out, sel.rows, n)


@dataclass(frozen=True)
class NagAttention:
    """NAG in the selected cross-attention layers, on the branch's rows."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    layers: str | None = None  # None: every cross-attention layer

    scope = "prompt"  # every row with the prompt: the conditional rows and PAG's, SEG's, ... rows
    stacks_in_place = True  # may share the conditional branch with PLADIS (perturb/stacked.py)

    def allows_prefix_sharing(self, model: nn.Module) -> bool:
        """On a DiT NAG changes the conditional rows only (not PAG's, ...): nothing is shared."""
        return not is_dit(model)

    def targets(self, model: nn.Module) -> list[str]:
        if is_dit(model):
            return nag_targets(model, self.layers)
        if self.layers is None:
            return [name for name, m in model.named_modules() if is_cross_attention(name, m)]
        return select(model, self.layers, is_cross_attention)

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        if ctx.negative is None:
            raise ConfigError("NAG needs a negative prompt's conditioning; none was given")
        if is_dit(model):
            with NagDiT(model, self.targets(model), branch, ctx, self).installed():
                yield
            return
        modules = dict(model.named_modules())
        saved: list[tuple[Attention, Any]] = []
        try:
            for name in self.targets(model):
                attn = modules[name]
                saved.append((attn, attn.processor))  # type: ignore[arg-type]
                attn.processor = _NagProcessor(attn.processor, branch, ctx, self)
            yield
        finally:
            for attn, processor in reversed(saved):
                attn.processor = processor
