"""Tiny diffusers transformers (SD3, SD3.5, Flux, AuraFlow, Qwen-Image) built from configs, with
random inputs for one forward call. Reusable by any test that needs a DiT; nothing downloads.

Each builder seeds torch before building, so the weights are the same in every run. The
weights are then scaled up (``_liven``): diffusers zero-initialises the adaLN modulations of
some families, which would make every block an identity and every perturbation invisible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FAMILIES = ("sd3", "sd35", "flux", "auraflow", "qwen")


@dataclass(frozen=True)
class TinyDiT:
    """A tiny transformer and a way to make its inputs for ``batch`` rows."""

    family: str
    model: nn.Module
    make_inputs: Callable[[int, int], dict[str, Any]]  # (batch, seed) -> forward kwargs

    def inputs(self, batch: int = 3, seed: int = 0) -> dict[str, Any]:
        return self.make_inputs(batch, seed)

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**kwargs, return_dict=False)[0]


def _liven(model: nn.Module, seed: int) -> nn.Module:
    """Give every weight and bias a random value of a sensible size (zero-init modulations, too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 8
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model.eval()


def sd3(layers: int = 12, dual: tuple[int, ...] = (), qk_norm: str | None = None) -> TinyDiT:
    """SD3 (or, with ``dual`` and ``qk_norm='rms_norm'``, SD3.5): 8x8 latents, patch 2 -> 16 image tokens."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=dual,
        qk_norm=qk_norm,
    )

    def make(batch: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }

    family = "sd35" if dual else "sd3"
    return TinyDiT(family, _liven(model, 1), make)


def sd35(layers: int = 12) -> TinyDiT:
    """SD3.5-style: dual attention (``attn2``) in blocks 0..2 and RMS qk-norm."""
    return sd3(layers, dual=(0, 1, 2), qk_norm="rms_norm")


def flux(layers: int = 3, single: int = 10, guidance: bool = True) -> TinyDiT:
    """Flux: packed 4x4 latents (16 image tokens of 16 channels), 6 text tokens."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )

    def make(batch: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        img_ids = torch.zeros(4, 4, 3)
        img_ids[..., 1] = torch.arange(4)[:, None]
        img_ids[..., 2] = torch.arange(4)[None, :]
        kwargs = {
            "hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g),
            "timestep": torch.rand(batch, generator=g),
            "img_ids": img_ids.reshape(16, 3),
            "txt_ids": torch.zeros(6, 3),
        }
        if guidance:
            kwargs["guidance"] = torch.full((batch,), 3.5)
        return kwargs

    return TinyDiT("flux", _liven(model, 2), make)


def auraflow(joint: int = 2, single: int = 10) -> TinyDiT:
    """AuraFlow: 8x8 latents, patch 2 -> 16 image tokens; 5 text tokens + 8 register tokens."""
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    model = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=joint,
        num_single_dit_layers=single,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    )

    def make(batch: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }

    return TinyDiT("auraflow", _liven(model, 3), make)


def qwen(layers: int = 10) -> TinyDiT:
    """Qwen-Image: packed 4x4 tokens of 64 channels (an 8x8 latent of 16 channels), 7 text tokens
    with a padding mask (the last two tokens of row 0 are padding)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12),
    )

    def make(batch: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, 7, dtype=torch.long)
        mask[0, 5:] = 0
        return {
            "hidden_states": torch.randn(batch, 16, 64, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 64, generator=g),
            "encoder_hidden_states_mask": mask,
            "timestep": torch.rand(batch, generator=g),
            "img_shapes": [[(1, 4, 4)]] * batch,
        }

    return TinyDiT("qwen", _liven(model, 4), make)


BUILDERS: dict[str, Callable[[], TinyDiT]] = {
    "sd3": sd3,
    "sd35": sd35,
    "flux": flux,
    "auraflow": auraflow,
    "qwen": qwen,
}
