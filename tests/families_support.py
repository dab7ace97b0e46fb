"""Tiny transformer-family pipelines built from configs (never downloaded), for tests.

Reusable by every family's tests: :func:`tiny_sd3` (SD3, or SD3.5 with ``sd35=True``: dual
attention + qk norm) with two tiny CLIP encoders and a tiny T5 encoder, :func:`save_tiny`
to write any pipeline as a diffusers folder (for loading tests), and the two sides of a
family's parity test (:func:`pipeline_latents`, :func:`guided_latents`) and its CLI round trip
(:func:`check_generate_and_replay`). The text encoders reuse the
byte-level CLIP tokenizer of :mod:`diffguide.testing` (the T5 encoder too: any tokenizer that
pads to a fixed length serves a random T5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import T5Config, T5EncoderModel

from diffguide import GuidedPipeline
from diffguide.testing import _text, byte_tokenizer
from diffguide.testing_dit import _vae

CLIP_DIM = 32  # each CLIP encoder's hidden size and projection (pooled: 2 x 32 = 64)
T5_DIM = 64  # T5 d_model = the transformer's joint_attention_dim (CLIP states are padded to it)
LATENT_CHANNELS = 16  # as real SD3
#: SD3's VAE latent statistics (scaling and shift factor), so decode's shift is exercised.
SD3_SCALING, SD3_SHIFT = 1.5305, 0.0609


def tiny_t5(seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=600,
        d_model=T5_DIM,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=513,
        eos_token_id=513,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def sd3_transformer(seed: int = 0, layers: int = 4, sd35: bool = False) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model: Any = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=2 * CLIP_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=16,
        dual_attention_layers=(0, 1) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )
    return model.eval()


def tiny_sd3(seed: int = 0, layers: int = 4, sd35: bool = False) -> StableDiffusion3Pipeline:
    """A complete StableDiffusion3Pipeline: 16x16-latent transformer (patch 2), VAE x2, 3 encoders."""
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(seed, layers, sd35),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, LATENT_CHANNELS, shift=SD3_SHIFT, scale=SD3_SCALING),
        text_encoder=_text(seed + 2, CLIP_DIM, projection=True),
        tokenizer=byte_tokenizer(),
        text_encoder_2=_text(seed + 3, CLIP_DIM, projection=True),
        tokenizer_2=byte_tokenizer(),
        text_encoder_3=tiny_t5(seed + 4),
        tokenizer_3=byte_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(pipe: Any, folder: Path) -> Path:
    """The pipeline as a diffusers folder (safetensors weights)."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def pipeline_latents(pipe: Any, prompts, negatives, *, steps: int, seed: int, **kwargs: Any) -> torch.Tensor:
    """The diffusers pipeline's final latents (a new pipeline of ``pipe``'s class over the same
    components), one CPU generator per image (``seed + i``)."""
    ref = type(pipe)(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = ref(
        prompts,
        negative_prompt=negatives,
        generator=gens,
        num_inference_steps=steps,
        output_type="latent",
        **kwargs,
    )
    return out.images


def guided_latents(
    pipe: Any, guidance, prompts, negatives, *, steps: int, seed: int
) -> tuple[torch.Tensor, list[int]]:
    """diffguide's final latents and the row count of every transformer forward (one per step)."""
    gp = GuidedPipeline(pipe)
    rows: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append(int((a[0] if a else k["hidden_states"]).shape[0])), with_kwargs=True
    )
    try:
        out = gp.generate(prompts, negatives, guidance=guidance, steps=steps, seed=seed, decode=False)
    finally:
        handle.remove()
    assert out.forward_calls == steps == len(rows)
    return out.latents, rows


def check_generate_and_replay(args: list[str], out: Path) -> None:
    """``diffguide generate`` with ``args`` into ``out`` succeeds, and replaying its first image
    is bit-identical."""
    from typer.testing import CliRunner

    from diffguide.cli.main import app

    res = CliRunner().invoke(app, [*args, "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    png = next(line for line in res.output.splitlines() if line.endswith("-001-1.png"))
    res = CliRunner().invoke(app, ["replay", png])
    assert res.exit_code == 0 and "bit-identical" in res.output and "NOT" not in res.output, res.output


def max_diff(got, ref) -> float:
    """Max abs difference of two latents, printed with the test's name (``pytest -s`` shows the
    figures docs/families.md and the README quote)."""
    import os

    diff = float((got - ref).abs().max().item())
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"{test}: max abs diff vs reference {diff:.2g}")
    return diff
