"""Tiny diffusers models built from configs, for tests and benchmarks (never downloaded).

Weights are random but fixed by ``seed``. :func:`tiny_sd15` and :func:`tiny_sdxl` return
complete diffusers pipelines (UNet, VAE, text encoders, byte-level CLIP tokenizers).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def byte_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a byte-level vocabulary and no merges (model_max_length 77)."""
    chars = (
        [chr(c) for c in range(33, 127)]
        + [chr(c) for c in range(161, 173)]
        + [chr(c) for c in range(174, 256)]
    )
    chars += [chr(256 + n) for n in range(256 - len(chars))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.pad_token = "<|endoftext|>"
    return tok


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    return vae.eval()


def _text(seed: int, hidden: int, projection: bool = False) -> Any:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def sd15_unet(
    seed: int = 0, channels: tuple[int, ...] = (32, 64), cross_dim: int = 32, sample: int = 16
) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    n = len(channels)
    unet: Any = UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


def sdxl_unet(
    seed: int = 0,
    channels: tuple[int, ...] = (32, 64),
    layers: tuple[int, ...] = (1, 2),
    sample: int = 16,
    cross_dim: int = 64,
    pooled_dim: int = 32,
) -> UNet2DConditionModel:
    """An SDXL-shaped UNet: first down block without attention, text_time micro-conditioning."""
    torch.manual_seed(seed)
    n = len(channels)
    unet: Any = UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        transformer_layers_per_block=layers,
        attention_head_dim=tuple(max(1, c // 32) for c in channels),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
        cross_attention_dim=cross_dim,
        norm_num_groups=8 if min(channels) < 32 else 32,
    )
    return unet.eval()


def tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=_vae(seed + 1),
        text_encoder=_text(seed + 2, 32),
        tokenizer=byte_tokenizer(),
        unet=sd15_unet(seed),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1),
        text_encoder=_text(seed + 2, 32),
        text_encoder_2=_text(seed + 3, 32, projection=True),
        tokenizer=byte_tokenizer(),
        tokenizer_2=byte_tokenizer(),
        unet=sdxl_unet(seed),
        scheduler=_scheduler(),
    )
