"""Sparse cross-attention (PLADIS's model change; Kim et al. 2025).

Each selected cross-attention layer (``attn2`` of a UNet) replaces its attention map by an
extrapolation from the dense (softmax) map towards a sparse one (alpha-entmax)::

    A = A_dense + lam (A_sparse - A_dense) = lam A_sparse + (1 - lam) A_dense,   out = A V

with ``A_sparse = entmax15(QK^T / sqrt(d))`` (alpha = 1.5, the paper's default) or
``sparsemax`` (alpha = 2). ``lam = 1`` is pure sparse attention, ``lam = 0`` the model itself.

The change is *model-wide*, as in the paper and its ComfyUI node (an ``attn2`` patch on every
row): while installed on the conditional branch (:class:`~diffguide.guidance.PLADIS`, an
in-place branch), it acts on every row of every forward call in which the engine lists that
branch (its ``scope`` is ``"all"``: the engine lists every row of every chunk as its rows), so the
conditional, unconditional and any perturbed rows all see sparse cross-attention. Outside the
term's window the layers run their own processor. Nothing extra is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import ConfigError
from ..models.layers import is_dit, select
from .base import ForwardContext

Sparse = Literal["entmax15", "sparsemax"]


def sparsemax(x: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dim: the Euclidean projection of ``x`` onto the simplex."""
    z = x - x.amax(dim=-1, keepdim=True)
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cum = zs.cumsum(-1) - 1.0
    support = (k * zs > cum).sum(dim=-1, keepdim=True)
    tau = cum.gather(-1, support - 1) / support.to(z.dtype)
    return (z - tau).clamp(min=0.0)


def entmax15(x: torch.Tensor) -> torch.Tensor:
    """1.5-entmax over the last dim: ``p = [x/2 - tau]_+^2`` with ``tau`` making ``sum p = 1`` (exact, by sorting)."""
    z = (x - x.amax(dim=-1, keepdim=True)) / 2.0
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = zs.cumsum(-1) / k
    mean_sq = (zs * zs).cumsum(-1) / k
    delta = (1.0 - k * (mean_sq - mean * mean)) / k
    tau = mean - delta.clamp(min=0.0).sqrt()
    support = (tau <= zs).sum(dim=-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0.0) ** 2


SPARSE = {"entmax15": entmax15, "sparsemax": sparsemax}


def pladis_map(scores: torch.Tensor, lam: float, sparse: Sparse) -> torch.Tensor:
    """The PLADIS attention map of pre-softmax ``scores`` (..., K): ``A_d + lam (A_s - A_d)``."""
    dense = scores.softmax(dim=-1)
    return dense + lam * (SPARSE[sparse](scores) - dense)


def is_cross_attention(name: str, module: nn.Module) -> bool:
    return isinstance(module, Attention) and module.is_cross_attention


def pladis_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    lam: float,
    sparse: Sparse,
) -> torch.Tensor:
    """A diffusers cross-attention layer's forward with the PLADIS map: (B, N, C) -> (B, N, C)."""
    residual = hidden_states
    b = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
    v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
    scores = (q @ k.transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        scores = scores + attn.prepare_attention_mask(attention_mask, k.shape[1], b)
    out = attn.batch_to_head_dim(pladis_map(scores.float(), lam, sparse).to(v.dtype) @ v)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _PladisProcessor:
    """Wraps a cross-attention layer's processor: PLADIS on every row while the branch is listed."""

    def __init__(self, original: Any, branch: str, ctx: ForwardContext, lam: float, sparse: Sparse) -> None:
        self.original, self.branch, self.ctx, self.lam, self.sparse = original, branch, ctx, lam, sparse

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.ctx.rows_of(self.branch) is None or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return pladis_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, self.lam, self.sparse
        )


@dataclass(frozen=True)
class SparseAttention:
    """PLADIS: extrapolate the selected cross-attention maps towards alpha-entmax (model-wide)."""

    scale: float = 2.0
    sparse: Sparse = "entmax15"
    layers: str | None = None  # None: every cross-attention layer

    scope = "all"  # the engine lists every row of every chunk as the branch's (see module doc)
    stacks_in_place = True  # may share the conditional branch with NAG (perturb/stacked.py)

    def __post_init__(self) -> None:
        if self.sparse not in get_args(Sparse):
            raise ConfigError(f"PLADIS sparse must be one of entmax15, sparsemax, got {self.sparse!r}")

    def targets(self, model: nn.Module) -> list[str]:
        if is_dit(model):
            raise ConfigError("PLADIS needs a UNet's cross-attention; this model has joint attention")
        if self.layers is None:
            return [name for name, m in model.named_modules() if is_cross_attention(name, m)]
        return select(model, self.layers, is_cross_attention)

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        modules = dict(model.named_modules())
        saved: list[tuple[Attention, Any]] = []
        try:
            for name in self.targets(model):
                attn = modules[name]
                saved.append((attn, attn.processor))  # type: ignore[arg-type]
                attn.processor = _PladisProcessor(attn.processor, branch, ctx, self.scale, self.sparse)
            yield
        finally:
            for attn, processor in reversed(saved):
                attn.processor = processor
