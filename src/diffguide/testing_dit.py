"""Tiny flow-matching transformer pipelines built from configs (never downloaded).

Weights are random but fixed by ``seed``; each builder returns a complete diffusers pipeline
that runs on the CPU in milliseconds per step:

- :func:`tiny_flux`: ``FluxPipeline`` (CLIP + T5 text encoders, byte-level CLIP tokenizers for both,
  4-channel VAE with Flux's shift/scale factors, transformer packed 2x2 -> 16 channels);
  ``guidance_embeds=True`` by default (dev-like), ``False`` for a schnell-like model.
- :func:`tiny_auraflow`: ``AuraFlowPipeline`` (UMT5 encoder, byte-level tokenizer).
- :func:`tiny_qwen_image`: ``QwenImagePipeline`` without a text encoder (Qwen2.5-VL is not built
  here): pass ``prompt_embeds`` / ``prompt_embeds_mask`` (see :func:`qwen_embeds`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from .testing import _text, byte_tokenizer

VOCAB = 600  # byte_tokenizer's ids are < 514


def _vae(seed: int, latent_channels: int = 4, shift: float | None = None, scale: float = 1.0) -> Any:
    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=shift,
        scaling_factor=scale,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return vae.eval()


def _t5(seed: int, d_model: int, umt5: bool = False) -> Any:
    torch.manual_seed(seed)
    kw: dict[str, Any] = {
        "vocab_size": VOCAB,
        "d_model": d_model,
        "d_kv": 8,
        "d_ff": 2 * d_model,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "decoder_start_token_id": 0,
        "pad_token_id": 513,
    }
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def tiny_flux(seed: int = 0, guidance_embeds: bool = True, dynamic_shift: bool = True) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if not dynamic_shift else 1.0,
        use_dynamic_shifting=dynamic_shift,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed + 1, shift=0.1159, scale=0.3611),
        text_encoder=_text(seed + 2, 32),
        tokenizer=byte_tokenizer(),
        text_encoder_2=_t5(seed + 3, 32),
        tokenizer_2=byte_tokenizer(),
        transformer=transformer.eval(),
    )


def tiny_auraflow(seed: int = 0) -> AuraFlowPipeline:
    torch.manual_seed(seed)
    transformer: Any = AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    return AuraFlowPipeline(
        tokenizer=byte_tokenizer(),
        text_encoder=_t5(seed + 2, 32, umt5=True),
        vae=_vae(seed + 1, scale=0.13025),
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )


def tiny_qwen_image(seed: int = 0) -> QwenImagePipeline:
    torch.manual_seed(seed)
    transformer: Any = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12),
    )
    torch.manual_seed(seed + 1)
    vae: Any = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer.eval(),
    )


def qwen_embeds(seed: int, batch: int, tokens: int = 7, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Qwen-Image prompt embeddings (B, L, D) and their mask (B, L), all tokens valid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=g), torch.ones(batch, tokens, dtype=torch.long)
